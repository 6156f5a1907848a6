"""Predicted single-stream decode time per token.

compute: each rank reads its decode bytes at its decode rate, plus a fixed
step cost and a per-layer cost; a node calibrated by `exod calibrate` has
all three measured, otherwise the memory bandwidth and documented defaults
stand in. Ranks of a tensor strategy run in parallel (the slowest sets the
pace); pipeline stages run one after another, and the step and the tensors
outside the layers (every rank computes the logits) once, in parallel.

communication, from the links actually used:
  tensor      2 all-sums per layer of hidden_size activations
  moe_tensor, moe_experts  1 all-sum per MoE layer
  pipeline    one send of hidden_size activations per stage boundary, then
              an all-gather of the last hidden state so that every rank
              computes the logits (mlx-lm's pipeline)
  hybrid      per stage of g >= 2 ranks: its chain all-sums (moe_tensor
              inside: 1 per MoE layer; tensor inside: 2 per layer) x an all-sum along
              the stage's chain (the runner reduces up the chain and sends
              the total back down: 2(g-1) sequential neighbour hops of the
              whole message), plus the stage's input forwarded down the
              chain (g-1 hops); one send per stage boundary (the hop between
              the two stages' adjacent ranks); then pipeline's all-gather
              over every rank. Every hop pays latency + M/bandwidth + the
              collective cost.
              compute: each stage's layers take its slowest rank's time,
              stages run one after another, and the fixed per-step part
              (the step cost, the logits) once, as pipeline counts them.
A ring all-sum of M bytes over N ranks is 2(N-1) neighbour steps of M/N
bytes, each paying the slowest ring edge's one-way latency. Every collective
(all-sum, all-gather, send) also pays the nodes' calibrated collective cost:
MLX's own work per collective, beyond the time on the wire.
"""

from dataclasses import dataclass

from exod.proto import exod_pb2 as pb

from . import constants


@dataclass(frozen=True)
class Hop:
    latency_s: float  # one way
    bandwidth: float  # bytes/s
    measured: bool


def hop(links: dict, a: str, b: str, backend: int, cache: dict | None = None) -> Hop:
    """The link a-b as the backend uses it; cache: hops already made, for
    one plan's many candidates."""
    if cache is not None:
        key = (a, b, backend)
        found = cache.get(key)
        if found is None:
            found = cache[key] = hop(links, a, b, backend)
        return found
    link = links.get((a, b)) or links.get((b, a))
    if link is None:
        return Hop(constants.ASSUMED_LINK_RTT_S / 2, constants.ASSUMED_LINK_BANDWIDTH, False)
    rtt = link.rtt_s
    if backend == pb.JACCL:
        rtt = link.rdma_rtt_s or constants.ASSUMED_RDMA_RTT_S
    return Hop(rtt / 2, link.bandwidth_bytes_per_s or constants.ASSUMED_LINK_BANDWIDTH, True)


def decode_rates(node: pb.NodeProfile) -> tuple[float, float, float]:
    """(bytes/s, step seconds, seconds per layer) for one node."""
    c = node.calibration
    if c.decode_bytes_per_s > 0:
        return c.decode_bytes_per_s, c.step_s, c.layer_s
    return node.memory_bandwidth_bytes_per_s, constants.DEFAULT_STEP_OVERHEAD_S, constants.LAYER_DISPATCH_S


def rank_compute_s(read_bytes: float, layers: int, node: pb.NodeProfile) -> float:
    rate, step, layer = decode_rates(node)
    return read_bytes / rate + step + layers * layer


def collective_s(nodes: list[pb.NodeProfile]) -> float:
    """MLX's cost per collective: the slowest node's, since all wait for it."""
    measured = [n.calibration.collective_s for n in nodes if n.calibration.decode_bytes_per_s > 0]
    return max(measured) if measured else constants.DEFAULT_COLLECTIVE_S


