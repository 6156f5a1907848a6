"""The daemon attacked from the user's browser (headless Chromium, driven by
Playwright, as in test_dashboard.py): a page from another origin tries to
place a model and to read the cluster, and a peer puts markup and script
into the names the dashboard shows. Nothing is placed, nothing is read,
nothing runs, and what the peer wrote shows as text."""

import http.server
import json
import shutil
import threading

import pytest
from playwright.sync_api import sync_playwright

from exod.daemon import state as cluster
from exod.daemon.http_api import SECURITY_HEADERS
from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings
from .test_http_security import DaemonThread, call

GB = 10**9
# The node's name has an "=" so that a text/plain form, whose body is always
# name=value, can spell a request that would place a model if the daemon took
# it: the form attack below can succeed against a daemon without the checks.
NODE = "lab=1"
PLACEABLE = {"model": "demo", "context_length": 256, "ranks": 1, "nodes": [NODE]}

ATTACKER_PAGE = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="form" method="POST" action="%(target)s/v1/instances" enctype="text/plain" target="sink">
<input name='%(form_name)s' value='%(form_value)s'></form>
<script>
const target = "%(target)s", body = JSON.stringify(%(body)s);
window.results = {};
async function attempt(name, fn) {
  try { results[name] = await fn(); } catch (e) { results[name] = "blocked: " + e.name; }
}
const show = async r => `${r.type} ${r.status} ${await r.text()}`;
(async () => {
  await attempt("post text/plain no-cors", async () => show(await fetch(target + "/v1/instances",
    {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body})));
  await attempt("post json no-cors", async () => show(await fetch(target + "/v1/instances",
    {method: "POST", mode: "no-cors", headers: {"Content-Type": "application/json"}, body})));
  await attempt("post json cors", async () => show(await fetch(target + "/v1/instances",
    {method: "POST", headers: {"Content-Type": "application/json"}, body})));
  await attempt("preview json cors", async () => show(await fetch(target + "/v1/placements/preview",
    {method: "POST", headers: {"Content-Type": "application/json"}, body})));
  await attempt("read state", async () => show(await fetch(target + "/v1/state")));
  await attempt("read state no-cors", async () => show(await fetch(target + "/v1/state", {mode: "no-cors"})));
  await attempt("read dashboard", async () => show(await fetch(target + "/")));
  await attempt("delete", async () => show(await fetch(target + "/v1/instances/x", {method: "DELETE"})));
  await new Promise(done => {
    document.querySelector("iframe").addEventListener("load", done, {once: true});
    document.getElementById("form").submit();
  });
  results.done = true;
})();
</script></body></html>"""


class AttackerSite:
    """Another origin (another port on loopback) serving one page."""

    def __init__(self, page: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def daemon(tmp_path):
    d = DaemonThread(settings(tmp_path, NODE, memory_limit=4 * GB))
    yield d
    d.stop()


def chromium(p):
    return p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])


def test_another_origin_can_neither_place_nor_read(daemon):
    target = f"http://127.0.0.1:{daemon.port}"
    body = json.dumps(PLACEABLE)
    form_name, form_value = body[:body.index("=")], body[body.index("=") + 1:]
    site = AttackerSite(ATTACKER_PAGE % {"target": target, "body": body, "form_name": form_name,
                                         "form_value": form_value})
    try:
        with sync_playwright() as p:
            browser = chromium(p)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{site.port}/")
            page.wait_for_function("window.results && window.results.done", timeout=30000)
            results = page.evaluate("window.results")
            browser.close()
    finally:
        site.stop()
    assert daemon.instances() == [], results
    # Nothing the daemon said was readable: cross-origin reads fail, no-cors answers are opaque.
    said = json.dumps(results)
    assert daemon.node.node_id not in said and "cluster_id" not in said and "exod-page-token" not in said, results
    for name, result in results.items():
        if name != "done":
            assert result.startswith(("blocked: TypeError", "opaque 0 ")), (name, result)
    assert results["read state"] == "blocked: TypeError" and results["post json cors"] == "blocked: TypeError"


def test_a_foreign_host_is_refused(daemon):
    status, headers, body = call(daemon.port, "GET", "/", headers={"Host": "rebind.attacker.example"})
    assert status == 421 and body["error"]["code"] == 421
    assert headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]


# ------------------------------------------------------------------ what peers write


XSS = [
    "<img src=x onerror=\"window.__xss='img'\">",
    "');window.__xss='quote';//",
    "\"><script>window.__xss='script'</script>",
    "' onmouseover='window.__xss=1' x='",
]
FAKE_PEER = "f" * 32


def poisoned_work() -> pb.WorkRecord:
    """A peer's work record whose every string is markup or script."""
    instances = []
    for n, text in enumerate(XSS[:2]):
        instance_id = f"{text}#{n}"
        placement = pb.Placement(model_id=XSS[0], ranks=[pb.RankPlacement(
            rank=0, node_id=FAKE_PEER, node_name=XSS[2])])
        instances.append(pb.Instance(instance_id=instance_id, placement=placement, state=pb.INSTANCE_FAILED,
                                     reason=XSS[2], replaced_by=XSS[3], replaces=XSS[1], restarts=1))
    runners = [pb.RunnerStatus(instance_id=i.instance_id, rank=0, node_id=FAKE_PEER, state=pb.FAILED, reason=XSS[3])
               for i in instances]
    return pb.WorkRecord(node_id=FAKE_PEER, version=1, instances=instances, runners=runners)


