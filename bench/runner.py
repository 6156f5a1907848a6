"""exod's runner against mlx-lm's own sharded_load + stream_generate, in one
run, on the same model, ranks and strategy (moe_tensor has no mlx-lm
counterpart; it is compared with a single process):

  decode tokens/s   greedy, a fixed number of tokens, same prompt
  ready_s           process spawn to every rank ready (exod's includes the canary)

The target is exod >= 0.95x mlx-lm's decode speed."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exod.daemon.calibration import core_prefix
from exod.models import synthetic
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance, free_ports

WORKER = Path(__file__).resolve().parent / "mlx_lm_worker.py"
TARGET = 0.95
PROMPT_TOKENS = 32


def models_dir() -> Path:
    return Path(os.environ.get("EXOD_BENCH_MODELS") or Path(tempfile.gettempdir()) / "exod-bench-models")


# Decode speed as the median over windows of this many consecutive tokens:
# a window spans several of exod's controls (one every 4 steps), so every
# periodic cost is in it, while a window that the scheduler stalled (this
# box's two cores also run the parent and the OS) is outvoted. Whole-run
# means moved by up to 20% between interleaved runs of the same thing.
WINDOW_TOKENS = 16


def window_rate(times: list[float], window: int = WINDOW_TOKENS) -> float:
    """Median tokens/s over non-overlapping windows of `window` token
    intervals; 0 with too few tokens for one window."""
    rates = [window / (times[i + window] - times[i]) for i in range(0, len(times) - window, window)
             if times[i + window] > times[i]]
    return statistics.median(rates) if rates else 0.0


def even_split(layers: int, world: int) -> list[int]:
    base, extra = divmod(layers, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def mlx_lm_run(model_dir: Path, strategy: str, world: int, max_tokens: int, pinned: bool = False,
               engine: str = "stream") -> dict:
    """pinned: each rank on a core of its own (daemon/calibration.core_prefix);
    engine: mlx-lm's stream_generate ("stream") or BatchGenerator ("batch")."""
    env = {**os.environ, "BENCH_SPAWNED_AT": repr(time.time())}
    args = [sys.executable, str(WORKER), str(model_dir), strategy, str(max_tokens), str(PROMPT_TOKENS), engine]
    if strategy == "single":
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=True)
        return _with_window_rate(json.loads(out.stdout.strip().splitlines()[-1]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as hostfile:
        json.dump([[f"127.0.0.1:{p}"] for p in free_ports(world)], hostfile)
    try:
        procs = [subprocess.Popen((core_prefix(r) if pinned else []) + args,
                                  env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile.name},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        os.unlink(hostfile.name)
        for p in procs:
            p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError("mlx-lm baseline failed: " + " | ".join(o[1][-400:] for o in outs))
    return _with_window_rate(json.loads(outs[0][0].strip().splitlines()[-1]))


def _with_window_rate(result: dict) -> dict:
    result["decode_window_tokens_per_s"] = window_rate(result.pop("token_times", []))
    return result


def exod_run(model_dir: Path, strategy: str, world: int, max_tokens: int, layers: int, pinned: bool = False,
             max_batch: int = 8) -> dict:
    spawned = time.time()
    split = even_split(layers, world) if strategy == "pipeline" else None
    prefix = [core_prefix(r) for r in range(world)] if pinned else None
    with LocalInstance(model_dir, strategy, world, pipeline_layers=split, context_length=4096,
                       rank_prefix=prefix, max_batch=max_batch) as instance:
        instance.wait_ready(600)
        ready_s = max(s.changed_at_unix_ms for s in (r.status for r in instance.ranks)) / 1000 - spawned
        request = pb.GenerateRequest(request_id="bench", prompt_tokens=[5 + (i % 50) for i in range(PROMPT_TOKENS)],
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        times = []
        for final in instance.stream(request, timeout=600):
            if final.tokens and not final.finish_reason:
                times.append(time.perf_counter())
        instance.shutdown()
    return {"ready_s": ready_s, "decode_tokens_per_s": final.generation_tokens_per_s,
            "decode_window_tokens_per_s": window_rate(times),
            "prompt_tokens_per_s": final.prompt_tokens_per_s, "tokens": final.generation_tokens}


def run(quick: bool = False) -> dict:
    model = "demo" if quick else "midsize-moe"
    model_dir = synthetic.ensure_named(model, models_dir())
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    max_tokens = 32 if quick else 128
    repeats = 1 if quick else 2
    cases = [("tensor", 2), ("pipeline", 2), ("moe_tensor", 2)] + ([] if quick else [("pipeline", 3)])
    single = [mlx_lm_run(model_dir, "single", 1, max_tokens) for _ in range(repeats)]
    single_tps = statistics.median(r["decode_tokens_per_s"] for r in single)
    results = []
    for strategy, world in cases:
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved so drift hits both alike
            if strategy != "moe_tensor":
                theirs.append(mlx_lm_run(model_dir, strategy, world, max_tokens))
            ours.append(exod_run(model_dir, strategy, world, max_tokens, layers))
        row = {
            "strategy": strategy, "ranks": world,
            "exod_decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in ours),
            "exod_ready_s": statistics.median(r["ready_s"] for r in ours),
            "exod_prompt_tokens_per_s": statistics.median(r["prompt_tokens_per_s"] for r in ours),
        }
        if theirs:
            row["mlx_lm_decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in theirs)
            row["mlx_lm_ready_s"] = statistics.median(r["ready_s"] for r in theirs)
            row["decode_ratio"] = row["exod_decode_tokens_per_s"] / row["mlx_lm_decode_tokens_per_s"]
            row["meets_target"] = row["decode_ratio"] >= TARGET
        else:
            row["baseline"] = "no mlx-lm counterpart; see single_process_decode_tokens_per_s"
        results.append(row)
    return {
        "bench": "runner",
        "model": model,
        "model_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        "max_tokens": max_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "repeats": repeats,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "single_process_decode_tokens_per_s": single_tps,
        "target_decode_ratio": TARGET,
        "results": results,
    }
