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


# A hybrid decoder (mlx-lm's lfm2: short convolutions and attention): its
# convolution state merges into a batch but cannot be advanced by a layer a
# pipeline stage skips (runner/pipeline.py).
HYBRID = dict(model_type="lfm2", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
              block_dim=64, block_ff_dim=128, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
              block_auto_adjust_ff_dim=False, full_attn_idxs=[1, 3], rope_theta=10000.0, tie_word_embeddings=True)


def test_the_inventory_says_which_models_the_runner_decodes_one_at_a_time():
    # Asked of the installed classes' own caches, built from the config alone.
    assert inventory.batching(demo_spec_config()) == (True, True)
    assert inventory.batching({**synthetic.NAMED["v4-mini"], "vocab_size": 512}) == (False, False)
    assert inventory.batching(HYBRID) == (True, False)
    v4 = inventory.from_config({**synthetic.NAMED["v4-mini"], "vocab_size": 512, "torch_dtype": "float32"}, "v4")
    assert v4.unbatched and v4.unbatched_pipeline
    assert not demo_spec().unbatched and not demo_spec().unbatched_pipeline


def demo_spec_config():
    return {**synthetic.NAMED["demo"], "vocab_size": synthetic.TOKENIZER_VOCAB, "torch_dtype": "float32"}


def test_a_model_whose_caches_cannot_batch_is_planned_at_concurrency_one_with_its_kv():
    spec = inventory.from_config({**synthetic.NAMED["v4-mini"], "vocab_size": 512, "torch_dtype": "float32"}, "v4")
    nodes = cluster.synthetic(2, 64 * 10**9)
    for strategy, world in ((pb.PIPELINE, 1), (pb.PIPELINE, 2), (pb.MOE_TENSOR, 2)):
        asked = planner.plan(spec, nodes, pb.PlacementRequest(strategy=strategy, ranks=world, context_length=CONTEXT,
                                                               concurrency=8)).chosen
        one = planner.plan(spec, nodes, pb.PlacementRequest(strategy=strategy, ranks=world, context_length=CONTEXT,
                                                             concurrency=1)).chosen
        assert asked.fits and asked.concurrency == 1  # what the runner's batch will hold
        assert [r.memory.kv_cache_bytes for r in asked.ranks] == [r.memory.kv_cache_bytes for r in one.ranks]
        assert any("one sequence at a time (concurrency 1, not 8)" in r for r in asked.reasons)
        assert not any("one sequence" in r for r in one.reasons)


def test_only_pipeline_stages_of_a_hybrid_decoder_decode_one_at_a_time():
    spec = inventory.from_config({**HYBRID, "torch_dtype": "float32"}, "hybrid")
    assert not spec.unbatched and spec.unbatched_pipeline
    nodes = cluster.synthetic(2, 64 * 10**9)
    concurrency = {}
    for strategy, world in ((pb.PIPELINE, 1), (pb.PIPELINE, 2)):
        chosen = planner.plan(spec, nodes, pb.PlacementRequest(strategy=strategy, ranks=world, context_length=256,
                                                                concurrency=8)).chosen
        concurrency[world] = chosen.concurrency
    assert concurrency == {1: 8, 2: 1}
