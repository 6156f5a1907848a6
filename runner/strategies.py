"""How a rank cuts the model. Each strategy is a function
(model, group, spec, architecture, config) -> None that changes the lazily
loaded model in place before its weights are materialized. What to cut comes
from the architecture module; nothing here names a model."""

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from exod.models import expert_layout as layout
from exod.models import shares as grains
from exod.models.architectures import LAYER
from exod.models.architectures.base import split_rule, strategy_refusal

from . import pipeline as stage
from . import stages
from .stages import StageError, StageGroup, route_sums_to_stages, stages_of

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
    if name.startswith("hybrid"):
        return []  # its stages' pipeline and cut are asked each (hybrid_refusals)
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


def rank_grains(name: str, model, arch, config: dict, shares: list, group) -> tuple[int, int, int]:
    """(lo, hi, of): the grains this rank holds of every tensor `name` cuts,
    from each rank's shares (models/shares.py; none: the most even)."""
    rule = split_rule(name, arch)
    units = [split.units for path, _ in model.named_modules() if (split := rule(path, config)) is not None]
    count = grains.grains_of(units)
    try:
        held = grains.check(list(shares) or grains.even(count, group.size()), count, group.size())
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
    _cut_heads(model, group, list(spec.shares), arch, config)


def _cut_heads(model, group, shares: list, arch, config) -> None:
    lo, hi, of = rank_grains("tensor", model, arch, config, shares, group)
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
        return stages.all_sum(self.block(x, *args, **kwargs), self._group)


def moe_tensor(model, group, spec, arch, config) -> None:
    """Experts split on their intermediate dimension, each rank its share
    (spec.shares, in grains: whole quantization groups, or elements of an
    unquantized checkpoint); attention, router, dense layers and embeddings
    replicated; each MoE block's output summed."""
    if group is None:
        return
    _refuse("moe_tensor", model, group, arch, config)
    _cut_experts(model, group, list(spec.shares), arch, config)


def _cut_experts(model, group, shares: list, arch, config) -> None:
    lo, hi, of = rank_grains("moe_tensor", model, arch, config, shares, group)
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


def hybrid(model, group, spec, arch, config) -> None:
    """Pipeline across stages of neighbouring ranks (spec.stage_ranks, one
    entry of spec.pipeline_layers per stage), spec.stage_strategy
    (moe_tensor or tensor) inside each stage of two or more ranks
    (spec.shares: each rank's grains within its stage). A stage is not an
    MLX group (the ring cannot split one): its cut blocks sum along the
    stage's chain of ranks (runner/stages.py)."""
    if group is None:
        return
    inner = spec.stage_strategy or "moe_tensor"
    if inner not in STAGE_CUTS:
        raise StrategyError(f"hybrid: {inner} inside a stage is not supported ({', '.join(sorted(STAGE_CUTS))} are)")
    try:
        stages = stages_of(spec.stage_ranks, group.size())
    except StageError as e:
        raise StrategyError(f"hybrid: {e}") from None
    reasons = hybrid_refusals(model, arch, config, stages.sizes, inner)
    if reasons:
        raise StrategyError(reasons[0])
    lo, hi = stages.bounds(stages.of_rank(group.rank()))
    if spec.shares and len(spec.shares) != group.size():
        raise StrategyError(f"hybrid: {len(spec.shares)} shares for {group.size()} ranks")
    if hi - lo > 1:
        route_sums_to_stages()
        STAGE_CUTS[inner](model, StageGroup(group, lo, hi), list(spec.shares[lo:hi]), arch, config)
    layers = len(stage.layer_list(model))
    split = list(spec.pipeline_layers)
    if len(split) != len(stages.sizes) or sum(split) != layers or min(split, default=0) < 1:
        raise StrategyError(f"hybrid: pipeline split {split} does not cover {layers} layers "
                            f"on {len(stages.sizes)} stages")
    if arch.pipeline is not None:
        arch.pipeline(model, group, split, stages)
    else:
        stage.apply(model, group, split, stages)


def hybrid_refusals(model, arch, config: dict, sizes, inner: str = "moe_tensor") -> list[str]:
    """Why the runner will not run these stages: pipeline over the stages,
    the stage's cut over the largest stage (the planner's rules too)."""
    if len(sizes) < 2 or max(sizes) < 2:
        return [f"hybrid needs two stages or more and a stage of two ranks or more, not {list(sizes)}"]
    return (refusals(f"hybrid_{inner}", model, arch, config, sum(sizes))
            or refusals("pipeline", model, arch, config, len(sizes))
            or refusals(inner, model, arch, config, max(sizes)))


# The cuts a stage of several ranks can make: (model, stage, shares, arch, config).
STAGE_CUTS = {"moe_tensor": _cut_experts, "tensor": _cut_heads}


