"""Timing what the planner's cost model needs, in an MLX process.

python -m exod.runner.calibrate compute [--quick]
    Times decode steps of small synthetic MoE models built in memory (random
    weights, mlx-lm's own class, mlx-lm's own generate_step) and prints one
    JSON line: per model, layers, bytes one decode step reads (as the
    planner counts them) and the median seconds per token.

python -m exod.runner.calibrate collective RANK HOSTFILE TOKENS
    Joins a ring group over the hostfile and decodes TOKENS tokens of a
    tensor-sharded synthetic model, with its all-sums and without them
    (see collective()); then a ping-pong over plain TCP between the same
    ranks. Rank 0 prints one JSON line.

The timed models are deliberately not the benchmark's models: the fit is
checked against those, not made from them."""

import json
import socket
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3_moe
from mlx_lm.sample_utils import make_sampler

from exod.models import inventory
from exod.placement.profile import profile

# (layers, hidden, experts, experts per token, expert width, heads, kv heads, head dim)
SHAPES = [
    (2, 512, 8, 2, 256, 8, 4, 64),
    (8, 512, 8, 2, 256, 8, 4, 64),
    (16, 256, 8, 2, 256, 8, 4, 32),
    (2, 1536, 16, 4, 768, 12, 4, 128),
    (4, 1024, 16, 4, 512, 8, 4, 64),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3]]


def config(layers, hidden, experts, per_token, width, heads, kv_heads, head_dim) -> dict:
    return dict(model_type="qwen3_moe", hidden_size=hidden, intermediate_size=2 * hidden,
                moe_intermediate_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, num_experts=experts,
                num_experts_per_tok=per_token, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                tie_word_embeddings=False, vocab_size=1024, torch_dtype="float32")  # as mlx-lm builds it


def time_decode(cfg: dict, tokens: int) -> dict:
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    model_profile = profile(inventory.from_config(cfg, "calibration"))
    read = sum(layer.read_all for layer in model_profile.layers) + model_profile.outside.read_all
    gaps, last = [], None
    for _ in generate_step(mx.array([5] * 16), model, max_tokens=tokens, sampler=make_sampler(0.0)):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    return {"layers": cfg["num_hidden_layers"], "read_bytes": read, "seconds": statistics.median(gaps[2:])}


def compute(quick: bool) -> list[dict]:
    shapes = QUICK_SHAPES if quick else SHAPES
    return [time_decode(config(*shape), 16 if quick else 32) for shape in shapes]


def _ping_pong(rank: int, hosts: list[str], count: int) -> float:
    """Median TCP round trip between rank 0 and rank 1 on the ranks' own
    hosts (one port above rank 1's ring port, free once the ring is up)."""
    host, _, port = hosts[1].rpartition(":")
    address = (host, int(port) + 1)
    if rank == 1:
        server = socket.create_server(address)
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            conn.sendall(conn.recv(8))
        conn.close()
        return 0.0
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(address, timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(count):
        start = time.perf_counter()
        conn.sendall(b"12345678")
        conn.recv(8)
        rtts.append(time.perf_counter() - start)
    conn.close()
    return statistics.median(rtts)


# A tensor-sharded decode on the ring: mlx-lm's own shard(), 2 all-sums per
# layer. Divisible by 2 and 3 ranks; not a benchmark model's shape.
SHARDED_SHAPE = (6, 768, 8, 2, 384, 12, 6, 64)


def _decode_s(model, tokens: int) -> float:
    gaps, last = [], None
    for _ in generate_step(mx.array([5] * 8), model, max_tokens=tokens, sampler=make_sampler(0.0)):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    return statistics.mean(gaps[2:])


def collective(rank: int, hostfile: str, tokens: int) -> None:
    """Decode a tensor-sharded model with its all-sums, then with them
    replaced by the identity, every rank at once both times (so the ranks
    contend for cores alike): the difference per all-sum is what one costs
    inside a real decode, scheduler and MLX's own work included."""
    import mlx.core.distributed as dist

    group = mx.distributed.init(backend="ring", strict=True)
    mx.random.seed(0)  # the same weights on every rank
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config(*SHARDED_SHAPE)))
    model.shard(group)
    mx.eval(model.parameters())
    real_all_sum = dist.all_sum
    counted = []

    def counting(x, *args, **kwargs):
        counted.append(1)
        return real_all_sum(x, *args, **kwargs)

    dist.all_sum = counting
    mx.eval(model(mx.array([[5]])))
    per_token = len(counted)
    dist.all_sum = real_all_sum
    _decode_s(model, 4)
    together = _decode_s(model, tokens)
    mx.eval(real_all_sum(mx.ones(1), group=group))  # all ranks start the next phase together
    dist.all_sum = lambda x, *args, **kwargs: x
    alone = _decode_s(model, tokens)
    dist.all_sum = real_all_sum
    mx.eval(real_all_sum(mx.ones(1), group=group))  # nobody leaves while another still times
    rtt = 0.0
    if rank in (0, 1):
        hosts = [entry[0] for entry in json.load(open(hostfile))]
        rtt = _ping_pong(rank, hosts, 200)
    if rank == 0:
        print(json.dumps({"all_sum_s": (together - alone) / per_token, "all_sums_per_token": per_token,
                          "decode_s": together, "decode_without_all_sums_s": alone, "rtt_s": rtt,
                          "world": group.size()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "compute":
        print(json.dumps(compute("--quick" in sys.argv)), flush=True)
    elif sys.argv[1] == "collective":
        collective(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown calibration {sys.argv[1]!r}")
