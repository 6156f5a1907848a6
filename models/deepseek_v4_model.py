"""exod's own MLX model class for DeepSeek-V4 (config model_type `deepseek_v4`).

mlx-lm 0.32.2 has no `deepseek_v4` module. exod installs this file as
`mlx_lm.models.deepseek_v4` only when the installed mlx-lm has none
(models/__init__.py), so mlx-lm's loader, converter and generator find it;
a release that brings its own class takes precedence.

Written for exod from DeepSeek's published config.json and the published
description of the architecture (the release's inference/model.py), not
copied from any implementation. Tensor names and shapes are those of the MLX
checkpoint the catalog card describes (models/catalog/deepseek-v4-flash.json).
Choices the published material leaves open are listed in docs/architecture.md
("DeepSeek-V4 model class: assumptions").

The architecture, per layer:

- Hyper-connections: the residual stream is `hc_mult` copies of the hidden
  state. Before each half (attention, MoE) a learned mix reads the streams
  into one input (weights `pre`), and after it the output is written back
  into every stream (`post`) while the streams themselves are mixed by a
  doubly stochastic matrix (`comb`, Sinkhorn-normalized).
- Attention: low-rank queries (wq_a, q_norm, wq_b, then an unweighted RMS
  normalization per head), one shared key=value head of head_dim (wkv,
  kv_norm), rotary embedding on its last qk_rope_head_dim channels (pairs
  interleaved). Each query sees the raw keys of the last `sliding_window`
  positions and, on layers with compress ratio r > 0, compressed keys: one
  per r positions, a softmax-weighted pool (per channel, over the r
  positions) of a projection of the input. Ratio 4 pools overlap (each pool
  also reads the previous window through a second half of the projection),
  and a lightning indexer picks, per query, the index_topk compressed keys
  to attend to. A learned sink per head sits in the softmax denominator.
  The output's rotary channels are rotated back, then the heads go through
  a grouped low-rank projection: each of o_groups groups of heads has its
  own block of wo_a, and wo_b maps all groups back to the hidden size.
- MoE: every layer. Scores sqrt(softplus(router logits)); the first
  num_hash_layers layers pick experts from a token-id table (tid2eid), the
  others by top-k of score + correction bias (noaux_tc). Weights are the
  chosen scores, normalized, times routed_scaling_factor. Experts and the
  shared expert are SwiGLU with the activations clamped at swiglu_limit.
- Rotary: YaRN-scaled frequencies from compress_rope_theta on layers with
  compressed history, plain frequencies from rope_theta on the others.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import _BaseCache
from mlx_lm.models.switch_layers import SwitchGLU


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    sliding_window: int = 128
    compress_ratios: list = field(default_factory=list)
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def ratio(self, layer: int) -> int:
        ratios = list(self.compress_ratios or [])[: self.num_hidden_layers]
        return int(ratios[layer]) if layer < len(ratios) else 0


# ------------------------------------------------------------------ rotary


def rope_frequencies(dim: int, base: float, scaling: Optional[dict]) -> mx.array:
    """Inverse frequencies of `dim` rotary channels. With YaRN scaling, the
    slow channels (wavelengths longer than the original context allows) are
    divided by `factor`, the fast ones kept, and a linear ramp between the
    correction dimensions of beta_fast and beta_slow blends the two."""
    exponents = mx.arange(0, dim, 2, dtype=mx.float32) / dim
    freqs = 1.0 / (base ** exponents)
    if not scaling:
        return freqs
    original = float(scaling.get("original_max_position_embeddings") or 0)
    if original <= 0:
        return freqs
    factor = float(scaling.get("factor", 1.0))
    beta_fast = float(scaling.get("beta_fast", 32))
    beta_slow = float(scaling.get("beta_slow", 1))

    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction(beta_fast)), 0)
    high = min(math.ceil(correction(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 on the fast channels
    return freqs / factor * (1.0 - keep) + freqs * keep


def rotate(x: mx.array, positions: mx.array, freqs: mx.array, inverse: bool = False) -> mx.array:
    """Rotate the last 2*len(freqs) channels of x, pairs (0,1), (2,3), ...
    x: (B, T, ..., C); positions: (T,) absolute positions."""
    rd = 2 * freqs.shape[0]
    keep, rot = x[..., : x.shape[-1] - rd], x[..., x.shape[-1] - rd:]
    angles = positions.astype(mx.float32)[:, None] * freqs[None, :]  # (T, rd/2)
    angles = angles.reshape(angles.shape[0], *([1] * (x.ndim - 3)), angles.shape[1])
    cos, sin = mx.cos(angles), mx.sin(angles)
    if inverse:
        sin = -sin
    pairs = rot.astype(mx.float32).reshape(*rot.shape[:-1], rd // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape).astype(x.dtype)
    return mx.concatenate([keep, out], axis=-1) if keep.shape[-1] else out


def rms(x: mx.array, eps: float) -> mx.array:
    """Unweighted RMS normalization over the last axis."""
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


# ------------------------------------------------------------------ cache


class LayerCache(_BaseCache):
    """One layer's history: the raw keys of the last `window` positions,
    the compressed keys so far, the indexer's compressed keys, and each
    compressor's open state (the positions since the last pool, and for
    overlapping pools the last full window). Not batchable (no merge):
    exod's engine serves such a model one sequence at a time."""

    def __init__(self, window: int):
        self.window = window
        self.offset = 0
        self.keys = None  # (B, <=window, head_dim)
        self.compressed = None  # (B, N, head_dim)
        self.index_keys = None  # (B, N, index_head_dim)
        self.pools = {}  # name -> CompressorState

    @property
    def state(self):
        arrays = [a for a in (self.keys, self.compressed, self.index_keys) if a is not None]
        for pool in self.pools.values():
            arrays.extend(pool.arrays())
        return arrays

    @state.setter
    def state(self, value):
        raise NotImplementedError("a DeepSeek-V4 layer cache is not restored from arrays")

    def is_trimmable(self):
        return False

    def trim(self, n):
        return 0

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state)

    def parts_nbytes(self) -> dict:
        """Bytes by kind, as the planner's formula names them."""
        return {
            "window": self.keys.nbytes if self.keys is not None else 0,
            "compressed": self.compressed.nbytes if self.compressed is not None else 0,
            "index keys": self.index_keys.nbytes if self.index_keys is not None else 0,
            "open pools": sum(sum(a.nbytes for a in p.arrays()) for p in self.pools.values()),
        }


