"""Serving through every API, each driven by its official Python client
(openai, anthropic, ollama), against two real daemons that hold two Ready
instances of the demo model (moe_tensor and pipeline, each over both
nodes): greedy answers are the single-process model's, streamed or not;
requests are routed across both instances; errors come in each API's own
shape before any stream starts (an over-long prompt is a 400, OpenAI's
with code context_length_exceeded); a client that goes away stops its
generation on every rank; /metrics parses with prometheus_client's own
parser; /v1/state shows each instance's queue and batch."""

import asyncio
import json
import threading

import anthropic
import ollama
import openai
import pytest
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler
from prometheus_client.parser import text_string_to_metric_families

from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings
from .test_http_security import DaemonThread, call

GB = 10**9
CONTEXT = 512
MESSAGES = [{"role": "user", "content": "hello world, what is a token?"}]
TOKENS = 24
JSON = {"Content-Type": "application/json"}
# The Anthropic SDK no longer sends sampling parameters; the API still takes them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    a = DaemonThread(settings(root, "a", memory_limit=4 * GB, prestart_runner=True))
    b = DaemonThread(settings(root, "b", [f"127.0.0.1:{a.node.grpc_port}"], memory_limit=4 * GB,
                              prestart_runner=True))
    try:
        until(lambda: len(a.on_loop(lambda: [m for m in a.node.view.members.values() if m.status == pb.UP])) == 2,
              20)
        ids = []
        # Two instances that batch.
        for strategy in ("moe_tensor", "pipeline"):
            status, _, placed = call(a.port, "POST", "/v1/instances", {
                "model": "demo", "strategy": strategy, "nodes": ["a", "b"], "ranks": 2,
                "context_length": CONTEXT, "concurrency": 4}, JSON)
            assert status == 201, placed
            ids.append(placed["instance_id"])
        until(lambda: all(i.state == pb.INSTANCE_READY for i in a.instances() if i.instance_id in ids)
              and len([i for i in a.instances() if i.instance_id in ids]) >= 2, 240)
        until(lambda: all(i.state == pb.INSTANCE_READY for i in b.instances() if i.instance_id in ids), 30)
        yield a, b, ids
    finally:
        b.stop()
        a.stop()


def until(predicate, timeout, step=0.1):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


@pytest.fixture(scope="module")
def expected(cluster):
    a, _, _ = cluster
    model, tokenizer = load(str(a.node.models_dir / "demo"))

    def answer(prompt, max_tokens=TOKENS):
        return generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, sampler=make_sampler(0.0))

    chat_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    system_prompt = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, *MESSAGES],
                                                  add_generation_prompt=True)
    return {"chat": answer(chat_prompt), "system": answer(system_prompt),
            "text": answer("the meaning of a token is"), "tokenizer": tokenizer}


def runners(daemon, ids):
    return [r for i in daemon.instances() if i.instance_id in ids for r in i.runners]


def quiet(daemon, ids) -> bool:
    return all(r.state == pb.READY and r.batch_size == 0 for r in runners(daemon, ids))


# ------------------------------------------------------------------ OpenAI


def test_openai_chat_and_completions_give_the_single_process_answer(cluster, expected):
    a, b, _ = cluster
    for daemon in (a, b):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=TOKENS)
        assert answer.choices[0].message.content == expected["chat"]
        text = client.completions.create(model="demo", prompt="the meaning of a token is", temperature=0,
                                         max_tokens=TOKENS)
        assert text.choices[0].text == expected["text"] and text.object == "text_completion"
        assert text.usage.prompt_tokens == len(expected["tokenizer"].encode("the meaning of a token is"))
        parts = [e.choices[0].text for e in client.completions.create(
            model="demo", prompt="the meaning of a token is", temperature=0, max_tokens=TOKENS, stream=True)
            if e.choices]
        assert "".join(parts) == expected["text"]


def test_openai_errors_come_before_any_stream(cluster):
    a, _, _ = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    long = [{"role": "user", "content": "token " * 700}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model="demo", messages=long, max_tokens=16, stream=stream)
        assert too_long.value.code == "context_length_exceeded" and too_long.value.status_code == 400
        assert f"context of {CONTEXT}" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="demo", prompt="token " * 700, max_tokens=16)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="demo", prompt="")
    assert bad.value.param == "prompt"


