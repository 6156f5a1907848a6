"""Dense GQA transformers: llama, mistral, qwen3. Pipeline is not proven:
mlx-lm 0.32's classes for these have no pipeline support (qwen2's does)."""

from .base import Architecture, classify_generic, gqa_kv_cache, gqa_tensor_split, no_experts

ARCHITECTURE = Architecture(
    name="llama",
    model_types=("llama", "mistral", "qwen3"),
    proven_strategies=frozenset({"tensor"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=lambda path, cfg: None,
    experts=no_experts,
)
