"""Cluster descriptions: the daemon's proto JSON, or N identical nodes."""

from google.protobuf import json_format

from exod.proto import exod_pb2 as pb

from .errors import PlanError

# `exod plan --nodes N` without a measured machine: an M-series Max's memory
# bandwidth (Apple's published 400 GB/s for M1/M2 Max, M3/M4 Max 410-546).
DEFAULT_BANDWIDTH = 400e9


def parse_cluster(text: str) -> pb.Cluster:
    try:
        cluster = json_format.Parse(text, pb.Cluster())
    except json_format.ParseError as e:
        raise PlanError(f"cluster JSON: {str(e).splitlines()[0]}") from None
    for node in cluster.nodes:
        if not node.node_id:
            node.node_id = node.name
        if not node.name:
            node.name = node.node_id
        if not node.name:
            raise PlanError("cluster JSON: a node has neither name nor node_id")
    # A file is written by a person: a name given twice is a mistake to point
    # at, not a node to leave out as the planner does with a live view.
    for key in ("name", "node_id"):
        values = [getattr(n, key) for n in cluster.nodes]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise PlanError(f"cluster JSON: duplicate node {twice[0]!r}")
    names = {n.node_id for n in cluster.nodes} | {n.name for n in cluster.nodes}
    for link in cluster.links:
        for end in (link.from_node, link.to_node):
            if end not in names:
                raise PlanError(f"cluster JSON: link names unknown node {end!r}")
    by_name = {n.name: n.node_id for n in cluster.nodes}
    for link in cluster.links:
        link.from_node = by_name.get(link.from_node, link.from_node)
        link.to_node = by_name.get(link.to_node, link.to_node)
    return cluster


def synthetic(count: int, memory_bytes: int, bandwidth: float = DEFAULT_BANDWIDTH) -> pb.Cluster:
    if count <= 0:
        raise PlanError(f"--nodes must be positive, got {count}")
    return pb.Cluster(
        nodes=[
            pb.NodeProfile(
                node_id=f"node-{i + 1}", name=f"node-{i + 1}", memory_total_bytes=memory_bytes,
                memory_usable_bytes=memory_bytes, memory_bandwidth_bytes_per_s=bandwidth,
                backends=["ring"],
            )
            for i in range(count)
        ]
    )
