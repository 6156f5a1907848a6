"""What the planner accepts, the runner runs; what it refuses, the runner
refuses too.

For every architecture module and the generic fallback, every tiny model of
its families (fp32 and 4-bit), every strategy, on 1, 2 and 3 ranks: the
planner's verdict on the checkpoint's spec (a candidate with nothing against
it, on nodes with room to spare) equals the runner's own (the refusals its
strategies check on the model it builds, before cutting anything). Every
accepted case runs for real in tests/test_runner_equivalence.py (checked
here), and refused ones run for real below fail with the runner's reason."""

from pathlib import Path

import pytest
from mlx_lm.utils import load_model

from exod.models import architectures, inventory, synthetic
from exod.models.architectures import generic
from exod.placement.profile import hybrid_inner
from exod.runner.launch import LaunchError, LocalInstance
from exod.runner.strategies import hybrid_refusals, refusals

from .strategy_matrix import STRATEGIES, WORLDS, accepted, planner_accepts
from .test_runner_equivalence import matrix

MODULES = [*architectures.ALL, generic.ARCHITECTURE]


def samples_of(arch) -> list[str]:
    return [name for name, cfg in synthetic.TINY_CONFIGS.items()
            if architectures.for_model_type(cfg["model_type"]) is arch]


@pytest.mark.parametrize("arch", MODULES, ids=lambda a: a.name)
def test_every_architecture_module_has_a_tiny_model(arch):
    assert samples_of(arch), f"{arch.name}: no tiny model in synthetic.TINY_CONFIGS"


@pytest.mark.parametrize("variant", ["fp32", "q4"])
@pytest.mark.parametrize("name", list(synthetic.TINY_CONFIGS))
def test_planner_accepts_exactly_what_the_runner_runs(name, variant, runner_models):
    model_dir = runner_models(name, variant)
    spec = inventory.from_directory(model_dir)
    model, config = load_model(Path(model_dir), lazy=True)
    arch = architectures.for_model_type(config["model_type"])
    disagreements = []
    for strategy in STRATEGIES:
        for world in WORLDS:
            if world == 1 and strategy != "pipeline":
                continue  # one rank is offered once, as the whole model ("pipeline" of one stage)
            planner = planner_accepts(spec, strategy, world)
            if strategy == "hybrid":  # on 3 ranks the planner's stages are 2 + 1; on 2 they could only be 1 + 1
                # The cut the planner puts inside the stages (none: the last it tries, which refuses too).
                inner = hybrid_inner(spec.num_experts > 0, set(spec.proven_strategies)) or "tensor"
                runner = hybrid_refusals(model, arch, config, (2, 1) if world == 3 else (1,) * world, inner)
            else:
                runner = refusals(strategy, model, arch, config, world)
            if planner != (not runner):
                disagreements.append(f"{strategy} on {world}: planner {'accepts' if planner else 'refuses'}, "
                                     f"runner {runner or 'runs it'}")
    assert not disagreements, disagreements


def test_every_accepted_case_runs_in_the_equivalence_matrix():
    run = {(p.values[0], p.values[1], p.values[2], p.values[3]) for p in matrix()}
    for name in synthetic.TINY_CONFIGS:
        for strategy, world in accepted(name):
            if world == 1:
                continue  # one rank: a sample runs (the matrix's ONE_RANK); the runner cuts nothing
            assert (name, strategy, world, "fp32") in run, (name, strategy, world)
    assert {(n, "pipeline", 1, "fp32") for n in ("qwen3", "gemma3_text", "phi3")} <= run


def test_the_families_the_issue_names_have_tiny_models():
    types = {cfg["model_type"] for cfg in synthetic.TINY_CONFIGS.values()}
    assert {"llama", "qwen3", "qwen3_moe", "gemma3_text", "phi3", "mistral", "starcoder2", "glm4", "olmo2",
            "deepseek_v3", "gpt_oss"} <= types


@pytest.mark.parametrize("name,strategy,world,reason", [
    ("qwen2_moe", "tensor", 2, "class has no shard()"),
    ("phi3", "tensor", 2, "not proven"),
    ("qwen3_moe", "tensor", 3, "fewer than 3 ranks"),
    ("llama", "moe_tensor", 2, "not proven"),
])
def test_a_refused_case_fails_in_the_runner_with_the_planners_reason(name, strategy, world, reason, runner_models):
    model_dir = runner_models(name, "fp32")
    spec = inventory.from_directory(model_dir)
    assert not planner_accepts(spec, strategy, world)
    with LocalInstance(model_dir, strategy, world, context_length=512) as instance:
        with pytest.raises(LaunchError) as failed:
            instance.wait_ready(120)
        instance.shutdown(15)
    # The rank that failed first says so in Loading, before any weight is cut or read.
    assert "(Loading failed: " in str(failed.value) and reason in str(failed.value), str(failed.value)
