"""One rank of the baseline: mlx-lm's own sharded_load and stream_generate,
as `mlx.launch` would run them, or (engine "batch") its BatchGenerator, the
batched engine exod's runner builds on, with one request. Rank 0 prints one
JSON line."""

import json
import os
import sys
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load, sharded_load


def batch_generator_decode(model, prompt: list, max_tokens: int) -> tuple[int, float, list]:
    """(tokens, decode tokens/s, each token's time) of one request through mlx-lm's
    BatchGenerator, counted as exod's runner counts them."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    generator.insert([prompt], max_tokens=[max_tokens])
    tokens, first_at, times = 0, None, []
    while True:
        _, responses = generator.next()
        if responses:
            tokens += 1
            times.append(time.perf_counter())
            first_at = first_at or times[-1]
            if responses[0].finish_reason:
                break
    generator.close()
    return tokens, (tokens - 1) / (time.perf_counter() - first_at) if tokens > 1 else 0.0, times


def main(model_dir: str, strategy: str, max_tokens: int, prompt_tokens: int, engine: str = "stream") -> None:
    spawned_at = float(os.environ["BENCH_SPAWNED_AT"])
    if strategy == "single":
        model, tokenizer = load(model_dir)
        rank = 0
    else:
        group = mx.distributed.init(backend="ring", strict=True)
        rank = group.rank()
        if strategy == "pipeline":
            model, tokenizer = sharded_load(model_dir, pipeline_group=group)
        else:
            model, tokenizer = sharded_load(model_dir, tensor_group=group)
    ready_s = time.time() - spawned_at
    tokenizer.eos_token_ids = []  # a fixed number of tokens, as exod's ignore_eos
    last, first_at, times = None, None, []
    prompt = [5 + (i % 50) for i in range(prompt_tokens)]
    if engine == "batch":
        tokens, decode_tps, times = batch_generator_decode(model, prompt, max_tokens)
        prompt_tps = 0.0
    else:
        for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)):
            times.append(time.perf_counter())
            first_at = first_at or times[-1]
        # Decode rate as exod's runner counts it: the tokens after the first over
        # the time since the first. (mlx-lm's generation_tps divides all n tokens
        # by that time, n/(n-1) too high: +1.6% at 64 tokens.)
        decode_s = time.perf_counter() - first_at
        tokens, prompt_tps = last.generation_tokens, last.prompt_tps
        decode_tps = (tokens - 1) / decode_s if tokens > 1 else 0.0
    if strategy != "single":
        # generate_step leaves one step in flight; no rank may exit before all finish it.
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    if rank == 0:
        print(json.dumps({"ready_s": ready_s, "decode_tokens_per_s": decode_tps,
                          "token_times": times,
                          "prompt_tokens_per_s": prompt_tps, "tokens": tokens}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6])
