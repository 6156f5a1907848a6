"""The one place that turns a model name into files on this node.

A model is named by
- a built-in name (`demo`, `midsize-moe`: models/synthetic.NAMED, built on
  demand into the exod store),
- a catalog id (`qwen3-30b-a3b-4bit`: its card names the checkpoint's
  Hugging Face repo id),
- a Hugging Face repo id, `org/name` or `org/name@revision`,
- or a local directory (only from this machine: callers enforce that).

A node finds checkpoints in
- the Hugging Face cache (HF_HOME / HF_HUB_CACHE), read through
  huggingface_hub's own cache API (scan_cache_dir), never parsed by hand;
- exod's store, DATA_DIR/models/org/name (and DATA_DIR/models/name for
  built-in models);
- extra folders given with --models-dir, in the org/name layout LM Studio
  uses;
- and its shard checkpoints, DATA_DIR/shards: the part of a checkpoint one
  rank of one placement needed (models/shards.py writes them).

Every id is checked against a strict pattern before it is joined to a path,
so a name can never reach outside a store. Blocking I/O: the daemon calls
this from worker threads."""

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from exod.proto import exod_pb2 as pb

from .errors import ModelError

# Hugging Face's own rules, a little stricter: letters, digits, . _ -, no
# leading punctuation, no "--" (the cache's separator) and no "..".
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REPO_ID = re.compile(rf"^(?P<org>{_PART})/(?P<name>{_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{{0,127}}))?$")
PLAIN_ID = re.compile(rf"^{_PART}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,199}){0,3}$")

MAX_FILES = 4096          # files listed per checkpoint: far above any real one (DeepSeek-V3: ~170)
MAX_HOLDINGS = 256        # checkpoints published per node
REVISION_FILE = ".exod-revision"  # in an exod-store folder: the revision it was pulled at
SHARD_MANIFEST = "exod-shard.json"
PATH_STARTS = ("/", "~", ".", "\\")


def _clean_id(text: str) -> bool:
    return ".." not in text and "--" not in text


@dataclass(frozen=True)
class ModelName:
    """A parsed name. kind: builtin, catalog, repo, store (a plain id of a
    store folder) or local (a directory)."""

    kind: str
    model_id: str       # repo id, built-in or store name, or the directory
    revision: str = ""  # "": whichever the node holds, or the hub's main
    card: str = ""      # the catalog id, for kind catalog

    def __str__(self) -> str:
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id


def looks_like_path(text: str) -> bool:
    return text.startswith(PATH_STARTS)


def parse(text: str, allow_local: bool = False) -> ModelName:
    """What a name names, without touching the disk (except a local
    directory, when allowed). ModelError when it names nothing."""
    from . import catalog, synthetic

    text = text.strip()
    if text in synthetic.NAMED:
        return ModelName("builtin", text)
    card = catalog.cards().get(text)
    if card is not None:
        checkpoint = card.get("checkpoint", "")
        if not REPO_ID.match(checkpoint):
            raise ModelError(f"catalog card {text!r} names no checkpoint repo id")
        return ModelName("catalog", checkpoint.partition("@")[0], checkpoint.partition("@")[2], card=text)
    m = REPO_ID.match(text)
    if m and _clean_id(text.partition("@")[0]):
        revision = m.group("revision") or ""
        if revision and ".." in revision:
            raise ModelError(f"bad revision in {text!r}")
        return ModelName("repo", f"{m.group('org')}/{m.group('name')}", revision)
    if PLAIN_ID.match(text) and _clean_id(text):
        return ModelName("store", text)
    if allow_local:
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"{text}: no config.json in that directory")
            return ModelName("local", str(path.resolve()))
    if looks_like_path(text) and not allow_local:
        raise ModelError(f"models are named by id from other hosts; {text!r} is a path")
    raise ModelError(f"unknown model {text!r}: not a built-in model, a catalog id (see `exod models`), "
                     "a Hugging Face repo id (org/name) nor a model directory")


def check_remote(text: str) -> ModelName:
    """From another host: a name by id only, never a path (a path would let a
    LAN client make this daemon read any directory it can read, and learn
    which exist). The filesystem is never asked."""
    return parse(text, allow_local=False)


# ------------------------------------------------------------------ holdings


