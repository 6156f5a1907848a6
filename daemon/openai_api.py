"""The OpenAI-compatible API: POST /v1/chat/completions and /v1/completions
(streamed as server-sent events, or not), GET /v1/models and /v1/models/{id}. Requests go to
a Ready instance of the model through serving.Serving (routing, admission,
cancellation, metrics). Errors use OpenAI's shape, including the refusals
of http_api's guard on these paths, and come before any stream starts: an
over-long prompt is a 400 with code `context_length_exceeded`, a full
instance a 429. Bodies are parsed as strictly as the rest of the API
(http_api.json_body)."""

import json
import time
import uuid

from aiohttp import web

from exod.proto import exod_pb2 as pb

from .serving import ClientGone, ServingError, models

FINISH = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length", pb.FINISH_CANCELLED: "stop"}
ROLES = {"system", "user", "assistant", "tool", "developer"}
ERROR_TYPE = {"not_found": ("invalid_request_error", "model_not_found"),
              "invalid": ("invalid_request_error", None),
              "context_length": ("invalid_request_error", "context_length_exceeded"),
              "overloaded": ("rate_limit_error", "rate_limit_exceeded"),
              "internal": ("server_error", None)}


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


# OpenAI's resources, served or not: a client of one exod lacks (/v1/embeddings)
# still reads the 404 in OpenAI's shape. Other /v1/ paths are exod's own
# (/v1/instances, /v1/state...) or Anthropic's (/v1/messages).
OPENAI_RESOURCES = ("chat", "completions", "models", "embeddings", "responses", "audio", "images", "moderations",
                    "files", "uploads", "batches", "fine_tuning", "assistants", "threads", "vector_stores")


def is_openai_path(path: str) -> bool:
    if path == "/v1/models/pull":
        return False  # exod's, under OpenAI's /v1/models
    parts = path.split("/")
    return len(parts) > 2 and parts[1] == "v1" and parts[2] in OPENAI_RESOURCES


def openai_error(status: int, message: str, param=None, kind="invalid_request_error", code=None) -> web.Response:
    response = web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                                 status=status)
    if status == 429:
        response.headers["Retry-After"] = "1"  # the queue drains as generations finish
    return response


def serving_error(e: ServingError) -> web.Response:
    kind, code = ERROR_TYPE[e.kind]
    return openai_error(e.status, str(e), e.param, kind, code)


# ------------------------------------------------------------------ requests


def _number(body: dict, name: str, low, high, kind=float):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value) \
            or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a {kind.__name__} in [{low}, {high}], got {value!r}", name)
    return kind(value)


