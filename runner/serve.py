"""Serving in lockstep. Rank 0 takes requests from its parent; every rank
runs the same collectives in the same order:

  idle:      a header all-sum every HEARTBEAT_S (a dead peer shows up here)
  request:   header, then the prompt tokens
  each step: the model, then an all-sum of [token, stop] from rank 0

Only rank 0 samples, so ranks can never drift apart. Stopping is decided on
rank 0 and reaches the others one or two steps later, which compute those
steps and discard them."""

import os
import queue
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from exod.placement.constants import PREFILL_CHUNK_TOKENS
from exod.proto import exod_pb2 as pb

HEARTBEAT_S = 0.5
HEADER = 4  # [op, prompt length, shutdown votes, want prompt logits]
OP_IDLE, OP_GENERATE = 0, 1
PREFILL_CHUNK = PREFILL_CHUNK_TOKENS  # what the planner's activation estimate assumes
DEFAULT_MAX_TOKENS = 256


@dataclass
class Inbox:
    """Commands from the parent, filled by the reader thread."""

    requests: "queue.Queue[pb.GenerateRequest]" = field(default_factory=queue.Queue)
    cancelled: set = field(default_factory=set)
    shutdown: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    known: set = field(default_factory=set)  # queued or generating

    def put(self, request: pb.GenerateRequest) -> None:
        with self.lock:
            self.known.add(request.request_id)
        self.requests.put(request)

    def cancel(self, request_id: str) -> None:
        with self.lock:
            if request_id in self.known:  # a cancel for a finished id must not hit its reuse
                self.cancelled.add(request_id)

    def done(self, request_id: str) -> None:
        with self.lock:
            self.known.discard(request_id)
            self.cancelled.discard(request_id)

    def is_cancelled(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.cancelled


class RequestError(Exception):
    pass


class Server:
    def __init__(self, model, tokenizer, group, inbox: Inbox, emit, set_state, progress, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.group = group
        self.rank = group.rank() if group else 0
        self.inbox = inbox
        self.emit = emit  # GenerationChunk -> None (rank 0)
        self.set_state = set_state
        self.progress = progress  # (phase, seconds) -> None: the watchdog's deadline
        self.context_length = context_length
        self.vocab = int(model.args.vocab_size) if hasattr(model, "args") else None
        self.current = None  # the request being generated (rank 0)

    # ---------------------------------------------------------------- collectives

    def _all_sum(self, array: mx.array) -> mx.array:
        return mx.distributed.all_sum(array, group=self.group) if self.group else array

    def _header(self, op: int, n: int, want_logits: int) -> list[int]:
        vote = 1 if self.inbox.shutdown.is_set() else 0
        local = [op, n, vote, want_logits] if self.rank == 0 else [0, 0, vote, 0]
        result = self._all_sum(mx.array(local, dtype=mx.int32))
        return result.tolist()

    # ---------------------------------------------------------------- loop

    def run(self, peer_timeout_s: float) -> None:
        while True:
            request, tokens = None, []
            if self.rank == 0:
                request, tokens = self._next_request()
            self.progress("Ready", peer_timeout_s)
            op, n, votes, want_logits = self._header(OP_GENERATE if request else OP_IDLE, len(tokens), 0 if request is None else int(request.return_prompt_logits))
            if votes:
                if request is not None:
                    self._finish(request, pb.FINISH_CANCELLED, error="runner shutting down")
                return
            if op != OP_GENERATE:
                continue
            prompt = self._all_sum(mx.array(tokens if self.rank == 0 else [0] * n, dtype=mx.int32))
            # Now, on every rank: a pipeline stage that receives its input would
            # otherwise never evaluate this all-sum, and the first stage would wait.
            mx.eval(prompt)
            self.set_state(pb.RUNNING)
            self.current = request
            self._generate(request, prompt, n, bool(want_logits), peer_timeout_s)
            self.current = None
            self.set_state(pb.READY)

    def _next_request(self):
        """A valid request and its prompt tokens, or (None, []) after a heartbeat's wait."""
        deadline = time.monotonic() + HEARTBEAT_S
        while not self.inbox.shutdown.is_set():
            try:
                request = self.inbox.requests.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None, []
            if self.inbox.is_cancelled(request.request_id):
                self._finish(request, pb.FINISH_CANCELLED)
                continue
            try:
                return request, self._prompt_tokens(request)
            except RequestError as e:
                self._finish(request, pb.FINISH_ERROR, error=str(e))
        return None, []

    def _prompt_tokens(self, request: pb.GenerateRequest) -> list[int]:
        if request.messages:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; send prompt_tokens")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                tokens = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            except Exception as e:  # the template is the model's own code
                raise RequestError(f"chat template failed: {e}") from e
        else:
            tokens = list(request.prompt_tokens)
        if not tokens:
            raise RequestError("empty prompt")
        if self.vocab and max(tokens) >= self.vocab:
            raise RequestError(f"token id {max(tokens)} is outside the vocabulary of {self.vocab}")
        budget = self._max_tokens(request)
        if len(tokens) + budget > self.context_length:
            raise RequestError(f"prompt of {len(tokens)} tokens plus max_tokens {budget} exceeds "
                               f"the instance's context of {self.context_length}")
        return tokens

    def _finish(self, request, reason: int, error: str = "") -> None:
        self.inbox.done(request.request_id)
        self.emit(pb.GenerationChunk(request_id=request.request_id, finish_reason=reason, error=error))

    def _max_tokens(self, request) -> int:
        return request.sampling.max_tokens or min(DEFAULT_MAX_TOKENS, self.context_length // 2)

    # ---------------------------------------------------------------- one request

    def _generate(self, request, prompt: mx.array, n: int, want_logits: bool, peer_timeout_s: float) -> None:
        rank0 = self.rank == 0
        cache = make_prompt_cache(self.model)
        started = time.perf_counter()
        for start in range(0, n - 1, PREFILL_CHUNK):
            self.progress("Running", peer_timeout_s)
            end = min(start + PREFILL_CHUNK, n - 1)
            self.model(prompt[None, start:end], cache=cache)
            mx.eval([c.state for c in cache])
        sampler = logprob_fn = None
        if rank0:
            s = request.sampling
            mx.random.seed(s.seed if s.HasField("seed") else int.from_bytes(os.urandom(4), "little"))
            sampler = make_sampler(temp=s.temperature, top_p=s.top_p if 0 < s.top_p < 1 else 0.0,
                                   min_p=s.min_p, top_k=s.top_k)
        top_k = min(request.sampling.top_logprobs, 20) if rank0 else 0

        def step(tokens: mx.array, stop: int):
            logits = self.model(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)
            if rank0:
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                token = sampler(logprobs)
                packed = mx.concatenate([token.astype(mx.int32), mx.array([stop], dtype=mx.int32)])
                extra = [logprobs[0, token[0]] if request.sampling.logprobs else mx.array(0.0)]
                if top_k:
                    top = mx.argpartition(-logprobs[0], top_k - 1)[:top_k]
                    extra += [top, logprobs[0, top]]
                return self._all_sum(packed), extra, logits
            # The model's collectives must run before this all-sum, as on rank 0.
            return self._all_sum(mx.depends(mx.zeros((2,), dtype=mx.int32), logits)), [logits], None

        state = _Rank0State(self, request, n) if rank0 else None
        self.progress("Running", peer_timeout_s)
        packed, extra, first_logits = step(prompt[n - 1:n], 0)
        mx.async_eval(packed, *extra)
        if rank0 and want_logits:
            state.prompt_logits = first_logits[0].tolist()
        stop = 0
        while True:
            self.progress("Running", peer_timeout_s)
            next_packed, next_extra, _ = step(packed[:1], stop)
            mx.async_eval(next_packed, *next_extra)
            token, stop_now = packed.tolist()
            if stop_now:
                mx.eval(next_packed, *next_extra)  # every rank finishes the step it started
                break
            if rank0:
                if state.prompt_seconds is None:
                    state.prompt_seconds = time.perf_counter() - started
                    state.decode_started = time.perf_counter()
                stop = state.accept(token, extra)
            packed, extra = next_packed, next_extra
        if rank0:
            state.finish()


class _Rank0State:
    """Rank 0's view of one request: detokenizing, stop strings, limits."""

    def __init__(self, server: Server, request, prompt_tokens: int):
        self.server = server
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self.text = ""
        self.emitted = 0
        self.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        self.stopped_by_string = False
        self.prompt_seconds = None
        self.decode_started = None
        self.prompt_logits = None
        tokenizer = server.tokenizer
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        if self.detokenizer is not None:
            self.detokenizer.reset()
        self.eos = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self.stops = [s for s in request.sampling.stop if s]
        self.max_tokens = server._max_tokens(request)

    def accept(self, token: int, extra) -> int:
        """Handle one sampled token; returns 1 when generation must stop."""
        if self.finish_reason:
            return 1  # steps already in flight after the decision
        if self.server.inbox.is_cancelled(self.request.request_id):
            self.finish_reason = pb.FINISH_CANCELLED
            return 1
        if token in self.eos and not self.request.sampling.ignore_eos:
            self.finish_reason = pb.FINISH_STOP
            return 1
        self.generated += 1
        piece = self._piece(token)
        out = pb.GeneratedToken(token=token)
        if self.request.sampling.logprobs:
            out.logprob = float(extra[0].item())
        if len(extra) == 3:
            ids, values = extra[1].tolist(), extra[2].tolist()
            for tid, value in sorted(zip(ids, values), key=lambda p: -p[1]):
                out.top_logprobs.append(pb.TokenLogprob(token=tid, text=self._text_of(tid), logprob=value))
        self.text += piece
        cut = self._stop_at()
        if cut is not None:
            out.text = self.text[self.emitted:cut]
            self.emitted = cut
            self.finish_reason = pb.FINISH_STOP
            self.stopped_by_string = True
        else:
            safe = len(self.text) - self._held_back()
            out.text = self.text[self.emitted:safe]
            self.emitted = safe
            if self.generated >= self.server._max_tokens(self.request):
                self.finish_reason = pb.FINISH_LENGTH
        self.server.emit(pb.GenerationChunk(request_id=self.request.request_id, tokens=[out]))
        return 1 if self.finish_reason else 0

    def _piece(self, token: int) -> str:
        if self.detokenizer is None:
            return ""
        self.detokenizer.add_token(token)
        return self.detokenizer.last_segment

    def _text_of(self, token: int) -> str:
        return self.server.tokenizer.decode([token]) if self.server.tokenizer is not None else ""

    def _stop_at(self):
        found = [self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops]
        found = [i for i in found if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Characters at the end that may be the start of a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def finish(self) -> None:
        if self.detokenizer is not None and not self.stopped_by_string:
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
        decode_s = time.perf_counter() - (self.decode_started or time.perf_counter())
        chunk = pb.GenerationChunk(
            request_id=self.request.request_id,
            finish_reason=self.finish_reason or pb.FINISH_STOP,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generated,
            prompt_tokens_per_s=self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0,
            generation_tokens_per_s=(self.generated - 1) / decode_s if self.generated > 1 and decode_s > 0 else 0.0,
        )
        tail = "" if self.stopped_by_string else self.text[self.emitted:]
        if tail:
            chunk.tokens.append(pb.GeneratedToken(text=tail))
        if self.prompt_logits is not None:
            chunk.prompt_logits.extend(self.prompt_logits)
        self.server.inbox.done(self.request.request_id)
        self.server.emit(chunk)

