"""RunnerReady is earned. Before a rank reports Ready it shows that the model
as cut computes what the uncut model computes, against references read from
the checkpoint itself (a lazy, uncut copy: only the tensors a check touches
are ever read):

1. Its embedding and its lm_head give the uncut outputs on a probe: a shard
   that every rank gets wrong in the same way agrees with itself, not with
   the checkpoint.
2. Layers: one held layer of every kind the model has (kind = the layer's
   module classes and its cache's class and window, so dense and MoE, full
   and sliding attention, V4's compressors each count), plus a sample of
   further held layers drawn from the instance id, so that over restarts
   every layer gets checked. Each is computed as cut and again from the
   uncut copy of that layer down the cached path, where the architecture
   says how to run one layer with a cache: a prefill in chunks of CHUNK
   tokens that crosses a chunk boundary (its first chunk, on an empty cache,
   is the layer in one pass), then DECODE_STEPS one-token steps, each
   compared; otherwise on a probe in one pass.
   Pipeline stages hold whole layers, so the same check proves them unchanged;
   what such a strategy can also get wrong is the order of the stages, so
   their layer ranges must tile the model in the order activations travel.
3. The whole model, as cut, decodes what it computes in one pass: after a
   prefill, one-token steps with the KV cache give the logits of a single
   pass over the same tokens. A wrong KV slice, a cache shared or swapped
   between layers, or a broken one-token attention path all break that,
   whichever layers the sample picked. The one-pass logits must then be
   finite and equal on every rank.

Checks 1 and 2 run on float32 probes whatever the weights, so that a bf16 or
4-bit layer computes in float32 on both sides and a broken cut stands far
above the limit (see FP32_TOLERANCE). On CPU a pass costs in proportion to
its tokens, so every probe is as short as what it must show allows.

A single rank cuts nothing, so it only checks that its logits are finite.

Every rank shares its verdict with every other, so all fail together."""

import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from .loading import held_layer_indices
from .shard_loading import load_model  # a whole checkpoint or a shard (its canary layer is whole)

PROBE_SEED = 20261126
# Chunked prefill in the canary: CHUNK tokens at a time over PREFILL_TOKENS,
# so the prefill crosses a chunk boundary and its second chunk is several
# tokens on a non-empty cache (the serving chunk is far larger; a small one
# here runs the same code path at a cost of a few tokens), then DECODE_STEPS
# one-token steps, the path decoding takes (DeepSeek-V3's MLA has a separate
# L == 1 branch). The first chunk, on an empty cache, is the layer in one
# pass. On CPU a check's time grows with its tokens (MLX's matmul re-reads
# the weights per token), so the probes are no longer than this.
CHUNK = 2
PREFILL_TOKENS = 4
DECODE_STEPS = 2
PROBE_TOKENS = PREFILL_TOKENS + DECODE_STEPS
# Layers beyond one of each kind, drawn from the instance id: with L held
# layers every one is checked within about L / SAMPLED_LAYERS restarts.
SAMPLED_LAYERS = 2
# |sharded - uncut| allowed, relative to max(1, max |uncut|). Summation order
# is the only difference between the two when the cut is right: over N ranks
# a cut matmul's output is N partial sums each rounded, then N-1 rounded
# additions, against the uncut side's one rounding, so at most (N+1)·u of
# its scale (u the unit roundoff), and a layer adds two such outputs to its
# residual: 2·(N+1)·u. The probes are float32, and a layer computes in its
# input's dtype, so a bf16 or quantized layer runs in float32 on both sides
# (MLX widens its half-precision weights, or a 4-bit weight's scales and
# biases, for the matmul): u = 2^-24 whatever the checkpoint, 2·(N+1)·u =
# 3.6e-7 on 2 ranks, and the limit is 1e-4 for every dtype. Measured on 2
# ranks: correct cuts <= 2.3e-7, broken ones >= 0.036 (360x the limit, v4-mini's
# experts without their sum), fp32 and 4-bit/bf16 alike. With bf16 probes a missing sum was only 1.8-7x its
# bf16 bound, since the output carries the residual rounded at its scale.
# The widening costs memory beyond the uncut layer; the planner counts it
# (placement/planner.py, canary_bytes). Figures in docs/proofs.md.
FP32_TOLERANCE = 1e-4
# The cached decode against one pass of the same cut model: here the two
# sides take different paths through the uncut model's own code as well
# (DeepSeek-V3's MLA has a separate one-token branch), and in half precision
# those round differently through every layer to the logits: measured up to
# 0.040 relative on deepseek_v3 with 4-bit weights and bf16 activations, cut
# or not, against 0.29-0.47 for a wrong KV slice or a shared cache. The
# layer checks, which compare the same path on both sides, keep the tight
# limit. See docs/proofs.md.
DECODE_TOLERANCE = {mx.float32: 1e-4, mx.float16: 0.1, mx.bfloat16: 0.1}
AGREEMENT_TOLERANCE = 1e-5

