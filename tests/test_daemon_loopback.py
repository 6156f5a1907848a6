"""Several real daemons in one process on loopback, with static peers:
profiles converge, a stopped daemon goes Down within the bound, a restarted
one comes back Up with the same id, a copied data dir is noticed, and a
delay relay in front of a peer shows in its measured RTT."""

import asyncio
import contextlib
import shutil

import grpc

from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc

from exod.daemon import transport

from .daemon_helpers import DelayRelay, member_channel, member_identity, settings, started, statuses, until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_three_daemons_converge_and_notice_a_stop_and_a_restart(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=5 * 10**9))
        seed = f"127.0.0.1:{a.grpc_port}"
        b = await started(settings(tmp_path, "b", [seed], memory_limit=6 * 10**9))
        c = await started(settings(tmp_path, "c", [seed], memory_limit=7 * 10**9))
        nodes = [a, b, c]
        try:
            await until(lambda: all(len(n.view.members) == 3 and set(statuses(n).values()) == {pb.UP}
                                    for n in nodes), 10)
            for n in nodes:  # every view has every profile with its own memory limit
                usable = {m.record.profile.name: m.record.profile.memory_usable_bytes for m in n.view.members.values()}
                assert usable == {"a": 5 * 10**9, "b": 6 * 10**9, "c": 7 * 10**9}
            # Each pair's link is measured once, by its lower id, and reaches everyone.
            await until(lambda: all(len(n.view.links) == 3 for n in nodes), 10)
            for link in a.view.links.values():
                assert link.link.rtt_s > 0 and link.link.bandwidth_bytes_per_s > 0
                assert link.link.from_node < link.link.to_node

            c_id = c.node_id
            c_task = asyncio.create_task(c.stop())  # a clean stop says goodbye
            await c_task
            await until(lambda: statuses(a)["c"] == pb.LEFT and statuses(b)["c"] == pb.LEFT, 3)

            c2 = await started(settings(tmp_path, "c", [seed]))
            nodes[2] = c2
            assert c2.node_id == c_id
            await until(lambda: statuses(a)["c"] == pb.UP and statuses(b)["c"] == pb.UP, 10)
            assert a.view.member(c_id).record.incarnation == c2.incarnation
        finally:
            for n in nodes:
                await n.stop()

    run(scenario())


def test_a_silent_node_goes_down_within_the_bound(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a"))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"]))
        try:
            await until(lambda: statuses(a).get("b") == pb.UP, 10)
            # Freeze b without a goodbye: its servers stop answering.
            for task in b._tasks:
                task.cancel()
            await b._grpc_server.stop(grace=0)
            went_down = await until(lambda: statuses(a)["b"] == pb.DOWN, 5, step=0.02)
            assert went_down <= a.settings.down_after_s + 0.5
        finally:
            await a.stop()
            await b._http.cleanup()

    run(scenario())


