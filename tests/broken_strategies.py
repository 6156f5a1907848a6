"""Strategies that load cleanly and compute the wrong thing, or never finish
loading. The runner imports this module through EXOD_RUNNER_PLUGINS; the
canary and the deadlines must stop every one of them before Ready."""

import time

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from exod.models import expert_layout as layout
from exod.runner import strategies


def moe_tensor_without_sum(model, group, spec, arch, config):
    """Experts split 1/N, partial outputs never summed."""
    for path, module in model.named_modules():
        split = arch.moe_tensor_split(path, config)
        if split is not None:
            shard_inplace(module, "all-to-sharded" if split.side == "rows" else "sharded-to-all", group=group)


def heads_across_output_groups(model, group, spec, arch, config):
    """The bug exod exists to catch: head-parallel V4 attention where a rank's
    heads are not the heads of its output groups. Rank r gets heads r, r+N,
    r+2N... while o_a_proj/o_b_proj give it whole contiguous groups."""
    n = group.size()
    heads = int(config["num_attention_heads"])
    order = mx.array([h for r in range(n) for h in range(r, heads, n)])
    for layer in model.layers:
        if "self_attn" in layer:  # mlx-lm's deepseek_v41
            attn = layer.self_attn
            w = attn.q_b_proj.weight
            attn.q_b_proj.weight = w.reshape(heads, -1, w.shape[-1])[order].reshape(w.shape)
            attn.sinks = attn.sinks[order]
        else:  # exod's deepseek_v4 class: the query rows (and their quantization) of each head move
            attn = layer.attn
            for name in ("weight", "scales", "biases"):
                if name in attn.wq_b:
                    w = attn.wq_b[name]
                    setattr(attn.wq_b, name, w.reshape(heads, -1, w.shape[-1])[order].reshape(w.shape))
            attn.attn_sink = attn.attn_sink[order]
    model.shard(group)


def heads_by_output_groups(model, group, spec, arch, config):
    """Not broken: the control for heads_across_output_groups. The class's
    own head-parallel shard() (whole output groups per rank), run although
    the planner does not offer tensor for V4; it must pass the canary, so
    that the broken variant fails for its head order alone."""
    model.shard(group)


def hang_while_loading(model, group, spec, arch, config):
    while True:
        time.sleep(0.1)


