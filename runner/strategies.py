"""How a rank cuts the model. Each strategy is a function
(model, group, spec, architecture, config) -> None that changes the lazily
loaded model in place before its weights are materialized. What to cut comes
from the architecture module; nothing here names a model."""

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from exod.models import shares as grains
from exod.models.architectures import LAYER
from exod.models.architectures.base import split_rule, strategy_refusal

from . import pipeline as stage

STRATEGIES: dict[str, Callable] = {}
# Strategies that hand whole, unchanged layers to each rank: the canary has no
# cut layer to compare with the checkpoint and proves the layer tiling instead.
WHOLE_LAYERS: set[str] = set()


class StrategyError(Exception):
    pass


def register(name: str, apply: Callable, whole_layers: bool = False) -> None:
    STRATEGIES[name] = apply
    if whole_layers:
        WHOLE_LAYERS.add(name)
    else:
        WHOLE_LAYERS.discard(name)


def get(name: str) -> Callable:
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name]


def refusals(name: str, model, arch, config: dict, world: int) -> list[str]:
    """Why this runner will not cut the model with strategy `name` over
    `world` ranks, decided from the built (lazy) model and the architecture
    module. One rank is never a sharding: every model mlx-lm can load runs
    whole. The planner decides from the same rules (strategy_refusal, and
    the split units the inventory records), and
    tests/test_strategy_coverage.py checks that the two agree."""
    if world <= 1:
        return []
    paths = [path for path, module in model.named_modules() if _holds_arrays(module)]
    refusal = strategy_refusal(name, arch, type(model), paths, config)
    if refusal:
        return [refusal]
    if name == "pipeline":
        if arch.pipeline is not None:
            layers = int(config["num_hidden_layers"])
        else:
            try:
                layers = len(stage.layer_list(model))
            except stage.PipelineError as e:
                return [f"pipeline: {e}"]
        if world > layers:
            return [f"pipeline needs at least one layer per rank: {world} ranks, {layers} layers"]
        return []
    rule = split_rule(name, arch)
    splits = [(path, rule(path, config)) for path in paths]
    splits = [(path, split) for path, split in splits if split is not None]
    count = grains.grains_of(split.units for _, split in splits)
    if splits and count < world:
        path, split = min(splits, key=lambda ps: (ps[1].units, ps[0]))
        return [grain_refusal(name, world, count, f"{path} has {split.units} {split.unit}")]
    return []


def grain_refusal(name: str, world: int, count: int, example: str) -> str:
    """The planner's words too (placement/strategies.py)."""
    return (f"{name} over {world} ranks: the cut tensors share only {count} whole grain(s) "
            f"({example}), fewer than {world} ranks")


def rank_grains(name: str, model, arch, config: dict, spec, group) -> tuple[int, int, int]:
    """(lo, hi, of): the grains this rank holds of every tensor `name` cuts,
    from the spec's shares (models/shares.py; none: the most even)."""
    rule = split_rule(name, arch)
    units = [split.units for path, _ in model.named_modules() if (split := rule(path, config)) is not None]
    count = grains.grains_of(units)
    try:
        held = grains.check(list(spec.shares) or grains.even(count, group.size()), count, group.size())
    except grains.ShareError as e:
        raise StrategyError(f"{name}: {e}") from None
    return (*grains.bounds(held, group.rank()), count)


def cut(module, side: str, lo: int, hi: int, of: int, rank: int) -> None:
    """Keep grains [lo, hi) of `of` of a module's arrays. rows: the output
    axis (weights, their quantization scales and biases on axis -2, a bias
    on its only axis); cols: the input axis (-1), the bias kept whole and
    only on rank 0, since it is added once after the sum; axis0: the first
    axis of every array (routed experts: whole experts)."""

    def keep(path: str, x):
        if not isinstance(x, mx.array):
            return x
        is_bias = path.rsplit(".", 1)[-1] == "bias"
        if side == "cols" and is_bias:
            return x if rank == 0 else mx.zeros_like(x)
        if side == "axis0":
            axis = 0
        else:
            axis = -1 if side == "cols" or is_bias or x.ndim < 2 else -2
        a, b = grains.cut(x.shape[axis], lo, hi, of)
        index = [slice(None)] * x.ndim
        index[axis] = slice(a, b)
        return mx.contiguous(x[tuple(index)])

    module.update(tree_map_with_path(keep, module.parameters()))


