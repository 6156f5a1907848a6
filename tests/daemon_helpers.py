"""Daemons in the test process (asyncio) and a userspace delay relay."""

import asyncio
import time

import grpc

from cryptography.hazmat.primitives.asymmetric import ec

from exod.daemon import keys, transport
from exod.daemon.config import Settings

from .conftest import TEST_CLUSTER_KEY
from exod.daemon.node import Node


_BANDWIDTH: dict = {}


def one_machine_bandwidth(data_dir) -> None:
    """Every emulated node on this machine reports the one bandwidth measured
    here once (the daemon's cache, bandwidth.json), as it is one machine: a
    copy measured per node differs by noise under load, and the planner
    would give such nodes uneven shares."""
    import json
    import tempfile
    from pathlib import Path

    from exod.daemon import profile

    if not _BANDWIDTH:
        with tempfile.TemporaryDirectory() as tmp:
            _BANDWIDTH["chip"] = profile.chip()
            _BANDWIDTH["bytes_per_s"] = profile.measured_bandwidth(Path(tmp) / "bandwidth.json", _BANDWIDTH["chip"])
    cache = Path(data_dir) / "bandwidth.json"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(_BANDWIDTH))


def settings(tmp_path, name, peers=(), **overrides) -> Settings:
    one_machine_bandwidth(overrides.get("data_dir") or tmp_path / name)
    base = dict(name=name, api_host="127.0.0.1", api_port=0, grpc_host="127.0.0.1", grpc_port=0,
                peers=list(peers), data_dir=str(tmp_path / name), discovery=False, rtt_probe_s=0.5,
                throughput_probe_s=5.0, exchange_s=1.0,
                # A spare runner costs a second of CPU per daemon; tests that start runners turn it on.
                prestart_runner=False, cluster_key=TEST_CLUSTER_KEY)
    base.update(overrides)
    return Settings(**base)


def member_identity(cluster_key: str = TEST_CLUSTER_KEY) -> keys.NodeIdentity:
    """A fresh key pair with a certificate of the cluster CA: what a member
    (or anyone holding the cluster key) presents."""
    return keys.issue(keys.derive_ca(keys.parse_cluster_key(cluster_key)), ec.generate_private_key(ec.SECP256R1()))


def member_channel(address: str, identity: keys.NodeIdentity | None = None):
    """An asyncio gRPC channel to a daemon, as a member."""
    return transport.secure_channel(address, identity or member_identity())


def member_channel_sync(address: str, identity: keys.NodeIdentity | None = None):
    identity = identity or member_identity()
    return grpc.secure_channel(address, transport.channel_credentials(identity), options=transport.CLIENT_OPTIONS)


async def join_as_member(nodes, identity: keys.NodeIdentity, name: str = "client", cluster: str = "default"):
    """Exchange a signed record of `identity` with each node, as a new node
    does: the nodes then hold it as a member (one that no one can reach)."""
    from exod.daemon import signing
    from exod.daemon.config import PROTOCOL_VERSION
    from exod.proto import exod_pb2 as pb

    record = pb.NodeRecord(profile=pb.NodeProfile(node_id=identity.node_id, name=name), version=1,
                           incarnation=int(time.time() * 1000), cluster_id=cluster, protocol_version=PROTOCOL_VERSION)
    signing.sign(identity, record)
    for node in nodes:
        channel = member_channel(f"127.0.0.1:{node.grpc_port}", identity)
        try:
            await transport.peer_stub(channel).Exchange(pb.ExchangeRequest(sender=record), timeout=5)
        finally:
            await channel.close()
    return record


async def started(s: Settings) -> Node:
    node = Node(s)
    await node.start()
    return node


async def until(predicate, timeout: float, step: float = 0.05) -> float:
    """Seconds until predicate() holds; raises after timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


def statuses(node: Node) -> dict:
    return {m.record.profile.name: m.status for m in node.view.members.values()}


class DelayRelay:
    """A TCP relay that holds every chunk for `delay_s` in each direction
    before passing it on: latency without netem."""

    def __init__(self, target_host: str, target_port: int, delay_s: float):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.server = None
        self.port = 0
        self._tasks: set = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0, None))
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
