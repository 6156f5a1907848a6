"""Heterogeneous clusters: the planner's choice against the best even plan,
on emulated hosts of unequal speed and memory, measured in one run.

Two network-namespace hosts joined by the bare veth (thunderbolt-like, so
compute decides). Each host's rank runs on a core of its own; the slow
host's rank also runs in a CPU cgroup capped at SLOW_FRACTION of that core
(cgroup v2 `cpu.max` where the cpu controller is on the unified hierarchy,
else v1's `cpu.cfs_quota_us`, the same CFS bandwidth limit). Each host's
decode rate is calibrated under its own cap, both at once, and those
measured figures are what the planner is given.

Cases:
- compute: both hosts have room for everything; the slow host has half a
  core. The planner's choice (uneven shares where they pay) against the
  fastest plan with even shares (even tensor, moe_tensor and moe_experts
  shares, pipeline by even layers), each measured. Goal: >= 1.2x.
- memory: the slow host's usable memory is set below what any even plan
  needs on it (as `exod start --memory-limit` would); no even plan fits,
  the chosen plan must, and it runs: every rank Ready, decoding, with its
  measured peak within the usable memory it was given.
- routing (with the skewed-routing model): moe_experts with experts placed
  by the routing load measured on a first run, against the even split of
  experts, on two equal hosts. Goal: faster.
"""

import os
import platform
import statistics
from contextlib import contextmanager
from pathlib import Path

from exod.daemon.calibration import COMPUTE_TIMEOUT_S, _collect, _runner, calibrate, core_prefix, fit
from exod.models import inventory, synthetic
from exod.placement import planner
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

from .links import PROFILES, EmulatedCluster, links_for
from .runner import models_dir

SLOW_FRACTION = 0.5
# Short periods: a rank waiting at an all-sum spins (its CPU time is its
# wall time), and that spin spends the period's quota. With 10 ms periods a
# rank that spun early in a period was throttled when its work came, which
# no slower machine does: the uneven tensor split measured 0.84x the even
# one; with 2 ms (quota 1 ms, CFS's least) 1.16-1.24x.
CFS_PERIOD_US = 2_000
MODEL = "matrix-moe"
SKEWED_MODEL = "skewed-wide-moe"
PROMPT_TOKENS = 16
EVEN = {"tensor": pb.TENSOR, "moe_tensor": pb.MOE_TENSOR, "moe_experts": pb.MOE_EXPERTS, "pipeline": pb.PIPELINE}
GOAL_SPEEDUP = 1.2


# ------------------------------------------------------------------ CPU caps


def _cpu_cgroup_root() -> tuple[Path, int]:
    """(where cpu cgroups are made, the cgroup version)."""
    unified = Path("/sys/fs/cgroup")
    controllers = unified / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return unified, 2
    if (unified / "cpu" / "cpu.cfs_quota_us").exists():
        return unified / "cpu", 1
    raise RuntimeError("no CPU cgroup controller (cgroup v2 cpu or v1 cpu) is mounted")


