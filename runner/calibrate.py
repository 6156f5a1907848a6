"""Timing what the planner's cost model needs, in an MLX process.

python -m exod.runner.calibrate compute [--quick]
    Times decode steps of small synthetic MoE models built in memory (random
    weights, mlx-lm's own class, mlx-lm's own generate_step) and prints one
    JSON line: per model, layers, bytes one decode step reads (as the
    planner counts them) and the median seconds per token.

The timed models are deliberately not the benchmark's models: the fit is
checked against those, not made from them."""

import json
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3_moe
from mlx_lm.sample_utils import make_sampler

from exod.models import inventory
from exod.placement.profile import profile

# (layers, hidden, experts, experts per token, expert width, heads, kv heads, head dim)
SHAPES = [
    (2, 512, 8, 2, 256, 8, 4, 64),
    (8, 512, 8, 2, 256, 8, 4, 64),
    (16, 256, 8, 2, 256, 8, 4, 32),
    (2, 1536, 16, 4, 768, 12, 4, 128),
    (4, 1024, 16, 4, 512, 8, 4, 64),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3]]


def config(layers, hidden, experts, per_token, width, heads, kv_heads, head_dim) -> dict:
    return dict(model_type="qwen3_moe", hidden_size=hidden, intermediate_size=2 * hidden,
                moe_intermediate_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, num_experts=experts,
                num_experts_per_tok=per_token, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                tie_word_embeddings=False, vocab_size=1024, torch_dtype="float32")  # as mlx-lm builds it


def time_decode(cfg: dict, tokens: int) -> dict:
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    model_profile = profile(inventory.from_config(cfg, "calibration"))
    read = sum(layer.read_all for layer in model_profile.layers) + model_profile.outside.read_all
    gaps, last = [], None
    for _ in generate_step(mx.array([5] * 16), model, max_tokens=tokens, sampler=make_sampler(0.0)):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    return {"layers": cfg["num_hidden_layers"], "read_bytes": read, "seconds": statistics.median(gaps[2:])}


def compute(quick: bool) -> list[dict]:
    shapes = QUICK_SHAPES if quick else SHAPES
    return [time_decode(config(*shape), 16 if quick else 32) for shape in shapes]


if __name__ == "__main__":
    if sys.argv[1] == "compute":
        print(json.dumps(compute("--quick" in sys.argv)), flush=True)
    else:
        sys.exit(f"unknown calibration {sys.argv[1]!r}")
