"""Placement requests as the APIs take them: validated once, planned on the
node's current view of the cluster, the same for HTTP and gRPC."""

from exod.models import ModelError
from exod.placement import STRATEGY_BY_NAME, STRATEGY_NAMES, PlanError, plan
from exod.proto import exod_pb2 as pb

from . import state

FIELDS = {"model", "context_length", "concurrency", "strategy", "nodes", "ranks", "restart_policy", "max_restarts",
          "prefix_cache_bytes"}
RESTART_POLICIES = {"never": pb.RESTART_NEVER, "replace": pb.RESTART_REPLACE}


class BadRequest(Exception):
    pass


def parse_request(body) -> pb.PlacementRequest:
    """A PlacementRequest from a JSON object, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(FIELDS))})")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required: a Hugging Face repo id, a catalog id, a built-in model or a model directory")
    request = pb.PlacementRequest(model=model.strip())
    for name in ("context_length", "concurrency", "ranks", "max_restarts"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value >= 2**32:
                raise BadRequest(f"{name} must be a positive integer, got {value!r}")
            setattr(request, name, value)
    prefix = body.get("prefix_cache_bytes")
    if prefix is not None:
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < 2**63:
            raise BadRequest(f"prefix_cache_bytes must be a non-negative integer (0: no prefix cache), got {prefix!r}")
        request.prefix_cache_bytes = prefix
    strategy = body.get("strategy")
    if strategy is not None:
        if not isinstance(strategy, str) or strategy not in STRATEGY_BY_NAME:
            raise BadRequest(f"strategy must be one of {', '.join(STRATEGY_BY_NAME)}, got {strategy!r}")
        request.strategy = STRATEGY_BY_NAME[strategy]
    nodes = body.get("nodes")
    if nodes is not None:
        if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
            raise BadRequest("nodes must be a list of node names or ids")
        request.nodes.extend(nodes)
    policy = body.get("restart_policy")
    if policy is not None:
        if not isinstance(policy, str) or policy not in RESTART_POLICIES:
            raise BadRequest(f"restart_policy must be one of {', '.join(RESTART_POLICIES)}, got {policy!r}")
        request.restart_policy = RESTART_POLICIES[policy]
    if request.max_restarts and request.restart_policy != pb.RESTART_REPLACE:
        raise BadRequest("max_restarts needs restart_policy \"replace\"")
    return request


def check_remote_model(model: str) -> None:
    """From another host a model is named by id (a built-in model, a catalog
    id, a Hugging Face repo id or a store name), never by a path: a path
    would let a LAN client make this daemon read any directory it can read,
    and learn which exist. A name that starts like a path (/, ~, . or \\) is
    BadRequest; a name that is no id is an unknown model (ModelError). The
    filesystem is never asked. Loopback clients may still name a model
    directory (models/store.py parses both)."""
    from exod.models import store

    if store.looks_like_path(model):
        raise BadRequest(f"models are named by id from other hosts; {model!r} is a path")
    store.check_remote(model)


async def preview(node, request: pb.PlacementRequest, local: bool,
                  expert_counts: "pb.ExpertCounts | None" = None) -> pb.Plan:
    """Every candidate on the node's current view, with what each rank would
    have to fetch. local: the request comes from this machine (a directory
    may name the model). expert_counts: the routing load to place experts
    by (default: what this node's runners measured for the model). Raises
    ModelError (unknown model) or PlanError (impossible request)."""
    import asyncio

    cluster = state.cluster_for_planner(node.view)  # the view when asked, as the caller saw it
    spec, checkpoint = await node.models.spec(request.model, local)
    counts = expert_counts if expert_counts is not None else node.expert_load.counts(spec.model_id)
    result = await asyncio.to_thread(plan, spec, cluster, request, None, counts)
    return await node.models.annotate(result, checkpoint, cluster)


__all__ = ["BadRequest", "ModelError", "PlanError", "STRATEGY_NAMES", "check_remote_model", "parse_request", "preview"]
