"""The HTTP API: GET /v1/state, /v1/nodes, /healthz, /metrics, the
instances, the placement preview and the dashboard; the generation APIs
(OpenAI, Anthropic, Ollama) are in their own modules over serving.Serving.
Errors are JSON bodies with a 4xx or 5xx status, never HTML, in the shape of
the API the path belongs to.

The API listens on loopback, which every web page the user opens can reach
as well, and perhaps on a LAN. So `guard` looks at every request first:
- Host must name this daemon: a loopback name, one of its own addresses, or
  a name given with --allow-host. A page on evil.example whose DNS answer
  turns into 127.0.0.1 (DNS rebinding) is same-origin with the daemon as far
  as the browser knows, but it sends Host: evil.example. Answer: 421
  Misdirected Request, which says exactly that (this server does not serve
  that name), and is not confused with the 403s of refused callers.
- A request with an Origin header (browsers send one with every cross-origin
  request and with every POST and DELETE) must come from the daemon's own
  origin, http://<its Host>: 403 otherwise.
- A POST must say Content-Type: application/json: 415 otherwise. A form or a
  no-cors fetch from another site can send text/plain but never JSON (that
  needs a CORS preflight, which this server never grants). DELETE carries no
  body, and browsers always preflight it: it needs no Content-Type.
- A POST or DELETE from a browser (it carries an Origin) must carry the
  page token that the dashboard got in its HTML, as X-Exod-Page-Token: 403
  otherwise. Clients that are not browsers (the CLI, SDKs, curl) send no
  Origin, and for them the loopback-or-bearer-token rule of access.py stays.
Every response carries SECURITY_HEADERS (a CSP without inline script, no
framing, no sniffing) and never a CORS header, so no other origin reads any
answer.

Bodies are parsed strictly (`json_body`): NaN, Infinity, numbers that
overflow, integers over 4300 digits, lone surrogates and deep nesting are a
400 naming the problem, never a 500 later on."""

import asyncio
import ipaddress
import json
import math
import secrets
from collections import OrderedDict
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from google.protobuf import json_format

from .anthropic_api import anthropic_error, is_anthropic_path
from .ollama_api import is_ollama_path, ollama_error
from .openai_api import is_openai_path, openai_error

log = structlog.get_logger("exod.http")
STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1024 * 1024
MAX_DEPTH = 32  # no request body needs more than a few levels
MAX_INT_DIGITS = 4300  # Python's own limit for int(str), named here rather than met as a ValueError
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
PAGE_TOKEN_HEADER = "X-Exod-Page-Token"
SERVING = web.AppKey("serving", object)  # the app's serving.Serving (its router and metrics)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",  # no <script src> or <img src> of an answer from elsewhere
}


def _json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


def refuse(request, status: int, message: str) -> web.Response:
    """An error in the shape of the API the path belongs to."""
    if is_openai_path(request.path):
        return openai_error(status, message, kind="server_error" if status >= 500 else "invalid_request_error")
    if is_anthropic_path(request.path):
        return anthropic_error(status, message)
    if is_ollama_path(request.path):
        return ollama_error(status, message)
    return error(status, message)


# ------------------------------------------------------------------ bodies


