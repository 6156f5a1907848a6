"""The parts of exod's generic pipeline stage that need no second rank: it
finds the list each model's forward iterates, a skipped layer keeps what the
forward reads from it, and skipped layers' caches alias held caches of the
same kind. (Running stages on 2 and 3 ranks is tests/test_runner_equivalence.py.)"""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.utils import _get_classes

from exod.models import synthetic
from exod.runner import pipeline as stage


def build(name):
    config = synthetic.TINY_CONFIGS[name]
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config)), config


@pytest.mark.parametrize("name", list(synthetic.TINY_CONFIGS))
def test_the_layer_list_is_the_one_the_forward_iterates(name):
    model, config = build(name)
    layers = stage.layer_list(model)
    assert len(layers) == config["num_hidden_layers"]
    assert [id(layer) for layer in layers] == [id(layer) for layer in model.layers]
    # Replacing an entry is what the model sees (mlx-lm's .layers is often a property over a slice).
    layers[0] = stage.StageLayer(layers[0], held=False, group=None)
    assert isinstance(model.layers[0], stage.StageLayer)


def test_a_skipped_layer_keeps_what_the_forward_reads_and_no_weights():
    model, _ = build("mistral")  # llama's class asks each layer whether it slides
    layers = stage.layer_list(model)
    skipped = stage.StageLayer(layers[0], held=False, group=None)
    assert skipped.use_sliding is True and not skipped.parameters()
    x = mx.ones((1, 3, 128))
    assert mx.array_equal(skipped(x, None, None), x)


def test_skipped_layers_share_a_held_cache_of_their_kind():
    model, config = build("gemma3_text")  # 6 layers, every third global, the rest sliding
    caches = make_prompt_cache(model)
    assert [type(c) for c in caches] == [RotatingKVCache, RotatingKVCache, KVCache] * 2
    aliased = stage.aliased_caches(caches, stage.Stage(2, 4))  # holds a global (2) and a sliding (3) layer
    assert aliased[2] is caches[2] and aliased[3] is caches[3]
    assert aliased[0] is caches[3] and aliased[1] is caches[3] and aliased[4] is caches[3]
    assert aliased[5] is caches[2]
    # A stage with no global layer keeps a fresh cache for the global slots: no held cache to share.
    only_sliding = stage.aliased_caches(make_prompt_cache(model), stage.Stage(0, 2))
    assert isinstance(only_sliding[2], KVCache) and only_sliding[2] is not only_sliding[5]


def test_windows_of_different_sizes_are_different_kinds():
    caches = [RotatingKVCache(max_size=16), RotatingKVCache(max_size=32), RotatingKVCache(max_size=16)]
    aliased = stage.aliased_caches(caches, stage.Stage(0, 1))
    assert aliased[2] is caches[0] and aliased[1] is caches[1]


def test_a_skipped_layer_advances_its_key_value_cache_by_zero_bytes():
    model, _ = build("gemma3_text")  # a sliding window's cache and a global one
    layers = stage.layer_list(model)
    caches = make_prompt_cache(model)
    x = mx.ones((2, 5, 128))
    for i in (0, 2):  # RotatingKVCache, KVCache
        skipped = stage.StageLayer(layers[i], held=False, group=None, advance=True)
        assert mx.array_equal(skipped(x, None, caches[i]), x)
        skipped(x[:, :1], None, cache=caches[i])
        assert caches[i].offset == 6 and caches[i].keys.shape[-1] == 0 and caches[i].nbytes == 0
    # Without advancing (a cache that must be aliased), the cache is left alone.
    fresh = make_prompt_cache(model)
    stage.StageLayer(layers[2], held=False, group=None)(x, None, fresh[2])
    assert fresh[2].offset == 0
