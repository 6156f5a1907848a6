"""Ready is earned, and nothing hangs: broken strategies end in Failed with
the canary's reason, phases end at their deadlines, a killed peer fails the
survivors in bounded time and leaves no process and no bound port."""

import os
import signal
import socket
import time

import psutil
import pytest

from exod.models import expert_layout, synthetic
from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

from .conftest import REPO

PLUGIN_ENV = {"EXOD_RUNNER_PLUGINS": "tests.broken_strategies", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory):
    built = {}
    for name in ("qwen3_moe", "deepseek_v41", "deepseek_v4"):
        built[name] = synthetic.build(tmp_path_factory.mktemp(name), synthetic.TINY_CONFIGS[name])
    return built


@pytest.fixture(scope="module")
def models(fp32_models, tmp_path_factory):
    """fp32, and 4-bit weights with bf16 activations, where rounding is
    largest and the canary's limit is loosest."""
    built = dict(fp32_models)
    for name in ("qwen3_moe", "deepseek_v41", "deepseek_v4"):
        built[f"{name}-4bit"] = synthetic.build(
            tmp_path_factory.mktemp(f"{name}-4bit"), synthetic.TINY_CONFIGS[name],
            quantization={"group_size": 32, "bits": 4}, dtype="bfloat16")
    return built


@pytest.mark.parametrize("variant", ["", "-4bit"])
@pytest.mark.parametrize("model,strategy,reason", [
    ("qwen3_moe", "moe_tensor_without_sum", "canary: layer"),
    # Layer 0 is dense (mlp_only_layers): not the first MoE layer.
    ("qwen3_moe", "dense_layer_without_sum", "canary: layer 0 "),
    ("qwen3_moe", "embedding_rows_rotated", "canary: the embedding differs"),
    ("qwen3_moe", "decode_without_history", "(cached decode)"),
    ("qwen3_moe", "stages_sharing_a_cache", "(cached "),
    ("deepseek_v41", "heads_across_output_groups", "canary: layer"),
    # exod's own deepseek_v4 class (v4-mini), whose shard() keeps whole output groups.
    ("deepseek_v4", "heads_across_output_groups", "canary: layer"),
])
def test_a_broken_cut_fails_the_canary_on_fp32_and_quantized_weights(model, strategy, reason, variant, models):
    with LocalInstance(models[model + variant], strategy, 2, env=PLUGIN_ENV) as instance:
        assert ended(instance, 120)
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
            assert rank.status.reason.startswith("canary: "), rank.status.reason
            assert reason in rank.status.reason, rank.status.reason
            # Derived limits leave room: a broken cut is at least 10x over the
            # limit it broke, on 4-bit/bf16 weights as on fp32 (docs/proofs.md).
            delta, limit = margin(rank.status.reason)
            assert delta >= 10 * limit, rank.status.reason
        assert never_ready(instance)
        assert any(s.state == pb.LOADED for s in instance.statuses[0])


def margin(reason: str) -> tuple[float, float]:
    """(max |Δ|, limit) from a canary failure's reason."""
    delta = float(reason.split("max |Δ| = ")[1].split(" ")[0])
    limit = float(reason.rsplit(" is ", 1)[1].rstrip(")"))
    return delta, limit


@pytest.mark.parametrize("variant", ["", "-4bit"])
@pytest.mark.parametrize("strategy", ["uneven_grains_overlapping", "uneven_grains_dropped"])
def test_a_broken_uneven_assignment_fails_the_canary(strategy, variant, models):
    """Three ranks of uneven moe_tensor: grains placed on two ranks and on
    none, or one grain left out, never reach Ready. fp32 has 128 grains of
    one element, 4-bit 4 grains of a 32-wide quantization group."""
    # Every rank keeps at least one grain (the dropped one comes off a rank with two).
    shares = [64, 40, 24] if not variant else ([2, 1, 1] if strategy == "uneven_grains_overlapping" else [1, 1, 2])
    with LocalInstance(models["qwen3_moe" + variant], strategy, 3, env=PLUGIN_ENV, shares=shares) as instance:
        assert_every_rank_fails_a_layer_check(instance)


@pytest.mark.parametrize("variant", ["", "-4bit"])
@pytest.mark.parametrize("strategy,shares", [("experts_on_two_ranks", [4, 3, 1]), ("expert_on_no_rank", [1, 3, 4])])
def test_a_broken_expert_placement_fails_the_canary(strategy, shares, variant, models):
    """moe_experts on 3 ranks: an expert on two ranks (its tokens counted
    twice) or on none never reaches Ready."""
    with LocalInstance(models["qwen3_moe" + variant], strategy, 3, env=PLUGIN_ENV, shares=shares) as instance:
        assert_every_rank_fails_a_layer_check(instance)