# What a shared verdict names (see _share).
LAYER, LAYER_DECODE, EMBEDDING, LM_HEAD, DECODE, LAYER_PREFILL = range(6)


class CanaryFailed(Exception):
    pass


@dataclass
class Verdict:
    layer: int
    max_delta: float
    layers: tuple = ()
    seconds: float = 0.0


def activation_dtype(model) -> mx.Dtype:
    embed = model.model.embed_tokens
    return embed.scales.dtype if hasattr(embed, "scales") else embed.weight.dtype


def _has_experts(layer, arch, config, index) -> bool:
    return any(arch.moe_tensor_split(f"model.layers.{index}.{path}", config) for path, _ in layer.named_modules())


def _cache_kind(cache) -> tuple:
    return type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None)


def layer_kind(layer, cache) -> tuple:
    """What makes two layers the same kind to a check: the classes of every
    module in them (dense MLP or experts, each attention class) and the
    class and window of the cache they keep."""
    return tuple(sorted({type(m).__name__ for _, m in layer.named_modules()})), _cache_kind(cache)


def _partial_in_shard(model_dir: Path) -> set:
    """Layers (-1: outside any layer) with a tensor a shard holds only in
    part or not at all; empty for a whole checkpoint."""
    from exod.models.architectures import layer_of
    from exod.models.shards import read_manifest

    manifest = read_manifest(model_dir)
    if not manifest:
        return set()
    return {layer_of(name) for name in [*manifest.get("tensors", {}), *manifest.get("absent", {})]}


def choose_layers(model, config, arch, instance_id: str) -> list[int]:
    """One held, probeable layer of every kind (the first MoE layer first),
    then SAMPLED_LAYERS more drawn from the instance id."""
    held = held_layer_indices(model)
    probeable = [i for i in held if i in set(arch.canary_layers(config))] or held
    caches = _layer_caches(model)
    chosen, kinds = [], set()
    with_experts = [i for i in probeable if _has_experts(_held_layer(model, held, i), arch, config, i)]
    for i in with_experts[:1] + probeable:
        kind = layer_kind(_held_layer(model, held, i), _cache_for(caches, held, i))
        if kind not in kinds:
            kinds.add(kind)
            chosen.append(i)
    rest = [i for i in probeable if i not in chosen]
    rng = random.Random(zlib.crc32(instance_id.encode()))
    chosen += sorted(rng.sample(rest, min(SAMPLED_LAYERS, len(rest))))
    return chosen


def _held_layer(model, held, index):
    """The layer itself: exod's pipeline stage keeps the whole list, each
    held layer wrapped in its stage's sends and receives, which a check
    must not run; otherwise the list holds only this rank's layers."""
    if getattr(model, "exod_stage", None) is not None:
        slot = model.layers[index]
        return slot["layer"] if "layer" in slot else slot
    return model.layers[held.index(index)]


def _layer_caches(model):
    try:
        return make_prompt_cache(model)
    except Exception:  # a stage with no cache of its own to make
        return []


def _cache_for(caches, held, index):
    if len(caches) > index:
        return caches[index]
    position = held.index(index)
    return caches[position] if len(caches) > position else None


