"""The runner's lifecycle and its request handling, on the demo model as two
real moe_tensor ranks: statuses in order with progress and memory, chat
through the model's template, sampling controls, admission, batching beyond
the batch bound, cancellation, bad requests that leave it Ready, and a
clean shutdown."""

import pytest

from exod.models import synthetic
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

LIFECYCLE = [pb.IDLE, pb.CONNECTING, pb.CONNECTED, pb.LOADING, pb.LOADED, pb.WARMING_UP, pb.READY]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model_dir = synthetic.ensure_named("demo", tmp_path_factory.mktemp("models"))
    instance = LocalInstance(model_dir, "moe_tensor", 2, context_length=2048, estimated_bytes=[111, 222],
                             max_batch=2)
    instance.wait_ready(120)
    yield instance
    instance.close()


def request(request_id, **sampling):
    messages = [pb.ChatMessage(role="user", content="hello world, what is a token?")]
    return pb.GenerateRequest(request_id=request_id, messages=messages, sampling=pb.SamplingParams(**sampling))


def token_chunks(chunks):
    """The chunks after the admission chunk, which carries no token."""
    assert chunks[0].admitted and not chunks[0].tokens and chunks[0].prompt_tokens > 0
    return chunks[1:]


def tokens_of(chunks):
    return [t.token for c in chunks for t in c.tokens if not (c.finish_reason and not t.token)]


def text_of(chunks):
    return "".join(t.text for c in chunks for t in c.tokens)


def test_statuses_arrive_in_order_with_progress_and_memory(demo):
    for rank, statuses in enumerate(demo.statuses):
        states = [s.state for s in statuses]
        collapsed = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
        assert collapsed[: len(LIFECYCLE)] == LIFECYCLE
        loading = [s for s in statuses if s.state == pb.LOADING]
        assert [s.layers_loaded for s in loading] == list(range(7)) and loading[-1].total_layers == 6
        ready = next(s for s in statuses if s.state == pb.READY)
        assert ready.estimated_bytes == [111, 222][rank]
        assert ready.peak_memory_bytes > 10e6 and ready.peak_rss_bytes > ready.peak_memory_bytes
        assert ready.canary_layer == 0 and ready.canary_max_delta <= 1e-4
        assert ready.pid == demo.ranks[rank].pid


def test_chat_greedy_is_deterministic_and_reports_speed(demo):
    first = demo.generate(request("g1", max_tokens=12, ignore_eos=True))
    second = demo.generate(request("g2", max_tokens=12, ignore_eos=True))
    assert tokens_of(first) == tokens_of(second) and len(tokens_of(first)) == 12
    final = first[-1]
    assert final.finish_reason == pb.FINISH_LENGTH and final.generation_tokens == 12
    assert final.prompt_tokens == 12  # the chat template's tokens for this message
    assert final.prompt_tokens_per_s > 0 and final.generation_tokens_per_s > 0


def test_seeded_sampling_repeats_and_logprobs_are_consistent(demo):
    kwargs = dict(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=10, ignore_eos=True,
                  logprobs=True, top_logprobs=3)
    a = demo.generate(request("s1", **kwargs))
    b = demo.generate(request("s2", **kwargs))
    assert tokens_of(a) == tokens_of(b)
    c = demo.generate(request("s3", **{**kwargs, "seed": 8}))
    assert tokens_of(a) != tokens_of(c)
    for chunk in token_chunks(a)[:-1]:
        token = chunk.tokens[0]
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
    greedy = demo.generate(request("s4", max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=1))
    for chunk in token_chunks(greedy)[:-1]:
        t = chunk.tokens[0]
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5


def test_stop_strings_end_the_text_before_them(demo):
    full = text_of(demo.generate(request("full", max_tokens=30, ignore_eos=True)))
    stop = full[10:13]
    cut = demo.generate(request("cut", max_tokens=30, ignore_eos=True, stop=[stop]))
    assert cut[-1].finish_reason == pb.FINISH_STOP
    assert text_of(cut) == full[: full.index(stop)]


