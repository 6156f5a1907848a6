"""RunnerReady is earned. Before a rank reports Ready it shows that the model
as cut computes what the uncut model computes:

1. Where the strategy cuts layers (tensor, moe_tensor): one whole transformer
   layer (attention and, where there is one, the MoE block) is computed as
   the instance will compute it, and again from a fresh, uncut copy of only
   that layer read from the same checkpoint. Where it hands out whole layers
   (pipeline), the ranks' layer ranges must tile the model in the order the
   stages pass activations on: that, not the unchanged layers, is what such
   a strategy can get wrong.
2. The full model's logits for a probe prompt are finite and equal on every
   rank.

A single rank cuts nothing, so it only checks that its logits are finite.

Every rank shares its verdict with every other, so all fail together."""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .loading import held_layer_indices
from .shard_loading import load_model  # a whole checkpoint or a shard (its canary layer is whole)

PROBE_TOKENS = 8
# The whole-model pass proves wiring (every stage, every all-sum) and agreement,
# not expert coverage, which the layer check gives. On CPU an MoE forward costs
# in proportion to tokens × experts chosen, and this pass is on the path to
# Ready: two tokens keep attention non-trivial at a quarter of the cost.
WIRING_PROBE_TOKENS = 2
PROBE_SEED = 20261126
# |sharded - uncut| allowed, relative to max(1, max |uncut|): summation order
# is the only difference between the two when the cut is right.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 3e-2}
AGREEMENT_TOLERANCE = 1e-5


class CanaryFailed(Exception):
    pass


@dataclass
class Verdict:
    layer: int
    max_delta: float


def activation_dtype(model) -> mx.Dtype:
    embed = model.model.embed_tokens
    return embed.scales.dtype if hasattr(embed, "scales") else embed.weight.dtype


def choose_layer(model, config, arch) -> int:
    """The first layer this rank holds that can be probed alone, preferring
    one with experts so that the MoE cut is exercised too."""
    held = held_layer_indices(model)
    probeable = [i for i in held if i in set(arch.canary_layers(config))] or held
    with_experts = [i for i in probeable if _has_experts(model.layers[held.index(i)], arch, config, i)]
    return (with_experts or probeable)[0]


def _has_experts(layer, arch, config, index) -> bool:
    return any(arch.moe_tensor_split(f"model.layers.{index}.{path}", config) for path, _ in layer.named_modules())


def _shared_max(group, value: float, rank: int, size: int) -> list[float]:
    """Every rank's value, on every rank."""
    if group is None:
        return [value]
    local = mx.zeros((size,), dtype=mx.float32)
    local[rank] = value
    return mx.distributed.all_sum(local, group=group).tolist()


def run(model, config, arch, model_dir: str, group, whole_layers: bool = False) -> Verdict:
    rank = group.rank() if group else 0
    size = group.size() if group else 1
    if group is None:
        # One rank is never a sharding: the model is mlx-lm's own, whole, and
        # comparing a layer with itself would prove nothing.
        verdict = Verdict(held_layer_indices(model)[0], 0.0)
    elif whole_layers:
        verdict = _check_tiling(model, config, group, rank, size)
    else:
        verdict = _check_cut_layer(model, config, arch, model_dir, group, rank, size)
    _check_wiring(model, config, group, size)
    return verdict


def _check_tiling(model, config, group, rank: int, size: int) -> Verdict:
    """Stages pass activations from the last rank down to rank 0 (mlx-lm's
    order), so rank size-1 must start at layer 0, each rank must start where
    the next one ends, and rank 0 must end at the last layer."""
    held = held_layer_indices(model)
    starts = _shared_max(group, float(held[0]), rank, size)
    ends = _shared_max(group, float(held[-1] + 1), rank, size)
    total = int(config["num_hidden_layers"])
    expected_end = total
    for r in range(size):
        start, end = int(starts[r]), int(ends[r])
        if end != expected_end or start >= end:
            raise CanaryFailed(f"canary: rank {r} holds layers {start}..{end - 1}, but the stages must "
                               f"end at layer {expected_end - 1} there")
        expected_end = start
    if expected_end != 0:
        raise CanaryFailed(f"canary: the stages leave layers 0..{expected_end - 1} out")
    return Verdict(held[0], 0.0)


def _check_cut_layer(model, config, arch, model_dir: str, group, rank: int, size: int) -> Verdict:
    dtype = activation_dtype(model)
    layer_index = choose_layer(model, config, arch)
    held = held_layer_indices(model)

    probe = mx.random.normal((1, PROBE_TOKENS, int(config["hidden_size"])), key=mx.random.key(PROBE_SEED))
    probe = probe.astype(dtype)
    cut = arch.probe(model.layers[held.index(layer_index)], probe, config)
    mx.eval(cut)

    reference_model, _ = load_model(Path(model_dir), lazy=True)
    uncut = arch.probe(reference_model.layers[layer_index], probe, config)
    mx.eval(uncut)
    del reference_model
    mx.clear_cache()

    diff = mx.abs(cut.astype(mx.float32) - uncut.astype(mx.float32)).max().item()
    scale = max(1.0, mx.abs(uncut.astype(mx.float32)).max().item())
    finite = bool(mx.isfinite(cut).all().item())
    delta = diff / scale if finite else float("inf")
    deltas = _shared_max(group, min(delta, 3e38), rank, size)
    layers = _shared_max(group, float(layer_index), rank, size)
    limit = TOLERANCE.get(dtype, 3e-2)
    for r, (d, k) in enumerate(zip(deltas, layers)):
        if not d <= limit:
            raise CanaryFailed(f"canary: layer {int(k)} differs on rank {r}, max |Δ| = {d:.3g} "
                               f"(relative; the limit for {str(dtype).split('.')[-1]} is {limit:g})")
    return Verdict(layer_index, max(deltas))


def _check_wiring(model, config, group, size: int) -> None:
    rank = group.rank() if group else 0
    tokens = mx.array([[(7 * i + 3) % int(config["vocab_size"]) for i in range(WIRING_PROBE_TOKENS)]])
    logits = model(tokens)[0, -1].astype(mx.float32)
    if group is not None:
        mean = mx.distributed.all_sum(logits, group=group) / size
    else:
        mean = logits
    mx.eval(logits, mean)
    finite = bool(mx.isfinite(logits).all().item())
    disagreement = mx.abs(logits - mean).max().item() / max(1.0, mx.abs(mean).max().item()) if finite else 3e38
    spreads = _shared_max(group, disagreement, rank, size)
    for r, d in enumerate(spreads):
        if d >= 3e38:
            raise CanaryFailed(f"canary: rank {r} produced non-finite logits")
        if d > AGREEMENT_TOLERANCE:
            raise CanaryFailed(f"canary: ranks disagree on the logits, rank {r} is off by {d:.3g}")
