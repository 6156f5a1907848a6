"""A folder served in the Hugging Face Hub's URL layout, as organisations
run mirrors: enough of the hub for huggingface_hub's downloads, for tests
(no internet). ROOT/org/name/... are the repos' files, each at one commit.

  GET  /api/models/ORG/NAME[/revision/REV]  {"id", "sha", "siblings"}
  HEAD /ORG/NAME/resolve/REV/FILE           X-Repo-Commit, ETag (git sha1, or
                                            the sha256 of an LFS file, with
                                            X-Linked-Etag and X-Linked-Size)
  GET  the same, with Range

It counts the bytes it sends per file (GET /_stats) so that tests can say
which files were downloaded.

  python -m tests.hf_mirror ROOT PORT      (prints {"port": N} when up)"""

import asyncio
import hashlib
import json
import sys
from pathlib import Path

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def commit_of(repo: Path) -> str:
    """A stable 40-hex commit for the repo's current files."""
    h = hashlib.sha1()
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        h.update(path.relative_to(repo).as_posix().encode())
        h.update(str(path.stat().st_size).encode())
    return h.hexdigest()


def etag_of(path: Path) -> str:
    if path.name.endswith(LFS_SUFFIXES):
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.hexdigest()
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_app(root: Path) -> web.Application:
    root = Path(root)
    sent: dict = {}
    # Computed before serving: hashing a large file inside a HEAD would outlast
    # huggingface_hub's 10 s metadata timeout.
    etags = {str(f): etag_of(f) for f in root.rglob("*") if f.is_file()}

    def repo_of(request):
        repo = root / request.match_info["org"] / request.match_info["name"]
        if ".." in repo.parts or not repo.is_dir():
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        return repo

    async def info(request):
        repo = repo_of(request)
        commit = commit_of(repo)
        files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
        return web.json_response({"id": f"{request.match_info['org']}/{request.match_info['name']}",
                                  "modelId": f"{request.match_info['org']}/{request.match_info['name']}",
                                  "sha": commit, "siblings": [{"rfilename": f} for f in files], "private": False})

    async def resolve(request):
        repo = repo_of(request)
        commit = commit_of(repo)
        revision = request.match_info["revision"]
        if revision not in ("main", commit):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        path = repo / request.match_info["file"]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if ".." in Path(request.match_info["file"]).parts or not path.is_file():
            raise web.HTTPNotFound(headers={**headers, "X-Error-Code": "EntryNotFound"})
        key = str(path)
        if key not in etags:
            etags[key] = etag_of(path)
        size = path.stat().st_size
        headers["ETag"] = f'"{etags[key]}"'
        if path.name.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{etags[key]}"'
            headers["X-Linked-Size"] = str(size)
        if request.method == "HEAD":
            headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        start, end = 0, size - 1
        status = 200
        if request.http_range.start is not None or request.http_range.stop is not None:
            r = request.http_range
            start = r.start or 0
            end = min((r.stop or size) - 1, size - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        name = f"{request.match_info['org']}/{request.match_info['name']}/{request.match_info['file']}"
        headers["Content-Length"] = str(end - start + 1)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        with path.open("rb") as f:  # streamed: a checkpoint file may be larger than memory
            f.seek(start)
            left = end - start + 1
            while left > 0:
                block = f.read(min(1 << 20, left))
                if not block:
                    break
                await response.write(block)
                sent[name] = sent.get(name, 0) + len(block)
                left -= len(block)
        await response.write_eof()
        return response

    async def stats(request):
        return web.json_response(sent)

    app = web.Application()
    app.router.add_get("/api/models/{org}/{name}", info)
    app.router.add_get("/api/models/{org}/{name}/revision/{revision}", info)
    app.router.add_get("/{org}/{name}/resolve/{revision}/{file:.+}", resolve)
    app.router.add_get("/_stats", stats)
    return app


async def serve(root: Path, port: int) -> None:
    runner = web.AppRunner(make_app(root), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(json.dumps({"port": site._server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


class Mirror:
    """The mirror on a thread of its own, for in-process tests."""

    def __init__(self, root: Path):
        import threading

        self.root = root
        self.port = 0
        self._ready = threading.Event()
        self._loop = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(make_app(self.root), access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the mirror did not start")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0))
