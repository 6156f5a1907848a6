"""Strategies on the planner side, one object each, mirroring
runner/strategies.py: why one cannot run on n ranks, whether it hands out
whole layers, and, for those that cut tensors, each rank's share.

A cutting strategy (tensor, moe_tensor) cuts every tensor it cuts in grains
(models/shares.py): whole KV-head groups with their query heads and a
matching slice of the MLP for tensor; whole quantization groups of every
expert's intermediate dimension (whole elements, unquantized) for
moe_tensor. The planner gives each rank a whole number of grains so that
the ranks' step times match: a rank's step reads its fixed bytes plus its
grains' bytes at its own rate, and the slowest rank sets the pace. Memory
caps each rank's grains. Pure: no I/O, no clocks.
"""

import heapq
import math
from dataclasses import dataclass

from .profile import ModelProfile, hybrid_inner


@dataclass(frozen=True)
class Strategy:
    name: str
    whole_layers: bool  # each rank holds whole, unchanged layers (pipeline)
    cuts: bool  # each rank holds a share of every cut tensor, in grains

    def reasons(self, model: ModelProfile, n: int) -> list[str]:
        """Why this strategy cannot run on n ranks at all, whatever the
        memory. These mirror the runner's refusals (runner/strategies.py)
        and come from the same rules through the spec, so that what the
        planner accepts, the runner runs."""
        if n == 1:
            return []  # one rank is never a sharding: the runner loads the whole model
        if self.name in ("moe_tensor", "moe_experts") and not model.is_moe:
            return [f"{self.name} needs a mixture-of-experts model; {model.model_id} is dense"]
        if self.name not in model.proven:
            return [model.refused.get(self.name) or
                    f"{self.name} is not proven for this architecture (proven: {', '.join(sorted(model.proven))})"]
        if self.name == "pipeline" and n > model.num_layers:
            return [f"pipeline needs at least one layer per rank: {n} ranks, {model.num_layers} layers"]
        if self.cuts:
            count = model.grains[self.name]
            if model.divisibility[self.name] and count < n:
                units, unit, tensor = model.divisibility[self.name][0]
                return [grain_refusal(self.name, n, count, f"{tensor} has {units} {unit}")]
        return []


def grain_refusal(name: str, world: int, count: int, example: str) -> str:
    """The runner's words too (runner/strategies.py)."""
    return (f"{name} over {world} ranks: the cut tensors share only {count} whole grain(s) "
            f"({example}), fewer than {world} ranks")


PIPELINE = Strategy("pipeline", whole_layers=True, cuts=False)
MOE_TENSOR = Strategy("moe_tensor", whole_layers=False, cuts=True)
TENSOR = Strategy("tensor", whole_layers=False, cuts=True)
# Whole experts per rank (a grain: an expert and its slice of any shared expert).
MOE_EXPERTS = Strategy("moe_experts", whole_layers=False, cuts=True)


@dataclass(frozen=True)
class Hybrid(Strategy):
    """Pipeline across stages of neighbouring ranks, a cutting strategy
    inside each stage of two or more ranks: the model's one inner cut
    (inner_of). Its refusals are its parts' refusals: pipeline's over the
    stages, the inner cut's over the biggest stage, so that the runner's
    rules for each part stand."""

    def reasons(self, model: ModelProfile, n: int) -> list[str]:
        if self.name not in model.proven:
            return [model.refused.get(self.name) or f"{self.name} is not proven for this architecture"]
        inner = inner_of(model)
        if inner is None:
            return [f"{self.name} needs a cut inside its stages: neither moe_tensor nor tensor is proven for "
                    f"{model.model_id}"]
        if n < 3:
            # Two stages of one rank are a pipeline; one stage of two, a cut.
            return [f"{self.name} needs at least 3 ranks: on {n} it is pipeline or {inner.name}"]
        return []

    def split_reasons(self, model: ModelProfile, stage_ranks: list[int]) -> list[str]:
        """Why these stages (ranks per stage) cannot run, whatever the memory."""
        if len(stage_ranks) < 2 or max(stage_ranks) < 2:
            return [f"{self.name} needs 2+ stages, one of 2+ ranks: got stages of {stage_ranks} rank(s)"]
        return PIPELINE.reasons(model, len(stage_ranks)) + inner_of(model).reasons(model, max(stage_ranks))


