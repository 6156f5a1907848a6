"""The benchmarks run and produce well-formed reports (never a speed assertion)."""

import json
import subprocess
import sys

from .conftest import REPO


def test_planning_bench_reports_every_size():
    proc = subprocess.run([sys.executable, "-m", "bench", "planning", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    assert report["bench"] == "planning"
    sizes = {(r["model"], r["nodes"], r["routing_counts"]) for r in report["results"]}
    assert {n for _, n, _ in sizes} == {2, 8, 16, 64}
    assert {(m, n) for m, n, routing in sizes if routing} == {(m, n) for m, n, routing in sizes if not routing}
    for r in report["results"]:
        assert r["candidates"] > 0 and r["plan_median_ms"] > 0 and r["chosen"]


def test_runner_bench_compares_with_mlx_lm(tmp_path):
    env = {**__import__("os").environ, "EXOD_BENCH_MODELS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench", "runner", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["bench"] == "runner" and report["single_process_decode_tokens_per_s"] > 0
    rows = {(r["strategy"], r["ranks"]): r for r in report["results"]}
    assert set(rows) == {("tensor", 2), ("pipeline", 2), ("moe_tensor", 2)}
    for (strategy, _), row in rows.items():
        assert row["exod_decode_tokens_per_s"] > 0 and row["exod_ready_s"] > 0
        if strategy != "moe_tensor":
            assert row["mlx_lm_decode_tokens_per_s"] > 0 and "decode_ratio" in row


def test_discovery_bench_reports_a_full_view_time():
    proc = subprocess.run([sys.executable, "-m", "bench", "discovery", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["bench"] == "discovery" and report["ok"] and len(report["full_view_s"]) == report["rounds"]
    assert all(t > 0 for t in report["full_view_s"]) and report["idle_bytes_per_s_per_node"] > 0


def test_ready_bench_compares_with_a_plain_launch(tmp_path):
    env = {**__import__("os").environ, "EXOD_BENCH_MODELS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench", "ready", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["bench"] == "ready" and {r["strategy"] for r in report["results"]} == {"tensor", "pipeline"}
    for row in report["results"]:
        assert row["exod_ready_s"] > 0 and row["exod_cold_ready_s"] > 0 and row["mlx_lm_ready_s"] > 0
        assert "meets_target" in row and "cold_meets_target" in row
        assert len(row["exod_samples"]) == len(row["mlx_lm_samples"]) == report["repeats"]


def test_hetero_bench_places_what_no_even_plan_fits_and_it_runs_within_the_memory_given():
    """The heterogeneous bench's memory case on two namespace hosts, the
    slow one in a CPU cgroup: no even plan fits the slow host's memory,
    the planner's uneven plan does, runs, and its slow rank's measured peak
    stays within the memory the host was given (no speed is compared)."""
    from bench import hetero

    report = hetero.run(smallest=True)
    assert report["ok"], report.get("error")
    memory = report["memory"]
    assert memory["even_plans_that_fit"] == []
    assert memory["chosen"] is not None and memory["tokens_per_s"] > 0
    shares = memory["chosen"]["shares"]
    assert shares[0] != shares[1], "an uneven plan"
    assert memory["peak_rss_bytes"][1] <= memory["slow_host_usable_bytes"]
    assert memory["meets_goal"]


def test_decode_rates_outvote_a_stall_but_keep_periodic_costs():
    from bench.runner import window_rate
    from bench.serving import paired_ratio

    # 100 tokens/s with a 0.5 s stall once: the whole-run mean drops to 76,
    # the windowed median does not.
    times = [i * 0.01 + (0.5 if i >= 50 else 0.0) for i in range(161)]
    assert abs(window_rate(times) - 100) < 1e-6
    assert (len(times) - 1) / (times[-1] - times[0]) < 80
    # A cost every 4th step (a control) stays in every window: 3 steps of
    # 10 ms and one of 14 ms are 16 tokens in 0.176 s.
    steps = [0.014 if i % 4 == 3 else 0.01 for i in range(160)]
    times = [sum(steps[:i]) for i in range(161)]
    assert abs(window_rate(times) - 16 / 0.176) < 1e-6
    assert window_rate(times[:10]) == 0.0
    # Pairs measured back to back: a slow spell that spans a pair cancels.
    assert paired_ratio([90, 45, 95], [100, 50, 100]) == 0.9
