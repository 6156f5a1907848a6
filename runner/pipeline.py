"""exod's pipeline stage, one wrapper for every decoder mlx-lm can load.

A rank runs a contiguous range of the model's layers. Stages pass hidden
states from the last rank down to rank 0, which runs the last layers (mlx-lm's
own convention, which the planner and the canary share), and the output of
the last layer reaches every rank with an all-gather, so every rank computes
the logits.

Nothing here names a model. The model's own forward runs unchanged, over its
own layer list, with three edits to that list:

- a layer another rank runs becomes `Elsewhere`: no weights, the hidden state
  passes through. It keeps the layer's plain attributes, because some
  forwards read them (llama asks each layer whether it slides);
- the first layer this rank runs receives its input from the next rank; the
  last one sends its output to the previous rank;
- the model's last layer all-gathers, so every rank has rank 0's output.

Models build attention masks from a cache outside the loop (cache[0], or the
first cache of each kind). Those caches belong to layers this rank may not
run, so they must still count every token. Where a skipped layer's cache is
one of mlx-lm's key/value caches, the skipped layer advances it with keys
and values of width zero: the offsets (and, batched, the left padding) are
the whole model's, the cache holds no bytes, and mlx-lm's batch merge,
filter and extend treat it like any other, so a stage batches and keeps a
prefix cache. Other caches (recurrent state, an architecture's own) are
aliased instead to a held cache of the same kind, which a held layer keeps
up to date: every layer sees every token, so same-kind caches hold the same
offsets; such a stage serves one sequence at a time, since a merge would cut
the aliases (runner/engine.py), and still keeps a prefix cache: a stored
entry is copied as one list, which keeps its aliases. A model that keeps
state outside its layers in some other way (hyper-connection streams, a
layer reading another layer's cache) gives its architecture module a
`pipeline` hook instead.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache

from .stages import Stages

# Caches whose update_and_fetch takes keys and values of any width, and whose
# batch forms (mlx-lm's merge) keep offsets and padding per sequence.
ADVANCEABLE = (KVCache, RotatingKVCache)


class PipelineError(Exception):
    pass


@dataclass(frozen=True)
class Stage:
    """The global layer range [start, end) this rank runs."""

    start: int
    end: int


def layer_list(model) -> list:
    """The list object the model's forward iterates over. mlx-lm's Model
    classes expose their layers as `.layers`, often a property that returns a
    slice or the inner model's list; the list that matters is the one in the
    module tree holding those same layer objects, since replacing its entries
    is what the forward sees."""
    try:
        layers = list(model.layers)
    except (AttributeError, TypeError):
        raise PipelineError("the model exposes no layer list (.layers)") from None
    if not layers:
        raise PipelineError("the model has no layers")
    first = layers[0]
    found = []

    def walk(module, depth):
        for value in module.values():
            if isinstance(value, list) and len(value) == len(layers) and value and value[0] is first:
                found.append(value)
            elif isinstance(value, nn.Module) and depth < 4:
                walk(value, depth + 1)

    walk(model, 0)
    if len(found) != 1:
        raise PipelineError(f"cannot find the model's layer list in its module tree ({len(found)} candidates)")
    return found[0]


def split_ranges(split: list[int], rank: int) -> Stage:
    """Rank r runs the layers after those of ranks r+1 … size-1."""
    start = sum(split[rank + 1:])
    return Stage(start, start + split[rank])


def even_split(layers: int, size: int) -> list[int]:
    base, extra = divmod(layers, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def apply(model, group, split: list[int], stages: "Stages | None" = None) -> Stage:
    """Make this rank one stage of the pipeline, in place, before any weight
    is materialized (the layers it drops are never read).

    stages: ranks per stage (a hybrid placement, runner/stages.py), with
    `split` giving each stage's layers; None: one rank per stage. Every rank
    of a stage runs the stage's layers. The stage's input arrives at its
    highest rank from the next stage's lowest (its ring neighbour) and is
    passed down the stage from rank to rank; the stage's lowest rank sends
    the output on. A stage's ranks end with the same output when its cut
    layers sum over the stage (runner/stages.py)."""
    layers = layer_list(model)
    world, rank = group.size(), group.rank()
    stages = stages or Stages((1,) * world)
    if sum(stages.sizes) != world:
        raise PipelineError(f"stages {list(stages.sizes)} do not cover the {world} ranks")
    size, mine = len(stages.sizes), stages.of_rank(rank)
    if len(split) != size or sum(split) != len(layers) or min(split) < 1:
        raise PipelineError(f"pipeline split {split} does not cover {len(layers)} layers on {size} stages")
    lo, hi = stages.bounds(mine)
    stage = split_ranges(split, mine)
    last = len(layers) - 1
    receives = mine < size - 1  # the last stage runs the first layers, from its own embedding
    make = getattr(model, "make_cache", None)
    kinds = make() if make else [KVCache() for _ in layers]
    advance = all(type(kinds[i]) in ADVANCEABLE for i in range(len(layers)) if not stage.start <= i < stage.end)
    for i, layer in enumerate(layers):
        held = stage.start <= i < stage.end
        first = held and i == stage.start and receives
        recv_from = rank + 1 if first else None
        forward_to = rank - 1 if first and rank > lo else None
        send_to = rank - 1 if held and i == stage.end - 1 and rank == lo and lo > 0 else None
        # A stage of several ranks sums its cut blocks over them: the stage's
        # last sum feeds no cache of this rank, yet the others wait for it.
        tie = held and i == stage.end - 1 and (send_to is not None or hi - lo > 1)
        gather = i == last and world > 1
        if not held or recv_from is not None or tie or gather:
            layers[i] = StageLayer(layer, held, group, recv_from, send_to, gather, advance=advance and not held,
                                   forward_to=forward_to, tie=tie)
    if not advance:
        model.make_cache = lambda: aliased_caches(make() if make else [KVCache() for _ in layers], stage)
    model.exod_stage = stage
    return stage


class StageLayer(nn.Module):
    """One slot of the layer list on this rank: the layer itself (held) or
    nothing (Elsewhere), with this stage's sends and receives around it."""

    def __init__(self, layer, held: bool, group, recv_from=None, send_to=None, gather=False, advance=False,
                 forward_to=None, tie=False):
        super().__init__()
        for key, value in _plain_attributes(layer):
            setattr(self, key, value)
        if held:
            self.layer = layer
        self._group = group
        self._recv_from = recv_from
        self._send_to = send_to
        self._forward_to = forward_to
        self._tie = tie
        self._gather = gather
        self._advance = advance

    def __call__(self, x, *args, **kwargs):
        if self._recv_from is not None:
            # The embedding this rank computed only gives the shape and dtype.
            x = mx.distributed.recv_like(x, self._recv_from, group=self._group)
        if self._forward_to is not None:
            # Down the stage before this rank computes: the next rank waits for it.
            x = mx.depends(x, mx.distributed.send(x, self._forward_to, group=self._group))
        out = self["layer"](x, *args, **kwargs) if "layer" in self else x
        if self._advance:
            cache = _cache_argument(args, kwargs)
            if cache is not None:
                # The skipped layer's tokens, zero bytes wide (see the module's docstring).
                empty = mx.zeros((x.shape[0], 1, x.shape[1], 0), dtype=x.dtype)
                cache.update_and_fetch(empty, empty)
        if self._send_to is not None:
            out = mx.distributed.send(out, self._send_to, group=self._group)
        if self._tie:
            cache = _cache_argument(args, kwargs)
            if cache is not None:
                # Prefill evaluates only the caches: the stage's last sends must be in their graph.
                _depend(cache, out)
        if self._gather:
            # Ranks join in rank order, so the first rows are rank 0's: the last layer's output.
            out = mx.distributed.all_gather(out, group=self._group)[: out.shape[0]]
        return out


