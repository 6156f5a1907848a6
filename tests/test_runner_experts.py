"""moe_experts with an explicit expert layout (RunnerSpec.expert_layout):
non-contiguous experts that differ by layer, replicas that split their
slots, real ranks over MLX's ring on loopback against the single process;
malformed layouts failing in Loading; the routing counts the ranks report."""

import numpy as np
import pytest

from exod.models import expert_layout, synthetic
from exod.proto import exod_pb2 as pb
from exod.runner import strategies
from exod.runner.launch import LaunchError, LocalInstance

from .runner_helpers import PROMPT, STEPS, greedy_request, reference, sharded
from .test_runner_equivalence import LOGIT_BOUND, record, references  # noqa: F401 (the fixture: one reference per model a session)

# 8 experts per layer. Without replication: 3 + 3 + 2 (and 2 x 4) experts,
# none contiguous, different in every layer.
SPREAD_3 = [[[0, 3, 6], [1, 4, 7], [2, 5]], [[1, 2, 7], [0, 5, 6], [3, 4]],
            [[4, 5, 6], [0, 1, 2], [3, 7]], [[0, 2, 4], [5, 6, 7], [1, 3]]]
SPREAD_4 = [[[0, 7], [1, 6], [2, 5], [3, 4]], [[1, 3], [0, 2], [5, 7], [4, 6]],
            [[2, 6], [3, 7], [0, 4], [1, 5]], [[4, 5], [0, 1], [6, 7], [2, 3]]]
# Replicated: 4 + 3 + 3 = 10 slots for 8 experts (2 replicas per layer), and
# 4 x 3 = 12 (4 replicas per layer), different in every layer.
REPLICATED_3 = [[[0, 1, 2, 3], [3, 4, 5], [5, 6, 7]], [[0, 2, 4, 6], [1, 3, 6], [0, 5, 7]],
                [[1, 3, 5, 7], [0, 2, 7], [1, 4, 6]], [[0, 1, 6, 7], [2, 3, 4], [0, 4, 5]]]
REPLICATED_4 = [[[0, 1, 2], [2, 3, 4], [4, 5, 6], [0, 6, 7]], [[0, 3, 7], [1, 3, 5], [2, 5, 6], [4, 6, 7]],
                [[1, 4, 5], [0, 2, 4], [3, 5, 7], [1, 6, 7]], [[0, 1, 2], [3, 4, 5], [5, 6, 7], [0, 2, 7]]]
# The MoE layers of the tiny models: qwen3_moe's layer 0 is dense (mlp_only_layers).
MOE_LAYERS = {"qwen3_moe": [1, 2, 3], "qwen2_moe": [0, 1, 2, 3]}


def layout_for(name: str, sets: list) -> pb.ExpertLayout:
    return expert_layout.to_proto(dict(zip(MOE_LAYERS[name], sets)))


CASES = [
    ("qwen3_moe", "spread", SPREAD_3, "fp32"),
    ("qwen3_moe", "spread", SPREAD_4, "q4"),
    ("qwen3_moe", "replicated", REPLICATED_3, "q4"),
    ("qwen3_moe", "replicated", REPLICATED_4, "fp32"),
    # A shared expert (with its gate), cut evenly over the ranks whatever their expert counts.
    ("qwen2_moe", "spread", SPREAD_3, "fp32"),
    ("qwen2_moe", "replicated", REPLICATED_4, "q4"),
    ("qwen2_moe", "replicated", REPLICATED_3, "fp32"),
]


@pytest.mark.parametrize("name,kind,sets,variant", CASES,
                         ids=[f"{n}-{k}-{len(s[0])}-{v}" for n, k, s, v in CASES])
def test_an_expert_layout_matches_single_process(name, kind, sets, variant, runner_models, references):
    model_dir = runner_models(name, variant)
    expected = references(model_dir)
    world = len(sets[0])
    got = sharded(model_dir, "moe_experts", world, expert_layout=layout_for(name, sets))
    delta = np.abs(got["logits"] - expected["logits"]).max()
    record(name, f"moe_experts layout {kind}", world, variant, delta)
    assert delta <= LOGIT_BOUND[variant], f"max |d| = {delta}"
    assert got["tokens"] == expected["tokens"]
    steps = np.abs(got["logprobs"] - expected["logprobs"]).max()
    assert steps <= LOGIT_BOUND[variant], f"logprobs max |d| = {steps}"
    for status in got["ready"]:
        assert status.canary_max_delta <= 1e-4


def test_an_expert_layout_decoding_one_sequence_at_a_time_matches(runner_models, references):
    """Concurrency 1 decodes with mlx-lm's generate_step, not a BatchGenerator."""
    model_dir = runner_models("qwen3_moe", "fp32")
    expected = references(model_dir)
    got = sharded(model_dir, "moe_experts", 3, expert_layout=layout_for("qwen3_moe", REPLICATED_3), max_batch=1)
    assert np.abs(got["logits"] - expected["logits"]).max() <= LOGIT_BOUND["fp32"]
    assert got["tokens"] == expected["tokens"]


def test_a_malformed_layout_fails_in_loading_with_its_reason(runner_models):
    sets = [SPREAD_3[0], SPREAD_3[1], [[4, 5, 6], [0, 1, 2], [3, 3]]]
    with LocalInstance(runner_models("qwen3_moe", "fp32"), "moe_experts", 3, context_length=512,
                       expert_layout=layout_for("qwen3_moe", sets)) as instance:
        with pytest.raises(LaunchError) as failed:
            instance.wait_ready(120)
        instance.shutdown(15)
    assert ("(Loading failed: moe_experts: expert layout: layer 3, rank 2: an expert is listed twice in [3, 3]"
            in str(failed.value)), str(failed.value)


