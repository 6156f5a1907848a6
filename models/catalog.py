"""The built-in catalog: one JSON card per published MLX checkpoint."""

import json
from functools import lru_cache
from pathlib import Path

from exod.proto import exod_pb2 as pb

from . import inventory
from .errors import ModelError

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"


@lru_cache(maxsize=None)
def cards() -> dict[str, dict]:
    found = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        card = json.loads(path.read_text())
        found[card["id"]] = card
    return found


def resolve(model: str) -> pb.ModelSpec:
    """A catalog id's card, described without any file (names of every
    other kind: models/store.py)."""
    card = cards().get(model)
    if card is None:
        raise ModelError(f"unknown model {model!r}: not a catalog id (see `exod models`)")
    return _card_spec(model)


@lru_cache(maxsize=None)
def _card_spec(model_id: str) -> pb.ModelSpec:
    return inventory.from_card(cards()[model_id])
