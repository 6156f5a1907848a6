"""Qwen3 MoE: GQA attention, a router and SwitchGLU experts in every sparse layer."""

from .base import (
    Architecture,
    classify_generic,
    gqa_kv_cache,
    gqa_tensor_split,
    moe_tensor_split_generic,
)

ARCHITECTURE = Architecture(
    name="qwen3_moe",
    model_types=("qwen3_moe", "qwen2_moe"),
    proven_strategies=frozenset({"pipeline", "moe_tensor", "tensor", "moe_experts"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=moe_tensor_split_generic(
        "moe_intermediate_size",
        lambda cfg: int(cfg.get("shared_expert_intermediate_size") or 0),
    ),
    experts=lambda cfg: (int(cfg["num_experts"]), int(cfg["num_experts_per_tok"])),
)