# ------------------------------------------------------------------ Anthropic


def test_anthropic_messages_streamed_and_not(cluster, expected):
    a, b, _ = cluster
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{b.port}", api_key="unused", max_retries=0)
    message = client.messages.create(model="demo", max_tokens=TOKENS, messages=MESSAGES, extra_body=GREEDY)
    assert message.content[0].text == expected["chat"] and message.role == "assistant"
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens <= TOKENS
    with_system = client.messages.create(model="demo", max_tokens=TOKENS, messages=MESSAGES, system="be brief",
                                         extra_body=GREEDY)
    assert with_system.content[0].text == expected["system"]
    with client.messages.stream(model="demo", max_tokens=TOKENS, messages=MESSAGES, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected["chat"] and final.content[0].text == expected["chat"]
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == message.usage.input_tokens \
        + message.usage.cache_read_input_tokens
    stop = expected["chat"][5:8]
    if stop.strip():
        stopped = client.messages.create(model="demo", max_tokens=TOKENS, messages=MESSAGES, extra_body=GREEDY,
                                         stop_sequences=[stop])
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
        assert stopped.content[0].text == expected["chat"][:expected["chat"].index(stop)]


def test_anthropic_errors_in_anthropic_shape(cluster):
    a, _, _ = cluster
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{a.port}", api_key="unused", max_retries=0)
    long = [{"role": "user", "content": "token " * 700}]
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as too_long:
            client.messages.create(model="demo", max_tokens=16, messages=long, stream=stream)
        assert too_long.value.body["type"] == "error"
        assert too_long.value.body["error"]["type"] == "invalid_request_error"
        assert "exceeds the instance's context" in too_long.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=16, messages=MESSAGES)
    assert missing.value.body["error"]["type"] == "not_found_error"
    status, _, body = call(a.port, "POST", "/v1/messages", {"model": "demo", "messages": MESSAGES}, JSON)
    assert status == 400 and body["error"] == {"type": "invalid_request_error",
                                                "message": "max_tokens: Field required"}


# ------------------------------------------------------------------ Ollama