def _holds_arrays(module) -> bool:
    return any(isinstance(v, mx.array) for v in module.values())


def _refuse(name, model, group, arch, config) -> None:
    reasons = refusals(name, model, arch, config, group.size() if group else 1)
    if reasons:
        raise StrategyError(reasons[0])


def pipeline(model, group, spec, arch, config) -> None:
    """Contiguous layer ranges, rank 0 running the last layers, every rank
    computing the logits from the gathered output: exod's generic stage
    (runner/pipeline.py), or the architecture's hook where the model keeps
    state outside its layers."""
    if group is None:
        return
    _refuse("pipeline", model, group, arch, config)
    layers = int(config["num_hidden_layers"]) if arch.pipeline else len(stage.layer_list(model))
    split = list(spec.pipeline_layers) or stage.even_split(layers, group.size())
    if len(split) != group.size() or sum(split) != layers or min(split) < 1:
        raise StrategyError(f"pipeline split {split} does not cover {layers} layers on {group.size()} ranks")
    if arch.pipeline is not None:
        arch.pipeline(model, group, split)
    else:
        stage.apply(model, group, split)


def tensor(model, group, spec, arch, config) -> None:
    """mlx-lm's own shard(): heads, kv heads and MLPs split across ranks,
    each rank its share in grains (spec.shares): whole KV-head groups with
    their query heads and a matching slice of the MLP (models/shares.py).

    Even shares are shard() itself. For uneven ones, shard() cuts one
    grain, as if the group had one rank per grain and this rank were its
    first grain's; every tensor it cut is then widened to the rank's grains
    from the uncut (lazy) tensor, every count it divided (heads, kv heads)
    is multiplied back by the grains held, and the group it was handed is
    replaced by the real one. So the cut stays the class's own, whatever
    the model, and only its width changes."""
    if group is None:
        return
    _refuse("tensor", model, group, arch, config)
    lo, hi, of = rank_grains("tensor", model, arch, config, spec, group)
    if (hi - lo) * group.size() == of and lo == group.rank() * (hi - lo):
        model.shard(group)
        return
    whole = dict(tree_flatten(model.parameters()))
    counts = {(path, key): value for path, module in model.named_modules() for key, value in _attributes(module)
              if type(value) is int}
    grain = OneGrain(of, lo)
    model.shard(grain)
    for path, cut_array in tree_flatten(model.parameters()):
        before = whole.get(path)
        if before is None or before.shape == cut_array.shape:
            continue
        axes = [i for i, (a, b) in enumerate(zip(before.shape, cut_array.shape)) if a != b]
        if len(axes) != 1 or before.shape[axes[0]] != cut_array.shape[axes[0]] * of:
            raise StrategyError(f"tensor: shard() cut {path} from {list(before.shape)} to "
                                f"{list(cut_array.shape)}, not one grain of {of}")
        axis, width = axes[0], cut_array.shape[axes[0]]
        index = [slice(None)] * before.ndim
        index[axis] = slice(lo * width, hi * width)
        _assign(model, path, mx.contiguous(before[tuple(index)]))
    for path, module in model.named_modules():
        for key, value in _attributes(module):
            if value is grain:
                setattr(module, key, group)
            elif type(value) is int and counts.get((path, key)) == value * of and value:
                setattr(module, key, value * (hi - lo))


def _attributes(module) -> list:
    """A module's plain attributes (counts, its group): MLX keeps them
    outside the module's dict of arrays and children."""
    return [(k, v) for k, v in vars(module).items() if not k.startswith("_")]


class OneGrain:
    """Stands in for the group while shard() cuts one grain of `of`: a
    group of `of` ranks, this one holding grain `lo`. Never used to
    communicate: tensor() puts the real group in its place before any call."""

    def __init__(self, of: int, lo: int):
        self._of, self._lo = of, lo

    def size(self) -> int:
        return self._of

    def rank(self) -> int:
        return self._lo


def _assign(model, path: str, value) -> None:
    parent_path, name = path.rsplit(".", 1)
    resolve(model, parent_path)[name] = value


