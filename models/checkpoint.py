"""A checkpoint described by its small parts: config.json, the safetensors
index and each weight file's header. That is all planning needs (the
inventory) and all fetching needs (where each tensor's bytes lie), and it
is kilobytes: a node that holds no weights gets it from a peer that does."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from exod.proto import exod_pb2 as pb

from . import inventory
from .errors import ModelError
from .safetensors_header import Layout, read_layout

INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass
class Checkpoint:
    model_id: str
    revision: str
    config: dict
    files: dict                                   # name -> (size, sha256) of every file
    layouts: dict = field(default_factory=dict)   # weight file name -> Layout

    def weight_files(self) -> list[str]:
        return sorted(self.layouts)

    def tensors(self) -> dict:
        """name -> (file, Entry) over every weight file."""
        found = {}
        for file in sorted(self.layouts):
            for name, entry in self.layouts[file].entries.items():
                found[name] = (file, entry)
        return found

    def spec(self, spec_id: str) -> pb.ModelSpec:
        stored = {name: (e.dtype, e.shape, e.nbytes) for name, (_, e) in self.tensors().items()}
        return inventory.from_parts(spec_id, self.config, stored, where=f"{self.model_id}/config.json")

    @property
    def digests(self) -> dict:
        return {name: sha for name, (_, sha) in self.files.items() if sha}

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def weight_files_of(files: dict, index: Optional[dict]) -> list[str]:
    """The weight files: those the index names, else every top-level
    safetensors file."""
    if index is not None:
        try:
            named = sorted(set(index["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise ModelError(f"{INDEX}: no weight_map") from None
        return named
    return sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)


def parse_config(raw: bytes, where: str) -> dict:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{where}: config.json is not a JSON object")
    return config


def parse_index(raw: bytes, where: str) -> dict:
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{where}: {INDEX} is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise ModelError(f"{where}: {INDEX} is not a JSON object")
    return index


def local(model_id: str, revision: str, root: Path, files: dict) -> Checkpoint:
    """From a folder that holds (at least) config.json, the index and the
    weight files' headers. files: name -> (size, sha256)."""
    root = Path(root)
    where = str(root)
    config = parse_config((root / "config.json").read_bytes(), where)
    index = parse_index((root / INDEX).read_bytes(), where) if INDEX in files else None
    layouts: dict[str, Layout] = {}
    for name in weight_files_of(files, index):
        if name not in files:
            raise ModelError(f"{where}: {name} is not here")
        layouts[name] = read_layout(root / name)
    if not layouts:
        raise ModelError(f"{where}: no .safetensors files")
    return Checkpoint(model_id, revision, config, dict(files), layouts)