def test_a_copied_data_dir_is_noticed_and_the_newer_node_takes_a_new_id(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a"))
        c = await started(settings(tmp_path, "c", [f"127.0.0.1:{a.grpc_port}"]))
        await until(lambda: statuses(c).get("a") == pb.UP, 10)
        shutil.copytree(tmp_path / "a", tmp_path / "copy")
        # The copy knows only c: it meets a through c's records.
        copy = await started(settings(tmp_path, "copy", [f"127.0.0.1:{c.grpc_port}"]))
        original = a.node_id
        try:
            assert copy.node_id == original  # it started with the copied id
            await until(lambda: copy.node_id != original, 10)
            everyone = {"a": pb.UP, "c": pb.UP, "copy": pb.UP}
            await until(lambda: all(statuses(n) == everyone for n in (a, c, copy)), 10)
            assert a.node_id == original and c.view.member(original).record.profile.name == "a"
            assert (tmp_path / "copy" / "node_id").read_text().strip() == copy.node_id
            assert (tmp_path / "a" / "node_id").read_text().strip() == original
        finally:
            for n in (a, c, copy):
                await n.stop()

    run(scenario())


def test_a_delay_relay_in_front_of_a_peer_shows_in_its_rtt(tmp_path):
    async def scenario():
        b = await started(settings(tmp_path, "b"))
        relay = DelayRelay("127.0.0.1", b.grpc_port, 0.005)
        await relay.start()
        a = await started(settings(tmp_path, "a", [f"127.0.0.1:{relay.port}"]))
        low, high = sorted([a, b], key=lambda n: n.node_id)
        try:
            def probed():
                link = low.view.links.get((low.node_id, high.node_id))
                return link is not None and len(link.link.probes) >= (2 if low is a else 1)
            await until(probed, 15)
            link = low.view.links[(low.node_id, high.node_id)].link
            by_address = {p.address: p.rtt_s for p in link.probes}
            if low is a:  # a measures both b's own address and the relay, keeps the fastest
                relayed = by_address[f"127.0.0.1:{relay.port}"]
                direct = by_address[f"127.0.0.1:{b.grpc_port}"]
                assert relayed >= direct + 0.009, by_address  # 5 ms each way
                assert link.to_address == f"127.0.0.1:{b.grpc_port}" and link.rtt_s == direct
            else:  # b measures a directly; a reaches b through the relay it was given
                assert link.rtt_s < 0.009
            # Either way, a's own heartbeats through the relay kept b up.
            assert statuses(a)["b"] == pb.UP
        finally:
            await a.stop()
            await b.stop()
            await relay.stop()

    run(scenario())


def test_bad_peers_never_hang_or_crash_the_daemon(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a"))

        # A peer that accepts calls and never answers.
        class Silent(pb_grpc.PeerServiceServicer):
            async def Exchange(self, request, context):
                await asyncio.sleep(3600)

            async def Heartbeat(self, request, context):
                await asyncio.sleep(3600)

        silent = grpc.aio.server()
        pb_grpc.add_PeerServiceServicer_to_server(Silent(), silent)
        silent_port = silent.add_secure_port("127.0.0.1:0", transport.server_credentials(member_identity()))
        await silent.start()
        a.found([f"127.0.0.1:{silent_port}"])
        try:
            channel = member_channel(f"127.0.0.1:{a.grpc_port}")
            stub = pb_grpc.PeerServiceStub(channel)
            # Garbage bytes on the gRPC port.
            reader, writer = await asyncio.open_connection("127.0.0.1", a.grpc_port)
            writer.write(b"\x00\xff garbage, not HTTP/2 \r\n\r\n" * 100)
            await writer.drain()
            writer.close()
            # An oversized message.
            huge = pb.PingRequest(payload=b"x" * (5 * 1024 * 1024))
            try:
                await stub.Ping(huge, timeout=5)
                raise AssertionError("oversized message accepted")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A ping payload over the limit, and a sender without an id.
            for call, code in ((stub.Ping(pb.PingRequest(payload=b"x" * 2000), timeout=5), grpc.StatusCode.INVALID_ARGUMENT),
                               (stub.Exchange(pb.ExchangeRequest(sender=pb.NodeRecord(cluster_id="default")), timeout=5),
                                grpc.StatusCode.INVALID_ARGUMENT),
                               (stub.Heartbeat(pb.HeartbeatRequest(cluster_id="other"), timeout=5),
                                grpc.StatusCode.FAILED_PRECONDITION)):
                try:
                    await call
                    raise AssertionError("bad request accepted")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == code
            await asyncio.sleep(3)  # the meet loop has tried the silent peer and given up in time
            ping = await stub.Ping(pb.PingRequest(payload=b"ok"), timeout=2)
            assert ping.payload == b"ok"
            await channel.close()
        finally:
            stop = asyncio.get_running_loop().time()
            await a.stop()
            assert asyncio.get_running_loop().time() - stop < 2.0
            await silent.stop(grace=0)

    run(scenario())


def test_a_failing_background_round_is_logged_and_retried(tmp_path):
    from exod.daemon.node import Node

    async def scenario():
        node = Node(settings(tmp_path, "x"))
        calls = []

        async def flaky_round():
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("a peer sent something odd")
            return 0.01

        task = asyncio.create_task(node._forever(flaky_round))
        await until(lambda: len(calls) >= 3, 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()

    run(scenario())


def test_a_node_restarted_on_its_port_is_reachable_as_soon_as_it_is_up(tmp_path):
    """Calls to a restarted node work once it shows Up again: the channel to
    its old process, in gRPC's reconnect backoff, is dropped (a reviewer saw
    placements refused for about 30 s while the node showed Up)."""
    from exod.runner.launch import free_ports

    async def scenario():
        (port,) = free_ports(1)
        a = await started(settings(tmp_path, "a"))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], grpc_port=port))
        nodes = [a, b]
        try:
            await until(lambda: statuses(a).get("b") == pb.UP and statuses(b).get("a") == pb.UP, 10)
            address = f"127.0.0.1:{port}"
            await a._stub(address).Ping(pb.PingRequest(), timeout=2)
            await b.stop()
            # Down long enough for a's calls to fail and its channel to back off.
            await until(lambda: statuses(a)["b"] == pb.LEFT, 3)
            for _ in range(6):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await a._stub(address).Ping(pb.PingRequest(), timeout=0.5)
                await asyncio.sleep(0.5)
            b2 = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], grpc_port=port))
            nodes[1] = b2
            await until(lambda: statuses(a)["b"] == pb.UP, 10)
            await a._stub(address).Ping(pb.PingRequest(), timeout=2)
        finally:
            for n in nodes:
                await n.stop()

    run(scenario())
