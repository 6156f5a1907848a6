"""The Hugging Face Hub, or a mirror at HF_ENDPOINT, as the source of last
resort: used only for what no Up peer can serve. Everything goes through
huggingface_hub, so HF_ENDPOINT, HF_HUB_OFFLINE and the user's token
(HF_TOKEN or `hf auth login`) apply as they do for mlx-lm. Only the files
that hold the needed tensors are fetched (the safetensors index says
which): whole, into the Hugging Face cache, where the store then finds
them; or, where a rank needs clearly less than a file (a tensor slice),
only those bytes, by range reads (HubSource), straight into the shard.
Blocking functions: the daemon calls these from worker threads."""

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

from exod.models import ModelError
from exod.models.checkpoint import INDEX, Checkpoint, parse_config, parse_index, weight_files_of
from exod.models.safetensors_header import header_length, parse_layout
from exod.models.store import SHA256

from . import fetch

TIMEOUT_S = 30.0


class HubError(Exception):
    pass


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _endpoint() -> Optional[str]:
    # huggingface_hub freezes HF_ENDPOINT at import; read it when asked.
    return os.environ.get("HF_ENDPOINT") or None


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint())


def _errors():
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError)


def _range(url: str, start: int, length: int) -> bytes:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(headers={"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"})
    response = get_session().get(url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True)
    hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200:  # a server without ranges sent it all
        data = data[start:start + length]
    if len(data) != length:
        raise HubError(f"{url}: asked for {length} bytes at {start}, got {len(data)}")
    return data