def _share(group, row: list[float], rank: int, size: int) -> list[list[float]]:
    """Every rank's row, on every rank."""
    if group is None:
        return [row]
    local = mx.zeros((size, len(row)), dtype=mx.float32)
    local[rank] = mx.array(row, dtype=mx.float32)
    return mx.distributed.all_sum(local, group=group).tolist()


def _shared_max(group, value: float, rank: int, size: int) -> list[float]:
    return [r[0] for r in _share(group, [value], rank, size)]


def _delta(cut, uncut) -> mx.array:
    """max |cut - uncut| relative to max(1, max |uncut|), capped to what a
    float32 all-sum carries, and at the cap when cut is not finite."""
    cut, uncut = cut.astype(mx.float32), uncut.astype(mx.float32)
    delta = mx.abs(cut - uncut).max() / mx.maximum(1.0, mx.abs(uncut).max())
    return mx.where(mx.isfinite(cut).all(), mx.minimum(delta, 3e38), 3e38)


def run(model, config, arch, model_dir: str, group, whole_layers: bool = False, instance_id: str = "",
        stages: tuple = ()) -> Verdict:
    """stages: a hybrid's ranks per stage (their layer ranges must tile the
    model, as pipeline ranks' do)."""
    started = time.perf_counter()
    rank = group.rank() if group else 0
    size = group.size() if group else 1
    if group is None:
        # One rank is never a sharding: the model is mlx-lm's own, whole, and
        # comparing it with itself would prove nothing.
        verdict = Verdict(held_layer_indices(model)[0], 0.0)
        _check_decode(model, config, group, rank, size, checks=[])  # finite logits
        verdict.seconds = time.perf_counter() - started
        return verdict
    if whole_layers or stages:
        _check_tiling(model, config, group, rank, size, tuple(stages) or (1,) * size)
    dtype = activation_dtype(model)
    checks: list = []  # (what, layer, delta)
    layers = _check_against_checkpoint(model, config, arch, model_dir, instance_id, checks)
    # The checkpoint's checks first: they name the part that is wrong. They
    # compute in float32 whatever the weights, so fp32's limit applies.
    worst = _judge(checks, "float32 probes", FP32_TOLERANCE, group, rank, size)
    decode: list = []
    # Each pass costs its tokens (on CPU, MLX's matmul re-reads the weights
    # per token), so the whole model prefills one chunk where the layer checks
    # crossed a chunk boundary down every kind's cached path: its steps still
    # read every layer's cache, which is what it is here for. (Decided from
    # the architecture alone: every rank must run the same passes.)
    prefill = CHUNK if arch.step is not None else PREFILL_TOKENS
    _check_decode(model, config, group, rank, size, decode, prefill=prefill)
    name = str(dtype).split(".")[-1]
    worst = max(worst, _judge(decode, name, DECODE_TOLERANCE.get(dtype, 0.1), group, rank, size))
    return Verdict(layers[0], worst, tuple(layers), time.perf_counter() - started)


def _judge(checks, computed_in: str, limit: float, group, rank: int, size: int) -> float:
    """Each rank's worst check, shared; the first rank over the limit fails
    every rank with what and where."""
    what, layer, delta = max(checks, key=lambda c: c[2])
    rows = _share(group, [delta, float(what), float(layer)], rank, size)
    for r, (d, w, k) in enumerate(rows):
        if not d <= limit:
            subject = {LAYER: f"layer {int(k)}", LAYER_DECODE: f"layer {int(k)} (cached decode)",
                       LAYER_PREFILL: f"layer {int(k)} (cached prefill)",
                       EMBEDDING: "the embedding", LM_HEAD: "the lm_head",
                       DECODE: "the cached decode (against one pass)"}[int(w)]
            raise CanaryFailed(f"canary: {subject} differs on rank {r}, max |Δ| = {d:.3g} "
                               f"(relative; the limit for {computed_in} is {limit:g})")
    return max(r[0] for r in rows)


