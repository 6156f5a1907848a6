"""Properties the planner must keep for any model and cluster."""

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exod.models import inventory
from exod.placement import plan, profile
from exod.proto import exod_pb2 as pb

GB = 10**9


def make_spec(layers, hidden, heads, kv_heads, experts, moe_inter, dense_layers, vocab):
    """A qwen3_moe-shaped bf16 model, its tensors sized from the config."""
    head_dim = 128
    config = dict(
        model_type="qwen3_moe", num_hidden_layers=layers, hidden_size=hidden, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=4 * hidden, moe_intermediate_size=moe_inter, num_experts=experts,
        num_experts_per_tok=min(2, experts), max_position_embeddings=32768, torch_dtype="bfloat16",
    )
    entries = []

    def add(name, *shape):
        size = 2
        for d in shape:
            size *= d
        entries.append((name, shape, "bfloat16", size, None))

    add("model.embed_tokens.weight", vocab, hidden)
    add("lm_head.weight", vocab, hidden)
    add("model.norm.weight", hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", heads * head_dim, hidden)
        add(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden)
        add(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        add(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        add(p + "input_layernorm.weight", hidden)
        if i < dense_layers:
            add(p + "mlp.gate_proj.weight", 4 * hidden, hidden)
            add(p + "mlp.up_proj.weight", 4 * hidden, hidden)
            add(p + "mlp.down_proj.weight", hidden, 4 * hidden)
        else:
            add(p + "mlp.gate.weight", experts, hidden)
            add(p + "mlp.switch_mlp.gate_proj.weight", experts, moe_inter, hidden)
            add(p + "mlp.switch_mlp.up_proj.weight", experts, moe_inter, hidden)
            add(p + "mlp.switch_mlp.down_proj.weight", experts, hidden, moe_inter)
    return inventory.build_spec("prop", config, "config", entries)


specs = st.builds(
    make_spec,
    layers=st.integers(2, 24),
    hidden=st.sampled_from([1024, 2048, 4096]),
    heads=st.sampled_from([8, 16, 32]),
    kv_heads=st.sampled_from([2, 4, 8]),
    experts=st.sampled_from([8, 16, 64]),
    moe_inter=st.sampled_from([512, 768, 1024]),
    dense_layers=st.integers(0, 2),
    vocab=st.sampled_from([32000, 151936]),
)


@st.composite
def clusters(draw, max_nodes=4):
    n = draw(st.integers(1, max_nodes))
    nodes = []
    for i in range(n):
        nodes.append(pb.NodeProfile(
            node_id=f"id-{i}", name=f"mac-{i}",
            memory_usable_bytes=draw(st.integers(2, 64)) * GB,
            memory_bandwidth_bytes_per_s=draw(st.sampled_from([100e9, 400e9, 800e9])),
            backends=["ring"],
        ))
    links = []
    for a in nodes:
        for b in nodes:
            if a.node_id < b.node_id and draw(st.booleans()):
                links.append(pb.Link(from_node=a.node_id, to_node=b.node_id,
                                     rtt_s=draw(st.sampled_from([50e-6, 200e-6, 5e-3])),
                                     bandwidth_bytes_per_s=draw(st.sampled_from([37.5e6, 1.2e9, 10e9]))))
    return pb.Cluster(nodes=nodes, links=links)


requests = st.builds(pb.PlacementRequest, context_length=st.sampled_from([512, 4096, 32768]),
                     concurrency=st.integers(1, 4))

SETTINGS = settings(max_examples=int(__import__("os").environ.get("EXOD_HYPOTHESIS_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(specs, clusters(), requests)
def test_pipeline_ranges_cover_every_layer_once(spec, cluster, request):
    result = plan(spec, cluster, request)
    for c in result.candidates:
        if c.strategy != pb.PIPELINE or c.ranks[0].layer_end == 0:
            continue  # structurally impossible candidates hold no layers
        # Rank 0 runs the last layers, as mlx-lm's pipeline does.
        covered = [layer for r in reversed(c.ranks) for layer in range(r.layer_start, r.layer_end)]
        assert covered == list(range(spec.num_layers))
        assert all(r.layer_end > r.layer_start for r in c.ranks)


@SETTINGS
@given(specs, clusters(), requests)
def test_a_chosen_plan_always_fits(spec, cluster, request):
    result = plan(spec, cluster, request)
    if result.HasField("chosen"):
        assert result.chosen.fits
        for r in result.chosen.ranks:
            assert r.memory.total_bytes <= r.usable_bytes
    else:
        assert not any(c.fits for c in result.candidates)


@SETTINGS
@given(specs, st.integers(2, 8), st.sampled_from([512, 8192]), st.integers(1, 4))
def test_moe_tensor_rank_at_least_tensor_rank(spec, n, context, concurrency):
    from exod.placement import planner

    model = profile(spec)
    s = planner.Settings(context, concurrency, 0.0)
    moe, _ = planner.rank_memory(model, "moe_tensor", n, 0, model.num_layers, s)
    tensor, _ = planner.rank_memory(model, "tensor", n, 0, model.num_layers, s)
    assert moe.weights_bytes + moe.kv_cache_bytes >= tensor.weights_bytes + tensor.kv_cache_bytes


@SETTINGS
@given(specs, clusters(), requests, st.data())
def test_more_memory_never_makes_a_request_infeasible(spec, cluster, request, data):
    before = plan(spec, cluster, request)
    richer = copy.deepcopy(cluster)
    node = data.draw(st.sampled_from(list(richer.nodes)))
    node.memory_usable_bytes += data.draw(st.integers(1, 64)) * GB
    after = plan(spec, richer, request)
    if before.HasField("chosen"):
        assert after.HasField("chosen")


@SETTINGS
@given(specs, clusters(), requests)
def test_pipeline_weights_sum_to_the_model(spec, cluster, request):
    result = plan(spec, cluster, request)
    for c in result.candidates:
        if c.strategy == pb.PIPELINE and c.ranks[0].layer_end:
            outside = sum(t.bytes for t in spec.tensors if t.layer < 0)
            assert sum(r.memory.weights_bytes for r in c.ranks) == spec.total_bytes + (len(c.ranks) - 1) * outside
