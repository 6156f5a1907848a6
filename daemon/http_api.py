"""The HTTP API (read side): GET /v1/state, /v1/nodes, /healthz. Errors are
JSON bodies with a 4xx or 5xx status, never HTML."""

import json
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from google.protobuf import json_format

log = structlog.get_logger("exod.http")
STATIC = Path(__file__).resolve().parent / "static"


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


async def json_body(request):
    from .placement_api import BadRequest

    try:
        return await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None


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
            placement_request = placement_api.parse_request(await json_body(request))
        except placement_api.BadRequest as e:
            return error(400, str(e))
        try:
            plan = await asyncio.to_thread(placement_api.preview, node.view, placement_request, node.models_dir)
        except placement_api.ModelError as e:
            return error(404, str(e))
        except placement_api.PlanError as e:
            return error(422, str(e))
        return web.json_response(_json(plan))

    def allowed(request) -> bool:
        from .access import may_mutate

        return may_mutate(request.remote or "", request.headers.get("Authorization", ""), node.settings.api_token)

    async def create_instance(request):
        from . import placement_api
        from .work import Refused

        if not allowed(request):
            return error(403, "placing from another host needs the daemon's bearer token")
        try:
            placement_request = placement_api.parse_request(await json_body(request))
            instance = await node.work.create(placement_request)
        except placement_api.BadRequest as e:
            return error(400, str(e))
        except placement_api.ModelError as e:
            return error(404, str(e))
        except (placement_api.PlanError, Refused) as e:
            return error(409, str(e))
        return web.json_response(_json(instance), status=201)

    async def list_instances(request):
        from . import state as cluster

        return web.json_response({"instances": [_json(i) for i in cluster.instances(node.view)]})

    async def get_instance(request):
        from . import state as cluster

        instance = cluster.instance(node.view, request.match_info["instance_id"])
        if instance is None:
            return error(404, f"no instance {request.match_info['instance_id']!r}")
        return web.json_response(_json(instance))

    async def delete_instance(request):
        if not allowed(request):
            return error(403, "deleting from another host needs the daemon's bearer token")
        instance_id = request.match_info["instance_id"]
        try:
            if not await node.work.delete_anywhere(instance_id):
                return error(404, f"no instance {instance_id!r}")
        except grpc.aio.AioRpcError as e:
            owner = node.work.owner_of(instance_id) or ""
            return error(409, f"instance {instance_id} is owned by node {owner[:12]}, which did not delete it "
                              f"({e.code().name}: {e.details()}); delete it there")
        return web.json_response({"deleted": instance_id})

    app.router.add_post("/v1/instances", create_instance)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_get("/v1/instances/{instance_id}", get_instance)
    app.router.add_delete("/v1/instances/{instance_id}", delete_instance)
    async def dashboard(request):
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", dashboard)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/placements/preview", placement_preview)
    from .openai_api import add_routes

    add_routes(app, node)
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
