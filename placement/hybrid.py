"""Hybrid placements: pipeline across stages of neighbouring ranks, a cut
inside each stage of two or more ranks (placement/strategies.py HYBRID):
moe_tensor for an MoE model, tensor for a dense one (profile.hybrid_inner).

The pieces that do not build a Placement: which stages an order of nodes is
cut into, per-layer sums of what a rank of the cut holds and reads, a
stage's time and memory for a layer range (what the layer split balances),
and lower bounds on a split's decode time, which let the planner leave out
splits that cannot be chosen. Pure: no I/O, no clocks.

A stage's ranks each hold x_r of `of` grains of every cut tensor over the
stage's layers. Rank r's time for its layers is
    L_r = (ns + s * x_r / of) / rate_r + n * layer_r
(ns: bytes read that are not cut, s: bytes read that are, n: layers), and
the stage takes max_r L_r. Weighting by rate_r / R (R = sum of the rates)
and summing x_r to `of` gives max_r L_r >= (g * ns + s) / R + n * lambda,
lambda = sum(layer_r * rate_r) / R, whatever the shares: the bound below and
the time the layer split balances both rest on it.
"""

import math
from dataclasses import dataclass

from . import constants
from .profile import CLASSES, FULL, KV1_CUT, KV1_FIXED, KV_CUT, KV_FIXED, READ_ALL, READ_SPLIT, SPLIT, range_sums

def stage_splits(edges: list[float]) -> list[list[int]]:
    """Ranks per stage for every number of stages 2..n-1, from the seconds
    one message takes on each link between neighbouring ranks (edges[i]:
    rank i to i+1): the order is cut at its k-1 slowest links, so that the
    slow links carry one send per token and the fast ones the all-sums.
    Every split of n >= 3 ranks into at most n-1 stages has a stage of 2+
    ranks."""
    n = len(edges) + 1
    if n < 3:
        return []
    slowest = sorted(range(n - 1), key=lambda i: (-edges[i], i))
    splits = []
    for k in range(2, n):
        cuts = [-1, *sorted(slowest[:k - 1]), n - 1]
        splits.append([b - a for a, b in zip(cuts, cuts[1:])])
    return splits


@dataclass(frozen=True)
class LayerSums:
    """Running sums over the layers of a rank's bytes under the stage's cut
    (`inner`): read and held, each split into what is not cut (ns) and what
    is (s, all grains; under tensor the KV cache too, by KV-head groups),
    and the chain all-sums a stage of 2+ ranks pays (moe_tensor: one per
    MoE layer; tensor: two per layer, after attention and after the MLP);
    plus what every rank holds whatever its layers."""

    inner: str
    of: int
    read_ns: list
    read_s: list
    mem_ns: list
    mem_s: list
    all_sums: list
    # Per kind of layer, for the bounds: (layers, ns read, s read, all-sums,
    # ns held, s held), each the least of its kind.
    groups: tuple
    outside_read: float  # read by every rank each step (embedding row, lm_head)
    outside_split_read: float  # of which cut (0 unless the cut takes a non-layer tensor)
    fixed_mem: float  # outside tensors, process base, prefill activations outside the cut width, the canary
    per_grain_mem: float  # prefill activations per grain of the cut width
    least_fixed_mem: float = 0.0  # fixed_mem less what of the outside tensors is cut (a rank holds at least this)


