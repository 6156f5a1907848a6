"""Which experts each rank computes under moe_experts, from how often the
router chooses them. Pure: no I/O, no clocks.

The model. In an MoE layer the router sends each token to k experts; f[e]
is the fraction of routed slots expert e takes (its measured count over the
layer's total; 1/E each when nothing was measured). A rank holds the same
number of experts in every MoE layer (its share, which fixes its memory);
which experts it holds may differ by layer. A rank's routed work in a layer
is the fraction of the layer's slots its experts take, at its own decode
rate, and the ranks meet at each MoE layer's all-sum: a layer costs its
slowest rank, a step the sum over the layers.

Replicas. An expert held by r ranks has its slots split among them, the
i-th slot routed to it in a forward pass going to holder i mod r (the
runner's rule, proto ExpertLayout). Over many tokens (prefill, a batch of
sequences) each holder takes f[e] / r. One token routes at most one slot
to an expert, so a single stream's decode step always goes to the first
holder: replicas pay off only with batches and prefill, and the planner
replicates only for placements that decode more than one sequence at once.

The assignment, per layer: the hottest experts get the replica slots the
shares leave over E (one more holder at a time, to whichever expert then
carries the most per holder). The replicated experts are placed first, on
distinct ranks, then every other expert, hottest first, on the rank with
room where it finishes earliest relative to that rank's speed
(longest-processing-time first). A layer of n ranks and E experts costs
O(E log E + E·n).
"""

import heapq
from dataclasses import dataclass


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    experts: list  # [moe layer][rank] -> ascending expert ids
    batched: list  # [moe layer][rank] -> fraction of the layer's slots over many tokens
    single: list  # [moe layer][rank] -> fraction of one token's slots (replicas: first holder)
    layers: list  # the model's layer index of each moe layer

    def imbalance(self, speed: list[float], single: bool = True) -> float:
        return imbalance(self.single if single else self.batched, speed)


def frequencies(counts, experts: int) -> list[float]:
    """Fractions of the slots per expert; uniform when nothing was counted."""
    counts = [max(0, int(c)) for c in counts]
    if len(counts) != experts:
        raise LayoutError(f"{len(counts)} counts for {experts} experts")
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / experts] * experts


def replicas(freq: list[float], extra: int, ranks: int, shares: list[int] | None = None) -> list[int]:
    """Holders per expert: one each, and `extra` more given one at a time to
    the expert that then carries the most per holder (at most `ranks`).
    With shares, the holders are then evened out, hottest kept longest,
    until the ranks can hold them (each rank its share, distinct experts)."""
    holders = [1] * len(freq)
    if extra > len(freq) * (ranks - 1):
        raise LayoutError(f"{extra} replica slots but {len(freq)} experts on {ranks} ranks hold at most "
                          f"{len(freq) * (ranks - 1)}")
    for _ in range(extra):
        e = max((e for e in range(len(freq)) if holders[e] < ranks), key=lambda e: (freq[e] / holders[e], -e))
        holders[e] += 1
    while shares is not None and (k := _unplaceable_at(holders, shares)):
        # Too many holders on too few experts for the k largest ranks to
        # fill their shares: move one holder from the most replicated
        # expert (the coldest of those) to the least replicated below k
        # (the hottest of those). The most even holders fit whenever any do.
        give = max(range(len(holders)), key=lambda e: (holders[e], -freq[e]))
        take = min((e for e in range(len(holders)) if holders[e] < k), key=lambda e: (holders[e], -freq[e]),
                   default=None)
        if take is None or holders[give] <= holders[take] + 1:
            raise LayoutError(f"shares {shares} cannot hold {len(freq)} experts with {extra} replicas")
        holders[give] -= 1
        holders[take] += 1
    return holders


def _unplaceable_at(holders: list[int], shares: list[int]) -> int:
    """0 when experts with these holder counts fit ranks of these shares
    exactly (Gale-Ryser: for every k, the k largest shares need at most
    sum(min(h, k)) places); else the first k that fails."""
    n = len(shares)
    count = [0] * (n + 2)
    for h in holders:
        count[min(h, n + 1)] += 1
    top = sorted(shares, reverse=True)
    need = 0
    available = 0  # sum over experts of min(h, k), built up k by k
    at_least = len(holders)  # experts with h >= k
    for k in range(1, n + 1):
        available += at_least
        at_least -= count[k]
        need += top[k - 1]
        if need > available:
            return k
    return 0


