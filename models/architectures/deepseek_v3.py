"""DeepSeek-V3 family (V3, V3.1, Kimi-K2): multi-head latent attention, dense
first layers, routed plus shared experts."""

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
    # mlx-lm caches the compressed latent and the shared rope key, one "head"
    # wide; kv_a_proj is replicated under tensor parallelism, so is the cache.
    per_token = (int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"])) * element_bytes
    return [KvPart(i, per_token, kind="mla latent") for i in range(int(cfg["num_hidden_layers"]))]


def _shared_size(cfg: dict) -> int:
    return int(cfg["moe_intermediate_size"]) * int(cfg.get("n_shared_experts") or 1)


def _tensor_split(path: str, cfg: dict) -> Optional[Split]:
    """Mirrors mlx-lm's DeepseekV3 Model.shard()."""
    heads = int(cfg["num_attention_heads"])
    leaf = path.rsplit(".", 1)[-1]
    if ".self_attn." in path + ".":
        if leaf in ("q_b_proj", "q_proj"):
            return Split("rows", heads, "attention heads")
        if leaf in ("embed_q", "unembed_out"):
            return Split("axis0", heads, "attention heads")
        if leaf == "o_proj":
            cols = heads * int(cfg["v_head_dim"])
            return Split("cols", quant_group_units(heads, cols, cfg, path), "attention heads")
        return None
    if ".shared_experts." in path + ".":
        return expert_split(path, cfg, _shared_size(cfg))
    if ".switch_mlp." in path + ".":
        return expert_split(path, cfg, int(cfg["moe_intermediate_size"]))
    if ".mlp." in path + "." and not path.endswith(".mlp.gate"):
        return expert_split(path, cfg, int(cfg["intermediate_size"]))
    return None


ARCHITECTURE = Architecture(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    proven_strategies=frozenset({"pipeline", "moe_tensor", "tensor", "moe_experts"}),
    classify=classify_generic,
    kv_cache=_kv_cache,
    tensor_split=_tensor_split,
    moe_tensor_split=moe_tensor_split_generic("moe_intermediate_size", _shared_size),
    experts=lambda cfg: (int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"])),
)