# qwen3_moe's MoE layers 1-3, 3 ranks of 4 experts each: experts 2-5, then
# 0, 1, 6, 7, then 2-5 again are on two ranks.
REPLICATED = {1: [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]], 2: [[0, 2, 4, 6], [1, 3, 5, 7], [0, 1, 6, 7]],
              3: [[1, 3, 5, 7], [0, 2, 4, 6], [2, 3, 4, 5]]}
# No replica, different in every layer; the broken strategy drops each rank's first expert.
SPREAD = {1: [[0, 3, 6], [1, 4, 7], [2, 5]], 2: [[1, 2, 7], [0, 5, 6], [3, 4]], 3: [[4, 5, 6], [0, 1, 2], [3, 7]]}


@pytest.mark.parametrize("variant", ["", "-4bit"])
@pytest.mark.parametrize("strategy,layout", [("replicas_not_split", REPLICATED), ("layout_expert_dropped", SPREAD)])
def test_a_broken_expert_layout_fails_the_canary(strategy, layout, variant, models):
    """moe_experts with an expert layout on 3 ranks: replicas that both
    compute their expert's slots (no turns), or experts the layout places
    that no rank computes, never reach Ready."""
    with LocalInstance(models["qwen3_moe" + variant], strategy, 3, env=PLUGIN_ENV,
                       expert_layout=expert_layout.to_proto(layout)) as instance:
        assert_every_rank_fails_a_layer_check(instance)


@pytest.mark.parametrize("variant", ["", "-4bit"])
@pytest.mark.parametrize("layout", [REPLICATED, SPREAD], ids=["replicated", "spread"])
def test_the_same_expert_layouts_placed_right_pass_the_canary(layout, variant, models):
    """The control: the layouts the broken strategies spoil, run by
    moe_experts itself on the same models, reach Ready, so that the broken
    ones fail for what they break alone."""
    with LocalInstance(models["qwen3_moe" + variant], "moe_experts", 3, context_length=512,
                       expert_layout=expert_layout.to_proto(layout)) as instance:
        instance.wait_ready(180)
        assert all(rank.status.state == pb.READY for rank in instance.ranks)
        assert instance.shutdown(15)


def ended(instance, timeout):
    return instance.wait_for(lambda i: all(r.terminal.is_set() for r in i.ranks), timeout)


def never_ready(instance):
    return all(s.state != pb.READY for statuses in instance.statuses for s in statuses)


def assert_every_rank_fails_a_layer_check(instance) -> None:
    """Every rank ends Failed by a canary layer check, with its |Δ|, and none was ever Ready."""
    assert ended(instance, 180)
    for rank in instance.ranks:
        assert rank.status.state == pb.FAILED
        assert rank.status.reason.startswith("canary: layer"), rank.status.reason
        assert "max |Δ| =" in rank.status.reason
    assert never_ready(instance)


@pytest.mark.parametrize("model,strategy", [
    ("qwen3_moe", "moe_tensor_without_sum"),
    ("deepseek_v41", "heads_across_output_groups"),
    ("deepseek_v4", "heads_across_output_groups"),
])
def test_a_broken_strategy_fails_the_canary_and_never_reports_ready(model, strategy, fp32_models):
    with LocalInstance(fp32_models[model], strategy, 2, env=PLUGIN_ENV) as instance:
        assert ended(instance, 120)
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
            assert rank.status.reason.startswith("canary: layer"), rank.status.reason
            assert "max |Δ| =" in rank.status.reason
        assert never_ready(instance)
        # It did load: the failure came after Loaded, from the canary.
        assert any(s.state == pb.LOADED for s in instance.statuses[0])


def test_pipeline_stages_in_the_wrong_order_fail_the_canary(fp32_models):
    """Each stage holds whole, unchanged layers, and every rank sees the same
    finite logits: only the tiling check can tell that the model is wrong."""
    with LocalInstance(fp32_models["qwen3_moe"], "stages_in_rank_order", 2, env=PLUGIN_ENV) as instance:
        assert ended(instance, 120)
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
            assert rank.status.reason.startswith("canary: rank 0 holds layers 0.."), rank.status.reason
            assert "the stages must end at layer" in rank.status.reason
        assert never_ready(instance)


@pytest.mark.parametrize("variant", ["", "-4bit"])
def test_a_hybrid_stage_that_never_sums_fails_the_canary(variant, models):
    """Stages {0, 1} and {2}: ranks 0 and 1 cut the experts of the last
    layers and go on with their own partial outputs."""
    with LocalInstance(models["qwen3_moe" + variant], "hybrid_stage_without_sum", 3, env=PLUGIN_ENV,
                       stage_ranks=[2, 1], stage_strategy="moe_tensor", pipeline_layers=[2, 2]) as instance:
        assert ended(instance, 120)
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
            assert rank.status.reason.startswith("canary: layer"), rank.status.reason
            delta, limit = margin(rank.status.reason)
            assert delta >= 10 * limit, rank.status.reason
        assert never_ready(instance)


