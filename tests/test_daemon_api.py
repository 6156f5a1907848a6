"""The daemon's HTTP API and `exod start` as a real process: JSON errors,
config precedence, free ports, and a clean, quick stop."""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from exod.daemon import config
from exod.daemon.discovery import parse_txt

from .conftest import REPO


def test_flags_beat_environment_beat_the_toml_file(tmp_path, monkeypatch):
    toml = tmp_path / "config.toml"
    toml.write_text('name = "from-file"\ncluster = "file"\nmemory-limit = "10GB"\napi_port = 1000\n')
    monkeypatch.setenv("EXOD_CLUSTER", "env")
    monkeypatch.setenv("EXOD_API_PORT", "2000")
    s = config.load({"api_port": 3000, "name": None}, str(toml))
    assert (s.name, s.cluster, s.api_port, s.memory_limit) == ("from-file", "env", 3000, 10 * 10**9)


@pytest.mark.parametrize("flags,message", [
    ({"api_port": 70000}, "api_port must be 0-65535"),
    ({"peers": ["nohost"]}, "is not HOST:PORT"),
    ({"memory_limit": "lots"}, "memory_limit"),
    ({"cluster": "x" * 64}, "cluster must be"),
])
def test_bad_settings_are_named(flags, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(flags)


def test_bad_toml_is_named(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("colour = 'blue'\n")
    with pytest.raises(config.ConfigError, match="unknown setting 'colour'"):
        config.load({}, str(bad))


@pytest.mark.parametrize("txt,reason", [
    ({}, "missing node id"),
    ({b"id": b"\xff\xfe", b"grpc": b"1", b"pv": b"1", b"cluster": b"c"}, "bad or missing node id"),
    ({b"id": b"0" * 32, b"grpc": b"99999", b"pv": b"1", b"cluster": b"c"}, "gRPC port"),
    ({b"id": b"0" * 32, b"grpc": b"1", b"pv": b"x", b"cluster": b"c"}, "protocol version"),
    ({b"id": b"0" * 32, b"grpc": b"1", b"pv": b"1", b"cluster": b"no spaces"}, "cluster id"),
])
def test_malformed_txt_records_are_refused_with_a_reason(txt, reason):
    assert reason in parse_txt(txt)


def test_a_good_txt_record_parses():
    assert parse_txt({b"id": b"a" * 32, b"grpc": b"5000", b"pv": b"1", b"cluster": b"lab"}) == ("a" * 32, 5000, 1, "lab", "")
    assert parse_txt({b"id": b"a" * 32, b"grpc": b"5000", b"pv": b"2", b"cluster": b"lab", b"ck": b"b" * 32})[4] == "b" * 32
    assert "fingerprint" in parse_txt({b"id": b"a" * 32, b"grpc": b"5000", b"pv": b"2", b"cluster": b"lab", b"ck": b"zz"})


@pytest.fixture
def daemon(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "exod.daemon.cli", "start", "--api-port", "0", "--grpc-port", "0",
                             "--grpc-host", "127.0.0.1", "--no-discovery", "--data-dir", str(tmp_path / "d"),
                             "--name", "solo"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = json.loads(proc.stdout.readline())
    yield proc, line
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def get(url, method="GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_start_prints_its_ports_serves_json_and_stops_cleanly(daemon):
    proc, line = daemon
    assert line["event"] == "listening" and line["grpc_port"] > 0
    api = line["api"]
    status, body = get(f"{api}/healthz")
    assert status == 200 and body == {"status": "ok", "node_id": line["node_id"]}
    status, body = get(f"{api}/v1/state")
    assert status == 200 and body["self_id"] == line["node_id"] and body["nodes"][0]["status"] == "UP"
    profile = body["nodes"][0]["record"]["profile"]
    assert profile["name"] == "solo" and int(profile["memory_usable_bytes"]) > 0 and profile["cores"] >= 1
    assert profile["backends"] == ["ring"] and profile["interfaces"]
    status, body = get(f"{api}/v1/nodes?status=up")
    assert status == 200 and len(body["nodes"]) == 1
    for url, method, code in ((f"{api}/v1/nodes?status=sideways", "GET", 400), (f"{api}/v1/nope", "GET", 404),
                              (f"{api}/v1/state", "POST", 405)):
        status, body = get(url, method)
        assert status == code and body["error"]["code"] == code and body["error"]["message"]
    for command, words in ((["nodes"], "solo"), (["status"], "1 of 1 nodes up"), (["status"], "solo (this node): up")):
        out = subprocess.run([sys.executable, "-m", "exod.daemon.cli", *command, "--api", api], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and words in out.stdout, out.stderr
    nodes = json.loads(subprocess.run([sys.executable, "-m", "exod.daemon.cli", "nodes", "--json", "--api", api],
                                      cwd=REPO, capture_output=True, text=True, timeout=30).stdout)
    assert nodes[0]["record"]["profile"]["name"] == "solo"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0  # a clean stop, within the deadline
    logs = [json.loads(l) for l in proc.stderr.read().splitlines()]  # JSON lines when not a terminal
    assert [l["event"] for l in logs][:1] == ["started"] and logs[-1]["event"] == "stopped"


def test_start_refuses_bad_flags_in_one_line(tmp_path):
    for args, message in ((["--api-port", "99999"], "api_port must be"),
                          (["--peer", "nohost"], "is not HOST:PORT"),
                          (["--memory-limit", "lots"], "memory_limit"),
                          (["--max-queue", "5000"], "max_queue must be 0-4096")):
        proc = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "start", "--data-dir", str(tmp_path), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_taken_port_is_a_one_line_error(tmp_path, daemon):
    _, line = daemon
    api_port = int(line["api"].rsplit(":", 1)[1])
    # No key given: a start that fails must not leave a made key behind (nor print it).
    env = {k: v for k, v in os.environ.items() if k != "EXOD_CLUSTER_KEY"}
    for taken in (["--grpc-host", "127.0.0.1", "--grpc-port", str(line["grpc_port"]), "--api-port", "0"],
                  ["--grpc-port", "0", "--api-port", str(api_port)]):  # gRPC already listening when the API fails
        data = tmp_path / f"x{len(taken)}{taken[-1]}"
        proc = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "start", "--data-dir", str(data),
                               "--no-discovery", *taken], cwd=REPO, capture_output=True, text=True, timeout=30, env=env)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("exod: error: cannot start"), proc.stderr
        assert not (data / "cluster_key").exists()


def test_a_second_daemon_on_a_data_dir_names_the_first(tmp_path, daemon):
    proc_first, _ = daemon
    data = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "start", "--data-dir", str(data), "--no-discovery",
                           "--api-port", "0", "--grpc-port", "0"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by exod pid {proc_first.pid}" in lines[0], proc.stderr


def test_cli_without_a_daemon_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "nodes", "--api", "http://127.0.0.1:9"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no exod daemon answers at http://127.0.0.1:9" in lines[0]


def exod_cli(*args, api):
    return subprocess.run([sys.executable, "-m", "exod.daemon.cli", *args, "--api", api], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_place_instances_chat_and_rm_from_the_cli(daemon):
    _, line = daemon
    api = line["api"]
    placed = exod_cli("place", "demo", "--wait", "--context-length", "512", api=api)
    assert placed.returncode == 0, placed.stderr
    iid, state = placed.stdout.split()[:2]
    assert state == "ready"
    listed = exod_cli("instances", api=api)
    assert iid in listed.stdout and "ready" in listed.stdout and "0@solo ready" in listed.stdout
    answer = exod_cli("chat", "demo", "hello world", "--max-tokens", "8", api=api)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    removed = exod_cli("rm", iid, api=api)
    assert removed.returncode == 0 and f"removed {iid}" in removed.stdout
    missing = exod_cli("rm", iid, api=api)
    assert missing.returncode == 2 and missing.stderr.strip() == f"exod: error: 404: no instance '{iid}'"
    nothing = exod_cli("chat", "demo", "hello", api=api)
    assert nothing.returncode == 2 and "no Ready instance of model 'demo'" in nothing.stderr
