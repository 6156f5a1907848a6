"""The benchmark suite cannot rot: its smallest cell (the demo model on two
network-namespace hosts over the emulated 10 GbE link, pipeline) runs
through `python -m bench run` and leaves a well-formed report. No speed is
asserted; only that every figure the report promises is there and sane."""

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.netns import child_run, leftover_namespaces

REPO = Path(__file__).resolve().parent.parent


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_suites_smallest_cell_runs_and_writes_a_well_formed_report(tmp_path):
    out = tmp_path / "report.json"
    env, run = child_run()
    done = subprocess.run([sys.executable, "-m", "bench", "run", "--smallest", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and set(report["benchmarks"]) == {"matrix"}
    assert report["machine"]["cpus"] >= 1 and report["machine"]["mlx"]
    matrix = report["benchmarks"]["matrix"]
    assert matrix["ok"] is True and matrix["model"] == "demo"

    calibration = matrix["calibration"]["2"]
    assert _positive(calibration["decode_bytes_per_s"]) and calibration["busy_ranks"] == 2

    (link,) = matrix["links"]
    assert link["profile"] == "10gbe"
    assert _positive(link["rtt_median_s"]) and link["rtt_p10_s"] <= link["rtt_median_s"] <= link["rtt_p90_s"]
    assert _positive(link["bandwidth_bytes_per_s"])

    (cell,) = matrix["cells"]
    assert (cell["profile"], cell["ranks"], cell["strategy"]) == ("10gbe", 2, "pipeline")
    assert _positive(cell["predicted_tokens_per_s"]) and _positive(cell["measured_tokens_per_s"])
    assert sum(cell["pipeline_layers"]) == 6 and min(cell["pipeline_layers"]) >= 1
    assert math.isclose(cell["error"], cell["predicted_tokens_per_s"] / cell["measured_tokens_per_s"] - 1)

    (choice,) = matrix["choices"]
    assert choice["planner_choice"] in ("pipeline", "moe_tensor", "tensor")
    assert choice["measured_fastest"] == "pipeline"  # the only strategy this cell ran

    summary = out.with_suffix(".txt").read_text()
    assert "10gbe" in summary and "pipeline" in summary
    assert not leftover_namespaces(run)
