"""Every catalog card builds, cites its sources, and matches its published size."""

import pytest

from exod.models import catalog
from exod.proto import exod_pb2 as pb

REQUIRED = {
    "deepseek-v4-flash", "deepseek-v3.1-4bit", "kimi-k2-4bit", "qwen3-235b-a22b-4bit",
    "qwen3-30b-a3b-4bit", "glm-4.5-air-4bit", "gpt-oss-120b", "llama-3.3-70b-4bit",
}


def test_catalog_covers_the_models_people_run():
    assert REQUIRED <= set(catalog.cards())


@pytest.mark.parametrize("card_id", sorted(REQUIRED))
def test_card_matches_published_size(card_id):
    card = catalog.cards()[card_id]
    assert card["sources"]["config"].startswith("https://") and card["sources"]["size"].startswith("https://")
    spec = catalog.resolve(card_id)
    published = card["published_weight_bytes"]
    # Published sizes are exact index totals for most cards; two come from
    # rounded listings (see each card's note), hence 3.5%.
    assert abs(spec.total_bytes - published) / published < 0.035
    assert spec.num_layers == card["config"]["num_hidden_layers"]
    assert spec.kv_cache, "every architecture has a KV-cache formula"


def test_deepseek_v4_flash_recipe_is_mxfp4_experts_and_8bit_rest():
    spec = catalog.resolve("deepseek-v4-flash")
    experts = {t.quantization.mode for t in spec.tensors if t.tensor_class == pb.ROUTED_EXPERTS and t.quantization.bits}
    attention = {(t.quantization.mode, t.quantization.bits) for t in spec.tensors
                 if t.tensor_class == pb.ATTENTION and t.quantization.bits}
    assert experts == {"mxfp4"}
    assert attention == {("affine", 8)}
    assert 280e9 < spec.total_parameters < 290e9  # published: 284B total
    assert 12.5e9 < spec.active_parameters_per_token < 14e9  # published: 13B active


def test_published_parameter_counts():
    # Model cards: DeepSeek-V3.1 671B/37B active, Kimi-K2 1T/32B, Qwen3-235B-A22B, Qwen3-30B-A3B, gpt-oss-120b 117B/5.1B
    expected = {"deepseek-v3.1-4bit": (671e9, 37e9), "kimi-k2-4bit": (1.03e12, 32e9),
                "qwen3-235b-a22b-4bit": (235e9, 22e9), "qwen3-30b-a3b-4bit": (30.5e9, 3.3e9),
                "gpt-oss-120b": (117e9, 5.1e9)}
    for card_id, (total, active) in expected.items():
        spec = catalog.resolve(card_id)
        assert abs(spec.total_parameters - total) / total < 0.02, card_id
        assert abs(spec.active_parameters_per_token - active) / active < 0.12, card_id
