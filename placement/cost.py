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
        if key not in cache:
            cache[key] = hop(links, a, b, backend)
        return cache[key]
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
    gather = (len(hops) - 1) * (max(h.latency_s for h in hops) + message / min(h.bandwidth for h in hops)) + each
    return sends + gather
