"""What the planner accepts for each tiny model, shared by the coverage walk
(tests/test_strategy_coverage.py) and the equivalence matrix
(tests/test_runner_equivalence.py), which runs every accepted case."""

from functools import lru_cache

from exod.models import inventory, synthetic
from exod.placement import PlanError, plan
from exod.placement import synthetic as synthetic_cluster
from exod.placement.planner import STRATEGY_BY_NAME, STRATEGY_NAMES
from exod.proto import exod_pb2 as pb

STRATEGIES = ("pipeline", "moe_tensor", "tensor", "moe_experts", "hybrid")
WORLDS = (1, 2, 3)
ROOMY = 512 * 10**9  # memory never decides here: only what can run


def planner_accepts(spec: pb.ModelSpec, strategy: str, world: int) -> bool:
    """A candidate of exactly `world` ranks and this strategy with no reason
    against it. One rank is offered as the single-node "pipeline" only."""
    return planned(spec, strategy, world) is not None


def planned(spec: pb.ModelSpec, strategy: str, world: int) -> "pb.Placement | None":
    """The fitting candidate the planner offers, or None."""
    request = pb.PlacementRequest(model=spec.model_id, strategy=STRATEGY_BY_NAME[strategy], ranks=world)
    try:
        result = plan(spec, synthetic_cluster(world, ROOMY), request)
    except PlanError:
        return None
    return next((c for c in result.candidates
                 if c.fits and STRATEGY_NAMES[c.strategy] == strategy and len(c.ranks) == world), None)


def stage_kwargs(name: str, strategy: str, world: int) -> dict:
    """What LocalInstance needs beyond the strategy to run the planner's
    hybrid (its stages, layers per stage and shares); {} for the others."""
    if strategy != "hybrid":
        return {}
    from exod.placement.spec import layout

    fields = layout(planned(inventory.from_config(dict(synthetic.TINY_CONFIGS[name]), name), strategy, world))
    return {"stage_ranks": fields.stage_ranks, "stage_strategy": fields.stage_strategy,
            "pipeline_layers": fields.pipeline_layers, "shares": fields.shares}


@lru_cache(maxsize=None)
def accepted(name: str) -> list[tuple[str, int]]:
    """(strategy, world) the planner accepts for the tiny model `name`, from
    the lazily built class (no checkpoint needed at collection time)."""
    spec = inventory.from_config(dict(synthetic.TINY_CONFIGS[name]), name)
    return [(s, w) for s in STRATEGIES for w in WORLDS if planner_accepts(spec, s, w)]
