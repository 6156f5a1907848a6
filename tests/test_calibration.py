"""Per-node calibration: the fit, where it is kept, how the planner uses it,
and a real `exod calibrate` run whose figures the daemon then publishes."""

import json
import math
import subprocess
import sys

import pytest

from exod.daemon import calibration, profile
from exod.models import synthetic
from exod.models.inventory import from_config
from exod.placement import cost, planner
from exod.placement.profile import profile as profile_of
from exod.proto import exod_pb2 as pb

from .conftest import REPO


def _points(step, layer, rate, shapes):
    return [{"layers": layers, "read_bytes": read, "seconds": step + layers * layer + read / rate}
            for layers, read in shapes]


SHAPES = [(2, 7e6), (8, 26e6), (16, 25e6), (2, 85e6), (4, 65e6)]


def test_the_fit_recovers_the_constants_it_was_made_from():
    step, layer, rate, worst = calibration.fit(_points(1e-3, 3e-4, 2.5e9, SHAPES))
    assert step == pytest.approx(1e-3, rel=1e-6)
    assert layer == pytest.approx(3e-4, rel=1e-6)
    assert rate == pytest.approx(2.5e9, rel=1e-6)
    assert worst < 1e-6


def test_a_term_that_fits_negative_is_dropped_not_subtracted():
    points = _points(0.0, 3e-4, 2.5e9, SHAPES)
    points[0]["seconds"] *= 0.8  # noise that pulls the intercept below zero
    step, layer, rate, worst = calibration.fit(points)
    assert step == 0.0 and layer > 0 and rate > 0
    assert worst < 0.25


def _cluster(n, calibrated):
    nodes = []
    for i in range(n):
        node = pb.NodeProfile(node_id=f"n{i}", name=f"n{i}", memory_total_bytes=64 << 30,
                              memory_usable_bytes=64 << 30, memory_bandwidth_bytes_per_s=400e9, backends=["ring"])
        if calibrated:
            node.calibration.CopyFrom(calibrated)
        nodes.append(node)
    links = [pb.Link(from_node="n0", to_node="n1", rtt_s=1e-3, bandwidth_bytes_per_s=1e9)]
    return pb.Cluster(nodes=nodes, links=links)


def _forced(spec, cluster, strategy):
    return planner.plan(spec, cluster, pb.PlacementRequest(strategy=strategy, ranks=2)).chosen


def test_the_planner_predicts_from_the_calibrated_constants():
    spec = from_config({**synthetic.NAMED["demo"], "vocab_size": 1024, "torch_dtype": "float32"}, "demo")
    slow = pb.NodeCalibration(decode_bytes_per_s=1e9, step_s=2e-3, layer_s=5e-4, collective_s=0.0)
    costly = pb.NodeCalibration(decode_bytes_per_s=1e9, step_s=2e-3, layer_s=5e-4, collective_s=1e-3)
    plain = _forced(spec, _cluster(2, None), pb.TENSOR)
    calibrated = _forced(spec, _cluster(2, slow), pb.TENSOR)
    assert calibrated.predicted_compute_s > plain.predicted_compute_s  # 1 GB/s, not 400 GB/s
    rank = calibrated.ranks[0]
    layers = rank.layer_end - rank.layer_start
    read = (rank.predicted_compute_s - 2e-3 - layers * 5e-4) * 1e9
    assert read > 0  # the rest is bytes at the calibrated rate
    with_collective = _forced(spec, _cluster(2, costly), pb.TENSOR)
    extra = with_collective.predicted_communication_s - calibrated.predicted_communication_s
    assert extra == pytest.approx(2 * spec.num_layers * 1e-3)  # two all-sums per layer
    # Pipeline: the stages' layers add up, the step and the logits (on every
    # rank at once) count once.
    cluster = _cluster(2, costly)
    pipeline = _forced(spec, cluster, pb.PIPELINE)
    fixed = cost.rank_compute_s(profile_of(spec).outside.read_all, 0, cluster.nodes[0])
    assert sum(r.predicted_compute_s for r in pipeline.ranks) - pipeline.predicted_compute_s == pytest.approx(fixed)


def test_a_saved_calibration_is_published_only_on_the_machine_that_made_it(tmp_path):
    mine = pb.NodeCalibration(decode_bytes_per_s=3e9, step_s=1e-3, layer_s=2e-4, collective_s=1e-4,
                              busy_ranks=1, chip=profile.chip())
    calibration.save(tmp_path, mine)
    assert calibration.load(tmp_path) == mine
    published = profile.collect("node-a", "a", 0, [], tmp_path)
    assert published.calibration == mine
    calibration.save(tmp_path, pb.NodeCalibration(decode_bytes_per_s=3e9, chip="another chip"))
    assert not profile.collect("node-a", "a", 0, [], tmp_path).HasField("calibration")
    (tmp_path / calibration.FILE).write_text("{not json")
    assert calibration.load(tmp_path) is None


def _exod(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "exod.daemon.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_calibrate_rejects_a_bad_busy_count_in_one_line(tmp_path):
    done = _exod("calibrate", "--busy", "0", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--busy must be at least 1" in done.stderr
    assert not (tmp_path / calibration.FILE).exists()


def test_exod_calibrate_measures_this_node_and_keeps_the_result(tmp_path):
    done = _exod("calibrate", "--quick", "--json", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-1500:]
    printed = json.loads(done.stdout)
    saved = json.loads((tmp_path / calibration.FILE).read_text())
    assert printed == saved
    assert saved["decode_bytes_per_s"] > 1e7 and math.isfinite(saved["decode_bytes_per_s"])
    assert saved["busy_ranks"] == 1 and saved["chip"] == profile.chip()
    assert saved.get("collective_s", 0.0) >= 0 and saved["fit_worst_error"] < 1.0
    assert profile.collect("node-a", "a", 0, [], tmp_path).calibration.decode_bytes_per_s == saved["decode_bytes_per_s"]
