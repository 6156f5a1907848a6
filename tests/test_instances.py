"""Instances through the daemon, on two real daemons on loopback: placed
over both nodes, runners reach Ready and every node sees it, a kill -9 of
a runner fails the instance everywhere and releases its memory, DELETE
stops everything, and a placement that does not fit is refused."""

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import psutil

from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings, started, statuses, until

GB = 10**9


def call(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def instance_in(node, instance_id):
    from exod.daemon import state

    return state.instance(node.view, instance_id)


def test_place_watch_fail_and_delete_over_two_daemons(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB, prestart_runner=True))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB,
                                   prestart_runner=True))
        api = f"http://127.0.0.1:{a.api_port}"
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)
            seen = {}  # (node, instance, rank, state) -> seconds from the runner's change to this node's view

            async def watch():  # from before the placement: its first states come before its id does
                from exod.daemon import state

                while True:
                    now = time.time()
                    for node in (a, b):
                        for instance in state.instances(node.view):
                            for r in instance.runners:
                                for change in r.history:
                                    seen.setdefault((node.record.profile.name, instance.instance_id, r.rank,
                                                     change.state), now - change.at_unix_ms / 1000)
                    await asyncio.sleep(0.01)
            watcher = asyncio.create_task(watch())
            body = {"model": "demo", "strategy": "moe_tensor", "nodes": ["a", "b"], "context_length": 1024}
            status, placed = await asyncio.to_thread(call, "POST", f"{api}/v1/instances", body)
            assert status == 201, placed
            iid = placed["instance_id"]
            assert {r["node_name"] for r in placed["placement"]["ranks"]} == {"a", "b"}

            def ready_everywhere():
                return all((i := instance_in(n, iid)) is not None and i.state == pb.INSTANCE_READY
                           and all(r.state == pb.READY for r in i.runners) for n in (a, b))
            await until(lambda: a.work.spare is not None and b.work.spare is not None, 30)

            def every_transition_everywhere(states_of_rank):
                """Every state each rank went through (as the node that runs it
                recorded), on both nodes' views, each within a second; a
                missing one is a failure, not a skipped sample."""
                missing = [(n, rank, pb.RunnerState.Name(st)) for rank, states in states_of_rank.items()
                           for st in states for n in ("a", "b") if (n, iid, rank, st) not in seen]
                assert not missing, missing
                late = {k: lag for k, lag in seen.items() if k[1] == iid and lag >= 1.0}
                assert not late, late

            def truth():
                return {rank: [c.state for c in node.work.statuses[(iid, rank)].history]
                        for node in (a, b) for (i, rank) in node.work.statuses if i == iid}
            await until(ready_everywhere, 120)
            await asyncio.sleep(1.0)
            ranks = truth()
            assert all(states[-1] == pb.READY and pb.LOADING in states and pb.WARMING_UP in states
                       for states in ranks.values()), ranks
            every_transition_everywhere(ranks)
            # Each rank ran in the node's pre-started runner, and a new one waits for the next rank.
            assert all(p.adopted for n in (a, b) for p in n.work.processes.values())
            await until(lambda: all(n.work.spare is not None and n.work.spare.alive() for n in (a, b)), 30)
            for node in (a, b):  # memory is held on both, and both views say so
                assert node.ledger.reserved_bytes() > 0
                assert all(n.memory_reserved_bytes > 0 for n in node.cluster_state().nodes)
            status, listed = await asyncio.to_thread(call, "GET", f"{api}/v1/instances/{iid}")
            assert status == 200 and listed["state"] == "INSTANCE_READY"
            assert [r["state"] for r in listed["runners"]] == ["READY", "READY"]
            assert all(int(r["estimated_bytes"]) > 0 and int(r["peak_rss_bytes"]) > 0 for r in listed["runners"])

            # kill -9 of the runner on b: the instance fails on both views, memory is released.
            victim = next(r for r in instance_in(a, iid).runners if r.node_id == b.node_id)
            os.kill(victim.pid, signal.SIGKILL)
            failed_in = await until(lambda: all((i := instance_in(n, iid)) is not None
                                                and i.state == pb.INSTANCE_FAILED for n in (a, b)), 15)
            assert failed_in < 5
            await asyncio.sleep(1.0)
            watcher.cancel()
            # A rank's Failed reached both views within a second, like every state before it: the
            # killed rank's, or its peer's, which notices the lost rank within one 20 ms idle tick
            # and may report first (the instance then stops the other).
            failed = {(node, rank) for node, i, rank, state in seen if i == iid and state == pb.FAILED}
            assert any({("a", rank), ("b", rank)} <= failed for rank in (0, 1)), seen
            every_transition_everywhere(ranks)
            reason = instance_in(b, iid).reason
            assert "rank" in reason and "failed" in reason, reason
            await until(lambda: a.ledger.reserved_bytes() == 0 and b.ledger.reserved_bytes() == 0, 15)
            await until(lambda: not a.work.processes and not b.work.processes, 15)
            assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE

            status, _ = await asyncio.to_thread(call, "DELETE", f"{api}/v1/instances/{iid}")
            assert status == 200
            await until(lambda: instance_in(b, iid) is None, 5)

            # Place again, delete while Ready: everything stops, everything is released.
            status, placed = await asyncio.to_thread(call, "POST", f"{api}/v1/instances", body)
            assert status == 201
            iid = placed["instance_id"]
            await until(ready_everywhere, 120)
            pids = [r.pid for r in instance_in(a, iid).runners]
            status, _ = await asyncio.to_thread(call, "DELETE", f"{api}/v1/instances/{iid}")
            assert status == 200
            await until(lambda: instance_in(b, iid) is None and b.ledger.reserved_bytes() == 0, 10)
            assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)

            # Too big for what is left: refused with the planner's reasons, nothing held.
            status, answer = await asyncio.to_thread(call, "POST", f"{api}/v1/instances",
                                                     {"model": "qwen3-30b-a3b-4bit"})
            assert status == 409 and answer["error"]["message"]
            assert a.ledger.reserved_bytes() == 0 and b.ledger.reserved_bytes() == 0
            status, answer = await asyncio.to_thread(call, "DELETE", f"{api}/v1/instances/nope")
            assert status == 404
        finally:
            spares = [n.work.spare.process.pid for n in (a, b) if n.work.spare is not None]
            await a.stop()
            await b.stop()
        assert spares and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                  for p in spares)

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_a_restarted_owner_reports_its_instances_failed_and_stops_their_runners(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        a2 = None
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)
            body = {"model": "demo", "strategy": "moe_tensor", "nodes": ["a", "b"], "context_length": 512}
            status, placed = await asyncio.to_thread(call, "POST", f"http://127.0.0.1:{a.api_port}/v1/instances", body)
            assert status == 201
            iid = placed["instance_id"]
            await until(lambda: (i := instance_in(b, iid)) is not None and i.state == pb.INSTANCE_READY, 120)
            # a stops without deleting anything (its own rank goes with it), and comes back.
            await a.stop()
            a2 = await started(settings(tmp_path, "a", [f"127.0.0.1:{b.grpc_port}"], memory_limit=4 * GB))
            recovered = a2.work.owned[iid]
            assert recovered.state == pb.INSTANCE_FAILED and "restarted" in recovered.reason
            await until(lambda: not b.work.processes and b.ledger.reserved_bytes() == 0, 30)
            await until(lambda: (i := instance_in(b, iid)) is not None and i.state == pb.INSTANCE_FAILED, 10)
        finally:
            for n in (a2, b):
                if n is not None:
                    await n.stop()

    asyncio.run(asyncio.wait_for(scenario(), 300))
