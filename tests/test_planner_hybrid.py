"""Hybrid placements on the planner side: pipeline across stages cut at the
slowest links, moe_tensor (an MoE model) or tensor (a dense one) inside
each stage of two or more ranks; per-rank
memory exact over each stage's layers; refusals; the runner's layout
fields; the chain all-sum cost."""

import pytest

from exod.models import catalog, inventory, synthetic
from exod.placement import PlanError, constants, cost, hybrid, plan, planner, profile
from exod.placement.profile import hybrid_inner
from exod.placement.planner import Settings
from exod.placement.spec import layout, stages_text
from exod.proto import exod_pb2 as pb

GB = 10**9


def node(name, memory_gb, bandwidth_gbs):
    return pb.NodeProfile(node_id=name, name=name, memory_usable_bytes=int(memory_gb * GB),
                          memory_total_bytes=int(memory_gb * GB),
                          memory_bandwidth_bytes_per_s=bandwidth_gbs * 1e9, backends=["ring"])


def studios_and_macbook(studio_gb, macbook_gb, macbook_first=False, thunderbolt_rtt=50e-6):
    """Two Studios on Thunderbolt (~5 GB/s), a MacBook on Wi-Fi (50 MB/s,
    5 ms one way) to both."""
    nodes = [node("studio-a", studio_gb, 800), node("studio-b", studio_gb, 800), node("macbook", macbook_gb, 400)]
    if macbook_first:  # the fastest node starts the ring: the MacBook, here
        nodes[2] = node("macbook", macbook_gb, 900)
    links = [pb.Link(from_node="studio-a", to_node="studio-b", rtt_s=thunderbolt_rtt, bandwidth_bytes_per_s=5e9),
             pb.Link(from_node="studio-a", to_node="macbook", rtt_s=10e-3, bandwidth_bytes_per_s=50e6),
             pb.Link(from_node="studio-b", to_node="macbook", rtt_s=10e-3, bandwidth_bytes_per_s=50e6)]
    return pb.Cluster(nodes=nodes, links=links)


@pytest.fixture(scope="module")
def flash():
    spec = catalog.resolve("deepseek-v4-flash")
    return spec, profile(spec)


def hybrids(result):
    return [c for c in result.candidates if c.strategy == pb.HYBRID]


def test_hybrid_is_proven_exactly_when_pipeline_and_moe_tensor_are(flash):
    spec, model = flash
    assert "hybrid" in model.proven and "pipeline" in model.proven and "moe_tensor" in model.proven
    narrowed = pb.ModelSpec()
    narrowed.CopyFrom(spec)
    del narrowed.proven_strategies[:]
    narrowed.proven_strategies.extend(["pipeline", "moe_experts"])
    narrowed.refused_strategies["moe_tensor"] = "moe_tensor is not proven here"
    refused = profile(narrowed)
    assert "hybrid" not in refused.proven
    assert "moe_tensor is not proven here" in refused.refused["hybrid"]


def test_the_studios_and_the_macbook_choose_hybrid_when_neither_fits_two_nodes_and_it_is_fastest(flash):
    spec, model = flash
    result = plan(spec, studios_and_macbook(72, 48), pb.PlacementRequest(), model=model)
    chosen = result.chosen
    assert chosen.strategy == pb.HYBRID and chosen.fits
    assert list(chosen.stage_ranks) == [2, 1]  # the Wi-Fi link is the stage boundary
    assert chosen.stage_strategy == pb.MOE_TENSOR
    assert [r.node_name for r in chosen.ranks] == ["studio-a", "studio-b", "macbook"]
    others = [c for c in result.candidates if c.fits and c.strategy != pb.HYBRID]
    assert others and all(c.predicted_decode_tokens_per_s < chosen.predicted_decode_tokens_per_s for c in others)
    assert stages_text(chosen).startswith("hybrid: [studio-a studio-b] moe_tensor layers ")


def test_the_stages_follow_the_links_when_the_macbook_starts_the_ring(flash):
    spec, model = flash
    result = plan(spec, studios_and_macbook(72, 48, macbook_first=True),
                  pb.PlacementRequest(strategy=pb.HYBRID), model=model)
    evaluated = [c for c in hybrids(result) if not c.rejected]
    assert [list(c.stage_ranks) for c in evaluated] == [[1, 2]]
    assert evaluated[0].ranks[0].node_name == "macbook"


