"""gpt-oss: GQA attention with sinks, alternating sliding/full layers, mxfp4 experts."""

from .base import Architecture, classify_generic, gqa_kv_cache, gqa_tensor_split, moe_tensor_split_generic


def _kv_cache(cfg: dict, element_bytes: int):
    cfg = dict(cfg)
    if not cfg.get("layer_types"):
        # Published configs alternate sliding and full attention, sliding first.
        cfg["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(int(cfg["num_hidden_layers"]))
        ]
    return gqa_kv_cache(cfg, element_bytes)


ARCHITECTURE = Architecture(
    name="gpt_oss",
    model_types=("gpt_oss",),
    proven_strategies=frozenset({"pipeline", "moe_tensor", "moe_experts"}),
    classify=classify_generic,
    kv_cache=_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=moe_tensor_split_generic("intermediate_size", lambda cfg: 0),
    experts=lambda cfg: (
        int(cfg.get("num_local_experts") or cfg["num_experts"]),
        int(cfg.get("num_experts_per_tok") or cfg["experts_per_token"]),
    ),
)