def layer_sums(model, inner: str, settings, canary: int) -> LayerSums:
    """model: a ModelProfile; inner: the cut inside the stages; settings:
    the plan's Settings; canary: the canary's bytes (every hybrid rank is
    one of 3+, so it pays them)."""
    of = model.grains[inner]
    running, outside = range_sums(model, inner, of, settings.context, settings.concurrency)
    n_classes = len(CLASSES)

    # KV_CUT is what a rank holds a share of (tensor's KV-head groups; none
    # under moe_tensor), as rank_memory reads it.
    def ns_mem(row):
        return (sum(row[FULL + i] - row[SPLIT + i] for i in range(n_classes)) + row[KV_FIXED]
                + row[KV1_FIXED] * settings.prefix_tokens)

    def s_mem(row):
        return (sum(row[SPLIT + i] for i in range(n_classes)) + row[KV_CUT]
                + row[KV1_CUT] * settings.prefix_tokens)

    tokens = min(settings.context, constants.PREFILL_CHUNK_TOKENS)
    activation = tokens * constants.ACTIVATION_BYTES_PER_TOKEN_ELEMENT
    layer_ids = set(model.moe_layer_ids)
    all_sums = [0]
    for i in range(model.num_layers):
        all_sums.append(all_sums[-1] + (2 if inner == "tensor" else int(i in layer_ids)))
    # A decode step reads one sequence's KV cache: cut as it is held.
    read_ns = [r[READ_ALL] - r[READ_SPLIT] + r[KV_FIXED] / settings.concurrency for r in running]
    read_s = [r[READ_SPLIT] + r[KV_CUT] / settings.concurrency for r in running]
    mem_ns = [ns_mem(r) for r in running]
    mem_s = [s_mem(r) for r in running]
    kinds: dict = {}
    for i in range(model.num_layers):
        figures = (read_ns[i + 1] - read_ns[i], read_s[i + 1] - read_s[i], all_sums[i + 1] - all_sums[i],
                   mem_ns[i + 1] - mem_ns[i], mem_s[i + 1] - mem_s[i])
        key = tuple(int(f) for f in figures)
        count, *least = kinds.get(key, (0, *figures))
        kinds[key] = (count + 1, *map(min, least, figures))  # the least of a kind: a bound stays a bound
    return LayerSums(
        inner=inner,
        of=of,
        groups=tuple(kinds[key] for key in sorted(kinds)),
        read_ns=read_ns,
        read_s=read_s,
        mem_ns=mem_ns,
        mem_s=mem_s,
        all_sums=all_sums,
        outside_read=outside[READ_ALL],
        outside_split_read=outside[READ_SPLIT],
        fixed_mem=(ns_mem(outside) + s_mem(outside)
                   + constants.PROCESS_BASE_BYTES + activation * model.hidden_size + canary),
        least_fixed_mem=ns_mem(outside) + constants.PROCESS_BASE_BYTES + activation * model.hidden_size + canary,
        per_grain_mem=activation * model.max_intermediate / of if of else 0.0,
    )


@dataclass(frozen=True)
class Stage:
    """A stage's ranks as the layer split sees them."""

    rates: tuple  # (bytes/s, seconds per layer) per rank
    rooms: tuple  # usable bytes per rank
    total_rate: float = 0.0
    layer_s: float = 0.0  # lambda: the ranks' per-layer costs weighted by rate
    slowest_rate: float = 0.0
    same_layer_s: float | None = None  # every rank's per-layer cost, when they are the same
    least_room: float = 0.0
    all_sum_s: float = 0.0  # the stage's chain all-sum, paid LayerSums.all_sums times

    @classmethod
    def of(cls, rates: tuple, rooms: tuple, all_sum_s: float = 0.0) -> "Stage":
        total = sum(rate for rate, _ in rates)
        layer_costs = {layer for _, layer in rates}
        return cls(rates, rooms, total, sum(layer * rate for rate, layer in rates) / total,
                   min(rate for rate, _ in rates), layer_costs.pop() if len(layer_costs) == 1 else None,
                   min(rooms), all_sum_s)

    def time(self, sums: LayerSums, a: int, b: int) -> float:
        """The stage's time for layers a..b with balanced shares, ignoring
        memory: the rate-weighted bound, or the slowest rank holding the
        fewest grains it may (one; all of them alone), whichever is more;
        plus its all-sums."""
        ns, s, n = sums.read_ns[b] - sums.read_ns[a], sums.read_s[b] - sums.read_s[a], b - a
        g = len(self.rates)
        least = ns + s * (1 if g > 1 else sums.of) / sums.of
        if self.same_layer_s is not None:  # uncalibrated nodes: the slowest rate is the slowest rank
            slowest = least / self.slowest_rate + n * self.same_layer_s
        else:
            slowest = max(least / rate + n * layer for rate, layer in self.rates)
        # A stage on slow links pays for its all-sums: the split gives it fewer of the layers that sum.
        return max((g * ns + s) / self.total_rate + n * self.layer_s, slowest) \
            + (sums.all_sums[b] - sums.all_sums[a]) * self.all_sum_s

    def curves(self, sums: LayerSums) -> list[list[float]]:
        """Running times over the layers such that time(a, b) is
        max(c[b] - c[a] for c in curves): the rate-weighted one and one per
        rank that may be the slowest (one, when the per-layer costs are
        the same), each with the all-sums. Increasing, so that the most
        layers within a time is a bisection."""
        g = len(self.rates)
        least = (1 if g > 1 else sums.of) / sums.of
        rows = list(zip(sums.read_ns, sums.read_s, sums.all_sums))
        weighted = [(g * ns + cut) / self.total_rate + layer * self.layer_s + moe * self.all_sum_s
                    for layer, (ns, cut, moe) in enumerate(rows)]
        ranks = [(self.slowest_rate, self.same_layer_s)] if self.same_layer_s is not None else self.rates
        return [weighted, *([(ns + cut * least) / rate + layer * per_layer + moe * self.all_sum_s
                             for layer, (ns, cut, moe) in enumerate(rows)] for rate, per_layer in ranks)]

    def fits(self, sums: LayerSums, a: int, b: int) -> bool:
        """Whether the ranks' memory holds layers a..b, every grain on some
        rank and at least one on each (memory is affine in the grains)."""
        base = sums.fixed_mem + sums.mem_ns[b] - sums.mem_ns[a]
        per = (sums.mem_s[b] - sums.mem_s[a]) / sums.of + sums.per_grain_mem
        if len(self.rooms) == 1:
            return base + per * sums.of <= self.rooms[0]
        if per <= 0:
            return self.least_room >= base
        if self.least_room - base < per:
            return False  # a rank cannot hold its one grain
        held = 0
        for room in self.rooms:
            held += min(math.floor((room - base) / per), sums.of)
            if held >= sums.of:
                return True
        return False


