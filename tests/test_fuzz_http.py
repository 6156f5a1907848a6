"""Every JSON endpoint of the HTTP API, fuzzed with Hypothesis against a real
`exod start` process: arbitrary JSON values, raw bytes, and objects with the
real field names holding arbitrary values. Each answer is a 2xx or 4xx with a
JSON body in its API's shape, never a 5xx; afterwards the daemon still
answers /healthz and its memory has not grown by more than 100 MB.

The daemon gets a memory limit of 1 MB, so that nothing fits and a create
that parses fails fast in the planner (409) instead of starting runners;
the parsers see every body all the same."""

import json
import subprocess
import sys
import urllib.parse
from types import SimpleNamespace

import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from exod.daemon.openai_api import ROLES
from exod.daemon.placement_api import FIELDS, RESTART_POLICIES
from exod.placement import STRATEGY_BY_NAME

from .conftest import REPO
from .test_http_security import call

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON = {"Content-Type": "application/json"}

# Text with lone surrogates too ("\\ud800" is valid JSON, not text), and floats
# with NaN and Infinity (json.dumps writes them; the daemon must refuse them).
texts = st.text(max_size=20) | st.text(st.characters(categories=["Cs", "Ll", "Nd", "Po"]), max_size=8)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**64, max_value=2**64)
           | st.floats() | texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(texts, inner, max_size=4), max_leaves=12)
small_ints = st.integers(min_value=-3, max_value=2**33) | values
model_names = st.sampled_from(["demo", "qwen3-30b-a3b-4bit", "kimi-k2-4bit", "no-such-model", "", " ", "/", "/tmp",
                               ".", "~", "..", "./demo", "org/name"]) | texts
models = model_names | values

# Four kinds of body for each endpoint: valid field values (so that the
# model name, say, reaches the planner), a valid body with one field of any
# value, the real field names with any values, and any JSON value at all.
placement_valid = {
    "context_length": st.integers(1, 2**16), "concurrency": st.integers(1, 8), "ranks": st.integers(1, 4),
    "strategy": st.sampled_from(list(STRATEGY_BY_NAME)),
    "nodes": st.lists(st.sampled_from(["solo", "a"]) | texts.filter(bool), max_size=3),
    "restart_policy": st.sampled_from(list(RESTART_POLICIES)), "max_restarts": st.integers(1, 3),
}
placement_any = {name: small_ints for name in ("context_length", "concurrency", "ranks", "max_restarts")} | {
    "strategy": st.sampled_from(list(STRATEGY_BY_NAME)) | values,
    "nodes": st.lists(st.sampled_from(["solo", ""]) | texts, max_size=4) | values,
    "restart_policy": st.sampled_from(list(RESTART_POLICIES)) | values,
}


def one_wrong(valid, names):
    return st.tuples(valid, st.sampled_from(sorted(names)), values).map(lambda t: {**t[0], t[1]: t[2]})


placement_valid_bodies = st.fixed_dictionaries({"model": model_names}, optional=placement_valid)
placement_bodies = (placement_valid_bodies | one_wrong(placement_valid_bodies, FIELDS)
                    | st.fixed_dictionaries({}, optional={"model": models, **placement_any})
                    | st.dictionaries(st.sampled_from(sorted(FIELDS) + ["colour"]), values, max_size=5))

roles = st.sampled_from(sorted(ROLES))
chat_valid = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "max_tokens": st.integers(1, 100),
    "seed": st.integers(0, 2**63 - 1), "stop": st.lists(texts.filter(bool), max_size=4), "logprobs": st.booleans(),
    "stream": st.booleans(),
}
numbers = st.floats() | st.integers(min_value=-5, max_value=2**70) | values
chat_any = {name: numbers for name in ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed",
                                       "top_logprobs", "n")} | {
    "stop": st.lists(texts, max_size=6) | values, "logprobs": values, "stream": values}
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=3)
any_messages = st.lists(st.fixed_dictionaries({"role": roles | values, "content": texts | values}) | values,
                        min_size=1, max_size=3) | values