@contextmanager
def cpu_capped(name: str, fraction: float):
    """A cgroup capping its processes at `fraction` of one core; yields the
    command prefix that starts a process inside it."""
    root, version = _cpu_cgroup_root()
    group = root / name
    group.mkdir(exist_ok=True)
    quota = int(CFS_PERIOD_US * fraction)
    if version == 2:
        (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
    else:
        (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    procs = group / "cgroup.procs"
    try:
        # The shell moves itself into the group, then becomes the command.
        yield ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "cpu-capped"]
    finally:
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        try:
            group.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------ planner inputs


def host_calibrations(quick: bool, slow_prefix: list[str]) -> list[pb.NodeCalibration]:
    """Each host's decode rate, measured under its own cap with both hosts
    busy at once; the collective cost from the pinned calibration."""
    base = calibrate(busy=2, quick=quick, pinned=True)
    args = ["compute"] + (["--quick"] if quick else [])
    outs = _collect([_runner(args, prefix=core_prefix(0)), _runner(args, prefix=core_prefix(1) + slow_prefix)],
                    COMPUTE_TIMEOUT_S)
    import json

    out = []
    for text in outs:
        step, layer, rate, worst = fit(json.loads(text.strip().splitlines()[-1]))
        c = pb.NodeCalibration()
        c.CopyFrom(base)
        c.decode_bytes_per_s, c.step_s, c.layer_s, c.fit_worst_error, c.busy_ranks = rate, step, layer, worst, 2
        out.append(c)
    return out


def cluster_for(calibrations: list[pb.NodeCalibration], usable: list[int], link: dict) -> pb.Cluster:
    nodes = [pb.NodeProfile(node_id=f"host-{i}", name=f"host-{i}", memory_total_bytes=u, memory_usable_bytes=u,
                            backends=["ring"], memory_bandwidth_bytes_per_s=c.decode_bytes_per_s, calibration=c)
             for i, (c, u) in enumerate(zip(calibrations, usable))]
    return pb.Cluster(nodes=nodes, links=links_for([n.node_id for n in nodes], link))


def even_plans(spec: pb.ModelSpec, cluster: pb.Cluster, context: int) -> dict:
    """Each strategy with even shares (pipeline: even layers), as the planner
    estimates it on these nodes: what an even-only planner could offer."""
    found = {}
    for name, strategy in EVEN.items():
        request = pb.PlacementRequest(ranks=2, strategy=strategy, context_length=context, concurrency=1)
        try:
            plan = planner.plan(spec, cluster, request)
        except planner.PlanError:
            continue
        candidate = next((c for c in plan.candidates if len(c.ranks) == 2 and not c.rejected), None)
        if candidate is None:
            continue
        even = pb.Placement()
        even.CopyFrom(candidate)
        even.predicted_decode_tokens_per_s = 0  # the planner's figure was for its own shares
        if name == "pipeline":
            half = spec.num_layers // 2
            bounds = [(spec.num_layers - half, spec.num_layers), (0, spec.num_layers - half)]
            for rank, (a, b) in zip(even.ranks, bounds):  # rank 0 runs the last layers
                rank.layer_start, rank.layer_end = a, b
        else:
            of = even.ranks[0].share_of
            for rank in even.ranks:
                rank.share = of // 2 + (1 if rank.rank < of % 2 else 0)
            even.ClearField("expert_layout")
        found[name] = (even, _fits_even(spec, cluster, even, name, context))
    return found


def _fits_even(spec, cluster, even: pb.Placement, name: str, context: int) -> bool:
    """Whether the even plan fits each node's usable memory (the planner's
    per-rank estimate at the even shares or layers)."""
    model = planner.profile(spec)
    settings = planner.Settings(context, 1, planner.constants.DEFAULT_HEADROOM, context)
    for rank, node in zip(even.ranks, cluster.nodes):
        if name == "pipeline":
            memory, _ = planner.rank_memory(model, "pipeline", 1, rank.layer_start, rank.layer_end, settings, ranks=2)
        else:
            memory, _ = planner.rank_memory(model, name, rank.share_of, 0, model.num_layers, settings,
                                            share=(rank.share, rank.share_of), ranks=2)
        if memory.total_bytes > node.memory_usable_bytes * (1 - planner.constants.DEFAULT_HEADROOM):
            return False
    return True


# ------------------------------------------------------------------ measuring


def measure(cluster: EmulatedCluster, model_dir: Path, placement: pb.Placement, prefixes: list[list[str]],
            tokens: int) -> dict:
    """Decode tokens/s of one placement on the hosts, each rank under its
    host's prefix (core, cap, namespace); and each rank's peak memory."""
    name = planner.STRATEGY_NAMES[placement.strategy]
    split = [r.layer_end - r.layer_start for r in placement.ranks] if name == "pipeline" else None
    shares = [r.share for r in placement.ranks] if name != "pipeline" and not placement.HasField(
        "expert_layout") else None
    own, views = cluster.ring_hosts(2)
    extra = {"expert_layout": placement.expert_layout} if placement.HasField("expert_layout") else {}
    try:
        with LocalInstance(model_dir, name, 2, pipeline_layers=split, shares=shares, hosts=own, rank_hosts=views,
                           rank_prefix=[prefixes[r] + cluster.prefix(r) for r in range(2)],
                           context_length=placement.context_length, max_batch=1,
                           deadlines=pb.RunnerDeadlines(connect_s=60, load_s=300, warmup_s=300), **extra) as instance:
            instance.wait_ready(600)
            request = pb.GenerateRequest(request_id="hetero",
                                         prompt_tokens=[5 + (i % 50) for i in range(PROMPT_TOKENS)],
                                         sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True))
            final = instance.generate(request, timeout=600)[-1]
            statuses = [instance.statuses[r][-1] for r in range(2)]
            instance.shutdown()
    finally:
        cluster.stop_all()
    return {"decode_tokens_per_s": final.generation_tokens_per_s,
            "peak_rss_bytes": [s.peak_rss_bytes for s in statuses],
            "expert_counts": statuses[0].expert_counts if statuses[0].HasField("expert_counts") else None}


