"""Serving in lockstep, many sequences at once.

Every rank runs mlx-lm's BatchGenerator over its own shard of the model
(engine.make: one sequence at a time where the model's caches cannot batch),
and every rank must make the same calls to it in the same order, since the
model's collectives (all-sums, a pipeline's sends) sit inside each step and
a rank whose batch differed would deadlock or mix up its peers' data. Rank
0 alone takes requests (scheduler.Inbox), so rank 0 decides the batch and
tells the others, in a control message that every rank all-sums:

  idle:     a control every IDLE_TICK_S, sooner on rank 0 when a request
            arrives (a dead peer shows up here as a failed collective).
            Every rank waits out the tick in Python before its all-sum: a
            rank waiting inside MLX's ring all-sum spins a thread on its
            socket, so an idle instance would burn a core on every rank
            but rank 0
  running:  per iteration one BatchGenerator step (a decode step for the
            batch, a prefill chunk for sequences that joined); every
            CONTROL_EVERY iterations a control, which every rank applies one
            iteration later (it is all-summed while the next step computes,
            so lockstep costs the all-sum's latency, not a pipeline stall)

A control carries each rank's running hash of the tokens it sampled (equal,
or "ranks diverged"), any rank's shutdown vote, and rank 0's decisions:
sequences to drop (a stop string, a cancel) and requests to join, with their
prompt length and sampling parameters. When requests join, their prompt
tokens follow in a second all-sum. Requests join and leave only at these
token boundaries, on every rank at the same iteration.

Every rank samples: each sequence has its own seeded sampler
(sequences.SeededSampler), so the tokens agree across ranks, and a
sequence's tokens are the same alone or in a batch. Length and stop tokens
end a sequence inside BatchGenerator, on every rank at the same step; stop
strings and cancels are decided on rank 0, which answers at once and drops
the sequence everywhere at the next control.

The prefix cache (prefix_cache.PrefixCache) is consulted as a request joins
and fed as a sequence leaves, at the same points on every rank."""

import os
import time
from collections import deque

import mlx.core as mx
import numpy as np
from mlx_lm.generate import StopSequences

from exod.placement.constants import PREFILL_CHUNK_TOKENS
from exod.proto import exod_pb2 as pb

from . import engine
from .prefix_cache import PrefixCache
from .scheduler import Admission, Inbox, RequestError  # noqa: F401  (Inbox, RequestError: the runner's API)
from .sequences import LogitsCapture, SeededSampler, Sequence
from .strategies import expert_counts

# How long an idle instance may take to start a request: rank 0 takes it at
# once but waits in the all-sum until the other ranks' ticks end. 20 ms
# costs a request at most that much of its first token's time, and an idle
# rank about 1% of a core (50 controls a second) instead of 100%.
IDLE_TICK_S = 0.02
CONTROL_EVERY = 4
MAX_STOP_TOKENS = 4
MAX_JOIN = 8      # requests that may join at one control
MAX_REMOVE = 16   # sequences rank 0 may drop at one control
# The planner's activation estimate assumes one prefill chunk of this many
# tokens; sequences prefilling together share it.
PREFILL_CHUNK = PREFILL_CHUNK_TOKENS
# Prompts prefilled together (mlx-lm's server: 8). With 4, eight chats
# arriving at once were prefilled in two rounds, each stalling the batch's
# decode: 0.89x mlx_lm.server's aggregate at concurrency 8, against 1.07x
# (median of 5, interleaved) with 8. The chunk is shared, so memory is not.
PREFILL_BATCH = 8
STATS_EVERY_S = 1.0
# A step that prefills may take far longer than a decode step (up to a chunk
# of PREFILL_CHUNK tokens on a slow CPU): its deadline is this many times the
# peer deadline, which is sized for a collective that makes no progress.
PREFILL_DEADLINE_FACTOR = 4
TOKENS_PER_S_WINDOW_S = 5.0
_HASH_MOD = 2_147_483_629  # a prime below 2^31: hashes fit int32 all-sums


class RanksDiverged(Exception):
    pass


