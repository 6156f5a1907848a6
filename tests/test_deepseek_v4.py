"""exod's own deepseek_v4 class (models/deepseek_v4_model.py): mlx-lm finds it
only while it has none of its own; the catalog card and the class describe
the same checkpoint; the KV cache it keeps is the planner's formula; it
loads the card's recipe (8-bit affine, mxfp4 routed experts) and its cached,
chunked path computes what one pass computes, across the 128-token pools."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_model

import exod.models
from exod.models import catalog, inventory, synthetic

from .runner_helpers import reference, sharded
from .test_runner_failures import PLUGIN_ENV

OWN_FILE = Path(exod.models.__file__).with_name("deepseek_v4_model.py")


def test_mlx_lm_loads_exods_class_while_it_has_none():
    spec = importlib.util.find_spec("mlx_lm.models.deepseek_v4")
    assert Path(spec.origin) == OWN_FILE
    model_class, _ = _get_classes({"model_type": "deepseek_v4"})
    assert Path(sys.modules[model_class.__module__].__file__) == OWN_FILE


def test_a_release_that_brings_deepseek_v4_wins(tmp_path, monkeypatch):
    import mlx_lm.models

    (tmp_path / "deepseek_v4.py").write_text("RELEASED = True\n")
    monkeypatch.setattr(mlx_lm.models, "__path__", [*mlx_lm.models.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "mlx_lm.models.deepseek_v4", raising=False)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("mlx_lm.models.deepseek_v4")
        assert getattr(module, "RELEASED", False) and Path(module.__file__) == tmp_path / "deepseek_v4.py"
    finally:
        sys.modules.pop("mlx_lm.models.deepseek_v4", None)


def _entries(entries) -> dict:
    return {name: (tuple(shape), dtype, nbytes, dict(params) if params else None)
            for name, shape, dtype, nbytes, params in entries}


def test_card_tensor_list_equals_the_class_built_lazily():
    """Names, shapes, dtypes, bytes and quantization of every tensor: the
    card's formulas against the class built lazily with the card's config
    and recipe, so the planner's total and the runner's checkpoint agree."""
    card = catalog.cards()["deepseek-v4-flash"]
    config = inventory.normalize_config(dict(card["config"]), card["id"])
    rules = inventory.compile_rules(card["quantization_overrides"])
    described = _entries(inventory.described_entries(card["architecture"], config, rules))
    built = _entries(inventory.lazy_model_entries(config, rules))
    assert sorted(set(described) ^ set(built)) == []
    different = {k: (described[k], built[k]) for k in described if described[k] != built[k]}
    assert different == {}
    total = sum(v[2] for v in built.values())
    assert total == catalog.resolve("deepseek-v4-flash").total_bytes
    assert f"{total / 1e9:.1f}" == "155.1"
    # The recipe the card names, as the class quantizes it.
    modes = {v[3]["mode"] for k, v in built.items() if ".switch_mlp." in k and v[3]}
    assert modes == {"mxfp4"}
    assert built["model.layers.0.ffn.gate.tid2eid"][1] == "int64"
    assert built["model.layers.5.attn.attn_sink"][1] == "float32"


@pytest.fixture(scope="module")
def v4_mini(tmp_path_factory):
    return synthetic.build(tmp_path_factory.mktemp("v4-mini"), synthetic.TINY_CONFIGS["deepseek_v4"])


def _prefill(model, tokens, chunks):
    cache = make_prompt_cache(model)
    outs, start = [], 0
    for end in chunks:
        outs.append(model(tokens[:, start:end], cache=cache)[0])
        mx.eval(outs[-1], [c.state for c in cache])
        start = end
    return mx.concatenate(outs, axis=0), cache


def test_kv_cache_per_token_measured_matches_the_planners_formula(v4_mini):
    """After 512 and 768 tokens (past the window, whole 128-token pools):
    the window part is the formula's window, and what grows with the
    context grows by the formula's bytes per token, part by part. The
    compressors' open pools are bounded (at most one window of each)."""
    model, config = load_model(Path(v4_mini))
    spec = inventory.from_directory(v4_mini)
    formula: dict = {}
    for part in spec.kv_cache:
        kind = part.kind
        if part.window_tokens:
            formula[(part.layer, kind)] = part.bytes_per_token * part.window_tokens
        else:
            formula[(part.layer, kind)] = part.bytes_per_token
    tokens = mx.array([[(i * 37 + 5) % config["vocab_size"] for i in range(768)]])
    _, cache = _prefill(model, tokens, [200, 512])
    at_512 = [c.parts_nbytes() for c in cache]
    logits, cache = _prefill(model, tokens, [200, 512, 700, 768])
    at_768 = [c.parts_nbytes() for c in cache]
    measured: dict = {}
    for layer, (a, b) in enumerate(zip(at_512, at_768)):
        assert a["window"] == b["window"]
        measured[(layer, "window")] = b["window"]
        for kind in ("compressed", "index keys"):
            if b[kind]:
                measured[(layer, kind)] = (b[kind] - a[kind]) / 256
        assert a["open pools"] == b["open pools"]  # bounded, not per token
    assert measured == pytest.approx(formula, rel=0, abs=0)
    per_token = sum(v for (layer, kind), v in formula.items() if kind != "window")
    assert sum(measured[k] for k in measured if k[1] != "window") == per_token
    # The cached, chunked path across whole 128-token pools is the one pass.
    whole = model(tokens)[0]
    assert np.abs(np.array(whole) - np.array(logits)).max() <= 1e-4


def test_loads_the_cards_recipe_8bit_affine_and_mxfp4_experts(v4_mini, tmp_path):
    """v4-mini quantized as the card's checkpoint is (affine 8-bit, group 64;
    routed experts mxfp4, group 32), saved with per-module entries the way
    mlx_lm.convert writes them, loads through mlx-lm and computes close to
    the float model."""
    model, config = load_model(Path(v4_mini))
    tokens = mx.array([[(i * 37 + 5) % config["vocab_size"] for i in range(24)]])
    expected = np.array(model(tokens)[0, -1])
    quant = {"group_size": 64, "bits": 8, "mode": "affine"}

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if ".switch_mlp." in path + ".":
            quant[path] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            return quant[path]
        return module.weight.shape[-1] % 64 == 0

    nn.quantize(model, 64, 8, mode="affine", class_predicate=predicate)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": quant}))
    loaded, _ = load_model(tmp_path)
    assert loaded.layers[2].ffn.switch_mlp.gate_proj.mode == "mxfp4"
    assert loaded.layers[2].attn.wo_a.bits == 8 and loaded.layers[2].attn.wo_a.mode == "affine"
    assert str(loaded.layers[0].ffn.gate.tid2eid.dtype) == "mlx.core.int64"
    got = np.array(loaded(tokens)[0, -1])
    assert np.isfinite(got).all()
    # 4-bit experts on a 64-wide model: close, not equal.
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_head_parallel_by_whole_output_groups_matches_the_single_process(v4_mini):
    """The control of the canary test in test_runner_failures.py: the same
    head-parallel cut with each rank's heads those of its output groups
    passes the canary and computes the single process's logits and tokens,
    so heads_across_output_groups fails there for its head order alone."""
    expected = reference(v4_mini)
    got = sharded(v4_mini, "heads_by_output_groups", 2, env=PLUGIN_ENV)
    assert np.abs(got["logits"] - expected["logits"]).max() <= 1e-4
    assert got["tokens"] == expected["tokens"]
