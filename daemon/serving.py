"""What every generation API shares: routing to an instance, admission
before any answer, the stream of chunks with the client's liveness watched,
and the metrics of each request. The APIs (openai_api, anthropic_api,
ollama_api) only translate requests and answers.

Routing: among the Ready instances of the model, the one with the least
outstanding work: requests in its batch and its queue as its rank 0 last
reported them (statuses travel in the work records, about once a second
while it is busy), or the requests this node has sent it and not seen
finish, whichever is larger (the report lags; this node's own count does
not). A tie goes to the instance this node has sent fewer requests.

Admission: the request goes to the chosen instance's rank 0, whose first
answer is either `admitted` (the prompt fits; the stream may start) or an
error with its kind. So an over-long prompt is a 400, and a full queue a
429, before any byte of a stream is sent. An instance whose queue is full
is passed over for the next one; when every one is full, 429.

A client that goes away (a closed connection, noticed as each chunk
arrives, or within CLIENT_POLL_S of silence) ends its generation: the chunk
stream is closed, which cancels the request at rank 0, which drops it from
the batch on every rank at its next control. A non-streamed answer writes
nothing until the end, so the connection's state is all there is to watch.

A request the instance ends itself (it was removed or shut down while the
answer ran) is an error to its client, not a finished answer: the client
did not cancel it, and its text is cut short."""

import asyncio
import time
from collections import Counter

from exod.proto import exod_pb2 as pb

from . import state

ADMISSION_TIMEOUT_S = 60.0  # from sending a request to its admission (a runner judges at once)
CLIENT_POLL_S = 0.5


class ServingError(Exception):
    """A request refused before its answer starts. `kind` is one of
    not_found, invalid, context_length, overloaded, internal."""

    STATUS = {"not_found": 404, "invalid": 400, "context_length": 400, "overloaded": 429, "internal": 502}

    def __init__(self, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = self.STATUS[kind]
        self.param = param


class ClientGone(Exception):
    pass


_KIND = {pb.ERROR_INVALID_REQUEST: "invalid", pb.ERROR_CONTEXT_LENGTH: "context_length",
         pb.ERROR_OVERLOADED: "overloaded"}
OUTCOME = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length", pb.FINISH_CANCELLED: "cancelled",
           pb.FINISH_ERROR: "error"}


def ready_instances(view: state.View, model: str | None = None) -> list[pb.Instance]:
    """Ready instances that take new requests: one already replaced (by
    `exod rebalance`) only finishes what it has."""
    return [i for i in state.instances(view) if i.state == pb.INSTANCE_READY and not i.replaced_by
            and (model is None or i.placement.model_id == model)]


def models(view: state.View) -> list[str]:
    return sorted({i.placement.model_id for i in ready_instances(view)})


def reported_load(instance: pb.Instance) -> int:
    rank0 = next((r for r in instance.runners if r.rank == 0), None)
    return rank0.batch_size + rank0.queue_depth if rank0 is not None else 0


def client_gone(http_request) -> bool:
    transport = http_request.transport if http_request is not None else None
    return transport is None or transport.is_closing()


class Serving:
    def __init__(self, node, metrics):
        self.node = node
        self.metrics = metrics
        self.sent = Counter()  # instance id -> this node's requests on it, not finished

    def order(self, model: str) -> list[pb.Instance]:
        """The model's Ready instances, least outstanding work first."""
        candidates = ready_instances(self.node.view, model)
        return sorted(candidates, key=lambda i: (max(reported_load(i), self.sent[i.instance_id]),
                                                 self.sent[i.instance_id], i.instance_id))

    async def open(self, api: str, model: str, request: pb.GenerateRequest, http_request=None) -> "Generation":
        """An admitted generation, or ServingError before anything is sent."""
        started = time.perf_counter()
        candidates = self.order(model)
        if not candidates:
            self.metrics.requests.labels(api, "", "not_found").inc()
            raise ServingError("not_found", f"no Ready instance of model {model!r}; place one with POST /v1/instances",
                               "model")
        refusal = None
        for instance in candidates:
            chunks = self.node.generate_on(instance, request)
            self.sent[instance.instance_id] += 1
            try:
                first = await asyncio.wait_for(anext(chunks), ADMISSION_TIMEOUT_S)
            except (StopAsyncIteration, asyncio.TimeoutError):
                first = pb.GenerationChunk(finish_reason=pb.FINISH_ERROR, error_kind=pb.ERROR_INTERNAL,
                                           error="the instance did not answer")
            if first.admitted:
                return Generation(self, api, model, instance, request, first, chunks, started, http_request)
            self._done(instance.instance_id)
            await chunks.aclose()
            refusal = first
            if first.error_kind != pb.ERROR_OVERLOADED:
                break  # the request itself is wrong (or the instance failed): another instance says the same
        kind = _KIND.get(refusal.error_kind, "internal")
        self.metrics.requests.labels(api, model, kind if kind != "internal" else "error").inc()
        message = refusal.error if kind != "internal" else f"the instance failed: {refusal.error}"
        if kind == "overloaded" and len(candidates) > 1:
            message = f"every instance of {model!r} is busy: {refusal.error}"
        raise ServingError(kind, message, "messages" if kind == "context_length" else None)

    def _done(self, instance_id: str) -> None:
        self.sent[instance_id] -= 1
        if self.sent[instance_id] <= 0:
            del self.sent[instance_id]