class CompressorState:
    def __init__(self):
        self.kv = None  # positions since the last pool: (B, P, width)
        self.score = None
        self.last_kv = None  # the last full window (overlapping pools only): (B, r, width)
        self.last_score = None

    def arrays(self):
        return [a for a in (self.kv, self.score, self.last_kv, self.last_score) if a is not None]


# ------------------------------------------------------------------ modules


class HyperConnection(nn.Module):
    """The mixing around one half of a block. fn maps the flattened streams
    to 2*hc + hc*hc mixes: the read weights, the write weights and the
    stream-mixing matrix."""

    def __init__(self, hc: int, hidden: int, iters: int, eps: float, norm_eps: float):
        super().__init__()
        # Random at construction so that a generated model mixes; a checkpoint replaces them.
        self.fn = mx.random.normal(((2 + hc) * hc, hc * hidden)) * 0.05
        self.base = mx.random.normal(((2 + hc) * hc,)) * 0.5
        self.scale = mx.ones((3,), dtype=mx.float32)
        self._hc, self._iters, self._eps, self._norm_eps = hc, iters, eps, norm_eps

    def read(self, streams: mx.array):
        """streams (B, T, hc, D) -> (input (B, T, D), post (B, T, hc), comb (B, T, hc, hc))."""
        hc, eps = self._hc, self._eps
        flat = streams.reshape(*streams.shape[:2], -1).astype(mx.float32)
        inv = mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + self._norm_eps)
        mixes = (flat @ self.fn.T) * inv
        pre = mx.sigmoid(mixes[..., :hc] * self.scale[0] + self.base[:hc]) + eps
        post = 2 * mx.sigmoid(mixes[..., hc:2 * hc] * self.scale[1] + self.base[hc:2 * hc])
        comb = (mixes[..., 2 * hc:] * self.scale[2] + self.base[2 * hc:]).reshape(*mixes.shape[:2], hc, hc)
        comb = mx.softmax(comb, axis=-1) + eps
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        for _ in range(self._iters - 1):
            comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        x = (pre[..., None] * streams.astype(mx.float32)).sum(axis=-2)
        return x.astype(streams.dtype), post, comb

    @staticmethod
    def write(out: mx.array, residual: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """Stream k becomes post[k] * out + sum_j comb[j, k] * residual[j]."""
        mixed = mx.einsum("btjk,btjd->btkd", comb, residual.astype(mx.float32))
        return (post[..., None] * out.astype(mx.float32)[:, :, None, :] + mixed).astype(residual.dtype)


class HyperHead(nn.Module):
    """Reads the streams into one hidden state before the final norm."""

    def __init__(self, hc: int, hidden: int, eps: float, norm_eps: float):
        super().__init__()
        self.fn = mx.random.normal((hc, hc * hidden)) * 0.05
        self.base = mx.random.normal((hc,)) * 0.5
        self.scale = mx.ones((1,), dtype=mx.float32)
        self._eps, self._norm_eps = eps, norm_eps

    def __call__(self, streams: mx.array) -> mx.array:
        flat = streams.reshape(*streams.shape[:2], -1).astype(mx.float32)
        inv = mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + self._norm_eps)
        pre = mx.sigmoid((flat @ self.fn.T) * inv * self.scale[0] + self.base) + self._eps
        return (pre[..., None] * streams.astype(mx.float32)).sum(axis=-2).astype(streams.dtype)


