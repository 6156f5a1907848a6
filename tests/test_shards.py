"""A rank's shard checkpoint holds exactly what the rank needs, and the
runner loads it directly: every strategy's ranks, each from its own shard,
compute what one process computes from the whole checkpoint; a shard of
another rank fails the rank with the reason instead of computing with
zeros."""

import json

import numpy as np
import pytest

from exod.models import checkpoint as ckpt
from exod.models import shards, synthetic
from exod.models.safetensors_header import read_layout
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LaunchError, LocalInstance

from .runner_helpers import greedy_request, reference


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}
    for variant, quant in (("fp32", None), ("q4", {"group_size": 32, "bits": 4})):
        out = tmp_path_factory.mktemp(f"moe-{variant}")
        built[variant] = synthetic.build(out, synthetic.TINY_CONFIGS["qwen3_moe"], quantization=quant)
    return built


def checkpoint_of(root):
    files = {p.name: (p.stat().st_size, "") for p in root.iterdir() if p.is_file()}
    return ckpt.local("acme/tiny", "", root, files)


def shard_dirs(root, tmp_path, strategy, world, split=(), rank_shares=(), layout=None, stages=()):
    checkpoint = checkpoint_of(root)
    sizes = {n: s for n, (s, _) in checkpoint.files.items()}
    out = []
    for rank in range(world):
        plan = shards.plan_rank(checkpoint, strategy, rank, world, split, rank_shares=rank_shares,
                                expert_layout=layout, stage_ranks=stages)
        out.append(shards.write_local(plan, root, tmp_path / plan.key, sizes))
    return out


def run(root, strategy, world, dirs, split=None, rank_shares=None):
    with LocalInstance(root, strategy, world, context_length=512, model_dirs=dirs, pipeline_layers=split,
                       shares=rank_shares) as instance:
        instance.wait_ready(180)
        chunks = instance.generate(greedy_request(), timeout=120)
        assert instance.shutdown(15)
    final = chunks[-1]
    return np.array(final.prompt_logits), [t.token for c in chunks for t in c.tokens if c is not final or t.token]


@pytest.mark.parametrize("strategy,variant", [("moe_tensor", "fp32"), ("pipeline", "fp32"), ("tensor", "q4"),
                                              ("moe_experts", "q4")])
def test_each_rank_from_its_own_shard_computes_what_one_process_does(models, tmp_path, strategy, variant):
    root = models[variant]
    split = [2, 2] if strategy == "pipeline" else None
    dirs = shard_dirs(root, tmp_path, strategy, 2, split or ())
    whole = (root / "model.safetensors").stat().st_size
    for rank, d in enumerate(dirs):
        meta = json.loads((d / shards.MANIFEST).read_text())
        layout = read_layout(d / shards.SHARD_FILE)
        assert json.loads(layout.metadata["exod_shard"]) == meta
        assert (meta["strategy"], meta["rank"], meta["world_size"]) == (strategy, rank, 2)
        stored = sum(e.nbytes for e in layout.entries.values())
        assert stored < 0.8 * whole, f"rank {rank} holds {stored} of {whole} bytes"
        for name, t in meta["tensors"].items():  # a cut tensor is stored as its part, named with its full shape
            assert t["grains"][0] == rank * t["grains"][2] // 2 and t["grains"][1] == (rank + 1) * t["grains"][2] // 2
            assert list(layout.entries[name].shape)[t["axis"]] * 2 == t["shape"][t["axis"]]
    if strategy == "pipeline":
        # Rank 1 runs layers 0-1 (mlx-lm: rank 0 the last): the others are absent.
        absent = json.loads((dirs[1] / shards.MANIFEST).read_text())["absent"]
        assert absent and all(".layers.2." in n or ".layers.3." in n for n in absent)
    else:
        assert json.loads((dirs[0] / shards.MANIFEST).read_text())["tensors"]
    expected = reference(root)
    logits, tokens = run(root, strategy, 2, dirs, split)
    assert np.abs(logits - expected["logits"]).max() <= 1e-4
    assert tokens == expected["tokens"]


def test_uneven_shares_from_shards_compute_what_one_process_does(models, tmp_path):
    """Three moe_tensor ranks holding 64, 40 and 24 of the 128 expert rows,
    each loading only its shard: each stores exactly its grains."""
    root, held = models["fp32"], [64, 40, 24]
    dirs = shard_dirs(root, tmp_path, "moe_tensor", 3, rank_shares=held)
    for rank, d in enumerate(dirs):
        meta = json.loads((d / shards.MANIFEST).read_text())
        layout = read_layout(d / shards.SHARD_FILE)
        lo = sum(held[:rank])
        assert meta["grains"] == [lo, lo + held[rank], 128]
        for name, t in meta["tensors"].items():
            assert t["grains"] == [lo, lo + held[rank], 128]
            assert list(layout.entries[name].shape)[t["axis"]] * 128 == t["shape"][t["axis"]] * held[rank]
    keys = {d.name for d in dirs} | {d.name for d in shard_dirs(root, tmp_path / "even", "moe_tensor", 3)}
    assert len(keys) == 6  # other shares, other bytes, other shards
    expected = reference(root)
    logits, tokens = run(root, "moe_tensor", 3, dirs, rank_shares=held)
    assert np.abs(logits - expected["logits"]).max() <= 1e-4
    assert tokens == expected["tokens"]
    # The same shards under other shares: the cut is not what the shards hold.
    with LocalInstance(root, "moe_tensor", 3, context_length=512, model_dirs=dirs, shares=[24, 40, 64]) as instance:
        with pytest.raises(LaunchError, match="is not the part the shard holds"):
            instance.wait_ready(180)


