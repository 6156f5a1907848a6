"""Rank 0's side of serving: admission and the queue.

A request is judged the moment it arrives (on the command reader's thread,
not the serving loop's, so that a long prefill never delays the answer):
its prompt is rendered and tokenized, checked against the vocabulary and
the context, and the queue's bound. A refused request gets its error chunk
at once, with an ErrorKind the APIs turn into their own 400 or 429; an
accepted one gets an `admitted` chunk (which lets an HTTP front end answer
200 before any token exists) and waits for a place in the batch.

The serving loop takes waiting requests when the batch has room (`take`),
so the batch never holds more than the placement's concurrency."""

import threading
from collections import deque
from dataclasses import dataclass

from exod.proto import exod_pb2 as pb

DEFAULT_MAX_TOKENS = 256


class RequestError(Exception):
    def __init__(self, message: str, kind: int = pb.ERROR_INVALID_REQUEST):
        super().__init__(message)
        self.kind = kind


@dataclass
class Admitted:
    request: pb.GenerateRequest
    tokens: list[int]
    max_tokens: int


class Admission:
    """What makes a request valid for one instance."""

    def __init__(self, tokenizer, vocab: int | None, context_length: int):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.context_length = context_length

    def max_tokens(self, request: pb.GenerateRequest, prompt_tokens: int) -> int:
        """The request's own limit, or the default: up to DEFAULT_MAX_TOKENS,
        and never more than the context leaves after the prompt (OpenAI's and
        Ollama's default likewise fills what is left, so a prompt that fits
        is never refused for a limit its client did not set)."""
        if request.sampling.max_tokens:
            return request.sampling.max_tokens
        return min(DEFAULT_MAX_TOKENS, self.context_length // 2, self.context_length - prompt_tokens)

    def prompt_tokens(self, request: pb.GenerateRequest) -> list[int]:
        if request.messages:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; send prompt_tokens")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                tokens = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            except Exception as e:  # the template is the model's own code
                raise RequestError(f"chat template failed: {e}") from e
        elif request.prompt:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; send prompt_tokens")
            tokens = list(self.tokenizer.encode(request.prompt))
        else:
            tokens = list(request.prompt_tokens)
        if not tokens:
            raise RequestError("empty prompt")
        if self.vocab and max(tokens) >= self.vocab:
            raise RequestError(f"token id {max(tokens)} is outside the vocabulary of {self.vocab}")
        if len(tokens) >= self.context_length:
            where = f"the instance's context of {self.context_length}"
            raise RequestError(f"prompt of {len(tokens)} tokens exceeds {where}" if len(tokens) > self.context_length
                               else f"prompt of {len(tokens)} tokens fills {where}, leaving nothing to generate",
                               pb.ERROR_CONTEXT_LENGTH)
        budget = self.max_tokens(request, len(tokens))
        if len(tokens) + budget > self.context_length:
            raise RequestError(f"prompt of {len(tokens)} tokens plus max_tokens {budget} exceeds "
                               f"the instance's context of {self.context_length}", pb.ERROR_CONTEXT_LENGTH)
        return tokens

    def admit(self, request: pb.GenerateRequest) -> Admitted:
        tokens = self.prompt_tokens(request)
        return Admitted(request, tokens, self.max_tokens(request, len(tokens)))


class Inbox:
    """Requests from the parent, judged on arrival, waiting for the batch.
    Filled by the command reader's thread, emptied by the serving loop."""

    def __init__(self, emit=None, max_queue: int = 64):
        self.emit = emit  # GenerationChunk -> None; set before requests arrive
        self.max_queue = max_queue
        self.max_batch = 1
        self.admission: Admission | None = None
        self.shutdown = threading.Event()
        self._lock = threading.Condition()
        self._waiting: deque[Admitted] = deque()
        self._early: list[pb.GenerateRequest] = []  # arrived before the model was ready
        self._known: set[str] = set()  # waiting or in the batch
        self._cancelled: set[str] = set()

    # ---------------------------------------------------------------- the reader's thread

    def put(self, request: pb.GenerateRequest) -> None:
        with self._lock:
            if self.admission is None:
                self._early.append(request)
                return
        self._judge(request)

    def open(self, admission: Admission, max_batch: int) -> None:
        """The model is ready: judge what arrived before, then every request as it comes."""
        with self._lock:
            self.admission = admission
            self.max_batch = max_batch
            early, self._early = self._early, []
        for request in early:
            self._judge(request)

    def _judge(self, request: pb.GenerateRequest) -> None:
        try:
            admitted = self.admission.admit(request)
        except RequestError as e:
            self._refuse(request.request_id, str(e), e.kind)
            return
        with self._lock:
            if request.request_id in self._known:
                problem = f"request id {request.request_id!r} is in use"
            elif len(self._known) >= self.max_batch + self.max_queue:
                # Known: waiting or in the batch. The batch's free places take
                # requests at once; beyond them, max_queue may wait.
                problem = (f"the instance's queue is full ({self.max_batch} requests in its batch, "
                           f"{len(self._waiting)} of at most {self.max_queue} waiting)")
            else:
                problem = None
                self._known.add(request.request_id)
                self._waiting.append(admitted)
                # The admitted chunk goes out under the lock, so that it always
                # precedes the request's first token.
                self.emit(pb.GenerationChunk(request_id=request.request_id, admitted=True,
                                             prompt_tokens=len(admitted.tokens)))
                self._lock.notify_all()
        if problem is not None:
            self._refuse(request.request_id, problem,
                         pb.ERROR_OVERLOADED if "queue is full" in problem else pb.ERROR_INVALID_REQUEST)

    def _refuse(self, request_id: str, message: str, kind: int) -> None:
        self.emit(pb.GenerationChunk(request_id=request_id, finish_reason=pb.FINISH_ERROR, error=message,
                                     error_kind=kind))

    def cancel(self, request_id: str) -> None:
        """A waiting request ends here and now; one in the batch is left to
        the serving loop, which removes it on every rank."""
        with self._lock:
            if request_id not in self._known:
                return  # finished, or never seen: a cancel must not hit a later reuse of the id
            for item in self._waiting:
                if item.request.request_id == request_id:
                    self._waiting.remove(item)
                    self._known.discard(request_id)
                    self.emit(pb.GenerationChunk(request_id=request_id, finish_reason=pb.FINISH_CANCELLED))
                    return
            self._cancelled.add(request_id)

    def stop(self) -> None:
        """Shut down: the serving loop votes at its next control, at once if it waits."""
        with self._lock:
            self.shutdown.set()
            self._lock.notify_all()

    # ---------------------------------------------------------------- the serving loop

    def take(self, room: int, wait_s: float = 0.0) -> list[Admitted]:
        """Up to `room` waiting requests, oldest first; with nothing waiting,
        wait up to wait_s for one (or a shutdown)."""
        with self._lock:
            if not self._waiting and wait_s > 0 and not self.shutdown.is_set():
                self._lock.wait(wait_s)
            taken = []
            while self._waiting and len(taken) < room:
                taken.append(self._waiting.popleft())
            return taken

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def done(self, request_id: str) -> None:
        with self._lock:
            self._known.discard(request_id)
            self._cancelled.discard(request_id)

    def depth(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._early)

    def drain(self) -> list[str]:
        """Every waiting request id, removed: the runner is ending."""
        with self._lock:
            ids = [a.request.request_id for a in self._waiting] + [r.request_id for r in self._early]
            self._waiting.clear()
            self._early.clear()
            for request_id in ids:
                self._known.discard(request_id)
            return ids
