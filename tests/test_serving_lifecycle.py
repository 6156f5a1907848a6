"""How a request ends when its client or its instance goes away, against a
real daemon with one Ready instance of the demo model: a client that drops
a non-streamed request stops its generation (it reads nothing until the
end, so only the connection's state can tell), the tokens generated for it
are counted all the same, and an instance removed mid-answer is an error to
the client, never a finished answer."""

import json
import socket
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings
from .test_http_security import DaemonThread, call

GB = 10**9
JSON = {"Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "hello world, what is a token?"}]
LONG = 400  # tokens a request would generate if nobody stopped it


def until(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    d = DaemonThread(settings(tmp_path_factory.mktemp("lifecycle"), "solo", memory_limit=4 * GB))
    try:
        status, _, placed = call(d.port, "POST", "/v1/instances", {
            "model": "demo", "ranks": 1, "context_length": 512, "concurrency": 2}, JSON)
        assert status == 201, placed
        until(lambda: {i.state for i in d.instances()} == {pb.INSTANCE_READY}, 180)
        yield d, placed["instance_id"]
    finally:
        d.stop()


def rank0(d) -> pb.RunnerStatus:
    return next(r for i in d.instances() for r in i.runners if r.rank == 0)


def metrics(d) -> dict:
    status, _, body = call(d.port, "GET", "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families, name, suffix="_total", **labels) -> float:
    return sum(s.value for s in families[name].samples if s.name == name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("path,body,api", [
    ("/v1/chat/completions", {"model": "demo", "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True},
     "openai.chat"),
    ("/api/chat", {"model": "demo", "messages": MESSAGES, "stream": False,
                   "options": {"num_predict": LONG, "temperature": 0}}, "ollama"),
])
def test_a_client_that_drops_a_non_streamed_request_stops_it_and_its_tokens_count(solo, path, body, api):
    d, _ = solo
    until(lambda: rank0(d).batch_size == 0, 30)
    generated_before = rank0(d).generated_tokens
    families = metrics(d)
    counted_before = sample(families, "exod_generated_tokens", model="demo")
    gaps_before = sample(families, "exod_inter_token_latency_seconds", "_count", model="demo")
    cancelled_before = sample(families, "exod_requests", api=api, outcome="cancelled")

    data = json.dumps(body).encode()
    client = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    # Generating (the runner's status counts its tokens), then gone.
    until(lambda: rank0(d).generated_tokens > generated_before + 4, 60)
    client.close()

    until(lambda: rank0(d).batch_size == 0, 30)
    generated = rank0(d).generated_tokens - generated_before
    assert 0 < generated < LONG  # stopped short of the tokens it asked for
    families = metrics(d)
    assert sample(families, "exod_requests", api=api, outcome="cancelled") == cancelled_before + 1
    # The tokens that reached this node before it noticed count, although no
    # final chunk ever came: one gap between each two of them.
    counted = sample(families, "exod_generated_tokens", model="demo") - counted_before
    assert 0 < counted <= generated
    assert sample(families, "exod_inter_token_latency_seconds", "_count", model="demo") - gaps_before == counted - 1


def test_exod_status_shows_the_node_and_the_instance_with_its_batch(solo):
    import subprocess
    import sys

    d, iid = solo
    until(lambda: rank0(d).batch_size == 0, 30)
    out = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "status", "--api", f"http://127.0.0.1:{d.port}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "solo (this node): up" in out.stdout
    assert f"instance {iid}: demo" in out.stdout and "ready, batch 0 of 2, queue 0" in out.stdout


def test_an_instance_removed_mid_answer_is_an_error_not_a_finished_answer(solo):
    """Last in this file: it removes the instance."""
    d, iid = solo
    errors_before = sample(metrics(d), "exod_requests", api="openai.chat", outcome="error")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=LONG, stream=True,
                                            extra_body={"ignore_eos": True})
    events = iter(stream)
    next(events)
    next(events)
    status, _, _ = call(d.port, "DELETE", f"/v1/instances/{iid}")
    assert status in (200, 202)
    finishes = []
    with pytest.raises(openai.APIError) as ended:
        for event in events:
            finishes += [c.finish_reason for c in event.choices if c.finish_reason]
    assert "before the answer was finished" in str(ended.value)
    assert finishes == []  # no "stop": the text was cut short
    assert sample(metrics(d), "exod_requests", api="openai.chat", outcome="error") == errors_before + 1


def test_exod_chat_exits_1_when_the_service_fails_and_2_for_bad_input(solo, tmp_path):
    """After the removal above no instance is Ready: a 404, the user's to fix
    (exit 2). A 5xx is the service's failure (exit 1): a stand-in daemon
    that answers 502 in OpenAI's shape."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    d, _ = solo
    chat = [sys.executable, "-m", "exod.daemon.cli", "chat", "demo", "hello"]
    missing = subprocess.run([*chat, "--api", f"http://127.0.0.1:{d.port}"], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 2 and "no Ready instance" in missing.stderr

    class Failing(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.dumps({"error": {"message": "the instance failed: it stopped", "type": "server_error"}})
            self.send_response(502)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        failed = subprocess.run([*chat, "--api", f"http://127.0.0.1:{server.server_port}"], capture_output=True,
                                text=True, timeout=30)
    finally:
        server.shutdown()
    assert failed.returncode == 1 and failed.stderr.strip() == "exod: error: 502: the instance failed: it stopped"