def test_hybrid_ranks_from_their_shards_compute_what_one_process_does(models, tmp_path):
    """Stages {0, 1} (layers 2-3, moe_tensor 80/48 of the 128 expert rows)
    and {2} (layers 0-1, whole): ranks 0 and 1 store only their stage's
    layers, cut, but layer 2 whole for the canary; rank 2 stores only its
    own layers, whole; the tensors outside the layers are on every rank."""
    root, stages, split, held = models["fp32"], [2, 1], [2, 2], [80, 48, 128]
    dirs = shard_dirs(root, tmp_path, "hybrid", 3, split, rank_shares=held, stages=stages)
    metas = [json.loads((d / shards.MANIFEST).read_text()) for d in dirs]
    for rank in (0, 1):
        lo = 80 * rank
        assert (metas[rank]["layer_start"], metas[rank]["layer_end"], metas[rank]["canary_layer"]) == (2, 4, 2)
        assert metas[rank]["tensors"] and all(".layers.3." in n for n in metas[rank]["tensors"])
        assert all(t["grains"] == [lo, lo + held[rank], 128] for t in metas[rank]["tensors"].values())
        assert metas[rank]["absent"] and all(".layers.0." in n or ".layers.1." in n for n in metas[rank]["absent"])
    assert (metas[2]["layer_start"], metas[2]["layer_end"], metas[2]["tensors"]) == (0, 2, {})
    assert all(".layers.2." in n or ".layers.3." in n for n in metas[2]["absent"])
    for meta in metas:
        assert not any("embed_tokens" in n or "lm_head" in n for n in meta["absent"])
    expected = reference(root)
    with LocalInstance(root, "hybrid", 3, context_length=512, model_dirs=dirs, pipeline_layers=split, shares=held,
                       stage_ranks=stages, stage_strategy="moe_tensor") as instance:
        instance.wait_ready(180)
        chunks = instance.generate(greedy_request(), timeout=120)
        assert instance.shutdown(15)
    final = chunks[-1]
    assert np.abs(np.array(final.prompt_logits) - expected["logits"]).max() <= 1e-4
    assert [t.token for c in chunks for t in c.tokens if c is not final or t.token] == expected["tokens"]


# qwen3_moe's MoE layers 1-3 on 3 ranks, no two layers alike.
LAYOUT = {1: [[0, 3, 6], [1, 4, 7], [2, 5]], 2: [[1, 2, 7], [0, 5, 6], [3, 4]],
          3: [[4, 5, 6], [0, 1, 2], [3, 7]]}
OTHER = {1: LAYOUT[3], 2: LAYOUT[2], 3: LAYOUT[1]}


def test_shards_of_an_expert_layout_hold_its_experts_and_no_other_layout_uses_them(models, tmp_path):
    """moe_experts with an expert layout from shards: each routed tensor's
    part runs from the rank's first expert of that layer to its last (the
    canary's layer 1 whole); the ranks compute what one process does; the
    same shards under another layout, or under none, fail in Loading."""
    from exod.models import expert_layout

    root = models["fp32"]
    proto = expert_layout.to_proto(LAYOUT)
    dirs = shard_dirs(root, tmp_path, "moe_experts", 3, layout=proto)
    for rank, d in enumerate(dirs):
        meta = json.loads((d / shards.MANIFEST).read_text())
        assert meta["expert_layout"] == {str(k): v for k, v in LAYOUT.items()}
        stored = read_layout(d / shards.SHARD_FILE)
        routed = {n: t for n, t in meta["tensors"].items() if ".switch_mlp." in n}
        assert routed and not any(".layers.1." in n for n in routed)
        for name, t in routed.items():
            held = LAYOUT[int(name.split(".")[2])][rank]
            assert t["experts"] == held and t["grains"] == [held[0], held[-1] + 1, 8]
            assert list(stored.entries[name].shape)[0] == held[-1] + 1 - held[0]
    others = shard_dirs(root, tmp_path / "other", "moe_experts", 3, layout=expert_layout.to_proto(OTHER))
    plain = shard_dirs(root, tmp_path / "plain", "moe_experts", 3)
    assert len({d.name for d in [*dirs, *others, *plain]}) == 9
    expected = reference(root)
    with LocalInstance(root, "moe_experts", 3, context_length=512, model_dirs=dirs, expert_layout=proto) as instance:
        instance.wait_ready(180)
        chunks = instance.generate(greedy_request(), timeout=120)
        assert instance.shutdown(15)
    final = chunks[-1]
    assert np.abs(np.array(final.prompt_logits) - expected["logits"]).max() <= 1e-4
    assert [t.token for c in chunks for t in c.tokens if c is not final or t.token] == expected["tokens"]
    for layout, reason in ((expert_layout.to_proto(OTHER), "the shard was cut for the expert layout with layer 1's"),
                           (None, "the spec asks for contiguous experts (no expert layout)")):
        with LocalInstance(root, "moe_experts", 3, context_length=512, model_dirs=dirs,
                           expert_layout=layout) as instance:
            with pytest.raises(LaunchError) as failed:
                instance.wait_ready(180)
            instance.shutdown(15)
        assert "Loading failed: " in str(failed.value) and reason in str(failed.value), str(failed.value)