def checkpoint(model_id: str, revision: str, cache_dir: Path) -> Checkpoint:
    """The checkpoint's config, index, file sizes and digests, and each
    weight file's header (two small range reads each): kilobytes."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata

    if offline():
        raise HubError("HF_HUB_OFFLINE is set: the hub is not asked")
    try:
        info = _api().model_info(model_id, revision=revision or None, timeout=TIMEOUT_S)
        commit = info.sha or revision
        names = sorted(s.rfilename for s in (info.siblings or []))
        config = parse_config(Path(hf_hub_download(model_id, "config.json", revision=commit, cache_dir=cache_dir,
                                                   endpoint=_endpoint())).read_bytes(), model_id)
        index = None
        if INDEX in names:
            index = parse_index(Path(hf_hub_download(model_id, INDEX, revision=commit, cache_dir=cache_dir,
                                                     endpoint=_endpoint())).read_bytes(), model_id)
        files = {}
        for name in names:
            meta = get_hf_file_metadata(hf_hub_url(model_id, name, revision=commit, endpoint=_endpoint()),
                                        timeout=TIMEOUT_S, endpoint=_endpoint())
            etag = (meta.etag or "").strip('"')
            files[name] = (int(meta.size or 0), etag if SHA256.match(etag) else "")
        layouts = {}
        for name in weight_files_of(files, index):
            if name not in files:
                raise HubError(f"{model_id}: the index names {name}, which the repo lacks")
            url = hf_hub_url(model_id, name, revision=commit, endpoint=_endpoint())
            size = files[name][0]
            length = header_length(_range(url, 0, 8), size, name)
            layouts[name] = parse_layout(_range(url, 8, length), size, name)
    except _errors() as e:
        raise HubError(f"the hub ({_endpoint() or 'huggingface.co'}) did not describe {model_id}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    except ModelError as e:
        raise HubError(f"the hub's {model_id}: {e}") from None
    if not layouts:
        raise HubError(f"{model_id} on the hub has no safetensors files")
    return Checkpoint(model_id, commit, config, files, layouts)


def _verify(path: Path, name: str, want: str) -> None:
    """A downloaded file against the sha256 it was planned with:
    huggingface_hub names an LFS blob by its etag without hashing what
    arrived, and the store then publishes that name as its digest. A file
    that does not match is removed, blob and link, not left to be served."""
    from exod.models.store import hash_file

    got = hash_file(path)
    if got != want:
        blob = path.resolve()
        for p in (path, blob):
            with contextlib.suppress(OSError):
                p.unlink()
        raise HubError(f"{name}: what arrived does not match its sha256 {want[:12]}… (got {got[:12]}…); removed")


def download(model_id: str, commit: str, names: list, cache_dir: Path,
             on_bytes: Callable[[int], None], stop: Callable[[], bool] = lambda: False,
             digests: Optional[dict] = None) -> Path:
    """Download these files into the HF cache; returns the snapshot folder.
    on_bytes(n) as they arrive; stop() ends it between files; each file
    with a digest in `digests` is checked against it."""
    from huggingface_hub import hf_hub_download
    from tqdm.auto import tqdm

    class Counted(tqdm):  # huggingface_hub reports each block through its progress bar
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                on_bytes(int(n))
            return super().update(n)

    if offline():
        raise HubError("HF_HUB_OFFLINE is set: the hub is not asked")
    path = None
    try:
        for name in names:
            if stop():
                raise HubError("stopped")
            path = Path(hf_hub_download(model_id, name, revision=commit, cache_dir=cache_dir, endpoint=_endpoint(),
                                        tqdm_class=Counted))
            if (digests or {}).get(name):
                _verify(path, name, digests[name])
    except _errors() as e:
        raise HubError(f"downloading {model_id} from the hub ({_endpoint() or 'huggingface.co'}): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if path is None:
        raise HubError("nothing to download")
    # The snapshot folder is the one above the file (names may hold a subfolder).
    depth = len(Path(names[-1]).parts)
    return path.parents[depth - 1]


# ------------------------------------------------------------------ range reads
#
# A rank that needs part of each tensor of a file (tensor and moe_tensor
# slices) reads those bytes from the hub by HTTP range requests instead of
# downloading the file. Requests are few and large: the needed blocks, in
# file order, are grouped into spans, each one request, and the bytes
# between blocks of a span are read and dropped. A gap joins a span when it
# is small in bytes (under GAP_BYTES: about 10 ms at the 100 Mbit/s the
# planner assumes for the hub, less than a request's round trip) or small
# relative to the span (the span's dropped bytes stay under WASTE of it).
# Slices along the last axis (blocks of a few hundred bytes, one per row)
# become one span per MAX_SPAN; slices along a leading axis (one block per
# expert, half of each) stay one request per block.

GAP_BYTES = 128 << 10
WASTE = 0.25
MAX_SPAN = 16 << 20            # one request: its bytes are held in memory, and are what a cut loses
RANGE_BELOW = 0.75             # range reads when they move less than this much of the file


def runs(rng: tuple, skip: int = 0, max_span: int = MAX_SPAN, gap_bytes: int = GAP_BYTES) -> list:
    """The bytes of a (offset, length, stride, count) range from `skip` on,
    as (file offset, position in the range, length, stride, count) runs,
    each read as one extent when its gaps are small, else block by block,
    and none over max_span from its first byte to its last."""
    offset, length, stride, count = rng
    count, stride = max(count, 1), stride or length
    total, out, position = length * count, [], skip
    while position < total:
        block, within = divmod(position, length)
        start = offset + block * stride + within
        if within or length > max_span or count - block == 1:  # a piece of one block
            n = min(length - within, max_span)
            out.append((start, position, n, n, 1))
            position += n
            continue
        gap = stride - length
        if gap > gap_bytes and gap > WASTE * stride:  # far apart: block by block
            k = 1
        else:
            k = min(count - block, max(1, (max_span - length) // stride + 1))
        out.append((start, position, length, stride, k))
        position += k * length
    return out


def extent(run: tuple) -> tuple:
    start, _, length, stride, count = run
    return start, start + (count - 1) * stride + length


def spans(items: list, max_span: int = MAX_SPAN, gap_bytes: int = GAP_BYTES) -> list:
    """Group (run, tag) items, in file order, into (start, end, items) spans:
    one request each, under the gap rules above."""
    out = []
    for item in sorted(items, key=lambda i: i[0][0]):
        lo, hi = extent(item[0])
        needed = item[0][2] * item[0][4]
        if out:
            start, end, members, kept = out[-1]
            gap = lo - end
            joined = hi - start
            if 0 <= gap and joined <= max_span and (
                    gap <= gap_bytes or joined - (kept + needed) <= WASTE * joined):
                out[-1] = (start, hi, members + [item], kept + needed)
                continue
        out.append((lo, hi, [item], needed))
    return [(start, end, members) for start, end, members, _ in out]


def span_bytes(rngs: list) -> int:
    """What range reads of these ranges would move: their spans' bytes."""
    return sum(end - start for start, end, _ in spans([(r, None) for rng in rngs for r in runs(rng)]))


def cut(data, start: int, run: tuple) -> bytes:
    """A run's bytes out of a span read from `start`."""
    import numpy as np

    lo, _, length, stride, count = run
    at = lo - start
    if count == 1 or stride == length:
        return bytes(data[at:at + length * count])
    raw = np.frombuffer(data, dtype=np.uint8, count=(count - 1) * stride + length, offset=at)
    return np.lib.stride_tricks.as_strided(raw, shape=(count, length), strides=(stride, 1)).tobytes()


