"""One rank of an instance:

  python -m exod.runner --spec SPEC.json --events-fd N --commands-fd M

The parent passes two pipe ends (spawned, never forked). Statuses, tokens and
the final Failed/Shutdown travel as RunnerEvent frames; requests, cancels and
shutdown come as RunnerCommand frames."""

import argparse
import ctypes
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from google.protobuf import json_format  # noqa: E402

from exod.proto import exod_pb2 as pb  # noqa: E402

from . import channel  # noqa: E402
from .watchdog import EXIT_DEADLINE, Watchdog  # noqa: E402

DEFAULT_DEADLINES = pb.RunnerDeadlines(connect_s=60, load_s=600, warmup_s=120, peer_s=30)
DEFAULT_MAX_QUEUE = 64  # admitted requests waiting for the batch, when the spec names no bound
EXIT_FAILED = 1
EXIT_ORPHANED = 4
STATE_NAME = {v: k for k, v in pb.RunnerState.items()}


def deadlines(spec: pb.RunnerSpec) -> pb.RunnerDeadlines:
    d = pb.RunnerDeadlines()
    for name in ("connect_s", "load_s", "warmup_s", "peer_s"):
        setattr(d, name, getattr(spec.deadlines, name) or getattr(DEFAULT_DEADLINES, name))
    return d


def phase_name(state: int) -> str:
    """Connecting, Loading, WarmingUp... as the reasons spell them."""
    return "".join(part.capitalize() for part in STATE_NAME.get(state, "UNKNOWN").split("_"))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(EXIT_ORPHANED)


# Generated chunks waiting for the events pipe (a token each, mostly): the
# serving loop never waits on the write, only on a full outbox.
OUTBOX_EVENTS = 4096
OUTBOX_FLUSH_S = 5.0


