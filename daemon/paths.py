"""Where exod keeps its data: $EXOD_DATA_DIR, else the XDG data directory."""

import os
from pathlib import Path


def data_dir() -> Path:
    explicit = os.environ.get("EXOD_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "exod"


def models_dir() -> Path:
    return data_dir() / "models"
