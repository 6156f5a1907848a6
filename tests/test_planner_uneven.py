"""Uneven shares on the planner side: whole grains per rank, step times
balanced under each node's memory, per-rank memory exact, and the shares
shown in the preview (JSON and the `exod plan` table)."""

import json
import subprocess
import sys

from exod.models import catalog, inventory, shares, synthetic
from exod.placement import planner, plan, profile
from exod.placement.planner import Settings
from exod.placement.strategies import balance
from exod.proto import exod_pb2 as pb

from .conftest import REPO


def node(name, memory_gb, bandwidth_gbs):
    return pb.NodeProfile(node_id=name, name=name, memory_usable_bytes=int(memory_gb * 10**9),
                          memory_total_bytes=int(memory_gb * 10**9),
                          memory_bandwidth_bytes_per_s=bandwidth_gbs * 1e9, backends=["ring"])


def test_identical_ranks_get_the_most_even_shares():
    assert balance(128, [1.0] * 3, [0.01] * 3, [128] * 3) == (shares.even(128, 3), True)
    assert balance(8, [0.0] * 4, [1.0] * 4, [8] * 4) == ([2, 2, 2, 2], True)


def test_a_rank_twice_as_fast_gets_twice_the_grains():
    got, within = balance(96, [0.0, 0.0], [1.0, 0.5], [96, 96])
    assert got == [32, 64] and within


def test_memory_caps_a_rank_and_the_others_take_the_rest():
    got, within = balance(32, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [32, 4, 32])
    assert within and got[1] == 4 and sum(got) == 32 and abs(got[0] - got[2]) <= 1


def test_every_rank_keeps_at_least_one_grain_and_the_shares_sum_to_the_grains():
    for fixed, slope, caps in [([5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [10, 10, 10]),
                               ([0.0, 0.0], [1e-9, 1.0], [7, 7]),
                               ([0.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0], [100] * 5)]:
        got, _ = balance(10, fixed, slope, caps)
        assert sum(got) == 10 and min(got) >= 1


def test_caps_that_cannot_hold_every_grain_report_it_and_still_balance_time():
    got, within = balance(10, [0.0, 0.0], [1.0, 1.0], [3, 3])
    assert not within and got == [5, 5]


def test_v4_flash_on_a_120_and_an_80_gb_mac_fits_moe_tensor_with_uneven_shares():
    """The issue's example: even moe_tensor needs more than the smaller
    Mac's usable memory; uneven shares fit both."""
    spec = catalog.resolve("deepseek-v4-flash")
    cluster = pb.Cluster(nodes=[node("studio", 120, 819), node("macbook", 80, 546)])
    request = pb.PlacementRequest(context_length=32768, strategy=pb.MOE_TENSOR, ranks=2)
    chosen = plan(spec, cluster, request).chosen
    assert chosen.fits
    studio, macbook = chosen.ranks
    assert studio.share_of == macbook.share_of == profile(spec).grains["moe_tensor"]
    assert studio.share + macbook.share == studio.share_of and studio.share > macbook.share
    model = profile(spec)
    settings = Settings(32768, chosen.concurrency, 0.05, chosen.prefix_cache_tokens)
    even, _ = planner.rank_memory(model, "moe_tensor", 2, 0, model.num_layers, settings)
    assert even.total_bytes > macbook.usable_bytes  # an even split does not fit the MacBook


def test_uneven_memory_is_exact_every_cut_byte_on_exactly_one_rank():
    spec = inventory.from_config(dict(synthetic.TINY_CONFIGS["qwen2"]), "qwen2")
    model = profile(spec)
    settings = Settings(512, 1, 0.05, 0)
    of = model.grains["tensor"]
    assert of == 8  # 8 KV-head groups
    whole, _ = planner.rank_memory(model, "tensor", 1, 0, model.num_layers, settings)
    ranks = [planner.rank_memory(model, "tensor", 3, 0, model.num_layers, settings, share=(s, of))[0]
             for s in (4, 3, 1)]
    cut = {t.name: t.bytes for t in spec.tensors if t.tensor_split.units}
    replicated = whole.weights_bytes - sum(cut.values())
    assert sum(r.weights_bytes - replicated for r in ranks) == sum(cut.values())
    # The rank with 4 of 8 grains holds exactly half of every cut byte.
    assert ranks[0].weights_bytes - replicated == sum(cut.values()) // 2
    # KV: whole kv heads per grain.
    assert sum(r.kv_cache_bytes for r in ranks) == whole.kv_cache_bytes


def test_the_preview_shows_each_ranks_share(tmp_path):
    cluster = {"nodes": [
        {"node_id": "a", "name": "studio", "memory_usable_bytes": str(120 * 10**9),
         "memory_bandwidth_bytes_per_s": 819e9, "backends": ["ring"]},
        {"node_id": "b", "name": "macbook", "memory_usable_bytes": str(80 * 10**9),
         "memory_bandwidth_bytes_per_s": 546e9, "backends": ["ring"]},
    ]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster))

    def exod(*args):
        proc = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "plan", "deepseek-v4-flash", "--cluster",
                               str(path), "--strategy", "moe_tensor", "--context", "32768", *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    data = json.loads(exod("--json"))
    ranks = data["chosen"]["ranks"]
    assert [r["node_name"] for r in ranks] == ["studio", "macbook"]
    assert ranks[0]["share"] + ranks[1]["share"] == ranks[0]["share_of"] == ranks[1]["share_of"]
    table = exod()
    assert "SHARE" in table
    assert f"{ranks[0]['share']}/{ranks[0]['share_of']}" in table
    assert f"{ranks[1]['share']}/{ranks[1]['share_of']}" in table


def test_nodes_of_one_kind_keep_even_shares_despite_bandwidth_noise():
    """Two of the same Mac, bandwidths measured 3% apart: the balanced
    shares would be barely faster, so the even ones stay (and so do their
    shards); 40% apart, the faster node takes more."""
    spec = catalog.resolve("deepseek-v4-flash")
    request = pb.PlacementRequest(strategy=pb.MOE_TENSOR, ranks=2, context_length=4096)

    def chosen_shares(bandwidths):
        cluster = pb.Cluster(nodes=[node(f"n{i}", 200, b) for i, b in enumerate(bandwidths)])
        return [r.share for r in plan(spec, cluster, request).chosen.ranks]

    assert chosen_shares([800, 824]) == [16, 16]
    fast, slow = chosen_shares([800, 560])
    assert fast + slow == 32 and fast > slow