class BadBody(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _check_tree(value) -> None:
    """Nesting within MAX_DEPTH (deeper would reach Python's recursion limit
    in repr, protobuf and the like) and no lone surrogate ("\\ud800" is valid
    JSON but not text, and protobuf refuses it): one walk, no recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadBody("the body has a lone surrogate (\\ud800-\\udfff), which is not text") from None
        elif isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels")
            stack.extend((x, depth + 1) for x in ([*item, *item.values()] if isinstance(item, dict) else item))


def parse_json(raw: bytes):
    """The JSON value in raw, or BadBody saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("the body is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_bounded_int)
    except RecursionError:
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise BadBody(f"the body is not JSON: {e}") from None
    _check_tree(value)
    return value


async def json_body(request):
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadBody(f"the body is larger than {MAX_BODY} bytes", 413) from None
    return parse_json(raw)


# ------------------------------------------------------------------ who may ask


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def host_name(value: str) -> str | None:
    """The name in a Host header ("name", "name:port", "[v6]", "[v6]:port"),
    canonical and without the port; None when it is not one of those."""
    value = value.strip()
    if value.startswith("["):
        name, close, rest = value[1:].partition("]")
        if not close or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():  # also a bare IPv6 address, which needs brackets
            return None
    return _canonical(name) if name else None


class PageTokens:
    """Tokens handed to dashboard pages, at most LIMIT, the least recently
    used dropped first: bounded memory however many pages are loaded, and a
    page that is in use keeps its token. They live as long as the process."""

    LIMIT = 256

    def __init__(self):
        self._tokens: OrderedDict[str, None] = OrderedDict()

    def issue(self) -> str:
        token = secrets.token_urlsafe(24)
        self._tokens[token] = None
        if len(self._tokens) > self.LIMIT:
            self._tokens.popitem(last=False)
        return token

    def valid(self, token: str) -> bool:
        if token in self._tokens:  # 192 random bits: a dict lookup leaks nothing useful
            self._tokens.move_to_end(token)
            return True
        return False


def allowed_hosts(node, request) -> set[str]:
    """Loopback names, this node's addresses, the address the request came in
    on (the URL named it, so it is this daemon), and --allow-host names."""
    names = set(LOOPBACK_HOSTS)
    names.update(_canonical(a) for i in node.record.profile.interfaces for a in i.addresses)
    if node.settings.api_host not in ("", "0.0.0.0", "::"):
        names.add(_canonical(node.settings.api_host))
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple):
        names.add(_canonical(sockname[0]))
    names.update(filter(None, (host_name(h) for h in node.settings.api_allowed_hosts)))
    return names


def is_json(request) -> bool:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower() == "application/json"


def make_guard(node, tokens: PageTokens):
    @web.middleware
    async def guard(request, handler):
        host = request.headers.get("Host", "")
        if host_name(host) not in allowed_hosts(node, request):
            return refuse(request, 421, f"this daemon does not serve the host {host!r}; "
                                        "add it with `exod start --allow-host NAME` if it is yours")
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host.strip().lower()}":
            return refuse(request, 403, f"requests from other web pages ({origin}) are refused")
        # A method or path with no route does nothing: it gets its 404 or 405.
        if request.method not in SAFE_METHODS and request.match_info.http_exception is None:
            if request.method == "POST" and not is_json(request):
                return refuse(request, 415, "the body must be sent as Content-Type: application/json")
            if origin is not None and not tokens.valid(request.headers.get(PAGE_TOKEN_HEADER, "")):
                return refuse(request, 403, f"a change from a web page needs the page's {PAGE_TOKEN_HEADER}; "
                                            "reload the dashboard")
        return await handler(request)

    return guard


