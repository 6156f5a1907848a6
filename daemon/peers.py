"""The gRPC side of a node: the PeerService servicer, channel options that
agree on keepalive with the server's, and the link probes."""

import asyncio
import os
import socket
import statistics
import time

import grpc

from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_PING_PAYLOAD = 1024
THROUGHPUT_CHUNK = 64 * 1024
THROUGHPUT_LIMIT = 64 * 1024 * 1024  # per probe, server side
MAX_RECORDS = 1024  # node records per exchange: far above any real cluster

# Clients ping every 10 s when idle; the server allows one every 5 s, so it
# never answers with GOAWAY too_many_pings.
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share it
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def now_ms() -> int:
    return int(time.time() * 1000)


class PeerServicer(pb_grpc.PeerServiceServicer):
    def __init__(self, node):
        self.node = node

    async def _check_cluster(self, cluster_id: str, context) -> None:
        if self.node.view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        if cluster_id != self.node.settings.cluster:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"cluster {cluster_id!r} is not this node's cluster {self.node.settings.cluster!r}")

    async def Exchange(self, request, context):
        await self._check_cluster(request.sender.cluster_id, context)
        if len(request.nodes) > MAX_RECORDS or len(request.links) > 4 * MAX_RECORDS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"over {MAX_RECORDS} records in one exchange")
        if not request.sender.profile.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sender has no node id")
        self.node.absorb(request.sender, request.nodes, request.links, direct=True, work=request.work)
        records, links = self.node.known_records()
        return pb.ExchangeResponse(responder=self.node.record, nodes=records, links=links,
                                   work=self.node.known_work())

    async def Heartbeat(self, request, context):
        await self._check_cluster(request.cluster_id, context)
        self.node.on_heartbeat(request.node_id, request.incarnation, request.version,
                               request.memory_available_bytes, request.memory_reserved_bytes)
        return pb.HeartbeatResponse(node_id=self.node.node_id, incarnation=self.node.incarnation,
                                    version=self.node.record.version,
                                    memory_available_bytes=self.node.available_memory,
                                    memory_reserved_bytes=self.node.ledger.reserved_bytes())

    async def Reserve(self, request, context):
        if self.node.view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        return self.node.reserve(request.reservation)

    async def StartRunner(self, request, context):
        if self.node.view is None or self.node.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting or stopping")
        return await self.node.work.start_runner(request)

    async def Generate(self, request, context):
        async for chunk in self.node.work.generate_here(request.instance_id, request.request):
            yield chunk

    async def Cancel(self, request, context):
        process = self.node.work.processes.get((request.instance_id, 0))
        if process is not None:
            process.send(pb.RunnerCommand(cancel=pb.CancelRequest(request_id=request.request.request_id)))
        return pb.CancelResponse()

    async def StopInstance(self, request, context):
        return pb.StopInstanceResponse(stopped=await self.node.work.stop_instance(request.instance_id))

    async def Release(self, request, context):
        if self.node.view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        return pb.ReleaseResponse(released=self.node.release(request.reservation_id))

    async def Ping(self, request, context):
        if len(request.payload) > MAX_PING_PAYLOAD:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ping payload over {MAX_PING_PAYLOAD} bytes")
        return pb.PingResponse(payload=request.payload, node_id=self.node.node_id)

    async def Throughput(self, request_iterator, context):
        total = 0
        async for chunk in request_iterator:
            total += len(chunk.data)
            if total > THROUGHPUT_LIMIT:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"probe over {THROUGHPUT_LIMIT} bytes")
        return pb.ThroughputResult(bytes=total)

    async def Leave(self, request, context):
        self.node.on_leave(request.node_id, request.incarnation)
        return pb.LeaveResponse()


def local_address_towards(host: str) -> str:
    """The local IP the kernel would use to reach host (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return ""


class WrongNode(Exception):
    pass


async def measure_rtt(stub, expected_node: str, pings: int = 5, timeout_s: float = 1.0) -> float:
    samples = []
    payload = os.urandom(32)
    for _ in range(pings):
        start = time.perf_counter()
        response = await stub.Ping(pb.PingRequest(payload=payload), timeout=timeout_s)
        samples.append(time.perf_counter() - start)
        if response.node_id != expected_node:
            raise WrongNode(f"answered by {response.node_id or 'an unknown node'}")
    return statistics.median(samples)


def valid_address(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536


async def measure_throughput(stub, total_bytes: int, timeout_s: float) -> float:
    block = os.urandom(THROUGHPUT_CHUNK)

    async def chunks():
        for _ in range(total_bytes // THROUGHPUT_CHUNK):
            yield pb.ThroughputChunk(data=block)

    start = time.perf_counter()
    result = await stub.Throughput(chunks(), timeout=timeout_s)
    elapsed = time.perf_counter() - start
    return result.bytes / elapsed if elapsed > 0 else 0.0


def split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def gather_quietly(*aws, timeout: float):
    """Run awaitables together, bounded in time; errors are results."""
    if not aws:
        return []
    try:
        return await asyncio.wait_for(asyncio.gather(*aws, return_exceptions=True), timeout)
    except asyncio.TimeoutError:
        return []


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    """The client-facing API over gRPC: the same answers as the HTTP API."""

    def __init__(self, node):
        self.node = node

    async def State(self, request, context):
        if self.node.view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        return self.node.cluster_state()

    async def Preview(self, request, context):
        from . import placement_api

        if self.node.view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        if not request.model.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        try:
            return await asyncio.to_thread(placement_api.preview, self.node.view, request, self.node.models_dir)
        except placement_api.ModelError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except placement_api.PlanError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def _may_mutate(self, context) -> None:
        from .access import grpc_peer_ip, may_mutate

        metadata = dict(context.invocation_metadata() or ())
        if not may_mutate(grpc_peer_ip(context.peer()), metadata.get("authorization", ""),
                          self.node.settings.api_token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "changing the cluster from another host needs the daemon's bearer token")

    async def CreateInstance(self, request, context):
        from . import placement_api
        from .work import Refused

        await self._may_mutate(context)
        if self.node.view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        if not request.model.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        try:
            return await self.node.work.create(request)
        except placement_api.ModelError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except (placement_api.PlanError, Refused) as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def ListInstances(self, request, context):
        from . import state

        return pb.InstanceList(instances=state.instances(self.node.view))

    async def GetInstance(self, request, context):
        from . import state

        found = state.instance(self.node.view, request.instance_id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {request.instance_id!r}")
        return found

    async def DeleteInstance(self, request, context):
        await self._may_mutate(context)
        try:
            deleted = await self.node.work.delete_anywhere(request.instance_id)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"the owner did not delete it: {e.details()}")
        if not deleted:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {request.instance_id!r}")
        return pb.DeleteInstanceResponse(deleted=request.instance_id)