def test_ollama_chat_generate_and_tags(cluster, expected):
    a, _, _ = cluster
    client = ollama.Client(host=f"http://127.0.0.1:{a.port}")
    options = {"temperature": 0, "num_predict": TOKENS}
    reply = client.chat(model="demo", messages=MESSAGES, options=options, stream=False)
    assert reply.message.content == expected["chat"] and reply.done and reply.done_reason in ("stop", "length")
    assert reply.eval_count <= TOKENS and reply.prompt_eval_count > 0
    parts = list(client.chat(model="demo", messages=MESSAGES, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected["chat"] and parts[-1].done
    raw = client.generate(model="demo", prompt="the meaning of a token is", raw=True, options=options)
    assert raw.response == expected["text"]
    templated = client.generate(model="demo", prompt=MESSAGES[0]["content"], options=options)
    assert templated.response == expected["chat"]
    assert [m.model for m in client.list().models] == ["demo"]


def test_ollama_errors_in_ollama_shape(cluster):
    a, _, _ = cluster
    client = ollama.Client(host=f"http://127.0.0.1:{a.port}")
    with pytest.raises(ollama.ResponseError) as too_long:
        client.chat(model="demo", messages=[{"role": "user", "content": "token " * 700}],
                    options={"num_predict": 16}, stream=False)
    assert too_long.value.status_code == 400 and "exceeds the instance's context" in too_long.value.error
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as missing:
            result = client.generate(model="nope", prompt="hi", stream=stream)
            list(result) if stream else None
        assert missing.value.status_code == 404 and "not found" in missing.value.error
    status, _, body = call(a.port, "POST", "/api/chat", {"model": "demo", "messages": "hi"}, JSON)
    assert status == 400 and set(body) == {"error"}


# ------------------------------------------------------------------ batching, routing, cancelling


def test_concurrent_chats_are_batched_routed_over_both_instances_and_each_is_the_answer_alone(cluster, expected):
    a, _, ids = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    before = {r.instance_id: r.generated_tokens for r in runners(a, ids) if r.rank == 0}
    answers = [None] * 8

    def ask(i):
        answers[i] = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0,
                                                    max_tokens=TOKENS).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [expected["chat"]] * 8
    until(lambda: quiet(a, ids), 15)
    rank0 = {r.instance_id: r for r in runners(a, ids) if r.rank == 0}
    # Both instances served some of them, and each batched more than one.
    assert all(rank0[i].generated_tokens > before[i] for i in ids)
    assert all(rank0[i].peak_batch_size >= 2 and rank0[i].max_batch == 4 for i in ids)
    # /v1/state shows each instance's batch bound, batch and queue.
    _, _, state = call(a.port, "GET", "/v1/state")
    shown = {i["instance_id"]: i for i in state["instances"]}
    for iid in ids:
        first = shown[iid]["runners"][0]
        assert first["max_batch"] == 4 and first.get("batch_size", 0) == 0 and first.get("queue_depth", 0) == 0
        assert shown[iid]["placement"]["concurrency"] == 4


def test_a_client_that_goes_away_stops_its_generation_on_every_rank(cluster):
    a, _, ids = cluster
    until(lambda: quiet(a, ids), 15)
    before = {(r.instance_id, r.rank): r.generated_tokens for r in runners(a, ids)}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=400,
                                            stream=True, extra_body={"ignore_eos": True})
    events = iter(stream)
    next(events)
    next(events)
    stream.close()
    until(lambda: served(a, ids, before) and quiet(a, ids), 30)
    # Every rank of the instance that served it stopped short of the 400
    # tokens it would have generated (past any end-of-sequence token).
    iid = served(a, ids, before)
    for r in runners(a, ids):
        if r.instance_id == iid:
            assert 0 < r.generated_tokens - before[(iid, r.rank)] < 400
    families = metrics(a)
    cancelled = sample(families, "exod_requests", api="openai.chat", model="demo", outcome="cancelled")
    assert cancelled >= 1


def served(daemon, ids, before) -> str:
    moved = [r.instance_id for r in runners(daemon, ids) if r.rank == 0
             and r.generated_tokens > before[(r.instance_id, 0)]]
    return moved[0] if moved else ""


# ------------------------------------------------------------------ metrics


def metrics(daemon) -> dict:
    status, headers, body = call(daemon.port, "GET", "/metrics")
    assert status == 200 and headers.get_content_type() == "text/plain"
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families, name, suffix="_total", **labels):
    family = families[name]
    return sum(s.value for s in family.samples if s.name == name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_parse_with_prometheus_clients_own_parser(cluster):
    a, _, ids = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    families = metrics(a)
    served_before = sample(families, "exod_requests", api="openai.chat", outcome="length") + \
        sample(families, "exod_requests", api="openai.chat", outcome="stop")
    answer = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=TOKENS)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    families = metrics(a)
    served_after = sample(families, "exod_requests", api="openai.chat", outcome="length") + \
        sample(families, "exod_requests", api="openai.chat", outcome="stop")
    assert served_after == served_before + 1
    assert sample(families, "exod_requests", api="openai.chat", outcome="not_found") >= 1
    assert sample(families, "exod_generated_tokens", model="demo") >= answer.usage.completion_tokens
    assert families["exod_time_to_first_token_seconds"].type == "histogram"
    assert sample(families, "exod_time_to_first_token_seconds", "_count", model="demo") >= 1
    assert sample(families, "exod_inter_token_latency_seconds", "_count", model="demo") >= 1
    for iid in ids:
        assert sample(families, "exod_instance_max_batch", "", instance=iid) == 4
        assert sample(families, "exod_instance_queue_depth", "", instance=iid) >= 0
        assert sample(families, "exod_instance_batch_size", "", instance=iid) >= 0
        for rank in ("0", "1"):
            assert sample(families, "exod_runner_state", "", instance=iid, rank=rank) == 1
            assert sample(families, "exod_prefix_cache_capacity_bytes", "", instance=iid, rank=rank) > 0
    assert families["exod_prefix_cache_hits"].type == "counter"
    assert sample(families, "exod_prefix_cache_hits") >= 1  # the repeated chats hit
    assert sample(families, "exod_prefix_cache_lookups") >= sample(families, "exod_prefix_cache_hits")
    assert sample(families, "exod_prefix_cache_bytes", "") > 0
    for node in ("a", "b"):
        assert sample(families, "exod_node_memory_usable_bytes", "", node=node) == 4 * GB
        assert sample(families, "exod_node_memory_reserved_bytes", "", node=node) > 0
        assert sample(families, "exod_node_memory_used_bytes", "", node=node) > 0