def assign_layer(freq: list[float], shares: list[int], speed: list[float]) -> list[list[int]]:
    """Expert ids per rank for one layer: shares[r] experts on rank r,
    every expert on at least one rank, sum(shares) - E replica slots."""
    n, experts = len(shares), len(freq)
    if len(speed) != n or min(speed) <= 0:
        raise LayoutError(f"speeds {speed} for {n} ranks")
    if min(shares) < 1 or sum(shares) < experts:
        raise LayoutError(f"shares {shares} cannot hold {experts} experts")
    holders = replicas(freq, sum(shares) - experts, n, shares)
    room, load = list(shares), [0.0] * n
    held: list[list[int]] = [[] for _ in range(n)]

    def put(e: int, ranks: list[int]) -> None:
        for r in ranks:
            room[r] -= 1
            load[r] += freq[e] / holders[e]
            held[r].append(e)

    # Replicated experts first, hottest first: each needs distinct ranks
    # with room. Each takes the ranks where it finishes earliest for their
    # speed, unless that would leave the rest unplaceable; then the ranks
    # with the most room, which always leaves a placeable rest (Gale-Ryser).
    spread = sorted((e for e in range(experts) if holders[e] > 1), key=lambda e: (-freq[e] / holders[e], e))
    for i, e in enumerate(spread):
        weight = freq[e] / holders[e]
        by_time = sorted((r for r in range(n) if room[r]), key=lambda r: ((load[r] + weight) / speed[r], r))
        chosen = by_time[:holders[e]]
        rest = [holders[x] for x in spread[i + 1:]]
        after = [room[r] - (r in chosen) for r in range(n)]
        # Each expert left takes at most one place per rank: when every rank
        # keeps that many, the rest is placeable without checking.
        if len(chosen) < holders[e] or (min(after) < len(rest) and not _placeable(after, rest)):
            chosen = sorted(range(n), key=lambda r: (-room[r], r))[:holders[e]]
            if min(room[r] for r in chosen) < 1:
                raise LayoutError(f"shares {shares} cannot hold {holders[e]} replicas of expert {e}")
        put(e, chosen)
    # Then every other expert, hottest first, on the rank with room where
    # it finishes earliest for that rank's speed (LPT). Ranks of one speed
    # share a heap by load, so each expert costs O(speeds · log n), not O(n).
    heaps: dict[float, list] = {}
    for r in range(n):
        if room[r]:
            heaps.setdefault(speed[r], []).append((load[r], r))
    for h in heaps.values():
        heapq.heapify(h)
    for e in sorted((e for e in range(experts) if holders[e] == 1), key=lambda e: (-freq[e], e)):
        best = min(((h[0][0] + freq[e]) / v, h[0][1], v) for v, h in heaps.items() if h)
        _, r, v = best
        heapq.heappop(heaps[v])
        put(e, [r])
        if room[r]:
            heapq.heappush(heaps[v], (load[r], r))
    return [sorted(h) for h in held]


def _placeable(room: list[int], holders: list[int]) -> bool:
    """Whether experts needing these many distinct ranks each fit in the
    rooms: the greedy that gives each (most holders first) the ranks with
    the most room succeeds exactly when any placement does."""
    room = sorted(room, reverse=True)
    for h in sorted(holders, reverse=True):
        if h > len(room) or room[h - 1] < 1:
            return False
        for r in range(h):
            room[r] -= 1
        room.sort(reverse=True)
    return True


def loads(freq: list[float], experts_per_rank: list[list[int]]) -> tuple[list[float], list[float]]:
    """(over many tokens, one token) fraction of the layer's slots each rank
    computes under the replica rule."""
    holders: dict[int, list[int]] = {}
    for r, ids in enumerate(experts_per_rank):
        for e in ids:
            holders.setdefault(e, []).append(r)
    n = len(experts_per_rank)
    batched, single = [0.0] * n, [0.0] * n
    for e, ranks in holders.items():
        for r in ranks:
            batched[r] += freq[e] / len(ranks)
        single[ranks[0]] += freq[e]
    return batched, single


def layout(freqs: list[list[float]], layers: list[int], shares: list[int], speed: list[float]) -> Layout:
    """The assignment of every MoE layer (freqs: per layer, per expert)."""
    experts, batched, single = [], [], []
    for freq in freqs:
        ids = assign_layer(freq, shares, speed)
        b, s = loads(freq, ids)
        experts.append(ids)
        batched.append(b)
        single.append(s)
    return Layout(experts, batched, single, list(layers))


def contiguous(experts: int, shares: list[int]) -> list[list[int]]:
    """The layout without measurements: experts in rank order by share."""
    out, first = [], 0
    for s in shares:
        out.append(list(range(first, first + s)))
        first += s
    return out


def imbalance(load: list[list[float]], speed: list[float]) -> float:
    """Sum over layers of the slowest rank's routed time, over what the same
    work would take spread in proportion to speed (1.0: balanced)."""
    total_speed = sum(speed)
    worst = sum(max(l / s for l, s in zip(layer, speed)) for layer in load)
    ideal = sum(sum(layer) / total_speed for layer in load)
    return worst / ideal if ideal > 0 else 1.0
