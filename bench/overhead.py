"""Measures the runtime-overhead constants of the memory model.

process_base_bytes: RSS of a fresh process that imported what a runner
imports (mlx, mlx-lm, grpc) and touched the device, before any weight.

activation_bytes_per_token_element: peak transient memory of one prefill
chunk, as mlx-lm prefills (cache state evaluated, logits left lazy), beyond
the weights and the KV written, per chunk token per element of
(hidden_size + widest intermediate). Compare with
exod.placement.constants, which must not be below the measured figures."""

import json
import platform
import subprocess
import sys

from exod.placement import constants

BASE_PROBE = (
    "import mlx.core as mx, mlx_lm, grpc, psutil, os;"
    "mx.eval(mx.zeros(16) + 1);"
    "print(psutil.Process(os.getpid()).memory_info().rss)"
)

PROBES = {
    "dense": dict(model_type="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "moe": dict(model_type="qwen3_moe", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                head_dim=64, num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                tie_word_embeddings=False),
}

ACTIVATION_PROBE = """
import json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes
config, tokens, dtype = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model_class, args_class = _get_classes(config)
mx.random.seed(0)
model = model_class(args_class.from_dict(config))
model.set_dtype(getattr(mx, dtype))
mx.eval(model.parameters())
cache = make_prompt_cache(model)
x = mx.random.randint(0, config["vocab_size"], (1, tokens))
mx.eval(x)
before = mx.get_active_memory()
mx.reset_peak_memory()
model(x, cache=cache)
mx.eval([c.state for c in cache])
peak = mx.get_peak_memory()
kv = sum(c.nbytes for c in cache)
print(json.dumps({"before": before, "peak": peak, "kv": kv}))
"""


def _widest(config: dict) -> int:
    if config.get("num_experts"):
        return max(config["num_experts_per_tok"] * config["moe_intermediate_size"], 0)
    return config["intermediate_size"]


def run(quick: bool = False) -> dict:
    rss = [int(subprocess.check_output([sys.executable, "-c", BASE_PROBE], text=True)) for _ in range(1 if quick else 3)]
    probes = []
    for name, config in PROBES.items():
        for dtype in ("float32", "bfloat16"):
            tokens = 256 if quick else 512
            proc = subprocess.run([sys.executable, "-c", ACTIVATION_PROBE, json.dumps(config), str(tokens), dtype],
                                  capture_output=True, text=True)
            if proc.returncode:
                # mlx's CPU gather_mm is float32-only: bf16 MoE runs only on Metal.
                probes.append({"model": name, "dtype": dtype, "skipped": proc.stderr.strip().splitlines()[-1]})
                continue
            out = json.loads(proc.stdout)
            transient = out["peak"] - out["before"] - out["kv"]
            width = config["hidden_size"] + _widest(config)
            per_element = transient / (tokens * width)
            probes.append({"model": name, "dtype": dtype, "tokens": tokens, "transient_bytes": transient,
                           "width": width, "activation_bytes_per_token_element": round(per_element, 2)})
    measured_base = max(rss)
    measured_factor = max(p.get("activation_bytes_per_token_element", 0) for p in probes)
    return {
        "bench": "overhead",
        "machine": f"{platform.machine()} {platform.system()}",
        "process_base_bytes": measured_base,
        "activation_probes": probes,
        "constants": {"PROCESS_BASE_BYTES": constants.PROCESS_BASE_BYTES,
                      "ACTIVATION_BYTES_PER_TOKEN_ELEMENT": constants.ACTIVATION_BYTES_PER_TOKEN_ELEMENT},
        "ok": constants.PROCESS_BASE_BYTES >= measured_base * 0.9
        and constants.ACTIVATION_BYTES_PER_TOKEN_ELEMENT >= measured_factor,
    }
