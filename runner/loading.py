"""Lazy loading: the model is built with unevaluated weights, cut by the
strategy, then materialized one layer at a time so that only this rank's
tensors (and one source tensor at a time while it is sliced) ever exist."""

import resource
import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from exod.models.architectures import for_model_type

from . import shard_loading, strategies


def peak_rss_bytes() -> int:
    """This process image's high-water resident set. On Linux ru_maxrss keeps
    the parent's peak across fork+exec, so VmHWM (this image's own) is read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def materialize(module) -> None:
    # One array per eval: a slice's source tensor is freed before the next.
    for _, array in tree_flatten(module.parameters()):
        mx.eval(array)


def load(spec, group, progress: Callable[[int, int], None]):
    """(model, config, architecture) with this rank's weights in memory."""
    model, config = shard_loading.load_model(Path(spec.model_dir), lazy=True)  # a whole checkpoint or a shard
    arch = for_model_type(config["model_type"])
    strategies.get(spec.strategy)(model, group, spec, arch, config)
    layers = model.layers
    progress(0, len(layers))
    for i, layer in enumerate(layers):
        materialize(layer)
        progress(i + 1, len(layers))
    materialize(model)
    shard_loading.check_cut(model, Path(spec.model_dir))
    mx.clear_cache()
    return model, config, arch


def held_layer_indices(model) -> list[int]:
    """Global indices of the layers this rank runs."""
    inner = getattr(model, "model", None)
    start = getattr(inner, "start_idx", 0) or 0
    return list(range(start, start + len(model.layers)))
