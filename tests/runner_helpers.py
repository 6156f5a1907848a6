"""Shared by the runner tests: single-process references and instance runs."""

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from exod.proto import exod_pb2 as pb
from exod.runner.launch import LocalInstance

# 40 tokens, prefilled PREFILL_STEP at a time by the runner (three chunks,
# the last one partial) against one pass here.
PROMPT = [1, 17, 42, 99, 7, 300, 5, 250] + [(i * 37 + 11) % 500 for i in range(32)]
PREFILL_STEP = 16
STEPS = 16


def reference(model_dir: Path) -> dict:
    """What one process computes: last-position logits, 16 greedy tokens and
    the log-probability of each."""
    model, _ = load_model(Path(model_dir))
    logits = model(mx.array([PROMPT]))[0, -1].astype(mx.float32)
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT[:-1]]), cache=cache)
    token = mx.array([PROMPT[-1:]])
    tokens, logprobs = [], []
    for _ in range(STEPS):
        step = model(token, cache=cache)[:, -1, :]
        # Greedy as mlx-lm's generate_step (and so the runner) picks: the
        # argmax of the log-probabilities, computed in the logits' dtype. In
        # bf16 their rounding can break a near-tie the raw logits would not.
        lp = step - mx.logsumexp(step, axis=-1, keepdims=True)
        token = mx.argmax(lp, axis=-1)[None]
        tokens.append(int(token.item()))
        logprobs.append(float(lp[0, tokens[-1]].astype(mx.float32).item()))
    return {"logits": np.array(logits.tolist()), "tokens": tokens, "logprobs": np.array(logprobs)}


def greedy_request(request_id="check") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, prompt_tokens=PROMPT, return_prompt_logits=True,
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=True),
    )


def sharded(model_dir: Path, strategy: str, world: int, **kwargs) -> dict:
    kwargs.setdefault("prefill_step_tokens", PREFILL_STEP)
    with LocalInstance(model_dir, strategy, world, context_length=512, **kwargs) as instance:
        instance.wait_ready(180)
        chunks = instance.generate(greedy_request(), timeout=120)
        ready = [r.status for r in instance.ranks]
        assert instance.shutdown(15)
    final = chunks[-1]
    assert final.finish_reason == pb.FINISH_LENGTH, final
    return {
        "logits": np.array(final.prompt_logits),
        "tokens": [t.token for c in chunks for t in c.tokens if c is not final or t.token],
        "logprobs": np.array([t.logprob for c in chunks for t in c.tokens if c is not final or t.token]),
        "ready": ready,
    }