def layers_bound(sums: LayerSums, stages: list[tuple[float, int, float, float]], slowest_rate: float,
                 capacity: list[float] | None = None) -> float:
    """No layer split and no shares make the stages' layers take less: each
    layer costs at least its stage's rate-weighted time plus its chain
    all-sums (LayerSums.all_sums); at best every layer is on its
    cheapest stage. stages: (total rate, ranks, lambda, chain all-sum
    seconds) per stage. capacity: per stage, the bytes its ranks can hold
    for layers (None: no limit); a layer of a kind takes g * ns + s of it.
    With capacities the layers are also priced (priced_bound), which only
    raises the bound."""
    costs = [[(ns * g + s) / r + lam + moe * chain for r, g, lam, chain in stages]
             for _, ns, s, moe, _, _ in sums.groups]
    counts = [group[0] for group in sums.groups]
    bound = sum(count * min(row) for count, row in zip(counts, costs))
    if capacity is not None:
        held = [[g * ns_held + s_held for _, g, _, _ in stages] for _, _, _, _, ns_held, s_held in sums.groups]
        bound = max(bound, priced_bound(counts, costs, held, capacity))
    return bound - sums.outside_split_read / slowest_rate


def priced_bound(counts: list[int], costs: list[list[float]], held: list[list[float]], capacity: list[float],
                 rounds: int = 24) -> float:
    """A lower bound on sum(cost) over every way to put counts[j] layers of
    kind j on stages, no stage holding more than its capacity (held[j][s]:
    bytes one layer of kind j takes on stage s). Weak duality: for any
    prices mu >= 0 per byte of each stage,
        sum_j counts[j] * min_s(costs[j][s] + mu[s] * held[j][s]) - sum_s mu[s] * capacity[s]
    is no more than any such placement's cost. The prices are raised on the
    stages that the cheapest placement overfills (subgradient steps); the
    best value found is returned."""
    k = len(capacity)
    mu = [0.0] * k
    scale = sum(min(row) for row in costs) / max(1.0, sum(min(row) for row in held))  # seconds per byte
    best = -math.inf
    for step in range(rounds):
        used, total = [0.0] * k, 0.0
        for count, cost_row, held_row in zip(counts, costs, held):
            s = min(range(k), key=lambda i: cost_row[i] + mu[i] * held_row[i])
            total += count * (cost_row[s] + mu[s] * held_row[s])
            used[s] += count * held_row[s]
        best = max(best, total - sum(m * c for m, c in zip(mu, capacity)))
        over = [u - c for u, c in zip(used, capacity)]
        if all(o <= 0 for o in over) and all(m == 0 or o == 0 for m, o in zip(mu, over)):
            break  # complementary slackness: these prices are optimal
        largest = max(abs(o) for o in over) or 1.0
        mu = [max(0.0, m + scale / (step + 1) * o / largest * 4) for m, o in zip(mu, over)]
    return best