def _ended_by_instance(chunk: pb.GenerationChunk) -> pb.GenerationChunk:
    """A cancel this node's client did not ask for (a cancelled client's
    generation is closed before any later chunk is read): the instance was
    removed or shut down mid-answer, which cuts the answer short."""
    ended = pb.GenerationChunk()
    ended.CopyFrom(chunk)
    ended.finish_reason = pb.FINISH_ERROR
    ended.error_kind = pb.ERROR_INTERNAL
    ended.error = f"it stopped before the answer was finished ({chunk.error or 'cancelled'})"
    return ended


class Generation:
    """An admitted request's chunks, with its metrics and its cancellation."""

    def __init__(self, serving: Serving, api: str, model: str, instance: pb.Instance, request: pb.GenerateRequest,
                 admitted: pb.GenerationChunk, chunks, started: float, http_request):
        self.serving = serving
        self.api = api
        self.model = model
        self.instance = instance
        self.request = request
        self.prompt_tokens = admitted.prompt_tokens
        self._chunks = chunks
        self._started = started
        self._last_token_at = None
        self._http = http_request
        self._closed = False
        self.final: pb.GenerationChunk | None = None
        self.outcome = "cancelled"
        self._counted_tokens = 0
        self._counted_cached = False
        serving.metrics.prompt_tokens.labels(model).inc(admitted.prompt_tokens)

    async def __aiter__(self):
        """Chunks until the final one (which is yielded too). Raises
        ClientGone when the client went away meanwhile."""
        metrics = self.serving.metrics
        pending = asyncio.ensure_future(anext(self._chunks))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=CLIENT_POLL_S)
                if self._http is not None and client_gone(self._http):
                    raise ClientGone()
                if not done:
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    chunk = pb.GenerationChunk(finish_reason=pb.FINISH_ERROR, error="the stream ended without an answer")
                if chunk.tokens and any(t.token or t.text for t in chunk.tokens) and not chunk.finish_reason:
                    now = time.perf_counter()
                    if self._last_token_at is None:
                        metrics.ttft.labels(self.model).observe(now - self._started)
                    else:
                        metrics.itl.labels(self.model).observe(now - self._last_token_at)
                    self._last_token_at = now
                    # Counted as they come, so that an answer cut short counts too.
                    self._count(len(chunk.tokens), chunk)
                if chunk.finish_reason:
                    if chunk.finish_reason == pb.FINISH_CANCELLED:
                        chunk = _ended_by_instance(chunk)
                    self.final = chunk
                    self.outcome = OUTCOME.get(chunk.finish_reason, "error")
                    self._count(chunk.generation_tokens - self._counted_tokens, chunk)
                    yield chunk
                    return
                yield chunk
                pending = asyncio.ensure_future(anext(self._chunks))
        finally:
            if not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await self.close()

    def _count(self, tokens: int, chunk: pb.GenerationChunk) -> None:
        metrics = self.serving.metrics
        if tokens > 0:
            metrics.tokens.labels(self.model).inc(tokens)
            self._counted_tokens += tokens
        # The chunk of the first token says how much of the prompt was cached
        # (and so does the final one, for an answer without tokens).
        if not self._counted_cached and (chunk.prompt_tokens or chunk.finish_reason):
            metrics.cached_tokens.labels(self.model).inc(chunk.cached_tokens)
            self._counted_cached = True

    async def close(self) -> None:
        """Idempotent: cancels the request if it is still running (closing the
        chunk stream tells rank 0), and counts the request once."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()
        finally:
            self.serving._done(self.instance.instance_id)
            self.serving.metrics.requests.labels(self.api, self.model, self.outcome).inc()