@dataclass
class HeldFile:
    name: str
    path: Path
    size: int
    sha256: str = ""


@dataclass
class Holding:
    """One checkpoint (or shard checkpoint) in one store."""

    model_id: str
    revision: str
    root: Path
    store: str
    files: dict = field(default_factory=dict)  # name -> HeldFile
    complete: bool = False
    shard: Optional[dict] = None  # the shard manifest, for store "shard"
    refs: tuple = ()              # HF cache refs pointing at this revision ("main", ...)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_proto(self) -> pb.ModelHolding:
        holding = pb.ModelHolding(model_id=self.model_id, revision=self.revision, complete=self.complete,
                                  store=self.store, bytes=self.bytes)
        for name in sorted(self.files):
            f = self.files[name]
            holding.files.append(pb.ModelFile(name=name, size=f.size, sha256=f.sha256))
        if self.shard:
            s = self.shard
            holding.shard.CopyFrom(pb.ShardOf(strategy=s["strategy"], rank=s["rank"], world_size=s["world_size"],
                                              layer_start=s.get("layer_start", 0), layer_end=s.get("layer_end", 0),
                                              grains=s.get("grains", [])))
        return holding


def is_complete(root: Path, names: Iterable[str]) -> bool:
    """config.json and every weight file the index names (or, without an
    index, at least one safetensors file)."""
    names = set(names)
    if "config.json" not in names:
        return False
    if "model.safetensors.index.json" in names:
        try:
            index = json.loads((root / "model.safetensors.index.json").read_text())
            wanted = set(index.get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        return bool(wanted) and wanted <= names
    return any(n.endswith(".safetensors") for n in names)


def _walk(root: Path) -> dict:
    """Regular files under root (following the cache's symlinks), bounded,
    hidden names and partial downloads left out."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        if len(rel_dir.parts) > 3:
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith((".incomplete", ".tmp", ".lock")):
                continue
            rel = (rel_dir / name).as_posix()
            if not FILE_NAME.match(rel):
                continue
            path = Path(dirpath) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue
            found[rel] = HeldFile(rel, path, size)
            if len(found) >= MAX_FILES:
                return found
    return found


class DigestCache:
    """SHA-256 of files that carry none in their name, computed once and
    kept in the data dir, keyed by path, size and modification time."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._entries: Optional[dict] = None

    def _load(self) -> dict:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    @staticmethod
    def _key(path: Path) -> tuple[str, str]:
        st = path.stat()
        return str(path), f"{st.st_size}:{st.st_mtime_ns}"

    def get(self, path: Path) -> str:
        with self._lock:
            try:
                name, stamp = self._key(path)
            except OSError:
                return ""
            entry = self._load().get(name)
            return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp else ""

    def compute(self, path: Path) -> str:
        """Hash the file (outside the lock: it may take a while) and keep it."""
        name, stamp = self._key(path)
        digest = hash_file(path)
        if self._key(path) != (name, stamp):
            return ""  # changed while it was read
        with self._lock:
            entries = self._load()
            entries[name] = [stamp, digest]
            for stale in [k for k in entries if not Path(k).exists()]:
                del entries[stale]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(entries))
            tmp.replace(self.path)
        return digest


