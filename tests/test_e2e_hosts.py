"""End to end on real hosts: three network namespaces each running `exod
start` (mDNS, no static peers). The demo MoE model is placed with
moe_tensor over two nodes, hybrid over three (a stage of two cutting the
experts, a stage of one) and pipeline over three; all reach Ready;
the official openai client gets exactly the single-process greedy answer;
kill -9 of a runner fails the instance on every node within 5 s and leaves
nothing running; DELETE frees the memory; 20 concurrent placements never
overcommit a node."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from .conftest import REPO
from .netns import lab, leftover_namespaces
from .test_daemon_hosts import API, members, start, state, wait

CLIENT = r"""
import json, sys, openai
client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1", api_key="unused")
out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello world, what is a token?"}],
                                     temperature=0, max_tokens=24)
print(json.dumps({"text": out.choices[0].message.content}))
""" % API

RACE = r"""
import json, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
def place(i):
    body = json.dumps({"model": "demo", "strategy": "pipeline", "context_length": 256}).encode()
    req = urllib.request.Request("http://127.0.0.1:%d/v1/instances", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()).get("instance_id", "")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]
with ThreadPoolExecutor(20) as pool:
    print(json.dumps(list(pool.map(place, range(20)))))
""" % API


def in_ns(net, index, args, timeout=300):
    return subprocess.run(["ip", "netns", "exec", net.hosts[index], *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def http(net, index, method, path, body=None):
    args = ["curl", "-s", "-m", "120", "-X", method, "-w", "\n%{http_code}", f"http://127.0.0.1:{API}{path}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = in_ns(net, index, args).stdout
    text, _, code = out.rpartition("\n")
    return int(code or 0), json.loads(text) if text.strip() else {}


def instance_states(net, index, iid):
    found = next((i for i in (state(net, index) or {}).get("instances", []) if i["instance_id"] == iid), None)
    return found


def reserved(net, index):
    return {n["record"]["profile"]["name"]: int(n.get("memory_reserved_bytes", 0))
            for n in (state(net, index) or {}).get("nodes", [])}


def test_place_chat_fail_and_delete_on_three_hosts(tmp_path):
    procs = []
    try:
        with lab(3) as net:
            # 600 MB each: room for a few demo instances per node, so the race below must refuse some.
            daemons = [start(net, i, tmp_path, extra=["--memory-limit", "600MB"]) for i in range(3)]
            procs += daemons
            wait(lambda: all(set(members(state(net, i))) == {"h0", "h1", "h2"}
                             and set(members(state(net, i)).values()) == {"UP"} for i in range(3)), 30)

            # moe_tensor over two nodes.
            code, placed = http(net, 0, "POST", "/v1/instances",
                                {"model": "demo", "strategy": "moe_tensor", "nodes": ["h0", "h1"], "ranks": 2, "context_length": 512})
            assert code == 201, placed
            iid = placed["instance_id"]
            wait(lambda: all((i := instance_states(net, n, iid)) and i["state"] == "INSTANCE_READY" for n in range(3)), 180)

            # The openai client, inside h2 (a node that runs no rank): the single-process answer.
            answer = json.loads(in_ns(net, 2, [sys.executable, "-c", CLIENT]).stdout)["text"]
            reference = subprocess.run([sys.executable, "-c", (
                "import json; from mlx_lm import load, generate; from mlx_lm.sample_utils import make_sampler;"
                f"m, t = load('{tmp_path / 'h0' / 'models' / 'demo'}');"
                "p = t.apply_chat_template([{'role': 'user', 'content': 'hello world, what is a token?'}], add_generation_prompt=True);"
                "print(json.dumps(generate(m, t, prompt=p, max_tokens=24, sampler=make_sampler(0.0))))")],
                capture_output=True, text=True, cwd=REPO, timeout=120)
            assert answer == json.loads(reference.stdout.strip().splitlines()[-1])

            # kill -9 of the runner on h1: Failed on every node within 5 s, nothing left running.
            runner = next(r for r in instance_states(net, 0, iid)["runners"] if r.get("rank", 0) == 1)
            os.kill(runner["pid"], signal.SIGKILL)
            killed = time.monotonic()
            wait(lambda: all((i := instance_states(net, n, iid)) and i["state"] == "INSTANCE_FAILED" for n in range(3)), 10, 0.05)
            assert time.monotonic() - killed < 5.0
            pids = [r["pid"] for r in instance_states(net, 0, iid)["runners"] if r.get("pid")]
            wait(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                 for p in pids), 15)
            wait(lambda: not any(reserved(net, 0).values()), 15)
            assert http(net, 0, "DELETE", f"/v1/instances/{iid}")[0] == 200

            # hybrid over three nodes: a stage of two ranks cutting the experts, a stage of one; the
            # same greedy answer, every rank's shard fetched for its stage.
            code, placed = http(net, 2, "POST", "/v1/instances",
                                {"model": "demo", "strategy": "hybrid", "ranks": 3, "context_length": 512})
            assert code == 201, placed
            stages = placed["placement"]["stage_ranks"]
            assert sorted(stages) == [1, 2] and placed["placement"]["stage_strategy"] == "MOE_TENSOR", placed
            iid = placed["instance_id"]
            wait(lambda: all((i := instance_states(net, n, iid)) and i["state"] == "INSTANCE_READY" for n in range(3)), 180)
            assert json.loads(in_ns(net, 0, [sys.executable, "-c", CLIENT]).stdout)["text"] == answer
            assert http(net, 2, "DELETE", f"/v1/instances/{iid}")[0] == 200
            wait(lambda: all(not any(reserved(net, n).values()) for n in range(3)), 15)

            # pipeline over three nodes, then DELETE frees the memory everywhere.
            code, placed = http(net, 1, "POST", "/v1/instances",
                                {"model": "demo", "strategy": "pipeline", "ranks": 3, "context_length": 512})
            assert code == 201 and len(placed["placement"]["ranks"]) == 3, placed
            iid = placed["instance_id"]
            wait(lambda: (i := instance_states(net, 2, iid)) and i["state"] == "INSTANCE_READY", 180)
            assert all(v > 0 for v in reserved(net, 2).values())
            assert http(net, 1, "DELETE", f"/v1/instances/{iid}")[0] == 200
            wait(lambda: all(not any(reserved(net, n).values()) for n in range(3)), 15)

            # 20 concurrent placements through one node: each placed or refused with a reason,
            # and no node ever holds more than it may.
            results = json.loads(in_ns(net, 0, [sys.executable, "-c", RACE]).stdout)
            assert len(results) == 20
            placed = [iid for code, iid in results if code == 201]
            refused = [why for code, why in results if code != 201]
            assert all(code in (201, 409) for code, _ in results)
            assert placed and refused and all(why for why in refused)
            nodes = {n["record"]["profile"]["name"]: n for n in state(net, 0)["nodes"]}
            for name, node in nodes.items():
                assert int(node.get("memory_reserved_bytes", 0)) <= int(node["record"]["profile"]["memory_usable_bytes"])
            for iid in placed:
                http(net, 0, "DELETE", f"/v1/instances/{iid}")
            wait(lambda: not any(reserved(net, 0).values()), 30)
            for d in daemons:
                d.send_signal(signal.SIGTERM)
            for d in daemons:
                d.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not leftover_namespaces()
