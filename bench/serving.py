"""Serving many requests at once, side by side in one run, on the demo model:

  throughput      aggregate generated tokens/s for 1, 2, 4, 8 and 16
                  concurrent streamed chats (greedy, different prompts, the
                  same client) against mlx_lm.server on one node, exod on
                  one node (one rank), and exod with moe_tensor and pipeline
                  over two network-namespace hosts; each exod figure over
                  mlx_lm.server's at the same concurrency, the median of
                  the ratios of samples taken back to back (goal: one node
                  >= 0.9x), and for 8 concurrent requests the share of the
                  wall time after which the first of them finished (requests
                  progress together when it is >= 0.5, one after another
                  when it is about 1/8)
  ttft            time to first token of a ~1,500-token first turn, asked
                  twice: exod one node with the prefix cache and with it off
                  (prefix_cache_bytes 0), moe_tensor over two hosts with it,
                  and mlx_lm.server (goal: the repeat at most 0.2x the first
                  with the cache)
  decode_step     greedy decode tokens/s of one request, exod tensor x 2
                  against mlx-lm's own sharded generate loop on the same
                  ranks (bench/runner.py's worker), interleaved; the ratio
                  (the median over rounds of exod's sample over mlx-lm's)
                  is the lockstep's cost per decode step (goal >= 0.9x)
  batch_invariance
                  the largest difference of any logprob between a sequence
                  decoded alone and in a batch of four (mlx-lm's
                  BatchGenerator, tiny models, fp32 / bf16 / fp16 / 4-bit)

Every exod figure goes through the daemon's HTTP API, as a user's would.
Needs root and iproute2 (the two-host cases); takes about 10 minutes on a
2-core machine (--quick: fewer tokens, about 5)."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from exod.daemon import keys
from exod.models import synthetic

from . import runner
from .runner import models_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import lab  # noqa: E402

CLIENTS = Path(__file__).resolve().parent / "serving_clients.py"
CONCURRENCY = (1, 2, 4, 8, 16)
CONTEXT = 4096
TTFT_PROMPT_TOKENS = 1500
API = 52415
TARGET_RATIO = 0.9
# One request's decode in decode_step: eight windows of 16 tokens.
DECODE_TOKENS = 128
TARGET_TTFT = 0.2


# ------------------------------------------------------------------ servers


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s")
        time.sleep(0.2)


def _http(url: str, method: str = "GET", body=None, timeout: float = 60):
    """The answer's JSON, whatever its status (an error body is an answer too)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"{}")


class Host:
    """Where a server's API is reached from: this machine, or a namespace
    host (through curl and a client process run inside it)."""

    def __init__(self, net=None, index: int = 0):
        self.net, self.index = net, index

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.net.hosts[self.index]] if self.net else []

    def call(self, url: str, method: str = "GET", body=None):
        if self.net is None:
            return _http(url, method, body)
        args = [*self.prefix(), "curl", "-s", "-m", "60", "-X", method, "-H", "Content-Type: application/json", url]
        if body is not None:
            args += ["-d", json.dumps(body)]
        return json.loads(subprocess.run(args, capture_output=True, text=True, timeout=90).stdout)

    def clients(self, spec: dict) -> list[dict]:
        out = subprocess.run([*self.prefix(), sys.executable, str(CLIENTS), json.dumps(spec)],
                             capture_output=True, text=True, timeout=spec.get("timeout_s", 900) + 60, cwd=REPO)
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])["requests"]
        except (ValueError, IndexError):
            raise RuntimeError(f"the clients failed: {(out.stderr or out.stdout).strip()[-300:]}") from None


