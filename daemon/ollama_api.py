"""Ollama's API: POST /api/chat and /api/generate (newline-delimited JSON
streamed by default, as Ollama does, or one object with "stream": false),
GET /api/tags (the models with a Ready instance). Errors in Ollama's shape,
{"error": "..."}, before any stream starts (routing, admission and
cancellation are serving.Serving's)."""

import json
import time
import uuid
from datetime import datetime, timezone

from aiohttp import web

from exod.proto import exod_pb2 as pb

from . import state
from .serving import ClientGone, ServingError, models

DONE_REASON = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length", pb.FINISH_CANCELLED: "stop"}
DEFAULT_TEMPERATURE = 0.8  # Ollama's default
ROLES = {"system", "user", "assistant", "tool"}


class InvalidRequest(Exception):
    pass


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def ollama_error(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    if status == 429:
        response.headers["Retry-After"] = "1"  # the queue drains as generations finish
    return response


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _options(body: dict, request: pb.GenerateRequest) -> None:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("options must be an object")
    s = request.sampling

    def number(name, low, high, kind=float):
        value = options.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value) \
                or not low <= value <= high:
            raise InvalidRequest(f"option {name} must be a {kind.__name__} in [{low}, {high}], got {value!r}")
        return kind(value)

    temperature = number("temperature", 0, 2)
    s.temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if (top_p := number("top_p", 0, 1)) is not None:
        s.top_p = top_p
    if (top_k := number("top_k", 0, 1 << 20, int)) is not None:
        s.top_k = top_k
    if (min_p := number("min_p", 0, 1)) is not None:
        s.min_p = min_p
    if (seed := number("seed", -2**63, 2**63 - 1, int)) is not None:
        s.seed = seed % 2**63
    predict = number("num_predict", -2, 1 << 20, int)
    if predict is not None and predict > 0:
        s.max_tokens = predict  # -1 (and Ollama's -2): as long as the runner's default allows
    stop = options.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) for x in stops):
            raise InvalidRequest("option stop must be a string or a list of up to 4 strings")
        if not all(stops):
            raise InvalidRequest("option stop: empty stop strings are not allowed")
        s.stop.extend(stops)
    if body.get("format") not in (None, ""):
        raise InvalidRequest("format (structured output) is not supported")
    if body.get("tools"):
        raise InvalidRequest("tools are not supported")


def _model(body) -> str:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required")
    # Ollama names a model's default tag `latest`: "demo:latest" is "demo".
    # No other tag is served, so any other stays as sent (and is not found).
    return model.removesuffix(":latest") or model


