"""The Hugging Face Hub, or a mirror at HF_ENDPOINT, as the source of last
resort: used only when no Up peer holds what a rank needs. Everything goes
through huggingface_hub, so HF_ENDPOINT, HF_HUB_OFFLINE and the user's
token (HF_TOKEN or `hf auth login`) apply as they do for mlx-lm. Only the
files that hold the needed tensors are downloaded (the safetensors index
says which), into the Hugging Face cache, where the store then finds them.
Blocking: the daemon calls these from worker threads."""

import os
from pathlib import Path
from typing import Callable, Optional

from exod.models import ModelError
from exod.models.checkpoint import INDEX, Checkpoint, parse_config, parse_index, weight_files_of
from exod.models.safetensors_header import header_length, parse_layout
from exod.models.store import SHA256

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


def download(model_id: str, commit: str, names: list, cache_dir: Path,
             on_bytes: Callable[[int], None], stop: Callable[[], bool] = lambda: False) -> Path:
    """Download these files into the HF cache; returns the snapshot folder.
    on_bytes(n) as they arrive; stop() ends it between files."""
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
    except _errors() as e:
        raise HubError(f"downloading {model_id} from the hub ({_endpoint() or 'huggingface.co'}): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if path is None:
        raise HubError("nothing to download")
    # The snapshot folder is the one above the file (names may hold a subfolder).
    depth = len(Path(names[-1]).parts)
    return path.parents[depth - 1]
