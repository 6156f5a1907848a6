"""Joining the instance's MLX group with MLX's own backends."""

import hashlib
import hmac
import json
import os
import secrets
import socket
import time
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
    if backend == "ring":
        gather_at_rank0(spec)
    try:
        group = mx.distributed.init(backend=backend, strict=True)
    except RuntimeError as e:
        raise GroupError(f"{backend} init failed: {e}") from e
    if group.size() != spec.world_size or group.rank() != spec.rank:
        raise GroupError(f"joined as rank {group.rank()} of {group.size()}, expected {spec.rank} of {spec.world_size}")
    return group, files


# The ring's last rank connects first, and MLX waits a whole second before it
# tries again when nobody listens yet. Meeting at rank 0's port first means
# everyone enters MLX's init together; the last rank then gives the others
# this long to start listening.
LISTEN_MARGIN_S = 0.03
RETRY_S = 0.01


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _proof(spec: pb.RunnerSpec, rank: int, nonce: bytes) -> bytes:
    message = f"exod rendezvous {spec.instance_id} {rank} ".encode() + nonce
    return hmac.new(spec.rendezvous_secret.encode(), message, hashlib.sha256).hexdigest().encode()


def gather_at_rank0(spec: pb.RunnerSpec) -> None:
    """A barrier before MLX's ring init, on rank 0's own ring port (released
    again before MLX binds it). It waits until every rank is there; the phase
    deadline bounds it, as it bounds the init itself.

    Instance ids are public, so a rank proves it holds the instance's
    rendezvous secret: rank 0 sends a fresh nonce, the rank answers its rank
    and an HMAC-SHA256 of it under the secret. A stranger, or a recorded
    answer replayed, cannot take a rank's place at the barrier."""
    if len(spec.rendezvous_secret) < 32:
        raise GroupError("the spec has no rendezvous secret (its owner hands one out per instance)")
    address = _split(spec.hosts[0])
    if spec.rank == 0:
        _gather(address, spec)
        return
    while True:
        try:
            with socket.create_connection(address, timeout=1.0) as conn:
                nonce = _read_line(conn, NONCE_BYTES * 2 + 1)
                conn.sendall(f"{spec.rank} ".encode() + _proof(spec, spec.rank, nonce) + b"\n")
                conn.settimeout(None)  # the watchdog bounds the wait for the others
                if conn.recv(16).startswith(b"go"):
                    break
        except OSError:
            pass
        time.sleep(RETRY_S)
    if spec.rank == spec.world_size - 1:
        time.sleep(LISTEN_MARGIN_S)


NONCE_BYTES = 16


def _read_line(conn: socket.socket, limit: int) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.strip()


def _gather(address: tuple[str, int], spec: pb.RunnerSpec) -> None:
    arrived: dict[int, socket.socket] = {}
    listener = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(spec.world_size)
        while len(arrived) < spec.world_size - 1:
            conn, _ = listener.accept()
            conn.settimeout(1.0)  # a stranger on the port cannot hold the barrier
            rank = None
            try:
                nonce = secrets.token_hex(NONCE_BYTES).encode()
                conn.sendall(nonce + b"\n")
                claimed, _, proof = _read_line(conn, 80).partition(b" ")
                if claimed.isdigit() and 0 < int(claimed) < spec.world_size \
                        and hmac.compare_digest(proof, _proof(spec, int(claimed), nonce)):
                    rank = int(claimed)
            except (OSError, ConnectionError):
                pass
            if rank is None:
                conn.close()
                continue
            if rank in arrived:
                arrived[rank].close()  # a rank that tried again
            arrived[rank] = conn
        for conn in arrived.values():
            try:
                conn.sendall(b"go\n")
            except OSError:
                pass  # it will retry; MLX's init then notices if it is really gone
    finally:
        for conn in arrived.values():
            conn.close()
        listener.close()
