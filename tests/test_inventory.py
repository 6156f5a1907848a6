"""Inventories from directories, configs and descriptions agree with each other."""

import json
import struct

import mlx.core as mx
import pytest

from exod.models import ModelError, inventory, quantization
from exod.models.safetensors_header import read_header
from exod.proto import exod_pb2 as pb

from .conftest import load_config


def _table(spec):
    return {t.name: (tuple(t.shape), t.dtype, t.bytes, t.quantization.mode, t.quantization.bits,
                     t.tensor_class, t.layer, t.parameters) for t in spec.tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_header_inventory_equals_lazy_build(tiny_dirs, arch, variant):
    path = tiny_dirs[(arch, variant)]
    from_dir = inventory.from_directory(path)
    from_config = inventory.from_config(load_config(path), path.name)
    assert _table(from_dir) == _table(from_config)
    assert from_dir.total_bytes == sum(b for _, _, b in read_header(path / "model.safetensors").values())
    assert from_dir.total_bytes == (path / "model.safetensors").stat().st_size - 8 - struct.unpack(
        "<Q", (path / "model.safetensors").read_bytes()[:8])[0]


def test_classes_of_a_moe_with_shared_experts(tiny_dirs):
    spec = inventory.from_directory(tiny_dirs[("deepseek_v3", "fp32")])
    classes = {t.name: t.tensor_class for t in spec.tensors}
    assert classes["model.embed_tokens.weight"] == pb.EMBEDDING
    assert classes["lm_head.weight"] == pb.LM_HEAD
    assert classes["model.layers.0.self_attn.q_a_proj.weight"] == pb.ATTENTION
    assert classes["model.layers.0.mlp.gate_proj.weight"] == pb.DENSE_MLP
    assert classes["model.layers.1.mlp.gate.weight"] == pb.ROUTER
    assert classes["model.layers.1.mlp.switch_mlp.up_proj.weight"] == pb.ROUTED_EXPERTS
    assert classes["model.layers.1.mlp.shared_experts.down_proj.weight"] == pb.SHARED_EXPERTS
    assert classes["model.layers.1.input_layernorm.weight"] == pb.NORM
    assert {t.layer for t in spec.tensors if t.name.startswith("model.layers.3.")} == {3}
    assert spec.num_experts == 8 and spec.experts_per_token == 2


def test_lazy_build_is_cast_to_checkpoint_dtype():
    from exod.models import synthetic

    config = {**synthetic.TINY_CONFIGS["llama"], "torch_dtype": "bfloat16",
              "quantization": {"group_size": 64, "bits": 4}}
    spec = inventory.from_config(config, "tiny")
    scales = next(t for t in spec.tensors if t.name.endswith("q_proj.scales"))
    norm = next(t for t in spec.tensors if t.name.endswith("input_layernorm.weight"))
    assert scales.dtype == "bfloat16" and norm.dtype == "bfloat16"
    assert scales.bytes == 128 * (128 // 64) * 2


def test_per_module_overrides_are_honoured():
    from exod.models import synthetic

    config = {**synthetic.TINY_CONFIGS["qwen3_moe"], "torch_dtype": "bfloat16",
              "quantization": {"group_size": 64, "bits": 4, "model.layers.1.mlp.gate": False,
                               "model.layers.2.self_attn.q_proj": {"group_size": 32, "bits": 6},
                               "lm_head": False}}
    spec = inventory.from_config(config, "tiny")
    by_name = {t.name: t for t in spec.tensors}
    assert by_name["model.layers.1.mlp.gate.weight"].dtype == "bfloat16"
    # mlx-lm's own quant_predicate keeps qwen3_moe routers at 8 bits
    assert by_name["model.layers.2.mlp.gate.weight"].quantization.bits == 8
    assert by_name["model.layers.2.self_attn.q_proj.weight"].quantization.bits == 6
    assert by_name["model.layers.2.self_attn.q_proj.scales"].shape == [128, 4]
    assert by_name["model.layers.3.self_attn.q_proj.weight"].quantization.bits == 4
    assert by_name["lm_head.weight"].dtype == "bfloat16" and not by_name["lm_head.weight"].quantization.bits
    rules = inventory.compile_rules([{"match": r"switch_mlp\.", "params": {"mode": "mxfp4", "group_size": 32, "bits": 4}}])
    spec = inventory.build_spec("tiny", config, "config", inventory.lazy_model_entries(config, rules))
    expert = next(t for t in spec.tensors if t.name.endswith("switch_mlp.up_proj.weight"))
    assert expert.quantization.mode == "mxfp4"
    assert next(t for t in spec.tensors if t.name.endswith("switch_mlp.up_proj.scales")).dtype == "uint8"


@pytest.mark.parametrize("mode,group,bits", [("affine", 64, 4), ("affine", 32, 8), ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)])
def test_described_quantized_sizes_match_mlx(mode, group, bits):
    w = mx.zeros((3, 64, 256), dtype=mx.bfloat16)
    real = mx.quantize(w, group_size=group, bits=bits, mode=mode)
    described = quantization.quantized_entries("x.weight", (3, 64, 256), "bfloat16",
                                               {"mode": mode, "group_size": group, "bits": bits})
    assert [(tuple(a.shape), str(a.dtype).removeprefix("mlx.core."), a.nbytes) for a in real] == [
        (shape, dtype, size) for _, shape, dtype, size in described]


def test_description_expressions():
    config = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "num_hidden_layers": 2}
    assert inventory.evaluate("num_attention_heads * head_dim + 2", config) == 66
    assert inventory.evaluate(7, config) == 7
    with pytest.raises(ModelError, match="lacks missing"):
        inventory.evaluate("missing * 2", config)
    with pytest.raises(ModelError):
        inventory.evaluate("__import__('os')", config)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_corrupt_and_truncated_headers(tmp_path):
    with pytest.raises(ModelError, match="truncated"):
        read_header(_write(tmp_path / "a.safetensors", b"\x01\x02"))
    with pytest.raises(ModelError, match="corrupt"):
        read_header(_write(tmp_path / "b.safetensors", struct.pack("<Q", 10**12) + b"{}"))
    with pytest.raises(ModelError, match="not JSON"):
        read_header(_write(tmp_path / "c.safetensors", struct.pack("<Q", 4) + b"{{{{"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    with pytest.raises(ModelError, match="outside the file"):
        read_header(_write(tmp_path / "d.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 10))
    ok = read_header(_write(tmp_path / "e.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 64))
    assert ok == {"w": ("float32", (4, 4), 64)}


def test_config_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelError, match="lacks num_hidden_layers, vocab_size"):
        inventory.from_directory(tmp_path)
    with pytest.raises(ModelError, match="lacks"):
        inventory.from_config({"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64,
                               "vocab_size": 10}, "x")


def test_a_671b_model_builds_lazily_without_allocating_its_weights():
    import psutil

    from exod.models import catalog

    rss = psutil.Process().memory_info().rss
    spec = inventory.from_card(catalog.cards()["deepseek-v3.1-4bit"])
    grown = psutil.Process().memory_info().rss - rss
    assert spec.total_parameters > 670e9
    assert grown < 500e6, f"lazy build grew RSS by {grown / 1e6:.0f} MB"