def stages_in_rank_order(model, group, spec, arch, config):
    """Whole layers, but rank 0 holds the first ones while mlx-lm's pipeline
    still passes activations from the last rank down to rank 0: every rank
    gets the same finite logits, of a model with its layers reordered."""
    inner = model.model
    layers = list(inner.layers)
    inner.pipeline(group)
    split = [len(layers) // group.size()] * group.size()
    split[-1] += len(layers) - sum(split)
    start = sum(split[:group.rank()])
    inner.start_idx, inner.end_idx = start, start + split[group.rank()]
    inner.layers = layers[:inner.end_idx]
    inner.layers[:start] = [None] * start


def _dense_layers(model, arch, config):
    return [(i, layer) for i, layer in enumerate(model.layers)
            if not any(arch.moe_tensor_split(f"model.layers.{i}.{path}", config) for path, _ in layer.named_modules())]


def dense_layer_without_sum(model, group, spec, arch, config):
    """moe_tensor done right, and the last dense layer's MLP (not the first
    MoE layer, the one the canary used to check alone) split 1/N with its
    partial outputs never summed."""
    strategies.moe_tensor(model, group, spec, arch, config)
    _, layer = _dense_layers(model, arch, config)[-1]
    shard_inplace(layer.mlp.gate_proj, "all-to-sharded", group=group)
    shard_inplace(layer.mlp.up_proj, "all-to-sharded", group=group)
    shard_inplace(layer.mlp.down_proj, "sharded-to-all", group=group)


def embedding_rows_rotated(model, group, spec, arch, config):
    """moe_tensor done right, but every rank's embedding rows are gathered
    in the wrong order (the last 1/N of the vocabulary first): the same wrong
    table on every rank, so the ranks agree on finite logits."""
    strategies.moe_tensor(model, group, spec, arch, config)
    embed = model.model.embed_tokens
    n = group.size()
    for name in ("weight", "scales", "biases"):
        if name in embed:
            table = embed[name]
            cut = table.shape[0] - table.shape[0] // n
            setattr(embed, name, mx.concatenate([table[cut:], table[:cut]]))


class _NoHistoryForOneToken(nn.Module):
    """Attention whose one-token step reads no cached keys and values (and
    never writes them): a wrong KV slice on the decode path only."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, x, mask=None, cache=None):
        if x.shape[1] == 1:
            return self.inner(x, None, None)
        return self.inner(x, mask, cache)


def decode_without_history(model, group, spec, arch, config):
    strategies.moe_tensor(model, group, spec, arch, config)
    layer = model.layers[-1]
    layer.self_attn = _NoHistoryForOneToken(layer.self_attn)


def stages_sharing_a_cache(model, group, spec, arch, config):
    """exod's pipeline stage, with the second layer a rank holds given the
    first one's cache: whole, unchanged layers, the stages tiled right, and
    every rank's one-pass logits agree; only the cached path goes wrong."""
    from mlx_lm.models.cache import KVCache

    strategies.pipeline(model, group, spec, arch, config)
    stage = model.exod_stage
    make = getattr(model, "make_cache", None)  # a class without one gets a KVCache per layer

    def shared():
        caches = make() if make else [KVCache() for _ in model.layers]
        caches[stage.start + 1] = caches[stage.start]
        return caches

    model.make_cache = shared


def _moe_tensor_with_grains(model, group, arch, config, lo, hi, of):
    """moe_tensor's own cut and sums, of grains [lo, hi) of `of`."""
    blocks = set()
    for path, module in list(model.named_modules()):
        split = arch.moe_tensor_split(path, config)
        if split is not None:
            strategies.cut(module, split.side, lo, hi, of, group.rank())
            blocks.add(strategies.moe_block_path(path))
    for path in sorted(blocks):
        parent_path, name = path.rsplit(".", 1)
        parent = strategies.resolve(model, parent_path)
        parent[name] = strategies.AllSumOutput(parent[name], group)


def uneven_grains_overlapping(model, group, spec, arch, config):
    """Uneven moe_tensor where each rank keeps as many grains as its share
    says but starts them at rank x its own width, as an even split would:
    with shares 2, 1, 1 of 4, ranks hold grains 0-1, 1 and 2, so grain 1
    is summed twice and grain 3 is on no rank."""
    lo, hi, of = strategies.rank_grains("moe_tensor", model, arch, config, spec.shares, group)
    width = hi - lo
    start = group.rank() * width
    _moe_tensor_with_grains(model, group, arch, config, start, start + width, of)


def uneven_grains_dropped(model, group, spec, arch, config):
    """Uneven moe_tensor where the last rank holds one grain fewer than its
    share: every rank's cut is whole and summed, and one grain of every
    expert is on no rank."""
    lo, hi, of = strategies.rank_grains("moe_tensor", model, arch, config, spec.shares, group)
    if group.rank() == group.size() - 1:
        hi -= 1
    _moe_tensor_with_grains(model, group, arch, config, lo, hi, of)


def _contiguous(model, arch, config, bounds: list) -> dict:
    """Each rank's experts [a, b) of bounds, in every MoE layer."""
    routed = strategies.routed_experts(model, arch, config)
    count = next(iter(routed.values()))[1]
    ranges = [strategies.grains.cut(count, lo, hi, of) for lo, hi, of in bounds]
    return layout.contiguous(count, ranges, sorted({layer for layer, _ in routed.values()}))


def _compute_all_held(model, rank: int) -> None:
    """Every expert this rank holds computes every slot routed to it, as if
    no other rank held it: replicas no longer take turns."""
    for _, module in model.named_modules():
        if isinstance(module, strategies.LocalExperts):
            routing = module._routing
            routing.holders = tuple((rank,) if routing.local[e] >= 0 else h for e, h in enumerate(routing.holders))


def _shared_grains(model, group, arch, config, spec) -> tuple:
    return strategies.rank_grains("moe_experts", model, arch, config, spec.shares, group)


def experts_on_two_ranks(model, group, spec, arch, config):
    """moe_experts where each rank keeps as many experts as its share says
    but starts them at rank x its own width: with shares 4, 3, 1 of 8,
    ranks hold experts 0-3, 3-5 and 2, so experts 2 and 3 are computed on
    two ranks for the same tokens and summed twice, and 6 and 7 on none."""
    lo, hi, of = _shared_grains(model, group, arch, config, spec)
    shares = list(spec.shares)
    bounds = [(r * shares[r], (r + 1) * shares[r], of) for r in range(group.size())]
    sets = _contiguous(model, arch, config, bounds)
    strategies.place_experts(model, group, arch, config, sets, (lo, hi, of))
    _compute_all_held(model, group.rank())


def expert_on_no_rank(model, group, spec, arch, config):
    """moe_experts where the last rank drops its last expert: every routed
    slot to it is zero everywhere."""
    lo, hi, of = _shared_grains(model, group, arch, config, spec)
    held = list(spec.shares)
    bounds = [(*strategies.grains.bounds(held, r), of) for r in range(group.size())]
    bounds[-1] = (bounds[-1][0], bounds[-1][1] - 1, of)
    strategies.place_experts(model, group, arch, config, _contiguous(model, arch, config, bounds), (lo, hi, of))


def replicas_not_split(model, group, spec, arch, config):
    """moe_experts with the spec's expert layout, held as it says, but each
    replicated expert computes every slot routed to it on every rank that
    holds it: those slots are summed once per replica."""
    strategies.moe_experts(model, group, spec, arch, config)
    _compute_all_held(model, group.rank())


def layout_expert_dropped(model, group, spec, arch, config):
    """moe_experts with the spec's expert layout (validated), but each rank
    drops the first expert the layout gives it in every MoE layer: those
    experts are on no rank, and their slots are zero everywhere."""
    routed = strategies.routed_experts(model, arch, config)
    count = next(iter(routed.values()))[1]
    sets = layout.validate(spec.expert_layout, count, sorted({layer for layer, _ in routed.values()}), group.size())
    sets = {layer: [experts[1:] for experts in per_rank] for layer, per_rank in sets.items()}
    strategies.place_experts(model, group, arch, config, sets, (0, 1, 1))


strategies.register("experts_on_two_ranks", experts_on_two_ranks)
strategies.register("replicas_not_split", replicas_not_split)
strategies.register("layout_expert_dropped", layout_expert_dropped)
strategies.register("expert_on_no_rank", expert_on_no_rank)
strategies.register("uneven_grains_overlapping", uneven_grains_overlapping)
strategies.register("uneven_grains_dropped", uneven_grains_dropped)
strategies.register("dense_layer_without_sum", dense_layer_without_sum)
strategies.register("embedding_rows_rotated", embedding_rows_rotated)
strategies.register("decode_without_history", decode_without_history)
strategies.register("stages_sharing_a_cache", stages_sharing_a_cache, whole_layers=True)
strategies.register("moe_tensor_without_sum", moe_tensor_without_sum)
strategies.register("stages_in_rank_order", stages_in_rank_order, whole_layers=True)
strategies.register("heads_across_output_groups", heads_across_output_groups)
strategies.register("heads_by_output_groups", heads_by_output_groups)
strategies.register("hang_while_loading", hang_while_loading)


def diverging_sampler(model, group, spec, arch, config):
    """A correct cut whose rank 1 samples a different token than rank 0: it
    passes the canary (sampling is not part of it) and must be caught by the
    token-hash control exchange while decoding. Rank 1's batch engine gets
    a greedy sampler that picks the next token id."""
    from mlx_lm.generate import BatchGenerator, greedy_sampler

    from exod.runner import engine

    strategies.moe_tensor(model, group, spec, arch, config)
    if group.rank() == 1:
        class Shifted(BatchGenerator):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, sampler=lambda lp: (greedy_sampler(lp) + 1) % lp.shape[-1], **kwargs)

        engine.BatchGenerator = Shifted


