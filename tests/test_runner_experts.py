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
from .test_runner_equivalence import LOGIT_BOUND, record

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


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(model_dir):
        if model_dir not in cache:
            cache[model_dir] = reference(model_dir)
        return cache[model_dir]

    return get


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


def test_a_malformed_layout_fails_in_loading_with_its_reason(runner_models):
    sets = [SPREAD_3[0], SPREAD_3[1], [[4, 5, 6], [0, 1, 2], [3, 3]]]
    with LocalInstance(runner_models("qwen3_moe", "fp32"), "moe_experts", 3, context_length=512,
                       expert_layout=layout_for("qwen3_moe", sets)) as instance:
        with pytest.raises(LaunchError) as failed:
            instance.wait_ready(120)
        instance.shutdown(15)
    assert ("(Loading failed: moe_experts: expert layout: layer 3, rank 2: an expert is listed twice in [3, 3]"
            in str(failed.value)), str(failed.value)
