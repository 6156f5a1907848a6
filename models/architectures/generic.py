"""Fallback for model types exod knows nothing special about: GQA KV cache,
pipeline only."""

from .base import Architecture, classify_generic, get, gqa_kv_cache, gqa_tensor_split


def _experts(cfg: dict) -> tuple[int, int]:
    experts = int(get(cfg, "num_experts", "n_routed_experts", "num_local_experts", default=0))
    per_token = int(get(cfg, "num_experts_per_tok", "experts_per_token", default=0))
    return (experts, per_token) if experts else (0, 0)


ARCHITECTURE = Architecture(
    name="generic",
    model_types=(),
    proven_strategies=frozenset({"pipeline"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=lambda path, cfg: None,
    experts=_experts,
    notes=("no architecture module: KV cache from the generic GQA formula, pipeline only",),
)