class AllSumOutput(nn.Module):
    """A block whose weights are split 1/N along its hidden dimension: each
    rank computes a partial output and the sum over ranks is the whole."""

    def __init__(self, block: nn.Module, group):
        super().__init__()
        self.block = block
        self._group = group

    def __call__(self, x, *args, **kwargs):
        return mx.distributed.all_sum(self.block(x, *args, **kwargs), group=self._group)


def moe_tensor(model, group, spec, arch, config) -> None:
    """Experts split on their intermediate dimension, each rank its share
    (spec.shares, in grains: whole quantization groups, or elements of an
    unquantized checkpoint); attention, router, dense layers and embeddings
    replicated; each MoE block's output summed."""
    if group is None:
        return
    _refuse("moe_tensor", model, group, arch, config)
    lo, hi, of = rank_grains("moe_tensor", model, arch, config, spec, group)
    blocks = set()
    for path, module in list(model.named_modules()):
        split = arch.moe_tensor_split(path, config)
        if split is None:
            continue
        cut(module, split.side, lo, hi, of, group.rank())
        blocks.add(moe_block_path(path))
    if not blocks:
        raise StrategyError(f"{config['model_type']}: the architecture names no expert projections to split")
    for path in sorted(blocks):
        parent_path, name = path.rsplit(".", 1)
        parent = resolve(model, parent_path)
        parent[name] = AllSumOutput(parent[name], group)


class LocalExperts(nn.Module):
    """A routed-experts module (SwitchGLU's call: x, expert indices) that
    holds experts [first, first + count) of the model's: each routed slot
    is computed by the rank that holds its expert, and the slots of other
    ranks' experts are zero here (their index is pointed at a local expert
    and the output masked), so that the block's all-sum counts every slot
    once."""

    def __init__(self, experts: nn.Module, first: int, count: int):
        super().__init__()
        self.experts = experts
        self._first, self._count = first, count

    def __call__(self, x, indices, *args, **kwargs):
        local = indices - self._first
        mine = (local >= 0) & (local < self._count)
        y = self.experts(x, mx.where(mine, local, 0), *args, **kwargs)
        return y * mine[..., None].astype(y.dtype)


def moe_experts(model, group, spec, arch, config) -> None:
    """Expert-parallel: each rank holds whole routed experts, its share in
    grains (spec.shares; a grain is one expert with its slice of any shared
    expert, which is cut on its intermediate axis as moe_tensor cuts it),
    computes only the routed slots of its experts, and each MoE block's
    output is summed over the ranks. Attention, routers, dense layers and
    embeddings are replicated."""
    if group is None:
        return
    _refuse("moe_experts", model, group, arch, config)
    place_experts(model, group, arch, config, *rank_grains("moe_experts", model, arch, config, spec, group))


def place_experts(model, group, arch, config, lo: int, hi: int, of: int) -> None:
    """moe_experts' cut, sums and masks for grains [lo, hi) of `of`."""
    rule = split_rule("moe_experts", arch)
    blocks, routed = set(), {}
    for path, module in list(model.named_modules()):
        split = rule(path, config)
        if split is None:
            continue
        cut(module, split.side, lo, hi, of, group.rank())
        if split.side == "axis0":
            first, last = grains.cut(split.units, lo, hi, of)
            routed[path.rsplit(".", 1)[0]] = (first, last - first)
        blocks.add(moe_block_path(path))
    if not routed:
        raise StrategyError(f"{config['model_type']}: the architecture names no routed experts to place")
    for path, (first, count) in sorted(routed.items()):
        parent_path, name = path.rsplit(".", 1)
        parent = resolve(model, parent_path)
        parent[name] = LocalExperts(parent[name], first, count)
    for path in sorted(blocks):
        parent_path, name = path.rsplit(".", 1)
        parent = resolve(model, parent_path)
        parent[name] = AllSumOutput(parent[name], group)


def moe_block_path(path: str) -> str:
    """The layer's direct child that holds an expert projection: the MoE block."""
    m = LAYER.search(path)
    if not m:
        raise StrategyError(f"{path}: an expert projection outside any layer")
    return path[: m.end()] + path[m.end():].split(".", 1)[0]


def resolve(model, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


register("pipeline", pipeline, whole_layers=True)
register("tensor", tensor)
register("moe_tensor", moe_tensor)
register("moe_experts", moe_experts)
