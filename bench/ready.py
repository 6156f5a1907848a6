"""Time to Ready through the daemon against a plain launch, in one run.

  exod_ready_s       POST /v1/instances on one of two local daemons (loopback,
                     static peers) until the instance is Ready: planning,
                     reservations, runner start, load and the canary. Each
                     daemon keeps a pre-started runner (the default).
  exod_cold_ready_s  the same with `exod start --no-prestart`: every rank
                     process starts from nothing, as mlx.launch's do
  mlx_lm_ready_s     spawning the ranks as `mlx.launch` does until mlx-lm's
                     sharded_load returns on every rank (bench/mlx_lm_worker.py)

Same model, ranks and strategy; the model is built before timing starts;
the three are interleaved and each is the median of the repeats (every
sample is in *_samples: MLX's ring waits a whole second when a rank
connects before its peer listens, which the baseline hits at random and
exod's runners avoid by meeting first). The target is an overhead of at
most 20% for what `exod start` does by default; cold starts are reported
against the same target."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from exod.models import synthetic

from .runner import WORKER, models_dir

REPO = Path(__file__).resolve().parent.parent
TARGET_OVERHEAD = 0.20


def _daemon(data: Path, name: str, peers: list[str], prestart: bool):
    args = [sys.executable, "-m", "exod.daemon.cli", "start", "--name", name, "--api-port", "0", "--grpc-port", "0",
            "--grpc-host", "127.0.0.1", "--no-discovery", "--data-dir", str(data / name)]
    if not prestart:
        args.append("--no-prestart")
    for peer in peers:
        args += ["--peer", peer]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, json.loads(proc.stdout.readline())


def _call(api: str, method: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def exod_ready(api: str, model: str, strategy: str) -> float:
    start = time.monotonic()
    instance = _call(api, "POST", "/v1/instances",
                     {"model": model, "strategy": strategy, "ranks": 2, "context_length": 1024})
    iid = instance["instance_id"]
    while True:
        instance = _call(api, "GET", f"/v1/instances/{iid}")
        if instance["state"] == "INSTANCE_READY":
            elapsed = time.monotonic() - start
            break
        if instance["state"] == "INSTANCE_FAILED" or time.monotonic() - start > 600:
            raise RuntimeError(f"instance did not become Ready: {instance.get('reason')}")
        time.sleep(0.05)
    _call(api, "DELETE", f"/v1/instances/{iid}")
    return elapsed


def mlx_lm_ready(model_dir: Path, strategy: str) -> float:
    from exod.runner.launch import free_ports

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as hostfile:
        json.dump([[f"127.0.0.1:{p}"] for p in free_ports(2)], hostfile)
    env = {**os.environ, "BENCH_SPAWNED_AT": repr(time.time())}
    args = [sys.executable, str(WORKER), str(model_dir), strategy, "1", "4"]
    try:
        procs = [subprocess.Popen(args, env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile.name},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        os.unlink(hostfile.name)
    if any(p.returncode for p in procs):
        raise RuntimeError("mlx-lm baseline failed: " + outs[0][1][-400:])
    return json.loads(outs[0][0].strip().splitlines()[-1])["ready_s"]


def _cluster(data: Path, model: str, built: Path, prestart: bool):
    """Two daemons that both have the built model; (api, processes)."""
    for name in ("a", "b"):
        (data / name / "models").mkdir(parents=True)
        os.symlink(built, data / name / "models" / model)
    a, first = _daemon(data, "a", [], prestart)
    b, _ = _daemon(data, "b", [f"127.0.0.1:{first['grpc_port']}"], prestart)
    api = first["api"]
    deadline = time.monotonic() + 30
    while len(_call(api, "GET", "/v1/nodes")["nodes"]) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the daemons never met")
        time.sleep(0.1)
    if prestart:
        time.sleep(3)  # the spare runners import MLX once, at start
    return api, (a, b)


def run(quick: bool = False) -> dict:
    model = "demo" if quick else "midsize-moe"
    repeats = 1 if quick else 5
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        built = synthetic.ensure_named(model, models_dir())
        warm_api, warm = _cluster(Path(tmp) / "warm", model, built, prestart=True)
        cold_api, cold = _cluster(Path(tmp) / "cold", model, built, prestart=False)
        try:
            for strategy in ("tensor", "pipeline"):
                samples = {"exod": [], "exod_cold": [], "mlx_lm": []}
                for _ in range(repeats):  # interleaved
                    samples["mlx_lm"].append(mlx_lm_ready(built, strategy))
                    samples["exod_cold"].append(exod_ready(cold_api, model, strategy))
                    samples["exod"].append(exod_ready(warm_api, model, strategy))
                    time.sleep(2)  # the spare that replaces the used one imports, alone
                row = {"strategy": strategy, "ranks": 2}
                for key, values in samples.items():
                    row[f"{key}_ready_s"] = statistics.median(values)
                for key, values in samples.items():
                    row[f"{key}_samples"] = [round(v, 3) for v in values]
                row["overhead"] = row["exod_ready_s"] / row["mlx_lm_ready_s"] - 1
                row["cold_overhead"] = row["exod_cold_ready_s"] / row["mlx_lm_ready_s"] - 1
                row["meets_target"] = row["overhead"] <= TARGET_OVERHEAD
                row["cold_meets_target"] = row["cold_overhead"] <= TARGET_OVERHEAD
                results.append(row)
        finally:
            for proc in (*warm, *cold):
                proc.terminate()
                proc.wait(10)
    return {"bench": "ready", "model": model, "repeats": repeats, "target_overhead": TARGET_OVERHEAD,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs", "results": results}