def hash_file(path: Path, block: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def default_hf_cache() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, read
    when asked (huggingface_hub's constants freeze at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


class Store:
    """Every checkpoint this node holds, rescanned on demand and at most
    every `rescan_s` for lookups (a fetch that completes calls refresh)."""

    def __init__(self, data_dir: Path, models_dirs: Iterable = (), hf_cache: Optional[Path] = None,
                 rescan_s: float = 2.0):
        self.data_dir = Path(data_dir)
        self.exod_dir = self.data_dir / "models"
        self.shards_dir = self.data_dir / "shards"
        self.models_dirs = [Path(d).expanduser() for d in models_dirs]
        self.hf_cache = Path(hf_cache) if hf_cache else default_hf_cache()
        self.digests = DigestCache(self.data_dir / "digests.json")
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._holdings: list[Holding] = []
        self._scanned_at = 0.0

    # ---------------------------------------------------------------- scanning

    def refresh(self) -> list[Holding]:
        holdings = [*self._scan_hf_cache(), *self._scan_folders(self.exod_dir, "exod"),
                    *(h for d in self.models_dirs for h in self._scan_folders(d, "models-dir")),
                    *self._scan_shards()]
        for holding in holdings:
            for f in holding.files.values():
                if not f.sha256:
                    f.sha256 = self.digests.get(f.path)
        holdings = holdings[:MAX_HOLDINGS]
        with self._lock:
            self._holdings = holdings
            self._scanned_at = time.monotonic()
        return holdings

    def holdings(self, max_age_s: Optional[float] = None) -> list[Holding]:
        age = self.rescan_s if max_age_s is None else max_age_s
        with self._lock:
            fresh = time.monotonic() - self._scanned_at <= age and self._scanned_at
            if fresh:
                return list(self._holdings)
        return self.refresh()

    def _scan_hf_cache(self) -> list[Holding]:
        if not self.hf_cache.is_dir():
            return []
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.utils import CacheNotFound

        try:
            info = scan_cache_dir(self.hf_cache)
        except (CacheNotFound, OSError):
            return []
        holdings = []
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model" or not REPO_ID.match(repo.repo_id) or not _clean_id(repo.repo_id):
                continue
            for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
                files = {}
                for f in revision.files:
                    rel = f.file_path.relative_to(revision.snapshot_path).as_posix()
                    if not FILE_NAME.match(rel):
                        continue
                    # The blob's name is its etag: an LFS file's is its sha256.
                    etag = f.blob_path.name
                    files[rel] = HeldFile(rel, f.file_path, f.size_on_disk, etag if SHA256.match(etag) else "")
                    if len(files) >= MAX_FILES:
                        break
                holdings.append(Holding(repo.repo_id, revision.commit_hash, revision.snapshot_path, "hf-cache",
                                        files, is_complete(revision.snapshot_path, files),
                                        refs=tuple(sorted(revision.refs))))
        return holdings

    def _scan_folders(self, base: Path, store: str) -> list[Holding]:
        """base/name and base/org/name folders that hold a config.json."""
        if not base.is_dir():
            return []
        found = []
        for first in sorted(p for p in base.iterdir() if p.is_dir() and PLAIN_ID.match(p.name)):
            if (first / "config.json").is_file():
                found.append((first.name, first))
                continue
            for second in sorted(p for p in first.iterdir() if p.is_dir() and PLAIN_ID.match(p.name)):
                if (second / "config.json").is_file():
                    found.append((f"{first.name}/{second.name}", second))
        holdings = []
        for model_id, root in found:
            if not _clean_id(model_id):
                continue
            files = _walk(root)
            revision = ""
            try:
                revision = (root / REVISION_FILE).read_text().strip()
            except OSError:
                pass
            if not COMMIT.match(revision):
                revision = ""
            holdings.append(Holding(model_id, revision, root, store, files, is_complete(root, files)))
        return holdings

    def _scan_shards(self) -> list[Holding]:
        holdings = []
        if not self.shards_dir.is_dir():
            return holdings
        for manifest in sorted(self.shards_dir.glob(f"*/*/*/*/{SHARD_MANIFEST}")):
            try:
                shard = json.loads(manifest.read_text())
                model_id, revision = shard["model_id"], shard.get("revision", "")
            except (OSError, ValueError, KeyError, TypeError):
                continue
            root = manifest.parent
            files = _walk(root)
            holdings.append(Holding(model_id, revision, root, "shard", files, False, shard=shard))
        return holdings

    # ---------------------------------------------------------------- lookups

    def find(self, model_id: str, revision: str = "", complete: bool = True) -> Optional[Holding]:
        """The checkpoint to run or serve: a complete one unless asked
        otherwise; for no revision, the one the HF cache's main names, else
        any."""
        candidates = [h for h in self.holdings() if h.store != "shard" and h.model_id == model_id
                      and (not revision or h.revision == revision or revision in h.refs)
                      and (h.complete or not complete)]
        if not candidates:
            return None
        return min(candidates, key=lambda h: (not h.complete, "main" not in h.refs, h.store != "hf-cache"))

    def served_file(self, model_id: str, revision: str, name: str) -> Optional[HeldFile]:
        """A file peers may read: in the file list of a (non-shard) holding of
        that model and revision. Anything else is None, whatever the name."""
        if not FILE_NAME.match(name):
            return None
        for attempt in (0, 1):  # a fetch may have just completed: look again once
            for h in self.holdings(max_age_s=None if attempt == 0 else 0):
                if h.store == "shard" or h.model_id != model_id or (revision and h.revision != revision):
                    continue
                held = h.files.get(name)
                if held is not None:
                    return held
        return None

    def shards(self, model_id: str) -> list[Holding]:
        return [h for h in self.holdings() if h.store == "shard" and h.model_id == model_id]

    def proto(self) -> list[pb.ModelHolding]:
        return [h.to_proto() for h in self.holdings()]

    def missing_digests(self) -> list[Path]:
        """Files whose sha256 is not known yet (computed once, then cached)."""
        return [f.path for h in self.holdings() if h.store != "shard" for f in h.files.values() if not f.sha256]

    # ---------------------------------------------------------------- where new things go

    def exod_path(self, model_id: str) -> Path:
        """Where the exod store keeps model_id (checked: never outside it)."""
        if not (REPO_ID.match(model_id) or PLAIN_ID.match(model_id)) or "@" in model_id or not _clean_id(model_id):
            raise ModelError(f"not a model id: {model_id!r}")
        return self.exod_dir / model_id

    def shard_path(self, model_id: str, revision: str, key: str) -> Path:
        if not REPO_ID.match(model_id) and not PLAIN_ID.match(model_id):
            raise ModelError(f"not a model id: {model_id!r}")
        if not re.match(r"^[a-z0-9_.-]{1,120}$", key) or ".." in key:
            raise ModelError(f"not a shard key: {key!r}")
        if revision and not COMMIT.match(revision):
            raise ModelError(f"not a commit hash: {revision!r}")
        org, _, name = model_id.rpartition("/")
        return self.shards_dir / (org or "_") / name / (revision or "_") / key


# ------------------------------------------------------------------ this node alone (the CLI)


def spec_here(text: str, store: Store, allow_local: bool = True) -> pb.ModelSpec:
    """What a name is from this machine's files alone (`exod inspect`,
    `exod plan`): a built-in model (its config when not built yet), a
    directory, a checkpoint in a store, or a catalog card. The daemon adds
    peers and the hub (daemon/models.py)."""
    return described_here(text, store, allow_local)[0]


def described_here(text: str, store: Store, allow_local: bool = True) -> tuple:
    """(ModelSpec, Checkpoint or None): the checkpoint when a store holds it."""
    from . import catalog, checkpoint, inventory, synthetic

    name = parse(text, allow_local=allow_local)
    if name.kind == "builtin":
        built = store.exod_dir / name.model_id
        if (built / "config.json").is_file():
            return inventory.from_directory(built), None
        config = {**synthetic.NAMED[name.model_id], "vocab_size": synthetic.TOKENIZER_VOCAB, "torch_dtype": "float32"}
        return inventory.from_config(config, name.model_id), None
    if name.kind == "local":
        return inventory.from_directory(Path(name.model_id)), None
    held = store.find(name.model_id, name.revision)
    if held is not None:
        found = checkpoint.local(name.model_id, held.revision, held.root,
                                 {n: (f.size, f.sha256) for n, f in held.files.items()})
        return found.spec(text.strip()), found
    if name.kind == "catalog":
        return catalog.resolve(name.card), None
    raise ModelError(f"unknown model {text!r}: no checkpoint of {name} is on this machine (looked in "
                     f"{store.hf_cache}, {store.exod_dir}{''.join(', ' + str(d) for d in store.models_dirs)}); "
                     "a running daemon also finds it on its peers and the hub, and `exod pull` fetches it")


def dir_here(text: str, store: Store) -> Path:
    """The folder to run a model from on this machine (`exod run`): a
    built-in model is built on first use."""
    from . import synthetic

    name = parse(text, allow_local=True)
    if name.kind == "builtin":
        return synthetic.ensure_named(name.model_id, store.exod_dir)
    if name.kind == "local":
        return Path(name.model_id)
    held = store.find(name.model_id, name.revision)
    if held is None:
        raise ModelError(f"no complete checkpoint of {name} is on this machine (nor is it a directory, or a "
                         f"built-in model: {', '.join(synthetic.NAMED)}); `exod pull {text}` fetches it")
    return held.root