def ring_all_sum_s(hops: list[Hop], message_bytes: float, per_collective_s: float = 0.0) -> float:
    n = len(hops)
    if n < 2:
        return 0.0
    latency = max(h.latency_s for h in hops)
    bandwidth = min(h.bandwidth for h in hops)
    return 2 * (n - 1) * (latency + message_bytes / n / bandwidth) + per_collective_s


def ring_hops(order: list[str], links: dict, backend: int, cache: dict | None = None) -> list[Hop]:
    n = len(order)
    if n < 2:
        return []
    return [hop(links, order[i], order[(i + 1) % n], backend, cache) for i in range(n)]


def communication_s(strategy: str, nodes: list[pb.NodeProfile], links: dict, backend: int, hidden: int,
                    activation_bytes: int, num_layers: int, moe_layers: int, cache: dict | None = None) -> float:
    hops = ring_hops([n.node_id for n in nodes], links, backend, cache)
    if not hops:
        return 0.0
    message = hidden * activation_bytes
    each = collective_s(nodes)
    if strategy == "tensor":
        return 2 * num_layers * ring_all_sum_s(hops, message, each)
    if strategy in ("moe_tensor", "moe_experts"):
        return moe_layers * ring_all_sum_s(hops, message, each)
    sends = sum(h.latency_s + message / h.bandwidth + each for h in hops[: len(hops) - 1])
    return sends + all_gather_s(hops, message, each)


def all_gather_s(hops: list[Hop], message_bytes: float, per_collective_s: float) -> float:
    """The last hidden state gathered on every rank of the ring (mlx-lm's
    pipeline, so that every rank computes the logits)."""
    return (len(hops) - 1) * (max(h.latency_s for h in hops) + message_bytes / min(h.bandwidth for h in hops)) \
        + per_collective_s


def send_s(h: Hop, message_bytes: float, per_collective_s: float) -> float:
    return h.latency_s + message_bytes / h.bandwidth + per_collective_s


def chain_all_sum_s(hops: list[Hop], message_bytes: float, per_collective_s: float) -> float:
    """An all-sum along a chain of len(hops)+1 ranks: the partial sums go up
    the chain and the total comes back down, 2(g-1) sequential neighbour
    sends of the whole message (MLX's ring cannot split a group, so the
    runner sends to neighbours only)."""
    return 2 * sum(send_s(h, message_bytes, per_collective_s) for h in hops)


def hybrid_communication_s(stages: list[list[pb.NodeProfile]], links: dict, backend: int, hidden: int,
                           activation_bytes: int, stage_all_sums: list[int], cache: dict | None = None) -> float:
    """stages in rank order (stage 0 runs the last layers); stage_all_sums:
    the chain all-sums each stage runs (moe_tensor inside: its MoE layers;
    tensor inside: two per layer, hybrid.LayerSums.all_sums)."""
    message = hidden * activation_bytes
    nodes = [node for stage in stages for node in stage]
    total = 0.0
    for stage, count in zip(stages, stage_all_sums):
        if len(stage) < 2:
            continue
        chain = [hop(links, a.node_id, b.node_id, backend, cache) for a, b in zip(stage, stage[1:])]
        each = collective_s(stage)
        total += count * chain_all_sum_s(chain, message, each) + sum(send_s(h, message, each) for h in chain)
    return total + hybrid_fixed_communication_s(stages, links, backend, message, collective_s(nodes), cache)


def hybrid_fixed_communication_s(stages: list[list[pb.NodeProfile]], links: dict, backend: int, message: float,
                                 each: float, cache: dict | None = None) -> float:
    """The part that does not depend on the layers: a send per stage
    boundary, and the all-gather over every rank (as pipeline's)."""
    nodes = [node for stage in stages for node in stage]
    boundaries = [hop(links, a[-1].node_id, b[0].node_id, backend, cache) for a, b in zip(stages, stages[1:])]
    ring = ring_hops([n.node_id for n in nodes], links, backend, cache)
    return sum(send_s(h, message, each) for h in boundaries) + all_gather_s(ring, message, each)
