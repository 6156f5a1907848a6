"""The cost model against reality: for each link profile x world size x
strategy, the planner's predicted decode tokens/s and its choice, against
decode tokens/s measured on real ranks joined over emulated links.

Each world size is a set of network-namespace hosts (bench/links.py); the
ranks run in them, each reaching its peers through the link profile's
relay. The planner is given this machine's calibrated node profile (one per
emulated host: `exod calibrate` with as many ranks busy at once as the hosts
share this machine's cores) and the links as a ping-pong measured them
through the same relays. Each strategy runs with the split the planner gave
it. The choice counts as right when the planner's pick is the strategy that
measured fastest; a pick within the repeat-to-repeat spread of the fastest
is reported as a tie.

Targets: the choice is right in >= 90% of (profile, world size) pairs, and
every cell's prediction is within 25% of its measurement."""

import os
import platform
import statistics
from pathlib import Path

from google.protobuf import json_format

from exod.daemon.calibration import core_prefix
from exod.models import inventory, synthetic
from exod.placement import planner
from exod.placement.errors import PlanError
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

from .links import PROFILES, EmulatedCluster, links_for
from .runner import models_dir

STRATEGIES = {"pipeline": pb.PIPELINE, "moe_tensor": pb.MOE_TENSOR, "tensor": pb.TENSOR}
CHOICE_TARGET = 0.90
PREDICTION_TARGET = 0.25
PROMPT_TOKENS = 16


def cluster_for(world: int, calibration: pb.NodeCalibration, links: list[pb.Link] | None = None) -> pb.Cluster:
    nodes = [pb.NodeProfile(node_id=f"host-{i}", name=f"host-{i}", memory_total_bytes=16 << 30,
                            memory_usable_bytes=16 << 30, backends=["ring"],
                            memory_bandwidth_bytes_per_s=calibration.decode_bytes_per_s,
                            calibration=calibration)
             for i in range(world)]
    return pb.Cluster(nodes=nodes, links=links or [])


def predictions(spec: pb.ModelSpec, cluster: pb.Cluster, world: int, context: int) -> tuple[dict, str]:
    """Per strategy: the planner's placement; and the strategy it would pick."""
    forced = {}
    for name, strategy in STRATEGIES.items():
        try:
            plan = planner.plan(spec, cluster, pb.PlacementRequest(ranks=world, strategy=strategy,
                                                                  context_length=context))
        except PlanError:
            continue
        if plan.HasField("chosen"):
            forced[name] = plan.chosen
    free = planner.plan(spec, cluster, pb.PlacementRequest(ranks=world, context_length=context))
    choice = {v: k for k, v in STRATEGIES.items()}[free.chosen.strategy]
    return forced, choice


def run_cell(cluster, model_dir: Path, placement: pb.Placement, name: str, world: int, tokens: int,
             pinned: bool = False) -> dict:
    """Decode tokens/s of one placement on the emulated hosts (pinned: each
    rank on a core of its own)."""
    split = [r.layer_end - r.layer_start for r in placement.ranks] if name == "pipeline" else None
    own, views = cluster.ring_hosts(world)
    try:
        with LocalInstance(model_dir, name, world, pipeline_layers=split, hosts=own, rank_hosts=views,
                           rank_prefix=[(core_prefix(r) if pinned else []) + cluster.prefix(r)
                                        for r in range(world)],
                           context_length=placement.context_length,
                           deadlines=pb.RunnerDeadlines(connect_s=60, load_s=120, warmup_s=120)) as instance:
            instance.wait_ready(300)
            request = pb.GenerateRequest(request_id="matrix",
                                         prompt_tokens=[5 + (i % 50) for i in range(PROMPT_TOKENS)],
                                         sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True))
            final = instance.generate(request, timeout=600)[-1]
            instance.shutdown()
    finally:
        cluster.stop_all()
    return {"decode_tokens_per_s": final.generation_tokens_per_s, "prefill_tokens_per_s": final.prompt_tokens_per_s}