def test_a_slower_thunderbolt_hop_makes_pipeline_the_choice(flash):
    """The chain all-sum pays 2 hops per MoE layer: at 200 µs RTT they cost
    more than the cut experts save, and pipeline wins."""
    spec, model = flash
    result = plan(spec, studios_and_macbook(72, 48, thunderbolt_rtt=200e-6), pb.PlacementRequest(), model=model)
    assert result.chosen.strategy == pb.PIPELINE and len(result.chosen.ranks) == 3
    [listed] = hybrids(result)  # a small cluster lists every split
    assert listed.fits and listed.predicted_decode_tokens_per_s < result.chosen.predicted_decode_tokens_per_s


def test_big_studios_take_two_nodes_and_the_hybrid_is_listed_and_fits(flash):
    """The issue's figures: 120 GB Studios hold the model on two nodes,
    which are faster; the hybrid over three is listed, fits, and is slower."""
    spec, model = flash
    result = plan(spec, studios_and_macbook(120, 64), pb.PlacementRequest(), model=model)
    assert len(result.chosen.ranks) == 2
    [listed] = hybrids(result)
    assert listed.fits and list(listed.stage_ranks) == [2, 1]
    assert listed.predicted_decode_tokens_per_s < result.chosen.predicted_decode_tokens_per_s


def test_each_ranks_memory_is_rank_memory_over_its_stage_and_share(flash):
    spec, model = flash
    request = pb.PlacementRequest(strategy=pb.HYBRID)
    chosen = plan(spec, studios_and_macbook(72, 48), request, model=model).chosen
    settings = Settings(chosen.context_length, chosen.concurrency, 0.05, chosen.prefix_cache_tokens)
    of = model.grains["moe_tensor"]
    index = 0
    for size in chosen.stage_ranks:
        stage = chosen.ranks[index:index + size]
        assert sum(r.share for r in stage) == of and all(r.share_of == of for r in stage)
        assert len({(r.layer_start, r.layer_end) for r in stage}) == 1
        for r in stage:
            memory, _ = planner.rank_memory(model, "moe_tensor", of, r.layer_start, r.layer_end, settings,
                                            share=(r.share, of), ranks=len(chosen.ranks))
            assert r.memory == memory
            assert r.fits and r.memory.total_bytes <= r.usable_bytes
        index += size
    # The one-rank stage holds its layers whole, as a pipeline stage does.
    macbook = chosen.ranks[2]
    whole, _ = planner.rank_memory(model, "pipeline", 3, macbook.layer_start, macbook.layer_end, settings, ranks=3)
    assert macbook.memory.weights_bytes == whole.weights_bytes


def test_the_stages_tile_the_layers_and_stage_0_runs_the_last(flash):
    spec, model = flash
    chosen = plan(spec, studios_and_macbook(72, 48), pb.PlacementRequest(), model=model).chosen
    ranges, index = [], 0
    for size in chosen.stage_ranks:
        ranges.append((chosen.ranks[index].layer_start, chosen.ranks[index].layer_end))
        index += size
    assert ranges[0][1] == model.num_layers
    assert ranges[-1][0] == 0
    assert all(a[0] == b[1] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))


def test_hybrid_on_two_nodes_is_refused(flash):
    spec, model = flash
    cluster = pb.Cluster(nodes=[node("a", 120, 800), node("b", 120, 800)])
    with pytest.raises(PlanError, match="hybrid needs at least 3 ranks: on 2 it is pipeline or moe_tensor"):
        plan(spec, cluster, pb.PlacementRequest(strategy=pb.HYBRID), model=model)


@pytest.fixture(scope="module")
def llama():
    spec = catalog.resolve("llama-3.3-70b-4bit")
    return spec, profile(spec)


def test_a_dense_model_gets_tensor_inside_its_stages(llama):
    """Two Studios on Thunderbolt, a MacBook on Wi-Fi: the dense model's
    hybrid cuts the Studios' stage with tensor (its one inner cut), the
    Wi-Fi link between the stages."""
    spec, model = llama
    assert "hybrid" in model.proven and "moe_tensor" not in model.proven
    result = plan(spec, studios_and_macbook(72, 48), pb.PlacementRequest(strategy=pb.HYBRID), model=model)
    evaluated = [c for c in hybrids(result) if not c.rejected]
    assert [list(c.stage_ranks) for c in evaluated] == [[2, 1]]
    chosen = result.chosen
    assert chosen.stage_strategy == pb.TENSOR and chosen.fits
    assert [r.node_name for r in chosen.ranks] == ["studio-a", "studio-b", "macbook"]
    assert stages_text(chosen).startswith("hybrid: [studio-a studio-b] tensor layers ")