class Rank:
    def __init__(self, spec: pb.RunnerSpec, events: channel.Writer, commands_fd: int, workdir: Path):
        self.spec = spec
        self.events = events
        # Chunks go out from a thread of their own: a write to the pipe wakes
        # the reader, and on a busy machine the scheduler ran it in the
        # middle of the serving loop's step (8.6% of rank 0's time in a
        # tensor x2 decode on two cores). Statuses are written at once, after
        # every chunk queued before them.
        self._outbox: "queue.Queue[pb.RunnerEvent]" = queue.Queue(maxsize=OUTBOX_EVENTS)
        threading.Thread(target=self._drain_outbox, name="exod-events", daemon=True).start()
        self.commands_fd = commands_fd
        self.workdir = workdir
        self.deadlines = deadlines(spec)
        self.status = pb.RunnerStatus(instance_id=spec.instance_id, rank=spec.rank, node_id=spec.node_id,
                                      estimated_bytes=spec.estimated_bytes, pid=os.getpid())
        self.status_lock = threading.Lock()
        self.files: list[Path] = []
        self.serving = threading.Event()
        self.server = None
        from .scheduler import Inbox

        self.inbox = Inbox(self.emit, max_queue=spec.max_queue if spec.HasField("max_queue") else DEFAULT_MAX_QUEUE)

    # ---------------------------------------------------------------- reporting

    def report(self, state: int, **fields) -> None:
        with self.status_lock:
            self.status.state = state
            for key, value in fields.items():
                setattr(self.status, key, value)
            self.status.changed_at_unix_ms = int(time.time() * 1000)
            event = pb.RunnerEvent(status=self.status)
            self.flush_chunks()
            self._send(event)

    def emit(self, chunk: pb.GenerationChunk) -> None:
        self._outbox.put(pb.RunnerEvent(chunk=chunk))

    def flush_chunks(self, timeout_s: float = OUTBOX_FLUSH_S) -> None:
        """Wait (bounded) until every chunk queued so far is in the pipe."""
        deadline = time.monotonic() + timeout_s
        while self._outbox.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _drain_outbox(self) -> None:
        while True:
            event = self._outbox.get()
            try:
                self._send(event)
            finally:
                self._outbox.task_done()

    def _send(self, event) -> None:
        try:
            self.events.write(event)
        except channel.ChannelClosed:
            self._cleanup()
            os._exit(EXIT_ORPHANED)  # nobody is listening: the parent is gone

    def memory_fields(self) -> dict:
        import mlx.core as mx

        from .loading import peak_rss_bytes

        import psutil

        return dict(peak_memory_bytes=mx.get_peak_memory(), rss_bytes=psutil.Process().memory_info().rss,
                    peak_rss_bytes=peak_rss_bytes())

    # ---------------------------------------------------------------- commands

    def _read_commands(self) -> None:
        while True:
            try:
                command = channel.read_message(self.commands_fd, pb.RunnerCommand)
            except channel.ChannelClosed:
                command = None
            if command is None:  # the parent closed its end or died
                if not self.serving.is_set():
                    self._cleanup()
                    os._exit(EXIT_ORPHANED)
                self.inbox.stop()
                return
            kind = command.WhichOneof("command")
            if kind == "generate":
                if self.spec.rank != 0:
                    self.emit(pb.GenerationChunk(request_id=command.generate.request_id,
                                                 finish_reason=pb.FINISH_ERROR,
                                                 error=f"rank {self.spec.rank} does not take requests; send them to rank 0"))
                else:
                    self.inbox.put(command.generate)
            elif kind == "cancel":
                self.inbox.cancel(command.cancel.request_id)
            elif kind == "shutdown":
                if not self.serving.is_set():
                    self.report(pb.SHUTDOWN, reason=f"shut down during {phase_name(self.status.state)}")
                    self._cleanup()
                    os._exit(0)
                self.inbox.stop()

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        self.report(pb.IDLE)
        watchdog = Watchdog(self._expired)
        threading.Thread(target=self._read_commands, name="exod-commands", daemon=True).start()
        try:
            return self._lifecycle(watchdog)
        except Exception as e:  # every failure becomes a Failed status, never a hang
            from .canary import CanaryFailed

            reason = str(e) if isinstance(e, CanaryFailed) else describe(e, self.status.state)
            self._abort_request(reason)
            self.report(pb.FAILED, reason=reason, diagnostics=traceback.format_exc()[-4000:])
            return EXIT_FAILED
        finally:
            watchdog.disarm()
            self.flush_chunks()
            self._cleanup()

    def _lifecycle(self, watchdog: Watchdog) -> int:
        from .distributed import init_group

        d = self.deadlines
        self.report(pb.CONNECTING)
        watchdog.arm("Connecting", d.connect_s)
        group, self.files = init_group(self.spec, self.workdir)
        self.report(pb.CONNECTED)

        import mlx.core as mx

        from . import canary, loading
        from .serve import Server

        watchdog.arm("Loading", d.load_s)
        model, config, arch = loading.load(
            self.spec, group, lambda done, total: self.report(pb.LOADING, layers_loaded=done, total_layers=total))
        warning = loading.wire_weights(model)
        if warning:
            print(f"exod runner rank {self.spec.rank}: {warning}", file=sys.stderr, flush=True)
        self.report(pb.LOADED, **self.memory_fields())

        watchdog.arm("WarmingUp", d.warmup_s)
        self.report(pb.WARMING_UP)
        tokenizer = load_tokenizer(self.spec.model_dir) if self.spec.rank == 0 else None
        from .strategies import WHOLE_LAYERS

        verdict = canary.run(model, config, arch, self.spec.model_dir, group,
                             whole_layers=self.spec.strategy in WHOLE_LAYERS, instance_id=self.spec.instance_id,
                             stages=tuple(self.spec.stage_ranks))
        from .strategies import calibrate_routing

        calibrate_routing(model, config)
        mx.clear_cache()
        self.server = Server(model, tokenizer, group, self.inbox, self.emit,
                             self._serving_state, lambda phase, s: watchdog.arm(phase, s, backstop=False),
                             self.spec.context_length or int(config.get("max_position_embeddings") or 4096),
                             max_batch=self.spec.max_batch or 1, prefix_cache_tokens=self.spec.prefix_cache_tokens,
                             prefix_cache_bytes=self.spec.prefix_cache_bytes,
                             prefill_step_tokens=self.spec.prefill_step_tokens)
        self.serving.set()
        # Ready carries the batch bound and the cache from the start.
        self._serving_state(pb.READY, canary_layer=verdict.layer, canary_max_delta=verdict.max_delta,
                            canary_seconds=verdict.seconds, **self.server.stats())
        self.server.run(d.peer_s)
        watchdog.disarm()
        self.report(pb.SHUTTING_DOWN)
        self._drain_requests("runner shut down")
        self.report(pb.SHUTDOWN)
        return 0

    def _expired(self, reason: str) -> None:
        """The watchdog's last word: the request in flight is answered too."""
        self._abort_request(reason)
        self.report(pb.FAILED, reason=reason)
        self._cleanup()

    def _serving_state(self, state: int, **fields) -> None:
        # Back to Ready after requests: the peaks they reached are news.
        prefix = fields.pop("prefix_cache", None)
        counts = fields.pop("expert_counts", None)
        with self.status_lock:
            if prefix is not None:
                self.status.prefix_cache.CopyFrom(prefix)
            if counts is not None:
                self.status.expert_counts.CopyFrom(counts)
        self.report(state, **fields, **(self.memory_fields() if state == pb.READY else {}))

    def _abort_request(self, reason: str) -> None:
        """The runner is failing: every request in the batch or waiting is answered."""
        if self.server is not None:
            self.server.stop_all(pb.FINISH_ERROR, reason)
        else:
            self._drain_requests(reason)

    def _drain_requests(self, reason: str) -> None:
        for request_id in self.inbox.drain():
            self.emit(pb.GenerationChunk(request_id=request_id, finish_reason=pb.FINISH_CANCELLED, error=reason))

    def _cleanup(self) -> None:
        for path in self.files:
            try:
                path.unlink()
            except OSError:
                pass


