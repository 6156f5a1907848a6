"""Anthropic's Messages API: POST /v1/messages, streamed (server-sent
events: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta, message_stop) or not. Text content only.
Errors in Anthropic's shape, {"type": "error", "error": {"type", "message"}},
before any stream starts (routing, admission and cancellation are
serving.Serving's)."""

import json
import uuid

from aiohttp import web

from exod.proto import exod_pb2 as pb

from .serving import ClientGone, ServingError

PATH = "/v1/messages"
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error",
              421: "permission_error", 429: "rate_limit_error", 502: "api_error", 500: "api_error"}
STOP_REASON = {pb.FINISH_LENGTH: "max_tokens", pb.FINISH_CANCELLED: "end_turn"}


class InvalidRequest(Exception):
    pass


def is_anthropic_path(path: str) -> bool:
    return path == PATH or path.startswith(PATH + "/")  # /v1/messages/count_tokens too: not served, but Anthropic's


def anthropic_error(status: int, message: str) -> web.Response:
    response = web.json_response(_error_body(status, message), status=status)
    if status == 429:
        response.headers["Retry-After"] = "1"  # the queue drains as generations finish
    return response


def _error_body(status: int, message: str) -> dict:
    # Anthropic calls every other client error (a 405 too) invalid_request_error.
    kind = ERROR_TYPE.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _unsupported(body: dict) -> None:
    """Refuse what would change the answer's meaning if silently ignored."""
    for name in ("tools", "tool_choice"):
        if body.get(name) is not None:
            raise InvalidRequest(f"{name}: not supported (no tool use)")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise InvalidRequest("thinking: not supported (only {\"type\": \"disabled\"})")


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise InvalidRequest(f"{where}: content must be a string or a list of text blocks (only text is supported)")


def _number(body: dict, name: str, low, high, kind=float):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value) \
            or not low <= value <= high:
        raise InvalidRequest(f"{name}: must be a {'integer' if kind is int else 'number'} in [{low}, {high}]")
    return kind(value)


def parse(body) -> tuple[str, pb.GenerateRequest, bool]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required")
    _unsupported(body)
    max_tokens = _number(body, "max_tokens", 1, 1 << 20, int)
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: must be a non-empty list")
    request = pb.GenerateRequest(request_id=f"msg_{uuid.uuid4().hex[:24]}")
    system = body.get("system")
    if system is not None:
        request.messages.append(pb.ChatMessage(role="system", content=_text(system, "system")))
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: must be \"user\" or \"assistant\"")
        request.messages.append(pb.ChatMessage(role=m["role"], content=_text(m.get("content"), f"messages.{i}")))
    s = request.sampling
    s.max_tokens = max_tokens
    temperature = _number(body, "temperature", 0, 1)
    s.temperature = 1.0 if temperature is None else temperature  # Anthropic's default
    if (top_p := _number(body, "top_p", 0, 1)) is not None:
        s.top_p = top_p
    if (top_k := _number(body, "top_k", 0, 1 << 20, int)) is not None:
        s.top_k = top_k
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
            raise InvalidRequest("stop_sequences: a list of up to 4 non-empty strings")
        s.stop.extend(stops)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean")  # "yes" is a mistake, not a yes
    return model, request, stream is True


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": output_tokens}


def _stop(final: pb.GenerationChunk) -> tuple[str, str | None]:
    if final.finish_reason == pb.FINISH_STOP and final.stop_sequence:
        return "stop_sequence", final.stop_sequence
    return STOP_REASON.get(final.finish_reason, "end_turn"), None


def add_routes(app: web.Application, node, serving) -> None:
    from .http_api import BadBody, json_body

    async def messages(request):
        try:
            body = await json_body(request)
        except BadBody as e:
            return anthropic_error(e.status, str(e))
        try:
            model, generate, stream = parse(body)
        except InvalidRequest as e:
            serving.metrics.requests.labels("anthropic", "", "invalid").inc()
            return anthropic_error(400, str(e))
        try:
            generation = await serving.open("anthropic", model, generate, request)
        except ServingError as e:
            return anthropic_error(e.status, str(e))
        if stream:
            return await _stream(request, generation)
        text = []
        try:
            async for chunk in generation:
                text.extend(t.text for t in chunk.tokens)
        except ClientGone:
            return web.Response(status=499)
        final = generation.final
        if final.finish_reason == pb.FINISH_ERROR:
            return anthropic_error(502, f"the instance failed: {final.error}")
        reason, sequence = _stop(final)
        return web.json_response({
            "id": generate.request_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(text)}], "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": _usage(generation.prompt_tokens, final.cached_tokens, final.generation_tokens)})

    app.router.add_post(PATH, messages)


async def _stream(request, generation):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def event(name: str, data: dict):
        await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    started = False

    async def start(chunk: pb.GenerationChunk):
        # Sent with the first chunk that carries tokens (or the final one), not
        # at admission: that chunk says how much of the prompt the prefix
        # cache held, so the usage here agrees with message_delta's.
        prompt = chunk.prompt_tokens or generation.prompt_tokens
        cached = chunk.cached_tokens if chunk.prompt_tokens else 0
        await event("message_start", {"type": "message_start", "message": {
            "id": generation.request.request_id, "type": "message", "role": "assistant", "model": generation.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": _usage(prompt, cached, 0)}})
        await event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        await event("ping", {"type": "ping"})

    try:
        async for chunk in generation:
            if not started and (chunk.tokens or chunk.finish_reason):
                started = True
                await start(chunk)
            text = "".join(t.text for t in chunk.tokens)
            if text:
                await event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": text}})
            if chunk.finish_reason == pb.FINISH_ERROR:
                await event("error", _error_body(502, f"the instance failed: {chunk.error}"))
            elif chunk.finish_reason:
                reason, sequence = _stop(chunk)
                await event("content_block_stop", {"type": "content_block_stop", "index": 0})
                await event("message_delta", {"type": "message_delta",
                                              "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                              "usage": _usage(generation.prompt_tokens, chunk.cached_tokens,
                                                             chunk.generation_tokens)})
                await event("message_stop", {"type": "message_stop"})
        await response.write_eof()
    except (ClientGone, ConnectionError):
        pass
    finally:
        await generation.close()
    return response