def test_a_dense_hybrids_memory_is_tensors_over_its_stage_and_share(llama):
    spec, model = llama
    chosen = plan(spec, studios_and_macbook(72, 48), pb.PlacementRequest(strategy=pb.HYBRID), model=model).chosen
    settings = Settings(chosen.context_length, chosen.concurrency, 0.05, chosen.prefix_cache_tokens)
    of = model.grains["tensor"]
    ranges, index = [], 0
    for size in chosen.stage_ranks:
        stage = chosen.ranks[index:index + size]
        assert sum(r.share for r in stage) == of and all(r.share_of == of for r in stage)
        assert len({(r.layer_start, r.layer_end) for r in stage}) == 1
        for r in stage:
            memory, _ = planner.rank_memory(model, "tensor", of, r.layer_start, r.layer_end, settings,
                                            share=(r.share, of), ranks=len(chosen.ranks))
            assert r.memory == memory and r.memory.total_bytes <= r.usable_bytes
        ranges.append((stage[0].layer_start, stage[0].layer_end))
        index += size
    # Tensor cuts the KV cache by KV-head groups: the Studios each hold their share of it.
    studio, macbook = chosen.ranks[0], chosen.ranks[2]
    whole, _ = planner.rank_memory(model, "pipeline", 3, studio.layer_start, studio.layer_end, settings, ranks=3)
    assert studio.memory.kv_cache_bytes < whole.kv_cache_bytes
    alone, _ = planner.rank_memory(model, "pipeline", 3, macbook.layer_start, macbook.layer_end, settings, ranks=3)
    assert macbook.memory.weights_bytes == alone.weights_bytes
    assert macbook.memory.kv_cache_bytes == alone.kv_cache_bytes
    # The stages tile the layers, stage 0 the last ones.
    assert ranges[0][1] == model.num_layers and ranges[-1][0] == 0
    assert all(a[0] == b[1] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))


def test_a_dense_hybrid_pays_two_chain_all_sums_per_layer(llama):
    spec, model = llama
    cluster = studios_and_macbook(72, 48)
    chosen = plan(spec, cluster, pb.PlacementRequest(strategy=pb.HYBRID), model=model).chosen
    message = model.hidden_size * model.activation_bytes
    fast = cost.send_s(cost.Hop(25e-6, 5e9, True), message, 0.0)
    slow = cost.send_s(cost.Hop(5e-3, 50e6, True), message, 0.0)
    studios = chosen.ranks[0]
    layers = studios.layer_end - studios.layer_start
    gather = 2 * (5e-3 + message / 50e6)
    # Two all-sums per layer, each up and down the two-rank chain; the forward; the boundary; the gather.
    assert chosen.predicted_communication_s == pytest.approx(2 * layers * 2 * fast + fast + slow + gather)


def test_the_dense_runner_layout_cuts_its_stages_with_tensor(llama):
    spec, model = llama
    chosen = plan(spec, studios_and_macbook(72, 48), pb.PlacementRequest(strategy=pb.HYBRID), model=model).chosen
    fields = layout(chosen)
    assert fields.strategy == "hybrid" and fields.stage_strategy == "tensor"
    assert fields.stage_ranks == [2, 1] and sum(fields.pipeline_layers) == model.num_layers
    assert fields.shares[2] == model.grains["tensor"] and sum(fields.shares[:2]) == model.grains["tensor"]


def test_a_dense_model_without_tensor_refuses_hybrid():
    """phi3: tensor is not proven, and a dense model has no moe_tensor: no cut for the stages."""
    spec = inventory.from_config(dict(synthetic.TINY_CONFIGS["phi3"]), "phi3")
    model = profile(spec)
    assert "tensor" not in model.proven and "hybrid" not in model.proven
    cluster = pb.Cluster(nodes=[node(f"n{i}", 64, 400) for i in range(3)])
    with pytest.raises(PlanError, match="hybrid needs moe_tensor or tensor inside its stages: .*tensor is not proven"):
        plan(spec, cluster, pb.PlacementRequest(strategy=pb.HYBRID), model=model)
    assert not hybrids(plan(spec, cluster, pb.PlacementRequest(), model=model))


def test_the_inner_cut_is_the_models_one():
    assert hybrid_inner(True, {"pipeline", "moe_tensor", "tensor"}) == "moe_tensor"
    assert hybrid_inner(True, {"pipeline", "tensor"}) == "tensor"  # moe_tensor refused
    assert hybrid_inner(False, {"pipeline", "moe_tensor", "tensor"}) == "tensor"
    assert hybrid_inner(False, {"pipeline"}) is None


