"""The routing counts a node keeps per model (daemon/expert_load.py)."""

import json

from exod.daemon import expert_load
from exod.daemon.expert_load import MAX_INSTANCES, ExpertLoad
from exod.proto import exod_pb2 as pb


def counts(**layers) -> pb.ExpertCounts:
    return pb.ExpertCounts(layers=[pb.LayerCounts(layer=int(k[1:]), counts=v) for k, v in layers.items()])


def test_an_instances_latest_counts_replace_its_earlier_ones_and_instances_add_up(tmp_path):
    load = ExpertLoad(tmp_path)
    assert load.counts("m") is None
    assert load.observe("m", "a", counts(l1=[1, 0, 0], l3=[0, 2, 0]))
    assert load.observe("m", "a", counts(l1=[5, 1, 0], l3=[0, 4, 2]))  # cumulative: replaces
    assert load.observe("m", "b", counts(l1=[0, 0, 3]))
    got = {c.layer: list(c.counts) for c in load.counts("m").layers}
    assert got == {1: [5, 1, 3], 3: [0, 4, 2]}
    assert load.counts("other") is None


def test_counts_survive_a_restart_and_old_instances_age_out(tmp_path):
    load = ExpertLoad(tmp_path)
    for i in range(MAX_INSTANCES + 2):
        load.observe("m", f"i{i}", counts(l0=[1, 1]))
    expert_load.save(load.snapshot())
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "m" not in files[0].name  # named by a digest, never the id
    again = ExpertLoad(tmp_path)
    assert list(again.counts("m").layers[0].counts) == [MAX_INSTANCES, MAX_INSTANCES]


def test_malformed_counts_and_files_are_ignored(tmp_path):
    load = ExpertLoad(tmp_path)
    too_many = pb.ExpertCounts(layers=[pb.LayerCounts(layer=0, counts=[1] * (expert_load.MAX_EXPERTS + 1))])
    assert not load.observe("m", "a", too_many)
    assert not load.observe("m", "a", counts(l0=[0, 0]))  # nothing measured yet
    assert load.counts("m") is None
    load.observe("n", "a", counts(l0=[1, 2]))
    (path, _), = load.snapshot()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "n", "instances": {"a": {"0": [1, -5]}}}))
    assert ExpertLoad(tmp_path).counts("n") is None
    path.write_text("not json")
    assert ExpertLoad(tmp_path).counts("n") is None
    # A file of another model's (a digest collision or a copied file) is not read as this one's.
    path.write_text(json.dumps({"model": "someone-else", "instances": {"a": {"0": [1, 2]}}}))
    assert ExpertLoad(tmp_path).counts("n") is None


def test_writes_are_batched(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(expert_load.time, "monotonic", lambda: clock[0])
    load = ExpertLoad(tmp_path)
    assert not load.due()
    load.observe("m", "a", counts(l0=[1, 2]))
    assert load.due()
    assert len(load.snapshot()) == 1 and not load.due()
    load.observe("m", "a", counts(l0=[2, 2]))
    assert not load.due()  # saved less than SAVE_EVERY_S ago
    clock[0] += expert_load.SAVE_EVERY_S
    assert load.due()
