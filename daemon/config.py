"""Daemon settings from flags, EXOD_* environment variables and an optional
TOML file ($XDG_CONFIG_HOME/exod/config.toml or --config), in that order of
precedence."""

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from exod.placement.units import parse_bytes

from .paths import data_dir

PROTOCOL_VERSION = 2  # 2: signed records, mutual TLS


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    name: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 52415
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 52416
    peers: list = field(default_factory=list)  # "host:port" of static peers
    interfaces: list = field(default_factory=list)  # advertise only these (default: all usable)
    data_dir: str = ""
    memory_limit: int = 0  # bytes; 0: no cap
    cluster: str = "default"
    discovery: bool = True  # mDNS
    api_token: str = ""  # bearer token for mutations from other hosts (none: loopback only)
    api_allowed_hosts: list = field(default_factory=list)  # Host names the HTTP API answers besides its own
    heartbeat_s: float = 0.5
    suspect_after_s: float = 1.5
    down_after_s: float = 3.0
    exchange_s: float = 30.0  # anti-entropy; heartbeats carry versions, so changes travel at once
    rtt_probe_s: float = 10.0
    throughput_probe_s: float = 600.0  # a 2 MB transfer; RTT probes run every rtt_probe_s
    profile_refresh_s: float = 3.0
    prestart_runner: bool = True  # keep one runner process with MLX imported, ready for the next rank
    # The secret every member of the cluster holds (`exod key new`). Unset:
    # cluster_key_file, else the key made in the data dir on first start.
    cluster_key: str = field(default="", repr=False)
    cluster_key_file: str = ""
    max_members: int = 64    # nodes in the view; more are refused, with a log line
    max_runners: int = 16    # runner processes on this node at once
    # Folders of checkpoints in the org/name layout (LM Studio's), read besides
    # the Hugging Face cache and DATA_DIR/models (models/store.py).
    models_dirs: list = field(default_factory=list)
    # The Hugging Face cache to read and download into; default: HF_HUB_CACHE,
    # else HF_HOME/hub, else ~/.cache/huggingface/hub (as huggingface_hub).
    hf_cache: str = ""
    # Requests that may wait for an instance's batch, per instance (its rank
    # 0 refuses more with ErrorKind OVERLOADED; the APIs answer 429).
    max_queue: int = 64

    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else data_dir()


def config_file(explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    path = Path(base) / "exod" / "config.toml"
    return path if path.is_file() else None


def _coerce(name: str, value, kind):
    try:
        if name == "memory_limit":
            return parse_bytes(str(value)) if value not in (0, "0", "", None) else 0
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind is list:
            return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


def load(flags: dict, config_path: Optional[str] = None) -> Settings:
    """flags: only the options given on the command line (None = not given)."""
    kinds = {f.name: (type(f.default) if not callable(f.default_factory) else list) for f in fields(Settings)}
    values: dict = {}
    path = config_file(config_path)
    if path is not None:
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in kinds:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, kinds[name])
    for name, kind in kinds.items():
        env = os.environ.get(f"EXOD_{name.upper()}")
        if env is not None and name != "data_dir":
            values[name] = _coerce(name, env, kind)
    for name, value in flags.items():
        if value is not None and name in kinds:
            values[name] = _coerce(name, value, kinds[name])
    settings = Settings(**values)
    for port in ("api_port", "grpc_port"):
        if not 0 <= getattr(settings, port) <= 65535:
            raise ConfigError(f"{port} must be 0-65535, got {getattr(settings, port)}")
    if not (0 < settings.suspect_after_s <= settings.down_after_s):
        raise ConfigError("suspect_after_s must be positive and at most down_after_s")
    if settings.max_members < 2 or settings.max_runners < 1:
        raise ConfigError("max_members must be at least 2 and max_runners at least 1")
    if not 0 <= settings.max_queue <= 4096:
        raise ConfigError("max_queue must be 0-4096 (0: every request beyond the batch gets a 429)")
    if not settings.cluster or len(settings.cluster) > 63:
        raise ConfigError("cluster must be 1-63 characters")
    for peer in settings.peers:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"peer {peer!r} is not HOST:PORT")
    return settings