def test_a_shard_of_another_rank_fails_with_the_reason(models, tmp_path):
    dirs = shard_dirs(models["fp32"], tmp_path, "moe_tensor", 2)
    with LocalInstance(models["fp32"], "moe_tensor", 2, context_length=512, model_dirs=dirs[::-1]) as instance:
        with pytest.raises(LaunchError, match="is not the part the shard holds"):
            instance.wait_ready(180)


def test_the_same_placement_names_the_same_shard(models):
    checkpoint = checkpoint_of(models["fp32"])
    a = shards.plan_rank(checkpoint, "moe_tensor", 1, 2)
    assert a.key == shards.plan_rank(checkpoint, "moe_tensor", 1, 2).key
    assert a.key != shards.plan_rank(checkpoint, "moe_tensor", 0, 2).key
    assert a.key != shards.plan_rank(checkpoint, "tensor", 1, 2).key
    # Rank r of N takes the r-th equal part, strided where the axis is not the first.
    assert a.needs.canary_layer == 1  # layer 0 has no experts: the canary computes layer 1 uncut
    assert all(p.axis is None for p in a.needs.parts if ".layers.1." in p.tensor)
    down = next(p for p in a.needs.parts if p.tensor == "model.layers.2.mlp.switch_mlp.down_proj.weight")
    assert down.axis == 2 and down.count == down.full_shape[0] * down.full_shape[1]
    assert down.length * 2 == down.stride


def test_a_writer_that_fails_leaves_nothing(models, tmp_path):
    checkpoint = checkpoint_of(models["fp32"])
    plan = shards.plan_rank(checkpoint, "moe_tensor", 0, 2)
    writer = shards.ShardWriter(tmp_path / "shard", plan.needs.parts, plan.meta)
    writer.write(0, 0, b"\0" * 8)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_rank_from_its_shard_peaks_where_the_planner_says(tmp_path_factory):
    """As test_runner_memory, from shards: on the mid-size MoE (about 1.4 GB),
    each moe_tensor rank loading only its shard peaks within 10% of the
    planner's estimate for it: rebuilding each cut tensor at its full shape
    costs one source tensor at a time, as loading the whole checkpoint does."""
    from exod.models import inventory
    from exod.placement import cluster, planner

    root = synthetic.ensure_named("midsize-moe", tmp_path_factory.mktemp("models"))
    spec = inventory.from_directory(root)
    nodes = cluster.synthetic(2, 64 * 10**9)
    chosen = next(c for c in planner.plan(spec, nodes, pb.PlacementRequest(strategy=pb.MOE_TENSOR,
                                                                           context_length=256)).candidates
                  if len(c.ranks) == 2 and c.fits)
    estimates = [r.memory.total_bytes for r in chosen.ranks]
    dirs = shard_dirs(root, tmp_path_factory.mktemp("shards"), "moe_tensor", 2)
    # Generous collective deadlines: this measures memory, on two cores other jobs share.
    with LocalInstance(root, "moe_tensor", 2, context_length=256, model_dirs=dirs, estimated_bytes=estimates,
                       deadlines=pb.RunnerDeadlines(peer_s=300, load_s=600)) as instance:
        instance.wait_ready(300)
        request = pb.GenerateRequest(request_id="fill", prompt_tokens=[5] * 96,
                                     sampling=pb.SamplingParams(max_tokens=160, ignore_eos=True))
        assert instance.generate(request, timeout=300)[-1].finish_reason == pb.FINISH_LENGTH
        assert instance.wait_for(lambda i: all(s == pb.READY for s in i.states()), 10)
        for rank, statuses in zip(instance.ranks, instance.statuses):
            after = statuses[-1]
            ratio = after.peak_rss_bytes / estimates[rank.spec.rank]
            assert abs(ratio - 1) <= 0.10, (rank.spec.rank, after.peak_rss_bytes, estimates[rank.spec.rank])
        instance.shutdown()
