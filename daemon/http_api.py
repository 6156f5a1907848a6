"""The HTTP API (read side): GET /v1/state, /v1/nodes, /healthz. Errors are
JSON bodies with a 4xx or 5xx status, never HTML."""

import json

import structlog
from aiohttp import web
from google.protobuf import json_format

log = structlog.get_logger("exod.http")


def _json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


@web.middleware
async def json_errors(request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error(e.status, e.reason if e.status != 404 else f"no such endpoint: {request.method} {request.path}")
    except Exception as e:  # a bug must not take the daemon down, and must say so
        log.exception("request failed", path=request.path)
        return error(500, f"internal error: {type(e).__name__}")


def make_app(node) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=1024 * 1024)

    async def healthz(request):
        return web.json_response({"status": "ok", "node_id": node.node_id})

    async def cluster_state(request):
        return web.json_response(_json(node.cluster_state()), dumps=lambda o: json.dumps(o, separators=(",", ":")))

    async def nodes(request):
        state = node.cluster_state()
        status = request.query.get("status")
        items = [_json(n) for n in state.nodes]
        if status is not None:
            wanted = status.upper()
            if wanted not in ("UP", "SUSPECT", "DOWN", "LEFT"):
                return error(400, f"status must be one of up, suspect, down, left; got {status!r}")
            items = [n for n in items if n.get("status") == wanted]
        return web.json_response({"self_id": state.self_id, "nodes": items})

    async def placement_preview(request):
        import asyncio

        from . import placement_api

        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        try:
            placement_request = placement_api.parse_request(body)
        except placement_api.BadRequest as e:
            return error(400, str(e))
        try:
            plan = await asyncio.to_thread(placement_api.preview, node.view, placement_request, node.models_dir)
        except placement_api.ModelError as e:
            return error(404, str(e))
        except placement_api.PlanError as e:
            return error(422, str(e))
        return web.json_response(_json(plan))

    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/placements/preview", placement_preview)
    app.router.add_get("/v1/state", cluster_state)
    app.router.add_get("/v1/nodes", nodes)
    return app


async def start_http(node, host: str, port: int):
    runner = web.AppRunner(make_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    return runner, bound