# ------------------------------------------------------------------ hardening of the new routes


@pytest.mark.parametrize("path,body,shape", [
    ("/v1/completions", {"model": "demo", "prompt": "hi"}, "openai"),
    ("/v1/messages", {"model": "demo", "max_tokens": 4, "messages": MESSAGES}, "anthropic"),
    ("/api/chat", {"model": "demo", "messages": MESSAGES}, "ollama"),
    ("/api/generate", {"model": "demo", "prompt": "hi"}, "ollama"),
])
def test_every_new_route_keeps_the_http_hardening(cluster, path, body, shape):
    a, _, _ = cluster

    def check(answer, status):
        code, headers, got = answer
        assert code == status, answer
        assert headers["X-Content-Type-Options"] == "nosniff" and "script-src 'self'" in \
            headers["Content-Security-Policy"]
        if shape == "openai":
            assert set(got["error"]) == {"message", "type", "param", "code"}
        elif shape == "anthropic":
            assert got["type"] == "error" and set(got["error"]) == {"type", "message"}
        else:
            assert set(got) == {"error"} and isinstance(got["error"], str)

    check(call(a.port, "POST", path, json.dumps(body), {}), 415)
    check(call(a.port, "POST", path, json.dumps(body), {"Host": "evil.example", **JSON}), 421)
    check(call(a.port, "POST", path, json.dumps(body), {"Origin": "http://evil.example", **JSON}), 403)
    check(call(a.port, "POST", path, '{"model": NaN}', JSON), 400)
    check(call(a.port, "POST", path, "[" * 100 + "]" * 100, JSON), 400)
    check(call(a.port, "POST", path, json.dumps({**body, "model": "nope"}), JSON), 404)


def test_a_full_instance_answers_429_in_each_apis_shape(tmp_path):
    d = DaemonThread(settings(tmp_path, "solo", memory_limit=4 * GB, max_queue=0))
    try:
        status, _, placed = call(d.port, "POST", "/v1/instances", {
            "model": "demo", "ranks": 1, "context_length": CONTEXT, "concurrency": 1}, JSON)
        assert status == 201, placed
        until(lambda: {i.state for i in d.instances()} == {pb.INSTANCE_READY}, 180)
        base = f"http://127.0.0.1:{d.port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        busy = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=400, stream=True,
                                              extra_body={"ignore_eos": True})
        next(iter(busy))  # admitted: it holds the batch of one, and no request may wait
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4)
        assert limited.value.code == "rate_limit_exceeded"
        assert limited.value.response.headers["Retry-After"] == "1"
        with pytest.raises(anthropic.RateLimitError) as limited:
            anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0).messages.create(
                model="demo", max_tokens=4, messages=MESSAGES)
        assert limited.value.body["error"]["type"] == "rate_limit_error"
        assert limited.value.response.headers["Retry-After"] == "1"
        with pytest.raises(ollama.ResponseError) as limited:
            ollama.Client(host=base).chat(model="demo", messages=MESSAGES, stream=False)
        assert limited.value.status_code == 429 and "queue is full" in limited.value.error
        status, headers, _ = call(d.port, "POST", "/api/generate", {"model": "demo", "prompt": "hi"}, JSON)
        assert status == 429 and headers["Retry-After"] == "1"
        busy.close()
        until(lambda: all(r.batch_size == 0 for i in d.instances() for r in i.runners), 30)
        assert client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4).choices
        # One instance: a repeated conversation is served from its prefix
        # cache, and Anthropic's usage says how much of the prompt was.
        messages = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0).messages
        first = messages.create(model="demo", max_tokens=8, messages=[{"role": "user", "content": "a new one"}])
        again = messages.create(model="demo", max_tokens=8, messages=[{"role": "user", "content": "a new one"}])
        prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
        assert again.usage.input_tokens + again.usage.cache_read_input_tokens == prompt
        # All of the repeated prompt but its last token (whose logits sample the answer).
        assert first.usage.cache_read_input_tokens < again.usage.cache_read_input_tokens == prompt - 1
        # Ollama's durations after a prefix-cache hit are parts of the request's time.
        for _ in range(2):
            done = ollama.Client(host=base).generate(model="demo", prompt="cached twice " * 20,
                                                     options={"num_predict": 8}, stream=False)
            assert 0 < done.prompt_eval_duration <= done.total_duration, done
            assert done.prompt_eval_duration + done.eval_duration <= done.total_duration, done
        # Streamed, message_start already says what the prefix cache held:
        # the same as message_delta at the end (needs the runner to send
        # cached_tokens with the first chunk of tokens).
        events = sse(call(d.port, "POST", "/v1/messages", {
            "model": "demo", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "a new one"}]}, JSON)[2])
        start = events[0][1]["message"]["usage"]
        end = next(e for name, e in events if name == "message_delta")["usage"]
        assert start["cache_read_input_tokens"] == end["cache_read_input_tokens"] == prompt - 1, (start, end)
        assert start["input_tokens"] == end["input_tokens"] == 1, (start, end)
    finally:
        d.stop()


