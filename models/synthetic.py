"""Tiny models built deterministically from mlx-lm's own classes: seeded
random weights, saved as an MLX checkpoint directory. No hub downloads."""

import contextlib
import io
import json
from pathlib import Path
from typing import Optional

# DeepSeek-V4-Flash's structure (models/catalog/deepseek-v4-flash.json),
# scaled down: hyper-connections of 4 streams, 3 hash-routed layers (the
# third one compressed, as in the card), layers of every compress ratio
# (0: window only; 4: overlapping pools and the indexer; 128: plain pools;
# transformers' deepseek_v4 config, which tokenizer loading parses, accepts
# no other ratio), a window of 8 so that it wraps, an index top-k of 2 so
# that the indexer chooses, a SwiGLU limit low enough to clamp.
V4_MINI = dict(
    model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], hidden_size=64,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=8,
    q_lora_rank=32, o_lora_rank=32, o_groups=2, moe_intermediate_size=192, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, num_hash_layers=3, scoring_func="sqrtsoftplus",
    topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5, swiglu_limit=0.25,
    hidden_act="silu", hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, index_n_heads=2, index_head_dim=16,
    index_topk=2, sliding_window=8, compress_ratios=[0, 0, 4, 128, 4, 128], compress_rope_theta=160000,
    rope_theta=10000, rope_scaling={"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                                    "original_max_position_embeddings": 256},
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

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
    # Biased q, k and v projections; 16 heads in 8 KV-head groups, so that
    # tensor runs on 3 and 4 ranks in uneven whole KV-head groups.
    "qwen2": dict(
        model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    # The DeepSeek-V4 attention: grouped low-rank output, sinks, a raw window
    # plus compressed history and an indexer, hyper-connections.
    "deepseek_v41": dict(
        model_type="deepseek_v41", vocab_size=512, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, head_dim=64, q_lora_rank=64, qk_rope_head_dim=16, o_groups=2,
        o_lora_rank=32, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        # Mixed ratios ([0, 4, 8, 4]) make mlx-lm 0.32.2's class return different
        # outputs for the same input; one ratio keeps it deterministic.
        sliding_window=16, compress_ratios=[0, 4, 4, 4], kv_source_layer_ids=[1, 2, 3],
        index_source_layer_ids=[1, 3], index_n_heads=2, index_head_dim=32, index_topk=8,
        candidate_topk_blocks=0, hc_mult=2, hc_sinkhorn_iters=4, max_position_embeddings=4096,
        rms_norm_eps=1e-6,
    ),
    # exod's own deepseek_v4 class (models/deepseek_v4_model.py): v4-mini.
    "deepseek_v4": dict(V4_MINI, vocab_size=512),
    "glm4_moe": dict(
        model_type="glm4_moe", vocab_size=512, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, n_group=1, topk_group=1, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=1.0, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        use_qk_norm=True, tie_word_embeddings=False, attention_bias=True, partial_rotary_factor=0.5,
    ),
    "qwen3": dict(
        model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    # mlx-lm runs mistral with its llama class; this one mixes sliding-window
    # and full layers (the class reads each layer's use_sliding in its forward),
    # with a window shorter than prompt plus answer so that it wraps.
    "mistral": dict(
        model_type="mistral", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    ),
    # Sliding-window layers in a pattern, the global ones every third: masks
    # come from cache[0] and cache[2], caches of two kinds (make_cache).
    "gemma3_text": dict(
        model_type="gemma3_text", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=16, sliding_window_pattern=3, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_local_base_freq=10000.0, max_position_embeddings=2048,
    ),
    # Fused qkv and gate_up projections.
    "phi3": dict(
        model_type="phi3", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, original_max_position_embeddings=2048,
    ),
    # LayerNorm with biases, a GELU MLP (c_fc, c_proj), tied embeddings.
    "starcoder2": dict(
        model_type="starcoder2", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, norm_epsilon=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True,
    ),
    # Post-attention and post-MLP norms, fused gate_up, partial rotary.
    "glm4": dict(
        model_type="glm4", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        attention_bias=True, partial_rotary_factor=0.5, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048,
    ),
    # Norms after attention and MLP instead of before, q/k norms.
    "olmo2": dict(
        model_type="olmo2", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    # A shared expert behind a sigmoid gate, and a class without shard().
    "qwen2_moe": dict(
        model_type="qwen2_moe", vocab_size=512, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, shared_expert_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    # A mixture of experts no architecture module describes (the generic one cuts it).
    "mixtral": dict(
        model_type="mixtral", vocab_size=512, hidden_size=128, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
    ),
    # Biased experts and attention sinks, alternating sliding and full attention.
    "gpt_oss": dict(
        model_type="gpt_oss", num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=512, hidden_size=128, intermediate_size=128, head_dim=32, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, rope_theta=10000,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    # A hybrid decoder: short convolutions (recurrent state in mlx-lm's
    # ArraysCache) between attention layers. Its pipeline stages decode one
    # sequence at a time (runner/pipeline.py).
    "lfm2": dict(
        model_type="lfm2", vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
        block_dim=128, block_ff_dim=256, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False, full_attn_idxs=[1, 3], rope_theta=10000.0, tie_word_embeddings=True,
    ),
}

# Models with a tokenizer, built on demand by name. `demo` is the README's
# quick-start model; `midsize-moe` (about 1.4 GB) is for memory and speed;
# `matrix-moe` (about 0.7 GB) divides by 2 and 3 ranks under every strategy
# (12 heads, 6 kv heads, expert width 384), for the link-profile matrix;
# `calibration-tensor` is what `exod calibrate` times a sharded decode on.
NAMED = {
    "demo": dict(
        model_type="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "midsize-moe": dict(
        model_type="qwen3_moe", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "matrix-moe": dict(
        model_type="qwen3_moe", hidden_size=1024, intermediate_size=1536, moe_intermediate_size=384,
        num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=6, head_dim=64,
        num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "v4-mini": V4_MINI,
    "calibration-tensor": dict(
        model_type="qwen3_moe", hidden_size=768, intermediate_size=1536, moe_intermediate_size=384,
        num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=6, head_dim=64,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}
# Built with skewed routing (router_skew below): what a routing-aware expert
# placement should beat an even one on.
NAMED["skewed-moe"] = dict(NAMED["demo"])
# The same skew on a model whose decode time is mostly its experts' (wide
# experts, small attention, few layers): where expert placement shows in
# tokens/s (bench/hetero.py). About 0.45 GB.
NAMED["skewed-wide-moe"] = dict(
    model_type="qwen3_moe", hidden_size=512, intermediate_size=1024, moe_intermediate_size=2048,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
    tie_word_embeddings=False,
)
SKEWED = {"skewed-moe", "skewed-wide-moe"}
TOKENIZER_VOCAB = 1024
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_WORDS = (
    "the a an of to and in on for with at by from model layer token rank node memory link cluster "
    "expert router attention cache shard pipeline tensor ring group machine daemon runner ready "
    "load plan place split send receive sum gather fast slow small large first last every each "
    "one two three four eight sixteen bytes seconds prompt answer question hello world what how "
    "why when where is are was were be can will should must not no yes it this that these those "
    "we you they he she i my your our their mac linux thunderbolt ethernet wifi gpu cpu chip"
).split()


def build(
    out_dir: Path,
    config: dict,
    seed: int = 0,
    dtype: str = "float32",
    quantization: Optional[dict] = None,
    router_skew: bool = False,
) -> Path:
    """Write config.json and model.safetensors for `config` into out_dir.

    quantization: {"group_size", "bits", "mode"} to quantize as mlx_lm.convert
    would (mlx-lm's own quantize_model, so per-module choices match);
    router_skew: routers that strongly prefer a few experts in each MoE
    layer (skew_routing)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "torch_dtype": dtype}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    if router_skew:
        skew_routing(model, config)
    # As mlx_lm.convert casts: tensors the class's cast_predicate keeps
    # (DeepSeek's float32 router biases, V4's sinks and hyper-connections) stay float32.
    cast(model, getattr(mx, dtype))
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
    # The index mlx-lm's own checkpoints carry (its sharded_load reads it to pipeline).
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {name: "model.safetensors" for name in sorted(weights)}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


# Skewed routing. Real models route unevenly; random routers do not. Every
# token's embedding gets one coordinate (SKEW_COORDINATE) of SKEW_EMBEDDING
# times the embedding's RMS, a "massive activation" that the residual
# stream carries, so every router input has a large positive value there;
# the router rows of SKEW_HOT experts per MoE layer get SKEW_ROUTER added at
# that coordinate, which acts as a bias towards them. The hot experts
# differ by layer (3 * layer + j, mod the experts). Measured over 256
# tokens, the 2 hot experts of each layer take 93-99% of the slots on
# qwen3_moe's tiny config and 55-96% on skewed-moe (6 layers: the large
# coordinate weighs less as the residual stream grows), against 25% for
# uniform routing.
SKEW_COORDINATE = 0
SKEW_EMBEDDING = 6.0
SKEW_ROUTER = 5.0
SKEW_HOT = 2
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")


def hot_experts(layer: int, experts: int) -> list[int]:
    """The experts skew_routing makes layer `layer`'s router prefer."""
    return sorted({(3 * layer + j) % experts for j in range(SKEW_HOT)})


def skew_routing(model, config: dict) -> None:
    """Make each MoE layer's router prefer hot_experts(layer) (see above).
    A router is a layer's module named gate or router whose weight has one
    row per expert; a model without an embedding table or routers is left
    as it is, and that is an error: the caller asked for a skew."""
    import mlx.core as mx
    import numpy as np

    experts = next((int(config[k]) for k in EXPERT_COUNT_KEYS if config.get(k)), 0)
    embed = model.model.embed_tokens
    table = np.array(embed.weight)
    table[:, SKEW_COORDINATE] = SKEW_EMBEDDING * float(np.sqrt((table ** 2).mean()))
    embed.weight = mx.array(table)
    skewed = 0
    for index, layer in enumerate(model.layers):
        for path, module in layer.named_modules():
            weight = getattr(module, "weight", None) if path.rsplit(".", 1)[-1] in ("gate", "router") else None
            if weight is None or weight.ndim != 2 or weight.shape[0] != experts:
                continue
            rows = np.array(weight)
            rows[hot_experts(index, experts), SKEW_COORDINATE] += SKEW_ROUTER
            module.weight = mx.array(rows)
            skewed += 1
    if not skewed:
        raise ValueError(f"{config['model_type']}: no router with {experts} rows to skew")


def cast(model, dtype) -> None:
    """The model's floating parameters to `dtype`, except those its class
    keeps in float32 (its cast_predicate, as mlx_lm.convert honours it)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    keep = getattr(model, "cast_predicate", None) or (lambda _: True)
    changed = [(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
               if mx.issubdtype(v.dtype, mx.floating) and keep(k)]
    model.update(tree_unflatten(changed))


def corpus(sentences: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic English-like text to train the tokenizer on."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]) + f" {rng.randint(0, 999)}")
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB) -> int:
    """Train a byte-level BPE tokenizer locally; write tokenizer.json and
    tokenizer_config.json (with the chat template). Returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|end|>",
        "bos_token": None,
        "pad_token": "<|end|>",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    return tokenizer.get_vocab_size()


def build_named(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a named model (see NAMED) with its tokenizer into out_dir."""
    if name not in NAMED:
        raise KeyError(f"unknown built-in model {name!r}; built-in models: {', '.join(NAMED)}")
    out_dir = Path(out_dir)
    vocab = build_tokenizer(out_dir)
    config = {**NAMED[name], "vocab_size": vocab, "eos_token_id": 0}
    return build(out_dir, config, seed=seed, router_skew=name in SKEWED)


def ensure_named(name: str, models_dir: Path) -> Path:
    """The model directory for a built-in model, building it once. Safe when
    several processes race: each builds privately and renames into place."""
    import os
    import shutil
    import tempfile

    target = Path(models_dir) / name
    if (target / "config.json").is_file():
        return target
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        build_named(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
