"""Reservations: a node never admits more than its usable memory, whoever
asks and however many ask at once."""

import asyncio
import random

import grpc
from hypothesis import given, settings as hsettings, strategies as st

from exod.daemon import reservations, state
from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc

from .daemon_helpers import join_as_member, member_channel, member_identity, settings, started, statuses, until

GB = 10**9


def res(rid, gb, expires=0):
    return pb.Reservation(reservation_id=rid, instance_id="i", bytes=int(gb * GB), expires_at_unix_ms=expires)


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "release", "expire"]), st.integers(0, 9), st.integers(1, 40)),
                max_size=60))
def test_the_ledger_never_holds_more_than_usable(ops):
    usable = 100 * GB
    ledger = reservations.Ledger()
    for op, rid, size in ops:
        if op == "admit":
            ledger, _, _ = reservations.admit(ledger, res(f"r{rid}", size, expires=rid * 10), usable)
        elif op == "release":
            ledger, _ = reservations.release(ledger, f"r{rid}")
        else:
            ledger = reservations.expire(ledger, size)
        assert ledger.reserved_bytes() <= usable


def test_refusals_say_why_and_repeats_are_idempotent():
    ledger, ok, _ = reservations.admit(reservations.Ledger(), res("a", 60), 100 * GB)
    assert ok
    again, ok, _ = reservations.admit(ledger, res("a", 60), 100 * GB)
    assert ok and again.reserved_bytes() == 60 * GB
    _, ok, why = reservations.admit(ledger, res("b", 50), 100 * GB)
    assert not ok and why == "needs 50.00 GB but only 40.00 GB of 100.00 GB is unreserved"
    assert reservations.release(ledger, "nope")[1] is False


def test_unconfirmed_reservations_lapse_and_confirmed_ones_stay():
    ledger, _, _ = reservations.admit(reservations.Ledger(), res("a", 10, expires=1000), 100 * GB)
    ledger, _, _ = reservations.admit(ledger, res("b", 10, expires=1000), 100 * GB)
    ledger = reservations.confirm(ledger, "b")
    assert set(reservations.expire(ledger, 999).held) == {"a", "b"}
    assert set(reservations.expire(ledger, 1000).held) == {"b"}


def test_the_planner_sees_only_unreserved_memory():
    view = state.set_self(state.View("a", "c"), pb.NodeRecord(
        profile=pb.NodeProfile(node_id="a", memory_usable_bytes=100 * GB), cluster_id="c"), 0, 0)
    view = state.heard_from(view, "a", 0, 0, 1, reserved=30 * GB)
    assert state.cluster_for_planner(view).nodes[0].memory_usable_bytes == 70 * GB


def test_twenty_racing_placements_never_overcommit_a_node(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=10 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=10 * GB))
        try:
            await until(lambda: statuses(b).get("a") == pb.UP, 10)
            # 20 placements, each wanting 1.5 GB on both nodes, racing over many connections.
            # The placing node is a member of both views, with a key of its own.
            owner = member_identity()
            await join_as_member([a, b], owner)
            channels = [member_channel(f"127.0.0.1:{n.grpc_port}", owner) for n in (a, b) for _ in range(5)]
            stubs = [pb_grpc.PeerServiceStub(c) for c in channels]

            async def place(i):
                iid = f"{i:012x}"
                wanted = [(stubs[random.randrange(5)], f"{iid}-0"), (stubs[5 + random.randrange(5)], f"{iid}-1")]
                answers = await asyncio.gather(*(stub.Reserve(pb.ReserveRequest(reservation=pb.Reservation(
                    reservation_id=rid, instance_id=iid, rank=int(rid[-1]), bytes=int(1.5 * GB))), timeout=5)
                                                 for stub, rid in wanted))
                if all(x.admitted for x in answers):
                    return True, ""
                # A refusal anywhere releases what was admitted elsewhere.
                for (stub, rid), x in zip(wanted, answers):
                    if x.admitted:
                        await stub.Release(pb.ReleaseRequest(reservation_id=rid), timeout=5)
                return False, next(x.reason for x in answers if not x.admitted)

            results = await asyncio.gather(*(place(i) for i in range(20)))
            placed = [ok for ok, _ in results if ok]
            refused = [why for ok, why in results if not ok]
            assert len(placed) + len(refused) == 20
            assert all("is unreserved" in why for why in refused)
            for node in (a, b):
                assert node.ledger.reserved_bytes() <= 10 * GB
                assert node.ledger.reserved_bytes() == len(placed) * int(1.5 * GB)
            # 6 x 1.5 GB fit in 10 GB; racing halves that refuse each other can place fewer.
            assert 1 <= len(placed) <= 6
            # Each node's view of the other shows what it holds.
            held = len(placed) * int(1.5 * GB)
            await until(lambda: a.view.member(b.node_id).memory_reserved_bytes == held, 5)
            for c in channels:
                await c.close()
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
