"""What moving bytes costs a plan: per rank, the bytes already on its node
(the whole checkpoint, the same shard, or files of it), those to fetch, from
where and how long over the measured links; tokens/s first, and among the
candidates within 5% of the fastest, the fewest bytes to move."""

import json
import subprocess
import sys

import pytest
from google.protobuf import json_format

from exod.daemon.models import annotate, rechoose
from exod.models import checkpoint as ckpt
from exod.models import synthetic
from exod.placement import cluster as clusters
from exod.placement import plan
from exod.proto import exod_pb2 as pb

from .conftest import REPO

GB = 10**9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = synthetic.build(tmp_path_factory.mktemp("tiny"), synthetic.TINY_CONFIGS["qwen3_moe"])
    files = {p.name: (p.stat().st_size, "") for p in root.iterdir() if p.is_file()}
    return root, ckpt.local("acme/tiny", "a" * 40, root, files)


def holding(checkpoint, **kw) -> pb.ModelHolding:
    h = pb.ModelHolding(model_id=checkpoint.model_id, revision=checkpoint.revision, store="hf-cache", **kw)
    h.files.extend(pb.ModelFile(name=n, size=s) for n, (s, _) in checkpoint.files.items())
    return h


def three_nodes(checkpoint) -> pb.Cluster:
    cluster = clusters.synthetic(3, 8 * GB)
    cluster.nodes[0].models.append(holding(checkpoint, complete=True))
    cluster.nodes[1].models.append(pb.ModelHolding(model_id=checkpoint.model_id, revision=checkpoint.revision,
                                                   store="shard", shard=pb.ShardOf(strategy="moe_tensor", rank=1,
                                                                                    world_size=2)))
    for a, b, rate in (("node-1", "node-2", 100e6), ("node-1", "node-3", 10e6), ("node-2", "node-3", 50e6)):
        cluster.links.append(pb.Link(from_node=a, to_node=b, bandwidth_bytes_per_s=rate, rtt_s=1e-4))
    return cluster


def test_each_rank_says_what_it_holds_and_what_it_must_fetch(tiny):
    _, checkpoint = tiny
    cluster = three_nodes(checkpoint)
    spec = checkpoint.spec(checkpoint.model_id)
    result = annotate(plan(spec, cluster, pb.PlacementRequest(strategy=pb.MOE_TENSOR, ranks=2, nodes=["node-2",
                                                                                                  "node-3"])),
                      checkpoint, cluster)
    ranks = {r.node_name: r for r in result.chosen.ranks}
    assert result.chosen.revision == "a" * 40
    for r in ranks.values():
        assert 0 < r.transfer.bytes_needed < spec.total_bytes
    # node-2 holds rank 1's shard already (when the placement gives it rank 1), node-3 nothing.
    three = ranks["node-3"].transfer
    assert three.bytes_local == 0 and three.bytes_to_fetch == three.bytes_needed and three.sources == ["node-1"]
    assert three.predicted_s == pytest.approx(three.bytes_to_fetch / 10e6)
    two = ranks["node-2"]
    if two.rank == 1:
        assert two.transfer.bytes_to_fetch == 0 and two.transfer.bytes_local == two.transfer.bytes_needed
    else:
        assert two.transfer.predicted_s == pytest.approx(two.transfer.bytes_to_fetch / 100e6)
    assert result.chosen.bytes_to_fetch == sum(r.transfer.bytes_to_fetch for r in ranks.values())
    assert result.chosen.predicted_transfer_s == max(r.transfer.predicted_s for r in ranks.values())
    # On the node that holds it all, nothing moves.
    alone = annotate(plan(spec, cluster, pb.PlacementRequest(ranks=1, nodes=["node-1"])), checkpoint, cluster)
    assert alone.chosen.bytes_to_fetch == 0 and alone.chosen.ranks[0].transfer.bytes_local > 0
    # Held by no one: the hub.
    bare = clusters.synthetic(1, 8 * GB)
    far = annotate(plan(spec, bare, pb.PlacementRequest()), checkpoint, bare)
    assert far.chosen.ranks[0].transfer.sources == ["hub"]


def candidate(name, tps, moved):
    return pb.Placement(model_id="m", strategy=pb.PIPELINE, fits=True, predicted_decode_tokens_per_s=tps,
                        bytes_to_fetch=moved, ranks=[pb.RankPlacement(node_id=name, node_name=name)])


def test_tokens_per_second_first_then_fewer_bytes_within_five_percent():
    fastest, close, cheap_but_slow = candidate("a", 100, 5 * GB), candidate("b", 96, GB), candidate("c", 90, 0)
    result = pb.Plan(candidates=[fastest, close, cheap_but_slow])
    result.chosen.CopyFrom(fastest)
    chosen = rechoose(result).chosen
    assert chosen.ranks[0].node_name == "b" and "fewer bytes" in chosen.reasons[-1]
    # Equal bytes: the planner's own choice stands.
    result = pb.Plan(candidates=[candidate("a", 100, 0), candidate("b", 99, 0)])
    result.chosen.CopyFrom(result.candidates[0])
    assert rechoose(result).chosen.ranks[0].node_name == "a"


def test_exod_plan_shows_the_transfer_from_a_cluster_file(tmp_path, tiny):
    root, checkpoint = tiny
    data = tmp_path / "data"
    (data / "models" / "acme").mkdir(parents=True)
    (data / "models" / "acme" / "tiny").symlink_to(root)
    cluster = three_nodes(checkpoint)
    cluster.nodes[0].models[0].revision = ""  # what an exod-store copy without a revision publishes
    (tmp_path / "cluster.json").write_text(json_format.MessageToJson(cluster))
    out = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "plan", "acme/tiny", "--cluster",
                          str(tmp_path / "cluster.json"), "--data-dir", str(data), "--strategy", "moe_tensor",
                          "--only", "node-2", "--only", "node-3"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fetch" in out.stdout and "from node-1" in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "plan", "acme/tiny", "--cluster",
                          str(tmp_path / "cluster.json"), "--data-dir", str(data), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "transfer" in json.loads(out.stdout)["chosen"]["ranks"][0]