def test_bad_bodies_get_a_4xx_in_each_apis_shape_never_a_500(cluster):
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

    a, _, _ = cluster
    values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                          allow_infinity=False) | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)
    field = {"/v1/completions": ["model", "prompt", "max_tokens", "temperature", "stop", "seed", "logprobs", "n"],
             "/v1/messages": ["model", "max_tokens", "messages", "system", "temperature", "top_k", "stop_sequences"],
             "/api/chat": ["model", "messages", "options", "stream", "format"],
             "/api/generate": ["model", "prompt", "system", "raw", "options"]}

    @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(sorted(field)), data=st.data())
    def fuzz(path, data):
        body = data.draw(st.dictionaries(st.sampled_from(field[path]), values, max_size=5) | values)
        if isinstance(body, dict) and body.get("model") == "demo":
            body["model"] = "not-placed"  # never start a generation: this is about parsing
        code, _, got = call(a.port, "POST", path, json.dumps(body), JSON)
        assert 400 <= code < 500, (path, body, code, got)
        if path.startswith("/api/"):
            assert set(got) == {"error"}
        elif path == "/v1/messages":
            assert got["type"] == "error" and got["error"]["type"].endswith("_error")
        else:
            assert got["error"]["message"]

    fuzz()


# ------------------------------------------------------------------ refusals, shapes and stream details


def sse(data: bytes) -> list[tuple[str | None, object]]:
    """A server-sent event stream's (event name, data as JSON or the raw line)."""
    events = []
    for block in data.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            text = lines["data"]
            events.append((lines.get("event"), text if text == "[DONE]" else json.loads(text)))
    return events


def openai_refusal(port, path, body, param):
    status, _, got = call(port, "POST", path, body, JSON)
    assert status == 400 and got["error"]["type"] == "invalid_request_error", got
    assert got["error"]["param"] == param and param in got["error"]["message"], got
    return got["error"]["message"]


