"""models/store.py: names, the three places a node finds checkpoints (the
Hugging Face cache as huggingface_hub writes it, exod's store, --models-dir
folders), published digests, and the rule that only listed files of a
holding are ever served."""

import hashlib
import json
import subprocess
import sys

import pytest

from exod.models import ModelError, store

from .conftest import REPO
from .model_fixtures import hf_cache_with


def test_names_of_every_kind():
    assert store.parse("demo") == store.ModelName("builtin", "demo")
    card = store.parse("qwen3-30b-a3b-4bit")
    assert card.kind == "catalog" and card.model_id == "mlx-community/Qwen3-30B-A3B-4bit" and card.card
    assert store.parse("mlx-community/Qwen3-30B-A3B-4bit@abc123") == store.ModelName(
        "repo", "mlx-community/Qwen3-30B-A3B-4bit", "abc123")
    assert store.parse("my-model").kind == "store"
    for bad in ("a/../b", "org--x/y", "a/b/c", "../etc", "org/na me", "", "a/b@../x"):
        with pytest.raises(ModelError):
            store.parse(bad)
    with pytest.raises(ModelError, match="is a path"):
        store.check_remote("/etc")


def test_a_directory_only_from_this_machine(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert store.parse(str(tmp_path / "m"), allow_local=True).kind == "local"
    with pytest.raises(ModelError, match="is a path"):
        store.parse(str(tmp_path / "m"))


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from .model_fixtures import build_moe

    config = dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                  num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                  rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
    return build_moe(tmp_path_factory.mktemp("tiny-moe"), config)


def test_the_hf_cache_as_huggingface_hub_writes_it(tmp_path, tiny_moe):
    cache = hf_cache_with(tmp_path / "hub", tiny_moe, "acme/tiny-moe")
    s = store.Store(tmp_path / "data", hf_cache=cache)
    [held] = s.refresh()
    assert (held.model_id, held.store, held.complete) == ("acme/tiny-moe", "hf-cache", True)
    assert len(held.revision) == 40 and held.refs == ("main",)
    weights = held.files["model-00001-of-00002.safetensors"]
    # An LFS file's digest is its blob's name: no hashing needed.
    assert weights.sha256 == hashlib.sha256((tiny_moe / weights.name).read_bytes()).hexdigest()
    # config.json's blob is named by its git sha1: hashed once, then cached.
    assert held.files["config.json"].sha256 == ""
    missing = s.missing_digests()
    assert held.files["config.json"].path in missing
    for path in missing:
        s.digests.compute(path)
    again = store.Store(tmp_path / "data", hf_cache=cache).refresh()[0]
    assert again.files["config.json"].sha256 == hashlib.sha256((tiny_moe / "config.json").read_bytes()).hexdigest()
    assert s.find("acme/tiny-moe", "main") is not None and s.find("acme/tiny-moe", held.revision) is not None
    assert s.find("acme/tiny-moe", "0" * 40) is None
    # A cache that lacks one weight file holds a partial checkpoint.
    partial = hf_cache_with(tmp_path / "hub2", tiny_moe, "acme/tiny-moe",
                            ["config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"])
    [part] = store.Store(tmp_path / "data2", hf_cache=partial).refresh()
    assert not part.complete and store.Store(tmp_path / "data2", hf_cache=partial).find("acme/tiny-moe") is None


def test_exod_store_and_models_dirs(tmp_path, tiny_moe):
    import shutil

    data, lms = tmp_path / "data", tmp_path / "lmstudio"
    shutil.copytree(tiny_moe, data / "models" / "acme" / "pulled")
    (data / "models" / "acme" / "pulled" / store.REVISION_FILE).write_text("a" * 40)
    shutil.copytree(tiny_moe, lms / "someone" / "local-model")
    (lms / "someone" / "local-model" / "model-00002-of-00002.safetensors").unlink()
    (lms / "..hidden").mkdir()
    s = store.Store(data, [lms], hf_cache=tmp_path / "none")
    found = {(h.model_id, h.store): h for h in s.refresh()}
    assert set(found) == {("acme/pulled", "exod"), ("someone/local-model", "models-dir")}
    assert found[("acme/pulled", "exod")].revision == "a" * 40 and found[("acme/pulled", "exod")].complete
    assert not found[("someone/local-model", "models-dir")].complete
    # Only files in a holding's list are served, whatever the name says.
    assert s.served_file("acme/pulled", "", "config.json").path == data / "models/acme/pulled/config.json"
    for name in ("../pulled/config.json", "/etc/passwd", store.REVISION_FILE, "nothing.json", "a//b"):
        assert s.served_file("acme/pulled", "", name) is None
    assert s.served_file("acme/pulled", "b" * 40, "config.json") is None
    assert s.served_file("acme/other", "", "config.json") is None
    with pytest.raises(ModelError):
        s.exod_path("../../etc")


def test_inspect_names_a_built_in_model_as_run_does(tmp_path):
    out = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "inspect", "demo", "--json", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_type"] == "qwen3_moe"
    out = subprocess.run([sys.executable, "-m", "exod.daemon.cli", "inspect", "acme/absent", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "no checkpoint of acme/absent is on this machine" in out.stderr
