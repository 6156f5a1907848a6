"""Checkpoints laid out where people keep them, made by huggingface_hub
itself: a synthetic model (models/synthetic) served by a local mirror in
the hub's URL layout (tests/hf_mirror.py) and downloaded into a Hugging
Face cache with hf_hub_download, so that blobs, refs and snapshots are
exactly what the real tool writes. No internet."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from exod.models import synthetic

from .conftest import REPO
from .hf_mirror import Mirror

# A mixture-of-experts that divides by 2 ranks under every strategy, about
# 170 MB of float32 weights in two safetensors files with an index (as hub
# checkpoints are), and a tokenizer.
MOE = dict(
    model_type="qwen3_moe", hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def build_moe(out: Path, config: dict = MOE, files: int = 2) -> Path:
    """The model with a tokenizer, its tensors in `files` safetensors files
    named as the hub names them, with model.safetensors.index.json."""
    import mlx.core as mx

    out = Path(out)
    vocab = synthetic.build_tokenizer(out)
    synthetic.build(out, {**config, "vocab_size": vocab, "eos_token_id": 0})
    if files > 1:
        weights = mx.load(str(out / "model.safetensors"))
        names = sorted(weights)
        groups = [names[i::files] for i in range(files)]
        weight_map = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            mx.save_safetensors(str(out / fname), {n: weights[n] for n in group}, metadata={"format": "mlx"})
            weight_map.update({n: fname for n in group})
        (out / "model.safetensors").unlink()
        total = sum(v.nbytes for v in weights.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def build_moe_by_layers(out: Path, config: dict = MOE, per_file: int = 2) -> Path:
    """The model with its layer-free tensors in one file and each
    `per_file` layers in a file of their own, as hub checkpoints are split
    by size (a file's tensors are then all of a few layers)."""
    import mlx.core as mx

    out = build_moe(out, config, files=1)
    weights = mx.load(str(out / "model.safetensors"))
    layers = config["num_hidden_layers"]
    count = 1 + -(-layers // per_file)
    groups = {f"model-00001-of-{count:05d}.safetensors": [n for n in weights if ".layers." not in n]}
    for g in range(count - 1):
        groups[f"model-{g + 2:05d}-of-{count:05d}.safetensors"] = [
            n for n in weights if any(f".layers.{i}." in n for i in range(g * per_file, (g + 1) * per_file))]
    for fname, names in groups.items():
        mx.save_safetensors(str(out / fname), {n: weights[n] for n in names}, metadata={"format": "mlx"})
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, names in groups.items() for n in names}}))
    return out


def hf_download(cache: Path, endpoint: str, repo_id: str, files: list[str]) -> None:
    """huggingface_hub downloads the files into `cache` (its own layout)."""
    code = ("import sys, huggingface_hub as h\n"
            "for f in sys.argv[3:]: h.hf_hub_download(sys.argv[1], f, cache_dir=sys.argv[2])\n")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    subprocess.run([sys.executable, "-c", code, repo_id, str(cache), *files], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)


def hf_cache_with(cache: Path, source: Path, repo_id: str, files: list[str] = None) -> Path:
    """A Hugging Face cache holding `source` as `repo_id` (all its files, or
    only `files`), written by huggingface_hub from a mirror."""
    mirror_root = Path(str(cache) + "-mirror")
    org, name = repo_id.split("/")
    if not (mirror_root / org / name).exists():
        (mirror_root / org).mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, mirror_root / org / name)
    names = files or sorted(p.name for p in source.iterdir() if p.is_file())
    with Mirror(mirror_root) as mirror:
        hf_download(cache, mirror.url, repo_id, names)
    return cache