class Control:
    """One control message: a fixed layout of int32, all-summed."""

    VOTES = 0
    HASHES = 1  # one slot per rank
    # After the hashes: a count and MAX_REMOVE uids (+1), then a count and
    # MAX_JOIN join records.
    PROMPT_LENGTH, MAX_TOKENS, TOP_K, SEED, TEMPERATURE, TOP_P, MIN_P, WANT_LOGITS, STOPS = range(9)
    JOIN_FIELDS = STOPS + MAX_STOP_TOKENS

    def __init__(self, world: int):
        self.world = world
        self.remove_at = self.HASHES + world
        self.join_at = self.remove_at + 1 + MAX_REMOVE
        self.size = self.join_at + 1 + MAX_JOIN * self.JOIN_FIELDS

    def encode(self, rank: int, vote: bool, token_hash: int, removals: list[int], joins: list) -> np.ndarray:
        values = np.zeros(self.size, dtype=np.int32)
        values[self.VOTES] = int(vote)
        values[self.HASHES + rank] = token_hash
        values[self.remove_at] = len(removals)
        values[self.remove_at + 1:self.remove_at + 1 + len(removals)] = [uid + 1 for uid in removals]
        values[self.join_at] = len(joins)
        for i, (admitted, stops, seed) in enumerate(joins):
            s = admitted.request.sampling
            base = self.join_at + 1 + i * self.JOIN_FIELDS
            values[base + self.PROMPT_LENGTH] = len(admitted.tokens)
            values[base + self.MAX_TOKENS] = admitted.max_tokens
            values[base + self.TOP_K] = s.top_k
            values[base + self.SEED] = seed
            top_p = s.top_p if 0 < s.top_p < 1 else 0.0
            values[base + self.TEMPERATURE:base + self.MIN_P + 1] = np.array(
                [s.temperature, top_p, s.min_p], dtype=np.float32).view(np.int32)
            values[base + self.WANT_LOGITS] = int(admitted.request.return_prompt_logits)
            values[base + self.STOPS:base + self.STOPS + len(stops)] = [t + 1 for t in stops]
        return values

    def decode(self, values: list[int]) -> dict:
        joins = []
        for i in range(values[self.join_at]):
            base = self.join_at + 1 + i * self.JOIN_FIELDS
            record = values[base:base + self.JOIN_FIELDS]
            floats = np.array(record[self.TEMPERATURE:self.MIN_P + 1], dtype=np.int32).view(np.float32)
            joins.append(dict(
                prompt_length=record[self.PROMPT_LENGTH], max_tokens=record[self.MAX_TOKENS],
                top_k=record[self.TOP_K], seed=record[self.SEED],
                temperature=float(floats[0]), top_p=float(floats[1]), min_p=float(floats[2]),
                want_logits=bool(record[self.WANT_LOGITS]),
                stops=[t - 1 for t in record[self.STOPS:] if t > 0]))
        removals = [v - 1 for v in values[self.remove_at + 1:self.remove_at + 1 + values[self.remove_at]]]
        return dict(votes=values[self.VOTES], hashes=values[self.HASHES:self.HASHES + self.world],
                    removals=removals, joins=joins)


