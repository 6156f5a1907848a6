"""GLM-4.5/4.6 MoE: GQA attention, dense first layers, routed plus shared experts."""

from .base import (
    Architecture,
    classify_generic,
    gqa_kv_cache,
    gqa_tensor_split,
    moe_tensor_split_generic,
)


def _shared_size(cfg: dict) -> int:
    return int(cfg["moe_intermediate_size"]) * int(cfg.get("n_shared_experts") or 1)


ARCHITECTURE = Architecture(
    name="glm4_moe",
    model_types=("glm4_moe",),
    proven_strategies=frozenset({"pipeline", "moe_tensor", "moe_experts"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=moe_tensor_split_generic("moe_intermediate_size", _shared_size),
    experts=lambda cfg: (int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"])),
)
