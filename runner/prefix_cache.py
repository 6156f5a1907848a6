"""The prefix cache: KV of token sequences an instance has seen, kept so that
a prompt that starts the same way (the next turn of a chat, a shared
system prompt) skips that part of its prefill.

Every rank keeps its own cache of its own shard of the KV (its layers under
pipeline, its heads under tensor, everything under moe_tensor), and every
rank must make the same decisions, since a rank that reused 900 tokens while
another reused 0 would run different shapes through the same collectives.
So nothing here depends on what differs between ranks: lookups, inserts and
evictions are functions of token sequences alone, the capacity is counted
in tokens (the placement's `prefix_cache_tokens`, the same on every rank),
and the serving loop calls it at the same points of the lockstep on every
rank. Bytes are measured per rank for the status, and stay within the
rank's reservation because the planner sized that reservation as this
rank's KV per token times the same token capacity.

The trie is mlx-lm's own (`PromptTrie`, the one its server's
LRUPromptCache uses); the LRU order is kept here, in an OrderedDict."""

import copy
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import PromptTrie, can_trim_prompt_cache, trim_prompt_cache

_MODEL = "model"  # PromptTrie keys entries by model first; an instance has one


@dataclass
class _Entry:
    cache: list
    nbytes: int


class PrefixCache:
    def __init__(self, capacity_tokens: int, capacity_bytes: int = 0):
        self.capacity_tokens = max(0, int(capacity_tokens))
        self.capacity_bytes = capacity_bytes
        self._trie = PromptTrie()
        self._lru: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self.tokens = 0
        self.nbytes = 0
        self.lookups = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._lru)

    # ---------------------------------------------------------------- lookups

    def fetch(self, tokens: list[int]) -> tuple[list | None, int]:
        """A private copy of the KV of the longest cached prefix of
        tokens[:-1], and its length (0 and None without one). The last
        token is always left to compute: its logits sample the first new
        token."""
        if self.capacity_tokens == 0:
            return None, 0
        self.lookups += 1
        self.prompt_tokens += len(tokens)
        wanted = list(tokens[:-1])
        if not wanted or not self._lru:
            return None, 0
        found = self._trie.search(_MODEL, wanted)
        best_key, reuse = None, 0
        if found.exact is not None:
            best_key, reuse = tuple(found.exact), len(found.exact)
        else:
            if found.shorter is not None:
                best_key, reuse = tuple(found.shorter), len(found.shorter)
            if found.longer is not None and found.common_prefix > reuse:
                key = tuple(found.longer)
                if can_trim_prompt_cache(self._lru[key].cache):
                    best_key, reuse = key, found.common_prefix
        if best_key is None or reuse == 0:
            return None, 0
        self._lru.move_to_end(best_key)
        cache = copy.deepcopy(self._lru[best_key].cache)
        if len(best_key) > reuse:
            trim_prompt_cache(cache, len(best_key) - reuse)
        self.hits += 1
        self.hit_tokens += reuse
        return cache, reuse

    # ---------------------------------------------------------------- inserts

    def insert(self, tokens: list[int], cache: list) -> None:
        """Keep `cache`, the KV of exactly `tokens`, evicting the least
        recently used entries beyond the capacity."""
        key = tuple(tokens)
        if self.capacity_tokens == 0 or not key or len(key) > self.capacity_tokens:
            return
        # A pipeline stage that serves one sequence at a time aliases its
        # skipped layers' caches to held ones (runner/pipeline.py): each
        # cache counts once, and fetch's one deepcopy of the whole list
        # keeps the aliases (its memo copies a shared object once).
        unique = list({id(c): c for c in cache}.values())
        mx.eval([c.state for c in unique])  # a slice of the batch's buffers until evaluated
        entry = _Entry(cache, sum(c.nbytes for c in unique))
        previous = self._trie.add(_MODEL, list(key), entry)
        if previous is not None:
            self._forget(key, previous)
        self._lru[key] = entry
        self.tokens += len(key)
        self.nbytes += entry.nbytes
        if can_trim_prompt_cache(cache):
            # A cached prefix of this sequence is served as well by trimming it.
            for length, shorter in self._trie.pop_prefixes(_MODEL, list(key)):
                self._forget(key[:length], shorter)
        while self.tokens > self.capacity_tokens:
            oldest, entry = next(iter(self._lru.items()))
            self._trie.pop(_MODEL, list(oldest))
            self._forget(oldest, entry)

    def _forget(self, key: tuple, entry: _Entry) -> None:
        if self._lru.pop(key, None) is not None:
            self.tokens -= len(key)
            self.nbytes -= entry.nbytes

    def stats(self, pb) -> object:
        return pb.PrefixCacheStats(
            capacity_tokens=self.capacity_tokens, capacity_bytes=self.capacity_bytes, tokens=self.tokens,
            bytes=self.nbytes, entries=len(self._lru), lookups=self.lookups, hits=self.hits,
            prompt_tokens=self.prompt_tokens, hit_tokens=self.hit_tokens)
