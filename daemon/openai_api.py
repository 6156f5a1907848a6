"""The OpenAI-compatible chat API: POST /v1/chat/completions (streaming as
server-sent events, or not) and GET /v1/models. Requests go to a Ready
instance of the model, through the node that runs its rank 0. Errors use
OpenAI's shape, including the refusals of http_api's guard on these paths.
Bodies are parsed as strictly as the rest of the API (http_api.json_body)."""

import json
import time
import uuid

from aiohttp import web

from exod.proto import exod_pb2 as pb

from . import state

FINISH = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length", pb.FINISH_CANCELLED: "stop"}
ROLES = {"system", "user", "assistant", "tool", "developer"}


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/chat/") or path == "/v1/models"


def openai_error(status: int, message: str, param=None, kind="invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                             status=status)


def ready_instances(view: state.View, model: str | None = None) -> list[pb.Instance]:
    return [i for i in state.instances(view) if i.state == pb.INSTANCE_READY
            and (model is None or i.placement.model_id == model)]


def parse_chat(body) -> tuple[str, pb.GenerateRequest, bool]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    request = pb.GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
                or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}] needs a role ({', '.join(sorted(ROLES))}) and text content",
                                 f"messages[{i}]")
        request.messages.append(pb.ChatMessage(role=m["role"], content=m["content"]))
    s = request.sampling

    def number(name, low, high, kind=float):
        value = body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value) \
                or not low <= value <= high:
            raise InvalidRequest(f"{name} must be a {kind.__name__} in [{low}, {high}], got {value!r}", name)
        return kind(value)

    s.temperature = number("temperature", 0, 2) if body.get("temperature") is not None else 1.0
    if (top_p := number("top_p", 0, 1)) is not None:
        s.top_p = top_p
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        body = {**body, "max_tokens": limit}
        s.max_tokens = number("max_tokens", 1, 1 << 20, int)
    if (seed := number("seed", 0, 2**63 - 1, int)) is not None:
        s.seed = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
            raise InvalidRequest("stop must be a string or a list of up to 4 strings", "stop")
        s.stop.extend(stops)
    s.logprobs = bool(body.get("logprobs"))
    if (top := number("top_logprobs", 0, 20, int)) is not None:
        if not s.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        s.top_logprobs = top
    if body.get("n", 1) != 1:
        raise InvalidRequest("only n = 1 is supported", "n")
    return model, request, bool(body.get("stream"))


def _logprob_entry(token: pb.GeneratedToken) -> dict:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
            "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                             for t in token.top_logprobs]}


def add_routes(app: web.Application, node) -> None:
    async def models(request):
        seen = sorted({i.placement.model_id for i in ready_instances(node.view)})
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "exod"} for m in seen]})

    async def chat(request):
        from .http_api import BadBody, json_body

        try:
            body = await json_body(request)
        except BadBody as e:
            return openai_error(e.status, str(e))
        try:
            model, generate, stream = parse_chat(body)
        except InvalidRequest as e:
            return openai_error(e.status, str(e), e.param)
        candidates = ready_instances(node.view, model)
        if not candidates:
            return openai_error(404, f"no Ready instance of model {model!r}; place one with POST /v1/instances",
                                "model", "model_not_found")
        instance = candidates[0]
        created = int(time.time())
        chunks = node.generate_on(instance, generate)
        if stream:
            return await _stream(request, chunks, generate.request_id, model, created, generate.sampling.logprobs)
        text, logprobs, final = [], [], None
        async for chunk in chunks:
            for token in chunk.tokens:
                text.append(token.text)
                if generate.sampling.logprobs and token.token:
                    logprobs.append(_logprob_entry(token))
            if chunk.finish_reason:
                final = chunk
        if final is None or final.finish_reason == pb.FINISH_ERROR:
            return openai_error(502, f"the instance failed: {final.error if final else 'no answer'}",
                                kind="server_error")
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": FINISH[final.finish_reason],
                  "logprobs": {"content": logprobs} if generate.sampling.logprobs else None}
        return web.json_response({
            "id": generate.request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generation_tokens,
                      "total_tokens": final.prompt_tokens + final.generation_tokens},
        })

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)


async def _stream(request, chunks, request_id: str, model: str, created: int, with_logprobs: bool):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(delta: dict, finish=None, logprobs=None, usage=None):
        event = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                              "logprobs": {"content": logprobs} if logprobs is not None else None}]}
        if usage is not None:
            event["usage"] = usage
        await response.write(f"data: {json.dumps(event)}\n\n".encode())

    await send({"role": "assistant", "content": ""})
    async for chunk in chunks:
        for token in chunk.tokens:
            if token.text or (with_logprobs and token.token):
                await send({"content": token.text},
                           logprobs=[_logprob_entry(token)] if with_logprobs and token.token else None)
        if chunk.finish_reason == pb.FINISH_ERROR:
            error = {"error": {"message": f"the instance failed: {chunk.error}", "type": "server_error",
                               "param": None, "code": None}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
            break
        if chunk.finish_reason:
            await send({}, FINISH[chunk.finish_reason], usage={
                "prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.generation_tokens,
                "total_tokens": chunk.prompt_tokens + chunk.generation_tokens})
            break
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
