"""Checkpoints across real hosts: network namespaces, each running `exod
start` (mDNS), bytes counted on each host's interface.

- Slices only: only h0 holds a mixture-of-experts in its Hugging Face cache
  (written by huggingface_hub from a local mirror). Placed moe_tensor on h1
  and h2, both reach Ready, and each receives under 0.75x the checkpoint's
  bytes; the greedy answer is a single-node instance's on h0; placed again,
  nothing moves; as a pipeline, each host receives about its stage.
- Source killed: h1's rank fetches from h0 and h3 over 40 Mbit/s links;
  kill -9 of h0 mid-transfer and the rest comes from h3. Then h3 alone
  serves h2's rank and is killed: the rank ends Failed within its deadline
  with the reason, and no partial file is left.
- Hub fallback: no node holds the model; each host's rank downloads from a
  mirror at HF_ENDPOINT only the files that hold its tensors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO
from .model_fixtures import MOE, build_moe, hf_cache_with
from .netns import lab, leftover_namespaces
from .daemon_helpers import one_machine_bandwidth
from .test_daemon_hosts import API, members, state, wait

REPO_ID = "acme/moe-16x"


def start(net, index, tmp_path, env=None, extra=()):
    data = tmp_path / f"h{index}"
    data.mkdir(exist_ok=True)
    one_machine_bandwidth(data)  # emulated hosts of one machine: one bandwidth, even shares
    log = open(tmp_path / f"h{index}.log", "ab")
    return net.run(index, [sys.executable, "-m", "exod.daemon.cli", "start", "--name", f"h{index}",
                           "--api-port", str(API), "--data-dir", str(data), "--memory-limit", "6GB", "--cluster",
                           "models", "--no-prestart", *extra],
                   stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
                   # One throughput probe per link (2 MB each), not one every few seconds: bytes
                   # on the interface are what the test counts.
                   env={**os.environ, "EXOD_RTT_PROBE_S": "0.5", "EXOD_THROUGHPUT_PROBE_S": "600",
                        "EXOD_HF_CACHE": str(tmp_path / f"h{index}-hub"), **(env or {})})


def in_ns(net, index, args, timeout=300):
    return subprocess.run(["ip", "netns", "exec", net.hosts[index], *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def http(net, index, method, path, body=None):
    args = ["curl", "-s", "-m", "300", "-X", method, "-w", "\n%{http_code}", f"http://127.0.0.1:{API}{path}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = in_ns(net, index, args).stdout
    text, _, code = out.rpartition("\n")
    return int(code or 0), json.loads(text) if text.strip() else {}


def rx(net, index) -> int:
    return int(in_ns(net, index, ["cat", "/sys/class/net/eth0/statistics/rx_bytes"]).stdout)


def instance(net, index, iid):
    return next((i for i in (state(net, index) or {}).get("instances", []) if i["instance_id"] == iid), None)


def until_state(net, index, iid, wanted, timeout):
    def check():
        i = instance(net, index, iid)
        if i and i["state"] == "INSTANCE_FAILED" and wanted != "INSTANCE_FAILED":
            raise AssertionError(f"instance failed: {i.get('reason')}")
        return i and i["state"] == wanted
    return wait(check, timeout, 0.2)


def holds(net, index, host, store=None):
    view = state(net, index) or {}
    for n in view.get("nodes", []):
        if n["record"]["profile"]["name"] == host:
            return [h for h in n["record"]["profile"].get("models", []) if h["model_id"] == REPO_ID
                    and (store is None or h.get("store") == store)]
    return []


def chat(net, index, max_tokens=16):
    code, answer = http(net, index, "POST", "/v1/chat/completions",
                        {"model": REPO_ID, "messages": [{"role": "user", "content": "hello world, what is a token?"}],
                         "temperature": 0, "max_tokens": max_tokens})
    assert code == 200, answer
    return answer["choices"][0]["message"]["content"]


def place(net, index, body):
    code, placed = http(net, index, "POST", "/v1/instances", {"context_length": 256, **body})
    assert code == 201, placed
    return placed


def stop_all(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_moe(tmp_path_factory.mktemp("moe"))


def checkpoint_bytes(source) -> int:
    return sum(p.stat().st_size for p in source.iterdir() if p.is_file())


def test_slices_only_reach_each_host(tmp_path, moe):
    total = checkpoint_bytes(moe)
    hf_cache_with(tmp_path / "h0-hub", moe, REPO_ID)
    procs = []
    try:
        with lab(3) as net:
            procs += [start(net, i, tmp_path) for i in range(3)]
            wait(lambda: all(set(members(state(net, i))) == {"h0", "h1", "h2"}
                             and set(members(state(net, i)).values()) == {"UP"} for i in range(3)), 30)
            wait(lambda: all(holds(net, i, "h0") for i in range(3)), 20)

            before = [rx(net, i) for i in range(3)]
            placed = place(net, 1, {"model": REPO_ID, "strategy": "moe_tensor", "nodes": ["h1", "h2"], "ranks": 2})
            for r in placed["placement"]["ranks"]:
                t = r["transfer"]
                assert t["sources"] == ["h0"] and 0 < int(t["bytes_to_fetch"]) < 0.75 * total, t
            until_state(net, 1, placed["instance_id"], "INSTANCE_READY", 300)
            received = [rx(net, i) - before[i] for i in range(3)]
            for host in (1, 2):
                assert received[host] < 0.75 * total, (host, received[host], total)
                assert received[host] > 0.3 * total  # it did fetch its half of the experts
            until_state(net, 2, placed["instance_id"], "INSTANCE_READY", 10)
            sharded = chat(net, 2)
            assert http(net, 1, "DELETE", f"/v1/instances/{placed['instance_id']}")[0] == 200

            single = place(net, 0, {"model": REPO_ID, "nodes": ["h0"], "ranks": 1})
            until_state(net, 0, single["instance_id"], "INSTANCE_READY", 300)
            until_state(net, 1, single["instance_id"], "INSTANCE_READY", 10)  # the record has reached h1
            assert chat(net, 1) == sharded and sharded
            assert http(net, 0, "DELETE", f"/v1/instances/{single['instance_id']}")[0] == 200

            # Placed again the same way: the shards are reused.
            before = [rx(net, i) for i in range(3)]
            again = place(net, 2, {"model": REPO_ID, "strategy": "moe_tensor", "nodes": ["h1", "h2"], "ranks": 2})
            until_state(net, 2, again["instance_id"], "INSTANCE_READY", 300)
            received = [rx(net, i) - before[i] for i in range(3)]
            assert max(received[1], received[2]) < 2_000_000, received  # heartbeats, records, no weights
            until_state(net, 0, again["instance_id"], "INSTANCE_READY", 10)
            assert chat(net, 0) == sharded
            assert http(net, 2, "DELETE", f"/v1/instances/{again['instance_id']}")[0] == 200
            out = in_ns(net, 0, [sys.executable, "-m", "exod.daemon.cli", "ls"])
            assert out.returncode == 0 and out.stdout.count("shard moe_tensor") == 2, out.stdout

            # A pipeline: each host receives its stage (and the tensors every stage needs).
            before = [rx(net, i) for i in range(3)]
            pipe = place(net, 1, {"model": REPO_ID, "strategy": "pipeline", "nodes": ["h1", "h2"], "ranks": 2})
            until_state(net, 1, pipe["instance_id"], "INSTANCE_READY", 300)
            received = [rx(net, i) - before[i] for i in range(3)]
            for r in pipe["placement"]["ranks"]:
                host = int(r["node_name"][1:])
                stage = int(r["transfer"]["bytes_to_fetch"])
                assert stage < 0.75 * total
                assert 0.95 * stage < received[host] < 1.05 * stage + 2_000_000, (r["node_name"], stage, received)
            until_state(net, 0, pipe["instance_id"], "INSTANCE_READY", 10)
            assert chat(net, 0) == sharded
            stop_all(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not leftover_namespaces()


def downloading(net, index, iid):
    i = instance(net, index, iid)
    runner = next((r for r in (i or {}).get("runners", []) if r.get("state") == "DOWNLOADING"), None)
    return (runner or {}).get("download")


def test_a_source_killed_mid_transfer(tmp_path, moe):
    total = checkpoint_bytes(moe)
    hf_cache_with(tmp_path / "h0-hub", moe, REPO_ID)
    hf_cache_with(tmp_path / "h3-hub", moe, REPO_ID)
    procs = []
    try:
        with lab(4) as net:
            for host in (0, 3):
                net.limit(host, "40mbit")  # 5 MB/s each: the transfer takes long enough to cut
            daemons = [start(net, i, tmp_path) for i in range(4)]
            procs += daemons
            names = {"h0", "h1", "h2", "h3"}
            wait(lambda: all(set(members(state(net, i))) == names and set(members(state(net, i)).values()) == {"UP"}
                             for i in range(4)), 40)
            wait(lambda: holds(net, 1, "h0") and holds(net, 1, "h3") and holds(net, 2, "h3"), 20)

            # h1's rank fetches from h0 and h3 at once; h0 dies a fifth of the way.
            placed = place(net, 1, {"model": REPO_ID, "nodes": ["h1"], "ranks": 1})
            iid = placed["instance_id"]
            wait(lambda: (d := downloading(net, 1, iid)) and int(d.get("bytes_done", 0)) > 0.2 * total, 120, 0.05)
            d = downloading(net, 1, iid)
            assert set(d["source"].split(", ")) == {"h0", "h3"}, d
            assert float(d["rate_bytes_per_s"]) > 0 and float(d["deadline_s"]) > 60
            listing = in_ns(net, 1, [sys.executable, "-m", "exod.daemon.cli", "instances"]).stdout
            assert "downloading" in listing and "MB/s from" in listing and "eta" in listing, listing
            daemons[0].send_signal(signal.SIGKILL)
            daemons[0].wait(5)
            until_state(net, 1, iid, "INSTANCE_READY", 300)
            assert chat(net, 1, 8)
            assert http(net, 1, "DELETE", f"/v1/instances/{iid}")[0] == 200

            # Only h3 holds it now; it dies while h2's rank fetches: Failed, with
            # what is missing and where from, within the deadline; nothing left.
            wait(lambda: members(state(net, 2)).get("h0") == "DOWN", 15)
            placed = place(net, 2, {"model": REPO_ID, "nodes": ["h2"], "ranks": 1})
            iid = placed["instance_id"]
            wait(lambda: (d := downloading(net, 2, iid)) and int(d.get("bytes_done", 0)) > 0.2 * total, 120, 0.05)
            deadline = float(downloading(net, 2, iid)["deadline_s"])
            killed = time.monotonic()
            daemons[3].send_signal(signal.SIGKILL)
            daemons[3].wait(5)
            until_state(net, 2, iid, "INSTANCE_FAILED", deadline + 30)
            assert time.monotonic() - killed < deadline
            reason = instance(net, 2, iid)["reason"]
            assert "Downloading failed" in reason and "missing" in reason and "h3" in reason, reason
            shards = tmp_path / "h2" / "shards"
            assert not [p for p in shards.rglob("*") if p.is_file()], list(shards.rglob("*"))
            stop_all(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not leftover_namespaces()


def test_the_hub_when_no_node_holds_it(tmp_path, tmp_path_factory):
    """Each host's rank of a two-stage pipeline downloads, from a mirror at
    HF_ENDPOINT, the files that hold its tensors and not the other stage's:
    the checkpoint keeps the layer-free tensors and each pair of layers in
    files of their own, as hub checkpoints are split by size."""
    import mlx.core as mx

    source = build_moe(tmp_path_factory.mktemp("hub-moe"), MOE, files=1)
    weights = mx.load(str(source / "model.safetensors"))
    groups = {"model-00001-of-00004.safetensors": [n for n in weights if ".layers." not in n]}
    for g in range(3):
        groups[f"model-{g + 2:05d}-of-00004.safetensors"] = [
            n for n in weights if any(f".layers.{i}." in n for i in (2 * g, 2 * g + 1))]
    mirror = tmp_path / "mirror" / "acme" / "moe-16x"
    mirror.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (mirror / f.name).write_bytes(f.read_bytes())
    for fname, names in groups.items():
        mx.save_safetensors(str(mirror / fname), {n: weights[n] for n in names}, metadata={"format": "mlx"})
    (mirror / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, names in groups.items() for n in names}}))
    procs = []
    try:
        with lab(2) as net:
            mirrors = [net.run(i, [sys.executable, "-m", "tests.hf_mirror", str(tmp_path / "mirror"), "8089"],
                               cwd=REPO, stdout=subprocess.PIPE) for i in range(2)]
            procs += mirrors
            for m in mirrors:
                json.loads(m.stdout.readline())
            env = {"HF_ENDPOINT": "http://127.0.0.1:8089", "HF_HUB_OFFLINE": "0"}
            procs += [start(net, i, tmp_path, env=env) for i in range(2)]
            wait(lambda: all(set(members(state(net, i)).values()) == {"UP"} and len(members(state(net, i))) == 2
                             for i in range(2)), 30)
            placed = place(net, 0, {"model": REPO_ID, "strategy": "pipeline", "nodes": ["h0", "h1"], "ranks": 2})
            assert all(r["transfer"]["sources"] == ["hub"] for r in placed["placement"]["ranks"])
            until_state(net, 0, placed["instance_id"], "INSTANCE_READY", 300)
            until_state(net, 1, placed["instance_id"], "INSTANCE_READY", 10)  # the record has reached h1
            assert chat(net, 1, 8)
            skipped = 0
            for r in placed["placement"]["ranks"]:
                host = int(r["node_name"][1:])
                [manifest] = (tmp_path / f"h{host}" / "shards").rglob("exod-shard.json")
                needed = set(json.loads(manifest.read_text())["source_digests"])
                sent = json.loads(in_ns(net, host, ["curl", "-s", "http://127.0.0.1:8089/_stats"]).stdout)
                for fname in groups:
                    got = sent.get(f"acme/moe-16x/{fname}", 0)
                    if fname in needed:  # whole (once), from this host's hub or from the peer that got it first
                        assert got <= (mirror / fname).stat().st_size + 100_000, (fname, got)
                    else:
                        assert got < 100_000, (r["node_name"], fname, sent)  # its header only, for planning
                        skipped += 1
                assert holds(net, host, f"h{host}", store="hf-cache")  # the downloads are in its HF cache
            assert skipped >= 2, "each stage leaves out a file of the other's layers"
            stop_all(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not leftover_namespaces()