INIT = """window.__violations = [];
document.addEventListener("securitypolicyviolation", e => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
window.alert = () => { window.__xss = "alert"; };"""


def poisoned_holdings() -> pb.NodeRecord:
    """A peer's node record whose models (ids, revisions, stores, file names,
    shard strategies) are markup or script."""
    import time

    holdings = [pb.ModelHolding(model_id=XSS[0], revision=XSS[1], store=XSS[2], complete=True,
                                files=[pb.ModelFile(name=XSS[3], size=1)]),
                pb.ModelHolding(model_id=XSS[2], revision=XSS[3], store="shard",
                                shard=pb.ShardOf(strategy=XSS[0], rank=1, world_size=2))]
    return pb.NodeRecord(profile=pb.NodeProfile(node_id="e" * 32, name="peer", models=holdings), version=1,
                         incarnation=int(time.time() * 1000), cluster_id="default")


def test_what_peers_write_shows_as_text_and_never_runs(daemon):
    record = poisoned_work()
    daemon.on_loop(lambda: setattr(daemon.node, "view", cluster.apply_work(daemon.node.view, record)))
    peer = poisoned_holdings()
    daemon.on_loop(lambda: setattr(daemon.node, "view", cluster.apply_record(daemon.node.view, peer,
                                                                             peer.incarnation)))
    assert len(daemon.on_loop(lambda: cluster.instances(daemon.node.view))) == 2
    # A stranger's announcement is shown too: its address and claimed id are its own words.
    daemon.on_loop(lambda: daemon.node.saw_stranger(XSS[0][:100], XSS[1], XSS[3]))
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page()
        page.add_init_script(INIT)
        response = page.goto(f"http://127.0.0.1:{daemon.port}/")
        assert response.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
        assert response.headers["x-frame-options"] == "DENY"
        page.wait_for_selector(f'#nodes tr[data-node="{NODE}"] .UP', timeout=15000)
        page.wait_for_selector("#instances tr[data-instance] + tr[data-instance]", timeout=15000)
        page.wait_for_timeout(1500)  # a few refreshes: anything that would run has run

        ids = [page.locator("#instances tr[data-instance]").nth(i).get_attribute("data-instance") for i in range(2)]
        assert sorted(ids) == sorted(i.instance_id for i in record.instances)
        text = page.text_content("#instances")
        for s in XSS:
            assert s in text, s
        strangers = page.text_content("#strangers")
        assert page.is_visible("#strangers") and XSS[0][:100] in strangers and XSS[1] in strangers
        page.wait_for_selector('#models tr[data-node="peer"]', timeout=15000)
        models = page.text_content("#models")
        for s in (XSS[0], XSS[2], XSS[1][:8], XSS[3][:8]):  # ids and stores whole, revisions cut to 8
            assert s in models, s
        assert page.locator("#instances img, #instances script, #nodes img, #strangers img, #models img, "
                            "#models script, [onerror], [onmouseover]").count() == 0
        assert page.evaluate("typeof window.__xss") == "undefined"

        # Delete through the button (event delegation, the id from the row's data-instance): the id
        # travels as text; this peer is unreachable, so the daemon knows no such instance.
        quote_id = next(i for i in ids if i.startswith("');"))
        page.locator("#instances tr[data-instance]").nth(ids.index(quote_id)).get_by_role("button").click()
        page.wait_for_selector("#message:not(:empty)", timeout=15000)
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.text_content("#message") == f"no instance {quote_id!r}"
        # The dashboard itself needs nothing the CSP forbids.
        assert page.evaluate("window.__violations") == []
        browser.close()