@web.middleware
async def json_errors(request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return refuse(request, e.status,
                      e.reason if e.status != 404 else f"no such endpoint: {request.method} {request.path}")
    except Exception as e:  # a bug must not take the daemon down, and must say so
        log.exception("request failed", path=request.path)
        return refuse(request, 500, f"internal error: {type(e).__name__}")


async def security_headers(request, response):
    response.headers.update(SECURITY_HEADERS)


# ------------------------------------------------------------------ routes


def make_app(node) -> web.Application:
    from . import anthropic_api, ollama_api, openai_api, placement_api
    from . import state as cluster
    from .access import is_loopback, may_mutate
    from .metrics import CONTENT_TYPE, Metrics
    from .serving import Serving
    from .work import Refused

    tokens = PageTokens()
    metrics = Metrics(node)
    serving = Serving(node, metrics)
    app = web.Application(middlewares=[json_errors, make_guard(node, tokens)], client_max_size=MAX_BODY)
    app.on_response_prepare.append(security_headers)

    async def healthz(request):
        return web.json_response({"status": "ok", "node_id": node.node_id})

    async def prometheus(request):
        return web.Response(body=metrics.text(), headers={"Content-Type": CONTENT_TYPE})

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

    async def placement_request(request):
        """The body as a PlacementRequest; from another host, the model by id only."""
        parsed = placement_api.parse_request(await json_body(request))
        if not is_loopback(request.remote or ""):
            placement_api.check_remote_model(parsed.model)
        return parsed

    async def placement_preview(request):
        try:
            plan = await placement_api.preview(node, await placement_request(request), is_loopback(request.remote or ""))
        except BadBody as e:
            return error(e.status, str(e))
        except placement_api.BadRequest as e:
            return error(400, str(e))
        except placement_api.ModelError as e:
            return error(404, str(e))
        except placement_api.PlanError as e:
            return error(422, str(e))
        return web.json_response(_json(plan))

    def allowed(request) -> bool:
        return may_mutate(request.remote or "", request.headers.get("Authorization", ""), node.settings.api_token)

    async def create_instance(request):
        if not allowed(request):
            return error(403, "placing from another host needs the daemon's bearer token")
        try:
            instance = await node.work.create(await placement_request(request), local=is_loopback(request.remote or ""))
        except BadBody as e:
            return error(e.status, str(e))
        except placement_api.BadRequest as e:
            return error(400, str(e))
        except placement_api.ModelError as e:
            return error(404, str(e))
        except (placement_api.PlanError, Refused) as e:
            return error(409, str(e))
        return web.json_response(_json(instance), status=201)

    async def list_instances(request):
        return web.json_response({"instances": [_json(i) for i in cluster.instances(node.view)]})

    async def get_instance(request):
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

    async def rebalance_instance(request):
        """POST: place a moe_experts instance's experts again by measured
        routing load, the new placement Ready before the old one stops
        (Work.rebalance). Answers the instance serving afterwards."""
        if not allowed(request):
            return error(403, "rebalancing from another host needs the daemon's bearer token")
        instance_id = request.match_info["instance_id"]
        if instance_id not in node.work.owned:
            owner = node.work.owner_of(instance_id)
            if owner is None:
                return error(404, f"no instance {instance_id!r}")
            return error(409, f"instance {instance_id} is owned by node {owner[:12]}; rebalance it there")
        try:
            instance, outcome = await node.work.rebalance(instance_id)
        except KeyError:
            return error(404, f"no instance {instance_id!r}")
        except (placement_api.PlanError, placement_api.ModelError, Refused) as e:
            return error(409, str(e))
        return web.json_response({"instance": _json(instance), "rebalanced": instance.instance_id != instance_id,
                                  "outcome": outcome})

    async def pull_model(request):
        """POST {"model", "node"?}: fetch a whole checkpoint onto a node; the
        answer streams one JSON line of progress about every half second,
        then one with done (or the error)."""
        if not allowed(request):
            return error(403, "pulling from another host needs the daemon's bearer token")
        try:
            body = await json_body(request)
        except BadBody as e:
            return error(e.status, str(e))
        if not isinstance(body, dict) or set(body) - {"model", "node"} or not isinstance(body.get("model"), str) \
                or not body["model"].strip() or not isinstance(body.get("node", ""), str):
            return error(400, 'the body must be {"model": "org/name", "node"?: "name"}')
        try:
            placement_api.check_remote_model(body["model"].strip())
        except placement_api.BadRequest as e:
            return error(400, str(e))
        except placement_api.ModelError as e:
            return error(404, str(e))
        target = node.member_by_ref(body.get("node") or node.node_id)
        if target is None:
            return error(404, f"no Up node {body.get('node')!r}")
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        await response.prepare(request)
        async for progress in node.pull_on(target, body["model"].strip()):
            line = _json(progress)
            line["node"] = node.view.member(target).record.profile.name if node.view.member(target) else ""
            await response.write((json.dumps(line) + "\n").encode())
        await response.write_eof()
        return response

    async def dashboard(request):
        """The page, with a fresh page token in its <meta> (no inline script)."""
        page = (STATIC / "index.html").read_text().replace("{{page_token}}", tokens.issue())
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    def static(name):
        async def serve(request):
            return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
        return serve

    app.router.add_get("/", dashboard)
    app.router.add_get("/static/app.js", static("app.js"))
    app.router.add_get("/static/app.css", static("app.css"))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_post("/v1/instances", create_instance)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_get("/v1/instances/{instance_id}", get_instance)
    app.router.add_delete("/v1/instances/{instance_id}", delete_instance)
    app.router.add_post("/v1/instances/{instance_id}/rebalance", rebalance_instance)
    app.router.add_post("/v1/placements/preview", placement_preview)
    app.router.add_post("/v1/models/pull", pull_model)
    app.router.add_get("/v1/state", cluster_state)
    app.router.add_get("/v1/nodes", nodes)
    openai_api.add_routes(app, node, serving)
    anthropic_api.add_routes(app, node, serving)
    ollama_api.add_routes(app, node, serving)
    app[SERVING] = serving
    return app


async def start_http(node, host: str, port: int):
    runner = web.AppRunner(make_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    return runner, bound
