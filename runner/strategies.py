"""How a rank cuts the model. Each strategy is a function
(model, group, spec, architecture, config) -> None that changes the lazily
loaded model in place before its weights are materialized. What to cut comes
from the architecture module; nothing here names a model."""

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from exod.models.architectures import LAYER

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


def pipeline(model, group, spec, arch, config) -> None:
    """mlx-lm's pipeline: rank 0 runs the last layers and every rank computes
    the logits from the gathered output."""
    if group is None:
        return
    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise StrategyError(f"mlx-lm's {config['model_type']} class cannot pipeline")
    layers = len(inner.layers)
    split = list(spec.pipeline_layers)
    if not split:
        base, extra = divmod(layers, group.size())
        split = [base + (1 if r < extra else 0) for r in range(group.size())]
    if len(split) != group.size() or sum(split) != layers or min(split) < 1:
        raise StrategyError(f"pipeline split {split} does not cover {layers} layers on {group.size()} ranks")
    inner.pipeline(group, split)


def tensor(model, group, spec, arch, config) -> None:
    """mlx-lm's own shard(): heads, kv heads and MLPs split across ranks."""
    if group is None:
        return
    if not hasattr(model, "shard"):
        raise StrategyError(f"mlx-lm's {config['model_type']} class cannot tensor-shard")
    model.shard(group)


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
    """Experts split 1/N on their intermediate dimension; attention, router,
    dense layers and embeddings replicated; each MoE block's output summed."""
    if group is None:
        return
    blocks = set()
    for path, module in model.named_modules():
        split = arch.moe_tensor_split(path, config)
        if split is None:
            continue
        if split.side == "rows":
            shard_inplace(module, "all-to-sharded", group=group)
        else:
            shard_inplace(module, "sharded-to-all", group=group)
            if "bias" in module and group.rank() != 0:
                module.bias = mx.zeros_like(module.bias)  # added once, after the sum
        blocks.add(moe_block_path(path))
    if not blocks:
        raise StrategyError(f"{config['model_type']}: the architecture names no expert projections to split")
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