chat_valid_bodies = st.fixed_dictionaries({"model": model_names, "messages": messages}, optional=chat_valid)
chat_bodies = (chat_valid_bodies | one_wrong(chat_valid_bodies, {"model", "messages", *chat_any})
               | st.fixed_dictionaries({"model": model_names, "messages": any_messages}, optional=chat_any)
               | st.fixed_dictionaries({}, optional={"model": models, "messages": any_messages, **chat_any}))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.Popen([sys.executable, "-m", "exod.daemon.cli", "start", "--api-port", "0", "--grpc-port", "0",
                             "--grpc-host", "127.0.0.1", "--no-discovery", "--no-prestart", "--memory-limit", "1MB",
                             "--data-dir", str(data / "d"), "--name", "solo"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = json.loads(proc.stdout.readline())
    port = int(line["api"].rpartition(":")[2])
    for path in ("/v1/placements/preview", "/v1/instances"):  # warm up: the catalog and planner are loaded once
        call(port, "POST", path, {"model": "qwen3-30b-a3b-4bit"}, JSON)
    process = psutil.Process(proc.pid)
    yield SimpleNamespace(port=port, proc=proc, process=process, start_rss=process.memory_info().rss)
    proc.kill()
    proc.wait()


def exod_shape(answer, allowed):
    status, _, body = answer
    assert status in allowed, answer
    if status >= 400:
        assert set(body) == {"error"} and body["error"]["code"] == status and body["error"]["message"], body
    else:
        assert isinstance(body, dict), body
    return body


def openai_shape(answer, allowed):
    status, _, body = answer
    assert status in allowed, answer
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body


def send(port, path, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(port, "POST", path, raw, JSON)


@FUZZ
@given(body=placement_bodies | values)
def test_preview(daemon, body):
    exod_shape(send(daemon.port, "/v1/placements/preview", body), {200, 400, 404, 422})


@FUZZ
@given(body=placement_bodies | values)
def test_create_instance(daemon, body):
    answer = exod_shape(send(daemon.port, "/v1/instances", body), {201, 400, 404, 409})
    if answer.get("instance_id"):  # nothing should fit in 1 MB; if it did, do not leave it running
        call(daemon.port, "DELETE", f"/v1/instances/{answer['instance_id']}")


@FUZZ
@given(body=chat_bodies | values)
def test_chat_completions(daemon, body):
    openai_shape(send(daemon.port, "/v1/chat/completions", body), {400, 404})


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
       path=st.sampled_from(["/v1/placements/preview", "/v1/instances", "/v1/chat/completions"]))
def test_raw_bodies(daemon, raw, path):
    answer = send(daemon.port, path, raw)
    if path == "/v1/chat/completions":
        openai_shape(answer, {400, 404})
    else:
        exod_shape(answer, {200, 400, 404, 409, 422})


@FUZZ
@given(name=st.text(min_size=1, max_size=40), status=st.text(max_size=20))
def test_path_and_query_parameters(daemon, name, status):
    quoted = urllib.parse.quote(name, safe="")
    exod_shape(call(daemon.port, "GET", f"/v1/instances/{quoted}"), {404})
    exod_shape(call(daemon.port, "DELETE", f"/v1/instances/{quoted}"), {404})
    exod_shape(call(daemon.port, "GET", f"/v1/nodes?status={urllib.parse.quote(status)}"), {200, 400})


def test_the_daemon_survived_with_bounded_memory(daemon):
    """Last in the file: after everything above, the daemon answers and has not grown."""
    assert daemon.proc.poll() is None
    status, _, body = call(daemon.port, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    grown = daemon.process.memory_info().rss - daemon.start_rss
    assert grown < 100 * 2**20, f"the daemon grew by {grown / 2**20:.0f} MB"