def _plain_attributes(layer):
    """The layer's attributes that are neither weights nor submodules."""
    for key, value in vars(layer).items():
        if not key.startswith("_"):
            yield key, value
    for key, value in layer.items():
        if not _holds_parameters(value):
            yield key, value


def _holds_parameters(value) -> bool:
    if isinstance(value, (mx.array, nn.Module)):
        return True
    if isinstance(value, dict):
        return any(_holds_parameters(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_parameters(v) for v in value)
    return False


def _cache_argument(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, _BaseCache):
            return value
    return None


def _depend(cache, out) -> None:
    """Make the cache's first array depend on `out`."""
    if not _tie(cache, out):
        raise PipelineError(f"{type(cache).__name__}: no array to tie this stage's send to")


def _tie(obj, out) -> bool:
    for key, value in vars(obj).items():
        if isinstance(value, mx.array):
            setattr(obj, key, mx.depends(value, out))
            return True
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, mx.array):
                    value[i] = mx.depends(item, out)
                    return True
                if isinstance(item, _BaseCache) and _tie(item, out):
                    return True
        if isinstance(value, _BaseCache) and _tie(value, out):
            return True
    return False


def _kind(cache):
    """What makes two caches interchangeable for a mask: their class and
    their settings (window, kept tokens, nested caches)."""
    settings = []
    for key, value in sorted(vars(cache).items()):
        if isinstance(value, (bool, int, float, str)) or value is None:
            settings.append((key, value))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _BaseCache) for v in value):
            settings.append((key, tuple(_kind(v) for v in value)))
    return type(cache), tuple(settings)


def aliased_caches(caches: list, stage: Stage) -> list:
    """Each skipped layer's cache replaced by a held layer's cache of the
    same kind, where there is one."""
    held = {}
    for i in range(stage.start, stage.end):
        held.setdefault(_kind(caches[i]), caches[i])
    return [c if stage.start <= i < stage.end else held.get(_kind(c), c) for i, c in enumerate(caches)]
