"""What every rank's RunnerSpec says of the layout, from a chosen Placement.
Pure: the daemon (daemon/work.py) and the shard planner's callers read the
same fields from one place."""

from dataclasses import dataclass

from exod.proto import exod_pb2 as pb

from .planner import STRATEGY_NAMES


@dataclass(frozen=True)
class Layout:
    strategy: str
    pipeline_layers: list  # layers per pipeline stage: per rank (pipeline), per stage (hybrid)
    shares: list  # each rank's grains of what its strategy cuts (empty: none cut)
    stage_ranks: list  # hybrid: ranks per stage, in rank order
    stage_strategy: str  # hybrid: the cutting strategy inside each stage


def layout(placement: pb.Placement) -> Layout:
    strategy = STRATEGY_NAMES[placement.strategy]
    ranks = placement.ranks
    if strategy == "hybrid":
        # One entry per stage: every rank of a stage holds the stage's range.
        layers, index = [], 0
        for size in placement.stage_ranks:
            first = ranks[index]
            layers.append(first.layer_end - first.layer_start)
            index += size
        return Layout(strategy, layers, [r.share for r in ranks], list(placement.stage_ranks),
                      STRATEGY_NAMES[placement.stage_strategy])
    split = [r.layer_end - r.layer_start for r in ranks] if strategy == "pipeline" else []
    # Grains of a cutting strategy; with an expert layout, each rank's experts per MoE layer.
    shares = [r.share for r in ranks] if strategy != "pipeline" and len(ranks) > 1 else []
    return Layout(strategy, split, shares, [], "")


def stages_text(placement: pb.Placement) -> str:
    """'hybrid: [h0 h1] moe_tensor layers 20-43 | [h2] layers 0-20': each
    stage's nodes and layer range (end excluded, as the rank table shows)."""
    parts, index = [], 0
    inner = STRATEGY_NAMES[placement.stage_strategy] if placement.stage_strategy else "moe_tensor"
    for size in placement.stage_ranks:
        members = placement.ranks[index:index + size]
        if not members:
            break
        names = " ".join(r.node_name or r.node_id for r in members)
        first = members[0]
        cut = f" {inner}" if size > 1 else ""
        parts.append(f"[{names}]{cut} layers {first.layer_start}-{first.layer_end}")
        index += size
    return "hybrid: " + " | ".join(parts)
