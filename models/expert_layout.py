"""moe_experts' expert layout: which ranks compute each routed expert, per
MoE layer (proto ExpertLayout). Pure, and importable without MLX: the
planner builds layouts with it, the shard plan and the runner read them
with it.

A layout lists, for every MoE layer, each rank's experts (ascending,
distinct). Every rank holds the same number of experts in every MoE layer
(its share, counted in experts), so its memory is the same whatever the
layer; which experts differs by layer. Every expert is on at least one
rank. An expert on several ranks (replicas) has its slots split among its
holders: within one forward pass, counting the slots routed to it in
token-major order (the tokens flattened, then each token's k slots), the
i-th goes to holder i mod replicas, the holders in ascending rank order.
So every slot is computed by exactly one rank, and the MoE block's all-sum
over the ranks adds each slot once. The rule needs nothing but the routed
indices, which every rank computes identically (the router is replicated),
so the ranks agree on it without exchanging anything."""

from typing import Mapping, Sequence


class LayoutError(ValueError):
    pass


def as_lists(layout) -> dict[int, list[list[int]]]:
    """{layer: [rank 0's experts, rank 1's, ...]} of a pb.ExpertLayout or of
    such a dict already (returned as a copy)."""
    if isinstance(layout, Mapping):
        return {int(layer): [[int(e) for e in s] for s in sets] for layer, sets in layout.items()}
    out: dict[int, list[list[int]]] = {}
    for entry in layout.layers:
        if int(entry.layer) in out:
            raise LayoutError(f"layer {entry.layer} is listed twice")
        out[int(entry.layer)] = [[int(e) for e in s.experts] for s in entry.ranks]
    return out


def validate(layout, num_experts: int, moe_layers: Sequence[int], world: int,
             shares: Sequence[int] = ()) -> dict[int, list[list[int]]]:
    """The layout as {layer: per-rank expert lists}, or LayoutError saying
    what is wrong: a layer that is not one of the model's MoE layers or a
    MoE layer left out, a rank count other than `world`, an expert outside
    [0, num_experts), a set not ascending and distinct, an expert on no
    rank, a rank holding different numbers of experts in different layers,
    or counts other than `shares` (each rank's experts; empty: not checked)."""
    lists = as_lists(layout)
    wanted = sorted(int(i) for i in moe_layers)
    extra = sorted(set(lists) - set(wanted))
    if extra:
        raise LayoutError(f"layer {extra[0]} is not a MoE layer of the model (MoE layers: {wanted})")
    missing = sorted(set(wanted) - set(lists))
    if missing:
        raise LayoutError(f"MoE layer {missing[0]} has no experts listed")
    counts = None
    for layer in wanted:
        sets = lists[layer]
        if len(sets) != world:
            raise LayoutError(f"layer {layer} lists {len(sets)} ranks, not {world}")
        for rank, experts in enumerate(sets):
            out = [e for e in experts if not 0 <= e < num_experts]
            if out:
                raise LayoutError(f"layer {layer}, rank {rank}: expert {out[0]} is outside 0-{num_experts - 1}")
            if len(set(experts)) != len(experts):
                raise LayoutError(f"layer {layer}, rank {rank}: an expert is listed twice in {experts}")
            if experts != sorted(experts):
                raise LayoutError(f"layer {layer}, rank {rank}: experts {experts} are not in ascending order")
            if not experts:
                raise LayoutError(f"layer {layer}, rank {rank}: no experts")
        held = {e for experts in sets for e in experts}
        if len(held) != num_experts:
            lost = min(set(range(num_experts)) - held)
            raise LayoutError(f"layer {layer}: expert {lost} is on no rank")
        these = [len(experts) for experts in sets]
        if counts is None:
            counts = these
        elif these != counts:
            raise LayoutError(f"layer {layer}: ranks hold {these} experts, layer {wanted[0]} {counts}; "
                              f"a rank holds the same number in every MoE layer")
    if shares and counts is not None and [int(s) for s in shares] != counts:
        raise LayoutError(f"ranks hold {counts} experts per layer, not the shares {[int(s) for s in shares]}")
    return lists


def holders(sets: Sequence[Sequence[int]], num_experts: int) -> list[tuple[int, ...]]:
    """Per expert, the ranks holding it in one layer, ascending."""
    out: list[list[int]] = [[] for _ in range(num_experts)]
    for rank, experts in enumerate(sets):
        for e in experts:
            out[int(e)].append(rank)
    return [tuple(h) for h in out]


def slot_ranks(experts, expert_holders: Sequence[Sequence[int]]):
    """The rank that computes each slot of one forward pass of one layer:
    `experts` are the routed expert ids in token-major order (tokens
    flattened, then each token's k slots); the i-th slot routed to an expert
    goes to its holder i mod replicas. A numpy int array (numpy imported
    here, not at the top). An expert with no holder gives -1."""
    import numpy as np

    flat = np.asarray(experts, dtype=np.int64).reshape(-1)
    count = len(expert_holders)
    replicas = np.array([len(h) for h in expert_holders], dtype=np.int64)
    width = max(1, int(replicas.max(initial=1)))
    table = np.full((count, width), -1, dtype=np.int64)
    for e, h in enumerate(expert_holders):
        table[e, :len(h)] = h
    if width == 1:
        return table[flat, 0]
    # Each slot's occurrence number among the slots routed to its expert, in order.
    order = np.argsort(flat, kind="stable")
    ranked = flat[order]
    first = np.searchsorted(ranked, ranked, side="left")
    occurrence = np.empty_like(flat)
    occurrence[order] = np.arange(flat.size) - first
    return table[flat, occurrence % np.maximum(replicas[flat], 1)]


def contiguous(num_experts: int, bounds: Sequence[tuple[int, int]], moe_layers: Sequence[int]) -> dict:
    """The layout of contiguous experts, the same in every layer: rank r
    holds experts [a, b) of bounds[r] (moe_experts without a layout)."""
    return {int(layer): [list(range(a, b)) for a, b in bounds] for layer in moe_layers}


def to_proto(lists: Mapping[int, Sequence[Sequence[int]]]):
    """A pb.ExpertLayout of {layer: per-rank expert lists}, layers in order."""
    from exod.proto import exod_pb2 as pb

    return pb.ExpertLayout(layers=[
        pb.LayerExperts(layer=int(layer), ranks=[pb.ExpertSet(experts=sorted(int(e) for e in s)) for s in sets])
        for layer, sets in sorted(lists.items())])


def rank_experts(lists: Mapping[int, Sequence[Sequence[int]]], rank: int) -> dict[int, list[int]]:
    """{layer: the experts `rank` holds}: what a shard of that rank keeps."""
    return {int(layer): [int(e) for e in sets[rank]] for layer, sets in sorted(lists.items())}