def run(quick: bool = False, smallest: bool = False, pinned: bool = False, profiles: list[str] | None = None) -> dict:
    """smallest: one cell (demo model, 2 ranks, one profile, pipeline), so
    a test can run the suite's code path in seconds. pinned: 2 ranks only,
    each on a core of its own, as on two machines (the calibration too), so
    that the choice is judged without ranks waiting on the scheduler."""
    if os.geteuid() != 0:
        return {"bench": "matrix", "ok": False, "error": "needs root for network namespaces"}
    if pinned and (os.cpu_count() or 1) < 2:
        return {"bench": "matrix", "ok": False, "error": "pinned needs 2 cores, one per rank"}
    from exod.daemon.calibration import calibrate

    model = "demo" if smallest else "matrix-moe"
    model_dir = synthetic.ensure_named(model, models_dir())
    spec = inventory.from_directory(model_dir)
    spec.model_id = model
    profiles = ["10gbe"] if smallest else list(profiles or PROFILES)
    worlds = [2] if smallest or pinned else [2, 3]
    tokens = 8 if smallest else (16 if quick else 32)
    repeats = 1 if (quick or smallest) else 2
    context = 1024
    calibrations = {}
    for world in worlds:  # the emulated hosts share this machine's cores
        calibrations[world] = calibrate(busy=world, quick=quick or smallest, pinned=pinned)
    cells, choices, fidelity = [], [], []
    for profile_name in profiles:
        profile = PROFILES[profile_name]
        with EmulatedCluster(max(worlds), profile) as cluster:
            link = cluster.measure(0, 1, 200 if quick or smallest else 400, 4 << 20)
            fidelity.append({"profile": profile_name, "description": profile.description, **link})
            for world in worlds:
                ids = [f"host-{i}" for i in range(world)]
                planned = cluster_for(world, calibrations[world], links_for(ids, link))
                forced, choice = predictions(spec, planned, world, context)
                if smallest:
                    forced = {"pipeline": forced["pipeline"]}
                measured = {}
                for _ in range(repeats):
                    for name, placement in forced.items():  # interleaved, so drift hits all alike
                        measured.setdefault(name, []).append(
                            run_cell(cluster, model_dir, placement, name, world, tokens, pinned))
                for name, placement in forced.items():
                    samples = [m["decode_tokens_per_s"] for m in measured[name]]
                    got = statistics.median(samples)
                    predicted = placement.predicted_decode_tokens_per_s
                    cells.append({
                        "profile": profile_name, "ranks": world, "strategy": name,
                        "predicted_tokens_per_s": predicted, "measured_tokens_per_s": got,
                        "measured_samples": samples,
                        "prefill_tokens_per_s": statistics.median(m["prefill_tokens_per_s"] for m in measured[name]),
                        "error": predicted / got - 1,
                        "within_target": abs(predicted / got - 1) <= PREDICTION_TARGET,
                        "predicted_compute_s": placement.predicted_compute_s,
                        "predicted_communication_s": placement.predicted_communication_s,
                        "pipeline_layers": [r.layer_end - r.layer_start for r in placement.ranks]
                        if name == "pipeline" else [],
                    })
                mine = [c for c in cells if c["profile"] == profile_name and c["ranks"] == world]
                fastest = max(mine, key=lambda c: c["measured_tokens_per_s"])
                spread = max((max(c["measured_samples"]) - min(c["measured_samples"])) / c["measured_tokens_per_s"]
                             for c in mine)
                picked = next((c for c in mine if c["strategy"] == choice), None)
                choices.append({
                    "profile": profile_name, "ranks": world, "planner_choice": choice,
                    "measured_fastest": fastest["strategy"], "spread": spread,
                    "right": choice == fastest["strategy"],
                    "tie": bool(picked) and choice != fastest["strategy"]
                    and picked["measured_tokens_per_s"] >= fastest["measured_tokens_per_s"] * (1 - max(spread, 0.0)),
                })
    right = sum(c["right"] for c in choices) / len(choices)
    worst = max(abs(c["error"]) for c in cells)
    return {
        "bench": "matrix",
        "model": model,
        "pinned": pinned,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "decode_tokens": tokens,
        "repeats": repeats,
        "calibration": {str(w): _plain(c) for w, c in calibrations.items()},
        "links": fidelity,
        "cells": cells,
        "choices": choices,
        "choice_right_fraction": right,
        "worst_prediction_error": worst,
        "meets_choice_target": right >= CHOICE_TARGET,
        "meets_prediction_target": worst <= PREDICTION_TARGET,
        "ok": True,
    }


def _plain(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def table(report: dict) -> str:
    lines = ["profile      ranks strategy    predicted  measured   error",
             "------------ ----- ----------- ---------- ---------- ------"]
    for c in report["cells"]:
        lines.append(f"{c['profile']:<12} {c['ranks']:>5} {c['strategy']:<11} {c['predicted_tokens_per_s']:>8.1f}/s "
                     f"{c['measured_tokens_per_s']:>8.1f}/s {c['error']:>+6.0%}")
    for c in report["choices"]:
        verdict = "right" if c["right"] else ("tie" if c["tie"] else "WRONG")
        lines.append(f"{c['profile']} x {c['ranks']}: planner picks {c['planner_choice']}, "
                     f"fastest measured {c['measured_fastest']} ({verdict})")
    return "\n".join(lines)