strategies.register("diverging_sampler", diverging_sampler)


def hybrid_stage_without_sum(model, group, spec, arch, config):
    """A hybrid whose stages cut their experts over their ranks and never
    sum them: each rank of a stage goes on with its own partial output."""
    from exod.runner.stages import StageGroup

    strategies.hybrid(model, group, spec, arch, config)

    class Alone(StageGroup):
        def all_sum(self, x):
            return x

    for _, module in model.named_modules():
        if isinstance(module, strategies.AllSumOutput):
            stage = module._group
            module._group = Alone(stage.world, stage.lo, stage.hi)


def hybrid_stage_ranks_shifted(model, group, spec, arch, config):
    """A hybrid whose stages' ranks do not agree on their layers: the last
    rank of each stage of several ranks runs the next stage's layers as
    its own, so the stages no longer tile the model the way they pass
    activations."""
    from exod.runner import pipeline
    from exod.runner.stages import stages_of

    stages = stages_of(spec.stage_ranks, group.size())
    mine = stages.of_rank(group.rank())
    lo, hi = stages.bounds(mine)
    split = list(spec.pipeline_layers)
    if hi - lo > 1 and group.rank() == hi - 1 and mine + 1 < len(split):
        split[mine], split[mine + 1] = split[mine + 1], split[mine]
    pipeline.apply(model, group, split, stages)


strategies.register("hybrid_stage_without_sum", hybrid_stage_without_sum)
strategies.register("hybrid_stage_ranks_shifted", hybrid_stage_ranks_shifted)
