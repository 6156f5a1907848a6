"""The planner's per-rank estimate tracks what a rank really uses: on the
mid-size synthetic MoE (about 1.4 GB), each strategy's measured peak resident
memory per rank, after Ready and after a request that fills the context, is
within 10% of the estimate the planner made for that rank (hybrid: a stage
of two ranks cutting the experts of its layers, a stage of one)."""

import pytest

from exod.models import inventory, synthetic
from exod.placement import cluster, planner
from exod.placement.spec import layout
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

CONTEXT = 256
TOLERANCE = 0.10


@pytest.fixture(scope="module")
def midsize(tmp_path_factory):
    return synthetic.ensure_named("midsize-moe", tmp_path_factory.mktemp("models"))


def placement_for(spec, strategy, world):
    nodes = cluster.synthetic(world, 64 * 10**9)
    plan = planner.plan(spec, nodes, pb.PlacementRequest(strategy=pb.Strategy.Value(strategy.upper()),
                                                         context_length=CONTEXT))
    return next(c for c in plan.candidates if len(c.ranks) == world and c.fits)


@pytest.mark.parametrize("strategy,world", [("moe_tensor", 2), ("pipeline", 2), ("pipeline", 3), ("tensor", 2),
                                            ("hybrid", 3)])
def test_measured_peak_per_rank_is_within_10_percent_of_the_estimate(midsize, strategy, world):
    placement = placement_for(inventory.from_directory(midsize), strategy, world)
    estimates = [r.memory.total_bytes for r in placement.ranks]
    fields = layout(placement)  # as the daemon writes each rank's spec
    with LocalInstance(midsize, strategy, world, pipeline_layers=fields.pipeline_layers, shares=fields.shares,
                       stage_ranks=fields.stage_ranks, stage_strategy=fields.stage_strategy,
                       estimated_bytes=estimates, context_length=CONTEXT) as instance:
        instance.wait_ready(300)
        request = pb.GenerateRequest(request_id="fill", prompt_tokens=[5] * 96,
                                     sampling=pb.SamplingParams(max_tokens=CONTEXT - 96, ignore_eos=True))
        assert instance.generate(request, timeout=300)[-1].finish_reason == pb.FINISH_LENGTH
        assert instance.wait_for(lambda i: all(s == pb.READY for s in i.states()), 10)
        for rank, statuses in zip(instance.ranks, instance.statuses):
            after = statuses[-1]
            assert after.state == pb.READY and after.estimated_bytes == estimates[rank.spec.rank]
            ratio = after.peak_rss_bytes / after.estimated_bytes
            assert abs(ratio - 1) <= TOLERANCE, (
                f"rank {rank.spec.rank}: peak {after.peak_rss_bytes / 1e6:.0f} MB, "
                f"estimate {after.estimated_bytes / 1e6:.0f} MB")
        instance.shutdown()
