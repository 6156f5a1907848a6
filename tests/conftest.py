import json
import os
from pathlib import Path

import pytest

from exod.models import synthetic

REPO = Path(__file__).resolve().parent.parent

# Every daemon a test starts, in-process or as `exod start` (also inside
# network namespaces), joins this cluster unless the test says otherwise.
TEST_CLUSTER_KEY = "exod1-" + "dGVzdC1jbHVzdGVyLWtleS1ub3QtYS1zZWNyZXQtISE"
os.environ["EXOD_CLUSTER_KEY"] = TEST_CLUSTER_KEY
# No test reaches the internet: the hub is asked only where a test serves a
# local mirror at HF_ENDPOINT (and says HF_HUB_OFFLINE=0 for its daemons).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_ENDPOINT", None)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Model directories of each tiny architecture, fp32 and 4-bit."""
    built = {}
    for name, config in synthetic.TINY_CONFIGS.items():
        for quant in (None, {"group_size": 32, "bits": 4}):
            key = (name, "q4" if quant else "fp32")
            out = tmp_path_factory.mktemp(f"{name}-{key[1]}")
            synthetic.build(out, config, quantization=quant, dtype="bfloat16" if quant else "float32")
            built[key] = out
    return built


def load_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="session")
def runner_models(tmp_path_factory):
    """Tiny checkpoints the runner tests load, built once per session: fp32,
    and 4-bit weights with fp32 activations ("q4")."""
    built = {}

    def get(name, variant):
        key = (name, variant)
        if key not in built:
            out = tmp_path_factory.mktemp(f"runner-{name}-{variant}")
            quant = {"group_size": 32, "bits": 4} if variant == "q4" else None
            built[key] = synthetic.build(out, synthetic.TINY_CONFIGS[name], quantization=quant, dtype="float32")
        return built[key]

    return get
