"""Linux network namespaces as separate hosts on one bridge (198.18.0.0/24),
for tests and benchmarks. The bridge lives in a namespace of its own, so the
machine's own network is never touched. Needs root and iproute2."""

import os
import subprocess
import uuid
from contextlib import contextmanager

SUBNET = "198.18.0"

# The namespaces this process made. Other labs may run beside this one (another
# suite, a bench), so a test checks only what it made itself was cleaned up.
_made: set[str] = set()
RUN_ENV = "EXOD_LAB_RUN"


def _ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Lab:
    """A switch namespace with a bridge and hosts joined to it by veth pairs."""

    def __init__(self, hosts: int):
        tag = uuid.uuid4().hex[:6]
        run = os.environ.get(RUN_ENV, "")  # marks the namespaces of a child process's labs
        self.switch = f"exsw-{tag}{run}"
        self.hosts = [f"exh{i}-{tag}{run}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.tag = tag

    def create(self) -> None:
        _made.update([self.switch, *self.hosts])
        _ip("ip", "netns", "add", self.switch)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("ip", "link", "set", "br0", "up", ns=self.switch)
        _ip("ip", "link", "set", "lo", "up", ns=self.switch)
        for i, (host, address) in enumerate(zip(self.hosts, self.addresses)):
            outer, inner = f"sw{i}{self.tag}", f"h{i}{self.tag}"
            _ip("ip", "netns", "add", host)
            _ip("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, ns=self.switch)
            _ip("ip", "link", "set", inner, "netns", host, ns=self.switch)
            _ip("ip", "link", "set", outer, "master", "br0", ns=self.switch)
            _ip("ip", "link", "set", outer, "up", ns=self.switch)
            _ip("ip", "link", "set", inner, "name", "eth0", ns=host)
            _ip("ip", "addr", "add", f"{address}/24", "dev", "eth0", ns=host)
            _ip("ip", "link", "set", "eth0", "up", "multicast", "on", ns=host)
            _ip("ip", "link", "set", "lo", "up", ns=host)
            _ip("ip", "route", "add", "224.0.0.0/4", "dev", "eth0", ns=host)

    def limit(self, index: int, rate: str = "20mbit", burst: str = "64kb") -> None:
        """Token-bucket both directions of one host's link (no netem here)."""
        for dev, ns in (("eth0", self.hosts[index]), (f"sw{index}{self.tag}", self.switch)):
            _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                "latency", "50ms", ns=ns)

    def run(self, index: int, args: list[str], **popen) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[index], *args], **popen)

    def destroy(self) -> None:
        for ns in [*self.hosts, self.switch]:
            # Kill anything still inside, then the namespace (veths go with it).
            pids = _ip("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("ip", "netns", "del", ns, check=False)


@contextmanager
def lab(hosts: int):
    created = Lab(hosts)
    try:
        created.create()
        yield created
    finally:
        created.destroy()


def child_run() -> tuple[dict, str]:
    """An environment for a child process whose labs carry a mark of their own,
    and that mark, for leftover_namespaces."""
    run = f"-{uuid.uuid4().hex[:8]}"
    return {**os.environ, RUN_ENV: run}, run


def leftover_namespaces(run: str | None = None) -> list[str]:
    """Namespaces this process made, or a child given `run` made, that still exist."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n in _made or (run and n.startswith(("exsw-", "exh")) and n.endswith(run))]