class Server:
    def __init__(self, model, tokenizer, group, inbox: Inbox, emit, report, progress, context_length: int,
                 max_batch: int = 1, prefix_cache_tokens: int = 0, prefix_cache_bytes: int = 0,
                 prefill_step_tokens: int = 0):
        """report(state, **status fields); progress(phase, seconds): the watchdog's deadline."""
        self.model = model
        self.tokenizer = tokenizer
        self.group = group
        self.rank = group.rank() if group else 0
        self.world = group.size() if group else 1
        self.inbox = inbox
        self.emit = emit  # GenerationChunk -> None (rank 0)
        self.report = report
        self.progress = progress
        self.context_length = context_length
        self.max_batch = max(1, max_batch)
        self.control = Control(self.world)
        vocab = int(model.args.vocab_size) if hasattr(model, "args") else None
        # Every collective runs on one stream, in the order it was issued:
        # the model's own and the controls (mlx-lm's server does the same
        # when it runs distributed).
        self.stream = mx.default_stream(mx.default_device())
        prefill_batch = min(self.max_batch, PREFILL_BATCH)
        # Every rank must run the same steps: if one rank cannot batch (a
        # pipeline stage aliasing a skipped layer's cache), none does.
        unbatched = 0 if engine.batchable(model) else 1
        if self.group is not None:
            unbatched = int(mx.distributed.all_sum(mx.array(unbatched), group=self.group).item())
        self.engine, self.max_batch = engine.make(model, self.max_batch, prefill_batch,
                                                  prefill_step_tokens or max(1, PREFILL_CHUNK // prefill_batch),
                                                  self.stream, batched=unbatched == 0)
        if self.rank == 0:
            inbox.open(Admission(tokenizer, vocab, context_length), self.max_batch)
        self.prefix = PrefixCache(prefix_cache_tokens, prefix_cache_bytes)
        self.active: dict[int, "Sequence | None"] = {}  # engine uid -> rank 0's Sequence (None elsewhere)
        self.prefilling: set[int] = set()  # joined, no token yet
        self.dropping: set[int] = set()   # rank 0: finished here, still in the batch until a control drops it
        self.joining: list = []           # rank 0: what the control in flight asks to join
        self.pending = None               # the control in flight
        self.token_hash = 0
        self.iteration = 0
        self.generated = 0
        self.peak_batch = 0
        self.recent: deque = deque()      # (time, tokens) for tokens_per_s
        self.state = pb.READY
        self.reported_at = 0.0

    # ---------------------------------------------------------------- collectives

    def _all_sum(self, array: mx.array) -> mx.array:
        return mx.distributed.all_sum(array, group=self.group, stream=self.stream) if self.group else array

    def _issue_control(self, wait_s: float) -> mx.array:
        """wait_s: how long to wait first, on rank 0 for a request (it stops
        waiting when one arrives), elsewhere for a shutdown."""
        removals, joins = [], []
        if self.rank != 0 and wait_s > 0:
            self.inbox.shutdown.wait(wait_s)
        if self.rank == 0:
            self._cancel_in_batch()
            removals = sorted(self.dropping)[:MAX_REMOVE]
            room = self.max_batch - len(self.active)
            if room > 0 and not self.inbox.shutdown.is_set():
                joins = [(a, self._stop_tokens(a.request), self._seed(a.request))
                         for a in self.inbox.take(min(room, MAX_JOIN), wait_s)]
            self.joining = [a for a, _, _ in joins]
        # After the wait: a shutdown that arrived meanwhile is voted now.
        vote = self.inbox.shutdown.is_set()
        local = self.control.encode(self.rank, vote, self.token_hash, removals, joins)
        with mx.stream(self.stream):
            return self._all_sum(mx.array(local))

    def _stop_tokens(self, request) -> list[int]:
        if request.sampling.ignore_eos or self.tokenizer is None:
            return []
        return sorted(self.tokenizer.eos_token_ids)[:MAX_STOP_TOKENS]

    @staticmethod
    def _seed(request) -> int:
        s = request.sampling
        return (s.seed if s.HasField("seed") else int.from_bytes(os.urandom(4), "little")) % 2**31

    def _cancel_in_batch(self) -> None:
        """Cancelled sequences end on rank 0 now, and leave the batch at the control."""
        for uid, seq in self.active.items():
            if seq is not None and not seq.finished and self.inbox.is_cancelled(seq.request_id):
                seq.fail(pb.FINISH_CANCELLED)
                self.dropping.add(uid)

    # ---------------------------------------------------------------- loop

    def run(self, peer_timeout_s: float) -> None:
        try:
            while True:
                if not self.active and self.pending is None:
                    self.progress("Ready", peer_timeout_s)
                    self._set_state(pb.READY)
                    values = self._issue_control(IDLE_TICK_S).tolist()
                    if self._apply(values):
                        return
                    continue
                self.progress("Running", peer_timeout_s * (PREFILL_DEADLINE_FACTOR if self.prefilling else 1))
                self._set_state(pb.RUNNING)
                with mx.stream(self.stream):
                    _, responses = self.engine.next()
                self.iteration += 1
                self._observe(responses)
                if self.pending is not None:
                    values, self.pending = self.pending.tolist(), None
                    if self._apply(values):
                        return
                if self.active and self.iteration % CONTROL_EVERY == 0:
                    self.pending = self._issue_control(0.0)
                    mx.async_eval(self.pending)
                self._maybe_report()
        finally:
            self.engine.close()

    def _observe(self, responses) -> None:
        now = time.perf_counter()
        for r in responses:
            self.prefilling.discard(r.uid)
            self.token_hash = (self.token_hash * 31 + r.uid * 7919 + r.token + 1) % _HASH_MOD
            seq = self.active.get(r.uid)
            ended = r.finish_reason is not None
            if seq is not None and not seq.finished:
                if seq.accept(r.token, r.logprobs, ended) and not ended:
                    self.dropping.add(r.uid)
            if ended:
                self._left(r.uid, r.all_tokens, r.prompt_cache)
        if responses:
            self.generated += len(responses)
            self.recent.append((now, len(responses)))

    def _left(self, uid: int, tokens, cache) -> None:
        """A sequence left the batch, on every rank at this point."""
        self.active.pop(uid, None)
        self.prefilling.discard(uid)
        self.dropping.discard(uid)
        if cache is not None and tokens:
            self.prefix.insert(list(tokens), cache)

    def _apply(self, values: list[int]) -> bool:
        """Apply a control on every rank; True when the runner must stop."""
        control = self.control.decode(values)
        if len(set(control["hashes"])) != 1:
            raise RanksDiverged(f"ranks sampled different tokens by iteration {self.iteration}: "
                                f"the logits differ between ranks")
        joining, self.joining = self.joining, []
        if control["votes"]:
            for admitted in joining:
                self.inbox.done(admitted.request.request_id)
                self.emit(pb.GenerationChunk(request_id=admitted.request.request_id,
                                             finish_reason=pb.FINISH_CANCELLED, error="runner shutting down"))
            self.stop_all(pb.FINISH_CANCELLED, "runner shutting down")
            return True
        removals = [uid for uid in control["removals"] if uid in self.active]
        if removals:
            with mx.stream(self.stream):
                caches = self.engine.remove(removals, return_prompt_caches=self.prefix.capacity_tokens > 0)
            for uid in removals:
                cache, tokens = caches.get(uid, (None, None))
                self._left(uid, tokens, cache)
        if control["joins"]:
            self._join(control["joins"], joining)
        return False

    def _join(self, joins: list[dict], admitted: list) -> None:
        total = sum(j["prompt_length"] for j in joins)
        local = [t for a in admitted for t in a.tokens] if self.rank == 0 else [0] * total
        with mx.stream(self.stream):
            # Evaluated now, on every rank: a pipeline stage that receives its
            # input would otherwise never evaluate this all-sum.
            prompts = self._all_sum(mx.array(local, dtype=mx.int32)).tolist()
        offset = 0
        for i, join in enumerate(joins):
            tokens = prompts[offset:offset + join["prompt_length"]]
            offset += join["prompt_length"]
            cache, reused = self.prefix.fetch(tokens)
            greedy = join["temperature"] == 0
            sampler = None if greedy else SeededSampler(join["seed"], join["temperature"], join["top_p"],
                                                         join["min_p"], join["top_k"])
            capture = LogitsCapture() if join["want_logits"] else None
            with mx.stream(self.stream):
                (uid,) = self.engine.insert(
                    [tokens[reused:]], max_tokens=[join["max_tokens"]], caches=[cache],
                    all_tokens=[tokens[:reused]], samplers=[sampler],
                    logits_processors=[[capture]] if capture else None,
                    stop_sequences=[StopSequences([[t] for t in join["stops"]])])
            self.active[uid] = Sequence(self, admitted[i], capture, reused) if self.rank == 0 else None
            self.prefilling.add(uid)
        self.peak_batch = max(self.peak_batch, len(self.active))

    def stop_all(self, reason: int, error: str = "") -> None:
        """Every sequence ends (rank 0 answers each)."""
        for seq in self.active.values():
            if seq is not None:
                seq.fail(reason, error)
        for request_id in self.inbox.drain() if self.rank == 0 else []:
            self.emit(pb.GenerationChunk(request_id=request_id, finish_reason=reason, error=error))

    # ---------------------------------------------------------------- status

    def _set_state(self, state: int) -> None:
        if state != self.state:
            self.state = state
            self._report()

    def _maybe_report(self) -> None:
        if time.monotonic() - self.reported_at >= STATS_EVERY_S:
            self._report()

    def _report(self) -> None:
        self.reported_at = time.monotonic()
        self.report(self.state, **self.stats())

    def stats(self) -> dict:
        now = time.perf_counter()
        while self.recent and now - self.recent[0][0] > TOKENS_PER_S_WINDOW_S:
            self.recent.popleft()
        span = now - self.recent[0][0] if len(self.recent) > 1 else 0.0
        rate = sum(n for _, n in list(self.recent)[1:]) / span if span > 0 else 0.0
        stats = dict(max_batch=self.max_batch, batch_size=len(self.active), peak_batch_size=self.peak_batch,
                     queue_depth=self.inbox.depth() if self.rank == 0 else 0,
                     tokens_per_s=rate if self.state == pb.RUNNING else 0.0,
                     generated_tokens=self.generated, prefix_cache=self.prefix.stats(pb))
        # moe_experts: the routing counts as of the steps run so far (one
        # uint64 per expert and MoE layer, read from host memory).
        counts = expert_counts(self.model)
        if counts is not None:
            stats["expert_counts"] = counts
        return stats
