"""Uneven splits: each rank's share of what a strategy cuts, in grains.

A strategy that cuts tensors (tensor, moe_tensor) cuts every tensor along
one axis into whole units (attention heads, kv heads, intermediate rows,
whole quantization groups). Every rank must get whole units of every
tensor, and the cuts must line up: the rows of gate/up a rank keeps are the
columns of down it keeps, its query heads are those of its kv heads. So a
share is counted in grains, where the number of grains is the greatest
common divisor of every cut tensor's units: one grain of a tensor with u
units is u / grains units, whatever the tensor. A rank holding grains
[lo, hi) keeps units [u * lo / grains, u * hi / grains) of each, and every
cut boundary is whole for every tensor at once. Kv heads make a grain a
whole KV-head group (with its query heads and a matching slice of the MLP);
quantization groups make it whole groups; an unquantized checkpoint's
experts cut to whole elements.

Shares are the grains per rank in rank order, summing to the grains; rank 0
holds the first ones. Pure: the planner, the runner and the shard fetch all
use these same functions.
"""

import math


class ShareError(ValueError):
    pass


def grains_of(units) -> int:
    """The grains of a strategy whose cut tensors have these unit counts (0: none)."""
    g = 0
    for u in units:
        g = math.gcd(g, int(u))
    return g


def even(grains: int, world: int) -> list[int]:
    """The most even shares: the first grains % world ranks one grain more."""
    base, extra = divmod(grains, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def check(shares, grains: int, world: int) -> list[int]:
    shares = [int(s) for s in shares]
    if len(shares) != world:
        raise ShareError(f"{len(shares)} shares for {world} ranks")
    if min(shares) < 1:
        raise ShareError(f"shares {shares}: every rank needs at least one grain")
    if sum(shares) != grains:
        raise ShareError(f"shares {shares} sum to {sum(shares)}, not the model's {grains} grains")
    return shares


def bounds(shares, rank: int) -> tuple[int, int]:
    """Grains [lo, hi) that rank `rank` holds."""
    lo = sum(shares[:rank])
    return lo, lo + shares[rank]


def cut(size: int, lo: int, hi: int, grains: int) -> tuple[int, int]:
    """Indices [a, b) of an axis of `size` elements for grains [lo, hi)."""
    if size % grains:
        raise ShareError(f"an axis of {size} does not divide into {grains} grains")
    step = size // grains
    return lo * step, hi * step
