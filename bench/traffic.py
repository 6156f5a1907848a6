"""Cluster traffic per node on real hosts: three Linux network namespaces on
one bridge, each running `exod start` with mDNS, plus a fourth host for
dashboard clients.

  idle_bytes_per_s_per_node     eth0 received + sent on each daemon host over
                                a quiet window after the view is full
  polling_bytes_per_s_per_node  the same while 50 dashboard clients on the
                                fourth host GET /v1/state at 1 Hz, all from
                                node 0 (the worst case for one node)
  client_host_bytes_per_s       the client host's eth0 over that window: the
                                dashboard traffic, plus the mDNS multicast
                                every host on the bridge hears (its idle rate,
                                client_host_idle_bytes_per_s)
  polling_peer_bytes_per_s_per_node
                                the polling figures less the clients' share,
                                i.e. what the polling costs peer-to-peer

Each figure is the median per node over the rounds (one with --quick).
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

from .discovery import API, _full
from .discovery import _start as discovery_start

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import lab

CLIENTS_SCRIPT = Path(__file__).resolve().parent / "dashboard_clients.py"
DAEMONS = 3
CLIENT_HOST = 3  # lab index of the dashboard clients' host
CLIENTS = 50
POLL_HZ = 1
TARGET_NODE = 0
SETTLE_S = 3.0  # start-up probes and exchanges end before the idle window
WARMUP_S = 3.0  # the client process imports aiohttp and spreads its pollers over a second
TAIL_S = 1.0


def _start(net, index: int, data: Path) -> subprocess.Popen:
    # The API listens on 127.0.0.1 by default; 0.0.0.0 lets the client host in
    # while discovery's loopback probes (_full) keep working. GET needs no token.
    return discovery_start(net, index, data, ("--api-host", "0.0.0.0"))


def _link_bytes(net) -> list[int]:
    """Each host's eth0 received + sent, read at the switch end of its veth
    (the same frames, so the same counts): one read sees every host at the
    same instant, where one `ip netns exec` per host (discovery's _eth0_bytes)
    skews node 0 against the client host by tens of milliseconds on a busy
    machine, kilobytes a second at the polling rates, and the clients' share
    is the difference of those two."""
    out = subprocess.run(["ip", "netns", "exec", net.switch, "cat", "/proc/net/dev"],
                         check=False, capture_output=True, text=True).stdout
    counts = {}
    for line in out.splitlines():
        name, _, fields = line.partition(":")
        if fields:
            fields = fields.split()
            counts[name.strip()] = int(fields[0]) + int(fields[8])
    return [counts.get(f"sw{i}{net.tag}", 0) for i in range(len(net.hosts))]


def _rates(net, seconds: float) -> list[float]:
    before = _link_bytes(net)
    time.sleep(seconds)
    after = _link_bytes(net)
    return [(b - a) / seconds for a, b in zip(before, after)]


def _wait_full(net) -> None:
    deadline = time.monotonic() + 30
    while not _full(net, DAEMONS):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {DAEMONS} daemons had no full view within 30 s")
        time.sleep(0.05)


def _client_report(clients: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = clients.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the dashboard clients did not finish within {timeout:.0f} s") from None
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (err or out).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the dashboard clients failed (exit {clients.returncode}): {tail[0]}") from None


def one_round(window_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, lab(DAEMONS + 1) as net:
        procs = [_start(net, i, Path(tmp)) for i in range(DAEMONS)]
        try:
            _wait_full(net)
            time.sleep(SETTLE_S)
            idle = _rates(net, window_s)
            url = f"http://{net.addresses[TARGET_NODE]}:{API}/v1/state"
            clients = net.run(CLIENT_HOST, [sys.executable, str(CLIENTS_SCRIPT), url, str(CLIENTS),
                                            str(WARMUP_S + window_s + TAIL_S)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(clients)
            time.sleep(WARMUP_S)
            polling = _rates(net, window_s)
            report = _client_report(clients, TAIL_S + 15)
            return {"idle": idle, "polling": polling, "clients": report}
        finally:
            for p in procs:
                p.kill()
                p.wait()


def _per_node_median(rounds: list[list[float]]) -> list[float]:
    return [statistics.median(node) for node in zip(*rounds)]


def summarize(results: list[dict], window_s: float) -> dict:
    idle = _per_node_median([r["idle"] for r in results])
    polling = _per_node_median([r["polling"] for r in results])
    # The client host hears the cluster's multicast whether it polls or not.
    client_share = max(0.0, polling[CLIENT_HOST] - idle[CLIENT_HOST])
    peer = [rate - (client_share if i == TARGET_NODE else 0.0) for i, rate in enumerate(polling[:DAEMONS])]
    ok = sum(r["clients"]["requests_ok"] for r in results)
    failed = sum(r["clients"]["requests_failed"] for r in results)
    body_bytes = sum(r["clients"]["requests_ok"] * r["clients"]["mean_response_bytes"] for r in results)
    errors = [r["clients"]["error"] for r in results if r["clients"].get("error")]
    report = {
        "bench": "traffic",
        "hosts": DAEMONS,
        "rounds": len(results),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "idle_bytes_per_s_per_node": idle[:DAEMONS],
        "polling_clients": CLIENTS,
        "polling_hz": POLL_HZ,
        "polling_target": f"all {CLIENTS} clients on node {TARGET_NODE} (h{TARGET_NODE})",
        "polling_bytes_per_s_per_node": polling[:DAEMONS],
        "polling_peer_bytes_per_s_per_node": peer,
        "client_host_bytes_per_s": polling[CLIENT_HOST],
        "client_host_idle_bytes_per_s": idle[CLIENT_HOST],
        "requests_ok": ok,
        "requests_failed": failed,
        "mean_state_response_bytes": body_bytes / ok if ok else 0,
        "window_s": window_s,
        "ok": ok > 0,
    }
    if errors:
        report["client_error"] = errors[0]
    if not ok:
        report["error"] = "no dashboard request succeeded"
    return report


def run(quick: bool = False) -> dict:
    if os.geteuid() != 0:
        return {"bench": "traffic", "ok": False, "error": "needs root for network namespaces"}
    rounds = 1 if quick else 3
    window_s = 5.0 if quick else 20.0
    try:
        results = [one_round(window_s) for _ in range(rounds)]
    except RuntimeError as e:
        return {"bench": "traffic", "ok": False, "error": str(e)}
    except subprocess.CalledProcessError as e:  # the lab could not be built
        return {"bench": "traffic", "ok": False, "error": f"{' '.join(e.cmd[:4])}: {(e.stderr or '').strip()}"}
    return summarize(results, window_s)
