"""The prefix cache on its own, with real KV from a tiny model in this
process: the longest cached prefix is found (an entry, a prefix of one, or
the shared part of a longer one), the last prompt token is always left to
compute, entries are private copies, and eviction is least recently used
within a capacity counted in tokens."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from exod.proto import exod_pb2 as pb
from exod.runner.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def model(tiny_dirs):
    loaded, _ = load_model(tiny_dirs[("qwen3_moe", "fp32")])
    return loaded


def kv(model, tokens):
    cache = make_prompt_cache(model)
    model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def logits_after(model, cache, tokens):
    return model(mx.array([tokens]), cache=cache)[0, -1]


def test_longest_prefix_is_reused_and_computes_what_a_full_prefill_computes(model):
    cache = PrefixCache(capacity_tokens=1000)
    seen = list(range(1, 41))
    cache.insert(seen, kv(model, seen))
    for prompt, reused in [(seen + [50, 51], 40),         # the entry, then two new tokens
                           (seen[:20] + [99, 98], 20),     # the shared part of a longer entry
                           (seen, 39),                     # the entry itself: its last token is recomputed
                           ([7, 8, 9], 0)]:
        got, n = cache.fetch(prompt)
        assert n == reused
        if n == 0:
            assert got is None
            continue
        assert got[0].offset == n
        expected = logits_after(model, make_prompt_cache(model), prompt)
        assert mx.allclose(logits_after(model, got, prompt[n:]), expected, atol=1e-5).item()
    # Fetching copies: the entry still holds all 40 tokens after a trimmed, extended use.
    again, n = cache.fetch(seen + [1])
    assert n == 40 and again[0].offset == 40
    stats = cache.stats(pb)
    assert (stats.lookups, stats.hits, stats.hit_tokens) == (5, 4, 20 + 39 + 40 + 40)


def test_eviction_is_least_recently_used_within_the_token_capacity(model):
    cache = PrefixCache(capacity_tokens=50)
    a, b, c = [1] * 20, [2] * 20, [3] * 20
    cache.insert(a, kv(model, a))
    cache.insert(b, kv(model, b))
    assert cache.fetch(a + [9])[1] == 20  # a is now the most recently used
    cache.insert(c, kv(model, c))         # 60 tokens > 50: b goes
    assert cache.tokens == 40 and len(cache) == 2
    assert cache.fetch(b + [9])[1] == 0 and cache.fetch(a + [9])[1] == 20 and cache.fetch(c + [9])[1] == 20
    assert cache.nbytes == sum(x.nbytes for x in kv(model, a)) * 2
    cache.insert([4] * 60, kv(model, [4] * 60))  # longer than the whole cache: not kept
    assert cache.tokens == 40


def test_a_longer_entry_replaces_its_cached_prefixes(model):
    cache = PrefixCache(capacity_tokens=1000)
    cache.insert([5] * 10, kv(model, [5] * 10))
    cache.insert([5] * 30, kv(model, [5] * 30))
    assert len(cache) == 1 and cache.tokens == 30
    assert cache.fetch([5] * 12)[1] == 11


def test_no_capacity_means_no_cache(model):
    cache = PrefixCache(capacity_tokens=0)
    cache.insert([1, 2, 3], kv(model, [1, 2, 3]))
    assert cache.fetch([1, 2, 3, 4]) == (None, 0) and cache.tokens == 0 and cache.lookups == 0
