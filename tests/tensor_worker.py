"""One rank of mlx-lm's tensor sharding on the ring backend: prints logits
of a fixed prompt and 16 greedy tokens as JSON (rank 0 only). Run with
MLX_RANK and MLX_HOSTFILE set, or alone for the single-process reference."""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

PROMPT = [1, 17, 42, 99, 7, 300, 5, 250]


def main(model_dir: str, sharded: bool) -> None:
    model, _ = load_model(Path(model_dir))
    rank = 0
    if sharded:
        group = mx.distributed.init(backend="ring", strict=True)
        rank = group.rank()
        model.shard(group)
    mx.eval(model.parameters())
    logits = model(mx.array([PROMPT]))[0]
    mx.eval(logits)  # every rank must run the same collectives in the same order
    cache = make_prompt_cache(model)
    token = mx.array([PROMPT])
    tokens = []
    for _ in range(16):
        step = model(token, cache=cache)[:, -1, :]
        next_token = mx.argmax(step, axis=-1)
        tokens.append(int(next_token.item()))
        token = next_token[None]
    if rank == 0:
        print(json.dumps({"logits": logits.tolist(), "tokens": tokens}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "sharded")
