"""A LAN neighbour, on real hosts (network namespaces on one bridge): a
daemon with another cluster key joins nothing and disturbs nothing, and is
shown as seen, not a member; a host without the key gets no further than
the TLS handshake on any RPC, and no further than the HTTP rules on the
API."""

import json
import os
import subprocess
import sys
import time

from exod.daemon import keys

from .conftest import REPO
from .netns import lab, leftover_namespaces

API, GRPC = 52415, 52416
ATTACK = """
import asyncio, sys, time
import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from exod.daemon import keys, transport
from exod.proto import exod_pb2 as pb
target, other_key = sys.argv[1], sys.argv[2]

async def main():
    wrong = keys.issue(keys.derive_ca(keys.parse_cluster_key(other_key)), ec.generate_private_key(ec.SECP256R1()))
    codes = []
    for channel in (grpc.aio.insecure_channel(target), transport.secure_channel(target, wrong)):
        stub = transport.peer_stub(channel)
        iid = "0123456789ab"
        for call in (stub.Exchange(pb.ExchangeRequest(), timeout=3),
                     stub.Reserve(pb.ReserveRequest(reservation=pb.Reservation(
                         reservation_id=iid + "-0", instance_id=iid, bytes=1, expires_at_unix_ms=-1)), timeout=3),
                     stub.StartRunner(pb.StartRunnerRequest(spec=pb.RunnerSpec(instance_id=iid, world_size=1),
                                                            model="demo"), timeout=3),
                     stub.Heartbeat(pb.HeartbeatRequest(cluster_id="default"), timeout=3),
                     stub.Leave(pb.LeaveRequest(node_id="0" * 32, incarnation=2**62), timeout=3),
                     stub.StopInstance(pb.StopInstanceRequest(instance_id=iid), timeout=3)):
            try:
                await call
                codes.append("OK")
            except grpc.aio.AioRpcError as e:
                codes.append(e.code().name)
        await channel.close()
    print(" ".join(codes))

asyncio.run(main())
"""


def curl(net, index, url, *extra):
    out = subprocess.run(["ip", "netns", "exec", net.hosts[index], "curl", "-s", "-m", "3", "-o", "/dev/stdout",
                          "-w", "\n%{http_code}", *extra, url], capture_output=True, text=True)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def state(net, index):
    code, body = curl(net, index, f"http://127.0.0.1:{API}/v1/state")
    return json.loads(body) if code == 200 else None


def names(view):
    return {n["record"]["profile"]["name"]: n.get("status") for n in (view or {}).get("nodes", [])}


def wait(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


def test_a_daemon_of_another_key_and_a_keyless_host_change_nothing(tmp_path):
    other_key = keys.new_cluster_key()
    procs = []
    try:
        with lab(3) as net:
            def start(index, *extra, env=None):
                log = open(tmp_path / f"h{index}.log", "ab")
                proc = net.run(index, [sys.executable, "-m", "exod.daemon.cli", "start", "--name", f"h{index}",
                                       "--api-host", "0.0.0.0", "--api-port", str(API), "--grpc-port", str(GRPC),
                                       "--data-dir", str(tmp_path / f"h{index}"), "--no-prestart", *extra],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, env=env or os.environ)
                procs.append(proc)
                return proc

            start(0)
            start(1)
            # Same cluster name, same LAN, mDNS on; another key.
            start(2, "--cluster-key", other_key)
            wait(lambda: names(state(net, 0)) == {"h0": "UP", "h1": "UP"}
                 and names(state(net, 1)) == {"h0": "UP", "h1": "UP"}, 30)
            wait(lambda: any(s["address"].startswith(net.addresses[2])
                             for s in (state(net, 0) or {}).get("strangers", [])), 20)

            # The keyless host tries the peer plane: every call dies in the handshake.
            attack = subprocess.run(["ip", "netns", "exec", net.hosts[2], sys.executable, "-c", ATTACK,
                                     f"{net.addresses[0]}:{GRPC}", other_key],
                                    capture_output=True, text=True, cwd=REPO, timeout=120)
            assert attack.stdout.split() == ["UNAVAILABLE"] * 12, attack.stdout + attack.stderr
            # And the HTTP API from the LAN: no token, no mutation; no path as a model.
            lan = f"http://{net.addresses[0]}:{API}"
            code, _ = curl(net, 2, f"{lan}/v1/instances", "-X", "POST", "-H", "Content-Type: application/json",
                           "-d", json.dumps({"model": "demo"}))
            assert code == 403
            code, body = curl(net, 2, f"{lan}/v1/placements/preview", "-X", "POST",
                              "-H", "Content-Type: application/json", "-d", json.dumps({"model": "/etc"}))
            assert code == 400 and "by id" in body

            time.sleep(2)  # several heartbeat and meet rounds with the stranger about
            view = state(net, 0)
            assert names(view) == {"h0": "UP", "h1": "UP"}
            assert not view.get("instances") and all(not n.get("memory_reserved_bytes") for n in view["nodes"])
            stranger = next(s for s in view["strangers"] if s["address"].startswith(net.addresses[2]))
            assert stranger["reason"] == "another cluster key"
            # The daemon of the other key sees only itself as a member, and us as strangers.
            theirs = state(net, 2)
            assert names(theirs) == {"h2": "UP"}
            assert {s["address"].split(":")[0] for s in theirs.get("strangers", [])} >= {net.addresses[0]}
            # `exod nodes --all` shows it to people.
            out = subprocess.run(["ip", "netns", "exec", net.hosts[0], sys.executable, "-m", "exod.daemon.cli",
                                  "nodes", "--all"], capture_output=True, text=True, cwd=REPO, timeout=30)
            assert out.returncode == 0 and "STRANGER" in out.stdout and "another cluster key" in out.stdout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not leftover_namespaces()
    logs = "".join((tmp_path / f"h{i}.log").read_text() for i in range(3))
    assert "Traceback" not in logs