def test_openai_refuses_what_it_would_otherwise_ignore_and_names_the_field(cluster):
    a, _, _ = cluster
    chat = {"model": "demo", "messages": MESSAGES, "max_tokens": 2}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for name, value in (("tools", [tool]), ("tool_choice", "auto"), ("functions", [tool["function"]]),
                        ("function_call", "auto"), ("response_format", {"type": "json_object"}),
                        ("logit_bias", {"5": 10}), ("presence_penalty", 0.5), ("frequency_penalty", -1)):
        openai_refusal(a.port, "/v1/chat/completions", {**chat, name: value}, name)
    # What changes nothing stays accepted: many clients send it.
    status, _, got = call(a.port, "POST", "/v1/chat/completions", {
        **chat, "response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0,
        "frequency_penalty": 0}, JSON)
    assert status == 200 and got["choices"][0]["message"]["role"] == "assistant", got
    completion = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    for name, value in (("logit_bias", {"5": 10}), ("presence_penalty", 1), ("suffix", "end")):
        openai_refusal(a.port, "/v1/completions", {**completion, name: value}, name)
    # Strict booleans and stop strings, with messages that say what is wrong.
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        assert "boolean" in openai_refusal(a.port, path, {**body, "stream": "yes"}, "stream")
        assert "empty" in openai_refusal(a.port, path, {**body, "stop": ""}, "stop")
        assert "boolean include_usage" in openai_refusal(
            a.port, path, {**body, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options")
    assert "non-negative" in openai_refusal(a.port, "/v1/completions", {**completion, "prompt": [-1]}, "prompt")
    # An id past the vocabulary is the runner's to refuse, with its own words.
    status, _, got = call(a.port, "POST", "/v1/completions", {**completion, "prompt": [999999999]}, JSON)
    assert status == 400 and "non-empty string" not in got["error"]["message"], got
    assert "vocab" in got["error"]["message"].lower() or "999999999" in got["error"]["message"], got
    # One token id is a prompt of one token, not a batch of one.
    status, _, got = call(a.port, "POST", "/v1/completions", {**completion, "prompt": [5]}, JSON)
    assert status == 200 and got["usage"]["prompt_tokens"] == 1, got
    # An over-long prompt names the completion's field.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="demo", prompt="token " * 700, max_tokens=16)
    assert too_long.value.param == "prompt" and too_long.value.code == "context_length_exceeded"


def test_openai_stream_usage_only_when_asked_as_a_last_chunk(cluster):
    a, _, _ = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    for create, kwargs in ((client.chat.completions.create, {"messages": MESSAGES}),
                           (client.completions.create, {"prompt": "the meaning of a token is"})):
        plain = list(create(model="demo", max_tokens=6, temperature=0, stream=True, **kwargs))
        assert plain and all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason
        counted = list(create(model="demo", max_tokens=6, temperature=0, stream=True,
                              stream_options={"include_usage": True}, **kwargs))
        *chunks, last = counted
        assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.prompt_tokens > 0
        assert last.usage.total_tokens == last.usage.prompt_tokens + 6
        assert all(c.usage is None and len(c.choices) == 1 for c in chunks) and chunks[-1].choices[0].finish_reason
    # On the wire: no usage key at all unless asked, null before the last chunk when asked.
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    events = sse(call(a.port, "POST", "/v1/chat/completions", body, JSON)[2])
    assert events[-1][1] == "[DONE]" and all("usage" not in e for _, e in events[:-1])
    events = sse(call(a.port, "POST", "/v1/chat/completions",
                      {**body, "stream_options": {"include_usage": True}}, JSON)[2])
    assert [e["usage"] is None for _, e in events[:-1]] == [True] * (len(events) - 2) + [False]
    assert events[-2][1]["choices"] == [] and events[-1][1] == "[DONE]"


def test_unknown_routes_answer_in_the_shape_of_the_api_they_belong_to(cluster):
    a, _, _ = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.code == "model_not_found" and missing.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="demo", input="hi")
    assert missing.value.body["message"].startswith("no such endpoint")
    for method, path, status in (("POST", "/v1/embeddings", 404), ("GET", "/v1/models/demo/x", 404),
                                 ("DELETE", "/v1/chat/completions", 405)):
        code, _, got = call(a.port, method, path, {"model": "demo"} if method == "POST" else None, JSON)
        assert code == status and set(got["error"]) == {"message", "type", "param", "code"}, got
        assert got["error"]["type"] == "invalid_request_error"
    for method, path, status, kind in (("GET", "/v1/messages", 405, "invalid_request_error"),
                                       ("POST", "/v1/messages/count_tokens", 404, "not_found_error")):
        code, _, got = call(a.port, method, path, {"model": "demo"} if method == "POST" else None, JSON)
        assert code == status and got == {"type": "error", "error": {"type": kind, "message": got["error"][
            "message"]}}, got
    # exod's own paths keep exod's shape.
    code, _, got = call(a.port, "GET", "/v1/nope")
    assert code == 404 and got["error"]["code"] == 404


def test_anthropic_refuses_tools_and_thinking_and_a_stream_that_is_not_a_boolean(cluster):
    a, _, _ = cluster
    body = {"model": "demo", "max_tokens": 2, "messages": MESSAGES}
    tool = {"name": "f", "input_schema": {"type": "object"}}
    for name, value in (("tools", [tool]), ("tool_choice", {"type": "auto"}),
                        ("thinking", {"type": "enabled", "budget_tokens": 1024}), ("stream", "yes")):
        status, _, got = call(a.port, "POST", "/v1/messages", {**body, name: value}, JSON)
        assert status == 400 and got["error"]["type"] == "invalid_request_error", got
        assert got["error"]["message"].startswith(f"{name}:"), got
    status, _, got = call(a.port, "POST", "/v1/messages", {**body, "thinking": {"type": "disabled"}}, JSON)
    assert status == 200 and got["type"] == "message", got


def test_anthropic_stream_usage_at_start_agrees_with_the_end(cluster):
    a, _, _ = cluster
    body = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "the same again"}],
            "stream": True}
    for _ in range(2):  # the second is served from the prefix cache where it lands on the same instance
        events = sse(call(a.port, "POST", "/v1/messages", body, JSON)[2])
        names = [name for name, _ in events]
        assert names[0] == "message_start" and names[-1] == "message_stop", names
        start = events[0][1]["message"]["usage"]
        end = next(e for name, e in events if name == "message_delta")["usage"]
        assert (start["input_tokens"], start["cache_read_input_tokens"]) == \
            (end["input_tokens"], end["cache_read_input_tokens"]), (start, end)