def describe(placement: pb.Placement) -> dict:
    name = planner.STRATEGY_NAMES[placement.strategy]
    return {"strategy": name,
            "shares": [f"{r.share}/{r.share_of}" for r in placement.ranks] if name != "pipeline"
            else [r.layer_end - r.layer_start for r in placement.ranks],
            "predicted_tokens_per_s": placement.predicted_decode_tokens_per_s or None,
            "expert_layout": placement.HasField("expert_layout"),
            "predicted_routing_imbalance": placement.predicted_routing_imbalance or None}


def run(quick: bool = False, smallest: bool = False) -> dict:
    """smallest: the memory case alone (what a test runs: no speed is
    compared)."""
    if os.geteuid() != 0:
        return {"bench": "hetero", "ok": False, "error": "needs root for network namespaces and cgroups"}
    if (os.cpu_count() or 1) < 2:
        return {"bench": "hetero", "ok": False, "error": "needs 2 cores, one per host"}
    quick = quick or smallest
    tokens = 16 if quick else 32
    repeats = 1 if quick else 3
    context = 1024
    model_dir = synthetic.ensure_named(MODEL, models_dir())
    spec = inventory.from_directory(model_dir)
    spec.model_id = MODEL
    report = {"bench": "hetero", "model": MODEL, "machine": f"{platform.machine()} {platform.system()}, "
              f"{os.cpu_count()} CPUs", "slow_fraction": SLOW_FRACTION, "decode_tokens": tokens,
              "repeats": repeats}
    with cpu_capped(f"exod-bench-slow-{os.getpid()}", SLOW_FRACTION) as slow, \
            EmulatedCluster(2, PROFILES["thunderbolt"]) as hosts:
        prefixes = [core_prefix(0), core_prefix(1) + slow]
        link = hosts.measure(0, 1, 200, 4 << 20)
        calibrations = host_calibrations(quick, slow)
        report["calibrated_decode_bytes_per_s"] = [c.decode_bytes_per_s for c in calibrations]
        roomy = cluster_for(calibrations, [16 << 30] * 2, link)

        if smallest:
            report["memory"] = memory_case(spec, calibrations, link, hosts, model_dir, prefixes, tokens, context)
            report["ok"] = True
            return report
        # compute: the planner's choice against every even plan, interleaved.
        chosen = planner.plan(spec, roomy, pb.PlacementRequest(ranks=2, context_length=context,
                                                               concurrency=1)).chosen
        evens = {name: p for name, (p, fits) in even_plans(spec, roomy, context).items() if fits}
        samples: dict[str, list[float]] = {}
        for _ in range(repeats):
            samples.setdefault("chosen", []).append(measure(hosts, model_dir, chosen, prefixes, tokens)[
                "decode_tokens_per_s"])
            for name, even in evens.items():
                samples.setdefault(name, []).append(measure(hosts, model_dir, even, prefixes, tokens)[
                    "decode_tokens_per_s"])
        medians = {k: statistics.median(v) for k, v in samples.items()}
        best_even = max(evens, key=lambda k: medians[k])
        report["compute"] = {
            "chosen": describe(chosen), "chosen_tokens_per_s": medians["chosen"],
            "even": {k: {**describe(evens[k]), "tokens_per_s": medians[k], "samples": samples[k]} for k in evens},
            "chosen_samples": samples["chosen"], "best_even": best_even,
            "speedup_over_best_even": medians["chosen"] / medians[best_even],
            "meets_goal": medians["chosen"] >= GOAL_SPEEDUP * medians[best_even],
        }

        report["memory"] = memory_case(spec, calibrations, link, hosts, model_dir, prefixes, tokens, context)

        # routing: two equal hosts (no cap), the skewed-routing model.
        report["routing"] = routing_case(hosts, [core_prefix(0), core_prefix(1)], calibrations[0], link,
                                         tokens, repeats, context)
    report["ok"] = True
    return report


