"""Per-rank estimates against figures computed by hand from the tiny configs."""

import pytest

from exod.models import inventory, synthetic
from exod.placement import PlanError, plan, planner, profile, synthetic as synthetic_cluster
from exod.placement import constants
from exod.proto import exod_pb2 as pb

CONTEXT = 1000

# qwen3_moe tiny, fp32 (4 bytes): hidden 128, 4 heads x 32, 2 kv heads, layer 0
# dense (intermediate 256), layers 1-3 MoE (8 experts x 128), vocab 512.
EMBED = 512 * 128 * 4
LM_HEAD = 512 * 128 * 4
FINAL_NORM = 128 * 4
ATTN = (128 * 128 + 64 * 128 + 64 * 128 + 128 * 128) * 4  # q, k, v, o
LAYER_NORMS = (128 + 128 + 32 + 32) * 4  # input, post-attention, q_norm, k_norm
DENSE = 3 * 256 * 128 * 4
ROUTER = 8 * 128 * 4
EXPERTS = 3 * 8 * 128 * 128 * 4
KV_PER_TOKEN = 2 * 2 * 32 * 4  # K and V, 2 kv heads x 32, per layer


def fp32(arch):
    return {**synthetic.TINY_CONFIGS[arch], "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def moe():
    return profile(inventory.from_config(fp32("qwen3_moe"), "tiny-moe"))


def settings(concurrency=1):
    return planner.Settings(context=CONTEXT, concurrency=concurrency, headroom=0.0)


def breakdown(model, strategy, n, rank, start, end, concurrency=1):
    memory, _ = planner.rank_memory(model, strategy, n, start, end, settings(concurrency))
    return memory


def test_pipeline_rank_pays_for_what_it_holds(moe):
    first = breakdown(moe, "pipeline", 2, 0, 0, 2)
    assert first.embedding_bytes == EMBED and first.lm_head_bytes == LM_HEAD
    assert first.attention_bytes == 2 * ATTN
    assert first.dense_mlp_bytes == DENSE
    assert first.routed_experts_bytes == EXPERTS and first.router_bytes == ROUTER
    assert first.norm_bytes == 2 * LAYER_NORMS + FINAL_NORM
    assert first.kv_cache_bytes == 2 * KV_PER_TOKEN * CONTEXT
    second = breakdown(moe, "pipeline", 2, 1, 2, 4)
    # Every stage holds the embedding, final norm and lm_head (mlx-lm's pipeline).
    assert second.embedding_bytes == EMBED and second.lm_head_bytes == LM_HEAD
    assert second.weights_bytes == 2 * (ATTN + LAYER_NORMS + ROUTER + EXPERTS) + EMBED + LM_HEAD + FINAL_NORM
    assert second.kv_cache_bytes == 2 * KV_PER_TOKEN * CONTEXT
    assert second.total_bytes == second.weights_bytes + second.kv_cache_bytes + second.overhead_bytes


def test_moe_tensor_replicates_all_but_experts(moe):
    rank = breakdown(moe, "moe_tensor", 2, 1, 0, 4)
    assert rank.embedding_bytes == EMBED and rank.lm_head_bytes == LM_HEAD
    assert rank.attention_bytes == 4 * ATTN
    assert rank.dense_mlp_bytes == DENSE
    assert rank.router_bytes == 3 * ROUTER
    assert rank.routed_experts_bytes == 3 * EXPERTS // 2
    # KV is replicated: every rank runs all of attention.
    assert rank.kv_cache_bytes == 4 * KV_PER_TOKEN * CONTEXT


def test_tensor_splits_heads_mlp_experts_and_kv(moe):
    rank = breakdown(moe, "tensor", 2, 0, 0, 4, concurrency=3)
    assert rank.attention_bytes == 4 * ATTN // 2
    assert rank.dense_mlp_bytes == DENSE // 2
    assert rank.routed_experts_bytes == 3 * EXPERTS // 2
    assert rank.router_bytes == 3 * ROUTER
    assert rank.norm_bytes == 4 * LAYER_NORMS + FINAL_NORM
    assert rank.embedding_bytes == EMBED
    assert rank.kv_cache_bytes == 4 * KV_PER_TOKEN * CONTEXT * 3 // 2


def test_overhead_is_process_base_prefill_activations_and_the_canary_layer(moe):
    widest = max(256, 2 * 128)  # dense intermediate; 2 experts per token x 128
    chunk = min(CONTEXT, constants.PREFILL_CHUNK_TOKENS)
    canary = ATTN + LAYER_NORMS + ROUTER + EXPERTS  # the largest layer, read again whole
    base = constants.PROCESS_BASE_BYTES
    whole = breakdown(moe, "pipeline", 1, 0, 0, 4)  # one rank: no canary, nothing to read twice
    assert whole.overhead_bytes == base + int(chunk * (128 + widest) * constants.ACTIVATION_BYTES_PER_TOKEN_ELEMENT)
    cut = breakdown(moe, "moe_tensor", 2, 0, 0, 4)
    assert cut.overhead_bytes == base + canary + int(
        chunk * (128 + widest // 2) * constants.ACTIVATION_BYTES_PER_TOKEN_ELEMENT)
    # A stage of a 2-rank pipeline: its layers are whole, but the canary still
    # reads the uncut layer it compares with.
    stage = breakdown(moe, "pipeline", 2, 0, 0, 2)
    assert stage.overhead_bytes == whole.overhead_bytes + canary


def test_the_canary_counts_its_float32_copies_of_half_precision_weights():
    """The canary's probes are float32, so a bf16 layer is widened while it
    is checked: its bytes again twice over; a 4-bit layer widens only its
    scales and biases; fp32 widens nothing (the test above)."""
    bf16 = profile(inventory.from_config({**fp32("qwen3_moe"), "torch_dtype": "bfloat16"}, "tiny-bf16"))
    layer = (ATTN + LAYER_NORMS + ROUTER + EXPERTS) // 2
    assert planner.canary_bytes(bf16) == layer + 2 * layer
    q4 = profile(inventory.from_config({**fp32("qwen3_moe"), "torch_dtype": "bfloat16",
                                        "quantization": {"group_size": 32, "bits": 4}}, "tiny-q4"))
    widest = max(q4.layers, key=lambda p: sum(p.full.values()))
    # Per 32 weights: 16 bytes packed, a bf16 scale and bias; norms stay bf16.
    assert 0 < widest.half < sum(widest.full.values()) / 4
    assert planner.canary_bytes(q4) == sum(widest.full.values()) + 2 * widest.half


def test_mla_kv_is_the_latent_and_never_split():
    spec = inventory.from_config(fp32("deepseek_v3"), "tiny-mla")
    assert {k.bytes_per_token for k in spec.kv_cache} == {(64 + 16) * 4}
    model = profile(spec)
    tensor = breakdown(model, "tensor", 2, 0, 0, 4)
    assert tensor.kv_cache_bytes == 4 * (64 + 16) * 4 * CONTEXT


def test_sliding_window_layers_are_capped():
    config = {**fp32("llama"), "sliding_window": 128,
              "layer_types": ["sliding_attention", "full_attention"] * 2}
    spec = inventory.build_spec("sw", config, "config", [])
    model = profile(spec)
    kv = breakdown(model, "pipeline", 1, 0, 0, 4)
    per_token = 2 * 2 * 32 * 4
    assert kv.kv_cache_bytes == 2 * per_token * 128 + 2 * per_token * CONTEXT


def test_deepseek_v4_kv_is_window_plus_compressed_history():
    from exod.models import catalog

    spec = catalog.resolve("deepseek-v4-flash")
    parts = [k for k in spec.kv_cache if k.layer == 2]
    kinds = {k.kind: k for k in parts}
    head_dim = catalog.cards()["deepseek-v4-flash"]["config"]["head_dim"]
    assert kinds["window"].window_tokens == 128 and kinds["window"].bytes_per_token == head_dim * 2
    assert kinds["compressed"].bytes_per_token == pytest.approx(head_dim * 2 / 4)
    assert "index keys" in kinds
    assert {k.kind for k in spec.kv_cache if k.layer == 0} == {"window"}


def test_quantized_tensor_split_needs_whole_groups():
    config = {**synthetic.TINY_CONFIGS["qwen3_moe"], "quantization": {"group_size": 64, "bits": 4}}
    model = profile(inventory.from_config(config, "q"))
    # down_proj has 128 intermediate columns = 2 groups of 64: 2 grains, so 2 ranks fine, 3 or 4 not.
    assert not planner.structural_reasons(model, "moe_tensor", 2)
    reasons = planner.structural_reasons(model, "moe_tensor", 4)
    assert reasons and "only 2 whole grain(s)" in reasons[0] and "fewer than 4 ranks" in reasons[0]


def two_node_cluster(memory):
    return synthetic_cluster(2, memory)


def test_no_fit_names_node_rank_part_and_shortfall():
    from exod.models import catalog

    spec = catalog.resolve("deepseek-v4-flash")
    result = plan(spec, synthetic_cluster(2, 60 * 10**9), pb.PlacementRequest(model="deepseek-v4-flash"))
    assert not result.HasField("chosen")
    pipeline2 = next(c for c in result.candidates if c.strategy == pb.PIPELINE and len(c.ranks) == 2)
    reason = next(r for r in pipeline2.reasons if r.startswith("rank"))
    assert "on node-" in reason and "experts" in reason and "KV" not in reason.split("but")[1]
    assert reason.endswith("GB is usable") and "57.0 GB" in reason  # 60 GB less 5% headroom


def test_forced_impossible_strategy_is_an_error():
    from exod.models import catalog

    spec = catalog.resolve("llama-3.3-70b-4bit")
    with pytest.raises(PlanError, match="moe_tensor needs a mixture-of-experts"):
        plan(spec, two_node_cluster(128 * 10**9), pb.PlacementRequest(strategy=pb.MOE_TENSOR))
    with pytest.raises(PlanError, match="longer than"):
        plan(spec, two_node_cluster(128 * 10**9), pb.PlacementRequest(context_length=10**8))


def test_fewer_nodes_win_within_the_margin():
    from exod.models import catalog

    spec = catalog.resolve("qwen3-30b-a3b-4bit")
    result = plan(spec, synthetic_cluster(4, 128 * 10**9), pb.PlacementRequest())
    assert len(result.chosen.ranks) == 1
    # Forcing the nodes still works.
    forced = plan(spec, synthetic_cluster(4, 128 * 10**9), pb.PlacementRequest(strategy=pb.TENSOR))
    assert forced.chosen.strategy == pb.TENSOR and len(forced.chosen.ranks) >= 2


def test_seed_case_deepseek_v4_flash_on_two_128gb_nodes():
    """The figures quoted in the README come from this plan."""
    from exod.models import catalog

    spec = catalog.resolve("deepseek-v4-flash")
    cluster = synthetic_cluster(2, 128 * 10**9)
    moe_tensor = plan(spec, cluster, pb.PlacementRequest(strategy=pb.MOE_TENSOR)).chosen
    pipeline = plan(spec, cluster, pb.PlacementRequest(strategy=pb.PIPELINE)).chosen
    moe_rank = moe_tensor.ranks[0].memory
    # moe_tensor replicates attention, router, norms, embeddings on both ranks.
    assert moe_rank.attention_bytes == sum(t.bytes for t in spec.tensors if t.tensor_class == pb.ATTENTION)
    assert moe_rank.weights_bytes > max(r.memory.weights_bytes for r in pipeline.ranks) - 5e9
    outside = sum(t.bytes for t in spec.tensors if t.layer < 0)
    assert sum(r.memory.weights_bytes for r in pipeline.ranks) == spec.total_bytes + outside


def test_a_request_can_fix_the_number_of_ranks():
    from exod.models import catalog

    spec = catalog.resolve("qwen3-30b-a3b-4bit")
    result = plan(spec, synthetic_cluster(4, 128 * 10**9), pb.PlacementRequest(ranks=3))
    assert result.candidates and all(len(c.ranks) == 3 for c in result.candidates)
    assert len(result.chosen.ranks) == 3
    with pytest.raises(PlanError, match="exactly 9 ranks"):
        plan(spec, synthetic_cluster(4, 128 * 10**9), pb.PlacementRequest(ranks=9))
