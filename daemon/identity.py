"""A node's identity, kept in its data directory: its own key pair, whose
hash is the node id (daemon/keys.py), and the lock that lets one daemon
at a time use the directory."""

import fcntl
import os
import re
from pathlib import Path

from . import keys

NODE_ID = re.compile(r"^[0-9a-f]{32}$")


def load_or_create(data_dir: Path):
    """The node's private key, made on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key = keys.load_or_create_node_key(data_dir)
    _note_id(data_dir, key)
    return key


def regenerate(data_dir: Path):
    """A new key pair, so a new node id (a copied data dir's younger twin)."""
    key = keys.new_node_key(data_dir)
    _note_id(data_dir, key)
    return key


def _note_id(data_dir: Path, key) -> None:
    # For people and scripts only: the id is always derived from the key.
    tmp = data_dir / "node_id.tmp"
    tmp.write_text(keys.node_id_of(keys.spki(key.public_key())) + "\n")
    tmp.replace(data_dir / "node_id")


class DataDirInUse(OSError):
    pass


def lock(data_dir: Path) -> int:
    """Hold the data dir for this process (released when it exits, however
    it exits). Raises DataDirInUse naming the pid that holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 32).decode().strip() or "unknown"
        finally:
            os.close(fd)
        raise DataDirInUse(f"data dir {data_dir} is in use by exod pid {holder}; "
                           f"stop that daemon or give another --data-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