def test_requests_beyond_the_batch_wait_and_every_answer_is_the_one_alone(demo):
    """Four requests on a batch of two: two decode together while two wait
    (the status says so), every request still gets exactly the tokens it
    gets alone, and the statuses never show more than the batch bound."""
    alone = [tokens_of(demo.generate(request(f"alone{i}", max_tokens=6 + 4 * i, ignore_eos=True,
                                                     temperature=0.0)))
             for i in range(4)]
    seen_before = [len(s) for s in demo.statuses]
    queues = [demo.submit(request(f"b{i}", max_tokens=6 + 4 * i, ignore_eos=True, temperature=0.0))
              for i in range(4)]
    answers = []
    for q in queues:
        chunks = []
        while not (chunk := q.get(timeout=60)).finish_reason:
            chunks.append(chunk)
        answers.append(tokens_of(chunks + [chunk]))
        assert chunk.finish_reason == pb.FINISH_LENGTH
    assert answers == alone
    assert demo.wait_for(lambda i: i.states() == [pb.READY, pb.READY], 5)
    serving = [s for statuses, before in zip(demo.statuses, seen_before) for s in statuses[before:]]
    assert all(s.max_batch == 2 and s.batch_size <= 2 for s in serving)
    assert [r.status.peak_batch_size for r in demo.ranks] == [2, 2]
    assert demo.wait_for(lambda i: i.states() == [pb.READY, pb.READY], 5)
    final = demo.ranks[0].status
    assert final.generated_tokens >= 2 * sum(len(a) for a in alone)


def test_cancel_ends_a_request_and_leaves_the_runner_ready(demo):
    chunks = demo.submit(request("long", max_tokens=1500, ignore_eos=True))
    assert chunks.get(timeout=60).admitted
    assert chunks.get(timeout=60).tokens
    demo.cancel("long")
    while True:
        chunk = chunks.get(timeout=30)
        if chunk.finish_reason:
            break
    assert chunk.finish_reason == pb.FINISH_CANCELLED and chunk.generation_tokens < 1500
    # Every rank dropped it from its batch: not just rank 0's answer.
    assert demo.wait_for(lambda i: all(r.status.state == pb.READY and r.status.batch_size == 0
                                       for r in i.ranks), 5)
    generated = [r.status.generated_tokens for r in demo.ranks]
    assert generated[0] == generated[1]
    queued = demo.submit(request("never", max_tokens=4))
    demo.cancel("never")  # may be cancelled before or after it starts; either way it ends
    while not (c := queued.get(timeout=30)).finish_reason:
        pass
    assert c.finish_reason in (pb.FINISH_CANCELLED, pb.FINISH_LENGTH, pb.FINISH_STOP)
    assert demo.wait_for(lambda i: i.states() == [pb.READY, pb.READY], 5)
    after = demo.generate(request("after", max_tokens=3, ignore_eos=True))
    assert after[-1].finish_reason == pb.FINISH_LENGTH


@pytest.mark.parametrize("bad,error,kind", [
    (pb.GenerateRequest(request_id="vocab", prompt_tokens=[5, 10**6]), "outside the vocabulary",
     pb.ERROR_INVALID_REQUEST),
    (pb.GenerateRequest(request_id="empty"), "empty prompt", pb.ERROR_INVALID_REQUEST),
    (pb.GenerateRequest(request_id="long", prompt_tokens=[5] * 2000, sampling=pb.SamplingParams(max_tokens=100)),
     "prompt of 2000 tokens plus max_tokens 100 exceeds the instance's context of 2048", pb.ERROR_CONTEXT_LENGTH),
    (pb.GenerateRequest(request_id="longer", prompt_tokens=[5] * 2049),
     "prompt of 2049 tokens exceeds the instance's context of 2048", pb.ERROR_CONTEXT_LENGTH),
    (pb.GenerateRequest(request_id="full", prompt_tokens=[5] * 2048),
     "leaving nothing to generate", pb.ERROR_CONTEXT_LENGTH),
])
def test_bad_requests_get_an_error_and_the_runner_stays_ready(demo, bad, error, kind):
    chunks = demo.generate(bad)
    # Refused at admission: the error is the only chunk, no admission first.
    assert len(chunks) == 1 and not chunks[0].admitted
    assert chunks[0].finish_reason == pb.FINISH_ERROR and error in chunks[0].error and chunks[0].error_kind == kind
    # Rank 0 answers at once; the other ranks may still be finishing the
    # steps of the request before (they learn it ended at the next control).
    assert demo.wait_for(lambda i: i.states() == [pb.READY, pb.READY], 5)