def _exod_daemon(data: Path, name: str, built: Path, env: dict, host: Host, extra=()):
    (data / name / "models").mkdir(parents=True, exist_ok=True)
    link = data / name / "models" / "demo"
    if not link.exists():
        os.symlink(built, link)
    args = [sys.executable, "-m", "exod.daemon.cli", "start", "--name", name, "--data-dir", str(data / name),
            *extra]
    return subprocess.Popen([*host.prefix(), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _place(host: Host, api: str, body: dict) -> str:
    placed = host.call(api + "/v1/instances", "POST", body)
    if "instance_id" not in placed:
        raise RuntimeError(f"placing {body} failed: {placed}")
    iid = placed["instance_id"]
    _wait(lambda: _ready(host, api, iid), 300, f"instance {iid} was not Ready")
    return iid


def _ready(host: Host, api: str, iid: str) -> bool:
    state = host.call(f"{api}/v1/instances/{iid}")["state"]
    if state == "INSTANCE_FAILED":
        raise RuntimeError(f"instance {iid} failed")
    return state == "INSTANCE_READY"


def _delete(host: Host, api: str, iid: str) -> None:
    host.call(f"{api}/v1/instances/{iid}", "DELETE")
    _wait(lambda: host.call(f"{api}/v1/instances/{iid}").get("state") in ("INSTANCE_STOPPED", None), 60,
          f"instance {iid} did not stop")


# ------------------------------------------------------------------ measurements


def _instances(host: Host, url: str) -> list:
    """What an exod daemon says of its instances (for an error's message)."""
    try:
        return [(i["instance_id"], i["state"], i.get("reason", ""), [r.get("reason", "") for r in i["runners"]])
                for i in host.call(url + "/v1/instances").get("instances", [])]
    except Exception as e:  # mlx_lm.server has no such route; this is only for the message
        return [f"unknown ({type(e).__name__})"]


def prompts(n: int, tag: str) -> list[list[dict]]:
    return [[{"role": "user", "content": f"request {tag}-{i}: what is a token, and why does it matter?"}]
            for i in range(n)]


def throughput(host: Host, url: str, concurrency: int, max_tokens: int, tag: str, model: str = "demo") -> dict:
    requests = [{"messages": m, "max_tokens": max_tokens} for m in prompts(concurrency, tag)]
    results = host.clients({"url": url, "model": model, "requests": requests})
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        raise RuntimeError(f"{url}: {errors[0]}; instances: {_instances(host, url)}")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": tokens / wall,
            "first_finish_fraction": min(r["end"] - r["start"] for r in results) / wall,
            "ttft_median_s": statistics.median(r["first"] for r in results if r["first"] is not None)}


def long_prompt(model_dir: Path) -> list[dict]:
    """A user message whose chat prompt is about TTFT_PROMPT_TOKENS tokens."""
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(model_dir)
    words = [f"{w}" for w in ("the", "model", "token", "cluster", "memory", "rank", "batch", "cache")]
    text, n = [], 0
    while n < TTFT_PROMPT_TOKENS:
        text.extend(words[(len(text) * 7) % len(words)] + str(len(text) % 13) for _ in range(50))
        n = len(tokenizer.apply_chat_template([{"role": "user", "content": " ".join(text)}],
                                              add_generation_prompt=True))
    return [{"role": "user", "content": " ".join(text)}]


def ttft(host: Host, url: str, messages: list[dict], model: str = "demo") -> dict:
    """The same first turn twice, one after the other."""
    times = []
    for _ in range(2):
        (result,) = host.clients({"url": url, "model": model, "requests": [{"messages": messages, "max_tokens": 4}]})
        if result.get("error") or result.get("first") is None:
            raise RuntimeError(f"{url}: {result.get('error') or 'no token'}; instances: {_instances(host, url)}")
        times.append(result["first"] - result["start"])
    return {"first_s": times[0], "repeat_s": times[1], "repeat_over_first": times[1] / times[0],
            "prompt_tokens": result.get("prompt_tokens")}


def decode_step(model_dir: Path, repeats: int, max_tokens: int) -> dict:
    """One request's decode, tensor x 2: exod against mlx-lm's own loop
    (stream_generate, the goal's baseline) and against mlx-lm's
    BatchGenerator with one request (the batched engine exod's runner
    builds on), interleaved. Each rank on a core of its own, as on two
    machines: two ranks left to the scheduler on two cores moved single
    samples by 2x (65 to 178 tok/s for the same run).

    A sample's rate is the median over windows of 16 tokens
    (runner.window_rate), which holds every periodic cost of the lockstep
    but not a stall of the shared machine; whole-run means are kept too."""
    kinds = ("exod", "exod_concurrency_1", "mlx_lm", "mlx_lm_batch_generator")
    samples = {k: [] for k in kinds}
    means = {k: [] for k in kinds}
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    pinned = (os.cpu_count() or 1) >= 2
    runs = {
        "mlx_lm": lambda: runner.mlx_lm_run(model_dir, "tensor", 2, max_tokens, pinned),
        "mlx_lm_batch_generator": lambda: runner.mlx_lm_run(model_dir, "tensor", 2, max_tokens, pinned,
                                                            engine="batch"),
        "exod": lambda: runner.exod_run(model_dir, "tensor", 2, max_tokens, layers, pinned),
        # A placement of concurrency 1 decodes with generate_step (runner/engine.py).
        "exod_concurrency_1": lambda: runner.exod_run(model_dir, "tensor", 2, max_tokens, layers, pinned,
                                                      max_batch=1),
    }
    # The first run of each is slower (page cache, MLX's first compiles): not counted.
    runs["mlx_lm"]()
    runs["exod"]()
    for _ in range(repeats):  # interleaved
        for kind in kinds:
            result = runs[kind]()
            samples[kind].append(result["decode_window_tokens_per_s"])
            means[kind].append(result["decode_tokens_per_s"])
    exod, alone, mlx, batch = (statistics.median(samples[k]) for k in kinds)
    paired, paired_alone = (paired_ratio(samples[k], samples["mlx_lm"]) for k in ("exod", "exod_concurrency_1"))
    return {"strategy": "tensor", "ranks": 2, "pinned": pinned, "tokens": max_tokens,
            "rate": f"median over windows of {runner.WINDOW_TOKENS} tokens, then over samples",
            "exod_decode_tokens_per_s": exod, "mlx_lm_decode_tokens_per_s": mlx,
            "mlx_lm_batch_generator_decode_tokens_per_s": batch,
            "exod_concurrency_1_decode_tokens_per_s": alone,
            # Each sample of exod over the mlx-lm sample of the same round, the median kept.
            "ratio": paired, "concurrency_1_ratio": paired_alone,
            "ratio_of_medians": exod / mlx, "concurrency_1_ratio_of_medians": alone / mlx,
            "over_mlx_lm_batch_generator": paired_ratio(samples["exod"], samples["mlx_lm_batch_generator"]),
            "mlx_lm_batch_generator_over_mlx_lm": paired_ratio(samples["mlx_lm_batch_generator"], samples["mlx_lm"]),
            "target": TARGET_RATIO, "meets_target": paired >= TARGET_RATIO,
            "whole_run_means": {k: statistics.median(v) for k, v in means.items()},
            "samples": {k: [round(v, 2) for v in vs] for k, vs in samples.items()}}


def batch_invariance(work: Path) -> list[dict]:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load_model

    cases = [("qwen3_moe", None, "float32"), ("qwen3_moe", {"group_size": 32, "bits": 4}, "bfloat16"),
             ("llama", None, "bfloat16"), ("llama", None, "float16")]
    batch = [[1, 17, 42, 99, 7, 300, 5, 250], [3, 9, 27], list(range(40, 100)), [7] * 20]
    rows = []
    for name, quant, dtype in cases:
        out = work / f"{name}-{dtype}-{'q4' if quant else 'full'}"
        synthetic.build(out, synthetic.TINY_CONFIGS[name], quantization=quant, dtype=dtype)
        model, _ = load_model(out)

        def run(prompts):
            generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
            uids = generator.insert(prompts, max_tokens=[12] * len(prompts))
            logprobs, done = {u: [] for u in uids}, set()
            while len(done) < len(uids):
                for r in generator.next()[1]:
                    logprobs[r.uid].append(np.array(r.logprobs.astype(mx.float32)))
                    done.update([r.uid] if r.finish_reason else [])
            return [logprobs[u] for u in uids]

        together = run(batch)
        worst = max(float(np.abs(a - b).max()) for i, p in enumerate(batch)
                    for a, b in zip(run([p])[0], together[i]))
        rows.append({"model": name, "weights": "4-bit" if quant else dtype, "activations": dtype,
                     "max_abs_logprob_difference": worst})
    return rows


# ------------------------------------------------------------------ the run


def paired_ratio(ours: list[float], base: list[float]) -> float:
    """The median over repeats of ours / base, each pair measured back to
    back: a slow spell of the shared machine that spans a pair cancels."""
    return statistics.median(o / b for o, b in zip(ours, base))


def median_run(runs: list[dict]) -> dict:
    """The run with the median aggregate rate, and every run's rate."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "samples_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs]}


def run(quick: bool = False) -> dict:
    max_tokens = 32 if quick else 64
    # A 64-token chat alone takes under a second here, so one scheduler
    # hiccup moves a sample by a third: five samples, the median kept.
    repeats = 1 if quick else 7
    model_dir = synthetic.ensure_named("demo", models_dir())
    env = {**os.environ, "EXOD_CLUSTER_KEY": keys.new_cluster_key()}
    report = {"bench": "serving", "model": "demo", "max_tokens": max_tokens, "context": CONTEXT,
              "concurrency": list(CONCURRENCY),
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"}
    procs = []
    with tempfile.TemporaryDirectory() as tmp, lab(2) as net:
        data = Path(tmp)
        local = Host()
        try:
            # mlx_lm.server, one node: its defaults (batching on, its prompt cache on).
            from exod.runner.launch import free_ports

            # It serves the model it was started with as "default_model" (any
            # other name is a path or a hub id it would try to load).
            (mlx_port,) = free_ports(1)
            procs.append(subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
                                           "--port", str(mlx_port)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            mlx_url = f"http://127.0.0.1:{mlx_port}"
            _wait(lambda: _http(mlx_url + "/health"), 120, "mlx_lm.server did not answer")

            # exod, one node (one rank), on this machine's loopback.
            solo = _exod_daemon(data, "solo", model_dir, env, local,
                                ("--api-port", "0", "--grpc-port", "0", "--grpc-host", "127.0.0.1",
                                 "--no-discovery"))
            procs.append(solo)
            solo_api = json.loads(solo.stdout.readline())["api"]
            body = {"model": "demo", "ranks": 1, "context_length": CONTEXT, "concurrency": 16}
            solo_iid = _place(local, solo_api, body)

            # exod over two namespace hosts (mDNS finds the peer), reached from host 0.
            for i in range(2):
                procs.append(_exod_daemon(data, f"h{i}", model_dir, env, Host(net, i),
                                          ("--api-port", str(API), "--cluster", "bench")))
            h0, pair_api = Host(net, 0), f"http://127.0.0.1:{API}"
            _wait(lambda: len([n for n in h0.call(pair_api + "/v1/nodes")["nodes"] if n.get("status") == "UP"]) == 2,
                  60, "the two hosts did not meet")
            pair = {"model": "demo", "nodes": ["h0", "h1"], "ranks": 2, "context_length": CONTEXT, "concurrency": 16}
            moe_iid = _place(h0, pair_api, {**pair, "strategy": "moe_tensor"})

            # Each server answers a few chats first: no sample pays for a
            # server's first requests (lazy allocations, first shapes).
            for host, url, model in ((local, mlx_url, "default_model"), (local, solo_api, "demo"), (h0, pair_api, "demo")):
                throughput(host, url, 4, max_tokens, "warm", model)
            rows = []
            for c in CONCURRENCY:  # interleaved: each concurrency on each server in turn, `repeats` times
                samples = {"mlx_lm_server": [], "exod_one_node": [], "exod_moe_tensor_2_hosts": []}
                for r in range(repeats):
                    samples["mlx_lm_server"].append(
                        throughput(local, mlx_url, c, max_tokens, f"m{c}.{r}", "default_model"))
                    samples["exod_one_node"].append(throughput(local, solo_api, c, max_tokens, f"s{c}.{r}"))
                    samples["exod_moe_tensor_2_hosts"].append(throughput(h0, pair_api, c, max_tokens, f"t{c}.{r}"))
                rows.append({"concurrency": c, **{k: median_run(v) for k, v in samples.items()}})
                print(f"bench serving: concurrency {c} done", file=sys.stderr, flush=True)

            long = long_prompt(model_dir)
            report["ttft"] = {"mlx_lm_server": ttft(local, mlx_url, long, "default_model"),
                              "exod_one_node_cache": ttft(local, solo_api, long),
                              "exod_moe_tensor_2_hosts_cache": ttft(h0, pair_api, long)}
            _delete(h0, pair_api, moe_iid)
            pipe_iid = _place(h0, pair_api, {**pair, "strategy": "pipeline"})
            throughput(h0, pair_api, 4, max_tokens, "warm")
            for row in rows:
                c = row["concurrency"]
                row["exod_pipeline_2_hosts"] = median_run(
                    [throughput(h0, pair_api, c, max_tokens, f"p{c}.{r}") for r in range(repeats)])
            _delete(h0, pair_api, pipe_iid)
            _delete(local, solo_api, solo_iid)
            _place(local, solo_api, {**body, "prefix_cache_bytes": 0})
            report["ttft"]["exod_one_node_no_cache"] = ttft(local, solo_api, long)
            for row in rows:
                base = row["mlx_lm_server"]
                for key in ("exod_one_node", "exod_moe_tensor_2_hosts", "exod_pipeline_2_hosts"):
                    row[key]["over_mlx_lm_server_of_medians"] = row[key]["tokens_per_s"] / base["tokens_per_s"]
                    # Pipeline's samples come after the others (its placement
                    # replaces moe_tensor's): no pairs, the medians' ratio.
                    row[key]["over_mlx_lm_server"] = (
                        row[key]["over_mlx_lm_server_of_medians"] if key == "exod_pipeline_2_hosts" else
                        paired_ratio(row[key]["samples_tokens_per_s"], base["samples_tokens_per_s"]))
            report["throughput"] = rows
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

        cache = report["ttft"]["exod_one_node_cache"]["repeat_over_first"]
        one_node = [r["exod_one_node"]["over_mlx_lm_server"] for r in report["throughput"]]
        eight = next(r for r in report["throughput"] if r["concurrency"] == 8)
        report["summary"] = {
            "exod_one_node_over_mlx_lm_server_min": min(one_node),
            "exod_one_node_meets_0_9x_at_every_concurrency": min(one_node) >= TARGET_RATIO,
            "first_of_8_finishes_after_fraction_of_wall": {
                k: round(v["first_finish_fraction"], 3) for k, v in eight.items() if isinstance(v, dict)},
            "ttft_repeat_over_first_with_cache": cache,
            "ttft_meets_0_2x": cache <= TARGET_TTFT,
        }
    # Each sample is one short request on fresh ranks: seven, the median kept.
    report["decode_step"] = decode_step(model_dir, 1 if quick else 7, 48 if quick else DECODE_TOKENS)
    report["summary"]["decode_step_ratio"] = report["decode_step"]["ratio"]
    with tempfile.TemporaryDirectory() as tmp:
        report["batch_invariance"] = batch_invariance(Path(tmp))
    report["ok"] = True
    return report