def test_ollama_latest_tag_suffix_stream_and_durations(cluster, expected):
    a, _, _ = cluster
    client = ollama.Client(host=f"http://127.0.0.1:{a.port}")
    options = {"temperature": 0, "num_predict": TOKENS}
    reply = client.chat(model="demo:latest", messages=MESSAGES, options=options, stream=False)
    assert reply.message.content == expected["chat"] and reply.model == "demo:latest"
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="demo:7b", messages=MESSAGES, stream=False)
    assert missing.value.status_code == 404
    for field, body in (("suffix", {"suffix": "end"}), ("stream", {"stream": "yes"}),
                        ("stop", {"options": {"stop": ""}})):
        status, _, got = call(a.port, "POST", "/api/generate", {"model": "demo", "prompt": "hi", **body}, JSON)
        assert status == 400 and set(got) == {"error"} and field in got["error"], got
    status, _, got = call(a.port, "POST", "/api/chat", {"model": "demo", "messages": MESSAGES, "stream": 1}, JSON)
    assert status == 400 and "stream" in got["error"], got
    # The durations are parts of the request's time, cold or from the prefix cache.
    for _ in range(3):
        done = client.generate(model="demo", prompt="a prompt long enough to be worth caching " * 4,
                               options=options, stream=False)
        assert 0 < done.prompt_eval_duration <= done.total_duration, done
        assert 0 < done.eval_duration and done.prompt_eval_duration + done.eval_duration <= done.total_duration, done


def test_openai_logprobs_carry_each_tokens_own_bytes(cluster):
    """A token can be part of a character: its streamed text is empty or
    U+FFFD, but its logprob entry holds its own bytes, and the bytes of the
    entries, joined, are the answer."""
    a, _, _ = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "stop test"}],
                                            max_tokens=30, temperature=0, logprobs=True, top_logprobs=2)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens and all(e.bytes for e in entries)
    joined = b"".join(bytes(e.bytes) for e in entries)
    assert joined.decode("utf-8", "replace") == answer.choices[0].message.content
    assert all(t.bytes for e in entries for t in e.top_logprobs)