def order_bound(sums: LayerSums, rates: list[tuple[float, float]], chain_hop_s: float) -> float:
    """layers_bound for any split of these ranks into 2+ stages: a layer
    runs on one rank, no faster than the fastest, or on a stage of 2+, no
    faster than every rank but the slowest together (the uncut bytes at the
    fastest rank's rate) and paying at least two hops of the cheapest link
    (chain_hop_s) per chain all-sum."""
    total = sum(rate for rate, _ in rates)
    top, low = max(rate for rate, _ in rates), min(rate for rate, _ in rates)
    least_layer = min(layer for _, layer in rates)
    return sum(count * (least_layer + min((ns + s) / top, ns / top + s / (total - low) + moe * 2 * chain_hop_s))
               for count, ns, s, moe, _, _ in sums.groups) - sums.outside_split_read / low


class OrderFigures:
    """Running sums over one order's ranks, so that a split's bound costs
    O(stages): rates, rate-weighted per-layer costs, and the seconds of one
    message from rank i to i+1 (without the collective cost)."""

    def __init__(self, rates: list[tuple[float, float]], edges: list[float], rooms: list[float]):
        self.n = len(rates)
        self.rates, self.edges = rates, edges
        self.room = [0.0]
        for room in rooms:
            self.room.append(self.room[-1] + room)
        self.rate, self.weighted, self.edge = [0.0], [0.0], [0.0]
        for rate, layer in rates:
            self.rate.append(self.rate[-1] + rate)
            self.weighted.append(self.weighted[-1] + rate * layer)
        for seconds in edges:
            self.edge.append(self.edge[-1] + seconds)
        self.slowest = min(rate for rate, _ in rates)


def split_bound(sums: LayerSums, order: OrderFigures, stage_ranks: list[int], each: float,
                per_stage: bool = False) -> float:
    """A lower bound on a split's decode time less its step and all-gather:
    the layers, each stage's input forwarded down its chain, and the sends
    between stages with their collective cost `each` (a stage's own
    collective cost may be lower, so its chain is counted without).

    The layers: each layer on a stage of one rank costs at least its bytes
    at the fastest such rank's rate; on a stage of 2+, at least the
    rate-weighted time of the best such stage's figures (each taken apart)
    plus its chain all-sums at the cheapest such stage's.
    per_stage: tighter and slower, each layer at its cheapest stage's time
    (layers_bound)."""
    comm, start, stages, capacity = 0.0, 0, [], []
    alone_rate, alone_layer = 0.0, math.inf
    per_rank, inverse, lam, chain = math.inf, math.inf, math.inf, math.inf
    for size in stage_ranks:
        end = start + size
        total = order.rate[end] - order.rate[start]
        forward = order.edge[end - 1] - order.edge[start]
        if size == 1:
            alone_rate = max(alone_rate, total)
            alone_layer = min(alone_layer, order.rates[start][1])
        else:
            per_rank, inverse = min(per_rank, size / total), min(inverse, 1 / total)
            lam = min(lam, (order.weighted[end] - order.weighted[start]) / total)
            chain = min(chain, 2 * forward)
        if per_stage:
            stages.append((total, size, (order.weighted[end] - order.weighted[start]) / total,
                           2 * forward if size > 1 else 0.0))
            # What the stage's ranks hold beyond what each holds whatever its
            # layers, with a megabyte a rank for the rounding of its cut bytes.
            capacity.append(order.room[end] - order.room[start] - size * (sums.least_fixed_mem - 1e6))
        comm += forward + (order.edges[end - 1] + each if end < order.n else 0.0)
        start = end
    if per_stage:
        return layers_bound(sums, stages, order.slowest, capacity) + comm
    layers = 0.0
    for count, ns, s, moe, _, _ in sums.groups:
        cheapest = ns * per_rank + s * inverse + lam + moe * chain
        if alone_rate:
            cheapest = min(cheapest, (ns + s) / alone_rate + alone_layer)
        layers += count * cheapest
    return layers - sums.outside_split_read / order.slowest + comm
