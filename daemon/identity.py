"""A node id that survives restarts, kept in the data directory."""

import re
import uuid
from pathlib import Path

NODE_ID = re.compile(r"^[0-9a-f]{32}$")


def load_or_create(data_dir: Path) -> str:
    path = data_dir / "node_id"
    try:
        node_id = path.read_text().strip()
        if NODE_ID.match(node_id):
            return node_id
    except OSError:
        pass
    return regenerate(data_dir)


def regenerate(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    node_id = uuid.uuid4().hex
    tmp = data_dir / "node_id.tmp"
    tmp.write_text(node_id + "\n")
    tmp.replace(data_dir / "node_id")
    return node_id
