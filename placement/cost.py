"""Predicted single-stream decode time per token.

compute: each rank reads its decode bytes from memory at its bandwidth, plus
a fixed step cost and a per-layer dispatch cost. Ranks of a tensor strategy
run in parallel (the slowest sets the pace); pipeline stages run one after
another.

communication, from the links actually used:
  tensor      2 all-sums per layer of hidden_size activations
  moe_tensor  1 all-sum per MoE layer
  pipeline    one send of hidden_size activations per stage boundary, then
              an all-gather of the last hidden state so that every rank
              computes the logits (mlx-lm's pipeline)
A ring all-sum of M bytes over N ranks is 2(N-1) neighbour steps of M/N
bytes, each paying the slowest ring edge's one-way latency.
"""

from dataclasses import dataclass

from exod.proto import exod_pb2 as pb

from . import constants


@dataclass(frozen=True)
class Hop:
    latency_s: float  # one way
    bandwidth: float  # bytes/s
    measured: bool


def hop(links: dict, a: str, b: str, backend: int) -> Hop:
    link = links.get((a, b)) or links.get((b, a))
    if link is None:
        return Hop(constants.ASSUMED_LINK_RTT_S / 2, constants.ASSUMED_LINK_BANDWIDTH, False)
    rtt = link.rtt_s
    if backend == pb.JACCL:
        rtt = link.rdma_rtt_s or constants.ASSUMED_RDMA_RTT_S
    return Hop(rtt / 2, link.bandwidth_bytes_per_s or constants.ASSUMED_LINK_BANDWIDTH, True)


def rank_compute_s(read_bytes: float, layers: int, node: pb.NodeProfile) -> float:
    step = node.decode_step_overhead_s or constants.DEFAULT_STEP_OVERHEAD_S
    return read_bytes / node.memory_bandwidth_bytes_per_s + step + layers * constants.LAYER_DISPATCH_S


def ring_all_sum_s(hops: list[Hop], message_bytes: float) -> float:
    n = len(hops)
    if n < 2:
        return 0.0
    latency = max(h.latency_s for h in hops)
    bandwidth = min(h.bandwidth for h in hops)
    return 2 * (n - 1) * (latency + message_bytes / n / bandwidth)


def ring_hops(order: list[str], links: dict, backend: int) -> list[Hop]:
    n = len(order)
    if n < 2:
        return []
    return [hop(links, order[i], order[(i + 1) % n], backend) for i in range(n)]


def communication_s(strategy: str, order: list[str], links: dict, backend: int, hidden: int,
                    activation_bytes: int, num_layers: int, moe_layers: int) -> float:
    hops = ring_hops(order, links, backend)
    if not hops:
        return 0.0
    message = hidden * activation_bytes
    if strategy == "tensor":
        return 2 * num_layers * ring_all_sum_s(hops, message)
    if strategy == "moe_tensor":
        return moe_layers * ring_all_sum_s(hops, message)
    sends = sum(h.latency_s + message / h.bandwidth for h in hops[: len(hops) - 1])
    gather = (len(hops) - 1) * (max(h.latency_s for h in hops) + message / min(h.bandwidth for h in hops))
    return sends + gather
