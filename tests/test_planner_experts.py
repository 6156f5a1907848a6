"""moe_experts placed by routing load on the planner side: the assignment
(placement/experts.py) and what the planner does with measured counts."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exod.models import catalog
from exod.placement import experts, plan
from exod.proto import exod_pb2 as pb

from .test_planner_uneven import node


def skewed(count: int, seed: int, alpha: float = 1.1) -> list[float]:
    rng = random.Random(seed)
    raw = [rng.paretovariate(alpha) for _ in range(count)]
    return [x / sum(raw) for x in raw]


def test_uniform_counts_are_uniform_and_bad_counts_are_refused():
    assert experts.frequencies([0] * 4, 4) == [0.25] * 4
    assert experts.frequencies([3, 1], 2) == [0.75, 0.25]
    with pytest.raises(experts.LayoutError, match="3 counts for 4 experts"):
        experts.frequencies([1, 2, 3], 4)


def test_hot_experts_are_spread_so_no_rank_takes_them_all():
    # The four hottest of 16 experts first: a contiguous split puts them all on rank 0.
    freq = [0.2] * 4 + [0.2 / 12] * 12
    contiguous = experts.loads(freq, experts.contiguous(16, [8, 8]))[1]
    placed = experts.assign_layer(freq, [8, 8], [1.0, 1.0])
    single = experts.loads(freq, placed)[1]
    assert experts.imbalance([contiguous], [1, 1]) > 1.7
    assert experts.imbalance([single], [1, 1]) < 1.01
    assert sorted(e for ids in placed for e in ids) == list(range(16))
    assert [sum(1 for e in ids if e < 4) for ids in placed] == [2, 2]


def test_a_faster_rank_takes_more_of_the_load():
    freq = skewed(32, seed=3)
    placed = experts.assign_layer(freq, [16, 16], [2.0, 1.0])
    batched, _ = experts.loads(freq, placed)
    assert batched[0] > 0.6  # two thirds is balanced
    assert experts.imbalance([batched], [2.0, 1.0]) < 1.1


def test_replicas_go_to_the_hottest_experts_on_distinct_ranks_and_split_their_load():
    freq = [0.5] + [0.5 / 15] * 15
    holders = experts.replicas(freq, 2, ranks=3)
    assert holders[0] == 3 and sum(holders) == 18
    placed = experts.assign_layer(freq, [6, 6, 6], [1, 1, 1])
    assert all(0 in ids for ids in placed)
    batched, single = experts.loads(freq, placed)
    assert experts.imbalance([batched], [1, 1, 1]) < 1.05
    # One token's slot goes to the first holder: replicas do not help a single stream.
    assert single[0] >= 0.5
    with pytest.raises(experts.LayoutError, match="hold at most"):
        experts.replicas(freq, 16 * 2 + 1, ranks=3)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 48), st.integers(2, 6), st.integers(0, 10**6), st.data())
def test_every_layout_is_valid(count, n, seed, data):
    """Every expert on at least one rank, each rank exactly its share,
    no expert twice on a rank, whatever the shares and the skew."""
    n = min(n, count)
    extra = data.draw(st.integers(0, count * (n - 1)))
    base = [1] * n
    for _ in range(count + extra - n):
        base[data.draw(st.integers(0, n - 1))] += 1
    shares = [min(s, count) for s in base]
    while sum(shares) < count + extra:  # put back what the cap at `count` took
        shares[shares.index(min(shares))] += 1
    speed = [data.draw(st.floats(0.25, 4.0)) for _ in range(n)]
    freq = skewed(count, seed)
    placed = experts.assign_layer(freq, shares, speed)
    assert [len(ids) for ids in placed] == shares
    assert all(len(set(ids)) == len(ids) for ids in placed)
    assert set().union(*map(set, placed)) == set(range(count))
    batched, single = experts.loads(freq, placed)
    assert sum(batched) == pytest.approx(1.0) and sum(single) == pytest.approx(1.0)


def counts_for(spec: pb.ModelSpec, freq_of_layer) -> pb.ExpertCounts:
    layers = sorted({t.layer for t in spec.tensors if t.tensor_class == pb.ROUTED_EXPERTS and t.layer >= 0})
    out = pb.ExpertCounts()
    for layer in layers:
        out.layers.add(layer=layer, counts=[int(f * 10**6) for f in freq_of_layer(layer)])
    return out


def test_measured_counts_give_moe_experts_a_layout_that_beats_the_even_split():
    spec = catalog.resolve("qwen3-30b-a3b-4bit")
    cluster = pb.Cluster(nodes=[node("a", 64, 400), node("b", 64, 400)])
    request = pb.PlacementRequest(strategy=pb.MOE_EXPERTS, ranks=2, concurrency=1)
    uniform = plan(spec, cluster, request).chosen
    assert not uniform.HasField("expert_layout") and uniform.predicted_routing_imbalance == 0
    # Every layer prefers its first eight experts, which an even split puts on rank 0.
    hot = [0.1] * 8 + [0.2 / (spec.num_experts - 8)] * (spec.num_experts - 8)
    chosen = plan(spec, cluster, request, expert_counts=counts_for(spec, lambda _: hot)).chosen
    layout = chosen.expert_layout
    assert len(layout.layers) == spec.num_layers
    for layer in layout.layers:
        ids = [list(s.experts) for s in layer.ranks]
        assert sorted(e for r in ids for e in r) == list(range(spec.num_experts))
        assert [sum(1 for e in r if e < 8) for r in ids] == [4, 4]
    assert [r.share for r in chosen.ranks] == [spec.num_experts // 2] * 2
    assert [r.share_of for r in chosen.ranks] == [spec.num_experts] * 2
    assert chosen.predicted_routing_imbalance < 1.02
    # The contiguous split would put 89% of the routed reads on rank 0; the
    # layout is predicted as fast as uniform routing.
    contiguous = experts.loads(hot, experts.contiguous(spec.num_experts, [64, 64]))[1]
    assert experts.imbalance([contiguous], [1, 1]) > 1.75
    assert chosen.predicted_decode_tokens_per_s == pytest.approx(uniform.predicted_decode_tokens_per_s, rel=0.02)
    # Memory is the same as the even split's: the same count of whole experts per rank.
    assert [r.memory.routed_experts_bytes for r in chosen.ranks] == \
        [r.memory.routed_experts_bytes for r in uniform.ranks]


def test_replicas_are_added_for_batches_where_memory_allows_and_never_beyond_it():
    spec = catalog.resolve("qwen3-30b-a3b-4bit")
    one_very_hot = [0.3] + [0.7 / (spec.num_experts - 1)] * (spec.num_experts - 1)
    counts = counts_for(spec, lambda _: one_very_hot)
    roomy = pb.Cluster(nodes=[node("a", 64, 400), node("b", 64, 400)])
    batched = plan(spec, roomy, pb.PlacementRequest(strategy=pb.MOE_EXPERTS, ranks=2, concurrency=8),
                   expert_counts=counts).chosen
    shares = [r.share for r in batched.ranks]
    assert sum(shares) > spec.num_experts, "a replica of the hot expert"
    for layer in batched.expert_layout.layers:
        assert all(0 in s.experts for s in layer.ranks)
    assert all(r.fits for r in batched.ranks)
    single = plan(spec, roomy, pb.PlacementRequest(strategy=pb.MOE_EXPERTS, ranks=2, concurrency=1),
                  expert_counts=counts).chosen
    assert sum(r.share for r in single.ranks) == spec.num_experts, "one stream gains nothing from replicas"
    # Just enough memory for the model cut in two: no room for a replica.
    tight_gb = max(r.memory.total_bytes for r in single.ranks) / 1e9 * 1.01 / 0.9
    tight = pb.Cluster(nodes=[node("a", tight_gb, 400), node("b", tight_gb, 400)])
    cramped = plan(spec, tight, pb.PlacementRequest(strategy=pb.MOE_EXPERTS, ranks=2, concurrency=1,
                                                    headroom_fraction=0.1),
                   expert_counts=counts).chosen
    assert sum(r.share for r in cramped.ranks) == spec.num_experts and cramped.fits
