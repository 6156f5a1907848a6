"""The tensor allow-list is earned: every architecture that lists `tensor`
as proven produces the single-process logits (fp32, max |d| <= 1e-4) and the
same 16 greedy tokens when run as 2 real ranks over MLX's ring backend."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from exod.models import architectures, synthetic

from .conftest import REPO

WORKER = REPO / "tests" / "tensor_worker.py"
TENSOR_PROVEN = sorted(a.name for a in architectures.ALL if "tensor" in a.proven_strategies)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_reference(model_dir):
    out = subprocess.run([sys.executable, str(WORKER), str(model_dir), "single"], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def run_sharded(model_dir, tmp_path, world=2):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(world)]))
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(model_dir), "sharded"],
                         env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    return json.loads(outputs[0][0])


def test_every_tensor_proven_architecture_has_a_tiny_model():
    assert set(TENSOR_PROVEN) <= set(synthetic.TINY_CONFIGS)


@pytest.mark.parametrize("arch", TENSOR_PROVEN)
def test_tensor_sharding_matches_single_process(arch, tiny_dirs, tmp_path):
    model_dir = tiny_dirs[(arch, "fp32")]
    reference = run_reference(model_dir)
    sharded = run_sharded(model_dir, tmp_path)
    delta = np.abs(np.array(sharded["logits"]) - np.array(reference["logits"])).max()
    assert delta <= 1e-4, f"{arch}: max |d| = {delta}"
    assert sharded["tokens"] == reference["tokens"]