def ranged(parts: list, sizes: dict, files) -> set:
    """The files of `files` that range reads serve with fewer bytes than a
    download (under RANGE_BELOW of the file); the others are downloaded whole
    (into the HF cache, where a later placement finds them too)."""
    by_file: dict = {}
    for p in parts:
        by_file.setdefault(p.file, []).append((p.offset, p.length, p.stride, p.count))
    return {f for f in files if f in by_file and span_bytes(by_file[f]) < RANGE_BELOW * sizes[f]}


def _filesystem():
    # HfFileSystem honours an endpoint given at runtime (HF_ENDPOINT is read
    # here, not at import) and the user's token; its files fetch exactly
    # the asked bytes with cache_type="none", one Range request per read,
    # retried on 5xx and network errors (http_backoff). Against the test
    # mirror it is as fast as `_range` once open (three spans of 5 MB: 9 ms
    # against 6 ms); opening a file the first time asks for the repo's info
    # once (cached by the filesystem). `size=` spares the paths-info call,
    # which mirrors need not serve.
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=_endpoint())


def _file_identity(model_id: str, revision: str, name: str) -> tuple:
    """(size, sha256 or "") the hub gives for a file: its LFS etag."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata

    meta = get_hf_file_metadata(hf_hub_url(model_id, name, revision=revision, endpoint=_endpoint()),
                                timeout=TIMEOUT_S, endpoint=_endpoint())
    etag = (meta.etag or "").strip('"')
    return int(meta.size or 0), etag if SHA256.match(etag) else ""


def read_spans(model_id: str, revision: str, name: str, size: int, spans_: list):
    """Yields (start, bytes) of each (start, end, _) span, one range request
    each, every one checked for its length. Blocking."""
    fs = _filesystem()
    with fs.open(f"{model_id}/{name}", "rb", revision=revision, block_size=MAX_SPAN, cache_type="none",
                 size=size) as f:
        for start, end, _ in spans_:
            f.seek(start)
            data = f.read(end - start)
            if len(data) != end - start:
                raise HubError(f"{name}: asked for {end - start} bytes at {start}, got {len(data)}")
            yield start, data


class HubSource(fetch.Source):
    """The hub as one source of a fetch: each batch of jobs read as spans
    (range requests) of the file at the checkpoint's revision. A file is
    first checked to be the planned one (its size, and its sha256 where the
    hub gives one as the LFS etag); the hub gives no digest of a range, so a
    range is checked by its length, and its bytes by HTTP(S) and TLS, and no
    more. Last resort by default: it takes what no live peer can serve."""

    def __init__(self, model_id: str, revision: str, files: dict, name: str = "hub", last_resort: bool = True):
        self.model_id, self.revision, self.name = model_id, revision, name
        self.files = files  # name -> (size, sha256 or "") as planned
        self.last_resort = last_resort
        self._checked: set = set()

    def has(self, file: str) -> bool:
        return file in self.files

    def _check(self, file: str) -> None:
        size, sha = self.files[file]
        got_size, got_sha = _file_identity(self.model_id, self.revision, file)
        if got_size != size or (sha and got_sha and sha != got_sha):
            raise HubError(f"{file} on the hub is not the planned one ({got_size} bytes, sha256 "
                           f"{got_sha[:12] or '?'}; planned {size}, {sha[:12] or '?'})")

    async def read(self, file, jobs):
        import httpx

        grouped = spans([(r, job) for job in jobs for r in runs(job.rng, job.done)])
        chunks = None
        try:
            if file not in self._checked:
                await asyncio.to_thread(self._check, file)
                self._checked.add(file)
            chunks = read_spans(self.model_id, self.revision, file, self.files[file][0], grouped)
            for start, _, members in grouped:
                item = await asyncio.to_thread(next, chunks, None)
                if item is None:
                    raise HubError(f"{file}: the reads ended early")
                for run, job in members:
                    yield job, run[1], cut(item[1], start, run)
        except (*_errors(), HubError, httpx.HTTPError) as e:
            raise fetch.FetchError(f"the hub ({_endpoint() or 'huggingface.co'}): {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            if chunks is not None:
                with contextlib.suppress(ValueError):  # still running in its thread: it ends on its own
                    chunks.close()