def _check_tiling(model, config, group, rank: int, size: int, stages: tuple) -> None:
    """Stages pass activations from the last rank down to rank 0 (mlx-lm's
    order), so the last stage must start at layer 0, each stage must start
    where the next one ends, and stage 0 must end at the last layer; every
    rank of a stage holds the stage's range."""
    held = held_layer_indices(model)
    starts = _shared_max(group, float(held[0]), rank, size)
    ends = _shared_max(group, float(held[-1] + 1), rank, size)
    total = int(config["num_hidden_layers"])
    expected_end, lo = total, 0
    for count in stages:
        ranks = range(lo, lo + count)
        for r in ranks:
            start, end = int(starts[r]), int(ends[r])
            if end != expected_end or start >= end or start != int(starts[lo]):
                raise CanaryFailed(f"canary: rank {r} holds layers {start}..{end - 1}, but the stages must "
                                   f"end at layer {expected_end - 1} there"
                                   + (f", and every rank of a stage start where its first (rank {lo}) does"
                                      if count > 1 else ""))
        expected_end, lo = int(starts[lo]), lo + count
    if expected_end != 0:
        raise CanaryFailed(f"canary: the stages leave layers 0..{expected_end - 1} out")


def _lm_head(model):
    head = getattr(model, "lm_head", None)
    return head if head is not None else model.model.embed_tokens.as_linear


def _check_against_checkpoint(model, config, arch, model_dir: str, instance_id: str, checks: list) -> list[int]:
    held = held_layer_indices(model)
    hidden = int(config["hidden_size"])
    reference, _ = load_model(Path(model_dir), lazy=True)
    # A shard checkpoint (models/shards.py) holds some tensors only in part:
    # the uncut reference exists only for what it holds whole (it always
    # holds one whole layer for this). Compare only against that.
    partial = _partial_in_shard(Path(model_dir))

    tokens = _probe_tokens(config, PROBE_TOKENS)
    if -1 not in partial:
        # Rows gathered, not computed: the same values on both sides when right.
        checks.append((EMBEDDING, -1, _measured(lambda: model.model.embed_tokens(tokens),
                                                lambda: reference.model.embed_tokens(tokens))))
        h = mx.random.normal((1, 2, hidden), key=mx.random.key(PROBE_SEED + 1))  # float32: see the top
        checks.append((LM_HEAD, -1, _measured(lambda: _lm_head(model)(h), lambda: _lm_head(reference)(h))))
        _release(reference.model.embed_tokens)
        _release(getattr(reference, "lm_head", None))

    probe = mx.random.normal((1, PROBE_TOKENS, hidden), key=mx.random.key(PROBE_SEED))  # float32: see the top
    chosen = [i for i in choose_layers(model, config, arch, instance_id) if i not in partial]
    own_caches, reference_caches = _layer_caches(model), make_prompt_cache(reference)
    for index in chosen:
        layer, uncut_layer = _held_layer(model, held, index), reference.layers[index]
        if arch.step is None:
            checks.append((LAYER, index, _measured(lambda: arch.probe(layer, probe, config),
                                                   lambda: arch.probe(uncut_layer, probe, config))))
        else:
            # The chunked prefill's first chunk is the layer in one pass.
            _check_steps(arch, config, layer, uncut_layer, probe, _cache_for(own_caches, held, index),
                         reference_caches[index], index, checks)
        # One uncut layer in memory at a time: the planner counts one (the
        # widest) as the canary's share of a rank's peak.
        _release(uncut_layer)
        reference_caches[index] = None
    del reference, reference_caches, own_caches
    mx.clear_cache()
    return chosen


def _check_steps(arch, config, layer, uncut_layer, probe, cut_cache, uncut_cache, index: int, checks: list) -> None:
    """The layer down the cached path, cut and uncut, each step compared.
    Each layer keeps its own cache in both lists, so no two checks share state."""
    for start, end in _steps():
        x = probe[:, start:end]
        what = LAYER_PREFILL if start < PREFILL_TOKENS else LAYER_DECODE
        checks.append((what, index, _measured(lambda: arch.step(layer, x, config, cut_cache),
                                              lambda: arch.step(uncut_layer, x, config, uncut_cache))))


