"""Discovery on real hosts: three Linux network namespaces on one bridge,
each running `exod start` with mDNS and no static peers.

  full_view_s       from spawning the last daemon to every node listing all
                    three as Up (median over repetitions; target < 1.5 s)
  idle_bytes_per_s  per node, eth0 received + sent, over a quiet window
                    after the view is full (heartbeats, exchanges, RTT probes)

Needs root and iproute2."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import lab  # noqa: E402

API = 52415
TARGET_S = 1.5


def _start(net, index, data: Path, extra: tuple = ()):
    return net.run(index, [sys.executable, "-m", "exod.daemon.cli", "start", "--name", f"h{index}",
                           "--api-port", str(API), "--data-dir", str(data / f"h{index}"), "--cluster", "bench",
                           *extra],
                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _view(net, index) -> dict:
    out = subprocess.run(["ip", "netns", "exec", net.hosts[index], "curl", "-s", "-m", "1",
                          f"http://127.0.0.1:{API}/v1/nodes"], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def _full(net, hosts: int) -> bool:
    for i in range(hosts):
        nodes = _view(net, i).get("nodes", [])
        if len(nodes) != hosts or any(n.get("status") != "UP" for n in nodes):
            return False
    return True


def _eth0_bytes(net, index) -> int:
    out = subprocess.run(["ip", "netns", "exec", net.hosts[index], "cat", "/proc/net/dev"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("eth0:"):
            fields = line.split(":", 1)[1].split()
            return int(fields[0]) + int(fields[8])
    return 0


def one_round(idle_s: float) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory() as tmp, lab(3) as net:
        procs = [_start(net, 0, Path(tmp)), _start(net, 1, Path(tmp))]
        try:
            deadline = time.monotonic() + 30
            while not _full(net, 2):
                if time.monotonic() > deadline:
                    raise RuntimeError("the first two daemons never met")
                time.sleep(0.05)
            started = time.monotonic()
            procs.append(_start(net, 2, Path(tmp)))
            while not _full(net, 3):
                if time.monotonic() - started > 30:
                    raise RuntimeError("no full view within 30 s")
                time.sleep(0.02)
            full_view = time.monotonic() - started
            time.sleep(3)  # let start-up probes finish
            before = [_eth0_bytes(net, i) for i in range(3)]
            time.sleep(idle_s)
            after = [_eth0_bytes(net, i) for i in range(3)]
            return full_view, [(b - a) / idle_s for a, b in zip(before, after)]
        finally:
            for p in procs:
                p.kill()
                p.wait()


def run(quick: bool = False) -> dict:
    if os.geteuid() != 0:
        return {"bench": "discovery", "ok": False, "error": "needs root for network namespaces"}
    rounds = 3 if quick else 7
    idle_s = 5.0 if quick else 20.0
    results = [one_round(idle_s) for _ in range(rounds)]
    times = [r[0] for r in results]
    idle = [statistics.mean(r[1]) for r in results]
    median = statistics.median(times)
    return {
        "bench": "discovery",
        "hosts": 3,
        "rounds": rounds,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "full_view_s": times,
        "full_view_median_s": median,
        "target_s": TARGET_S,
        "meets_target": median < TARGET_S,
        "idle_bytes_per_s_per_node": statistics.median(idle),
        "idle_window_s": idle_s,
        "ok": True,
    }