class Compressor(nn.Module):
    """One pooled key per `ratio` positions. With overlap, the projections
    are twice as wide: the first half of a window's channels feeds the next
    window's pool, the second half its own."""

    def __init__(self, hidden: int, dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio, self.dim = ratio, dim
        self.overlap = ratio == 4
        width = dim * (2 if self.overlap else 1)
        self.wkv = nn.Linear(hidden, width, bias=False)
        self.wgate = nn.Linear(hidden, width, bias=False)
        self.ape = mx.random.normal((ratio, width)) * 0.5
        self.norm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x: mx.array, start: int, state: CompressorState, freqs: mx.array):
        """x (B, T, hidden) at positions start.. -> new pooled keys (B, n, dim) or None."""
        r, d = self.ratio, self.dim
        kv = self.wkv(x)
        phase = mx.arange(start, start + x.shape[1]) % r
        score = self.wgate(x).astype(mx.float32) + self.ape.astype(mx.float32)[phase]
        if state.kv is not None:
            kv = mx.concatenate([state.kv, kv], axis=1)
            score = mx.concatenate([state.score, score], axis=1)
        first = start - (0 if state.kv is None else state.kv.shape[1])  # a multiple of r
        full = kv.shape[1] // r
        done = full * r
        state.kv = kv[:, done:] if kv.shape[1] > done else None
        state.score = score[:, done:] if kv.shape[1] > done else None
        if full == 0:
            return None
        B = kv.shape[0]
        kv = kv[:, :done].reshape(B, full, r, -1)
        score = score[:, :done].reshape(B, full, r, -1)
        if self.overlap:
            if state.last_kv is None:
                prev_kv = mx.zeros((B, 1, r, 2 * d), dtype=kv.dtype)
                prev_score = mx.full((B, 1, r, 2 * d), -mx.inf, dtype=mx.float32)
            else:
                prev_kv, prev_score = state.last_kv[:, None], state.last_score[:, None]
            before_kv = mx.concatenate([prev_kv, kv[:, :-1]], axis=1)
            before_score = mx.concatenate([prev_score, score[:, :-1]], axis=1)
            state.last_kv, state.last_score = kv[:, -1], score[:, -1]
            kv = mx.concatenate([before_kv[..., :d], kv[..., d:]], axis=2)
            score = mx.concatenate([before_score[..., :d], score[..., d:]], axis=2)
        weights = mx.softmax(score, axis=2)
        pooled = (kv.astype(mx.float32) * weights).sum(axis=2).astype(x.dtype)
        pooled = self.norm(pooled)
        positions = first + r * mx.arange(full)  # each pool stamped with its window's first position
        return rotate(pooled, positions, freqs)


