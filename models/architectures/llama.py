"""Dense GQA transformers whose mlx-lm classes shard(): llama, mistral,
qwen2, qwen3. Pipeline is exod's generic stage; tensor is the class's own
shard(), whose cuts gqa_tensor_split describes."""

from .base import Architecture, classify_generic, gqa_kv_cache, gqa_tensor_split, no_experts

ARCHITECTURE = Architecture(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    proven_strategies=frozenset({"pipeline", "tensor"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=lambda path, cfg: None,
    experts=no_experts,
)