def inner_of(model: ModelProfile) -> "Strategy | None":
    """The cut inside a hybrid's stages for this model (profile.hybrid_inner)."""
    name = hybrid_inner(model.is_moe, model.proven)
    return {"moe_tensor": MOE_TENSOR, "tensor": TENSOR}.get(name)


HYBRID = Hybrid("hybrid", whole_layers=False, cuts=True)
BY_NAME = {s.name: s for s in (PIPELINE, MOE_TENSOR, TENSOR, MOE_EXPERTS, HYBRID)}


def balance(grains: int, fixed: list[float], per_grain: list[float], caps: list[int]) -> tuple[list[int], bool]:
    """Whole grains per rank, each at least one, summing to `grains`, that
    minimise the slowest rank's time fixed[r] + per_grain[r] * share[r],
    with share[r] <= caps[r] (what its memory holds). Returns (shares,
    within caps); when the caps cannot hold every grain, the shares balance
    time alone, so that the shortfall can be reported.

    Water-filling: the continuous optimum gives every rank not held at a
    bound the same time T; ranks past a bound are fixed there and T is
    solved again (at most n rounds, each O(n)). The floors of the
    continuous shares leave fewer than n grains, each given to the rank it
    slows least."""
    n = len(fixed)
    within = min(caps) >= 1 and sum(caps) >= grains
    top = caps if within else [grains] * n
    cont = _water_fill(grains, fixed, per_grain, top)
    shares = [max(1, min(top[r], math.floor(cont[r] + 1e-9))) for r in range(n)]
    extra = sum(shares) - grains
    if extra > 0:  # the floor of one grain over-gave: take from the slowest
        heap = [(-(fixed[r] + per_grain[r] * shares[r]), r) for r in range(n) if shares[r] > 1]
        heapq.heapify(heap)
        for _ in range(extra):
            _, r = heapq.heappop(heap)
            shares[r] -= 1
            if shares[r] > 1:
                heapq.heappush(heap, (-(fixed[r] + per_grain[r] * shares[r]), r))
    elif extra < 0:  # give each grain left to the rank it slows least
        heap = [(fixed[r] + per_grain[r] * (shares[r] + 1), r) for r in range(n) if shares[r] < top[r]]
        heapq.heapify(heap)
        for _ in range(-extra):
            _, r = heapq.heappop(heap)
            shares[r] += 1
            if shares[r] < top[r]:
                heapq.heappush(heap, (fixed[r] + per_grain[r] * (shares[r] + 1), r))
    return shares, within


def _water_fill(grains: int, fixed: list[float], per_grain: list[float], top: list[int]) -> list[float]:
    n = len(fixed)
    bound: dict[int, float] = {}
    for _ in range(n + 1):
        free = [r for r in range(n) if r not in bound]
        if not free:
            break
        left = grains - sum(bound.values())
        slopes = [per_grain[r] if per_grain[r] > 0 else 1e-30 for r in free]
        t = (left + sum(fixed[r] / s for r, s in zip(free, slopes))) / sum(1 / s for s in slopes)
        changed = False
        for r, s in zip(free, slopes):
            x = (t - fixed[r]) / s
            if x > top[r]:
                bound[r] = top[r]
                changed = True
            elif x < 1:
                bound[r] = 1
                changed = True
        if not changed:
            return [bound.get(r, (t - fixed[r]) / (per_grain[r] if per_grain[r] > 0 else 1e-30)) for r in range(n)]
    return [bound.get(r, 1.0) for r in range(n)]
