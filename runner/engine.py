"""The generation engine a rank serves with: mlx-lm's BatchGenerator, or,
for a model whose cache classes cannot be batched, one sequence at a time
through mlx-lm's generate_step.

mlx-lm's own server makes the same choice: it batches a model only when
every cache of make_prompt_cache has `merge` (0.32.2's DeepSeek-V4
LayerCache has none), and serves other models one request at a time with
stream_generate. `OneAtATime` puts generate_step behind the few calls of
BatchGenerator the serving loop makes (insert, next, remove, close), so the
lockstep protocol is the same for both; its batch holds one sequence."""

from collections import deque
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, generate_step
from mlx_lm.models.cache import make_prompt_cache


def serves_batched(caches: list, pipeline: bool) -> bool:
    """Whether a model with these caches (make_prompt_cache's) decodes a
    batch: every cache merges, and on pipeline stages every cache can also
    be advanced by a layer the stage skips (runner/pipeline.py). The
    inventory asks this of a model built from its config, so that the
    planner's concurrency is what the runner will do."""
    from .pipeline import ADVANCEABLE

    merges = all(hasattr(c, "merge") for c in caches)
    return merges and (not pipeline or all(type(c) in ADVANCEABLE for c in caches))


def aliased_caches(model) -> bool:
    """A pipeline stage's cache list aliases its skipped layers' caches to
    held ones (runner/pipeline.py): code that treats each position on its
    own (mlx-lm's batch merge) would cut the aliases."""
    caches = make_prompt_cache(model)
    return len({id(c) for c in caches}) < len(caches)


def batchable(model) -> bool:
    return not aliased_caches(model) and all(hasattr(c, "merge") for c in make_prompt_cache(model))


def make(model, max_batch: int, prefill_batch: int, prefill_step: int, stream, batched: bool = True):
    """(engine, the batch it can hold). batched False: one at a time, as
    another rank of the instance must (every rank runs the same steps). A
    placement of concurrency 1 never batches either: mlx-lm's generate_step
    decodes one sequence faster than its BatchGenerator holding one (173
    against 164 tok/s on the demo model, tensor x 2 on pinned cores,
    `bench serving`)."""
    if batched and max_batch > 1 and batchable(model):
        return BatchGenerator(model, completion_batch_size=max_batch, prefill_batch_size=prefill_batch,
                              prefill_step_size=prefill_step, stream=stream), max_batch
    return OneAtATime(model, prefill_step, stream), 1


@dataclass
class _Waiting:
    uid: int
    prompt: list
    max_tokens: int
    cache: list
    tokens: list
    sampler: object
    processors: list
    stops: object


class OneAtATime:
    def __init__(self, model, prefill_step: int, stream):
        self.model = model
        self.prefill_step = prefill_step
        self.stream = stream
        self._uids = 0
        self._waiting: deque[_Waiting] = deque()
        self._current = None  # (_Waiting, generator, matcher, generated count)

    def insert(self, prompts, max_tokens=None, caches=None, all_tokens=None, samplers=None,
               logits_processors=None, stop_sequences=None):
        n = len(prompts)
        uids = []
        for i in range(n):
            cache = (caches or [None] * n)[i] or make_prompt_cache(self.model)
            self._waiting.append(_Waiting(
                self._uids, list(prompts[i]), (max_tokens or [256] * n)[i], cache,
                list((all_tokens or [[]] * n)[i]), (samplers or [None] * n)[i],
                list((logits_processors or [()] * n)[i] or ()), (stop_sequences or [None] * n)[i]))
            uids.append(self._uids)
            self._uids += 1
        return uids

    def next(self):
        if self._current is None:
            if not self._waiting:
                return [], []
            item = self._waiting.popleft()
            steps = generate_step(mx.array(item.prompt), self.model, self.stream, max_tokens=item.max_tokens,
                                  sampler=item.sampler, logits_processors=item.processors or None,
                                  prompt_cache=item.cache, prefill_step_size=self.prefill_step)
            item.tokens.extend(item.prompt)
            matcher = item.stops.matcher() if item.stops is not None else None
            self._current = [item, steps, matcher, 0]
        item, steps, matcher, count = self._current
        token, logprobs = next(steps)
        # generate_step has already run the model on this token: it is in the cache.
        item.tokens.append(token)
        count += 1
        self._current[3] = count
        finish = "length" if count >= item.max_tokens else None
        if matcher is not None and matcher.advance(token):
            finish = "stop"
        response = GenerationBatch.Response(uid=item.uid, token=token, logprobs=logprobs, finish_reason=finish,
                                            prompt_cache=item.cache if finish else None,
                                            all_tokens=item.tokens if finish else None)
        if finish:
            self._current = None
        return [], [response]

    def remove(self, uids, return_prompt_caches=False):
        uids = set(uids)
        caches = {}
        if self._current is not None and self._current[0].uid in uids:
            item = self._current[0]
            caches[item.uid] = (item.cache, item.tokens)
            self._current = None
        for item in [w for w in self._waiting if w.uid in uids]:
            self._waiting.remove(item)
            caches[item.uid] = (item.cache, item.tokens)
        return caches if return_prompt_caches else {}

    def close(self):
        self._current = None
        self._waiting.clear()
