"""`python -m bench run [--quick]`: every benchmark in one run, one JSON
report (bench/report.json, or --out) and a short summary on stderr.

  discovery  last `exod start` to a full view on 3 namespace hosts
  planning   plan time, every candidate, 2/8/16/64 nodes
  ready      POST /v1/instances to all-Ready, against mlx.launch + sharded_load
  runner     decode and prefill tokens/s per strategy, against mlx-lm's own
             sharded generation and a single process
  memory     estimated against measured peak per rank, per strategy
  traffic    per-node bytes/s idle and with 50 dashboards polling at 1 Hz
  matrix     link profile x world size x strategy: predicted against measured
             decode tokens/s, and whether the planner's choice was fastest
  security   the peer plane with and without mutual TLS: heartbeat round
             trip, a streamed 64-token answer, bulk throughput
  chaos      a soak on 3 namespace hosts with runner and daemon kills, restarts
             and link cuts, checking invariants all along (15 min; quick: 3)
  transfer   checkpoint bytes between namespace hosts against raw TCP (an
             unlimited veth and a 20 Mbit tbf link), and time to Ready when
             only a third host holds the model, against copying it first
  serving    concurrent chats against mlx_lm.server (1-16 at once, one node
             and two hosts), TTFT with and without the prefix cache, the
             lockstep's cost per decode step
  hetero     hosts of unequal speed (cgroup CPU caps) and memory: the
             planner's choice against the best even plan, and experts placed
             by measured routing against an even split

A benchmark that fails is recorded with its error and the others still run;
the exit status says whether all of them ran."""

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from . import (chaos, discovery, hetero, matrix, memory, planning, ready, runner, security, serving, traffic,
               transfer)

