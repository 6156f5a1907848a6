"""Continuous batching across real ranks (the fp32 demo model over MLX's
ring on loopback, one instance per strategy, a hybrid of two stages too): requests that join a running
batch at different steps, with different prompt lengths and budgets, get
exactly the tokens they get alone (greedy and seeded), which are the
single-process model's; the prefix cache serves a repeated prefix on every
rank and changes no token."""

import queue

import pytest
from mlx_lm.generate import BatchGenerator

from exod.models import synthetic
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

from .runner_helpers import PROMPT, reference

PROMPTS = [PROMPT, [3, 9, 27, 81, 243], list(range(40, 100)), [7] * 20, PROMPT[:3], list(range(900, 930))]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return synthetic.ensure_named("demo", tmp_path_factory.mktemp("models"))


# hybrid: stages {0, 1} (moe_tensor, the last 3 layers) and {2}.
HYBRID = {"stage_ranks": [2, 1], "stage_strategy": "moe_tensor", "pipeline_layers": [3, 3]}


@pytest.fixture(scope="module", params=[("moe_tensor", 2, {}), ("pipeline", 2, {}), ("tensor", 2, {}),
                                        ("hybrid", 3, HYBRID)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def instance(request, demo_dir):
    strategy, world, extra = request.param
    with LocalInstance(demo_dir, strategy, world, context_length=512, max_batch=4,
                       prefix_cache_tokens=600, **extra) as running:
        running.wait_ready(180)
        yield running


def make(request_id, prompt, max_tokens, **sampling):
    return pb.GenerateRequest(request_id=request_id, prompt_tokens=prompt,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def drain(q: "queue.Queue", timeout=120) -> list[pb.GenerationChunk]:
    chunks = []
    while True:
        chunk = q.get(timeout=timeout)
        chunks.append(chunk)
        if chunk.finish_reason:
            return chunks


def tokens(chunks) -> list[int]:
    return [t.token for c in chunks for t in c.tokens if not (c.finish_reason and not t.token)]


def test_greedy_and_seeded_answers_are_the_same_alone_and_in_a_batch(instance, demo_dir):
    cases = [(f"p{i}", prompt, 6 + 5 * i, {} if i % 2 == 0 else {"temperature": 0.9, "seed": 100 + i})
             for i, prompt in enumerate(PROMPTS)]
    alone = {rid: tokens(instance.generate(make(rid + "-alone", p, n, **s))) for rid, p, n, s in cases}
    assert alone["p0"][:6] == reference(demo_dir)["tokens"][:6]  # the single-process model's

    # Six requests on a batch of four: two wait; the later ones join while
    # the first decode (each submit lands between steps).
    pending = {}
    for rid, prompt, n, s in cases:
        pending[rid] = instance.submit(make(rid, prompt, n, **s))
    together = {rid: tokens(drain(q)) for rid, q in pending.items()}
    assert together == alone
    assert instance.wait_for(lambda i: all(r.status.state == pb.READY and r.status.batch_size == 0
                                           for r in i.ranks), 10)
    assert [r.status.peak_batch_size for r in instance.ranks] == [4] * len(instance.ranks)
    assert all(s.max_batch == 4 and s.batch_size <= 4 for per_rank in instance.statuses for s in per_rank
               if s.state in (pb.READY, pb.RUNNING))


def test_prefix_cache_serves_a_repeated_prefix_on_every_rank_and_changes_no_token(instance):
    system = list(range(200, 300))  # a shared 100-token "system prompt"
    first = drain(instance.submit(make("turn1", system + [11, 12, 13], 8)))
    assert first[-1].cached_tokens == 0
    before = [r.status.prefix_cache.hits for r in instance.ranks]
    second = drain(instance.submit(make("turn2", system + [11, 12, 13], 8)))
    third = drain(instance.submit(make("other", system + [50, 51], 8)))
    assert tokens(second) == tokens(first)
    # The repeated prompt reuses all but its last token; another question
    # after the same system prompt reuses the system prompt.
    assert second[-1].cached_tokens == len(system) + 2
    assert third[-1].cached_tokens == len(system)
    assert instance.wait_for(lambda i: all(r.status.state == pb.READY for r in i.ranks), 10)
    assert instance.wait_for(lambda i: all(r.status.prefix_cache.hits >= b + 2 for r, b in zip(i.ranks, before)), 5)
    for rank in instance.ranks:
        cache = rank.status.prefix_cache
        assert 0 < cache.tokens <= cache.capacity_tokens == 600 and cache.bytes > 0
    # Each rank holds its own shard: the same tokens everywhere (once every
    # rank's status has caught up), and bytes in proportion to what the
    # strategy gives each rank.
    assert instance.wait_for(lambda i: len({r.status.prefix_cache.tokens for r in i.ranks}) == 1, 10)


def test_one_at_a_time_engine_is_chosen_only_for_caches_that_cannot_batch(tiny_dirs):
    from mlx_lm.utils import load_model

    from exod.runner import engine

    batched, _ = load_model(tiny_dirs[("qwen3_moe", "fp32")])
    generator, bound = engine.make(batched, 4, 2, 512, None)
    assert isinstance(generator, BatchGenerator) and bound == 4
    v4, _ = load_model(tiny_dirs[("deepseek_v41", "fp32")])
    generator, bound = engine.make(v4, 4, 2, 512, None)
    assert isinstance(generator, engine.OneAtATime) and bound == 1


def test_a_hybrid_models_pipeline_stages_keep_the_prefix_cache(tiny_dirs):
    """lfm2 (short convolutions and attention) as a 2-stage pipeline: each
    stage aliases the convolution states of the layers it skips, so it
    serves one sequence at a time, and it still keeps its shard of the
    prefix cache. A chat's second turn reuses the whole first turn on both
    ranks and decodes what one process decodes from the whole prompt."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model_dir = tiny_dirs[("lfm2", "fp32")]
    first_prompt = list(range(30, 90))
    with LocalInstance(model_dir, "pipeline", 2, context_length=512, max_batch=4,
                       prefix_cache_tokens=600) as instance:
        instance.wait_ready(180)
        assert [r.status.max_batch for r in instance.ranks] == [1, 1]  # one sequence at a time
        first = drain(instance.submit(make("turn1", first_prompt, 8)))
        answer = tokens(first)
        second_prompt = first_prompt + answer + [7, 8, 9]
        second = drain(instance.submit(make("turn2", second_prompt, 8)))
        assert first[-1].cached_tokens == 0
        assert second[-1].cached_tokens >= len(first_prompt) + len(answer) - 1
        # Both turns are kept on both ranks (a convolution state cannot be
        # trimmed, so the first turn is not dropped for the longer second);
        # each rank's status says so within its reporting interval.
        both_turns = len(first_prompt) + len(answer) + len(second_prompt) + len(tokens(second))
        assert instance.wait_for(lambda i: all(r.status.prefix_cache.hits >= 1 and r.status.prefix_cache.bytes > 0
                                               and r.status.prefix_cache.tokens == both_turns for r in i.ranks), 10)

    model, _ = load_model(model_dir)
    cache = make_prompt_cache(model)
    logits = model(mx.array([second_prompt]), cache=cache)[:, -1, :]
    expected = []
    for _ in range(8):
        token = int(mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1).item())
        expected.append(token)
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
    assert tokens(second) == expected