def memory_case(spec, calibrations, link, hosts, model_dir, prefixes, tokens: int, context: int) -> dict:
    """The slow host's usable memory set below what any even plan needs
    there: the planner's choice must fit and run within it."""
    roomy = cluster_for(calibrations, [16 << 30] * 2, link)
    model = planner.profile(spec)
    settings = planner.Settings(context, 1, planner.constants.DEFAULT_HEADROOM, context)
    even_needs = []
    for name, (even, _) in even_plans(spec, roomy, context).items():
        r = even.ranks[1]
        if name == "pipeline":
            m, _ = planner.rank_memory(model, name, 1, r.layer_start, r.layer_end, settings, ranks=2)
        else:
            m, _ = planner.rank_memory(model, name, r.share_of, 0, model.num_layers, settings,
                                       share=(r.share, r.share_of), ranks=2)
        even_needs.append(m.total_bytes)
    small = int(min(even_needs) * 0.9 / (1 - planner.constants.DEFAULT_HEADROOM))
    tight = cluster_for(calibrations, [16 << 30, small], link)
    fitting_even = [name for name, (_, fits) in even_plans(spec, tight, context).items() if fits]
    plan = planner.plan(spec, tight, pb.PlacementRequest(ranks=2, context_length=context, concurrency=1))
    entry = {"slow_host_usable_bytes": small, "even_plans_that_fit": fitting_even,
             "chosen": describe(plan.chosen) if plan.HasField("chosen") else None}
    if plan.HasField("chosen"):
        got = measure(hosts, model_dir, plan.chosen, prefixes, tokens)
        entry.update(tokens_per_s=got["decode_tokens_per_s"], peak_rss_bytes=got["peak_rss_bytes"],
                     estimated_bytes=[r.memory.total_bytes for r in plan.chosen.ranks],
                     slow_rank_within_usable=got["peak_rss_bytes"][1] <= small)
    entry["meets_goal"] = not fitting_even and bool(entry.get("tokens_per_s")) and \
        entry.get("slow_rank_within_usable", False)
    return entry


def routing_case(hosts: EmulatedCluster, prefixes: list[list[str]], calibration: pb.NodeCalibration, link: dict,
                 tokens: int, repeats: int, context: int) -> dict:
    """moe_experts on the skewed-routing model: the even split of experts
    (nothing measured yet), then experts placed by the counts that first
    run measured, interleaved."""
    model_dir = synthetic.ensure_named(SKEWED_MODEL, models_dir())
    spec = inventory.from_directory(model_dir)
    spec.model_id = SKEWED_MODEL
    equal = cluster_for([calibration, calibration], [16 << 30] * 2, link)
    request = pb.PlacementRequest(ranks=2, strategy=pb.MOE_EXPERTS, context_length=context, concurrency=1)
    even = planner.plan(spec, equal, request).chosen
    first = measure(hosts, model_dir, even, prefixes, tokens)
    counts = first["expert_counts"]
    routed = planner.plan(spec, equal, request, expert_counts=counts).chosen
    samples = {"even": [first["decode_tokens_per_s"]], "routed": []}
    for i in range(repeats):
        samples["routed"].append(measure(hosts, model_dir, routed, prefixes, tokens)["decode_tokens_per_s"])
        if i < repeats - 1:
            samples["even"].append(measure(hosts, model_dir, even, prefixes, tokens)["decode_tokens_per_s"])
    medians = {k: statistics.median(v) for k, v in samples.items()}
    from exod.daemon.work import _layout_imbalance
    from exod.placement import experts

    return {"model": SKEWED_MODEL, "even": describe(even), "routed": describe(routed),
            "even_routing_imbalance": _layout_imbalance(even, counts, [1.0, 1.0], experts),
            "samples": samples, "even_tokens_per_s": medians["even"], "routed_tokens_per_s": medians["routed"],
            "speedup": medians["routed"] / medians["even"], "meets_goal": medians["routed"] > medians["even"]}
