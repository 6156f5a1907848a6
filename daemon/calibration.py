"""`exod calibrate`: measure this node's decode cost and collective cost,
fit the cost model's per-node constants, and keep them in the data dir
(calibration.json), from where every later `exod start` publishes them in
its NodeProfile.

The timing runs in runner processes (exod.runner.calibrate, and a real
two-rank instance), never in the daemon: it imports MLX and keeps a core busy for seconds. busy > 1 runs that
many timing processes at once, for emulated hosts that share one machine's
cores (the benchmarks)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import json_format

from exod.proto import exod_pb2 as pb

FILE = "calibration.json"
COMPUTE_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT_S = 120


class CalibrationError(Exception):
    pass


def _runner(args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), sys.executable, "-P", "-m", "exod.runner.calibrate", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def core_prefix(index: int) -> list[str]:
    """Run a process on one core of its own (`taskset`; its threads and
    children inherit it): ranks that each own a core measure what ranks on
    separate machines would, not the scheduler's interleaving."""
    return ["taskset", "-c", str(index % (os.cpu_count() or 1))]


def _collect(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            if proc.returncode:
                raise CalibrationError(f"calibration process failed: {err.strip().splitlines()[-1:] or proc.returncode}")
            outs.append(out)
    except subprocess.TimeoutExpired:
        raise CalibrationError(f"calibration took longer than {timeout:g} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


def fit(points: list[dict]) -> tuple[float, float, float, float]:
    """(step_s, layer_s, bytes_per_s, worst relative error) of
    seconds = step + layers x layer + bytes / rate, by least squares; a term
    that fits negative is dropped rather than allowed to subtract time."""
    import numpy as np

    a = np.array([[1.0, p["layers"], p["read_bytes"]] for p in points])
    y = np.array([p["seconds"] for p in points])
    keep = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(3)
    full[keep] = np.maximum(coef, 0)
    worst = float(np.max(np.abs(a @ full / y - 1)))
    rate = 1.0 / full[2] if full[2] > 0 else float("inf")
    return float(full[0]), float(full[1]), rate, worst


def _collective_s(world: int, quick: bool, rate: float, step: float, layer: float, pinned: bool = False) -> float:
    """What one all-sum costs inside a real tensor-sharded decode: the
    runner itself (the same process, loop and control collectives a placed
    rank runs) decodes a small built-in model on a loopback ring of `world`
    ranks, and the compute the fitted constants predict for one shard is
    taken away. Ranks that share too few cores pay the scheduler here: a
    ring step waits for a peer that is not running. The loopback wire
    (~25 us per all-sum) is left in."""
    from exod.models import inventory, synthetic
    from exod.placement.profile import profile
    from exod.runner.launch import LaunchError, LocalInstance
    from exod.runner.serve import CONTROL_EVERY

    with tempfile.TemporaryDirectory(prefix="exod-calibrate-") as tmp:
        model_dir = synthetic.ensure_named("calibration-tensor", Path(tmp))
        shape = profile(inventory.from_directory(model_dir))
        read = sum(p.read("tensor", 1, world) for p in shape.layers) + shape.outside.read("tensor", 1, world)
        compute = read / rate + step + shape.num_layers * layer
        tokens = 24 if quick else 48
        try:
            with LocalInstance(model_dir, "tensor", world, context_length=512, log_dir=tmp,
                               rank_prefix=[core_prefix(r) for r in range(world)] if pinned else None) as instance:
                instance.wait_ready(COLLECTIVE_TIMEOUT_S)
                request = pb.GenerateRequest(request_id="calibrate", prompt_tokens=[5] * 8,
                                             sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True))
                final = instance.generate(request, timeout=COLLECTIVE_TIMEOUT_S)[-1]
                instance.shutdown()
        except LaunchError as e:
            raise CalibrationError(f"sharded decode failed: {e}") from None
    if final.error or final.generation_tokens_per_s <= 0:
        raise CalibrationError(f"sharded decode failed: {final.error or 'no tokens'}")
    per_token = 2 * shape.num_layers + 1 / CONTROL_EVERY
    return max(0.0, (1 / final.generation_tokens_per_s - compute) / per_token)


def calibrate(busy: int = 1, quick: bool = False, pinned: bool = False) -> pb.NodeCalibration:
    """pinned: each busy process (and each rank of the all-sum measure) on a
    core of its own (`core_prefix`)."""
    import mlx.core as mx
    import numpy as np

    from .profile import chip

    procs = [_runner(["compute"] + (["--quick"] if quick else []), prefix=core_prefix(i) if pinned else None)
             for i in range(busy)]
    outs = _collect(procs, COMPUTE_TIMEOUT_S)
    runs = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    # Each model's time is the median over the processes that ran at once.
    points = [{**runs[0][i], "seconds": float(np.median([r[i]["seconds"] for r in runs]))}
              for i in range(len(runs[0]))]
    step, layer, rate, worst = fit(points)
    return pb.NodeCalibration(decode_bytes_per_s=rate, step_s=step, layer_s=layer,
                              collective_s=_collective_s(max(busy, 2), quick, rate, step, layer, pinned),
                              busy_ranks=busy,
                              mlx_version=mx.__version__, chip=chip(),
                              measured_at_unix_ms=int(time.time() * 1000), fit_worst_error=worst)


def save(data_dir: Path, calibration: pb.NodeCalibration) -> Path:
    path = Path(data_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json_format.MessageToJson(calibration, preserving_proto_field_name=True))
    tmp.replace(path)
    return path


def load(data_dir: Path) -> pb.NodeCalibration | None:
    """The saved calibration, or None when there is none or it is unreadable
    (the planner then uses its defaults; `exod calibrate` makes a new one)."""
    try:
        return json_format.Parse(Path(data_dir, FILE).read_text(), pb.NodeCalibration())
    except (OSError, json_format.ParseError):
        return None