SUITE = {
    "discovery": discovery.run, "planning": planning.run, "ready": ready.run, "runner": runner.run,
    "memory": memory.run, "traffic": traffic.run, "matrix": matrix.run, "security": security.run,
    "chaos": chaos.run,
    "transfer": transfer.run,
    "serving": serving.run,
    "hetero": hetero.run,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "report.json"


def machine() -> dict:
    from exod.daemon.profile import chip

    import mlx.core as mx

    return {"chip": chip(), "cpus": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "mlx": mx.__version__}


def run_suite(quick: bool, only: list[str] | None = None, smallest: bool = False) -> dict:
    """smallest: only the matrix's smallest cell (what the test runs)."""
    names = ["matrix"] if smallest else (only or list(SUITE))
    started = time.time()
    report = {"suite": "exod bench", "quick": quick, "machine": machine(), "started_unix": int(started),
              "benchmarks": {}}
    for name in names:
        began = time.monotonic()
        try:
            result = matrix.run(smallest=True) if smallest else SUITE[name](quick=quick)
        except Exception as e:  # one broken benchmark must not hide the others' figures
            result = {"bench": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=5)}
        result["elapsed_s"] = time.monotonic() - began
        report["benchmarks"][name] = result
        print(f"bench: {name} done in {result['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
    report["elapsed_s"] = time.time() - started
    report["ok"] = all(b.get("ok", True) for b in report["benchmarks"].values())
    report["headline"] = headline(report)
    return report


def _fmt(value, unit="", digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def headline(report: dict) -> dict:
    """The few figures the README quotes."""
    b = report["benchmarks"]
    out = {}
    if b.get("discovery", {}).get("ok", True) and "full_view_median_s" in b.get("discovery", {}):
        out["discovery_full_view_s"] = b["discovery"]["full_view_median_s"]
        out["idle_bytes_per_s_per_node"] = b["discovery"]["idle_bytes_per_s_per_node"]
    for row in b.get("planning", {}).get("results", []):
        plans = out.setdefault("plan_ms", {})  # the slowest model's median at each size
        plans[f"{row['nodes']} nodes"] = max(plans.get(f"{row['nodes']} nodes", 0), row["plan_median_ms"])
    for row in b.get("ready", {}).get("results", []):
        out[f"ready_{row['strategy']}"] = {"exod_s": row["exod_ready_s"], "mlx_lm_s": row["mlx_lm_ready_s"],
                                           "overhead": row["overhead"]}
    if "results" in b.get("runner", {}):
        out["single_process_decode_tokens_per_s"] = b["runner"]["single_process_decode_tokens_per_s"]
        for row in b["runner"]["results"]:
            out[f"decode_{row['strategy']}_{row['ranks']}"] = {
                "exod": row["exod_decode_tokens_per_s"], "mlx_lm": row.get("mlx_lm_decode_tokens_per_s"),
                "prefill": row["exod_prompt_tokens_per_s"]}
    if "worst_ratio_error" in b.get("memory", {}):
        out["memory_worst_estimate_error"] = b["memory"]["worst_ratio_error"]
    if b.get("traffic", {}).get("ok"):
        out["traffic_bytes_per_s_per_node"] = {"idle": b["traffic"]["idle_bytes_per_s_per_node"],
                                               "polling_50": b["traffic"]["polling_bytes_per_s_per_node"]}
    if b.get("transfer", {}).get("ok"):
        t = b["transfer"]
        out["transfer_over_raw_tcp"] = {link: v["exod_over_raw_tcp"] for link, v in t["throughput"].items()}
        out["transfer_over_tbf_rate"] = {link: v["exod_over_tbf_rate"] for link, v in t["throughput"].items()
                                         if "exod_over_tbf_rate" in v}
        out["transfer_ready_s"] = {"shards": t["time_to_ready"]["shards"]["ready_s"],
                                   "copy_first": t["time_to_ready"]["copy_first"]["ready_s"],
                                   "bytes_ratio": t["time_to_ready"]["bytes_ratio"]}
    if b.get("matrix", {}).get("ok"):
        out["matrix_choice_right"] = b["matrix"]["choice_right_fraction"]
        out["matrix_worst_prediction_error"] = b["matrix"]["worst_prediction_error"]
    if b.get("hetero", {}).get("ok") and "compute" in b["hetero"]:
        h = b["hetero"]
        out["hetero"] = {"chosen_over_best_even": h["compute"]["speedup_over_best_even"],
                         "fits_where_no_even_plan_does": h["memory"]["meets_goal"],
                         "routed_over_even_experts": h["routing"]["speedup"]}
    return out


def summary(report: dict) -> str:
    m = report["machine"]
    lines = [f"exod bench ({'quick' if report['quick'] else 'full'}) on {m['chip']}, {m['cpus']} CPUs, "
             f"mlx {m['mlx']}: {report['elapsed_s'] / 60:.1f} min"]
    for name, result in report["benchmarks"].items():
        if not result.get("ok", True):
            lines.append(f"  {name}: FAILED: {result.get('error')}")
    h = report["headline"]
    if "discovery_full_view_s" in h:
        lines.append(f"  discovery: full view in {h['discovery_full_view_s']:.2f} s (3 hosts)")
    if "plan_ms" in h:
        lines.append("  planning: " + ", ".join(f"{k} {v:.1f} ms" for k, v in h["plan_ms"].items()))
    for key in ("ready_tensor", "ready_pipeline"):
        if key in h:
            r = h[key]
            lines.append(f"  {key.replace('_', ' ')}: exod {r['exod_s']:.2f} s, mlx-lm {r['mlx_lm_s']:.2f} s "
                         f"({r['overhead']:+.0%})")
    for key, value in h.items():
        if key.startswith("decode_"):
            lines.append(f"  {key[7:]}: decode {value['exod']:.1f} tok/s (mlx-lm {_fmt(value['mlx_lm'], '', 1)}), "
                         f"prefill {value['prefill']:.1f} tok/s")
    if "single_process_decode_tokens_per_s" in h:
        lines.append(f"  single process: decode {h['single_process_decode_tokens_per_s']:.1f} tok/s")
    if "memory_worst_estimate_error" in h:
        lines.append(f"  memory: worst estimate vs peak {h['memory_worst_estimate_error']:.1%}")
    if "traffic_bytes_per_s_per_node" in h:
        t = h["traffic_bytes_per_s_per_node"]
        lines.append(f"  traffic: idle {max(t['idle']) / 1e3:.1f} kB/s per node, 50 dashboards "
                     f"{max(t['polling_50']) / 1e3:.1f} kB/s on the polled node")
    if "transfer_ready_s" in h:
        r = h["transfer_ready_s"]
        lines.append(f"  transfer: {', '.join(f'{k} {v:.2f}x raw TCP' for k, v in h['transfer_over_raw_tcp'].items())}, "
                     f"{', '.join(f'{k} {v:.2f}x' for k, v in h['transfer_over_tbf_rate'].items())} the tbf rate; "
                     f"Ready {r['shards']:.1f} s fetching shards vs "
                     f"{r['copy_first']:.1f} s copying first ({r['bytes_ratio']:.2f}x the bytes)")
    if report["benchmarks"].get("matrix", {}).get("ok"):
        lines.append(matrix.table(report["benchmarks"]["matrix"]))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench run")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", choices=sorted(SUITE), help="run just these (repeatable)")
    parser.add_argument("--smallest", action="store_true", help="only the matrix's smallest cell")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = run_suite(args.quick, args.only, args.smallest)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    text = summary(report)
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(text, file=sys.stderr)
    print(f"report: {args.out}", file=sys.stderr)
    return 0 if report["ok"] else 1