def test_the_runner_layout_has_one_pipeline_entry_per_stage(flash):
    spec, model = flash
    chosen = plan(spec, studios_and_macbook(72, 48), pb.PlacementRequest(), model=model).chosen
    fields = layout(chosen)
    assert fields.strategy == "hybrid" and fields.stage_strategy == "moe_tensor"
    assert fields.stage_ranks == [2, 1]
    assert len(fields.pipeline_layers) == 2 and sum(fields.pipeline_layers) == model.num_layers
    assert fields.pipeline_layers == [chosen.ranks[0].layer_end - chosen.ranks[0].layer_start,
                                      chosen.ranks[2].layer_end - chosen.ranks[2].layer_start]
    assert fields.shares == [r.share for r in chosen.ranks] and fields.shares[2] == model.grains["moe_tensor"]


def test_pipeline_and_cut_layouts_are_unchanged(flash):
    spec, model = flash
    cluster = studios_and_macbook(72, 48)
    pipe = plan(spec, cluster, pb.PlacementRequest(strategy=pb.PIPELINE, ranks=3), model=model).chosen
    assert layout(pipe).pipeline_layers == [r.layer_end - r.layer_start for r in pipe.ranks]
    assert layout(pipe).shares == [] and layout(pipe).stage_ranks == []


def test_the_order_is_cut_at_its_slowest_links():
    assert hybrid.stage_splits([1.0, 5.0, 2.0, 0.5]) == [[2, 3], [2, 1, 2], [1, 1, 1, 2]]
    assert hybrid.stage_splits([1.0]) == []


def test_the_chain_all_sum_is_two_sequential_hops_per_link():
    hops = [cost.Hop(1e-4, 1e9, True), cost.Hop(2e-4, 2e9, True)]
    message = 8192
    expected = 2 * ((1e-4 + message / 1e9 + 1e-5) + (2e-4 + message / 2e9 + 1e-5))
    assert cost.chain_all_sum_s(hops, message, 1e-5) == pytest.approx(expected)


def test_the_communication_adds_chain_all_sums_forwards_boundary_sends_and_the_gather(flash):
    spec, model = flash
    cluster = studios_and_macbook(72, 48)
    chosen = plan(spec, cluster, pb.PlacementRequest(), model=model).chosen
    links = {(link.from_node, link.to_node): link for link in cluster.links}
    message = model.hidden_size * model.activation_bytes
    fast = cost.send_s(cost.Hop(25e-6, 5e9, True), message, 0.0)
    slow = cost.send_s(cost.Hop(5e-3, 50e6, True), message, 0.0)
    studios = chosen.ranks[0]
    moe = sum(1 for i in model.moe_layer_ids if studios.layer_start <= i < studios.layer_end)
    gather = 2 * (5e-3 + message / 50e6)  # 3 ranks, the slowest ring hop
    assert chosen.predicted_communication_s == pytest.approx(moe * 2 * fast + fast + slow + gather)
    nodes = {n.node_id: n for n in cluster.nodes}
    stages = [[nodes["studio-a"], nodes["studio-b"]], [nodes["macbook"]]]
    assert cost.hybrid_communication_s(stages, links, pb.RING, model.hidden_size, model.activation_bytes,
                                       [moe, 0]) == pytest.approx(chosen.predicted_communication_s)


@pytest.mark.parametrize("model_id,least_left_out", [("deepseek-v3.1-4bit", 50), ("llama-3.3-70b-4bit", 1)])
def test_the_bound_never_leaves_out_a_split_that_could_be_chosen(monkeypatch, model_id, least_left_out):
    """On the planning bench's 16 Macs (Thunderbolt pairs, Ethernet and
    Wi-Fi), every hybrid split evaluated anyway (no margin: nothing is left
    out) that the plan left out is slower than the chosen placement by more
    than the fewer-nodes margin: with moe_tensor inside the stages (an MoE
    model) and with tensor (a dense one, two chain all-sums a layer)."""
    from bench.planning import cluster

    spec = catalog.resolve(model_id)
    model = profile(spec)
    macs = cluster(16)
    request = pb.PlacementRequest(context_length=32768)
    result = plan(spec, macs, request, model=model)
    kept = {(tuple(r.node_id for r in c.ranks), tuple(c.stage_ranks), c.backend) for c in hybrids(result)}
    forced = pb.PlacementRequest()
    forced.CopyFrom(request)
    forced.strategy = pb.HYBRID
    monkeypatch.setattr(constants, "FEWER_NODES_MARGIN", 1.0)  # every split within reach: none left out
    every = [c for c in hybrids(plan(spec, macs, forced, model=model)) if not c.rejected]
    left_out = [c for c in every if (tuple(r.node_id for r in c.ranks), tuple(c.stage_ranks), c.backend) not in kept]
    assert len(left_out) >= least_left_out
    best = result.chosen.predicted_decode_tokens_per_s
    assert all(c.predicted_decode_tokens_per_s < best * 0.95 for c in left_out if c.fits)