def describe(error: Exception, state: int) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "connection to a peer was lost" in text or "closed by the peer" in text:
        return f"peer rank lost during {phase_name(state)}: {text}"
    return f"{phase_name(state)} failed: {text}"


def load_tokenizer(model_dir: str):
    if not (Path(model_dir) / "tokenizer.json").is_file() and not (Path(model_dir) / "tokenizer.model").is_file():
        return None
    from mlx_lm.tokenizer_utils import load

    return load(Path(model_dir))


def load_plugins() -> None:
    """EXOD_RUNNER_PLUGINS: modules imported at start that may register
    strategies (runner.strategies.register). Tests use it to prove that a
    broken strategy can never reach Ready."""
    import importlib

    for name in filter(None, os.environ.get("EXOD_RUNNER_PLUGINS", "").split(",")):
        importlib.import_module(name.strip())


def wait_for_spec(commands_fd: int) -> "pb.RunnerSpec | None":
    """A runner started ahead of need: import what every rank needs (MLX and
    mlx-lm take most of a second), then wait for the rank to run. None when
    the parent closes the pipe instead."""
    from . import canary, loading, serve  # noqa: F401

    try:
        command = channel.read_message(commands_fd, pb.RunnerCommand)
    except channel.ChannelClosed:
        return None
    if command is None or command.WhichOneof("command") != "start":
        return None
    return command.start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="exod-runner")
    parser.add_argument("--spec", default=None,
                        help="RunnerSpec as proto3 JSON; without it the spec is the first command")
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--commands-fd", type=int, required=True)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    _die_with_parent()
    events = channel.Writer(args.events_fd)
    try:
        if args.spec is None:
            spec = wait_for_spec(args.commands_fd)
            if spec is None:
                os._exit(0)
        else:
            spec = pb.RunnerSpec()
            json_format.Parse(Path(args.spec).read_text(), spec)
        load_plugins()
    except Exception as e:
        events.write(pb.RunnerEvent(status=pb.RunnerStatus(state=pb.FAILED, pid=os.getpid(),
                                                           reason=f"bad runner spec: {e}")))
        os._exit(EXIT_FAILED)
    workdir = Path(args.workdir or tempfile.gettempdir()) / "exod-runner"
    code = Rank(spec, events, args.commands_fd, workdir).run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # MLX's transport threads must not hold the exit


__all__ = ["main", "EXIT_DEADLINE"]
