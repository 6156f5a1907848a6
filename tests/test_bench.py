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
    sizes = {(r["model"], r["nodes"]) for r in report["results"]}
    assert {n for _, n in sizes} == {2, 8, 16, 64}
    for r in report["results"]:
        assert r["candidates"] > 0 and r["plan_median_ms"] > 0 and r["chosen"]
