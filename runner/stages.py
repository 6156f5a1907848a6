"""Pipeline stages of several ranks on one MLX ring (hybrid placements).

A hybrid placement runs pipeline across stages, each a run of neighbouring
ranks, and a cutting strategy inside each stage of two or more ranks. MLX's
ring backend cannot split a group ("[ring] Group split not supported") and
sends only to a rank's two ring neighbours, so a stage is not an MLX group:
`StageGroup` stands in for one. It answers size() and rank() within the
stage, as the cutting strategies ask, and sums over the stage along the
chain of its ranks:

- up the chain: rank lo sends its partial sum to lo+1, which adds its own and
  sends on, until the stage's last rank holds the total;
- back down: the total goes from rank to rank to lo.

That is 2(g-1) neighbour steps of the whole message on a stage of g ranks,
where MLX's ring all-sum takes 2(g-1) steps of 1/g of it; stages are small
(the nodes of one fast link), so the difference is small where hybrid pays.

Every rank runs its sends and receives in the same order as its neighbour.
A receive takes no input, so nothing in the graph orders it after this
rank's own send to the same neighbour; mx.depends(recv, before) has MLX
evaluate `before` first (measured: the reverse order hangs two ranks
exchanging 64 MB, this one does not), and a send and a receive between two
ranks in flight at once can hang the ring."""

from dataclasses import dataclass

import mlx.core as mx


class StageError(Exception):
    pass


@dataclass(frozen=True)
class Stages:
    """Ranks per stage, in rank order. Stage 0 (ranks 0..) runs the last
    layers: activations travel from the highest rank down to rank 0, as in
    exod's pipeline."""

    sizes: tuple

    def bounds(self, stage: int) -> tuple[int, int]:
        lo = sum(self.sizes[:stage])
        return lo, lo + self.sizes[stage]

    def of_rank(self, rank: int) -> int:
        for stage in range(len(self.sizes)):
            lo, hi = self.bounds(stage)
            if lo <= rank < hi:
                return stage
        raise StageError(f"rank {rank} is in no stage of {list(self.sizes)}")


def stages_of(sizes, world: int) -> Stages:
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1 or sum(sizes) != world:
        raise StageError(f"stages {list(sizes)} do not cover the {world} ranks")
    return Stages(sizes)


class StageGroup:
    """The ranks [lo, hi) of `world` (an MLX group), as a group of their own
    for a cutting strategy: rank() and size() within the stage, and
    all_sum() over it (see the module's docstring)."""

    def __init__(self, world, lo: int, hi: int):
        if not 0 <= lo < hi <= world.size() or not lo <= world.rank() < hi:
            raise StageError(f"rank {world.rank()} is not in the stage {lo}..{hi - 1}")
        self.world, self.lo, self.hi = world, lo, hi

    def size(self) -> int:
        return self.hi - self.lo

    def rank(self) -> int:
        return self.world.rank() - self.lo

    def all_sum(self, x: mx.array) -> mx.array:
        r, g = self.world.rank(), self.world
        total = x
        if r > self.lo:
            # After all this rank computed so far: that may include a send to
            # r-1 (the stage's input, passed down), which r-1 awaits first.
            total = total + mx.depends(mx.distributed.recv_like(x, r - 1, group=g), x)
        if r < self.hi - 1:
            sent = mx.distributed.send(total, r + 1, group=g)
            total = mx.depends(mx.distributed.recv_like(x, r + 1, group=g), sent)
        if r > self.lo:
            total = mx.depends(total, mx.distributed.send(total, r - 1, group=g))
        return total


def all_sum(x: mx.array, group) -> mx.array:
    """Over an MLX group, or over a stage of one."""
    if isinstance(group, StageGroup):
        return group.all_sum(x)
    return _mlx_all_sum(x, group=group)


_mlx_all_sum = mx.distributed.all_sum


def _all_sum(x, *, group=None, stream=None):
    if isinstance(group, StageGroup):
        return group.all_sum(x)
    return _mlx_all_sum(x, group=group, stream=stream)


def route_sums_to_stages() -> None:
    """tensor inside a stage is mlx-lm's own shard(): its cut layers (and a
    model's own MoE blocks) sum with mx.distributed.all_sum(x, group=...)
    on the group they were handed, inside mlx-lm's code. Handed a stage,
    they sum over it through this, in this runner process only; any other
    group goes to MLX unchanged."""
    mx.distributed.all_sum = _all_sum
