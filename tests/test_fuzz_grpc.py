"""Hypothesis fuzzing of every RPC of both gRPC services, as a member that
holds the cluster key (the strongest sender short of a node's own key):
random request messages built from the schema, bounded in count and size.
Each call ends with a status code that names the problem, never UNKNOWN or
INTERNAL (an unhandled exception); nothing starts but what CreateInstance
may legitimately place (the fuzzer calls from loopback), and that stops
with its instance; the daemon stays up; its memory stays bounded."""

import asyncio
import threading

import grpc
import psutil
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from exod.daemon import transport
from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc

from .daemon_helpers import join_as_member, member_channel, member_identity, settings, started

SCALARS = {
    F.TYPE_STRING: st.one_of(st.text(max_size=40), st.sampled_from(["demo", "/etc", "../x", "0123456789ab",
                                                                       "0123456789ab-0", "default", "\x00"])),
    F.TYPE_BYTES: st.binary(max_size=64),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_FLOAT: st.floats(allow_nan=True, width=32),
    F.TYPE_DOUBLE: st.floats(allow_nan=True),
    F.TYPE_INT32: st.integers(-2**31, 2**31 - 1), F.TYPE_SINT32: st.integers(-2**31, 2**31 - 1),
    F.TYPE_INT64: st.integers(-2**63, 2**63 - 1), F.TYPE_SINT64: st.integers(-2**63, 2**63 - 1),
    F.TYPE_UINT32: st.integers(0, 2**32 - 1), F.TYPE_UINT64: st.integers(0, 2**64 - 1),
    F.TYPE_FIXED32: st.integers(0, 2**32 - 1), F.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}


def messages(descriptor, depth=0):
    """Any message of this type: each field absent or random, nested
    messages to depth 3, repeated fields up to 3 items."""
    fields = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = messages(field.message_type, depth + 1)
        elif field.type == F.TYPE_ENUM:
            value = st.integers(0, len(field.enum_type.values) + 1)
        else:
            value = SCALARS[field.type]
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = st.one_of(st.none(), value)

    def build(values):
        message = descriptor._concrete_class()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                target = getattr(message, name)
                for item in value:
                    target.add().CopyFrom(item) if field.type == F.TYPE_MESSAGE else target.append(item)
            elif field.type == F.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Daemon:
    """One daemon on its own event loop in a thread, so that Hypothesis can
    drive it from synchronous test functions."""

    def __init__(self, tmp_path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # One runner at most: a valid CreateInstance may place the demo model.
        self.node = self.call(started(settings(tmp_path, "fuzzed", memory_limit=4 * 10**9, max_runners=1)))
        self.identity = member_identity()
        self.record = self.call(join_as_member([self.node], self.identity, name="fuzzer"))
        self.channel = self.call(self._channel())

    async def _channel(self):
        return member_channel(f"127.0.0.1:{self.node.grpc_port}", self.identity)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.call(self.channel.close())
        self.call(self.node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _invoke(channel, service, method, request):
    stub = (pb_grpc.PeerServiceStub if service == "PeerService" else pb_grpc.ClusterServiceStub)(channel)
    rpc = getattr(stub, method)
    try:
        if method == "Throughput":
            async def chunks():
                yield request
            await rpc(chunks(), timeout=5)
        elif pb.DESCRIPTOR.services_by_name[service].methods_by_name[method].server_streaming:
            async for _ in rpc(request, timeout=5):  # Generate, ReadModelFile, Pull
                pass
        else:
            await rpc(request, timeout=5)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


def rpcs():
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            yield service.name, method.name, method.input_type


def test_every_rpc_answers_random_requests_with_a_real_status(tmp_path):
    daemon = Daemon(tmp_path)
    process = psutil.Process()
    try:
        baseline = process.memory_info().rss
        seen: dict = {}
        for service, method, input_type in rpcs():

            @hsettings(max_examples=40, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(messages(input_type), st.booleans())
            def fuzz(request, as_itself):
                if as_itself:  # past the checks on who sends, so that the rest is reached too
                    if method == "Exchange":
                        request.sender.CopyFrom(daemon.record)
                    elif method in ("Heartbeat", "Leave"):
                        request.node_id = daemon.identity.node_id
                        if method == "Heartbeat":
                            request.cluster_id = "default"
                code = daemon.call(_invoke(daemon.channel, service, method, request))
                seen.setdefault(f"{service}.{method}", set()).add(code.name)
                assert code not in BAD, (service, method, code, request)

            fuzz()
        node = daemon.node
        for instance_id in list(node.work.owned):
            daemon.call(node.work.delete(instance_id))
        assert not node.work.processes and not node.ledger.held
        assert not [p for p in psutil.Process().children(recursive=True) if "exod.runner" in " ".join(p.cmdline())]
        assert len(node.view.members) <= node.settings.max_members
        async def ping():
            return await transport.peer_stub(daemon.channel).Ping(pb.PingRequest(payload=b"alive"), timeout=5)
        assert daemon.call(ping()).payload == b"alive"
        grown = process.memory_info().rss - baseline
        assert grown < 150 * 2**20, f"memory grew by {grown / 2**20:.0f} MiB"
        # Every RPC was reached (not one refused wholesale by a bad channel).
        assert len(seen) == sum(1 for _ in rpcs())
    finally:
        daemon.close()
