"""Byte sizes of quantized matrices, and which recipe applies to a module."""

import math
import re
from typing import Optional, Union

# Scales of these modes are one byte each and they store no biases.
BYTE_SCALE_MODES = {"mxfp4", "mxfp8", "nvfp4"}
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}

DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}

Params = dict  # {"mode", "bits", "group_size"}


def normalize(params: dict, default: Optional[dict] = None) -> Params:
    base = dict(default or {})
    base.update(params)
    mode = base.get("mode", "affine")
    group, bits = MODE_DEFAULTS.get(mode, (64, 4))
    return {"mode": mode, "bits": int(base.get("bits", bits)), "group_size": int(base.get("group_size", group))}


def recipe_for(
    path: str, quantization: Optional[dict], rules: list[tuple[re.Pattern, Union[dict, bool]]]
) -> Optional[Union[Params, bool]]:
    """The explicit recipe for one module: a per-path entry of config.json's
    quantization dict, else the first matching card rule; None if neither says."""
    if not quantization:
        return None
    default = {k: v for k, v in quantization.items() if k in ("mode", "bits", "group_size")}
    entry = quantization.get(path)
    if entry is None:
        for pattern, params in rules:
            if pattern.search(path):
                entry = params
                break
    if entry is None:
        return None
    if entry is False:
        return False
    if entry is True:
        return normalize(default)
    return normalize(entry, default)


def default_params(quantization: dict) -> Params:
    return normalize({k: v for k, v in quantization.items() if k in ("mode", "bits", "group_size")})


def quantized_entries(name: str, shape: tuple[int, ...], scale_dtype: str, params: Params):
    """The stored tensors of a quantized matrix `name` (…/weight) of logical
    `shape`: (name, shape, dtype, bytes) for weight, scales and, for affine, biases."""
    *lead, out, cols = shape
    bits, group = params["bits"], params["group_size"]
    prefix = name[: -len(".weight")] if name.endswith(".weight") else name
    packed = (*lead, out, cols * bits // 32)
    groups = (*lead, out, cols // group)
    entries = [(f"{prefix}.weight", packed, "uint32", math.prod(packed) * 4)]
    if params["mode"] in BYTE_SCALE_MODES:
        entries.append((f"{prefix}.scales", groups, "uint8", math.prod(groups)))
    else:
        size = math.prod(groups) * DTYPE_BYTES[scale_dtype]
        entries.append((f"{prefix}.scales", groups, scale_dtype, size))
        entries.append((f"{prefix}.biases", groups, scale_dtype, size))
    return entries
