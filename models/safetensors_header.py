"""Read a safetensors file's header without touching its tensor data."""

import json
import struct
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its stored dtype (the file's code,
    "F32", and exod's name, "float32"), shape and where its bytes lie in the
    file (absolute offsets)."""

    name: str
    code: str
    dtype: str
    shape: tuple
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """A safetensors file's header: where the data starts and each tensor."""

    header_bytes: int  # 8 + the JSON header's length: the data starts here
    size: int
    entries: dict      # name -> Entry
    metadata: dict


def header_length(prefix: bytes, size: int, where: str) -> int:
    """The JSON header's length from the file's first 8 bytes."""
    if len(prefix) < 8:
        raise ModelError(f"{where}: truncated safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise ModelError(f"{where}: corrupt safetensors header (claims {length} bytes, file has {size})")
    return length


def parse_layout(raw: bytes, size: int, where: str) -> Layout:
    """The layout from the JSON header bytes (without the 8-byte prefix) of
    a file of `size` bytes: what a peer sends when this node lacks the file."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{where}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{where}: corrupt safetensors header (not an object)")
    base = 8 + len(raw)
    data_size = size - base
    entries = {}
    metadata = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            dtype = DTYPE_NAMES[code]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{where}: corrupt safetensors entry for {name!r}") from None
        if not 0 <= begin <= end <= data_size:
            raise ModelError(f"{where}: tensor {name!r} lies outside the file (truncated download?)")
        entries[name] = Entry(name, code, dtype, shape, base + begin, base + end)
    return Layout(base, size, entries, metadata)


def read_layout(path: Path) -> Layout:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length = header_length(f.read(8), size, path.name)
            raw = f.read(length)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    return parse_layout(raw, size, path.name)


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Map each tensor name to (dtype, shape, byte size)."""
    layout = read_layout(path)
    return {e.name: (e.dtype, e.shape, e.nbytes) for e in layout.entries.values()}
