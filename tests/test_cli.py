"""The offline CLI, run as a real process."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO


def exod(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "exod.daemon.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_models_lists_the_catalog():
    out = exod("models", "--json", check=True).stdout
    ids = {m["id"] for m in json.loads(out)}
    assert {"deepseek-v4-flash", "llama-3.3-70b-4bit"} <= ids


def test_inspect_prints_classes_and_active_parameters():
    out = exod("inspect", "qwen3-30b-a3b-4bit", check=True).stdout
    assert "experts" in out and "attention" in out and "active / token" in out
    data = json.loads(exod("inspect", "qwen3-30b-a3b-4bit", "--json", check=True).stdout)
    assert data["by_class"]["experts"]["bytes"] > data["by_class"]["attention"]["bytes"]
    assert int(data["active_parameters_per_token"]) < int(data["total_parameters"])


def test_plan_json_shape(tmp_path):
    proc = exod("plan", "deepseek-v4-flash", "--nodes", "2", "--memory", "128GB", "--json", check=True)
    data = json.loads(proc.stdout)
    assert data["chosen"] in data["candidates"]
    rejected = [c for c in data["candidates"] if c.get("rejected")]
    assert rejected, "V4 on 2 ranks: tensor is not proven, so that candidate is rejected"
    for candidate in data["candidates"]:
        assert {"strategy", "backend", "ranks"} <= set(candidate)
        assert candidate["strategy"] in ("PIPELINE", "MOE_TENSOR", "TENSOR", "MOE_EXPERTS")
        if candidate.get("rejected"):
            # Refused for a reason other than memory: no estimates.
            assert candidate["reasons"] and "predicted_decode_tokens_per_s" not in candidate
            assert all("memory" not in rank and "node_name" in rank for rank in candidate["ranks"])
            continue
        assert candidate["predicted_decode_tokens_per_s"] > 0
        for rank in candidate["ranks"]:
            assert int(rank["memory"]["total_bytes"]) > 0 and "node_name" in rank


def test_a_dense_70b_fits_one_128gb_node():
    proc = exod("plan", "llama-3.3-70b-4bit", "--nodes", "1", "--memory", "128GB", check=True)
    assert "chosen: pipeline over 1 node(s)" in proc.stdout, proc.stdout


def test_the_table_shows_no_numbers_for_a_candidate_rejected_for_other_reasons_than_memory():
    rows = exod("plan", "llama-3.3-70b-4bit", "--nodes", "2", "--memory", "128GB", check=True).stdout.splitlines()
    moe = next(r for r in rows if r.startswith("moe_tensor"))
    assert moe.split()[3:5] == ["-", "-"] and "GB" not in moe.split("no:")[0], moe
    assert "is dense" in moe
    tensor = next(r for r in rows if r.startswith("tensor"))
    assert float(tensor.split()[3]) > 0 and tensor.split()[4].endswith("GB"), tensor
    # A shortfall of memory keeps its numbers: they say by how much it misses.
    rows = exod("plan", "llama-3.3-70b-4bit", "--nodes", "2", "--memory", "16GB").stdout.splitlines()
    short = next(r for r in rows if r.startswith("pipeline") and " 1 " in r)
    assert short.split()[4].endswith("GB") and "needs" in short, short


def test_plan_on_a_model_directory_and_cluster_file(tiny_dirs):
    proc = exod("plan", str(tiny_dirs[("qwen3_moe", "q4")]), "--cluster", "examples/cluster.json", check=True)
    assert "chosen:" in proc.stdout


def test_forced_backend_and_nodes_on_a_cluster_file():
    data = json.loads(exod("plan", "deepseek-v4-flash", "--cluster", "examples/cluster.json", "--backend", "jaccl",
                           "--json", check=True).stdout)
    assert {c["backend"] for c in data["candidates"]} == {"JACCL"}
    assert {r["node_name"] for r in data["chosen"]["ranks"]} == {"studio-1", "studio-2"}
    data = json.loads(exod("plan", "qwen3-30b-a3b-4bit", "--cluster", "examples/cluster.json", "--only", "macbook",
                           "--json", check=True).stdout)
    assert [r["node_name"] for r in data["chosen"]["ranks"]] == ["macbook"]


def test_nothing_fits_exits_1_with_the_shortfall():
    proc = exod("plan", "kimi-k2-4bit", "--nodes", "2", "--memory", "64GB")
    assert proc.returncode == 1
    assert "nothing fits" in proc.stdout and "is usable" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["plan", "no-such-model"], "unknown model"),
        (["plan", "deepseek-v4-flash", "--memory", "0GB"], "must be positive"),
        (["plan", "deepseek-v4-flash", "--memory=-5GB"], "cannot read"),
        (["plan", "deepseek-v4-flash", "--memory", "lots"], "cannot read"),
        (["plan", "deepseek-v4-flash", "--nodes", "0"], "must be positive"),
        (["plan", "deepseek-v4-flash", "--context", "99999999"], "longer than"),
        (["plan", "llama-3.3-70b-4bit", "--strategy", "moe_tensor"], "impossible strategy"),
        (["plan", "deepseek-v4-flash", "--strategy", "tensor"], "not proven"),
        (["plan", "deepseek-v4-flash", "--strategy", "banana"], "invalid choice"),
        (["plan", "deepseek-v4-flash", "--cluster", "missing.json"], "cannot read"),
        (["plan", "deepseek-v4-flash", "--backend", "jaccl"], "jaccl needs RDMA"),
        (["plan", "deepseek-v4-flash", "--nodes", "2", "--only", "mac-9"], "unknown node"),
        (["inspect"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = exod(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_model_directories(tmp_path, tiny_dirs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs[("llama", "fp32")], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "outside the file" in exod("plan", str(broken)).stderr

    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    assert "corrupt safetensors header" in exod("inspect", str(broken)).stderr

    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = exod("inspect", str(broken))
    assert proc.returncode == 2 and "lacks" in proc.stderr


def test_bad_cluster_files(tmp_path):
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"nodes": [
        {"name": "a", "memory_usable_bytes": "1000000000", "memory_bandwidth_bytes_per_s": 1e11},
        {"name": "a", "memory_usable_bytes": "1000000000", "memory_bandwidth_bytes_per_s": 1e11}]}))
    proc = exod("plan", "qwen3-30b-a3b-4bit", "--cluster", str(dup))
    assert proc.returncode == 2 and "duplicate node" in proc.stderr
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{nodes: [")
    proc = exod("plan", "qwen3-30b-a3b-4bit", "--cluster", str(garbage))
    assert proc.returncode == 2 and "cluster JSON" in proc.stderr
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"nodes": [{"name": "a", "memory_bandwidth_bytes_per_s": 1e11}]}))
    proc = exod("plan", "qwen3-30b-a3b-4bit", "--cluster", str(zero))
    assert proc.returncode == 2 and "no usable memory" in proc.stderr
    # One node without memory is left out, with the reason; the others are planned.
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"nodes": [
        {"name": "a", "memory_bandwidth_bytes_per_s": 1e11},
        {"name": "b", "memory_usable_bytes": "100000000000", "memory_bandwidth_bytes_per_s": 1e11},
        {"name": "c", "memory_usable_bytes": "100000000000", "memory_bandwidth_bytes_per_s": 0}]}))
    proc = exod("plan", "qwen3-30b-a3b-4bit", "--cluster", str(mixed), "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert {r["node_name"] for r in answer["chosen"]["ranks"]} == {"b"}
    assert answer["reasons"] == ["node 'a' left out: no usable memory", "node 'c' left out: no memory bandwidth"]


def test_console_script_is_installed():
    import shutil

    path = shutil.which("exod") or str(REPO / ".venv" / "bin" / "exod")
    proc = subprocess.run([path, "models"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "deepseek-v4-flash" in proc.stdout


def test_plan_places_experts_by_a_routing_file(tmp_path):
    """`exod plan --routing FILE`: moe_experts' experts placed by measured
    counts, shown in the table and the JSON; a bad file is one line."""
    from exod.models import catalog
    from exod.placement import profile

    spec = catalog.resolve("qwen3-30b-a3b-4bit")
    hot = [50] * 8 + [1] * (spec.num_experts - 8)  # the first eight share rank 0 under an even split
    counts = {"layers": [{"layer": layer, "counts": hot} for layer in profile(spec).moe_layer_ids]}
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(counts))
    args = ["plan", "qwen3-30b-a3b-4bit", "--nodes", "2", "--memory", "64GB", "--strategy", "moe_experts",
            "--concurrency", "1", "--routing", str(path)]
    table = exod(*args, check=True).stdout
    assert "experts placed by measured routing load in 48 MoE layers: routing imbalance 1.0" in table
    chosen = json.loads(exod(*args, "--json", check=True).stdout)["chosen"]
    layer = chosen["expert_layout"]["layers"][0]
    assert [sum(1 for e in r["experts"] if e < 8) for r in layer["ranks"]] == [4, 4]
    path.write_text('{"layers": "many"}')
    proc = exod(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not routing counts" in proc.stderr
