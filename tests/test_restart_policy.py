"""restart_policy "replace" on three real daemons on loopback: a killed
runner, then a node that leaves, each get the instance planned again on the
nodes that are up and placed as a new instance that reaches Ready; after
max_restarts the chain stops with the reason."""

import asyncio
import os
import signal

import pytest

from exod.daemon import placement_api
from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings, started, statuses, until
from .test_instances import call, instance_in

GB = 10**9


def test_restart_policy_is_validated():
    request = placement_api.parse_request({"model": "demo", "restart_policy": "replace", "max_restarts": 2})
    assert request.restart_policy == pb.RESTART_REPLACE and request.max_restarts == 2
    assert placement_api.parse_request({"model": "demo"}).restart_policy == pb.RESTART_NEVER
    with pytest.raises(placement_api.BadRequest, match="restart_policy must be one of never, replace"):
        placement_api.parse_request({"model": "demo", "restart_policy": "always"})
    with pytest.raises(placement_api.BadRequest, match="max_restarts needs restart_policy"):
        placement_api.parse_request({"model": "demo", "max_restarts": 2})


def test_a_failed_instance_is_placed_again_on_the_nodes_that_are_up(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        c = await started(settings(tmp_path, "c", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        nodes = {"a": a, "b": b, "c": c}
        stopped = set()
        api = f"http://127.0.0.1:{a.api_port}"
        try:
            await until(lambda: all(statuses(n) == {"a": pb.UP, "b": pb.UP, "c": pb.UP} for n in (a, b, c)), 15)
            body = {"model": "demo", "strategy": "moe_tensor", "ranks": 2, "context_length": 1024,
                    "restart_policy": "replace", "max_restarts": 2}
            status, placed = await asyncio.to_thread(call, "POST", f"{api}/v1/instances", body)
            assert status == 201, placed
            first = placed["instance_id"]

            def ready(iid):
                i = instance_in(a, iid)
                return i is not None and i.state == pb.INSTANCE_READY

            def successor(iid):
                return a.work.owned[iid].replaced_by

            await until(lambda: ready(first), 120)

            # 1. A runner killed on a node other than the owner: failed, then placed again.
            victim = next(r for r in instance_in(a, first).runners if r.node_id != a.node_id)
            os.kill(victim.pid, signal.SIGKILL)
            await until(lambda: successor(first), 30)
            second = successor(first)
            await until(lambda: ready(second), 120)
            old, new = a.work.owned[first], a.work.owned[second]
            assert old.state == pb.INSTANCE_FAILED and "failed" in old.reason
            assert new.replaces == first and new.restarts == 1
            assert new.request.restart_policy == pb.RESTART_REPLACE
            status, listed = await asyncio.to_thread(call, "GET", f"{api}/v1/instances/{first}")
            assert status == 200 and listed["replaced_by"] == second

            # 2. A node that holds a rank leaves: placed again on the two nodes that are left.
            gone = next(name for name, n in nodes.items()
                        if name != "a" and any(r.node_id == n.node_id for r in new.placement.ranks))
            await nodes[gone].stop()
            stopped.add(gone)
            await until(lambda: successor(second), 30)
            third = successor(second)
            await until(lambda: ready(third), 120)
            placed_on = {r.node_name for r in a.work.owned[third].placement.ranks}
            assert gone not in placed_on and len(placed_on) == 2
            assert a.work.owned[third].restarts == 2
            # The node's leaving or, if its runner's end reached the others first, the rank's failure.
            reason = a.work.owned[second].reason
            assert a.work.owned[second].state == pb.INSTANCE_FAILED
            assert f"node {gone}" in reason or "failed" in reason, reason

            # 3. max_restarts reached: the chain stops, and says why.
            victim = next(r for r in instance_in(a, third).runners if r.node_id != a.node_id)
            os.kill(victim.pid, signal.SIGKILL)
            await until(lambda: a.work.owned[third].state == pb.INSTANCE_FAILED
                        and "not placed again: 2 restarts already" in a.work.owned[third].reason, 30)
            await asyncio.sleep(1.5)
            assert not a.work.owned[third].replaced_by
            await until(lambda: a.ledger.reserved_bytes() == 0 and not a.work.processes, 15)
        finally:
            for name, node in nodes.items():
                if name not in stopped:
                    await node.stop()

    asyncio.run(asyncio.wait_for(scenario(), 420))


def test_a_replacement_that_finds_no_candidate_waits_for_the_nodes_to_return(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        b2 = None
        api = f"http://127.0.0.1:{a.api_port}"
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 15)
            body = {"model": "demo", "strategy": "moe_tensor", "nodes": ["a", "b"], "context_length": 512,
                    "restart_policy": "replace"}
            status, placed = await asyncio.to_thread(call, "POST", f"{api}/v1/instances", body)
            assert status == 201, placed
            first = placed["instance_id"]
            await until(lambda: (i := instance_in(a, first)) is not None and i.state == pb.INSTANCE_READY, 120)
            # b goes away: the instance fails, and with only a up nothing pinned to a and b fits.
            await b.stop()
            await until(lambda: a.work.owned[first].state == pb.INSTANCE_FAILED, 15)
            await asyncio.sleep(4)
            assert not a.work.owned[first].replaced_by  # still waiting, not given up
            assert "placing it again failed" not in a.work.owned[first].reason
            # b comes back (same data dir, same id): the waiting re-placement succeeds.
            b2 = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
            await until(lambda: a.work.owned[first].replaced_by, 60)
            second = a.work.owned[first].replaced_by
            await until(lambda: (i := instance_in(a, second)) is not None and i.state == pb.INSTANCE_READY, 120)
            assert {r.node_name for r in a.work.owned[second].placement.ranks} == {"a", "b"}
        finally:
            await a.stop()
            if b2 is not None:
                await b2.stop()

    asyncio.run(asyncio.wait_for(scenario(), 400))
