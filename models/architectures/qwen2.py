"""Dense Qwen2: the same GQA blocks as llama, and an mlx-lm class that can
pipeline (the llama class in mlx-lm 0.32 cannot)."""

from .base import Architecture, classify_generic, gqa_kv_cache, gqa_tensor_split, no_experts

ARCHITECTURE = Architecture(
    name="qwen2",
    model_types=("qwen2",),
    proven_strategies=frozenset({"pipeline", "tensor"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=lambda path, cfg: None,
    experts=no_experts,
)