def _measured(cut, uncut) -> float:
    """The delta of one check. Each side is evaluated alone: a half-precision
    or quantized weight is widened to float32 only while its own matmul runs
    (the planner counts that), and no uncut weight is held once it returns."""
    a = cut()
    mx.eval(a)
    b = uncut()
    mx.eval(b)
    return _delta(a, b).item()


def _release(module) -> None:
    """Free a reference part's weights. Emptying the parameters works
    whatever holds the module (a model's `layers` may be a fresh list)."""
    if module is not None:
        module.update(tree_map(lambda _: mx.zeros((0,)), module.parameters()))
    mx.clear_cache()


def _steps(prefill: int = PREFILL_TOKENS) -> list[tuple[int, int]]:
    """The prefill in CHUNK-token chunks (crossing a chunk boundary when
    prefill > CHUNK), then DECODE_STEPS one-token steps."""
    spans = [(s, min(s + CHUNK, prefill)) for s in range(0, prefill, CHUNK)]
    return spans + [(t, t + 1) for t in range(prefill, prefill + DECODE_STEPS)]


def _probe_tokens(config, n: int) -> mx.array:
    """n tokens spread over the whole vocabulary, first and last included,
    so that a wrong range of embedding rows shows whichever range it is."""
    vocab = int(config["vocab_size"])
    return mx.array([[(i * (vocab - 1)) // (n - 1) for i in range(n)]])


def _unique(cache: list) -> list:
    """Each cache once: a pipeline stage's skipped layers alias held ones."""
    return list({id(c): c for c in cache}.values())


def _can_trim(cache: list) -> bool:
    return all(hasattr(c, "is_trimmable") and c.is_trimmable() for c in _unique(cache))


def _trim(cache: list, tokens: int) -> None:
    for c in _unique(cache):
        c.trim(tokens)


def _check_decode(model, config, group, rank: int, size: int, checks: list, prefill: int = PREFILL_TOKENS) -> None:
    """The model as cut, cached and chunked, against itself in one pass; then
    the one-pass logits finite and equal on every rank."""
    n = prefill + DECODE_STEPS
    tokens = _probe_tokens(config, n)
    cache = make_prompt_cache(model)
    spans = _steps(prefill)
    # The first chunk, on an empty cache, computes what the one pass computes
    # for its tokens: where every rank's caches can be cut back, the one pass
    # writes them and is trimmed to that chunk, which saves its tokens.
    trim = min(_shared_max(group, float(_can_trim(cache)), rank, size)) == 1.0
    whole = model(tokens, cache=cache if trim else None)[0].astype(mx.float32)
    # A pipeline stage sends and receives inside the forward: each pass is
    # evaluated before the next starts, in the same order on every rank.
    mx.eval(whole)
    if trim:
        _trim(cache, n - spans[0][1])
        spans = spans[1:]
    for start, end in spans:  # the decode deltas are judged by the caller, after the agreement
        logits = model(tokens[:, start:end], cache=cache)[0, -1].astype(mx.float32)
        mx.eval(logits, [c.state for c in cache])
        checks.append((DECODE, -1, _delta(logits, whole[end - 1]).item()))
    logits = whole[-1]
    mean = mx.distributed.all_sum(logits, group=group) / size if group is not None else logits
    mx.eval(mean)
    finite = bool(mx.isfinite(logits).all().item())
    disagreement = mx.abs(logits - mean).max().item() / max(1.0, mx.abs(mean).max().item()) if finite else 3e38
    spreads = _shared_max(group, disagreement, rank, size)
    for r, d in enumerate(spreads):
        if d >= 3e38:
            raise CanaryFailed(f"canary: rank {r} produced non-finite logits")
        if d > AGREEMENT_TOLERANCE:
            raise CanaryFailed(f"canary: ranks disagree on the logits, rank {r} is off by {d:.3g}")
