"""The parent side of runners: spawn rank processes, read their events, send
commands, and turn an exit without a last word into a Failed status.
LocalInstance runs every rank of an instance on this machine over loopback
(tests, benchmarks, `exod run`); the daemon uses RankProcess per rank."""

import itertools
import secrets
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from google.protobuf import json_format

from exod.proto import exod_pb2 as pb

from . import channel
from .main import STATE_NAME, deadlines, phase_name

TERMINAL = (pb.FAILED, pb.SHUTDOWN)
PHASE_DEADLINE = {pb.CONNECTING: "connect_s", pb.CONNECTED: "load_s", pb.LOADING: "load_s",
                  pb.LOADED: "warmup_s", pb.WARMING_UP: "warmup_s"}


class LaunchError(Exception):
    pass


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SpareRunner:
    """A runner process started before anyone needs it: it imports MLX and
    mlx-lm (most of a second) and waits for its spec. A RankProcess adopts
    it, and the rank starts with the imports already done."""

    def __init__(self, env: Optional[dict] = None, log_path: Optional[Path] = None,
                 workdir: Optional[Path] = None):
        self.log_path = log_path
        self.process, self.events_fd, self.commands = _spawn([], env, log_path, workdir)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """Not needed after all: closing its pipe ends it."""
        self.commands.close()
        os.close(self.events_fd)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _spawn(extra_args: list[str], env: Optional[dict], log_path: Optional[Path], workdir: Optional[Path],
           prefix: Optional[list[str]] = None):
    """The runner process, the read end of its events and a writer for its commands.
    prefix: a command the runner runs under (`ip netns exec HOST` in benchmarks)."""
    events_r, events_w = os.pipe()
    commands_r, commands_w = os.pipe()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    # -P: the daemon's working folder is not put on the runner's import path,
    # where a file named like a module it imports (queue.py, numpy.py)
    # would replace that module inside the runner.
    args = [*(prefix or []), sys.executable, "-P", "-m", "exod.runner", *extra_args,
            "--events-fd", str(events_w), "--commands-fd", str(commands_r)]
    if workdir:
        args += ["--workdir", str(workdir)]
    try:
        process = subprocess.Popen(args, pass_fds=(events_w, commands_r), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=log, env={**os.environ, **(env or {})},
                                   start_new_session=True)
    finally:
        os.close(events_w)
        os.close(commands_r)
        if log is not subprocess.DEVNULL:
            log.close()
    return process, events_r, channel.Writer(commands_w)


