"""Read a safetensors file's header without touching its tensor data."""

import json
import struct
from pathlib import Path

from .errors import ModelError

# safetensors caps its own header at 100 MB; anything larger is corruption.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Map each tensor name to (dtype, shape, byte size)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ModelError(
                    f"{path.name}: corrupt safetensors header (claims {length} bytes, file has {size})"
                )
            raw = f.read(length)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name}: corrupt safetensors header (not an object)")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPE_NAMES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path.name}: corrupt safetensors entry for {name!r}") from None
        if not 0 <= begin <= end <= data_size:
            raise ModelError(
                f"{path.name}: tensor {name!r} lies outside the file (truncated download?)"
            )
        tensors[name] = (dtype, shape, end - begin)
    return tensors
