"""The placement planner: every candidate, its per-rank memory, its predicted
speed, and the choice. Pure: no I/O, no clocks.

A strategy that cuts tensors gives each rank its own share, in whole grains
(placement/strategies.py): on nodes of unequal speed or memory the shares
are uneven, chosen so that every rank's step takes the same time within
what its memory holds.

Hybrid candidates (pipeline across stages cut at an order's slowest links,
a cut inside each stage of 2+ ranks; placement/hybrid.py) are planned
after the others, whose fastest fitting speed bounds which of the many
splits are worth evaluating."""

import math
from bisect import bisect_right
from dataclasses import dataclass, replace

from exod.models.shares import even as shares_even
from exod.proto import exod_pb2 as pb

from . import constants, cost, experts, hybrid
from . import strategies as strategy_objects
from .errors import PlanError
from .profile import (CLASS_FIELD, CLASS_LABEL, CLASSES, FULL, KV1_CUT, KV1_FIXED, KV_CUT, KV_FIXED, READ_ALL,
                      READ_SPLIT, SPLIT, SPLITTING, ModelProfile, profile, range_sums)
from .units import gb
from .wired import sysctl, wired_limit_mb

STRATEGY_NAMES = {pb.PIPELINE: "pipeline", pb.MOE_TENSOR: "moe_tensor", pb.TENSOR: "tensor",
                  pb.MOE_EXPERTS: "moe_experts", pb.HYBRID: "hybrid"}
STRATEGY_BY_NAME = {v: k for k, v in STRATEGY_NAMES.items()}
BACKEND_NAMES = {pb.RING: "ring", pb.JACCL: "jaccl"}


@dataclass(frozen=True)
class Settings:
    context: int
    concurrency: int
    headroom: float
    prefix_tokens: int = 0  # tokens of KV the prefix cache holds, on every rank


def plan(spec: pb.ModelSpec, cluster: pb.Cluster, request: pb.PlacementRequest,
         model: ModelProfile | None = None, expert_counts: pb.ExpertCounts | None = None) -> pb.Plan:
    """expert_counts: how often the router chose each expert, measured on
    earlier runs of this model; with them, moe_experts places experts by
    routing load (placement/experts.py), without them evenly."""
    model = model or profile(spec)
    settings = _settings(model, request)
    nodes, skipped = _select_nodes(cluster, request)
    links = {(link.from_node, link.to_node): link for link in cluster.links}
    strategies = [request.strategy] if request.strategy else [pb.PIPELINE, pb.MOE_TENSOR, pb.TENSOR, pb.MOE_EXPERTS,
                                                              pb.HYBRID]
    # Hybrid is planned apart, after the others: their best speed bounds
    # which of its many splits are worth evaluating.
    with_hybrid = pb.HYBRID in strategies
    strategies = [s for s in strategies if s != pb.HYBRID]

    candidates, impossible, routed = [], [], []
    memo: dict = {"expert freqs": expert_frequencies(model, expert_counts)}
    # Placements whose runner decodes one sequence at a time reserve one
    # context of KV, not `concurrency`, and their memory is memoised apart.
    single, single_memo = replace(settings, concurrency=1), {"expert freqs": memo["expert freqs"]}
    orders = candidate_orders(nodes, links, memo.setdefault("hops", {}))
    for order in orders:
        if request.ranks and len(order) != request.ranks:
            continue
        for strategy in strategies:
            name = STRATEGY_NAMES[strategy]
            if len(order) == 1 and strategy != pb.PIPELINE:
                continue  # one rank of a tensor strategy is the single-node pipeline
            structural = structural_reasons(model, name, len(order))
            alone = one_at_a_time(model, name, len(order)) and settings.concurrency > 1
            for backend in _backends(order, links, request.backend):
                candidate = evaluate(model, name, backend, order, links, single if alone else settings, structural,
                                     single_memo if alone else memo)
                if alone and not candidate.rejected:
                    candidate.reasons.append(f"note: decodes one sequence at a time (concurrency 1, not "
                                             f"{settings.concurrency}): {model.model_id}'s caches cannot be batched"
                                             + (" across pipeline stages" if not model.unbatched else ""))
                if name == "moe_experts" and len(order) > 1 and memo["expert freqs"] and not candidate.rejected:
                    routed.append((len(candidates), (model, name, backend, order, links,
                                                     single if alone else settings, structural,
                                                     single_memo if alone else memo), alone))
                candidates.append(candidate)
                impossible.append(bool(structural))
    _place_experts_by_load(candidates, routed, model)
    left_out = 0
    if with_hybrid:
        alone = one_at_a_time(model, "hybrid", 3) and settings.concurrency > 1
        left_out = _add_hybrids(candidates, impossible, model, orders, links, request,
                                single if alone else settings, single_memo if alone else memo,
                                forced=bool(request.strategy), alone=alone, asked=settings.concurrency,
                                bounded=len(nodes) > constants.HYBRID_EVERY_SPLIT_UP_TO)
    if request.ranks and not candidates:
        raise PlanError(f"no candidate has exactly {request.ranks} ranks on {len(nodes)} eligible node(s)")
    if request.backend and not candidates:
        raise PlanError(f"no node set supports {BACKEND_NAMES[request.backend]}: jaccl needs RDMA between every pair")
    if request.strategy and all(impossible):
        why = candidates[-1].reasons[0] if candidates else "no candidate"
        raise PlanError(f"impossible strategy: {why}")
    result = pb.Plan(candidates=candidates, reasons=skipped)
    if left_out:
        result.reasons.append(f"note: {left_out} hybrid split(s) not evaluated: even their lower bound on "
                              f"decode time cannot come within {constants.FEWER_NODES_MARGIN:.0%} of the fastest "
                              f"fitting candidate")
    chosen = choose(candidates)
    if chosen is not None:
        result.chosen.CopyFrom(chosen)
    else:
        result.reasons.append(_no_fit_summary(model, candidates))
    return result


# ------------------------------------------------------------------ inputs