def test_a_prompt_that_fits_is_never_refused_for_the_default_limit(demo):
    """Without max_tokens, the default (256) shrinks to what the context
    leaves: 2040 prompt tokens in a context of 2048 generate 8."""
    chunks = demo.generate(pb.GenerateRequest(request_id="near-full", prompt_tokens=[5] * 2040,
                                              sampling=pb.SamplingParams(ignore_eos=True)), timeout=300)
    assert chunks[-1].finish_reason == pb.FINISH_LENGTH and chunks[-1].generation_tokens == 8


def test_only_rank_0_takes_requests(demo):
    q = demo._chunks.setdefault("to-rank-1", __import__("queue").Queue())
    demo.ranks[1].send(pb.RunnerCommand(generate=pb.GenerateRequest(request_id="to-rank-1", prompt_tokens=[5])))
    chunk = q.get(timeout=10)
    assert chunk.finish_reason == pb.FINISH_ERROR and "send them to rank 0" in chunk.error


def test_an_idle_instance_does_not_spin(demo):
    """Waiting for requests, no rank burns a core: MLX's ring spins a
    thread while a rank waits inside an all-sum, so the ranks wait out their
    idle tick before the control's all-sum (rank 1 used a whole core)."""
    import time

    import psutil

    assert demo.wait_for(lambda i: i.states() == [pb.READY, pb.READY], 10)
    processes = [psutil.Process(r.pid) for r in demo.ranks]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    started = time.monotonic()
    time.sleep(2.0)
    elapsed = time.monotonic() - started
    shares = [(sum(p.cpu_times()[:2]) - b) / elapsed for p, b in zip(processes, before)]
    assert max(shares) < 0.3, f"idle ranks used {shares} of a core"
    # ...and it still answers at once.
    assert tokens_of(token_chunks(demo.generate(request("after-idle", max_tokens=3, ignore_eos=True))))


def test_shutdown_is_clean_and_in_lockstep(tmp_path):
    model_dir = synthetic.ensure_named("demo", tmp_path / "models")
    instance = LocalInstance(model_dir, "pipeline", 2)
    instance.wait_ready(120)
    assert instance.shutdown(15)
    for rank, statuses in zip(instance.ranks, instance.statuses):
        assert [s.state for s in statuses[-2:]] == [pb.SHUTTING_DOWN, pb.SHUTDOWN]
        assert rank.process.returncode == 0


def test_a_module_in_the_working_folder_never_reaches_a_runner(tmp_path, monkeypatch):
    """Runners start with python -P: a queue.py where the daemon was started
    (it imports queue) would otherwise replace the standard library's."""
    models = tmp_path / "models"
    model_dir = synthetic.ensure_named("demo", models)
    folder = tmp_path / "cwd"
    folder.mkdir()
    (folder / "queue.py").write_text("raise SystemExit('the working folder was imported')\n")
    monkeypatch.chdir(folder)
    with LocalInstance(model_dir, "moe_tensor", 1, context_length=512) as instance:
        instance.wait_ready(120)
        chunks = instance.generate(request("cwd", max_tokens=2, ignore_eos=True))
        assert chunks[-1].finish_reason == pb.FINISH_LENGTH
