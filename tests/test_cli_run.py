"""`exod run` and `exod run-rank` as real processes."""

import json
import os
import subprocess
import sys

import pytest
from google.protobuf import json_format

from exod.models import synthetic
from exod.proto import exod_pb2 as pb

from .conftest import REPO


def exod(*args, env=None, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "exod.daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, input=stdin, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("exod-data")
    synthetic.ensure_named("demo", path / "models")  # what `exod run demo` would build on first use
    return path


def test_run_demo_on_two_ranks_streams_an_answer(data_dir):
    proc = exod("run", "demo", "--ranks", "2", "--max-tokens", "8", "--prompt", "hello",
                env={"EXOD_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "over 2 local ranks" in proc.stderr and "rank 1 ready: canary " in proc.stderr
    assert "8 tokens" in proc.stderr


def test_run_v4_mini_with_moe_tensor_on_two_ranks(data_dir):
    """The README's DeepSeek-V4 line: built on first use, planned, cut, canaried, served."""
    proc = exod("run", "v4-mini", "--ranks", "2", "--strategy", "moe_tensor", "--max-tokens", "8",
                "--prompt", "hello", env={"EXOD_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stderr
    assert "v4-mini as moe_tensor over 2 local ranks" in proc.stderr and "rank 1 ready: canary " in proc.stderr
    assert "8 tokens" in proc.stderr


def test_run_demo_as_a_hybrid_on_three_ranks(data_dir):
    """Pipeline across two stages, moe_tensor inside the stage of two."""
    proc = exod("run", "demo", "--ranks", "3", "--strategy", "hybrid", "--max-tokens", "8", "--prompt", "hello",
                env={"EXOD_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stderr
    assert "demo as hybrid over 3 local ranks (hybrid: [" in proc.stderr, proc.stderr
    assert "moe_tensor layers" in proc.stderr and "rank 2 ready: canary " in proc.stderr
    assert "8 tokens" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "no-such-model"], "no complete checkpoint of no-such-model is on this machine"),
    (["run", "demo", "--ranks", "0"], "--ranks must be at least 1"),
    (["run", "demo", "--context", "0"], "--context and --max-tokens must be positive"),
    (["run-rank", "--spec", "/nonexistent/spec.json"], "cannot read /nonexistent/spec.json"),
])
def test_run_bad_input_is_one_line_and_exit_2(args, message, data_dir):
    proc = exod(*args, env={"EXOD_DATA_DIR": str(data_dir)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exod: error:") and message in lines[0]


def test_run_rank_speaks_json_lines(data_dir, tmp_path):
    spec = pb.RunnerSpec(instance_id="cli", rank=0, world_size=1, model_dir=str(data_dir / "models" / "demo"),
                         strategy="pipeline", context_length=512)
    path = tmp_path / "spec.json"
    path.write_text(json_format.MessageToJson(spec))
    request = pb.RunnerCommand(generate=pb.GenerateRequest(
        request_id="r1", prompt_tokens=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True)))
    stdin = "not json\n" + json_format.MessageToJson(request, indent=None) + "\n"
    proc = exod("run-rank", "--spec", str(path), stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    states = [e["status"]["state"] for e in events if "status" in e]
    assert states[0] == "IDLE" and "READY" in states and states[-1] == "SHUTDOWN"
    chunks = [e["chunk"] for e in events if "chunk" in e]
    # Admitted before any token (so the APIs can refuse before a stream), then 4 tokens and the end.
    assert chunks[0].get("admitted") is True and chunks[-1]["finish_reason"] == "FINISH_LENGTH"
    assert sum(len(c.get("tokens", [])) for c in chunks) == 4 and chunks[-1]["generation_tokens"] == 4
    assert "not a RunnerCommand" in proc.stderr