def _stream(body: dict) -> bool:
    """Streamed unless "stream": false, as Ollama; "no" is a mistake, not a no."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean")
    return stream is not False


def parse_chat(body) -> tuple[str, pb.GenerateRequest, bool]:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    request = pb.GenerateRequest(request_id=f"ollama-{uuid.uuid4().hex[:24]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}] needs a role ({', '.join(sorted(ROLES))}) and text content")
        if m.get("images"):
            raise InvalidRequest(f"messages[{i}]: images are not supported")
        request.messages.append(pb.ChatMessage(role=m["role"], content=m["content"]))
    _options(body, request)
    return model, request, _stream(body)


def parse_generate(body) -> tuple[str, pb.GenerateRequest, bool]:
    model = _model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string")
    if body.get("images"):
        raise InvalidRequest("images are not supported")
    if body.get("suffix"):
        raise InvalidRequest("suffix (fill in the middle) is not supported")
    request = pb.GenerateRequest(request_id=f"ollama-{uuid.uuid4().hex[:24]}")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRequest("system must be a string")
    if body.get("raw"):
        request.prompt = (system or "") + prompt  # raw: no template, as Ollama does
    else:
        if system:
            request.messages.append(pb.ChatMessage(role="system", content=system))
        request.messages.append(pb.ChatMessage(role="user", content=prompt))
    _options(body, request)
    return model, request, _stream(body)


def _final_fields(final: pb.GenerationChunk, started: float) -> dict:
    total = int((time.perf_counter() - started) * 1e9)
    # The runner rates the prompt over the tokens it computed (not those the
    # prefix cache held) from joining the batch to the first token, and the
    # decode from the first token on, over the tokens after it: those counts
    # over those rates give back the runner's measured times, each a part of
    # the request's (no clamp needed, and none to hide a wrong count).
    computed = max(final.prompt_tokens - final.cached_tokens, 0)
    prompt_eval = int(computed / final.prompt_tokens_per_s * 1e9) if final.prompt_tokens_per_s else 0
    decoded = max(final.generation_tokens - 1, 0)
    evaluated = int(decoded / final.generation_tokens_per_s * 1e9) if final.generation_tokens_per_s else 0
    return {"done": True, "done_reason": DONE_REASON.get(final.finish_reason, "stop"), "total_duration": total,
            "load_duration": 0, "prompt_eval_count": final.prompt_tokens, "prompt_eval_duration": prompt_eval,
            "eval_count": final.generation_tokens, "eval_duration": evaluated}


def add_routes(app: web.Application, node, serving) -> None:
    from .http_api import BadBody, json_body

    async def tags(request):
        by_model = {}
        for instance in state.instances(node.view):
            if instance.state == pb.INSTANCE_READY:
                by_model.setdefault(instance.placement.model_id, instance)
        listed = []
        for name in models(node.view):
            instance = by_model[name]
            size = sum(r.memory.weights_bytes for r in instance.placement.ranks)
            listed.append({"name": name, "model": name, "modified_at": datetime.fromtimestamp(
                instance.created_at_unix_ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z"),
                "size": size, "digest": instance.instance_id,
                "details": {"format": "mlx", "family": "", "families": None, "parameter_size": "",
                            "quantization_level": ""}})
        return web.json_response({"models": listed})

    async def generate(request, parse, chat: bool):
        started = time.perf_counter()
        try:
            body = await json_body(request)
        except BadBody as e:
            return ollama_error(e.status, str(e))
        try:
            model, generate_request, stream = parse(body)
        except InvalidRequest as e:
            serving.metrics.requests.labels("ollama", "", "invalid").inc()
            return ollama_error(400, str(e))
        try:
            generation = await serving.open("ollama", model, generate_request, request)
        except ServingError as e:
            return ollama_error(e.status, str(e) if e.kind != "not_found" else f"model '{model}' not found")

        def piece(text: str) -> dict:
            # The model as the client named it ("demo:latest" too), as Ollama echoes it.
            base = {"model": body["model"], "created_at": _now(), "done": False}
            return {**base, "message": {"role": "assistant", "content": text}} if chat else {**base, "response": text}

        if not stream:
            text = []
            try:
                async for chunk in generation:
                    text.extend(t.text for t in chunk.tokens)
            except ClientGone:
                return web.Response(status=499)
            final = generation.final
            if final.finish_reason == pb.FINISH_ERROR:
                return ollama_error(500, f"the instance failed: {final.error}")
            return web.json_response({**piece("".join(text)), **_final_fields(final, started)})

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            async for chunk in generation:
                text = "".join(t.text for t in chunk.tokens)
                if chunk.finish_reason == pb.FINISH_ERROR:
                    await response.write((json.dumps({"error": f"the instance failed: {chunk.error}"}) + "\n").encode())
                    break
                if text:
                    await response.write((json.dumps(piece(text)) + "\n").encode())
                if chunk.finish_reason:
                    await response.write((json.dumps({**piece(""), **_final_fields(chunk, started)}) + "\n").encode())
            await response.write_eof()
        except (ClientGone, ConnectionError):
            pass
        finally:
            await generation.close()
        return response

    async def chat(request):
        return await generate(request, parse_chat, True)

    async def generate_text(request):
        return await generate(request, parse_generate, False)

    async def version(request):
        return web.json_response({"version": "0.0.0-exod"})

    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate_text)
