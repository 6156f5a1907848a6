"""What serving adds to the planner: the batch bound (concurrency) reserves
the KV of that many contexts, and the prefix cache is a term of each rank's
memory, asked for as bytes of the whole model's KV, held as the same number
of tokens on every rank, each rank paying its own share of them."""

from exod.models import inventory, synthetic
from exod.placement import cluster, constants, planner
from exod.proto import exod_pb2 as pb

CONTEXT = 1024


def demo_spec():
    config = {**synthetic.NAMED["demo"], "vocab_size": synthetic.TOKENIZER_VOCAB, "torch_dtype": "float32"}
    return inventory.from_config(config, "demo")


def plan(strategy, world, **request):
    result = planner.plan(demo_spec(), cluster.synthetic(world, 64 * 10**9),
                          pb.PlacementRequest(strategy=strategy, ranks=world, context_length=CONTEXT, **request))
    return result.chosen


def kv_per_token_whole_model() -> float:
    # demo: 6 layers, 4 KV heads of 32 values, keys and values, fp32
    return 6 * 2 * 4 * 32 * 4


def test_default_prefix_cache_is_one_context_and_every_rank_holds_the_same_tokens():
    for strategy, world in ((pb.PIPELINE, 2), (pb.MOE_TENSOR, 2), (pb.TENSOR, 2)):
        chosen = plan(strategy, world)
        assert chosen.concurrency == constants.DEFAULT_CONCURRENCY and chosen.prefix_cache_tokens == CONTEXT
        shares = [r.memory.prefix_cache_bytes for r in chosen.ranks]
        kv = [r.memory.kv_cache_bytes for r in chosen.ranks]
        for rank, prefix, context_kv in zip(chosen.ranks, shares, kv):
            # Per rank: the prefix cache is one context of this rank's KV, the
            # batch reserves `concurrency` contexts; both in the total.
            assert prefix * chosen.concurrency == context_kv
            m = rank.memory
            assert m.total_bytes == m.weights_bytes + m.kv_cache_bytes + m.prefix_cache_bytes + m.overhead_bytes
        whole = CONTEXT * kv_per_token_whole_model()
        if strategy == pb.MOE_TENSOR:
            assert shares == [whole, whole]  # attention is replicated
        else:
            assert sum(shares) == whole      # tensor: kv heads split; pipeline: layers split


def test_prefix_cache_bytes_on_the_request_sets_the_tokens_and_zero_turns_it_off():
    per_token = kv_per_token_whole_model()
    chosen = plan(pb.TENSOR, 2, prefix_cache_bytes=int(per_token * 3000))
    assert chosen.prefix_cache_tokens == 3000
    assert [r.memory.prefix_cache_bytes for r in chosen.ranks] == [int(per_token * 3000 / 2)] * 2
    off = plan(pb.TENSOR, 2, prefix_cache_bytes=0)
    assert off.prefix_cache_tokens == 0 and all(r.memory.prefix_cache_bytes == 0 for r in off.ranks)
    assert all(a.memory.total_bytes - b.memory.total_bytes == a.memory.prefix_cache_bytes
               for a, b in zip(chosen.ranks, off.ranks))


def test_concurrency_is_the_number_of_contexts_reserved():
    one, eight = plan(pb.PIPELINE, 2, concurrency=1), plan(pb.PIPELINE, 2, concurrency=8)
    assert [8 * r.memory.kv_cache_bytes for r in one.ranks] == [r.memory.kv_cache_bytes for r in eight.ranks]
    assert eight.concurrency == 8


def test_a_prefix_cache_that_does_not_fit_is_named_in_the_shortfall():
    nodes = cluster.synthetic(1, 200 * 10**6)
    result = planner.plan(demo_spec(), nodes, pb.PlacementRequest(context_length=CONTEXT, concurrency=1,
                                                                  prefix_cache_bytes=10**9))
    assert not result.HasField("chosen")
    assert any("prefix cache" in reason for c in result.candidates for reason in c.reasons)
