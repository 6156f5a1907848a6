"""Emulated links between network-namespace hosts.

Each host is a namespace on one bridge (tests/netns.py). A link profile is
a one-way delay with jitter, added by a userspace relay (bench/relay.py) in
the sending host's namespace, and a rate, enforced by `tc tbf` on the hosts'
veths. A rank reaches each peer through the relay in its own namespace: its
MLX hostfile names 127.0.0.1:relay instead of the peer's address, so every
byte a rank sends crosses the emulated link once. What a link really
delivers is measured with a ping-pong through the same relays, and that
measurement, not the profile's nominal figure, is what the planner is given.
"""

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import Lab  # noqa: E402

from exod.proto import exod_pb2 as pb  # noqa: E402


@dataclass(frozen=True)
class LinkProfile:
    name: str
    description: str
    one_way_s: float  # added by the relay, each direction
    jitter_s: float  # uniform extra delay, 0..jitter_s, order-preserving
    rate: str  # tc tbf rate; "" leaves the veth unshaped
    relay: bool = True  # False: the bare veth is already the link


# Thunderbolt: the bare veth between namespaces round-trips a small TCP
# message in about the time a Thunderbolt 5 link does (~50 us, as MLX's
# jaccl documentation reports for RDMA over TB5); a Python relay would only
# add its own cost, so there is none. 10 GbE: ~200 us RTT through a switch.
# Wi-Fi: 3-10 ms RTT with jitter, 300 Mbit/s.
PROFILES = {
    "thunderbolt": LinkProfile("thunderbolt", "Thunderbolt/RDMA-like: ~50 us RTT, unshaped", 0.0, 0.0, "", relay=False),
    "10gbe": LinkProfile("10gbe", "10 GbE-like: ~200 us RTT", 40e-6, 0.0, "10gbit"),
    "wifi": LinkProfile("wifi", "Wi-Fi-like: 3-10 ms RTT with jitter, 300 Mbit/s", 1.5e-3, 3.5e-3, "300mbit"),
}


def _burst(rate: str) -> str:
    """A few milliseconds of the rate: tbf needs at least one timer tick's
    worth, and a short burst keeps the cap honest."""
    unit = rate.lstrip("0123456789.")
    bits = float(rate[: len(rate) - len(unit)]) * {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}[unit]
    return str(max(64_000, int(bits / 8 * 0.004)))


class EmulatedCluster:
    """Hosts joined by one link profile; relays on demand."""

    def __init__(self, hosts: int, profile: LinkProfile):
        self.lab = Lab(hosts)
        self.profile = profile
        self.procs: list[subprocess.Popen] = []
        self._port = 20000

    def __enter__(self):
        self.lab.create()
        if self.profile.rate:
            for i in range(len(self.lab.hosts)):
                self.lab.limit(i, self.profile.rate, _burst(self.profile.rate))
        return self

    def __exit__(self, *exc):
        self.stop_all()
        self.lab.destroy()

    def next_port(self) -> int:
        self._port += 1
        return self._port

    def address(self, index: int) -> str:
        return self.lab.addresses[index]

    def prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.lab.hosts[index]]

    def _start(self, index: int, args: list[str], banner: str) -> subprocess.Popen:
        proc = self.lab.run(index, [sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline().strip()
        if line != banner:
            raise RuntimeError(f"{args[0]} did not start in {self.lab.hosts[index]}")
        return proc

    def path(self, src: int, dst: int, dst_port: int) -> str:
        """The address host src dials to reach dst_port on host dst."""
        if not self.profile.relay:
            return f"{self.address(dst)}:{dst_port}"
        port = self.next_port()
        self._start(src, ["bench.relay", f"127.0.0.1:{port}", f"{self.address(dst)}:{dst_port}",
                          repr(self.profile.one_way_s), repr(self.profile.jitter_s), str(port)], "relaying")
        return f"127.0.0.1:{port}"

    def ring_hosts(self, world: int) -> tuple[list[str], list[list[str]]]:
        """Each rank's own listen address, and its hostfile: itself, then
        every peer as reached over the emulated link."""
        own = [f"{self.address(r)}:{self.next_port()}" for r in range(world)]
        views = []
        for r in range(world):
            view = []
            for peer in range(world):
                port = int(own[peer].rsplit(":", 1)[1])
                view.append(own[r] if peer == r else self.path(r, peer, port))
            views.append(view)
        return own, views

    def measure(self, src: int, dst: int, count: int, stream_bytes: int) -> dict:
        """Ping-pong and streaming throughput from src to dst over the link."""
        port = self.next_port()
        server = self._start(dst, ["bench.pingpong", "serve", f"{self.address(dst)}:{port}"], "serving")
        target = self.path(src, dst, port)
        out = subprocess.run([*self.prefix(src), sys.executable, "-m", "bench.pingpong", "probe", target,
                              str(count), str(stream_bytes)], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        server.kill()
        if out.returncode:
            raise RuntimeError(f"ping-pong failed: {out.stderr.strip()[-300:]}")
        result = json.loads(out.stdout)
        rtts = sorted(result["rtt_s"][len(result["rtt_s"]) // 10:])  # the first tenth warms the path
        return {
            "rtt_median_s": statistics.median(rtts),
            "rtt_p10_s": rtts[len(rtts) // 10],
            "rtt_p90_s": rtts[len(rtts) * 9 // 10],
            "bandwidth_bytes_per_s": result["stream_bytes"] / result["stream_s"],
        }

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs.clear()


def links_for(node_ids: list[str], measured: dict) -> list[pb.Link]:
    """Planner links between every pair, all with the measured figures."""
    return [pb.Link(from_node=a, to_node=b, rtt_s=measured["rtt_median_s"],
                    bandwidth_bytes_per_s=measured["bandwidth_bytes_per_s"])
            for i, a in enumerate(node_ids) for b in node_ids[i + 1:]]


def fidelity(profile: LinkProfile, hosts: int = 2, count: int = 400, stream_bytes: int = 8 << 20) -> dict:
    """What the emulation delivers against what the profile asks for."""
    with EmulatedCluster(hosts, profile) as cluster:
        got = cluster.measure(0, 1, count, stream_bytes)
    target_rtt = 2 * (profile.one_way_s + profile.jitter_s / 2)
    return {"profile": profile.name, "target_rtt_s": target_rtt or None, "rate": profile.rate or "unshaped",
            **got}
