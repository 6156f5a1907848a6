"""Twenty placements racing through the real `POST /v1/instances` of three
daemons at once: after every admission, each node's reservations stay
within its usable memory, and once the dust settles each node's ledger
holds exactly the ranks that run there."""

import asyncio

import aiohttp

from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings, started, statuses, until

GB = 10**9
# The demo model's ranks each want ~0.3-0.5 GB (context 512): three or four
# placements fit on each node, so most of the twenty are refused.
MEMORY = int(1.6 * GB)


async def post(session, url, body):
    # aiohttp, not threads: the daemons share this process's default executor,
    # and twenty blocked client threads would starve them of it.
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=300)) as r:
        return r.status, await r.json()


def test_twenty_racing_posts_never_overcommit_and_ledgers_match_running_ranks(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=MEMORY))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=MEMORY))
        c = await started(settings(tmp_path, "c", [f"127.0.0.1:{a.grpc_port}"], memory_limit=MEMORY))
        nodes = (a, b, c)
        violations = []
        for node in nodes:  # checked at every admission, on the node that admits
            admit = node.reserve

            def checked(reservation, owner="", node=node, admit=admit):
                answer = admit(reservation, owner)
                usable = node.record.profile.memory_usable_bytes
                if node.ledger.reserved_bytes() > usable:
                    violations.append((node.record.profile.name, node.ledger.reserved_bytes(), usable))
                return answer
            node.reserve = checked
        try:
            await until(lambda: all(set(statuses(n).values()) == {pb.UP} and len(statuses(n)) == 3 for n in nodes), 15)
            body = {"model": "demo", "strategy": "moe_tensor", "ranks": 2, "context_length": 512}
            urls = [f"http://127.0.0.1:{nodes[i % 3].api_port}/v1/instances" for i in range(20)]
            async with aiohttp.ClientSession() as session:
                answers = await asyncio.gather(*(post(session, url, body) for url in urls))
            codes = sorted(code for code, _ in answers)
            placed = [answer["instance_id"] for code, answer in answers if code == 201]
            assert set(codes) <= {201, 409}, answers
            assert 1 <= len(placed) < 20, codes
            assert all("refused" in a["error"]["message"] or "fits" in a["error"]["message"]
                       or "unreserved" in a["error"]["message"] for code, a in answers if code == 409), answers
            assert not violations, violations

            def settled():
                from exod.daemon import state

                for node in nodes:
                    instances = {i.instance_id: i for i in state.instances(node.view)}
                    if any(instances.get(iid) is None or instances[iid].state not in
                           (pb.INSTANCE_READY, pb.INSTANCE_FAILED) for iid in placed):
                        return False
                return True
            await until(settled, 180)
            # Each ledger holds exactly its running ranks (by reservation id and by bytes).
            await until(lambda: all(set(n.ledger.held) == {f"{i}-{r}" for i, r in n.work.processes} for n in nodes), 30)
            for node in nodes:
                held = sum(r.bytes for r in node.ledger.held.values())
                assert held == sum(node.work.processes[k].spec.estimated_bytes for k in node.work.processes)
                assert held <= node.record.profile.memory_usable_bytes
            assert not violations, violations
        finally:
            for node in nodes:
                await node.stop()

    asyncio.run(asyncio.wait_for(scenario(), 400))
