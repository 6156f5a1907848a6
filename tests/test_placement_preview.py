"""POST /v1/placements/preview and ClusterService.Preview plan on the
node's live view of the cluster: real daemons on loopback."""

import asyncio
import json
import urllib.error
import urllib.request

import grpc

from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc

from .daemon_helpers import member_channel, settings, started, statuses, until

GB = 10**9


def post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_preview_plans_on_the_live_view_over_http_and_grpc(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=15 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=15 * GB))
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)
            await until(lambda: len(a.view.links) == 1, 10)
            url = f"http://127.0.0.1:{a.api_port}/v1/placements/preview"

            # 17 GB of Qwen3-30B-A3B fits neither 15 GB node alone (less headroom
            # and overhead): only two-rank candidates fit, planned on both nodes.
            status, plan = await asyncio.to_thread(post, url, {"model": "qwen3-30b-a3b-4bit", "context_length": 4096})
            assert status == 200, plan
            assert plan["chosen"]["fits"] and len(plan["chosen"]["ranks"]) == 2
            assert {r["node_name"] for r in plan["chosen"]["ranks"]} == {"a", "b"}
            singles = [c for c in plan["candidates"] if len(c["ranks"]) == 1]
            assert singles and not any(c.get("fits") for c in singles)
            assert all(c.get("reasons") for c in singles)  # each says why it does not fit
            assert not any("assumed 10 GbE" in r for c in plan["candidates"] for r in c.get("reasons", [])
                           if len(c["ranks"]) == 2)  # the link was measured

            # The built-in demo model, before it is built on this node.
            status, plan = await asyncio.to_thread(post, url, {"model": "demo", "strategy": "moe_tensor", "nodes": ["a", "b"]})
            assert status == 200 and plan["chosen"]["strategy"] == "MOE_TENSOR"
            # Each rank's share of every expert, in grains (models/shares.py).
            held = [(r["share"], r["share_of"]) for r in plan["chosen"]["ranks"]]
            assert held[0][1] == held[1][1] and held[0][0] + held[1][0] == held[0][1], held

            # The same over gRPC.
            channel = member_channel(f"127.0.0.1:{a.grpc_port}")
            stub = pb_grpc.ClusterServiceStub(channel)
            answer = await stub.Preview(pb.PlacementRequest(model="qwen3-30b-a3b-4bit"), timeout=30)
            assert answer.chosen.fits and len(answer.chosen.ranks) == 2
            for request, code in ((pb.PlacementRequest(model="no-such-model"), grpc.StatusCode.NOT_FOUND),
                                  (pb.PlacementRequest(model=" "), grpc.StatusCode.INVALID_ARGUMENT),
                                  (pb.PlacementRequest(model="llama-3.3-70b-4bit", strategy=pb.MOE_TENSOR),
                                   grpc.StatusCode.FAILED_PRECONDITION)):
                try:
                    await stub.Preview(request, timeout=30)
                    raise AssertionError("accepted")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == code, e
            state = await pb_grpc.ClusterServiceStub(channel).State(pb.StateRequest(), timeout=5)
            assert len(state.nodes) == 2
            await channel.close()

            for body, code, words in ((b"{not json", 400, "not JSON"),
                                      ([1, 2], 400, "JSON object"),
                                      ({"context_length": 5}, 400, "model is required"),
                                      ({"model": "demo", "context_length": -1}, 400, "positive integer"),
                                      ({"model": "demo", "strategy": "sideways"}, 400, "strategy must be"),
                                      ({"model": "demo", "colour": "blue"}, 400, "unknown field"),
                                      ({"model": "no-such-model"}, 404, "unknown model"),
                                      ({"model": "llama-3.3-70b-4bit", "strategy": "moe_tensor"}, 422, "mixture-of-experts")):
                status, answer = await asyncio.to_thread(post, url, body)
                assert status == code and words in answer["error"]["message"], (body, status, answer)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 120))
