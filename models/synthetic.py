"""Tiny models built deterministically from mlx-lm's own classes: seeded
random weights, saved as an MLX checkpoint directory. No hub downloads."""

import contextlib
import io
import json
from pathlib import Path
from typing import Optional

# Small configs of each supported architecture, shaped like the real thing:
# MoE layers after dense ones, shared experts, MLA, grouped KV heads.
TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=512, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
        moe_layer_freq=1, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        max_position_embeddings=2048, rope_theta=10000.0,
    ),
}


def build(
    out_dir: Path,
    config: dict,
    seed: int = 0,
    dtype: str = "float32",
    quantization: Optional[dict] = None,
) -> Path:
    """Write config.json and model.safetensors for `config` into out_dir.

    quantization: {"group_size", "bits", "mode"} to quantize as mlx_lm.convert
    would (mlx-lm's own quantize_model, so per-module choices match)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "torch_dtype": dtype}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    if quantization:
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits/weight
            model, config = quantize_model(
                model, config, quantization.get("group_size"), quantization.get("bits"),
                mode=quantization.get("mode", "affine"),
            )
        config.pop("quantization_config", None)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir
