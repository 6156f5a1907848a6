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

from .transport import caller_id

MAX_PING_PAYLOAD = 1024
THROUGHPUT_CHUNK = 64 * 1024
THROUGHPUT_LIMIT = 64 * 1024 * 1024  # per probe, server side
MAX_RECORDS = 256  # node records per exchange: far above any real cluster (max_members is 64)


def now_ms() -> int:
    return int(time.time() * 1000)


class PeerServicer(pb_grpc.PeerServiceServicer):
    """Every caller has proven a certificate of the cluster CA (the server
    refuses the handshake otherwise), and which node it is: the hash of
    that certificate's key. Whatever a request says about who sends it must
    be that node; what changes another node's state must come from a member
    the view holds, and from the node that owns what it touches."""

    def __init__(self, node):
        self.node = node

    async def _caller(self, context, member: bool = True) -> str:
        """The proven id of the caller, which must be a member when `member`."""
        if self.node.view is None or self.node.identity is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        caller = caller_id(context)
        if not caller:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        if member and caller != self.node.node_id and self.node.view.member(caller) is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a member of this node's view")
        return caller

    async def _check_cluster(self, cluster_id: str, context) -> None:
        if cluster_id != self.node.settings.cluster:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"cluster {cluster_id!r} is not this node's cluster {self.node.settings.cluster!r}")

    async def _claims(self, caller: str, node_id: str, context) -> None:
        if node_id != caller:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"speaks for node {node_id[:32]!r} but proved {caller}")

    async def Exchange(self, request, context):
        caller = await self._caller(context, member=False)  # how a new member is met
        await self._check_cluster(request.sender.cluster_id, context)
        if len(request.nodes) > MAX_RECORDS or len(request.links) > 4 * MAX_RECORDS \
                or len(request.work) > MAX_RECORDS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"over {MAX_RECORDS} records in one exchange")
        if not request.sender.profile.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sender has no node id")
        await self._claims(caller, request.sender.profile.node_id, context)
        self.node.absorb(request.sender, request.nodes, request.links, direct=True, work=request.work)
        records, links = self.node.known_records()
        return pb.ExchangeResponse(responder=self.node.record, nodes=records, links=links,
                                   work=self.node.known_work())

    async def Heartbeat(self, request, context):
        caller = await self._caller(context, member=False)
        await self._check_cluster(request.cluster_id, context)
        await self._claims(caller, request.node_id, context)
        self.node.on_heartbeat(request.node_id, request.incarnation, request.version,
                               request.memory_available_bytes, request.memory_reserved_bytes)
        return pb.HeartbeatResponse(node_id=self.node.node_id, incarnation=self.node.incarnation,
                                    version=self.node.record.version,
                                    memory_available_bytes=self.node.available_memory,
                                    memory_reserved_bytes=self.node.ledger.reserved_bytes())

    async def Reserve(self, request, context):
        caller = await self._caller(context)
        return self.node.reserve(request.reservation, owner=caller)

    async def StartRunner(self, request, context):
        caller = await self._caller(context)
        if self.node.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is stopping")
        return await self.node.work.start_runner(request, asked_by=caller)

    async def Generate(self, request, context):
        await self._caller(context)
        async for chunk in self.node.work.generate_here(request.instance_id, request.request):
            yield chunk

    async def Cancel(self, request, context):
        await self._caller(context)
        process = self.node.work.processes.get((request.instance_id, 0))
        if process is not None:
            process.send(pb.RunnerCommand(cancel=pb.CancelRequest(request_id=request.request.request_id)))
        return pb.CancelResponse()

    async def StopInstance(self, request, context):
        caller = await self._caller(context)
        return pb.StopInstanceResponse(stopped=await self.node.work.stop_instance(request.instance_id, asked_by=caller))

    async def Release(self, request, context):
        caller = await self._caller(context)
        return pb.ReleaseResponse(released=self.node.release(request.reservation_id, asked_by=caller))

    async def DeleteInstance(self, request, context):
        await self._caller(context)  # any member may pass on a delete its user was allowed to ask for
        if not await self.node.work.delete(request.instance_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this node owns no instance {request.instance_id[:64]!r}")
        return pb.DeleteInstanceResponse(deleted=request.instance_id)

    async def ReadModelFile(self, request, context):
        """Ranges of a file of a checkpoint in this node's stores, for a
        member: never a path, only a file in a holding's file list."""
        from .fetch import MAX_SERVING

        await self._caller(context)
        server = self.node.models.server
        if server.serving >= MAX_SERVING:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"serving {MAX_SERVING} reads already")
        held, refusal = await asyncio.to_thread(server.check, request)
        if refusal is not None:
            await context.abort(*refusal)
        async for chunk in server.stream(held, request):
            yield chunk

    async def Pull(self, request, context):
        """Fetch a whole checkpoint onto this node, for a member (`exod pull
        --node`): progress as it goes, then done or the error."""
        await self._caller(context)
        async for progress in self.node.models.pull_progress(request.model):
            yield progress

    async def Ping(self, request, context):
        if len(request.payload) > MAX_PING_PAYLOAD:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ping payload over {MAX_PING_PAYLOAD} bytes")
        return pb.PingResponse(payload=request.payload, node_id=self.node.node_id)

    async def Throughput(self, request_iterator, context):
        await self._caller(context, member=False)
        total = 0
        async for chunk in request_iterator:
            total += len(chunk.data)
            if total > THROUGHPUT_LIMIT:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"probe over {THROUGHPUT_LIMIT} bytes")
        return pb.ThroughputResult(bytes=total)

    async def Leave(self, request, context):
        caller = await self._caller(context, member=False)
        await self._claims(caller, request.node_id, context)
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
        await self._check_request(request, context)
        try:
            return await placement_api.preview(self.node, request, self._loopback(context))
        except placement_api.ModelError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except placement_api.PlanError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def _check_request(self, request: pb.PlacementRequest, context) -> None:
        """What the HTTP API's JSON parser guarantees, for requests that
        arrive as protos: known enums, and every figure and list bounded."""
        problems = []
        if not request.model.strip() or len(request.model) > 512:
            problems.append("model is required, at most 512 characters")
        for field, enum in (("strategy", pb.Strategy), ("backend", pb.Backend), ("restart_policy", pb.RestartPolicy)):
            if getattr(request, field) not in enum.values():
                problems.append(f"unknown {field} {getattr(request, field)}")
        if request.ranks > 64 or request.concurrency > 4096 or request.max_restarts > 100:
            problems.append("ranks (64), concurrency (4096) and max_restarts (100) are bounded")
        if len(request.nodes) > 64 or any(len(n) > 256 for n in request.nodes):
            problems.append("at most 64 nodes of at most 256 characters")
        if request.HasField("headroom_fraction") and not 0 <= request.headroom_fraction < 1:
            problems.append("headroom_fraction must be in [0, 1)")
        if request.max_restarts and request.restart_policy != pb.RESTART_REPLACE:
            problems.append("max_restarts needs restart_policy RESTART_REPLACE")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        await self._local_paths_only(request.model, context)

    @staticmethod
    def _loopback(context) -> bool:
        from .access import grpc_peer_ip, is_loopback

        return is_loopback(grpc_peer_ip(context.peer()))

    async def _local_paths_only(self, model: str, context) -> None:
        """Another host names models by id, as over HTTP (placement_api.check_remote_model)."""
        from . import placement_api
        from .access import grpc_peer_ip, is_loopback

        if is_loopback(grpc_peer_ip(context.peer())):
            return
        try:
            placement_api.check_remote_model(model)
        except placement_api.BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except placement_api.ModelError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

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
        await self._check_request(request, context)
        try:
            return await self.node.work.create(request, local=self._loopback(context))
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