class Indexer(nn.Module):
    """Scores the compressed history for each query: per index head, the
    ReLU of the query-key product, weighted by a per-token head weight."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads, self.dim = args.index_n_heads, args.index_head_dim
        self.wq_b = nn.Linear(args.q_lora_rank, self.heads * self.dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.heads, bias=False)
        self.compressor = Compressor(args.hidden_size, self.dim, 4, args.rms_norm_eps)

    def scores(self, x, q_latent, positions, keys, freqs):
        B, T, _ = x.shape
        q = self.wq_b(q_latent).reshape(B, T, self.heads, self.dim)
        q = rotate(q, positions, freqs)
        w = self.weights_proj(x).astype(mx.float32) * (self.dim ** -0.5 * self.heads ** -0.5)
        s = mx.einsum("bthd,bnd->bthn", q.astype(mx.float32), keys.astype(mx.float32))
        return (mx.maximum(s, 0) * w[..., None]).sum(axis=2)  # (B, T, N)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_groups = args.o_groups
        self.head_dim = args.head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.window = args.sliding_window
        self.ratio = args.ratio(layer)
        self.index_topk = args.index_topk
        self.eps = args.rms_norm_eps
        self.wq_a = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        group_width = self.n_heads * self.head_dim // self.n_groups
        self.wo_a = nn.Linear(group_width, self.n_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(self.n_groups * args.o_lora_rank, args.hidden_size, bias=False)
        self.attn_sink = mx.random.normal((self.n_heads,))
        if self.ratio:
            self.compressor = Compressor(args.hidden_size, self.head_dim, self.ratio, args.rms_norm_eps)
            if self.ratio == 4:
                self.indexer = Indexer(args)
            self._freqs = rope_frequencies(self.rope_dim, args.compress_rope_theta, args.rope_scaling)
        else:
            self._freqs = rope_frequencies(self.rope_dim, args.rope_theta, None)
        self._group = None  # set by Model.shard()

    def _grouped_output(self, o: mx.array) -> mx.array:
        """o (B, T, groups, group_width) -> (B, T, groups * o_lora_rank):
        each group through its own rows of wo_a."""
        B, T, g, _ = o.shape
        proj = self.wo_a
        if isinstance(proj, nn.QuantizedLinear):
            w = proj.weight.reshape(g, -1, proj.weight.shape[-1])
            scales = proj.scales.reshape(g, -1, proj.scales.shape[-1])
            biases = proj.get("biases")
            if biases is not None:
                biases = biases.reshape(g, -1, biases.shape[-1])
            out = mx.gather_qmm(o[..., None, :], w, scales, biases,
                                rhs_indices=mx.broadcast_to(mx.arange(g), (B, T, g)), transpose=True,
                                group_size=proj.group_size, bits=proj.bits, mode=proj.mode)
        else:
            w = proj.weight.reshape(g, -1, proj.weight.shape[-1])
            out = o[..., None, :] @ mx.swapaxes(w, -1, -2)
        return out.reshape(B, T, -1)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, T, _ = x.shape
        start = cache.offset
        positions = mx.arange(start, start + T)
        heads = self.attn_sink.shape[0]  # this rank's heads (all of them unless shard() cut them)
        q_latent = self.q_norm(self.wq_a(x))
        q = rms(self.wq_b(q_latent).reshape(B, T, heads, self.head_dim), self.eps)
        q = rotate(q, positions, self._freqs)
        kv = rotate(self.kv_norm(self.wkv(x)), positions, self._freqs)

        # Raw window: the cached last `window` keys and these.
        keys = kv if cache.keys is None else mx.concatenate([cache.keys, kv], axis=1)
        key_pos = mx.arange(start + T - keys.shape[1], start + T)
        cache.keys = keys[:, -self.window:]
        visible = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - self.window)
        masks = [mx.broadcast_to(visible, (B, T, keys.shape[1]))]
        parts = [keys]

        if self.ratio:
            pools = cache.pools
            new = self.compressor(x, start, pools.setdefault("kv", CompressorState()), self._freqs)
            if new is not None:
                cache.compressed = new if cache.compressed is None else mx.concatenate([cache.compressed, new], 1)
            if "indexer" in self:
                new_idx = self.indexer.compressor(x, start, pools.setdefault("index", CompressorState()), self._freqs)
                if new_idx is not None:
                    cache.index_keys = new_idx if cache.index_keys is None else \
                        mx.concatenate([cache.index_keys, new_idx], 1)
            if cache.compressed is not None:
                n = cache.compressed.shape[1]
                ends = (mx.arange(n) + 1) * self.ratio - 1  # last position each pool covers
                complete = mx.broadcast_to(ends[None, :] <= positions[:, None], (B, T, n))
                if "indexer" in self and n > self.index_topk:
                    s = self.indexer.scores(x, q_latent, positions, cache.index_keys, self._freqs)
                    s = mx.where(complete, s, -mx.inf)
                    top = mx.argpartition(-s, kth=self.index_topk - 1, axis=-1)[..., : self.index_topk]
                    chosen = mx.put_along_axis(mx.zeros(s.shape, dtype=mx.bool_), top,
                                               mx.array(True), axis=-1)
                    complete = complete & chosen
                masks.append(complete)
                parts.append(cache.compressed)
        cache.offset = start + T

        keys = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        mask = mx.concatenate(masks, axis=-1) if len(masks) > 1 else masks[0]
        scores = mx.einsum("bthd,bnd->bhtn", q.astype(mx.float32), keys.astype(mx.float32)) * self.head_dim ** -0.5
        scores = mx.where(mask[:, None], scores, -mx.inf)
        sink = mx.broadcast_to(self.attn_sink.astype(mx.float32)[None, :, None, None], (*scores.shape[:3], 1))
        probs = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
        o = mx.einsum("bhtn,bnd->bthd", probs, keys.astype(mx.float32)).astype(x.dtype)
        o = rotate(o, positions, self._freqs, inverse=True)
        groups = heads * self.n_groups // self.n_heads
        out = self.wo_b(self._grouped_output(o.reshape(B, T, groups, -1)))
        if self._group is not None:
            out = mx.distributed.all_sum(out, group=self._group)
        return out


class ClampedSwiGLU(nn.Module):
    """silu(min(gate, limit)) * clip(up, -limit, limit)."""

    def __init__(self, limit: float):
        super().__init__()
        self._limit = limit

    def __call__(self, up, gate):
        if self._limit and self._limit > 0:
            gate = mx.minimum(gate, self._limit)
            up = mx.clip(up, -self._limit, self._limit)
        return nn.silu(gate) * up


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, inner: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self._act = ClampedSwiGLU(limit)

    def __call__(self, x):
        return self.down_proj(self._act(self.up_proj(x), self.gate_proj(x)))


class Gate(nn.Module):
    """The router: a bare weight (not quantized), and either the token-id
    table (hash layers) or the selection bias."""

    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.weight = mx.random.normal((args.n_routed_experts, args.hidden_size)) * args.hidden_size ** -0.5
        self.top_k = args.num_experts_per_tok
        self.scale = args.routed_scaling_factor
        self.scoring = args.scoring_func
        self.normalize = args.norm_topk_prob
        if hashed:
            # Distinct experts per token, deterministic under mx.random.seed.
            order = mx.argsort(mx.random.uniform(shape=(args.vocab_size, args.n_routed_experts)), axis=-1)
            self.tid2eid = order[:, : self.top_k].astype(mx.int64)
        else:
            self.e_score_correction_bias = mx.random.normal((args.n_routed_experts,)) * 0.1

    def __call__(self, x, tokens):
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if self.scoring == "softmax":
            scores = mx.softmax(logits, axis=-1)
        elif self.scoring == "sigmoid":
            scores = mx.sigmoid(logits)
        else:
            scores = mx.sqrt(nn.softplus(logits))
        if "tid2eid" in self:
            idx = self.tid2eid[tokens].astype(mx.int32)
        else:
            biased = scores + self.e_score_correction_bias
            idx = mx.argpartition(-biased, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(scores, idx, axis=-1)
        if self.scoring != "softmax" and self.normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return idx, weights * self.scale


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.gate = Gate(args, hashed=layer < args.num_hash_layers)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                                    activation=ClampedSwiGLU(args.swiglu_limit))
        self.shared_experts = SharedExpert(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                                           args.swiglu_limit)
        self._group = None  # set by Model.shard()

    def __call__(self, x, tokens):
        idx, weights = self.gate(x, tokens)
        routed = (self.switch_mlp(x, idx).astype(mx.float32) * weights[..., None]).sum(axis=-2)
        out = (routed + self.shared_experts(x).astype(mx.float32)).astype(x.dtype)
        if self._group is not None:
            out = mx.distributed.all_sum(out, group=self._group)
        return out


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hc = (args.hc_mult, args.hidden_size, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)
        self.attn_hc = HyperConnection(*hc)
        self.ffn_hc = HyperConnection(*hc)
        self.attn_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn = MoE(args, layer)

    def __call__(self, streams: mx.array, tokens: mx.array, cache: Optional[LayerCache] = None) -> mx.array:
        if cache is None:
            cache = LayerCache(self.attn.window)
        x, post, comb = self.attn_hc.read(streams)
        streams = HyperConnection.write(self.attn(self.attn_norm(x), cache), streams, post, comb)
        x, post, comb = self.ffn_hc.read(streams)
        return HyperConnection.write(self.ffn(self.ffn_norm(x), tokens), streams, post, comb)


class DeepseekV4Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.hc_head = HyperHead(args.hc_mult, args.hidden_size, args.hc_eps, args.rms_norm_eps)
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.embed_tokens(tokens)
        streams = mx.broadcast_to(h[:, :, None, :], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, caches):
            streams = layer(streams, tokens, c)
        return self.norm(self.hc_head(streams))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekV4Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None, **kwargs) -> mx.array:
        return self.lm_head(self.model(inputs, cache))

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return [LayerCache(self.args.sliding_window) for _ in self.model.layers]

    @property
    def cast_predicate(self):
        """Kept in float32 whatever the checkpoint dtype (as the release stores them)."""
        def keep(path: str) -> bool:
            return not any(part in path for part in
                           ("attn_sink", "e_score_correction_bias", "attn_hc.", "ffn_hc.", "hc_head."))

        return keep

    def sanitize(self, weights: dict) -> dict:
        """Drop what this class does not run (the MTP layer, layers past
        num_hidden_layers) and stack per-expert tensors into switch_mlp."""
        n = self.args.num_hidden_layers
        out = {}
        for key, value in weights.items():
            if key.startswith("mtp.") or key.startswith("model.mtp."):
                continue
            parts = key.split(".")
            if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and int(parts[2]) >= n:
                continue
            out[key] = value
        for layer in range(n):
            prefix = f"model.layers.{layer}.ffn"
            for src, dst in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                for suffix in ("weight", "scales", "biases"):
                    first = f"{prefix}.experts.0.{src}.{suffix}"
                    if first not in out:
                        continue
                    stacked = [out.pop(f"{prefix}.experts.{e}.{src}.{suffix}")
                               for e in range(self.args.n_routed_experts)]
                    out[f"{prefix}.switch_mlp.{dst}.{suffix}"] = mx.stack(stacked)
        return out

    def shard(self, group=None):
        """Head-parallel attention by whole output groups (a rank's heads are
        exactly the heads of its groups of wo_a), experts split on their
        intermediate axis; each half's output summed over ranks."""
        from mlx.nn.layers.distributed import shard_inplace

        group = group or mx.distributed.init()
        n, r = group.size(), group.rank()
        for layer in self.layers:
            attn = layer.attn
            shard_inplace(attn.wq_b, "all-to-sharded", group=group)
            heads = attn.n_heads // n
            attn.attn_sink = attn.attn_sink[r * heads:(r + 1) * heads]
            shard_inplace(attn.wo_a, "all-to-sharded", group=group)
            shard_inplace(attn.wo_b, "sharded-to-all", group=group)
            attn._group = group
            ffn = layer.ffn
            for proj in (ffn.switch_mlp.gate_proj, ffn.switch_mlp.up_proj, ffn.shared_experts.gate_proj,
                         ffn.shared_experts.up_proj):
                shard_inplace(proj, "all-to-sharded", group=group)
            for proj in (ffn.switch_mlp.down_proj, ffn.shared_experts.down_proj):
                shard_inplace(proj, "sharded-to-all", group=group)
            ffn._group = group
