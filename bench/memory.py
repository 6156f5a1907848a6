"""Estimated against measured peak memory per rank, for each strategy.

The planner's per-rank estimate (weights by class + KV cache at the context
+ overhead) is set against the rank's peak resident memory, which the runner
reports from the kernel's high-water mark after it answered a request that
fills the context. Same model, placement and split as the planner made.
tests/test_runner_memory.py holds the same figures to 10%."""

import os
import platform

from exod.models import inventory, synthetic
from exod.placement import cluster, planner
from exod.placement.spec import layout
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

from .runner import models_dir

TOLERANCE = 0.10


def measure(model_dir, spec: pb.ModelSpec, strategy: str, world: int, context: int, prompt: int) -> dict:
    plan = planner.plan(spec, cluster.synthetic(world, 64 * 10**9),
                        pb.PlacementRequest(strategy=pb.Strategy.Value(strategy.upper()), ranks=world,
                                            context_length=context))
    placement = plan.chosen
    estimates = [r.memory.total_bytes for r in placement.ranks]
    fields = layout(placement)  # as the daemon writes each rank's spec
    with LocalInstance(model_dir, strategy, world, pipeline_layers=fields.pipeline_layers, shares=fields.shares,
                       stage_ranks=fields.stage_ranks, stage_strategy=fields.stage_strategy,
                       estimated_bytes=estimates, context_length=context) as instance:
        instance.wait_ready(300)
        request = pb.GenerateRequest(request_id="fill", prompt_tokens=[5] * prompt,
                                     sampling=pb.SamplingParams(max_tokens=context - prompt, ignore_eos=True))
        instance.generate(request, timeout=600)
        instance.wait_for(lambda i: all(s == pb.READY for s in i.states()), 10)
        peaks = [statuses[-1].peak_rss_bytes for statuses in instance.statuses]
        instance.shutdown()
    ranks = []
    for r, (estimate, peak) in enumerate(zip(estimates, peaks)):
        m = placement.ranks[r].memory
        ranks.append({"rank": r, "estimated_bytes": estimate, "measured_peak_bytes": peak,
                      "ratio": peak / estimate, "weights_bytes": m.weights_bytes,
                      "kv_cache_bytes": m.kv_cache_bytes, "overhead_bytes": m.overhead_bytes})
    return {"strategy": strategy, "ranks": world, "context": context, "per_rank": ranks,
            **({"stage_ranks": fields.stage_ranks} if fields.stage_ranks else {}),
            "worst_ratio_error": max(abs(r["ratio"] - 1) for r in ranks)}


def run(quick: bool = False) -> dict:
    model = "midsize-moe"  # big enough that weights, not the process, dominate
    model_dir = synthetic.ensure_named(model, models_dir())
    spec = inventory.from_directory(model_dir)
    context = 128 if quick else 256
    cases = [("moe_tensor", 2), ("pipeline", 2), ("tensor", 2)] + ([] if quick else [("pipeline", 3), ("hybrid", 3)])
    results = [measure(model_dir, spec, s, w, context, context // 2) for s, w in cases]
    worst = max(r["worst_ratio_error"] for r in results)
    return {
        "bench": "memory",
        "model": model,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "tolerance": TOLERANCE,
        "results": results,
        "worst_ratio_error": worst,
        "meets_target": worst <= TOLERANCE,
    }
