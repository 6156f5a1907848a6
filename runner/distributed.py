"""Joining the instance's MLX group with MLX's own backends."""

import json
import os
from pathlib import Path

import mlx.core as mx

from exod.proto import exod_pb2 as pb


class GroupError(Exception):
    pass


def init_group(spec: pb.RunnerSpec, workdir: Path):
    """The rank's group (None for a single rank) and the files written for it.

    ring: a hostfile naming the address each rank listens on; rank r accepts
    from its ring neighbours. jaccl: the RDMA device matrix and rank 0's
    coordinator address."""
    if spec.world_size <= 1:
        return None, []
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / f"{spec.instance_id or 'instance'}-rank{spec.rank}"
    os.environ["MLX_RANK"] = str(spec.rank)
    os.environ["MLX_WORLD_SIZE"] = str(spec.world_size)
    files = []
    if spec.backend in (pb.RING, pb.BACKEND_UNSPECIFIED):
        if len(spec.hosts) != spec.world_size:
            raise GroupError(f"ring needs {spec.world_size} host addresses, got {len(spec.hosts)}")
        hostfile = Path(f"{prefix}.hosts.json")
        hostfile.write_text(json.dumps([[h] for h in spec.hosts]))
        files.append(hostfile)
        os.environ["MLX_HOSTFILE"] = str(hostfile)
        backend = "ring"
    elif spec.backend == pb.JACCL:
        if not spec.coordinator or len(spec.rdma_devices) != spec.world_size:
            raise GroupError("jaccl needs a coordinator and one RDMA device row per rank")
        devices = Path(f"{prefix}.ibv.json")
        matrix = [[d or None for d in row.split(",")] for row in spec.rdma_devices]
        devices.write_text(json.dumps(matrix))
        files.append(devices)
        os.environ["MLX_IBV_DEVICES"] = str(devices)
        os.environ["MLX_JACCL_COORDINATOR"] = spec.coordinator
        backend = "jaccl"
    else:
        raise GroupError(f"unknown backend {spec.backend}")
    try:
        group = mx.distributed.init(backend=backend, strict=True)
    except RuntimeError as e:
        raise GroupError(f"{backend} init failed: {e}") from e
    if group.size() != spec.world_size or group.rank() != spec.rank:
        raise GroupError(f"joined as rank {group.rank()} of {group.size()}, expected {spec.rank} of {spec.world_size}")
    return group, files