def _settings(model: ModelProfile, request: pb.PlacementRequest) -> Settings:
    context = request.context_length or min(constants.DEFAULT_CONTEXT, model.max_context or constants.DEFAULT_CONTEXT)
    if model.max_context and context > model.max_context:
        raise PlanError(f"context {context} is longer than {model.model_id} allows ({model.max_context})")
    headroom = request.headroom_fraction if request.HasField("headroom_fraction") else constants.DEFAULT_HEADROOM
    if not 0 <= headroom < 1:
        raise PlanError(f"headroom must be in [0, 1), got {headroom}")
    if request.HasField("prefix_cache_bytes"):
        # Asked for as bytes of the whole model's KV; held as tokens, so that
        # every rank caches the same tokens of its own share of the KV.
        per_token = sum(part.kv_bytes("pipeline", 1, 1, 1, 1) for part in model.layers + [model.outside])
        prefix_tokens = int(request.prefix_cache_bytes // per_token) if per_token else 0
    else:
        prefix_tokens = context  # by default, one context's worth
    return Settings(context, request.concurrency or constants.DEFAULT_CONCURRENCY, headroom, prefix_tokens)


def _select_nodes(cluster: pb.Cluster, request: pb.PlacementRequest) -> tuple[list[pb.NodeProfile], list[str]]:
    """The nodes a plan may use, and why each other node is left out. One
    odd node (a name taken twice, no memory free, no bandwidth) never stops
    the rest of the cluster from being planned."""
    if not cluster.nodes:
        raise PlanError("the cluster has no nodes")
    nodes, skipped, seen_names, seen_ids = [], [], set(), set()
    for node in cluster.nodes:
        label = node.name or node.node_id
        if node.name in seen_names or node.node_id in seen_ids:
            skipped.append(f"node {label!r} left out: another node has its name or id")
        elif node.memory_usable_bytes <= 0:
            skipped.append(f"node {label!r} left out: no usable memory")
        elif not node.memory_bandwidth_bytes_per_s > 0:
            skipped.append(f"node {label!r} left out: no memory bandwidth")
        else:
            nodes.append(node)
        seen_names.add(node.name)
        seen_ids.add(node.node_id)
    if not nodes:
        raise PlanError("no node can be planned onto: " + "; ".join(skipped))
    if request.nodes:
        wanted = list(request.nodes)
        unknown = [w for w in wanted if w not in seen_names and w not in seen_ids]
        if unknown:
            raise PlanError(f"unknown node(s): {', '.join(unknown)}")
        nodes = [n for n in nodes if n.name in wanted or n.node_id in wanted]
        if not nodes:
            raise PlanError("every node asked for is left out: " + "; ".join(skipped))
    return nodes, skipped


def _backends(order: list[pb.NodeProfile], links: dict, forced: int) -> list[int]:
    ids = [n.node_id for n in order]
    rdma_everywhere = len(order) > 1 and all("jaccl" in n.backends for n in order) and all(
        (links.get((a, b)) or links.get((b, a)) or pb.Link()).rdma
        for i, a in enumerate(ids) for b in ids[i + 1:]
    )
    found = [pb.RING] + ([pb.JACCL] if rdma_everywhere else [])
    return [b for b in found if b == forced] if forced else found


def candidate_orders(nodes: list[pb.NodeProfile], links: dict, hops: dict | None = None) -> list[list[pb.NodeProfile]]:
    """Node subsets worth trying, each in one rank order: for every size, the
    fastest nodes and the roomiest nodes, ordered as a ring of nearest links."""
    by_speed = sorted(nodes, key=lambda n: (-n.memory_bandwidth_bytes_per_s, -n.memory_usable_bytes, n.name))
    by_room = sorted(nodes, key=lambda n: (-n.memory_usable_bytes, -n.memory_bandwidth_bytes_per_s, n.name))
    latency = _ring_latencies(nodes, links)
    orders, seen = [], set()
    for k in range(1, len(nodes) + 1):
        for ranking in (by_speed, by_room):
            subset = ranking[:k]
            key = frozenset(n.node_id for n in subset)
            if key in seen:
                continue
            seen.add(key)
            # The ring starts at the fastest node, equals by name: free memory
            # moves from one plan to the next, and a different rank order on
            # the same nodes would make every rank fetch its shard again.
            orders.append(_ring_order(sorted(subset, key=lambda n: (-n.memory_bandwidth_bytes_per_s, n.name)),
                                      latency))
    return orders


def _ring_latencies(nodes: list[pb.NodeProfile], links: dict) -> dict:
    """Each pair's one-way ring latency, as cost.hop gives it (a link in
    either direction, the assumed one where none was measured), read off
    the links once: n² calls of hop were a fifth of a 64-node plan."""
    ids = {n.node_id for n in nodes}
    assumed = cost.hop({}, "", "", pb.RING).latency_s
    latency: dict = {a: {} for a in ids}
    for (a, b), link in links.items():
        if a in ids and b in ids:
            latency[a][b] = link.rtt_s / 2
            if (b, a) not in links:
                latency[b][a] = link.rtt_s / 2
    return {a: {b: row.get(b, assumed) for b in ids} for a, row in latency.items()}


def _ring_order(subset: list[pb.NodeProfile], latency: dict) -> list[pb.NodeProfile]:
    by_id = {n.node_id: n for n in subset}
    order, rest = [subset[0].node_id], [n.node_id for n in subset[1:]]
    while rest:
        nearest = min(rest, key=latency[order[-1]].__getitem__)  # the first of equals, in subset order
        rest.remove(nearest)
        order.append(nearest)
    return [by_id[i] for i in order]


# ------------------------------------------------------------------ feasibility


def one_at_a_time(model: ModelProfile, strategy: str, n: int) -> bool:
    """Whether the runner will decode one sequence at a time (runner/engine.py)."""
    # A hybrid always has two pipeline stages or more.
    return model.unbatched or (strategy in ("pipeline", "hybrid") and n > 1 and model.unbatched_pipeline)


def structural_reasons(model: ModelProfile, strategy: str, n: int) -> list[str]:
    """Why a strategy cannot run on n ranks at all, whatever the memory
    (placement/strategies.py)."""
    return strategy_objects.BY_NAME[strategy].reasons(model, n)


# ------------------------------------------------------------------ one candidate


def _place_experts_by_load(candidates: list[pb.Placement], routed: list, model: ModelProfile) -> None:
    """moe_experts candidates evaluated again with experts placed by the
    measured routing load. Routing imbalance only ever slows a candidate
    (its uniform figure balances every layer perfectly, within a grain), so
    the uniform figure bounds it: candidates are refined from the fastest
    down, and one whose bound cannot reach the best fitting candidate so
    far is left uniform, with a note, since it cannot be chosen."""
    if not routed:
        return
    others = [c.predicted_decode_tokens_per_s for i, c in enumerate(candidates)
              if c.fits and i not in {j for j, _, _ in routed}]
    best = max(others, default=0.0)
    reach = 1 - constants.FEWER_NODES_MARGIN - constants.ROUTING_BOUND_SLACK
    for index, args, alone in sorted(routed, key=lambda r: -candidates[r[0]].predicted_decode_tokens_per_s):
        bound = candidates[index].predicted_decode_tokens_per_s
        if bound < best * reach:
            candidates[index].reasons.append("note: experts placed evenly in this estimate; placed by routing "
                                             "load it could only be slower, and it is not the fastest")
            continue
        refined = evaluate(*args, routing=True)
        if alone:
            refined.reasons.extend(r for r in candidates[index].reasons if r.startswith("note: decodes"))
        candidates[index] = refined
        if refined.fits:
            best = max(best, refined.predicted_decode_tokens_per_s)


def evaluate(model: ModelProfile, strategy: str, backend: int, order: list[pb.NodeProfile],
             links: dict, settings: Settings, structural: list[str], memo: dict | None = None,
             routing: bool = False) -> pb.Placement:
    """One candidate. routing: moe_experts places its experts by the
    measured routing load in memo["expert freqs"] (else uniformly)."""
    memo = {} if memo is None else memo  # rank breakdowns shared by candidates of one plan
    n = len(order)
    usable = [int(node.memory_usable_bytes * (1 - settings.headroom)) for node in order]
    placement = pb.Placement(
        model_id=model.model_id,
        strategy=STRATEGY_BY_NAME[strategy],
        backend=backend,
        context_length=settings.context,
        concurrency=settings.concurrency,
        prefix_cache_tokens=settings.prefix_tokens,
        reasons=structural,
    )
    if structural:
        # It cannot run on these ranks whatever the memory: estimating its
        # memory and speed would only offer numbers for something impossible.
        placement.rejected = True
        for rank, node in enumerate(order):
            placement.ranks.add(rank=rank, node_id=node.node_id, node_name=node.name, usable_bytes=usable[rank])
        return placement
    of = model.grains.get(strategy, 0) if n > 1 else 0
    if strategy == "pipeline":
        # mlx-lm's pipeline runs the stages from the last rank down to rank 0,
        # which runs the last layers.
        stages = pipeline_split(model, order[::-1], usable[::-1], settings, memo)
        bounds = stages[::-1] if stages else [(0, 0)] * n
        held = [(1, 1)] * n
    else:
        bounds = [(0, model.num_layers)] * n
        held = [(share, of) for share in rank_shares(model, strategy, order, usable, settings, memo)] \
            if of else [(1, 1)] * n
    layout = None
    if routing and strategy == "moe_experts" and n > 1 and memo.get("expert freqs"):
        layout = expert_layout(model, order, usable, settings, memo)
        held = [(len(ids), model.num_experts) for ids in layout.experts[0]]
    compute = []
    for rank, (node, (start, end), (share, whole)) in enumerate(zip(order, bounds, held)):
        if layout is not None:
            memory, read = _layout_memory(model, share, settings, memo, n)
        else:
            memory, read = _rank_memory(model, strategy, share, whole, start, end, settings, memo, n)
        fits = memory.total_bytes <= usable[rank]
        seconds = cost.rank_compute_s(read, end - start, node)
        compute.append(seconds)
        placement.ranks.add(
            rank=rank, node_id=node.node_id, node_name=node.name,
            layer_start=start, layer_end=end,
            share=share if of or layout else 0, share_of=whole if layout else of,
            memory=memory, usable_bytes=usable[rank], fits=fits,
            predicted_compute_s=seconds,
        )
        if not fits:
            placement.reasons.append(shortfall(rank, node.name, memory, usable[rank])
                                     + working_set_advice(node, memory.total_bytes, settings.headroom))
    ids = [node.node_id for node in order]
    hops = memo.setdefault("hops", {})
    comm = cost.communication_s(strategy, order, links, backend, model.hidden_size,
                                model.activation_bytes, model.num_layers, model.moe_layers, hops)
    if strategy == "pipeline":
        # The stages' layers run one after another; the step and the logits
        # run on every rank at once.
        fixed = [cost.rank_compute_s(model.outside.read_all, 0, node) for node in order]
        total_compute = sum(c - f for c, f in zip(compute, fixed)) + max(fixed)
    elif layout is not None:
        total_compute = _routed_compute_s(model, layout, order, compute, held)
        placement.expert_layout.CopyFrom(layout_message(layout))
        placement.predicted_routing_imbalance = layout.imbalance([cost.decode_rates(node)[0] for node in order])
    else:
        total_compute = max(compute)
    placement.predicted_compute_s = total_compute
    placement.predicted_communication_s = comm
    placement.predicted_decode_tokens_per_s = 1.0 / (total_compute + comm)
    placement.fits = not placement.reasons
    unmeasured = [f"{order[i].name}-{order[(i + 1) % n].name}" for i in range(n)
                  if n > 1 and (i < n - 1 or n > 2)
                  and not cost.hop(links, ids[i], ids[(i + 1) % n], pb.RING, hops).measured]
    if unmeasured:
        placement.reasons.append(f"note: assumed 10 GbE for unmeasured links {', '.join(unmeasured)}")
    return placement


def rank_shares(model: ModelProfile, strategy: str, order: list[pb.NodeProfile], usable: list[int],
                settings: Settings, memo: dict, start: int = 0, end: int | None = None,
                world: int | None = None) -> list[int]:
    """Each rank's grains of a cutting strategy: step times balanced at each
    node's decode rate, within each node's memory (placement/strategies.py).
    Memory and bytes read are affine in the grains held, so two exact
    breakdowns (no grains, all of them) give each rank's cap, checked
    exactly after. start..end: the layers the ranks cut (a hybrid's stage);
    there only the layers' time is balanced, since the step and the logits
    run once for the whole instance. world: the instance's ranks (default:
    these)."""
    of = model.grains[strategy]
    n = len(order)
    end = model.num_layers if end is None else end
    world = n if world is None else world
    stage = (start, end) != (0, model.num_layers) or world != n
    empty, read0 = _rank_memory(model, strategy, 0, of, start, end, settings, memo, world)
    full, read1 = _rank_memory(model, strategy, of, of, start, end, settings, memo, world)
    per_grain_bytes = (full.total_bytes - empty.total_bytes) / of
    per_grain_read = (read1 - read0) / of
    fixed, slope, caps = [], [], []
    for node, room in zip(order, usable):
        rate, step, layer = cost.decode_rates(node)
        fixed.append(((read0 - model.outside.read_all) / rate if stage else read0 / rate + step)
                     + (end - start) * layer)
        slope.append(per_grain_read / rate)
        if per_grain_bytes <= 0:
            cap = of if empty.total_bytes <= room else 0
        else:
            cap = max(0, min(of, math.floor((room - empty.total_bytes) / per_grain_bytes)))
            while cap > 0 and _rank_memory(model, strategy, cap, of, start, end, settings,
                                           memo, world)[0].total_bytes > room:
                cap -= 1
        caps.append(cap)
    shares, _ = strategy_objects.balance(of, fixed, slope, caps)
    even = shares_even(of, len(order))
    if shares != even and all(s <= c for s, c in zip(even, caps)):
        slowest = max(f + k * s for f, k, s in zip(fixed, slope, shares))
        if max(f + k * s for f, k, s in zip(fixed, slope, even)) <= slowest * (1 + constants.EVEN_SHARES_MARGIN):
            return even
    return shares


# ------------------------------------------------------------------ hybrid


def _add_hybrids(candidates: list[pb.Placement], impossible: list[bool], model: ModelProfile,
                 orders: list[list[pb.NodeProfile]], links: dict, request: pb.PlacementRequest,
                 settings: Settings, memo: dict, forced: bool, alone: bool, asked: int, bounded: bool = True) -> int:
    """Hybrid candidates, appended in enumeration order: every order of 3+
    nodes cut into 2..n-1 stages at its slowest links (hybrid.stage_splits).
    A split is evaluated unless a lower bound on its decode time (exact
    fixed part and sends, no all-sums, the layers at the rate-weighted
    bound) proves that it cannot come within FEWER_NODES_MARGIN of the
    fastest fitting candidate, the only ones choose() may take; splits are
    evaluated from the best bound down so that the fastest is known early.
    forced: hybrid was asked for, so refusals are listed. bounded: False
    evaluates every split (a small cluster). Returns how many splits were
    left out."""
    hops = memo.setdefault("hops", {})
    message = model.hidden_size * model.activation_bytes
    reach = (1 - constants.FEWER_NODES_MARGIN) * (1 - 1e-9)
    best = max((c.predicted_decode_tokens_per_s for c in candidates if c.fits), default=0.0) if bounded else 0.0
    found, left_out, listed, per_node = [], 0, [], {}
    for order in orders:
        n = len(order)
        if (request.ranks and n != request.ranks) or (n == 1 and not forced):
            continue
        refusal = structural_reasons(model, "hybrid", n)
        if refusal:
            if forced:
                listed.append(_refused_hybrid(model, order, [], refusal, settings))
            continue
        if "hybrid layers" not in memo:
            memo["hybrid layers"] = hybrid.layer_sums(model, strategy_objects.inner_of(model).name, settings,
                                                      canary_bytes(model))
        sums = memo["hybrid layers"]
        # Orders share their nodes: each node's figures once per plan.
        figures_of = [per_node[node.node_id] if node.node_id in per_node
                      else per_node.setdefault(node.node_id, _hybrid_node_figures(model, node, settings))
                      for node in order]
        rates = [f[0] for f in figures_of]
        usable = [f[1] for f in figures_of]
        step = max(f[2] for f in figures_of)
        ids = [node.node_id for node in order]
        splits = None
        for backend in _backends(order, links, request.backend):
            each = cost.collective_s(order)
            ring = cost.ring_hops(ids, links, backend, hops)
            edges = [cost.send_s(h, message, 0.0) for h in ring[:n - 1]]  # rank i to i+1
            # Every split pays the step, the all-gather and at least one send.
            fixed = step + cost.all_gather_s(ring, message, each)
            if best and 1 / (fixed + min(edges) + each + hybrid.order_bound(sums, rates, min(edges))) < best * reach:
                left_out += n - 2
                continue
            figures = hybrid.OrderFigures(rates, edges, usable)
            if splits is None:  # cut where the links are slow, whichever backend
                splits = hybrid.stage_splits([cost.send_s(cost.hop(links, a, b, pb.RING, hops), message, 0.0)
                                              for a, b in zip(ids, ids[1:])])
            for stage_ranks in splits:
                why = strategy_objects.HYBRID.split_reasons(model, stage_ranks)
                if why:
                    if forced:
                        listed.append(_refused_hybrid(model, order, stage_ranks, why, settings, backend))
                    continue
                bound = fixed + hybrid.split_bound(sums, figures, stage_ranks, each)
                if best and 1 / bound >= best * reach:  # worth the tighter bound
                    bound = fixed + hybrid.split_bound(sums, figures, stage_ranks, each, per_stage=True)
                index = len(listed)
                listed.append(None)
                found.append((bound, index, (model, backend, order, stage_ranks, links, settings, memo)))
    for bound, index, args in sorted(found, key=lambda f: (f[0], f[1])):
        if best and 1 / bound < best * reach:
            left_out += 1
            continue
        candidate = evaluate_hybrid(*args)
        if alone and not candidate.rejected:
            candidate.reasons.append(f"note: decodes one sequence at a time (concurrency 1, not {asked}): "
                                     f"{model.model_id}'s caches cannot be batched"
                                     + (" across pipeline stages" if not model.unbatched else ""))
        listed[index] = candidate
        if candidate.fits and bounded:
            best = max(best, candidate.predicted_decode_tokens_per_s)
    for candidate in listed:
        if candidate is not None:
            candidates.append(candidate)
            impossible.append(candidate.rejected)
    return left_out


def _hybrid_node_figures(model: ModelProfile, node: pb.NodeProfile, settings: Settings) -> tuple:
    """((bytes/s, seconds per layer), usable bytes, the fixed per-step time) of one node."""
    rate, _, layer = cost.decode_rates(node)
    return ((rate, layer), int(node.memory_usable_bytes * (1 - settings.headroom)),
            cost.rank_compute_s(model.outside.read_all, 0, node))


def _cut(items: list, stage_ranks: list[int]) -> list[list]:
    out, start = [], 0
    for size in stage_ranks:
        out.append(items[start:start + size])
        start += size
    return out


def _refused_hybrid(model: ModelProfile, order: list[pb.NodeProfile], stage_ranks: list[int], reasons: list[str],
                    settings: Settings, backend: int = pb.RING) -> pb.Placement:
    inner = strategy_objects.inner_of(model)
    placement = pb.Placement(model_id=model.model_id, strategy=pb.HYBRID,
                             stage_strategy=STRATEGY_BY_NAME[inner.name] if inner else pb.STRATEGY_UNSPECIFIED,
                             stage_ranks=stage_ranks, backend=backend, context_length=settings.context,
                             concurrency=settings.concurrency, prefix_cache_tokens=settings.prefix_tokens,
                             reasons=reasons, rejected=True)
    for rank, node in enumerate(order):
        placement.ranks.add(rank=rank, node_id=node.node_id, node_name=node.name,
                            usable_bytes=int(node.memory_usable_bytes * (1 - settings.headroom)))
    return placement


def evaluate_hybrid(model: ModelProfile, backend: int, order: list[pb.NodeProfile], stage_ranks: list[int],
                    links: dict, settings: Settings, memo: dict) -> pb.Placement:
    """One hybrid candidate: stages of `stage_ranks` ranks in rank order
    (stage 0 runs the last layers), each stage's layers balanced by its
    speed within its ranks' memory (hybrid_split), then each stage's
    shares of its cut (sums.inner: moe_tensor or tensor) over its layers
    (rank_shares), each rank's memory exact (rank_memory over the stage's
    layers, its share, the instance's ranks for the canary)."""
    sums = memo["hybrid layers"]
    n, inner, of = len(order), sums.inner, sums.of
    usable = [int(node.memory_usable_bytes * (1 - settings.headroom)) for node in order]
    placement = pb.Placement(model_id=model.model_id, strategy=pb.HYBRID, stage_strategy=STRATEGY_BY_NAME[inner],
                             stage_ranks=stage_ranks, backend=backend, context_length=settings.context,
                             concurrency=settings.concurrency, prefix_cache_tokens=settings.prefix_tokens)
    stages, rooms = _cut(order, stage_ranks), _cut(usable, stage_ranks)
    hops = memo.setdefault("hops", {})
    message = model.hidden_size * model.activation_bytes
    shapes = [hybrid.Stage.of(tuple((rate, layer) for rate, _, layer in map(cost.decode_rates, nodes)), tuple(room),
                              cost.chain_all_sum_s([cost.hop(links, a.node_id, b.node_id, backend, hops)
                                                    for a, b in zip(nodes, nodes[1:])], message,
                                                   cost.collective_s(nodes)) if len(nodes) > 1 else 0.0)
              for nodes, room in zip(stages, rooms)]
    bounds = hybrid_split(model, shapes, sums, memo)
    stage_times, fixed, all_sums, rank = [], [], [], 0
    for nodes, room, (start, end) in zip(stages, rooms, bounds):
        shares = [of] if len(nodes) == 1 else _stage_shares(model, inner, nodes, room, start, end, n, settings,
                                                             memo)
        slowest = 0.0
        for node, u, share in zip(nodes, room, shares):
            memory, read = _rank_memory(model, inner, share, of, start, end, settings, memo, n)
            seconds = cost.rank_compute_s(read, end - start, node)
            fixed.append(cost.rank_compute_s(model.outside.read_all, 0, node))
            slowest = max(slowest, seconds - fixed[-1])
            fits = memory.total_bytes <= u
            placement.ranks.add(rank=rank, node_id=node.node_id, node_name=node.name, layer_start=start,
                                layer_end=end, share=share, share_of=of, memory=memory, usable_bytes=u, fits=fits,
                                predicted_compute_s=seconds)
            if not fits:
                placement.reasons.append(shortfall(rank, node.name, memory, u)
                                         + working_set_advice(node, memory.total_bytes, settings.headroom))
            rank += 1
        stage_times.append(slowest)
        all_sums.append(sums.all_sums[end] - sums.all_sums[start])
    # The stages run one after another; the step and the logits on every rank at once.
    placement.predicted_compute_s = sum(stage_times) + max(fixed)
    placement.predicted_communication_s = cost.hybrid_communication_s(
        stages, links, backend, model.hidden_size, model.activation_bytes, all_sums, hops)
    placement.predicted_decode_tokens_per_s = 1.0 / (placement.predicted_compute_s
                                                     + placement.predicted_communication_s)
    placement.fits = not placement.reasons
    ids = [node.node_id for node in order]
    unmeasured = [f"{order[i].name}-{order[(i + 1) % n].name}" for i in range(n)
                  if not cost.hop(links, ids[i], ids[(i + 1) % n], pb.RING, hops).measured]
    if unmeasured:
        placement.reasons.append(f"note: assumed 10 GbE for unmeasured links {', '.join(unmeasured)}")
    return placement


def _stage_shares(model: ModelProfile, inner: str, nodes: list[pb.NodeProfile], room: list[int], start: int,
                  end: int, world: int, settings: Settings, memo: dict) -> list[int]:
    """A stage's shares of its cut over its layers, once per plan for the
    same ranks and layers (splits of one order, and its backends, share
    stages)."""
    key = ("hybrid shares", tuple(node.node_id for node in nodes), tuple(room), start, end, world)
    if key not in memo:
        memo[key] = rank_shares(model, inner, nodes, room, settings, memo, start, end, world=world)
    return memo[key]


def _stage_curves(stage: hybrid.Stage, sums: hybrid.LayerSums, memo: dict) -> list[list[float]]:
    key = ("hybrid curves", stage)
    if key not in memo:
        memo[key] = stage.curves(sums)
    return memo[key]


def hybrid_split(model: ModelProfile, stages: list[hybrid.Stage], sums: hybrid.LayerSums,
                 memo: dict) -> list[tuple[int, int]]:
    """Contiguous layer ranges per stage, in rank order (stage 0 the last
    layers), that minimise the slowest stage's time within each stage's
    memory, as pipeline_split does for nodes: a stage's time is its
    rate-weighted time with balanced shares (hybrid.Stage). When memory
    cannot be met, the time-balanced split is returned so that the
    shortfall can be reported."""
    key = ("hybrid split", tuple(stages))
    if key in memo:
        return memo[key]
    k, layers = len(stages), model.num_layers
    # The last stage runs the first layers. Per stage: its running times
    # (hybrid.Stage.curves) and, per first and last layer it may take, the
    # most layers its memory holds (memory does not depend on the limit).
    # Both once per plan: the splits of many orders share their stages.
    ascending = [(stage, _stage_curves(stage, sums, memo), memo.setdefault(("hybrid held", stage), {}))
                 for stage in stages[::-1]]

    def most_held(stage, start, last, known):
        if (start, last) not in known:
            end, high = start, last
            while end < high:  # memory grows with the layers
                mid = (end + high + 1) // 2
                if stage.fits(sums, start, mid):
                    end = mid
                else:
                    high = mid - 1
            known[start, last] = end
        return known[start, last]

    def assign(limit, respect_memory):
        bounds, start = [], 0
        for i, (stage, curves, known) in enumerate(ascending):
            last = layers - (k - i - 1)
            # Each stage takes as many layers as stay within the limit and its
            # memory, the last stage the rest.
            if i == k - 1:
                end = last
                if max(c[end] - c[start] for c in curves) > limit:
                    return None
            else:
                end = min(last, *(bisect_right(c, c[start] + limit) - 1 for c in curves))
            if respect_memory:
                end = min(end, most_held(stage, start, last, known)) if i < k - 1 else end
                if i == k - 1 and not stage.fits(sums, start, end):
                    return None
            if end <= start:
                return None
            bounds.append((start, end))
            start = end
        return bounds[::-1]

    # No stage does a layer faster than its cheapest kind of layer at its
    # rate-weighted time, so within T the stages together do at most
    # T * sum(1 / that): the slowest stage takes at least layers / sum.
    cheapest = [min((len(s.rates) * ns + cut) / s.total_rate + s.layer_s + chain * s.all_sum_s
                    for _, ns, cut, chain, _, _ in sums.groups)
                for s in stages]
    floor = layers / sum(1 / t for t in cheapest)
    # A stage's time is itself a heuristic (rate-weighted, before shares):
    # a tenth of a percent is as close as it is worth bisecting.
    memo[key] = _bisect_split(assign, max(s.time(sums, 0, layers) for s in stages), floor * (1 - 1e-9), 1e-3)
    return memo[key]


# ------------------------------------------------------------------ experts by routing load


def expert_frequencies(model: ModelProfile, counts: "pb.ExpertCounts | None") -> list:
    """Per MoE layer, in model order, the fraction of routed slots each
    expert took; [] when nothing was measured. A layer with no counts is
    uniform."""
    if counts is None or not model.num_experts or not model.moe_layer_ids:
        return []
    by_layer = {c.layer: list(c.counts) for c in counts.layers if len(c.counts) == model.num_experts}
    if not any(sum(v) for v in by_layer.values()):
        return []
    return [experts.frequencies(by_layer.get(layer, [0] * model.num_experts), model.num_experts)
            for layer in model.moe_layer_ids]


def expert_layout(model: ModelProfile, order: list[pb.NodeProfile], usable: list[int], settings: Settings,
                  memo: dict) -> experts.Layout:
    """Experts per rank placed by measured routing load: each rank's count
    (the same in every MoE layer) balances the uniform step time within its
    memory, as shares do; then, where memory leaves room and the placement
    decodes several sequences at once, replica slots for the hottest
    experts, kept only when they cut the batched routing imbalance by
    REPLICA_GAIN; then which experts, per layer (placement/experts.py)."""
    n, total = len(order), model.num_experts
    rates = [cost.decode_rates(node) for node in order]
    key = ("expert layout", tuple(rates), tuple(usable), settings.concurrency)
    if key in memo:
        return memo[key]
    empty, read0 = _layout_memory(model, 0, settings, memo, n)
    one, read1 = _layout_memory(model, 1, settings, memo, n)
    per_expert, per_read = one.total_bytes - empty.total_bytes, read1 - read0
    fixed = [read0 / rate + step + model.num_layers * layer for rate, step, layer in rates]
    slope = [per_read / rate for rate, _, _ in rates]
    caps = [total if per_expert <= 0 else max(0, min(total, (room - empty.total_bytes) // per_expert))
            for room in usable]
    freqs = memo["expert freqs"]
    speed = [rate for rate, _, _ in rates]
    counts, _ = strategy_objects.balance(total, fixed, slope, caps)
    best = experts.layout(freqs, model.moe_layer_ids, counts, speed)
    spare = sum(max(0, c - k) for c, k in zip(caps, counts))
    if settings.concurrency > 1 and spare:
        plain = best.imbalance(speed, single=False)
        for fraction in constants.REPLICA_FRACTIONS:
            extra = min(spare, max(1, int(total * fraction)), total * (n - 1))
            more, _ = strategy_objects.balance(total + extra, fixed, slope, [min(c, total) for c in caps])
            if sum(more) != total + extra or any(m > c for m, c in zip(more, caps)):
                continue
            tried = experts.layout(freqs, model.moe_layer_ids, more, speed)
            if tried.imbalance(speed, single=False) <= plain * (1 - constants.REPLICA_GAIN):
                best = tried
                break
    memo[key] = best
    return best


def _layout_memory(model: ModelProfile, count: int, settings: Settings, memo: dict,
                   ranks: int) -> tuple[pb.MemoryBreakdown, float]:
    """A moe_experts rank holding `count` whole routed experts of every MoE
    layer under an expert layout: the routed experts are count / E of
    their bytes, and a shared expert is cut evenly over the ranks
    (runner/strategies.py), whatever the counts."""
    key = ("layout memory", count, ranks)
    if key in memo:
        return memo[key]
    memory, read = rank_memory(model, "moe_experts", model.num_experts, 0, model.num_layers, settings,
                               share=(count, model.num_experts), ranks=ranks)
    shared = sum(p.split["moe_experts"][pb.SHARED_EXPERTS] for p in model.layers + [model.outside])
    if shared:
        even = shared // ranks
        wrong = shared * count // model.num_experts
        memory.shared_experts_bytes += even - wrong
        memory.weights_bytes += even - wrong
        memory.total_bytes += even - wrong
    memo[key] = (memory, read)
    return memo[key]


def _routed_compute_s(model: ModelProfile, layout: experts.Layout, order: list[pb.NodeProfile],
                      compute: list[float], held: list[tuple[int, int]]) -> float:
    """One decode step under an expert layout: every rank's work outside
    the routed experts at once (its computed time less its uniform share of
    the routed reads), then, MoE layer by MoE layer, the slowest rank's
    routed reads, since the ranks meet at each layer's all-sum. One token
    reads each of its k experts once, expert e with probability k·f[e]."""
    total, k = model.num_experts, max(model.experts_per_token, 1)
    rates = [cost.decode_rates(node)[0] for node in order]
    routed = [model.layers[i].full[pb.ROUTED_EXPERTS] for i in layout.layers]
    uniform = [sum(k * count / total * b / total for b in routed) / rate
               for (count, _), rate in zip(held, rates)]
    rest = max(c - u for c, u in zip(compute, uniform))
    return rest + sum(max(k * load * b / total / rate for load, rate in zip(layer, rates))
                      for layer, b in zip(layout.single, routed))


def layout_message(layout: experts.Layout) -> pb.ExpertLayout:
    out = pb.ExpertLayout()
    for layer, per_rank in zip(layout.layers, layout.experts):
        entry = out.layers.add(layer=layer)
        for ids in per_rank:
            entry.ranks.add(experts=ids)
    return out


def _rank_memory(model: ModelProfile, strategy: str, share: int, of: int, start: int, end: int,
                 settings: Settings, memo: dict, ranks: int) -> tuple[pb.MemoryBreakdown, float]:
    key = (strategy, share, of, start, end, ranks > 1)
    if key not in memo:
        memo[key] = rank_memory(model, strategy, of, start, end, settings, share=(share, of), ranks=ranks)
    return memo[key]


def rank_memory(model: ModelProfile, strategy: str, n: int, start: int, end: int,
                settings: Settings, share: tuple[int, int] | None = None,
                ranks: int | None = None) -> tuple[pb.MemoryBreakdown, float]:
    """Per-rank breakdown and the bytes one decode step reads there, for a
    rank holding `share` = (grains, of) of what the strategy cuts (None:
    1 of n, an even split). Every rank holds the embedding, final norm and
    lm_head: pipeline stages all compute the logits from the gathered last
    hidden state, as mlx-lm does. ranks: the instance's rank count (None: n),
    for the canary's share of the overhead."""
    held, of = share if share is not None else (1, n)
    if strategy not in SPLITTING:
        held, of = 1, 1
    # Sums over layers start..end and the non-layer tensors
    # (Part.weights/read/kv_bytes, summed once per plan: range_sums).
    running, outside = range_sums(model, strategy, of, settings.context, settings.concurrency)
    v = [b - a + o for a, b, o in zip(running[start], running[end], outside)]
    cut = held != of
    by_class = {c: v[FULL + i] - v[SPLIT + i] + v[SPLIT + i] * held // of if cut else v[FULL + i]
                for i, c in enumerate(CLASSES)}
    fraction = held / of
    kv = v[KV_FIXED] + v[KV_CUT] * fraction
    # This rank's share of the prefix cache's tokens (no window cap: an
    # entry keeps every token it was inserted with).
    prefix = (v[KV1_FIXED] + v[KV1_CUT] * fraction) * settings.prefix_tokens
    read = v[READ_ALL] - v[READ_SPLIT] + v[READ_SPLIT] * fraction if cut else v[READ_ALL]
    # A decode step also reads this rank's KV cache for one sequence.
    read += kv / settings.concurrency
    weights = sum(by_class.values())
    overhead = overhead_bytes(model, strategy, held, settings.context, of, ranks=n if ranks is None else ranks)
    memory = pb.MemoryBreakdown(
        weights_bytes=weights, kv_cache_bytes=int(kv), overhead_bytes=overhead, prefix_cache_bytes=int(prefix),
        total_bytes=weights + int(kv) + int(prefix) + overhead,
        **{CLASS_FIELD[c]: v for c, v in by_class.items()},
    )
    return memory, read


def overhead_bytes(model: ModelProfile, strategy: str, share: int, context: int, of: int | None = None,
                   ranks: int = 1) -> int:
    """Process base, the activations of one prefill chunk (never longer than
    the context), and the runner's canary: on more than one rank it reads
    the checkpoint's uncut parts a second time while it warms up, one at a
    time (the embedding and lm_head together, then one layer), so the widest
    of them, with its float32 copies, is added (canary_bytes). share of `of` grains (of None: share is n, an even
    split); ranks: how many ranks the instance has."""
    held, of = (1, share) if of is None else (share, of)
    # moe_experts computes every routed slot of a token on each rank (the
    # slots of other ranks' experts masked out): its width is not cut.
    width = model.hidden_size + (model.max_intermediate * held // of if strategy in ("tensor", "moe_tensor") and of
                                 else model.max_intermediate)
    tokens = min(context, constants.PREFILL_CHUNK_TOKENS)
    activations = tokens * width * constants.ACTIVATION_BYTES_PER_TOKEN_ELEMENT
    return int(constants.PROCESS_BASE_BYTES + activations + (canary_bytes(model) if ranks > 1 else 0))


# The canary's probes are float32 (runner/canary.py): MLX widens a part's
# half-precision weights (a quantized matrix's scales and biases) to float32
# while it computes, one side at a time. Measured in one process on
# matrix-moe, the widest layer in bf16 peaked at the uncut layer plus 1.93x
# its half-precision bytes (2x: every widened weight lives until the check's
# eval ends); see docs/proofs.md.
WIDENED_PER_HALF_BYTE = 2


def canary_bytes(model: ModelProfile) -> int:
    """The widest uncut part the canary holds at once (runner/canary.py),
    with the float32 copies of its half-precision weights. Kept with the
    model's other derived sums: every rank of every candidate asks."""
    if "canary bytes" not in model.sums:
        model.sums["canary bytes"] = max(_canary_part_bytes(p) for p in [*model.layers, model.outside])
    return model.sums["canary bytes"]


def _canary_part_bytes(part) -> int:
    return sum(part.full.values()) + WIDENED_PER_HALF_BYTE * part.half


def pipeline_split(model: ModelProfile, order: list[pb.NodeProfile], usable: list[int],
                   settings: Settings, memo: dict | None = None) -> list[tuple[int, int]] | None:
    """Contiguous layer ranges that minimise the slowest stage's predicted
    time, subject to each node's memory. When memory cannot be met, the
    time-balanced split is returned so that the shortfall can be reported.
    memo: shared by the candidates of one plan: the per-layer bytes once,
    and the split of every sequence of (rates, memory) already solved."""
    memo = {} if memo is None else memo
    n, layers = len(order), model.num_layers
    if "pipeline layers" not in memo:
        layer_mem = [sum(p.full.values()) + p.kv_bytes("pipeline", 1, 1, settings.context, settings.concurrency)
                     + p.kv_bytes("pipeline", 1, 1, 1, 1) * settings.prefix_tokens for p in model.layers]
        layer_read = [p.read_all + p.kv_bytes("pipeline", 1, 1, settings.context, 1) for p in model.layers]
        fixed_mem = overhead_bytes(model, "pipeline", 1, settings.context) + sum(model.outside.full.values())
        memo["pipeline layers"] = (_prefix(layer_mem), _prefix(layer_read), fixed_mem)
    mem_prefix, read_prefix, fixed_mem = memo["pipeline layers"]
    rates = [cost.decode_rates(node) for node in order]
    key = ("pipeline split", tuple(rates), tuple(usable))
    if key in memo:
        return memo[key]
    fixed_time = [cost.rank_compute_s(model.outside.read_all, 0, node) for node in order]
    per_byte = [1.0 / rate for rate, _, _ in rates]
    per_layer = [layer for _, _, layer in rates]
    # The canary's uncut part, on more than one stage (not in the memo: n varies).
    room = [u - fixed_mem - (canary_bytes(model) if n > 1 else 0) for u in usable]

    def stage_time(r, a, b):
        return fixed_time[r] + (read_prefix[b] - read_prefix[a]) * per_byte[r] + (b - a) * per_layer[r]

    def assign(limit, respect_memory):
        bounds, start = [], 0
        for r in range(n):
            last = layers - (n - r - 1)
            end = last if r == n - 1 else start + 1
            # The stage's time and memory grow with each layer it takes.
            budget = limit - fixed_time[r] + read_prefix[start] * per_byte[r] + start * per_layer[r]
            cap = room[r] + mem_prefix[start] if respect_memory else float("inf")
            b, layer = per_byte[r], per_layer[r]
            while end < last and read_prefix[end + 1] * b + (end + 1) * layer <= budget \
                    and mem_prefix[end + 1] <= cap:
                end += 1
            if stage_time(r, start, end) > limit or (respect_memory and mem_prefix[end] > cap):
                return None
            bounds.append((start, end))
            start = end
        return bounds

    # No split beats every stage paying its fixed time, nor the layers' bytes
    # read at all the ranks' rates at once: the bisection starts there.
    bound = max(max(fixed_time), read_prefix[layers] / sum(1.0 / b for b in per_byte))
    memo[key] = _bisect_split(assign, max(stage_time(r, 0, layers) for r in range(n)), bound * (1 - 1e-9))
    return memo[key]


def _bisect_split(assign, high: float, low_bound: float = 0.0, tolerance: float = 1e-4):
    """The split of the smallest slowest-stage time found by bisection,
    from below a bound no split can beat."""
    for respect_memory in (True, False):
        if assign(high, respect_memory) is None:
            continue
        # Bracket the optimum from the bound up: it is usually close to it.
        low, top = low_bound, high
        for factor in (1.05, 1.25, 2.0):
            if low_bound * factor >= top:
                break
            if assign(low_bound * factor, respect_memory) is None:
                low = low_bound * factor
            else:
                high = low_bound * factor
                break
        for _ in range(40):
            mid = (low + high) / 2
            if assign(mid, respect_memory) is None:
                low = mid
            else:
                high = mid
            if high - low <= high * tolerance:
                break
        return assign(high, respect_memory)
    return None


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


# ------------------------------------------------------------------ choice


def choose(candidates: list[pb.Placement]) -> pb.Placement | None:
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    best = max(c.predicted_decode_tokens_per_s for c in fitting)
    close = [c for c in fitting if c.predicted_decode_tokens_per_s >= best * (1 - constants.FEWER_NODES_MARGIN)]
    return min(close, key=lambda c: (len(c.ranks), -c.predicted_decode_tokens_per_s))


def shortfall(rank: int, node: str, memory: pb.MemoryBreakdown, usable: int) -> str:
    parts = [(getattr(memory, CLASS_FIELD[c]), CLASS_LABEL[c]) for c in CLASSES]
    parts += [(memory.kv_cache_bytes, "KV"), (memory.prefix_cache_bytes, "prefix cache"),
              (memory.overhead_bytes, "overhead")]
    shown = ", ".join(f"{label} {v / 1e9:.1f}" for v, label in sorted(parts, reverse=True) if v >= 0.05e9)
    return f"rank {rank} on {node} needs {gb(memory.total_bytes)} ({shown}) but {gb(usable)} is usable"


def working_set_advice(node: pb.NodeProfile, needed: int, headroom: float) -> str:
    """On a Mac whose memory is capped by Metal's recommended working set, the
    wired limit that would let the rank fit: the current limit raised by the
    shortfall (reservations of other ranks already come off usable)."""
    working_set = node.gpu_working_set_bytes
    if not working_set:
        return ""
    text = f"; Metal's recommended working set caps {node.name} at {gb(working_set)}"
    limit = working_set + needed / (1 - headroom) - node.memory_usable_bytes
    mb = wired_limit_mb(limit, node.memory_total_bytes)
    if mb is None:
        return text + f", and no wired limit leaves macOS enough of its {gb(node.memory_total_bytes)}"
    return text + f": `{sysctl(mb)}` would let the rank fit"


def _no_fit_summary(model: ModelProfile, candidates: list[pb.Placement]) -> str:
    if not candidates:
        return f"no candidate for {model.model_id}"
    if all(c.rejected for c in candidates):
        return f"nothing can run {model.model_id} here: {candidates[0].reasons[0]}"
    best = min((c for c in candidates if not c.rejected), key=lambda c: sum(max(0, r.memory.total_bytes - r.usable_bytes) for r in c.ranks))
    return f"nothing fits {model.model_id}; closest: {STRATEGY_NAMES[best.strategy]} on {len(best.ranks)} node(s): {best.reasons[0] if best.reasons else ''}"