class RankProcess:
    """One spawned runner and the two pipes to it."""

    def __init__(self, spec: pb.RunnerSpec, on_event: Callable[["RankProcess", pb.RunnerEvent], None],
                 env: Optional[dict] = None, log_path: Optional[Path] = None, workdir: Optional[Path] = None,
                 spare: Optional[SpareRunner] = None, prefix: Optional[list[str]] = None):
        """spare: a SpareRunner to adopt (started with the same env and
        workdir); a fresh process is spawned when it is gone. prefix: as
        _spawn's."""
        self.spec = spec
        self.on_event = on_event
        self.status = pb.RunnerStatus(instance_id=spec.instance_id, rank=spec.rank, node_id=spec.node_id,
                                      state=pb.IDLE, estimated_bytes=spec.estimated_bytes)
        self.terminal = threading.Event()
        self._lock = threading.Lock()
        self._spec_file = None
        self.log_path = log_path
        self.adopted = spare is not None and self._adopt(spare)
        if not self.adopted:
            self._spec_file = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="exod-spec-", delete=False)
            self._spec_file.write(json_format.MessageToJson(spec))
            self._spec_file.close()
            self.process, self._events_fd, self._commands = _spawn(
                ["--spec", self._spec_file.name], env, log_path, workdir, prefix)
        self._reader = threading.Thread(target=self._read, name=f"exod-rank{self.spec.rank}-events", daemon=True)
        self._reader.start()

    def _adopt(self, spare: SpareRunner) -> bool:
        if not spare.alive():
            spare.close()
            return False
        try:
            spare.commands.write(pb.RunnerCommand(start=self.spec))
        except channel.ChannelClosed:
            spare.close()
            return False
        if spare.log_path and self.log_path:
            try:
                os.replace(spare.log_path, self.log_path)  # the process keeps writing to the same file
            except OSError:
                self.log_path = spare.log_path
        else:
            self.log_path = spare.log_path
        self.process, self._events_fd, self._commands = spare.process, spare.events_fd, spare.commands
        return True

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: pb.RunnerCommand) -> bool:
        try:
            self._commands.write(command)
            return True
        except channel.ChannelClosed:
            return False

    def _read(self) -> None:
        try:
            while True:
                try:
                    event = channel.read_message(self._events_fd, pb.RunnerEvent)
                except (channel.ChannelClosed, Exception):
                    event = None
                if event is None:
                    break
                if event.HasField("status"):
                    with self._lock:
                        self.status.CopyFrom(event.status)
                    if event.status.state in TERMINAL:
                        self.terminal.set()
                self.on_event(self, event)
        finally:
            os.close(self._events_fd)
            code = self.process.wait()
            if not self.terminal.is_set():
                with self._lock:
                    self.status.reason = self.exit_reason(code)
                    self.status.state = pb.FAILED
                    self.status.changed_at_unix_ms = int(time.time() * 1000)
                    status = pb.RunnerStatus()
                    status.CopyFrom(self.status)
                self.terminal.set()
                self.on_event(self, pb.RunnerEvent(status=status))
            self._commands.close()
            if self._spec_file is not None:
                try:
                    os.unlink(self._spec_file.name)
                except OSError:
                    pass

    def exit_reason(self, code: int) -> str:
        state = self.status.state
        phase = phase_name(state)
        if code == -signal.SIGALRM and state in PHASE_DEADLINE:
            seconds = getattr(deadlines(self.spec), PHASE_DEADLINE[state])
            phase = "Loading" if state == pb.CONNECTED else "WarmingUp" if state == pb.LOADED else phase
            return f"timed out in {phase} after {seconds:g} s"
        if code < 0:
            return f"runner killed by {signal.Signals(-code).name} in {phase}"
        tail = self._log_tail()
        return f"runner exited with code {code} in {phase}" + (f": {tail}" if tail else "")

    def _log_tail(self) -> str:
        if not self.log_path:
            return ""
        try:
            lines = [l for l in Path(self.log_path).read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self._reader.join(timeout=timeout)
        return True


class LocalInstance:
    """Every rank of one instance on this machine, over loopback."""

    _ids = itertools.count()

    def __init__(self, model_dir, strategy: str, world_size: int, *, pipeline_layers=None,
                 deadlines: Optional[pb.RunnerDeadlines] = None, context_length: int = 0,
                 estimated_bytes: Optional[list[int]] = None, env: Optional[dict] = None,
                 hosts: Optional[list[str]] = None, log_dir: Optional[Path] = None, instance_id: str = "",
                 start_only: Optional[list[int]] = None, rank_hosts: Optional[list[list[str]]] = None,
                 rank_prefix: Optional[list[list[str]]] = None, model_dirs: Optional[list] = None,
                 max_batch: int = 8, prefix_cache_tokens: int = 0, max_queue: Optional[int] = None,
                 shares: Optional[list[int]] = None, prefill_step_tokens: int = 0,
                 expert_layout: Optional[pb.ExpertLayout] = None, stage_ranks: Optional[list[int]] = None,
                 stage_strategy: str = ""):
        """model_dirs: each rank's own model directory (shard checkpoints),
        instead of model_dir for all; rank_hosts: the ring addresses as each rank sees them, when they
        differ (a rank reaching its peers through relays); rank_prefix: the
        command each rank runs under (a network namespace); shares: each
        rank's grains of a tensor strategy (models/shares.py; None: even);
        expert_layout: moe_experts' experts per rank and layer (None: contiguous);
        stage_ranks, stage_strategy: a hybrid's stages (pipeline_layers then per stage)."""
        self.instance_id = instance_id or f"local-{os.getpid()}-{next(self._ids)}"
        self.hosts = hosts or [f"127.0.0.1:{p}" for p in free_ports(world_size)]
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="exod-logs-"))
        self.events: "queue.Queue[tuple[int, pb.RunnerEvent]]" = queue.Queue()
        self.statuses: list[list[pb.RunnerStatus]] = [[] for _ in range(world_size)]
        self._chunks: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        secret = secrets.token_hex(32)  # the rendezvous proof, as an owner hands one out
        self.specs = [
            pb.RunnerSpec(instance_id=self.instance_id, node_id="local", rank=r, world_size=world_size,
                          rendezvous_secret=secret,
                          backend=pb.RING, hosts=rank_hosts[r] if rank_hosts else self.hosts,
                          model_dir=str(model_dirs[r] if model_dirs else model_dir), strategy=strategy,
                          pipeline_layers=pipeline_layers or [], shares=shares or [], deadlines=deadlines,
                          context_length=context_length, max_batch=max_batch,
                          prefix_cache_tokens=prefix_cache_tokens, max_queue=max_queue,
                          prefill_step_tokens=prefill_step_tokens,
                          estimated_bytes=(estimated_bytes or [0] * world_size)[r],
                          expert_layout=expert_layout, stage_ranks=stage_ranks or [],
                          stage_strategy=stage_strategy)
            for r in range(world_size)
        ]
        # start_only: tests leave some ranks out to prove the others give up in time.
        self.ranks = [RankProcess(spec, self._on_event, env=env, log_path=self.log_dir / f"rank{spec.rank}.log",
                                  prefix=rank_prefix[spec.rank] if rank_prefix else None)
                      for spec in self.specs if start_only is None or spec.rank in start_only]
        self.started_at = time.monotonic()

    def _on_event(self, rank: RankProcess, event: pb.RunnerEvent) -> None:
        if event.HasField("status"):
            copy = pb.RunnerStatus()
            copy.CopyFrom(event.status)
            self.statuses[rank.spec.rank].append(copy)
        else:
            with self._lock:
                q = self._chunks.setdefault(event.chunk.request_id, queue.Queue())
            q.put(event.chunk)
        self.events.put((rank.spec.rank, event))

    def states(self) -> list[int]:
        return [r.status.state for r in self.ranks]

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    def wait_ready(self, timeout: float = 300) -> None:
        ok = self.wait_for(lambda i: all(s == pb.READY for s in i.states())
                           or any(r.terminal.is_set() for r in i.ranks), timeout)
        if not ok or not all(s == pb.READY for s in self.states()):
            raise LaunchError("; ".join(f"rank {r.spec.rank}: {STATE_NAME[r.status.state]}"
                                        + (f" ({r.status.reason})" if r.status.reason else "") for r in self.ranks))

    def submit(self, request: pb.GenerateRequest) -> "queue.Queue[pb.GenerationChunk]":
        with self._lock:
            q = self._chunks.setdefault(request.request_id, queue.Queue())
        if not self.ranks[0].send(pb.RunnerCommand(generate=request)):
            raise LaunchError("rank 0 is gone")
        return q

    def stream(self, request: pb.GenerateRequest, timeout: float = 120) -> Iterator[pb.GenerationChunk]:
        q = self.submit(request)
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = q.get(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if self.ranks[0].terminal.is_set():
                    raise LaunchError(f"rank 0 ended: {self.ranks[0].status.reason}") from None
                if time.monotonic() >= deadline:
                    raise LaunchError(f"no answer to {request.request_id} within {timeout:g} s") from None
                continue
            yield chunk
            if chunk.finish_reason:
                return

    def generate(self, request: pb.GenerateRequest, timeout: float = 120) -> list[pb.GenerationChunk]:
        return list(self.stream(request, timeout))

    def cancel(self, request_id: str) -> None:
        self.ranks[0].send(pb.RunnerCommand(cancel=pb.CancelRequest(request_id=request_id)))

    def shutdown(self, timeout: float = 10) -> bool:
        for r in self.ranks:
            r.send(pb.RunnerCommand(shutdown=pb.ShutdownRequest()))
        clean = all(r.wait(timeout) for r in self.ranks)
        self.close()
        return clean

    def close(self) -> None:
        for r in self.ranks:
            r.kill()
        for r in self.ranks:
            r.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
