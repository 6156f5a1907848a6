"""The planner's strategy choice against measurement, on ranks that each own
a core (as on two machines): `python -m bench matrix --pinned` on two link
profiles, thunderbolt-like and Wi-Fi-like, every strategy run and timed on
real ranks in network-namespace hosts. The planner's pick must be the
strategy measured fastest, or within the repeat-to-repeat spread of it.
Relative speeds only: no figure is asserted against a wall clock."""

import json
import subprocess
import sys
from pathlib import Path

from tests.netns import child_run, leftover_namespaces

REPO = Path(__file__).resolve().parent.parent
PROFILES = ["thunderbolt", "wifi"]


def test_the_planner_picks_the_strategy_measured_fastest_on_two_pinned_ranks():
    env, run = child_run()
    done = subprocess.run([sys.executable, "-m", "bench", "matrix", "--pinned", "--profiles", ",".join(PROFILES)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    print(json.dumps({"cells": report["cells"], "choices": report["choices"]}, indent=1))  # kept in the test log
    assert report["pinned"] is True and report["calibration"]["2"]["busy_ranks"] == 2
    assert [(c["profile"], c["ranks"]) for c in report["choices"]] == [(p, 2) for p in PROFILES]
    for choice in report["choices"]:
        cells = [c for c in report["cells"] if c["profile"] == choice["profile"]]
        # Every strategy the planner accepts here ran, each with its samples.
        assert {c["strategy"] for c in cells} == {"pipeline", "moe_tensor", "tensor"}
        assert all(len(c["measured_samples"]) == report["repeats"] >= 2 for c in cells)
        assert choice["spread"] >= 0
        assert choice["right"] or choice["tie"], (choice, [(c["strategy"], c["measured_samples"]) for c in cells])
    assert not leftover_namespaces(run)
