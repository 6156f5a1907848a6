"""The instance API over gRPC (ClusterService), and deleting from a node that
does not own the instance (it passes the delete to the owner), on two real
daemons on loopback."""

import asyncio

import grpc

from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc

from .daemon_helpers import member_channel, settings, started, statuses, until
from .test_instances import call

GB = 10**9


def test_create_list_get_and_delete_over_grpc_from_any_node(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        channels = [member_channel(f"127.0.0.1:{n.grpc_port}") for n in (a, b)]
        on_a, on_b = (pb_grpc.ClusterServiceStub(c) for c in channels)
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)
            request = pb.PlacementRequest(model="demo", strategy=pb.MOE_TENSOR, ranks=2, context_length=1024)
            created = await on_a.CreateInstance(request, timeout=60)
            assert created.state == pb.INSTANCE_STARTING and len(created.placement.ranks) == 2
            assert created.request.model == "demo"
            iid = created.instance_id

            async def state_on(stub):
                return (await stub.GetInstance(pb.InstanceRef(instance_id=iid), timeout=10)).state
            deadline = asyncio.get_running_loop().time() + 120
            while await state_on(on_b) != pb.INSTANCE_READY:  # b sees a's instance become Ready
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
            listed = await on_b.ListInstances(pb.ListInstancesRequest(), timeout=10)
            assert [i.instance_id for i in listed.instances] == [iid]
            assert all(r.state == pb.READY for r in listed.instances[0].runners)

            # Deleted through b, which does not own it: a stops it everywhere.
            answer = await on_b.DeleteInstance(pb.InstanceRef(instance_id=iid), timeout=60)
            assert answer.deleted == iid
            assert iid not in a.work.owned
            await until(lambda: not a.work.processes and not b.work.processes
                        and a.ledger.reserved_bytes() == 0 and b.ledger.reserved_bytes() == 0, 15)

            # The same over HTTP: DELETE on b for an instance a owns.
            iid = (await on_a.CreateInstance(request, timeout=60)).instance_id
            await until(lambda: iid in {i.instance_id for w in b.view.work.values() for i in w.instances}, 10)
            status, body = await asyncio.to_thread(call, "DELETE", f"http://127.0.0.1:{b.api_port}/v1/instances/{iid}")
            assert status == 200 and body == {"deleted": iid}
            assert iid not in a.work.owned

            for coro, code in ((on_a.CreateInstance(pb.PlacementRequest(model="qwen3-30b-a3b-4bit"), timeout=60),
                                grpc.StatusCode.FAILED_PRECONDITION),
                               (on_a.CreateInstance(pb.PlacementRequest(model="no-such-model"), timeout=60),
                                grpc.StatusCode.NOT_FOUND),
                               (on_b.GetInstance(pb.InstanceRef(instance_id="nope"), timeout=10),
                                grpc.StatusCode.NOT_FOUND),
                               (on_b.DeleteInstance(pb.InstanceRef(instance_id="nope"), timeout=10),
                                grpc.StatusCode.NOT_FOUND)):
                try:
                    await coro
                    raise AssertionError(f"expected {code}")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == code, (e.code(), e.details())
            assert a.ledger.reserved_bytes() == 0 and not a.work.owned
        finally:
            for c in channels:
                await c.close()
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 300))
