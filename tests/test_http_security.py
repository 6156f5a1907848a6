"""The HTTP API as a web page in the user's browser and a LAN neighbour
would attack it (daemon/http_api.py has the rules): bodies only as JSON,
Host names this daemon, other origins refused, a page token for the
dashboard's changes, security headers on every answer, bad input a 4xx JSON
answer and never a 500, and model directories named from loopback only.
Real daemons, real HTTP."""

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from exod.daemon import config
from exod.daemon import state as cluster
from exod.daemon.access import may_mutate
from exod.daemon.http_api import SECURITY_HEADERS

from .conftest import REPO
from .daemon_helpers import settings, started
from .netns import lab, leftover_namespaces

GB = 10**9
PLACEABLE = {"model": "demo", "context_length": 256, "ranks": 1}  # would place, if let through
JSON = {"Content-Type": "application/json"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
CSP = SECURITY_HEADERS["Content-Security-Policy"]


class DaemonThread:
    """A daemon (tests/daemon_helpers.py) on its own event loop in a thread,
    so that blocking clients (http.client, Playwright, Hypothesis) can talk to
    it from the test's thread; `on_loop` reads or changes it where it lives."""

    def __init__(self, s):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node = self.run(started(s))
        self.port = self.node.api_port

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn):
        async def call():
            return fn()
        return self.run(call())

    def instances(self) -> list:
        return self.on_loop(lambda: cluster.instances(self.node.view) + list(self.node.work.owned.values()))

    def stop(self):
        try:
            self.run(self.node.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def call(port, method, path, body=None, headers=None, host="127.0.0.1"):
    """(status, headers, body as JSON if it is JSON, else bytes)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.headers.get_content_type() == "application/json":
        data = json.loads(data)
    return response.status, response.headers, data


def exod_error(answer, status):
    """The exod error shape, with this status."""
    code, _, body = answer
    assert code == status, answer
    assert body["error"]["code"] == status and isinstance(body["error"]["message"], str), body
    return body["error"]["message"]


def openai_error(answer, status):
    code, _, body = answer
    assert code == status, answer
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
    return body["error"]["message"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonThread(settings(tmp_path_factory.mktemp("sec"), "a", memory_limit=4 * GB,
                              api_allowed_hosts=["mybox.lan", "other.lan:8080"]))
    yield d
    d.stop()


def page_token(port) -> str:
    status, _, page = call(port, "GET", "/")
    assert status == 200
    return re.search(rb'<meta name="exod-page-token" content="([A-Za-z0-9_-]{20,})">', page).group(1).decode()


# ------------------------------------------------------------------ content type


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=utf-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "text/json", "application/jsonp", "application/json-seq"])
def test_a_post_that_is_not_json_is_refused_and_places_nothing(daemon, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/instances", "/v1/placements/preview"):
        exod_error(call(daemon.port, "POST", path, json.dumps(PLACEABLE), headers), 415)
    message = openai_error(call(daemon.port, "POST", "/v1/chat/completions", json.dumps(CHAT), headers), 415)
    assert "application/json" in message
    assert daemon.instances() == []


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON ; charset=UTF-8"])
def test_json_with_parameters_is_json(daemon, content_type):
    status, _, plan = call(daemon.port, "POST", "/v1/placements/preview", PLACEABLE, {"Content-Type": content_type})
    assert status == 200 and plan["chosen"]["model_id"] == "demo"


# ------------------------------------------------------------------ Host


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "foo.localhost", "0.0.0.0:{port}",
                                  "127.0.0.2", "127.0.0.1@evil.example", "evil.example#127.0.0.1", "", "[::1",
                                  "::1", "127.0.0.1:x", "localhost.", "other.lan.evil.example"])
def test_a_foreign_host_is_refused(daemon, host):
    host = host.format(port=daemon.port)
    for method, path, body in (("GET", "/v1/state", None), ("GET", "/", None), ("DELETE", "/v1/instances/x", None),
                               ("POST", "/v1/placements/preview", PLACEABLE)):
        answer = call(daemon.port, method, path, body, {"Host": host, **JSON})
        assert "does not serve the host" in exod_error(answer, 421)
    openai_error(call(daemon.port, "POST", "/v1/chat/completions", CHAT, {"Host": host, **JSON}), 421)
    assert daemon.instances() == []


def test_a_request_without_host_is_refused(daemon):
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"GET /v1/state HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 421") and b'"code": 421' in answer


def test_loopback_names_own_addresses_and_allowed_hosts_are_served(daemon):
    own = daemon.on_loop(lambda: [a for i in daemon.node.record.profile.interfaces for a in i.addresses])
    assert own
    for host in ["localhost", "LOCALHOST:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}", "[::1]",
                 "mybox.lan", "MyBox.Lan:99", "other.lan", *own, *(f"{a}:{{port}}" for a in own)]:
        status, _, body = call(daemon.port, "GET", "/v1/state", headers={"Host": host.format(port=daemon.port)})
        assert status == 200 and body["self_id"] == daemon.node.node_id, host


# ------------------------------------------------------------------ Origin and the page token


def test_other_origins_are_refused(daemon):
    own = f"http://127.0.0.1:{daemon.port}"
    token = page_token(daemon.port)
    for origin in ("http://evil.example", "null", f"http://localhost:{daemon.port}", f"https://127.0.0.1:{daemon.port}",
                   "http://127.0.0.1", f"{own}.evil.example", f"http://127.0.0.1:{daemon.port + 1}"):
        headers = {"Origin": origin, "X-Exod-Page-Token": token, **JSON}
        for method, path, body in (("POST", "/v1/instances", PLACEABLE), ("POST", "/v1/placements/preview", PLACEABLE),
                                   ("DELETE", "/v1/instances/x", None), ("GET", "/v1/state", None)):
            assert "other web pages" in exod_error(call(daemon.port, method, path, body, headers), 403)
        openai_error(call(daemon.port, "POST", "/v1/chat/completions", CHAT, headers), 403)
    assert daemon.instances() == []


def test_the_daemons_own_pages_need_their_token(daemon):
    own = {"Origin": f"http://127.0.0.1:{daemon.port}", **JSON}
    no_such = {"model": "no-such-model"}
    for token in (None, "", "made-up-token", page_token(daemon.port) + "x"):
        headers = own if token is None else {**own, "X-Exod-Page-Token": token}
        for method, path, body in (("POST", "/v1/instances", PLACEABLE), ("POST", "/v1/placements/preview", no_such),
                                   ("DELETE", "/v1/instances/x", None)):
            assert "X-Exod-Page-Token" in exod_error(call(daemon.port, method, path, body, headers), 403)
    assert daemon.instances() == []
    # With the page's token the request is looked at (and these ask for what is not there).
    token = page_token(daemon.port)
    headers = {**own, "X-Exod-Page-Token": token}
    assert "unknown model" in exod_error(call(daemon.port, "POST", "/v1/instances", no_such, headers), 404)
    exod_error(call(daemon.port, "POST", "/v1/placements/preview", no_such, headers), 404)
    exod_error(call(daemon.port, "DELETE", "/v1/instances/x", None, headers), 404)
    # A read from the page itself (same origin) needs no token.
    assert call(daemon.port, "GET", "/v1/state", headers={"Origin": own["Origin"]})[0] == 200


def test_page_tokens_are_fresh_per_page_and_bounded(daemon):
    first, second = page_token(daemon.port), page_token(daemon.port)
    assert first != second
    headers = {"Origin": f"http://127.0.0.1:{daemon.port}", **JSON}
    preview = {"model": "no-such-model"}
    for _ in range(256):  # the first token falls out of the 256 kept; the second is kept alive by its use
        page_token(daemon.port)
        assert call(daemon.port, "POST", "/v1/placements/preview", preview, {**headers, "X-Exod-Page-Token": second})[0] == 404
    assert call(daemon.port, "POST", "/v1/placements/preview", preview, {**headers, "X-Exod-Page-Token": first})[0] == 403


# ------------------------------------------------------------------ headers


def assert_security_headers(headers, where):
    assert headers["Content-Security-Policy"] == CSP, where
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "frame-ancestors 'none'" in CSP
    assert headers["X-Content-Type-Options"] == "nosniff", where
    assert headers["Referrer-Policy"] == "no-referrer", where
    assert headers["X-Frame-Options"] == "DENY", where
    assert not [h for h in headers if h.lower().startswith("access-control-")], where


def test_every_answer_carries_the_security_headers_and_no_cors(daemon):
    p = daemon.port
    evil = {"Origin": "http://evil.example"}
    preflight = {**evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    cases = [("GET", "/", None, {}, 200), ("GET", "/static/app.js", None, {}, 200),
             ("GET", "/static/app.css", None, {}, 200), ("GET", "/v1/state", None, {}, 200),
             ("GET", "/healthz", None, {}, 200), ("GET", "/v1/models", None, {}, 200),
             ("GET", "/v1/nope", None, {}, 404), ("POST", "/v1/state", "{}", JSON, 405),
             ("GET", "/v1/state", None, {"Host": "evil.example"}, 421), ("GET", "/v1/state", None, evil, 403),
             ("POST", "/v1/instances", "{}", {}, 415), ("POST", "/v1/placements/preview", "{", JSON, 400),
             ("POST", "/v1/chat/completions", CHAT, JSON, 404), ("OPTIONS", "/v1/instances", None, preflight, 403),
             ("OPTIONS", "/v1/instances", None, {}, 405)]
    for method, path, body, headers, status in cases:
        code, got, _ = call(p, method, path, body, headers)
        assert code == status, (method, path, code)
        assert_security_headers(got, (method, path))
    _, got, _ = call(p, "GET", "/static/app.js")
    assert got.get_content_type() in ("text/javascript", "application/javascript")


def test_the_dashboard_has_no_inline_script_or_handlers(daemon):
    _, _, page = call(daemon.port, "GET", "/")
    page = page.decode()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S)
    assert scripts == [""] and '<script src="/static/app.js"' in page
    assert not re.search(r"\son[a-z]+\s*=", page, re.I) and "style=" not in page and "<style" not in page
    _, _, js = call(daemon.port, "GET", "/static/app.js")
    js = js.decode()
    assert "innerHTML" not in js and "onclick" not in js and "eval(" not in js and "X-Exod-Page-Token" in js


# ------------------------------------------------------------------ bad input


BAD_BODIES = [
    (b'{"model": Infinity}', "Infinity is not a JSON number"),
    (b'{"model": "demo", "context_length": NaN}', "NaN is not a JSON number"),
    (b'{"model": "demo", "temperature": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"model": "demo", "context_length": 1e999}', "1e999 is out of range"),
    (b'{"model": "demo", "context_length": ' + b"9" * 4301 + b"}", "more than 4300 digits"),
    (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper than"),
    (b'{"model": "demo", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper than"),
    (b'{"model": "\\ud800"}', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
    (b'{"model": "d\xffmo"}', "not UTF-8"),
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b'{"model": "demo"} trailing', "not JSON"),
]


@pytest.mark.parametrize("raw,message", BAD_BODIES)
def test_bad_json_is_a_400_naming_the_problem(daemon, raw, message):
    for path in ("/v1/instances", "/v1/placements/preview"):
        assert message in exod_error(call(daemon.port, "POST", path, raw, JSON), 400)
    assert message in openai_error(call(daemon.port, "POST", "/v1/chat/completions", raw, JSON), 400)


WRONG_TYPES = [[], "demo", 1, None, True, {"model": ["demo"]}, {"model": {"a": 1}}, {"model": ""},
               {"model": "demo", "strategy": []}, {"model": "demo", "strategy": {}},
               {"model": "demo", "restart_policy": ["replace"]}, {"model": "demo", "nodes": "a"},
               {"model": "demo", "nodes": [1]}, {"model": "demo", "ranks": 1.5}, {"model": "demo", "ranks": True},
               {"model": "demo", "context_length": 2**64}, {"model": "demo", "context_length": -1},
               {"model": "demo", "max_restarts": 2}, {"model": "demo", "colour": "blue"}]
CHAT_WRONG_TYPES = [[], "x", None, {"model": "demo"}, {"model": ["demo"], "messages": CHAT["messages"]},
                    {"model": "demo", "messages": [{"role": ["user"], "content": "x"}]},
                    {"model": "demo", "messages": [{"role": {}, "content": "x"}]},
                    {"model": "demo", "messages": [{"role": "user", "content": ["x"]}]},
                    {"model": "demo", "messages": ["x"]}, {**CHAT, "temperature": "hot"},
                    {**CHAT, "temperature": 3}, {**CHAT, "max_tokens": 1.5}, {**CHAT, "seed": -1},
                    {**CHAT, "seed": 2**70}, {**CHAT, "stop": [1]}, {**CHAT, "stop": ["a"] * 5},
                    {**CHAT, "top_logprobs": 3}, {**CHAT, "n": 2}, {**CHAT, "top_p": [1]}]


def test_wrong_types_are_a_400_never_a_500(daemon):
    for body in WRONG_TYPES:
        for path in ("/v1/instances", "/v1/placements/preview"):
            exod_error(call(daemon.port, "POST", path, json.dumps(body), JSON), 400)
    for body in CHAT_WRONG_TYPES:
        openai_error(call(daemon.port, "POST", "/v1/chat/completions", json.dumps(body), JSON), 400)
    assert daemon.instances() == []


def test_a_body_over_the_limit_is_a_413(daemon):
    big = b'{"model": "' + b"x" * (1024 * 1024) + b'"}'
    exod_error(call(daemon.port, "POST", "/v1/placements/preview", big, JSON), 413)
    openai_error(call(daemon.port, "POST", "/v1/chat/completions", big, JSON), 413)


def test_a_non_ascii_bearer_token_is_compared_not_crashed_on():
    # From another host the token is compared; before, a non-ASCII one raised TypeError (a 500).
    for presented in ("Bearer é", "Bearer \udce9", "Bearer s3cret\u2028", "é" * 100):
        assert may_mutate("198.18.0.9", presented, "s3cret") is False
    assert may_mutate("198.18.0.9", "Bearer tökén", "tökén") is True
    assert may_mutate("198.18.0.9", "Bearer s3cret", "s3cret") is True


def test_allowed_hosts_come_from_flags_environment_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EXOD_API_ALLOWED_HOSTS", "a.lan, b.lan:80")
    assert config.load({}).api_allowed_hosts == ["a.lan", "b.lan:80"]
    assert config.load({"api_allowed_hosts": ["c.lan"]}).api_allowed_hosts == ["c.lan"]
    monkeypatch.delenv("EXOD_API_ALLOWED_HOSTS")
    toml = tmp_path / "c.toml"
    toml.write_text('api-allowed-hosts = ["d.lan"]\n')
    assert config.load({}, str(toml)).api_allowed_hosts == ["d.lan"]


# ------------------------------------------------------------------ from another host (a network namespace)


def curl(net, url, *extra, method="POST", body=None):
    args = ["ip", "netns", "exec", net.hosts[0], "curl", "-s", "-m", "30", "-o", "/dev/stdout",
            "-w", "\n%{http_code}", "-X", method, *extra]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = subprocess.run([*args, url], capture_output=True)
    text, _, code = out.stdout.rpartition(b"\n")
    return int(code or 0), json.loads(text) if text.startswith(b"{") else text


def test_from_another_host_models_are_named_by_id_and_hosts_checked(tmp_path):
    from exod.models import synthetic

    model_dir = tmp_path / "tiny-llama"
    synthetic.build(model_dir, synthetic.TINY_CONFIGS["llama"])
    with lab(1) as net:
        daemon = net.run(0, [sys.executable, "-m", "exod.daemon.cli", "start", "--api-host", "0.0.0.0",
                             "--api-port", "52415", "--grpc-port", "52416", "--no-discovery", "--no-prestart",
                             "--data-dir", str(tmp_path / "d"), "--allow-host", "mybox.lan"],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "EXOD_API_TOKEN": "s3cret"})
        try:
            lan, local = f"http://{net.addresses[0]}:52415", "http://127.0.0.1:52415"
            deadline = time.monotonic() + 30
            while curl(net, f"{local}/healthz", method="GET")[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            # Host: the node's own LAN address (what curl sends), an allowed name; not another.
            assert curl(net, f"{lan}/v1/state", method="GET")[0] == 200
            assert curl(net, f"{lan}/v1/state", "-H", "Host: mybox.lan:52415", method="GET")[0] == 200
            code, body = curl(net, f"{lan}/v1/state", "-H", "Host: evil.example", method="GET")
            assert code == 421 and body["error"]["code"] == 421
            assert curl(net, f"{lan}/v1/instances/x", "-H", "Host: evil.example", method="DELETE")[0] == 421

            # From the LAN a model is named by id: paths are refused before anything reads them.
            for path in (str(model_dir), "~/models/x", "./x", "../x", "/etc", "."):
                code, body = curl(net, f"{lan}/v1/placements/preview", body={"model": path})
                assert code == 400 and "models are named by id from other hosts" in body["error"]["message"], path
                code, body = curl(net, f"{lan}/v1/instances", "-H", "Authorization: Bearer s3cret",
                                  body={"model": path})
                assert code == 400 and "models are named by id" in body["error"]["message"], path
            # An id is fine; a name that is neither an id nor a path is unknown (the disk is not asked).
            assert curl(net, f"{lan}/v1/placements/preview", body={"model": "qwen3-30b-a3b-4bit"})[0] == 200
            assert curl(net, f"{lan}/v1/placements/preview", body={"model": "demo"})[0] == 200
            code, body = curl(net, f"{lan}/v1/placements/preview", body={"model": "tmp"})
            assert code == 404 and "unknown model" in body["error"]["message"]
            # From loopback, the same directory is a model.
            code, plan = curl(net, f"{local}/v1/placements/preview", body={"model": str(model_dir)})
            assert code == 200 and plan["candidates"][0]["model_id"] == "tiny-llama", plan  # read from the directory

            # A non-ASCII or non-UTF-8 bearer token from the LAN: refused, not a 500.
            for header in ("Authorization: Bearer tökén".encode(), b"Authorization: Bearer \xe9\xff"):
                assert curl(net, f"{lan}/v1/instances/x", "-H", header, method="DELETE")[0] == 403
            assert curl(net, f"{lan}/v1/instances/x", "-H", "Authorization: Bearer s3cret", method="DELETE")[0] == 404
        finally:
            daemon.kill()
            daemon.wait()
    assert not leftover_namespaces()