def test_routing_counts_add_up_and_show_the_skew(tmp_path):
    """Every rank counts every routed slot (the router is replicated): at
    Ready the calibration prompts' tokens x k per MoE layer, then each
    request's tokens x k, the same on every rank. Two requests decode as a
    batch of 2 and still give the single process's tokens. With the skewed
    synthetic router, each layer's hot experts take most of the slots."""
    model_dir = synthetic.build(tmp_path / "skewed", synthetic.TINY_CONFIGS["qwen3_moe"], router_skew=True)
    expected = reference(model_dir)
    k = synthetic.TINY_CONFIGS["qwen3_moe"]["num_experts_per_tok"]
    calibration = strategies.CALIBRATION_PROMPTS * strategies.CALIBRATION_TOKENS
    with LocalInstance(model_dir, "moe_experts", 3, context_length=512, prefill_step_tokens=16,
                       expert_layout=layout_for("qwen3_moe", SPREAD_3)) as instance:
        instance.wait_ready(180)
        at_ready = [counts_of(rank.status) for rank in instance.ranks]
        queues = [instance.submit(greedy_request(f"r{i}")) for i in range(2)]
        tokens = [collect(q) for q in queues]
        assert instance.wait_for(lambda i: all(r.status.state == pb.READY and r.status.generated_tokens == 2 * STEPS
                                               for r in i.ranks), 30)
        after = [counts_of(rank.status) for rank in instance.ranks]
        assert instance.shutdown(15)
    assert tokens == [expected["tokens"]] * 2
    assert all(c == at_ready[0] for c in at_ready) and all(c == after[0] for c in after)
    assert sorted(at_ready[0]) == MOE_LAYERS["qwen3_moe"]
    for layer, counts in at_ready[0].items():
        assert sum(counts) == calibration * k, (layer, counts)
    for layer, counts in after[0].items():
        counts = np.array(counts, dtype=np.int64)
        # Each sequence runs its 40 prompt tokens and feeds back each of its
        # 16 sampled tokens (the engine computes the step after the last
        # one before it sees the length limit).
        assert counts.sum() - sum(at_ready[0][layer]) == 2 * (len(PROMPT) + STEPS) * k, (layer, counts)
        hot = synthetic.hot_experts(layer, len(counts))
        assert set(np.argsort(counts)[-len(hot):]) == set(hot), (layer, counts)
        assert counts[hot].sum() > 0.6 * counts.sum(), (layer, counts)


def counts_of(status) -> dict:
    return {c.layer: list(c.counts) for c in status.expert_counts.layers}


def collect(q, timeout: float = 120) -> list[int]:
    out = []
    while True:
        chunk = q.get(timeout=timeout)
        out += [t.token for t in chunk.tokens]
        if chunk.finish_reason:
            assert chunk.finish_reason == pb.FINISH_LENGTH, chunk
            return out[:STEPS]


class Recording:
    """Stands in for SwitchGLU: records what it was asked to compute."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, indices):
        import mlx.core as mx

        self.calls.append((x.shape, np.array(indices).reshape(-1).tolist()))
        # Each slot's output: its local expert index + 1 in every dimension.
        return mx.broadcast_to((indices[..., None] + 1).astype(x.dtype), (*indices.shape, x.shape[-1]))


def test_a_rank_computes_only_the_slots_it_owns():
    """Decode (one token) and prefill (B=2, L=3): the experts module sees only
    this rank's slots, with local expert indices; the other slots are zero
    and the counts take every slot."""
    import mlx.core as mx

    sets = [[0, 2, 5], [1, 2, 3, 4, 6, 7]]  # rank 1's view: expert 2 replicated on both ranks
    inner = Recording()
    local = strategies.LocalExperts(inner, 1, sets[1], expert_layout.holders(sets, 8), 1)
    x = mx.arange(2 * 3 * 4, dtype=mx.float32).reshape(2, 3, 4)
    indices = mx.array([[[2, 5], [2, 0], [6, 2]], [[2, 7], [0, 5], [2, 1]]], dtype=mx.uint32)
    y = np.array(local(x, indices))
    # Expert 2's slots alternate rank 0, rank 1, ... in token-major order.
    owner = [[[0, 0], [1, 0], [1, 0]], [[1, 1], [0, 0], [0, 1]]]
    assert inner.calls == [((5, 4), [1, 4, 1, 5, 0])]  # 2 -> 1, 6 -> 4, 2 -> 1, 7 -> 5, 1 -> 0
    for b in range(2):
        for t in range(3):
            for s in range(2):
                e = int(np.array(indices)[b, t, s])
                want = sets[1].index(e) + 1 if owner[b][t][s] == 1 else 0
                assert (y[b, t, s] == want).all(), (b, t, s, y[b, t, s])
    assert local.counts.tolist() == [2, 1, 5, 0, 0, 2, 1, 1]
    # Decode steps: each pass counts its turns afresh. Experts 2 (rank 0's
    # first turn) and 5: nothing here, and no call.
    assert not np.array(local(x[:1, :1], indices[:1, :1])).any() and len(inner.calls) == 1
    one = np.array(local(x[:1, :1], mx.array([[[6, 2]]], dtype=mx.uint32)))
    assert inner.calls[-1] == ((1, 4), [4])
    assert one[0, 0, 0].tolist() == [5] * 4 and not one[0, 0, 1].any()
    assert local.counts.tolist() == [2, 1, 7, 0, 0, 3, 2, 1]
