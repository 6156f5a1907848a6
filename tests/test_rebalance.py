"""`exod rebalance` on two real daemons on loopback: a moe_experts instance
of the skewed-routing model, placed before any routing was measured (its
experts split evenly), is placed again from the counts its runners
measured. The new placement is Ready before the old one stops, a chat in
flight finishes, greedy output is unchanged, and the ledgers hold exactly
the running ranks afterwards."""

import asyncio
import subprocess
import sys
import threading

from exod.daemon.work import _layout_imbalance
from exod.placement import experts
from exod.proto import exod_pb2 as pb

from .conftest import REPO
from .daemon_helpers import settings, started, statuses, until
from .test_instances import call, instance_in

GB = 10**9
PROMPT = {"model": "skewed-moe", "messages": [{"role": "user", "content": "tell me about routing"}],
          "max_tokens": 12, "temperature": 0}


def chat(api: str, max_tokens: int = 12) -> str:
    status, answer = call("POST", f"{api}/v1/chat/completions", {**PROMPT, "max_tokens": max_tokens})
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def test_rebalance_places_experts_by_measured_load_without_losing_the_instance(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        api = f"http://127.0.0.1:{a.api_port}"
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP} == statuses(b), 15)
            body = {"model": "skewed-moe", "strategy": "moe_experts", "ranks": 2, "context_length": 1024,
                    "concurrency": 1}
            status, placed = await asyncio.to_thread(call, "POST", f"{api}/v1/instances", body)
            assert status == 201, placed
            first = placed["instance_id"]
            assert "expert_layout" not in placed["placement"], "nothing was measured yet: experts split evenly"

            def ready(iid):
                i = instance_in(a, iid)
                return i is not None and i.state == pb.INSTANCE_READY

            await until(lambda: ready(first), 180)
            # The warm-up's calibration prompts were counted; requests add to them.
            await until(lambda: instance_in(a, first).runners[0].HasField("expert_counts"), 10)
            before = await asyncio.to_thread(chat, api)
            counts = instance_in(a, first).runners[0].expert_counts
            speed = [1.0, 1.0]
            even = _layout_imbalance(a.work.owned[first].placement, counts, speed, experts)
            assert even > 1.2, f"the skewed model's hot experts share a rank under an even split ({even:.3f})"

            # Not a moe_experts instance, and an unknown one: clear refusals.
            status, answer = await asyncio.to_thread(call, "POST", f"{api}/v1/instances/nope/rebalance", {})
            assert status == 404 and "nope" in answer["error"]["message"]

            # A long chat in flight while the instance is rebalanced finishes.
            long_answer = {}
            worker = threading.Thread(target=lambda: long_answer.setdefault("text", chat(api, 200)))
            worker.start()
            await asyncio.sleep(0.3)
            status, answer = await asyncio.to_thread(call, "POST", f"{api}/v1/instances/{first}/rebalance", {})
            assert status == 200, answer
            assert answer["rebalanced"] and answer["outcome"].startswith("rebalanced")
            second = answer["instance"]["instance_id"]
            assert second != first and ready(second)
            worker.join(120)
            assert long_answer.get("text"), "the chat in flight was answered"

            new = a.work.owned[second].placement
            assert new.HasField("expert_layout") and new.strategy == pb.MOE_EXPERTS
            assert new.predicted_routing_imbalance < even * 0.9
            assert first not in a.work.owned, "the old instance is gone"
            after = await asyncio.to_thread(chat, api)
            assert after == before, "the same greedy output from the new layout"
            # Each ledger holds exactly its running ranks: the new instance's.
            await until(lambda: all(set(n.ledger.held) == {f"{i}-{r}" for i, r in n.work.processes}
                                    for n in (a, b)), 30)
            assert {i for n in (a, b) for i, _ in n.work.processes} == {second}

            # The chat in flight added tokens the layout was not planned from:
            # a second rebalance takes them in (or finds nothing to gain);
            # once no new traffic came in, a third finds the layout fits.
            status, answer = await asyncio.to_thread(call, "POST", f"{api}/v1/instances/{second}/rebalance", {})
            assert status == 200, answer
            second = answer["instance"]["instance_id"]
            await until(lambda: ready(second), 60)
            status, answer = await asyncio.to_thread(call, "POST", f"{api}/v1/instances/{second}/rebalance", {})
            assert status == 200 and not answer["rebalanced"] and answer["outcome"].startswith("already balanced"), \
                answer["outcome"]

            # The counts outlive the instances: the owner keeps them for the model's next placement.
            assert a.expert_load.counts("skewed-moe") is not None

            # From the CLI: one line, and a clear error for a bad id.
            out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "exod.daemon.cli", "rebalance", second,
                                                           "--api", api], cwd=REPO, capture_output=True,
                                          text=True, timeout=120)
            assert out.returncode == 0 and out.stdout.strip().startswith(f"{second} already balanced"), out
            out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "exod.daemon.cli", "rebalance", "nope",
                                                           "--api", api], cwd=REPO, capture_output=True,
                                          text=True, timeout=120)
            assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "404" in out.stderr

            # A moe_tensor instance is not rebalanced.
            status, placed = await asyncio.to_thread(call, "POST", f"{api}/v1/instances",
                                                     {**body, "strategy": "moe_tensor"})
            assert status == 201, placed
            await until(lambda: ready(placed["instance_id"]), 180)
            status, answer = await asyncio.to_thread(call, "POST",
                                                     f"{api}/v1/instances/{placed['instance_id']}/rebalance", {})
            assert status == 409 and "moe_experts" in answer["error"]["message"], answer
        finally:
            await asyncio.gather(a.stop(), b.stop(), return_exceptions=True)

    asyncio.run(scenario())