class LocalExperts(nn.Module):
    """A routed-experts module (SwitchGLU's call: x, expert indices) of which
    this rank holds some experts (`held`, the model's expert ids, ascending).
    Of the k routed slots of every token it computes only those this rank
    owns (models/expert_layout.py: the holder of the slot's expert, or, for
    an expert on several ranks, the holder whose turn the slot is); the
    other slots are zero here, so the block's all-sum counts each slot once.

    Which slots are local decides the shapes of the gather, so the routed
    indices are evaluated here (np.asarray): a few bytes per token, read once
    per MoE layer and step, in place of computing every slot masked. The
    same array gives the routing counts (every rank sees every slot, the
    router being replicated), one uint64 per expert."""

    def __init__(self, experts: nn.Module, layer: int, held, expert_holders, rank: int):
        super().__init__()
        self.experts = experts
        count = len(expert_holders)
        local = np.full(count, -1, dtype=np.int64)
        local[np.asarray(held, dtype=np.int64)] = np.arange(len(held))
        # Kept out of MLX's module tree (lists and arrays would become parameters).
        object.__setattr__(self, "_routing", _Routing(layer, local, tuple(map(tuple, expert_holders)), rank,
                                                       np.zeros(count, dtype=np.uint64)))

    @property
    def layer(self) -> int:
        return self._routing.layer

    @property
    def counts(self) -> np.ndarray:
        return self._routing.counts

    def __call__(self, x, indices, *args, **kwargs):
        r = self._routing
        k, dims = indices.shape[-1], x.shape[-1]
        flat = np.asarray(indices).reshape(-1).astype(np.int64)
        r.counts += np.bincount(flat, minlength=r.counts.size).astype(np.uint64)
        mine = np.flatnonzero(layout.slot_ranks(flat, r.holders) == r.rank)
        if not mine.size:
            return mx.zeros((*indices.shape, dims), dtype=x.dtype)
        tokens = x.reshape(-1, dims)[mx.array(mine // k)]
        y = self.experts(tokens, mx.array(r.local[flat[mine]])[:, None], *args, **kwargs)
        y = y.reshape(mine.size, -1)
        out = mx.zeros((flat.size, y.shape[-1]), dtype=y.dtype)
        out[mx.array(mine)] = y
        return out.reshape(*indices.shape, y.shape[-1])


class _Routing:
    """A LocalExperts' fixed plan and its counts."""

    def __init__(self, layer, local, holders, rank, counts):
        self.layer, self.local, self.holders, self.rank, self.counts = layer, local, holders, rank, counts


def moe_experts(model, group, spec, arch, config) -> None:
    """Expert-parallel: each rank holds whole routed experts, computes only
    the routed slots it owns, and each MoE block's output is summed over
    the ranks. Attention, routers, dense layers and embeddings are
    replicated.

    Without spec.expert_layout each rank holds its share in grains
    (spec.shares; a grain is experts with their slice of any shared expert,
    cut on its intermediate axis as moe_tensor cuts it): contiguous experts,
    the same in every layer. With one, each rank holds exactly the experts
    the layout lists for it in each MoE layer (models/expert_layout.py),
    spec.shares, if given, being each rank's experts per layer; the shared
    expert (if any) is then cut by the most even split of its own grains,
    whatever each rank's expert count: every token passes through it, so its
    cost does not follow the routing."""
    if group is None:
        return
    _refuse("moe_experts", model, group, arch, config)
    routed = routed_experts(model, arch, config)
    world = group.size()
    if spec.HasField("expert_layout"):
        count = _expert_count(routed, config)
        try:
            sets = layout.validate(spec.expert_layout, count, sorted({layer for layer, _ in routed.values()}),
                                   world, list(spec.shares))
        except layout.LayoutError as e:
            raise StrategyError(f"moe_experts: expert layout: {e}") from None
        units = [split.units for path, module in model.named_modules()
                 if (split := split_rule("moe_experts", arch)(path, config)) is not None and split.side != "axis0"]
        of = grains.grains_of(units)
        if units and of < world:
            raise StrategyError(f"moe_experts: the shared expert has {of} grain(s), fewer than {world} ranks")
        lo, hi = grains.bounds(grains.even(of, world), group.rank()) if units else (0, 1)
        place_experts(model, group, arch, config, sets, (lo, hi, of or 1))
        return
    lo, hi, of = rank_grains("moe_experts", model, arch, config, spec.shares, group)
    held = grains.check(list(spec.shares) or grains.even(of, world), of, world)
    count = _expert_count(routed, config)
    bounds = [grains.cut(count, *grains.bounds(held, r), of) for r in range(world)]
    sets = layout.contiguous(count, bounds, sorted({layer for layer, _ in routed.values()}))
    place_experts(model, group, arch, config, sets, (lo, hi, of))


def routed_experts(model, arch, config) -> dict:
    """{routed-experts module path: (layer, experts)} by moe_experts' rule."""
    rule = split_rule("moe_experts", arch)
    out = {}
    for path, _ in model.named_modules():
        split = rule(path, config)
        if split is not None and split.side == "axis0":
            m = LAYER.search(path)
            if not m:
                raise StrategyError(f"{path}: routed experts outside any layer")
            out[path.rsplit(".", 1)[0]] = (int(m.group(1)), split.units)
    if not out:
        raise StrategyError(f"{config['model_type']}: the architecture names no routed experts to place")
    return out


def _expert_count(routed: dict, config) -> int:
    counts = {units for _, units in routed.values()}
    if len(counts) != 1:
        raise StrategyError(f"{config['model_type']}: MoE layers with different expert counts {sorted(counts)}")
    return counts.pop()


def place_experts(model, group, arch, config, sets: dict, shared: tuple) -> None:
    """moe_experts' cut, sums and slot plans: in each MoE layer this rank
    keeps the experts sets[layer][rank] lists (gathered along the expert
    axis of the uncut lazy tensors, which loading materializes one at a
    time, so only their rows are kept), and grains `shared` (lo, hi, of)
    of every other tensor the rule cuts (a shared expert). Every rank
    computes the slots models/expert_layout.py assigns it from sets,
    whatever it holds."""
    rule = split_rule("moe_experts", arch)
    rank = group.rank()
    routed = routed_experts(model, arch, config)
    blocks = set()
    for path, module in list(model.named_modules()):
        split = rule(path, config)
        if split is None:
            continue
        if split.side == "axis0":
            layer, _ = routed[path.rsplit(".", 1)[0]]
            take(module, sets[layer][rank])
        else:
            cut(module, split.side, *shared, rank)
        blocks.add(moe_block_path(path))
    for path, (layer, count) in sorted(routed.items()):
        parent_path, name = path.rsplit(".", 1)
        parent = resolve(model, parent_path)
        parent[name] = LocalExperts(parent[name], layer, sets[layer][rank], layout.holders(sets[layer], count), rank)
    for path in sorted(blocks):
        parent_path, name = path.rsplit(".", 1)
        parent = resolve(model, parent_path)
        parent[name] = AllSumOutput(parent[name], group)


def take(module, experts) -> None:
    """Keep the listed rows of the first axis (whole experts) of a module's arrays."""
    rows = list(experts)
    contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else False

    def keep(x):
        if not isinstance(x, mx.array):
            return x
        # A contiguous range is a slice (the common case, and no gather op in the graph).
        return mx.contiguous(x[rows[0]:rows[0] + len(rows)] if contiguous else x[mx.array(rows)])

    module.update(tree_map(keep, module.parameters()))


def expert_counts(model):
    """pb.ExpertCounts of every LocalExperts in the model, by layer, or None."""
    from exod.proto import exod_pb2 as pb

    found = sorted(((m.layer, m.counts) for _, m in model.named_modules() if isinstance(m, LocalExperts)),
                   key=lambda lc: lc[0])
    if not found:
        return None
    return pb.ExpertCounts(layers=[pb.LayerCounts(layer=layer, counts=counts.tolist()) for layer, counts in found])


# Routing calibration during warm-up: a few short, fixed prompts of token
# ids, so that a rank's counts say something about its experts before any
# traffic, at the cost of one forward pass of each (64 tokens in all). The
# ids are spread over the vocabulary by a fixed stride, the same on every
# rank and every run.
CALIBRATION_PROMPTS = 4
CALIBRATION_TOKENS = 16


def calibration_prompts(vocab: int) -> list[list[int]]:
    return [[(p * 7919 + i * 104729 + 1) % vocab for i in range(CALIBRATION_TOKENS)]
            for p in range(CALIBRATION_PROMPTS)]


def calibrate_routing(model, config: dict) -> int:
    """Zero the routing counts (the canary's probes are not traffic), then
    run the calibration prompts through the model, as one batch in one pass:
    every rank runs it, since the MoE blocks sum over the ranks. Returns
    the tokens run (0 for a model without placed experts)."""
    held = [m for _, m in model.named_modules() if isinstance(m, LocalExperts)]
    if not held:
        return 0
    for m in held:
        m.counts[:] = 0
    prompts = calibration_prompts(int(config.get("vocab_size") or model.args.vocab_size))
    mx.eval(model(mx.array(prompts)))
    return len(prompts) * CALIBRATION_TOKENS


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
register("hybrid", hybrid)
