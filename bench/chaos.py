"""`python -m bench chaos [--minutes N] [--seed S]`: a chaos soak on three
network-namespace hosts (root). A client places, chats and deletes while
faults are injected at random from one seed:

  kill -9 of a runner, kill -9 of a daemon (restarted a few seconds later),
  a daemon restart by SIGTERM, and a link cut (the host's bridge port down
  for 3-12 s, then up).

Invariants, checked all along:

  orphans    no runner process outlives its instance (45 s grace: an
             owner that vanished is given 30 s to come back);
  ledgers    every node's reserved bytes equal its running ranks' (45 s grace);
  stuck      no instance stays Starting beyond its deadlines (180 s);
  answers    every request is answered or fails with an error; none hangs;
  restarts   a restarted daemon comes back with a readable data dir (30 s).

It prints the seed and the first broken invariant, and its JSON report says
how many actions and faults ran."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import lab  # noqa: E402

API, GRPC = 52415, 52416
HOSTS = 3
REQUEST_TIMEOUT_S = 120  # past every runner deadline: a request still open then hangs
HUNG = -1
# Graces: a node lets go of an owner's ranks and reservations 30 s after the
# owner went Down (daemon/work.py OWNER_GONE_MS), plus detection and a poll.
ORPHAN_GRACE_S, LEDGER_GRACE_S, STARTING_LIMIT_S, RESTART_LIMIT_S = 45, 45, 180, 30


class Broken(Exception):
    pass


class Soak:
    def __init__(self, net, data: Path, seed: int):
        self.net, self.data, self.rng = net, data, random.Random(seed)
        self.daemons: dict[int, subprocess.Popen | None] = {}
        self.cut: dict[int, float] = {}       # host -> when its link comes back
        self.down_until: dict[int, float] = {}  # host -> when its daemon restarts
        self.restarted_at: dict[int, float] = {}
        self.suspect: dict[tuple, float] = {}  # (invariant, key) -> first seen broken
        self.instances: set = set()
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ hosts

    def start(self, i: int) -> None:
        peers = [f"--peer={self.net.addresses[j]}:{GRPC}" for j in range(HOSTS) if j != i]
        log = open(self.data / f"h{i}.log", "ab")
        self.daemons[i] = self.net.run(i, [sys.executable, "-m", "exod.daemon.cli", "start", "--name", f"h{i}",
                                           "--api-port", str(API), "--grpc-port", str(GRPC), "--data-dir",
                                           str(self.data / f"h{i}"), "--memory-limit", "800MB", "--down-after",
                                           "2", *peers], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        self.restarted_at[i] = time.monotonic()

    def http(self, i: int, method: str, path: str, body=None, timeout=REQUEST_TIMEOUT_S):
        args = ["ip", "netns", "exec", self.net.hosts[i], "curl", "-s", "-m", str(timeout), "-X", method,
                "-w", "\n%{http_code}", f"http://127.0.0.1:{API}{path}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 10)
        if out.returncode == 28:  # curl's "operation timed out": asked, and no answer came
            return HUNG, {}
        text, _, code = out.stdout.rpartition("\n")
        try:
            return int(code or 0), json.loads(text) if text.strip() else {}
        except ValueError:
            return int(code or 0), {"raw": text[:200]}

    def alive(self, i: int) -> bool:
        p = self.daemons.get(i)
        return p is not None and p.poll() is None

    def state(self, i: int):
        if not self.alive(i):
            return None
        code, body = self.http(i, "GET", "/v1/state", timeout=3)
        return body if code == 200 else None

    # ------------------------------------------------------------------ client

    def act(self) -> None:
        up = [i for i in range(HOSTS) if self.alive(i)]
        if not up:
            return
        i = self.rng.choice(up)
        kind = self.rng.choice(["place", "place", "chat", "chat", "chat", "delete"])
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "place":
            body = {"model": "demo", "strategy": self.rng.choice(["pipeline", "moe_tensor"]), "ranks": 2,
                    "context_length": 256, "restart_policy": self.rng.choice(["never", "replace"])}
            code, answer = self.http(i, "POST", "/v1/instances", body)
            if code == 201:
                self.instances.add(answer["instance_id"])
        elif kind == "chat":
            code, answer = self.http(i, "POST", "/v1/chat/completions",
                                     {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 8, "temperature": 0})
        else:
            if not self.instances:
                return
            iid = self.rng.choice(sorted(self.instances))
            code, answer = self.http(i, "DELETE", f"/v1/instances/{iid}")
            if code in (200, 404):
                self.instances.discard(iid)
        if code == HUNG:
            raise Broken(f"answers: {kind} on h{i} got no answer within {REQUEST_TIMEOUT_S} s")
        if code >= 400 and not (isinstance(answer, dict) and "error" in answer):
            raise Broken(f"answers: {kind} on h{i} answered {code} without an error body: {answer}")

    # ------------------------------------------------------------------ faults

    def fault(self) -> None:
        kind = self.rng.choice(["kill runner", "kill runner", "kill daemon", "restart daemon", "cut link"])
        self.counts[kind] = self.counts.get(kind, 0) + 1
        up = [i for i in range(HOSTS) if self.alive(i) and i not in self.cut]
        if not up:
            return
        i = self.rng.choice(up)
        if kind == "kill runner":
            pids = [r.get("pid") for inst in (self.state(i) or {}).get("instances", [])
                    for r in inst.get("runners", []) if r.get("pid")]
            if pids:
                try:
                    psutil.Process(self.rng.choice(pids)).send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        elif kind in ("kill daemon", "restart daemon"):
            process = self.daemons[i]
            process.send_signal(signal.SIGKILL if kind == "kill daemon" else signal.SIGTERM)
            process.wait(10)
            self.daemons[i] = None
            self.down_until[i] = time.monotonic() + self.rng.uniform(1, 5)
        else:
            self.link(i, "down")
            self.cut[i] = time.monotonic() + self.rng.uniform(3, 12)

    def link(self, i: int, how: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.net.switch, "ip", "link", "set", f"sw{i}{self.net.tag}", how],
                       check=True, capture_output=True)

    def heal(self) -> None:
        now = time.monotonic()
        for i, when in list(self.cut.items()):
            if now >= when:
                self.link(i, "up")
                del self.cut[i]
        for i, when in list(self.down_until.items()):
            if now >= when:
                del self.down_until[i]
                self.start(i)

    # ------------------------------------------------------------------ invariants

    def _persists(self, key: tuple, broken: bool, grace: float, message: str) -> None:
        if not broken:
            self.suspect.pop(key, None)
            return
        first = self.suspect.setdefault(key, time.monotonic())
        if time.monotonic() - first > grace:
            raise Broken(message)

    def check(self) -> None:
        views = {i: self.state(i) for i in range(HOSTS)}
        now = time.monotonic()
        for i, view in views.items():
            if self.alive(i) and view is None:
                self._persists(("restarts", i), now - self.restarted_at[i] > RESTART_LIMIT_S, 0,
                               f"restarts: h{i} does not answer {RESTART_LIMIT_S} s after its start")
            elif view is not None:
                self.suspect.pop(("restarts", i), None)
        live_pids, ended = {}, {}
        for i, view in views.items():
            if view is None:
                continue
            me = view.get("self_id")
            for inst in view.get("instances", []):
                for r in inst.get("runners", []):
                    if not r.get("pid") or r.get("node_id") != me:
                        continue
                    where = (i, inst["instance_id"], inst.get("state"), r.get("state"), r.get("reason", "")[:120])
                    if r.get("state") in ("SHUTDOWN", "FAILED"):
                        ended[int(r["pid"])] = where
                    else:
                        live_pids[int(r["pid"])] = where[:3]
                if inst.get("state") == "INSTANCE_STARTING":
                    age = time.time() - int(inst.get("created_at_unix_ms", 0)) / 1000
                    self._persists(("stuck", inst["instance_id"]), age > STARTING_LIMIT_S, 0,
                                   f"stuck: {inst['instance_id']} is Starting after {age:.0f} s")
            # The node's own ledger against its own ranks that hold memory.
            mine = next((n for n in view.get("nodes", []) if n["record"]["profile"]["node_id"] == me), None)
            running = sum(int(r.get("estimated_bytes", 0)) for inst in view.get("instances", [])
                          for r in inst.get("runners", [])
                          if r.get("node_id") == me and r.get("state") not in ("SHUTDOWN", "FAILED"))
            reserved = int((mine or {}).get("memory_reserved_bytes", 0))
            self._persists(("ledger", i), mine is not None and reserved != running, LEDGER_GRACE_S,
                           f"ledgers: h{i} holds {reserved} bytes, its running ranks {running}")
        # Runner processes of our daemons that no live view accounts for (beyond one spare each).
        daemons = {p.pid for p in self.daemons.values() if p is not None and p.poll() is None}
        for pid in daemons:
            try:
                children = [c for c in psutil.Process(pid).children() if "exod.runner" in " ".join(c.cmdline())]
            except psutil.Error:
                continue
            unaccounted = [c for c in children if c.pid not in live_pids]
            self._persists(("orphans", pid), len(unaccounted) > 1, ORPHAN_GRACE_S,
                           f"orphans: daemon {pid} has {len(unaccounted)} runners no instance accounts for: "
                           f"{[(c.pid, ended.get(c.pid, 'unknown to every view')) for c in unaccounted]}")
        for pid, (i, iid, istate) in live_pids.items():
            self._persists(("orphans", iid, pid), istate in ("INSTANCE_FAILED", "INSTANCE_STOPPED")
                           and psutil.pid_exists(pid), ORPHAN_GRACE_S,
                           f"orphans: runner {pid} of {iid} runs on h{i} after its instance ended")


def run(quick: bool = False, minutes: float | None = None, seed: int | None = None) -> dict:
    import tempfile

    minutes = minutes if minutes is not None else (3 if quick else 15)
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    print(f"chaos: seed {seed}, {minutes} min", file=sys.stderr, flush=True)
    data = Path(tempfile.mkdtemp(prefix="exod-chaos-"))
    result = {"bench": "chaos", "seed": seed, "minutes": minutes}
    with lab(HOSTS) as net:
        soak = Soak(net, data, seed)
        for i in range(HOSTS):
            soak.start(i)
        deadline = time.monotonic() + 90
        while not all(len([n for n in (soak.state(i) or {}).get("nodes", []) if n.get("status") == "UP"]) == HOSTS
                      for i in range(HOSTS)):
            if time.monotonic() > deadline:
                raise RuntimeError("the three daemons did not meet within 90 s")
            time.sleep(0.5)
        end = time.monotonic() + minutes * 60
        next_fault = time.monotonic() + 10
        try:
            while time.monotonic() < end:
                soak.heal()
                soak.act()
                if time.monotonic() >= next_fault:
                    soak.fault()
                    next_fault = time.monotonic() + soak.rng.uniform(8, 20)
                soak.check()
                time.sleep(soak.rng.uniform(0.5, 2.0))
            result.update(ok=True, broken=None)
        except Broken as e:
            print(f"chaos: seed {seed}: first broken invariant: {e}", file=sys.stderr, flush=True)
            result.update(ok=False, broken=str(e))
        finally:
            for i in list(soak.cut):
                soak.link(i, "up")
            for p in soak.daemons.values():
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
        result["counts"] = soak.counts
        result["instances_placed"] = len(soak.instances)
    if not result["ok"]:
        result["logs_dir"] = str(data)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.chaos")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    report = run(minutes=args.minutes, seed=args.seed)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)
