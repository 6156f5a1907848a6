"""DeepSeek-V4 family: hyper-connections, a grouped low-rank output
projection, and attention over a raw sliding window plus time-compressed
history. Two classes: mlx-lm's deepseek_v41 (self_attn/mlp names, layers that
read other layers' compressed history, its own pipeline()), and deepseek_v4,
the V4-Flash checkpoint's model type, run by exod's own class
(models/deepseek_v4_model.py) while the installed mlx-lm has none. In the
latter every layer reads only its own cache, so exod's generic pipeline
stage carries it: the hyper-connection streams are the hidden state passed
between stages, and the token ids the hash-routed layers read are on every
rank already."""

from typing import Optional

from .base import (
    Architecture,
    KvPart,
    Split,
    classify_generic,
    expert_split,
    moe_tensor_split_generic,
    quant_group_units,
)


def _kv_cache(cfg: dict, element_bytes: int) -> list[KvPart]:
    """Every layer keeps the last `sliding_window` latents of head_dim. Layers
    with compress ratio r > 1 add one latent per r tokens (only kv-source layers
    store them when the config names sources; others read a source's), and
    indexer layers add one index key of index_head_dim per r tokens."""
    layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg["head_dim"])
    window = int(cfg.get("sliding_window") or 128)
    ratios = list(cfg.get("compress_ratios") or [])
    ratios += [0] * (layers - len(ratios))
    kv_sources = set(cfg.get("kv_source_layer_ids") or [i for i, r in enumerate(ratios) if r > 1])
    named_index = set(cfg.get("index_source_layer_ids") or [])
    index_sources = (named_index & kv_sources) if named_index else {
        i for i, r in enumerate(ratios) if r == 4
    }
    index_dim = int(cfg.get("index_head_dim") or 128)
    parts = []
    for i in range(layers):
        parts.append(KvPart(i, head_dim * element_bytes, window, kind="window"))
        r = ratios[i]
        if r > 1 and i in kv_sources:
            parts.append(KvPart(i, head_dim * element_bytes / r, kind="compressed"))
        if r > 1 and i in index_sources:
            parts.append(KvPart(i, index_dim * element_bytes / r, kind="index keys"))
    return parts


def _is_v41(cfg: dict) -> bool:
    return cfg.get("model_type") == "deepseek_v41"


def _tensor_split(path: str, cfg: dict) -> Optional[Split]:
    """Mirrors the classes' shard(): whole heads and whole output groups per
    rank (slicing heads across an output group is the bug this project
    exists to catch). deepseek_v41 names first, then deepseek_v4's."""
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg["o_groups"])
    if path.endswith("self_attn.q_b_proj") or path.endswith(".attn.wq_b"):
        return Split("rows", heads, "attention heads")
    if path.endswith("self_attn.sinks") or path.endswith(".attn.attn_sink"):
        return Split("axis0", heads, "attention heads")
    if path.endswith("self_attn.o_a_proj"):
        return Split("axis0", groups, "output groups")
    if path.endswith(".attn.wo_a"):
        return Split("rows", groups, "output groups")
    if path.endswith("self_attn.o_b_proj") or path.endswith(".attn.wo_b"):
        cols = groups * int(cfg["o_lora_rank"])
        return Split("cols", quant_group_units(groups, cols, cfg, path), "output groups")
    if ".shared_experts." in path + ".":
        return expert_split(path, cfg, int(cfg["moe_intermediate_size"]))
    if ".switch_mlp." in path + "." or ".experts." in path + ".":
        return expert_split(path, cfg, int(cfg["moe_intermediate_size"]))
    return None


def _canary_layers(cfg: dict) -> list[int]:
    """Layers that read compressed history only from themselves, so one can
    be computed alone from a hidden state (every deepseek_v4 layer)."""
    if not _is_v41(cfg):
        return list(range(int(cfg["num_hidden_layers"])))
    from mlx_lm.models import deepseek_v41 as impl

    args = impl.ModelArgs.from_dict(cfg)
    return [i for i in range(args.num_hidden_layers)
            if all(source == i for source in impl._shared_reads(args, i).values())]


def _probe(layer, x, cfg: dict):
    """One decoder layer on hidden state x: expand into the hyper-connection
    streams as the model's first layer sees them, return the streams.
    deepseek_v4 layers also take the token ids (hash-routed layers read
    them) and a fresh cache of their own."""
    import mlx.core as mx

    if not _is_v41(cfg):
        import importlib

        own = importlib.import_module("mlx_lm.models.deepseek_v4")
        batch, length, hidden = x.shape
        streams = mx.broadcast_to(x[:, :, None, :], (batch, length, int(cfg["hc_mult"]), hidden))
        tokens = mx.broadcast_to(mx.arange(length) * 7 % int(cfg["vocab_size"]), (batch, length))
        return layer(streams, tokens, own.LayerCache(int(cfg.get("sliding_window") or 128)))
    from mlx_lm.models import deepseek_v41 as impl

    args = impl.ModelArgs.from_dict(cfg)
    batch, length, hidden = x.shape
    streams = mx.broadcast_to(x[:, :, None, :], (batch, length, args.hc_mult, hidden))
    pre_mix = mx.zeros((batch, length, args.hc_mult), dtype=mx.float32)
    pre_mix[..., 0] = 1.0
    window_idx = impl._window_indices(previous=0, length=length, window=args.sliding_window)
    window_idx = mx.broadcast_to(window_idx, (batch, *window_idx.shape))
    streams, _ = layer(streams, pre_mix, start_pos=0, window_idx=window_idx,
                       cache=impl.LayerCache(args.sliding_window), shared={})
    return streams


def _pipeline(model, group, split: list, stages=None) -> None:
    """deepseek_v41: layers read compressed history from other layers'
    caches, state outside the layers that exod's generic stage cannot carry:
    the class's own pipeline() sends it between stages (rank 0 runs the last
    layers, as in the generic stage), one rank per stage. deepseek_v4:
    exod's generic stage, hybrid stages included."""
    if hasattr(model.model, "pipeline"):
        if stages is not None:
            raise ValueError("mlx-lm's deepseek_v41 pipelines one rank per stage")
        model.model.pipeline(group, split)
        return
    from exod.runner import pipeline as stage

    stage.apply(model, group, split, stages)


ARCHITECTURE = Architecture(
    name="deepseek_v4",
    model_types=("deepseek_v41", "deepseek_v4"),
    # Tensor parallelism stays off until the runner's equivalence tests pass
    # for it: head-parallel V4 attention is the bug that started exod.
    proven_strategies=frozenset({"pipeline", "moe_tensor", "moe_experts"}),
    classify=classify_generic,
    kv_cache=_kv_cache,
    tensor_split=_tensor_split,
    moe_tensor_split=moe_tensor_split_generic("moe_intermediate_size", lambda cfg: int(cfg["moe_intermediate_size"]) * int(cfg.get("n_shared_experts") or 1)),
    experts=lambda cfg: (int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"])),
    canary_layers=_canary_layers,
    probe=_probe,
    step=None,  # a layer reads compressed history the model keeps outside it
    pipeline=_pipeline,
    own_pipeline=frozenset({"deepseek_v41"}),
)
