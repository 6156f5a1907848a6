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
    progress(0, int(config.get("num_hidden_layers") or 0))  # Loading: a refused cut fails in this phase
    shard_loading.check_layout(Path(spec.model_dir), spec)
    strategies.get(spec.strategy)(model, group, spec, arch, config)
    layers = model.layers
    for i, layer in enumerate(layers):
        materialize(layer)
        progress(i + 1, len(layers))
    materialize(model)
    shard_loading.check_cut(model, Path(spec.model_dir))
    mx.clear_cache()
    return model, config, arch


# mlx-lm's generate warns from this share of the working set on: close to
# it, the weights and what a step allocates may no longer stay resident.
WIRED_WARNING_FRACTION = 0.9


def wired_limit(weights_bytes: int, info: dict) -> tuple[int, str]:
    """(MLX wired limit to set, a warning or "") for a rank holding
    `weights_bytes` on the Metal device `info` describes (mx.device_info():
    max_recommended_working_set_size, memory_size). No working set, no limit."""
    working_set = int(info.get("max_recommended_working_set_size") or 0)
    if not working_set:
        return 0, ""
    if weights_bytes <= WIRED_WARNING_FRACTION * working_set:
        return working_set, ""
    from exod.placement.wired import sysctl, wired_limit_mb

    warning = (f"this rank's weights ({weights_bytes / 1e9:.1f} GB) are close to or over Metal's recommended "
               f"working set ({working_set / 1e9:.1f} GB) and may page")
    mb = wired_limit_mb(weights_bytes / WIRED_WARNING_FRACTION, int(info.get("memory_size") or 0))
    if mb is not None and mb * 2**20 > working_set:
        warning += f"; `{sysctl(mb)}` raises it"
    return working_set, warning


def wire_weights(model) -> str:
    """On Metal, raise MLX's wired-memory limit to the recommended working
    set for the rank's whole life, as mlx-lm's generate does around each
    generation (its wired_limit context): the rank's weights then stay
    resident instead of being paged out between requests. Returns a warning
    when the weights come close to the limit ("" otherwise, and off Metal)."""
    if not mx.metal.is_available():
        return ""
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    limit, warning = wired_limit(weights, info)
    if limit:
        mx.set_wired_limit(limit)
    return warning


def held_layer_indices(model) -> list[int]:
    """Global indices of the layers this rank runs: exod's pipeline stage
    records its range; a class's own pipeline() (an architecture's hook)
    keeps mlx-lm's start_idx and lists only its layers."""
    stage = getattr(model, "exod_stage", None)
    if stage is not None:
        return list(range(stage.start, stage.end))
    inner = getattr(model, "model", None)
    start = getattr(inner, "start_idx", 0) or 0
    return list(range(start, start + len(model.layers)))