def test_hybrid_ranks_that_disagree_on_their_stage_layers_fail_the_canary(fp32_models):
    """Rank 1 of the stage {0, 1} runs layers 1-3 while rank 0 runs layer 3:
    only the tiling check can see it before a forward pass would hang."""
    with LocalInstance(fp32_models["qwen3_moe"], "hybrid_stage_ranks_shifted", 3, env=PLUGIN_ENV,
                       stage_ranks=[2, 1], stage_strategy="moe_tensor", pipeline_layers=[1, 3]) as instance:
        assert ended(instance, 120)
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
            assert rank.status.reason.startswith("canary: rank 1 holds layers 1..3"), rank.status.reason
            assert "every rank of a stage start where its first (rank 0) does" in rank.status.reason
        assert never_ready(instance)


def test_a_rank_whose_peer_never_starts_fails_within_the_connect_deadline(fp32_models):
    deadlines = pb.RunnerDeadlines(connect_s=2)
    started = time.monotonic()
    with LocalInstance(fp32_models["qwen3_moe"], "moe_tensor", 2, deadlines=deadlines, start_only=[0]) as instance:
        assert ended(instance, 20)
        elapsed = time.monotonic() - started
        status = instance.ranks[0].status
        assert status.state == pb.FAILED
        assert status.reason == "timed out in Connecting after 2 s", status.reason
        assert elapsed < 2 + 2 + 5  # deadline, the GIL-free backstop's grace, process start


def test_a_hang_while_loading_fails_at_the_load_deadline(fp32_models):
    deadlines = pb.RunnerDeadlines(load_s=2)
    with LocalInstance(fp32_models["qwen3_moe"], "hang_while_loading", 1, deadlines=deadlines,
                       env=PLUGIN_ENV) as instance:
        assert ended(instance, 30)
        status = instance.ranks[0].status
        assert status.state == pb.FAILED and status.reason == "timed out in Loading after 2 s"
        assert instance.ranks[0].process.wait(10) == 3  # the watchdog, not the backstop


def port_is_free(hostport):
    host, port = hostport.rsplit(":", 1)
    # TIME_WAIT remnants of closed connections are allowed (as for MLX's own
    # listener, which sets SO_REUSEADDR); a socket still bound is not.
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.parametrize("strategy,world", [("moe_tensor", 2), ("pipeline", 3)])
def test_kill_9_of_a_rank_mid_generation_fails_the_survivors(strategy, world, tmp_path):
    model_dir = synthetic.ensure_named("demo", tmp_path / "models")
    deadlines = pb.RunnerDeadlines(peer_s=5)
    with LocalInstance(model_dir, strategy, world, deadlines=deadlines, context_length=4096) as instance:
        instance.wait_ready(120)
        pids = [r.pid for r in instance.ranks]
        request = pb.GenerateRequest(request_id="long", prompt_tokens=[5, 6, 7],
                                     sampling=pb.SamplingParams(max_tokens=3000, ignore_eos=True))
        chunks = instance.submit(request)
        assert chunks.get(timeout=60).admitted
        first = chunks.get(timeout=60)
        assert first.tokens
        victim = instance.ranks[world - 1]
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        assert ended(instance, 30)
        bound = time.monotonic() - killed_at
        assert bound < deadlines.peer_s + 3
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
        assert victim.status.reason == "runner killed by SIGKILL in Running"
        for rank in instance.ranks[: world - 1]:
            assert "peer rank lost" in rank.status.reason or "timed out" in rank.status.reason, rank.status.reason
        # The request in flight was answered, not dropped.
        last = None
        while not chunks.empty():
            last = chunks.get_nowait()
        assert last is not None and last.finish_reason == pb.FINISH_ERROR
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert all(port_is_free(h) for h in instance.hosts)
        listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert not listening & {int(h.rsplit(":", 1)[1]) for h in instance.hosts}


def test_ranks_that_sample_different_tokens_fail_instead_of_answering(fp32_models):
    with LocalInstance(fp32_models["qwen3_moe"], "diverging_sampler", 2, env=PLUGIN_ENV) as instance:
        instance.wait_ready(120)
        request = pb.GenerateRequest(request_id="d", prompt_tokens=[5, 6, 7],
                                     sampling=pb.SamplingParams(max_tokens=64, ignore_eos=True))
        chunks = instance.submit(request)
        assert ended(instance, 60)
        for rank in instance.ranks:
            assert rank.status.state == pb.FAILED
            assert "ranks sampled different tokens" in rank.status.reason, rank.status.reason
        answered = []
        while not chunks.empty():
            answered.append(chunks.get_nowait())
        assert answered[-1].finish_reason == pb.FINISH_ERROR
        assert len([c for c in answered if c.tokens]) < 64
