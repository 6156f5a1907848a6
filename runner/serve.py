"""Serving in lockstep. Rank 0 takes requests from its parent; every rank
runs the same collectives in the same order:

  idle:     a header all-sum every HEARTBEAT_S (a dead peer shows up here)
  request:  the header (op, prompt length, sampling parameters, seed, stop
            tokens), then the prompt tokens
  decoding: the model; every CONTROL_EVERY steps an all-sum of each rank's
            running hash of the tokens it sampled, plus rank 0's stop vote

Every rank samples from the same logits with the same seed, so the tokens
agree without a collective per step; the control exchange proves they do
("ranks diverged" fails the request otherwise). Length and stop tokens end
every rank at the same step; stop strings and cancels are decided on rank
0, which answers at once and lets the others catch up at the next control.
"""

import os
import queue
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from exod.placement.constants import PREFILL_CHUNK_TOKENS
from exod.proto import exod_pb2 as pb

HEARTBEAT_S = 0.5
CONTROL_EVERY = 4
MAX_STOP_TOKENS = 4
OP_IDLE, OP_GENERATE = 0, 1
_HASH_MOD = 2_147_483_629  # a prime below 2^31: hashes fit int32 all-sums
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
    def __init__(self, model, tokenizer, group, inbox: Inbox, emit, set_state, progress, context_length: int,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model = model
        # Settable so that a test can make a short prompt cross chunk
        # boundaries; the planner's activation estimate assumes the default.
        self.prefill_chunk = prefill_chunk
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

    def _header(self, request, tokens: list[int]) -> "Header":
        vote = 1 if self.inbox.shutdown.is_set() else 0
        local = Header.encode(self, request, tokens) if self.rank == 0 and request is not None else Header.empty()
        local[Header.VOTES] = vote
        return Header(self._all_sum(mx.array(local, dtype=mx.int32)).tolist())

    # ---------------------------------------------------------------- loop

    def run(self, peer_timeout_s: float) -> None:
        while True:
            request, tokens = None, []
            if self.rank == 0:
                request, tokens = self._next_request()
            self.progress("Ready", peer_timeout_s)
            header = self._header(request, tokens)
            if header.votes:
                if request is not None:
                    self._finish(request, pb.FINISH_CANCELLED, error="runner shutting down")
                return
            if header.op != OP_GENERATE:
                continue
            n = header.prompt_length
            prompt = self._all_sum(mx.array(tokens if self.rank == 0 else [0] * n, dtype=mx.int32))
            # Now, on every rank: a pipeline stage that receives its input would
            # otherwise never evaluate this all-sum, and the first stage would wait.
            mx.eval(prompt)
            self.set_state(pb.RUNNING)
            self.current = request
            self._generate(request, prompt, header, peer_timeout_s)
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

    def stop_tokens(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set()

    def _max_tokens(self, request) -> int:
        return request.sampling.max_tokens or min(DEFAULT_MAX_TOKENS, self.context_length // 2)

    # ---------------------------------------------------------------- one request

    def _generate(self, request, prompt: mx.array, header: "Header", peer_timeout_s: float) -> None:
        rank0 = self.rank == 0
        world = self.group.size() if self.group else 1
        n = header.prompt_length
        cache = make_prompt_cache(self.model)
        started = time.perf_counter()
        for start in range(0, n - 1, self.prefill_chunk):
            self.progress("Running", peer_timeout_s)
            end = min(start + self.prefill_chunk, n - 1)
            self.model(prompt[None, start:end], cache=cache)
            mx.eval([c.state for c in cache])
        mx.random.seed(header.seed)
        sampler = make_sampler(temp=header.temperature, top_p=header.top_p, min_p=header.min_p, top_k=header.top_k)
        want_logprob = rank0 and request.sampling.logprobs
        top_k = min(request.sampling.top_logprobs, 20) if rank0 else 0

        def step(tokens: mx.array):
            logits = self.model(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = sampler(logprobs)
            extra = [logprobs[0, token[0]]] if want_logprob else []
            if top_k:
                top = mx.argpartition(-logprobs[0], top_k - 1)[:top_k]
                extra += [top, logprobs[0, top]]
            return token, extra, logits

        def control(after: mx.array, token_hash: int, stop: int) -> mx.array:
            local = np.zeros(world + 1, dtype=np.int32)
            local[self.rank] = token_hash
            local[world] = stop
            return self._all_sum(mx.depends(mx.array(local), after))

        state = _Rank0State(self, request, n) if rank0 else None
        self.progress("Running", peer_timeout_s)
        y, extra, first_logits = step(prompt[n - 1:n])
        mx.async_eval(y, *extra)
        if rank0 and header.want_logits:
            state.prompt_logits = first_logits[0].tolist()
        token_hash, generated, stop_vote = 0, 0, 0
        pending_control = None
        while True:
            self.progress("Running", peer_timeout_s)
            next_y, next_extra, _ = step(y)
            next_control = None
            if (generated + 1) % CONTROL_EVERY == 0:
                next_control = control(next_y, token_hash, stop_vote)
            mx.async_eval(next_y, *next_extra, *([next_control] if next_control is not None else []))
            token = y.item()
            generated += 1
            token_hash = (token_hash * 31 + token + 1) % _HASH_MOD
            if rank0:
                if state.prompt_seconds is None:
                    state.prompt_seconds = time.perf_counter() - started
                    state.decode_started = time.perf_counter()
                if state.accept(token, extra):
                    stop_vote = 1
            ended = generated >= header.max_tokens or (token in header.stop_tokens)
            if pending_control is not None:
                hashes_and_vote = pending_control.tolist()
                if len(set(hashes_and_vote[:world])) != 1:
                    mx.eval(next_y, *next_extra, *([next_control] if next_control is not None else []))
                    raise RanksDiverged(f"ranks sampled different tokens by step {generated}: the logits "
                                        f"differ between ranks")
                ended = ended or bool(hashes_and_vote[world])
            if ended:
                # Every rank finishes the step it started, at the same point.
                mx.eval(next_y, *next_extra, *([next_control] if next_control is not None else []))
                break
            pending_control = next_control
            y, extra = next_y, next_extra
        if rank0:
            state.finish()


class RanksDiverged(Exception):
    pass


class Header:
    """The request as every rank needs it, packed in one int32 all-sum."""

    OP, PROMPT_LENGTH, VOTES, WANT_LOGITS, MAX_TOKENS, TOP_K, SEED, TEMPERATURE, TOP_P, MIN_P = range(10)
    STOP_TOKENS = 10
    SIZE = STOP_TOKENS + MAX_STOP_TOKENS

    def __init__(self, values: list[int]):
        self.values = values
        self.op = values[self.OP]
        self.prompt_length = values[self.PROMPT_LENGTH]
        self.votes = values[self.VOTES]
        self.want_logits = bool(values[self.WANT_LOGITS])
        self.max_tokens = values[self.MAX_TOKENS]
        self.top_k = values[self.TOP_K]
        self.seed = values[self.SEED]
        floats = np.array(values[self.TEMPERATURE:self.MIN_P + 1], dtype=np.int32).view(np.float32)
        self.temperature, self.top_p, self.min_p = (float(x) for x in floats)
        self.stop_tokens = {t - 1 for t in values[self.STOP_TOKENS:] if t > 0}

    @classmethod
    def empty(cls) -> list[int]:
        return [0] * cls.SIZE

    @classmethod
    def encode(cls, server: "Server", request, tokens: list[int]) -> list[int]:
        s = request.sampling
        values = cls.empty()
        values[cls.OP] = OP_GENERATE
        values[cls.PROMPT_LENGTH] = len(tokens)
        values[cls.WANT_LOGITS] = int(request.return_prompt_logits)
        values[cls.MAX_TOKENS] = server._max_tokens(request)
        values[cls.TOP_K] = s.top_k
        values[cls.SEED] = (s.seed if s.HasField("seed") else int.from_bytes(os.urandom(4), "little")) % 2**31
        top_p = s.top_p if 0 < s.top_p < 1 else 0.0
        floats = np.array([s.temperature, top_p, s.min_p], dtype=np.float32).view(np.int32)
        values[cls.TEMPERATURE:cls.MIN_P + 1] = [int(x) for x in floats]
        stops = [] if s.ignore_eos else sorted(server.stop_tokens())[:MAX_STOP_TOKENS]
        values[cls.STOP_TOKENS:cls.STOP_TOKENS + len(stops)] = [t + 1 for t in stops]
        return values


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
        self.finished = False
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

    def accept(self, token: int, extra) -> bool:
        """Handle one sampled token; True once generation must stop. The final
        chunk goes out at once; the other ranks may run a few steps more."""
        if self.finish_reason:
            return True  # steps the other ranks still run after the decision
        self._judge(token, extra)
        if self.finish_reason:
            self.finish()
            return True
        return False

    def _judge(self, token: int, extra) -> None:
        if self.server.inbox.is_cancelled(self.request.request_id):
            self.finish_reason = pb.FINISH_CANCELLED
            return
        if token in self.eos and not self.request.sampling.ignore_eos:
            self.finish_reason = pb.FINISH_STOP
            return
        self.generated += 1
        piece = self._piece(token)
        out = pb.GeneratedToken(token=token)
        if self.request.sampling.logprobs:
            out.logprob = float(extra[0].item())
        if self.request.sampling.top_logprobs:
            ids, values = extra[-2].tolist(), extra[-1].tolist()
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
        if self.finished:
            return
        self.finished = True
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

