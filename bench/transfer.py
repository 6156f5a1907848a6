"""`python -m bench transfer [--quick]` (root, for the namespaces): how fast
checkpoint bytes move between nodes, against what the link carries.

1. Throughput, on two namespace hosts, over an unlimited veth and over a
   20 Mbit/s `tc tbf` link, in the same run, interleaved (median of 3):
   - raw TCP: the file sent with sendfile(2), received and dropped: the
     link's ceiling in this setup;
   - a Python TLS socket with the cluster's certificates (the alternative
     to gRPC for an encrypted data plane);
   - exod's path: the fetch engine (daemon/fetch.py) reading the file from
     an `exod start` daemon over ReadModelFile (gRPC, mutual TLS, chunks
     each hashed by the source and checked by the receiver), two streams,
     as a rank's fetch does, written into a file as a shard is.
2. Time to Ready of `midsize-moe` (1.4 GB; quick: `matrix-moe`, 0.7 GB),
   moe_tensor on two hosts when only a third holds it in its Hugging Face
   cache: placed directly (each rank fetches its bytes), against `exod pull`
   of the whole checkpoint onto both first and then placing; time and bytes
   received on each host's interface."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import Lab  # noqa: E402

API = 52415
GRPC = 52416
RAW_PORT = 7001
TLS_PORT = 7002

RAW_SERVER = r"""
import socket, sys
path, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(4)
print("up", flush=True)
while True:
    c, _ = s.accept()
    with open(path, "rb") as f:
        c.sendfile(f)
    c.close()
"""

TLS_SERVER = r"""
import socket, ssl, sys
path, port, cert, key, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key); ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(4)
print("up", flush=True)
while True:
    c, _ = s.accept()
    try:
        t = ctx.wrap_socket(c, server_side=True)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                t.sendall(block)
        t.close()
    except (OSError, ssl.SSLError):
        c.close()
"""

CLIENT = r"""
import json, socket, ssl, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((host, port))
if mode == "tls":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    ctx.load_verify_locations(sys.argv[6]); ctx.check_hostname = False
    s = ctx.wrap_socket(s)
buf = bytearray(1 << 20); n = 0; t = time.perf_counter()
while True:
    try:
        k = s.recv_into(buf)
    except ssl.SSLError:
        break
    if not k:
        break
    n += k
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t}))
"""


def _fetch_client() -> str:
    """exod's bulk path, as a member: the fetch engine over ReadModelFile."""
    code = r"""
import asyncio, json, os, sys, time
from cryptography.hazmat.primitives.asymmetric import ec
from exod.daemon import fetch, keys, signing, transport
from exod.daemon.config import PROTOCOL_VERSION
from exod.models.shards import file_part
from exod.proto import exod_pb2 as pb

address, key, model_id, name, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
out_path = sys.argv[6]

class Node:  # what PeerSource asks of a node: where the peer is, and a stub
    def __init__(self, identity):
        self.channel = transport.secure_channel(address, identity)
    def _address_of(self, node_id):
        return address
    def _stub(self, _):
        return transport.peer_stub(self.channel)

class Written:  # where a shard's bytes go: a file, by position
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    def write(self, index, position, data):
        os.pwrite(self.fd, data, position)

async def main():
    # A member: holds the cluster key, and meets the daemon with a signed record (as a node does).
    identity = keys.issue(keys.derive_ca(keys.parse_cluster_key(key)), ec.generate_private_key(ec.SECP256R1()))
    record = pb.NodeRecord(profile=pb.NodeProfile(node_id=identity.node_id, name="bench"), version=1,
                           incarnation=int(time.time() * 1000), cluster_id="bench", protocol_version=PROTOCOL_VERSION)
    signing.sign(identity, record)
    node = Node(identity)
    await transport.peer_stub(node.channel).Exchange(pb.ExchangeRequest(sender=record), timeout=10)
    source = fetch.PeerSource(node, "x", "h0", model_id, "", {name})
    job = fetch.Fetch([file_part(name, size)], Written(out_path), [source])
    t = time.perf_counter()
    await job.run()
    seconds = time.perf_counter() - t
    print(json.dumps({"bytes": job.progress.done, "seconds": seconds}))
    os.unlink(out_path)
    await node.channel.close()

asyncio.run(main())
"""
    return code


def _median_rate(samples: list) -> float:
    return statistics.median(s["bytes"] / s["seconds"] for s in samples)