def _flag(body: dict, name: str) -> bool:
    """A JSON boolean (or absent): "yes" or 1 is a mistake, not a yes."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {value!r}", name)
    return value is True


def _unsupported(body: dict) -> None:
    """Refuse what would change the answer's meaning if silently ignored:
    tools, structured output, token biases and penalties. Zero penalties and
    an empty logit_bias change nothing (and many clients send them)."""
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(name) is not None:
            raise InvalidRequest(f"{name} is not supported (no tool calling)", name)
    form = body.get("response_format")
    if form is not None and form != {"type": "text"}:
        raise InvalidRequest("response_format is not supported (only {\"type\": \"text\"})", "response_format")
    if body.get("logit_bias"):
        raise InvalidRequest("logit_bias is not supported", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0):
            raise InvalidRequest(f"{name} is not supported (only 0)", name)


def _stream_options(body: dict, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk, as OpenAI's include_usage asks."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest("stream_options must be an object with a boolean include_usage", "stream_options")
    if not stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", "stream_options")
    return options.get("include_usage", False)


def _sampling(body: dict, request: pb.GenerateRequest) -> None:
    """The sampling fields both endpoints share."""
    s = request.sampling
    s.temperature = _number(body, "temperature", 0, 2) if body.get("temperature") is not None else 1.0
    if (top_p := _number(body, "top_p", 0, 1)) is not None:
        s.top_p = top_p
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        s.max_tokens = _number({**body, "max_tokens": limit}, "max_tokens", 1, 1 << 20, int)
    if (seed := _number(body, "seed", 0, 2**63 - 1, int)) is not None:
        s.seed = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) for x in stops):
            raise InvalidRequest("stop must be a string or a list of up to 4 strings", "stop")
        if not all(stops):
            # An empty stop string would end every answer before it starts.
            raise InvalidRequest("stop strings must not be empty", "stop")
        s.stop.extend(stops)
    if body.get("n", 1) != 1:
        raise InvalidRequest("only n = 1 is supported", "n")
    # Not OpenAI's, but vLLM's and others': generate to max_tokens past an end-of-sequence token.
    s.ignore_eos = body.get("ignore_eos") is True


def _model(body) -> str:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required", "model")
    return model


def parse_chat(body) -> tuple[str, pb.GenerateRequest, bool, bool]:
    model = _model(body)
    _unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    request = pb.GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}]")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
                or not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}] needs a role ({', '.join(sorted(ROLES))}) and text content",
                                 f"messages[{i}]")
        request.messages.append(pb.ChatMessage(role=m["role"], content=content))
    _sampling(body, request)
    s = request.sampling
    s.logprobs = _flag(body, "logprobs")
    if (top := _number(body, "top_logprobs", 0, 20, int)) is not None:
        if not s.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        s.top_logprobs = top
    stream = _flag(body, "stream")
    return model, request, stream, _stream_options(body, stream)


def parse_completion(body) -> tuple[str, pb.GenerateRequest, bool, bool]:
    model = _model(body)
    _unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt; [5] is one token id, not a batch
    request = pb.GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex[:24]}")
    if isinstance(prompt, str) and prompt:
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        # Ids past the vocabulary get the runner's own message; only what
        # the request cannot carry (uint32) is refused here.
        if not all(0 <= t < 2**32 for t in prompt):
            raise InvalidRequest("prompt token ids must be non-negative integers (below 2^32)", "prompt")
        request.prompt_tokens.extend(prompt)  # token ids, as OpenAI allows
    else:
        raise InvalidRequest("prompt must be a non-empty string (or a list of token ids)", "prompt")
    _sampling(body, request)
    if body.get("max_tokens") is None:
        request.sampling.max_tokens = 16  # OpenAI's default for completions
    if (logprobs := _number(body, "logprobs", 0, 5, int)) is not None:
        request.sampling.logprobs = True
        request.sampling.top_logprobs = logprobs
    if body.get("echo"):
        raise InvalidRequest("echo is not supported", "echo")
    if body.get("suffix"):
        raise InvalidRequest("suffix is not supported", "suffix")
    stream = _flag(body, "stream")
    return model, request, stream, _stream_options(body, stream)


def _token_fields(token) -> dict:
    """OpenAI's `token` and `bytes` of a GeneratedToken or TokenLogprob: the
    token's own bytes from the runner (a token may be part of a character,
    whose bytes the streamed text cannot hold), and its text from them."""
    raw = token.raw or token.text.encode()
    return {"token": raw.decode("utf-8", "replace"), "bytes": list(raw)}


def _logprob_entry(token: pb.GeneratedToken) -> dict:
    return {**_token_fields(token), "logprob": token.logprob,
            "top_logprobs": [{**_token_fields(t), "logprob": t.logprob} for t in token.top_logprobs]}


def _usage(final: pb.GenerationChunk) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generation_tokens,
            "total_tokens": final.prompt_tokens + final.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens}}


# ------------------------------------------------------------------ routes


def add_routes(app: web.Application, node, serving) -> None:
    from .http_api import BadBody, json_body

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "exod"}

    async def list_models(request):
        return web.json_response({"object": "list", "data": [model_object(m) for m in models(node.view)]})

    async def get_model(request):
        name = request.match_info["model_id"]
        if name not in models(node.view):
            return openai_error(404, f"the model {name!r} does not exist (no Ready instance of it)", "model",
                                code="model_not_found")
        return web.json_response(model_object(name))

    async def generate(request, parse, api):
        try:
            body = await json_body(request)
        except BadBody as e:
            return openai_error(e.status, str(e))
        try:
            model, generate_request, stream, include_usage = parse(body)
        except InvalidRequest as e:
            serving.metrics.requests.labels(api, "", "invalid").inc()
            return openai_error(e.status, str(e), e.param)
        try:
            generation = await serving.open(api, model, generate_request, request)
        except ServingError as e:
            if api == "openai.completions" and e.param == "messages":
                e.param = "prompt"  # serving names the chat field; a completion has a prompt
            return serving_error(e)
        created = int(time.time())
        if stream:
            return await _stream(request, generation, created, api == "openai.chat", include_usage)
        return await _whole(generation, created, api == "openai.chat")

    async def chat(request):
        return await generate(request, parse_chat, "openai.chat")

    async def completions(request):
        return await generate(request, parse_completion, "openai.completions")

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)


async def _whole(generation, created: int, chat: bool):
    text, logprobs = [], []
    with_logprobs = generation.request.sampling.logprobs
    try:
        async for chunk in generation:
            for token in chunk.tokens:
                text.append(token.text)
                if with_logprobs and token.token:
                    logprobs.append(token)
    except ClientGone:
        return web.Response(status=499)  # nobody reads it
    final = generation.final
    if final.finish_reason == pb.FINISH_ERROR:
        return openai_error(502, f"the instance failed: {final.error}", kind="server_error")
    request_id, model = generation.request.request_id, generation.model
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": FINISH[final.finish_reason],
                  "logprobs": {"content": [_logprob_entry(t) for t in logprobs]} if with_logprobs else None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": "".join(text), "finish_reason": FINISH[final.finish_reason],
                  "logprobs": _completion_logprobs(logprobs) if with_logprobs else None}
        kind = "text_completion"
    return web.json_response({"id": request_id, "object": kind, "created": created, "model": model,
                              "choices": [choice], "usage": _usage(final)})


def _completion_logprobs(tokens: list) -> dict:
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{x.text: x.logprob for x in t.top_logprobs} for t in tokens],
            "text_offset": []}


async def _stream(request, generation, created: int, chat: bool, include_usage: bool):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    request_id, model = generation.request.request_id, generation.model
    with_logprobs = generation.request.sampling.logprobs

    async def send(text=None, finish=None, token=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": [_logprob_entry(token)]} if token is not None else None}
            event = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish,
                      "logprobs": _completion_logprobs([token]) if token is not None else None}
            event = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                     "choices": [choice]}
        if include_usage:
            event["usage"] = None  # as OpenAI: null on every chunk but the last
        await response.write(f"data: {json.dumps(event)}\n\n".encode())

    async def send_usage(final):
        # OpenAI's last chunk when include_usage: no choices, the usage.
        event = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": created, "model": model, "choices": [], "usage": _usage(final)}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())

    try:
        if chat:
            await send(role=True)
        async for chunk in generation:
            for token in chunk.tokens:
                if token.text or (with_logprobs and token.token):
                    await send(token.text, token=token if with_logprobs and token.token else None)
            if chunk.finish_reason == pb.FINISH_ERROR:
                error = {"error": {"message": f"the instance failed: {chunk.error}", "type": "server_error",
                                   "param": None, "code": None}}
                await response.write(f"data: {json.dumps(error)}\n\n".encode())
            elif chunk.finish_reason:
                await send(None, FINISH[chunk.finish_reason])
                if include_usage:
                    await send_usage(chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ClientGone, ConnectionError):
        pass  # the generation was cancelled on the way out
    finally:
        await generation.close()
    return response
