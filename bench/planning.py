"""Planning time with every candidate enumerated, for 2, 8, 16 and 64 nodes.
Each model is planned twice: as the daemon plans it without routing counts,
and with measured counts (skewed, drawn from a fixed seed), which place
moe_experts' experts by load (placement/experts.py).

Nodes are a mix of Mac sizes with every pair's link measured (Thunderbolt
between a few, Ethernet or Wi-Fi between the rest). The model profile is
computed once per model, as the daemon caches it; both times are reported.
Targets: under 50 ms at 16 nodes, under 1 s at 64."""

import platform
import random
import statistics
import time

from exod.models import catalog
from exod.placement import plan, profile
from exod.proto import exod_pb2 as pb

MODELS = ("deepseek-v4-flash", "deepseek-v3.1-4bit", "qwen3-235b-a22b-4bit")
SIZES = (2, 8, 16, 64)
TARGETS_S = {16: 0.050, 64: 1.0}
MACS = [  # (chip, usable GB, bandwidth GB/s)
    ("Apple M3 Ultra", 464, 819), ("Apple M2 Ultra", 144, 800), ("Apple M4 Max", 96, 546),
    ("Apple M4 Pro", 48, 273),
]


def cluster(n: int) -> pb.Cluster:
    nodes = []
    for i in range(n):
        chip, memory, bandwidth = MACS[i % len(MACS)]
        nodes.append(pb.NodeProfile(node_id=f"n{i}", name=f"mac-{i}", chip=chip,
                                    memory_usable_bytes=memory * 10**9,
                                    memory_bandwidth_bytes_per_s=bandwidth * 1e9, backends=["ring"]))
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            thunderbolt = j - i == 1 and i % 4 != 3
            links.append(pb.Link(from_node=f"n{i}", to_node=f"n{j}",
                                 rtt_s=60e-6 if thunderbolt else (250e-6 if (i + j) % 3 else 4e-3),
                                 bandwidth_bytes_per_s=9e9 if thunderbolt else (1.1e9 if (i + j) % 3 else 3.5e7)))
    return pb.Cluster(nodes=nodes, links=links)


def skewed_counts(spec: pb.ModelSpec, model) -> pb.ExpertCounts:
    """Per MoE layer, Pareto-distributed counts: a few hot experts."""
    rng = random.Random(20261202)
    return pb.ExpertCounts(layers=[pb.LayerCounts(layer=layer, counts=[int(1000 * rng.paretovariate(1.2))
                                                                       for _ in range(spec.num_experts)])
                                   for layer in model.moe_layer_ids])


def run(quick: bool = False) -> dict:
    repeats = 3 if quick else 7
    results, ok = [], True
    for model_id, routing in [(m, r) for m in MODELS for r in (False, True)]:
        spec = catalog.resolve(model_id)
        start = time.perf_counter()
        model = profile(spec)
        profile_s = time.perf_counter() - start
        counts = skewed_counts(spec, model) if routing else None
        for n in SIZES:
            c = cluster(n)
            times, candidates = [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                result = plan(spec, c, pb.PlacementRequest(context_length=32768), model=model, expert_counts=counts)
                times.append(time.perf_counter() - start)
                candidates = len(result.candidates)
            median = statistics.median(times)
            target = TARGETS_S.get(n)
            met = target is None or median < target
            ok &= met
            results.append({
                "model": model_id, "routing_counts": routing, "nodes": n, "candidates": candidates,
                "plan_median_ms": round(median * 1e3, 2), "plan_max_ms": round(max(times) * 1e3, 2),
                "profile_ms": round(profile_s * 1e3, 2),
                "target_ms": target * 1e3 if target else None, "met": met,
                "chosen": result.chosen.strategy and pb.Strategy.Name(result.chosen.strategy),
                "chosen_nodes": len(result.chosen.ranks),
            })
    return {"bench": "planning", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "ok": ok, "results": results}