def throughput(quick: bool) -> dict:
    from exod.daemon import keys

    key = keys.new_cluster_key()
    work = Path(tempfile.mkdtemp(prefix="exod-bench-transfer-"))
    lab = Lab(2)
    procs = []
    results = {}
    try:
        lab.create()
        # The source's "checkpoint": a folder of the exod store with a config and one big file.
        model = work / "h0" / "models" / "bench" / "blob"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        from cryptography.hazmat.primitives.asymmetric import ec

        identity = keys.issue(keys.derive_ca(keys.parse_cluster_key(key)), ec.generate_private_key(ec.SECP256R1()))
        pem = {"cert": identity.cert_pem, "key": identity.key_pem, "ca": identity.ca.pem}
        for name, data in pem.items():
            (work / f"{name}.pem").write_bytes(data)
        tls_args = [str(work / "cert.pem"), str(work / "key.pem"), str(work / "ca.pem")]
        # (name, bytes, tbf rate and burst, the rate in bytes/s): a link as
        # fast as memory on this machine, a gigabit link, and a slow one.
        links = (("unlimited", (256 if quick else 512) << 20, None, 0.0),
                 ("tbf 1gbit", (64 if quick else 128) << 20, ("1gbit", "1mb"), 125e6),
                 ("tbf 20mbit", (12 if quick else 25) << 20, ("20mbit", "32kb"), 2.5e6))
        for link, size, tbf, link_rate in links:
            blob = model / "model.safetensors"
            with open(blob, "wb") as f:
                f.write(os.urandom(size))
            if tbf:
                lab.limit(0, *tbf)
            env = {**os.environ, "EXOD_CLUSTER_KEY": key, "EXOD_THROUGHPUT_PROBE_S": "600"}
            daemon = lab.run(0, [sys.executable, "-m", "exod.daemon.cli", "start", "--name", "h0", "--data-dir",
                                 str(work / "h0"), "--cluster", "bench", "--no-discovery", "--no-prestart",
                                 "--grpc-port", str(GRPC), "--api-port", str(API)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            procs.append(daemon)
            json.loads(daemon.stdout.readline())
            servers = [lab.run(0, [sys.executable, "-c", RAW_SERVER, str(blob), str(RAW_PORT)], stdout=subprocess.PIPE),
                       lab.run(0, [sys.executable, "-c", TLS_SERVER, str(blob), str(TLS_PORT), *tls_args],
                               stdout=subprocess.PIPE)]
            procs += servers
            for s in servers:
                s.stdout.readline()
            host = lab.addresses[0]
            samples = {"raw_tcp": [], "tls_socket": [], "exod": []}
            for _ in range(3):  # interleaved: drift hits each alike
                for mode in samples:
                    if mode == "raw_tcp":
                        args = [sys.executable, "-c", CLIENT, "raw", host, str(RAW_PORT)]
                    elif mode == "tls_socket":
                        args = [sys.executable, "-c", CLIENT, "tls", host, str(TLS_PORT), *tls_args]
                    else:
                        args = [sys.executable, "-c", _fetch_client(), f"{host}:{GRPC}", key,
                                "bench/blob", "model.safetensors", str(size), str(work / "received")]
                    out = subprocess.run(["ip", "netns", "exec", lab.hosts[1], *args], capture_output=True, text=True,
                                         cwd=REPO, timeout=600, env={**os.environ, "EXOD_CLUSTER_KEY": key})
                    sample = json.loads(out.stdout.strip().splitlines()[-1])
                    if sample["bytes"] != size:
                        raise RuntimeError(f"{mode} moved {sample['bytes']} of {size} bytes: {out.stderr[-500:]}")
                    samples[mode].append(sample)
            rates = {mode: _median_rate(s) for mode, s in samples.items()}
            results[link] = {"bytes": size, "mb_per_s": {m: r / 1e6 for m, r in rates.items()},
                             "exod_over_raw_tcp": rates["exod"] / rates["raw_tcp"],
                             "tls_socket_over_raw_tcp": rates["tls_socket"] / rates["raw_tcp"]}
            if link_rate:
                results[link]["exod_over_tbf_rate"] = rates["exod"] / link_rate
            for p in [daemon, *servers]:
                p.kill()
                p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return results


# ------------------------------------------------------------------ time to Ready


def _state(lab, i):
    out = subprocess.run(["ip", "netns", "exec", lab.hosts[i], "curl", "-s", "-m", "5",
                          f"http://127.0.0.1:{API}/v1/state"], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def _post(lab, i, path, body, timeout=3600):
    out = subprocess.run(["ip", "netns", "exec", lab.hosts[i], "curl", "-s", "-m", str(timeout), "-X", "POST",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body),
                          f"http://127.0.0.1:{API}{path}"], capture_output=True, text=True)
    return out.stdout


def _rx(lab, i) -> int:
    return int(subprocess.run(["ip", "netns", "exec", lab.hosts[i], "cat", "/sys/class/net/eth0/statistics/rx_bytes"],
                              capture_output=True, text=True).stdout)


def _wait(predicate, timeout, step=0.2):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    raise RuntimeError(f"not within {timeout} s")


def _ready(lab, i, iid) -> bool:
    found = next((x for x in _state(lab, i).get("instances", []) if x["instance_id"] == iid), None)
    if found and found["state"] == "INSTANCE_FAILED":
        raise RuntimeError(f"instance failed: {found.get('reason')}")
    return bool(found) and found["state"] == "INSTANCE_READY"


def time_to_ready(quick: bool) -> dict:
    from exod.models import synthetic
    from tests.model_fixtures import hf_cache_with

    name = "matrix-moe" if quick else "midsize-moe"
    repo_id = f"bench/{name}"
    work = Path(tempfile.mkdtemp(prefix="exod-bench-ready-"))
    source = synthetic.ensure_named(name, work / "built")
    total = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    hf_cache_with(work / "h0-hub", source, repo_id)
    lab = Lab(3)
    procs = []
    result = {"model": name, "checkpoint_bytes": total}
    try:
        lab.create()

        def start(i):
            env = {**os.environ, "EXOD_THROUGHPUT_PROBE_S": "600", "EXOD_HF_CACHE": str(work / f"h{i}-hub")}
            return lab.run(i, [sys.executable, "-m", "exod.daemon.cli", "start", "--name", f"h{i}", "--data-dir",
                               str(work / f"h{i}"), "--cluster", "bench", "--no-prestart", "--api-port", str(API),
                               "--grpc-port", str(GRPC)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

        procs += [start(i) for i in range(3)]
        _wait(lambda: all(len([n for n in _state(lab, i).get("nodes", []) if n.get("status") == "UP"]) == 3
                          for i in range(3)), 60)
        _wait(lambda: any(h["model_id"] == repo_id for n in _state(lab, 1).get("nodes", [])
                          for h in n["record"]["profile"].get("models", [])), 30)
        body = {"model": repo_id, "strategy": "moe_tensor", "nodes": ["h1", "h2"], "ranks": 2, "context_length": 256}

        # Each rank fetches only its bytes.
        rx = [_rx(lab, i) for i in range(3)]
        t = time.monotonic()
        iid = json.loads(_post(lab, 1, "/v1/instances", body))["instance_id"]
        _wait(lambda: _ready(lab, 1, iid), 1800)
        result["shards"] = {"ready_s": time.monotonic() - t,
                            "received_bytes": {f"h{i}": _rx(lab, i) - rx[i] for i in (1, 2)}}
        subprocess.run(["ip", "netns", "exec", lab.hosts[1], "curl", "-s", "-X", "DELETE",
                        f"http://127.0.0.1:{API}/v1/instances/{iid}"], capture_output=True)
        for i in (1, 2):  # the next placement must not find the shards
            shutil.rmtree(work / f"h{i}" / "shards", ignore_errors=True)

        # Copy the whole checkpoint onto both first, then place.
        rx = [_rx(lab, i) for i in range(3)]
        t = time.monotonic()
        pulls = [subprocess.Popen(["ip", "netns", "exec", lab.hosts[i], sys.executable, "-m", "exod.daemon.cli",
                                   "pull", repo_id], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in (1, 2)]
        for p in pulls:
            if p.wait(3600) != 0:
                raise RuntimeError(f"pull failed: {p.stderr.read()[-500:]}")
        pulled = time.monotonic() - t
        iid = json.loads(_post(lab, 1, "/v1/instances", body))["instance_id"]
        _wait(lambda: _ready(lab, 1, iid), 1800)
        result["copy_first"] = {"ready_s": time.monotonic() - t, "pull_s": pulled,
                                "received_bytes": {f"h{i}": _rx(lab, i) - rx[i] for i in (1, 2)}}
        result["speedup"] = result["copy_first"]["ready_s"] / result["shards"]["ready_s"]
        result["bytes_ratio"] = (sum(result["shards"]["received_bytes"].values())
                                 / sum(result["copy_first"]["received_bytes"].values()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(15)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return result


def run(quick: bool = False) -> dict:
    links = throughput(quick)
    ready = time_to_ready(quick)
    goals = {f"exod_over_raw_tcp >= 0.8 ({link})": v["exod_over_raw_tcp"] for link, v in links.items()}
    goals.update({f"exod_over_tbf_rate >= 0.9 ({link})": v["exod_over_tbf_rate"] for link, v in links.items()
                  if "exod_over_tbf_rate" in v})
    return {"bench": "transfer", "ok": True, "quick": quick, "throughput": links, "time_to_ready": ready,
            "goals": goals}


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
