"""Moving checkpoint bytes between nodes.

Serving (`serve`): a member asks for ranges of one file of a checkpoint this
node holds in a store; the file must be in that holding's file list (never
a path), every range must lie inside it, and each chunk goes out with the
SHA-256 this node computed from its own file.

Fetching (`Fetch`): the parts a rank needs (models/shards.Part) are cut into
jobs of at most JOB_BYTES, each a ByteRange a source can serve; every Up
peer that holds the file is a source, several at once, two streams each.
Each chunk is checked against the source's digest before it is written
where it belongs; a bad chunk sends its job back to the queue, to another
source where there is one. A source that dies leaves its jobs with what
had arrived (ByteRange.skip resumes them), for the other sources, then
for a source of last resort (the hub, daemon/hub.HubSource) or, when none
is left, for the error that names what is missing and where it was being
fetched from. Nothing here decides where bytes go: the writer does
(models/shards.ShardWriter, or whole files for a pull)."""

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc
import structlog

from exod.models.shards import Part, read_part
from exod.proto import exod_pb2 as pb

log = structlog.get_logger("exod.fetch")

CHUNK_BYTES = 1 << 20          # per message: far below the 4 MiB gRPC limit
JOB_BYTES = 16 << 20           # one job: resumable unit
REQUEST_BYTES = 64 << 20       # jobs per request, at most this many bytes
STREAMS_PER_SOURCE = 2
MAX_RANGES = 4096              # per request (server side)
MAX_REQUEST_BYTES = 1 << 30    # per request (server side)
MAX_SERVING = 16               # concurrent ReadModelFile streams on one node
MAX_BAD_CHUNKS = 3             # per job and source, before that source is dropped for it
STALL_S = 30.0                 # a stream that delivers nothing this long is a dead source
# A test hook: corrupt this many full-size served chunks (bulk data, not
# headers) after their digests are computed, as a flipped byte in transit
# would (TLS would catch a real one on the wire; this reaches the
# receiver's own check).
CORRUPT_ENV = "EXOD_TEST_CORRUPT_SERVED_CHUNKS"
# A test hook: once this node has served this many bytes, every stream ends
# with an error, as a node killed mid-transfer would leave its readers.
FAIL_ENV = "EXOD_TEST_FAIL_SERVING_AFTER_BYTES"


class FetchError(Exception):
    pass


class DigestMismatch(Exception):
    pass


# ------------------------------------------------------------------ serving


def range_problem(r: pb.ByteRange, size: int) -> Optional[str]:
    count = max(r.count, 1)
    stride = r.stride or r.length
    if r.length == 0:
        return "an empty range"
    if count > 1 and stride < r.length:
        return "blocks overlap (stride below length)"
    if r.offset + (count - 1) * stride + r.length > size:
        return f"a range ends beyond the file ({size} bytes)"
    if r.skip > r.length * count:
        return "skip beyond the range"
    return None


class Server:
    """The serving side of ReadModelFile, one per node."""

    def __init__(self, store):
        self.store = store
        self.serving = 0
        self.bytes_served = 0  # since start: what peers fetched from this node
        self._corrupt = int(os.environ.get(CORRUPT_ENV, "0") or 0)
        self._fail_after = int(os.environ.get(FAIL_ENV, "0") or 0)

    def check(self, request: pb.ReadFileRequest):
        """(file, None) or (None, (grpc status, message))."""
        if len(request.ranges) > MAX_RANGES:
            return None, (grpc.StatusCode.INVALID_ARGUMENT, f"over {MAX_RANGES} ranges")
        held = self.store.served_file(request.model_id, request.revision, request.file)
        if held is None:
            return None, (grpc.StatusCode.NOT_FOUND,
                          f"this node holds no file {request.file[:200]!r} of {request.model_id[:200]}"
                          f"{'@' + request.revision[:64] if request.revision else ''} in a store")
        total = 0
        for r in request.ranges:
            problem = range_problem(r, held.size)
            if problem:
                return None, (grpc.StatusCode.OUT_OF_RANGE, problem)
            total += r.length * max(r.count, 1) - r.skip
        if total > MAX_REQUEST_BYTES:
            return None, (grpc.StatusCode.INVALID_ARGUMENT, f"over {MAX_REQUEST_BYTES} bytes in one request")
        return held, None

    def _chunks(self, fd: int, request: pb.ReadFileRequest):
        for index, r in enumerate(request.ranges):
            for position, data in read_part(fd, (r.offset, r.length, r.stride, r.count), r.skip, CHUNK_BYTES):
                digest = hashlib.sha256(data).digest()
                if self._corrupt > 0 and len(data) == CHUNK_BYTES:  # bulk data, not a header or config
                    self._corrupt -= 1
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                yield pb.FileChunk(range=index, position=position, data=data, sha256=digest)

    async def stream(self, held, request: pb.ReadFileRequest):
        """Chunks, each read and hashed in a worker thread: the event loop
        keeps answering heartbeats while a large file is served."""
        fd = await asyncio.to_thread(os.open, held.path, os.O_RDONLY)
        chunks = self._chunks(fd, request)
        self.serving += 1
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    return
                if self._fail_after and self.bytes_served >= self._fail_after:
                    raise OSError(f"{FAIL_ENV}: serving stopped after {self.bytes_served} bytes")
                self.bytes_served += len(chunk.data)
                yield chunk
        finally:
            self.serving -= 1
            chunks.close()
            os.close(fd)


# ------------------------------------------------------------------ sources


@dataclass
class Job:
    part: int               # index into the fetch's parts
    start: int              # where this job's bytes start within the part
    rng: tuple              # (offset, length, stride, count) in the source file
    size: int
    done: int = 0           # bytes received, from the start
    bad: dict = field(default_factory=dict)  # source name -> bad chunks

    @property
    def left(self) -> int:
        return self.size - self.done


def jobs_of(parts: list, job_bytes: int = JOB_BYTES) -> list[Job]:
    """Each part as ranges a source can serve, none over job_bytes (a block
    larger than that is cut inside; small blocks are grouped)."""
    jobs = []
    for index, p in enumerate(parts):
        if p.count <= 1 or p.length >= job_bytes:
            for b in range(max(p.count, 1)):
                base = p.offset + b * p.stride
                for a in range(0, p.length, job_bytes):
                    n = min(job_bytes, p.length - a)
                    jobs.append(Job(index, b * p.length + a, (base + a, n, n, 1), n))
        else:
            per = max(1, job_bytes // p.length)
            for b in range(0, p.count, per):
                k = min(per, p.count - b)
                jobs.append(Job(index, b * p.length, (p.offset + b * p.stride, p.length, p.stride, k), k * p.length))
    return jobs


class Source:
    """Where a file's bytes can come from. A source of last resort (the hub)
    takes a job only when no other live source can: peers are faster and
    cost no one's quota, so it serves what they lack or what they left when
    they failed."""

    name = "?"
    node_id = ""
    last_resort = False

    def has(self, file: str) -> bool:
        raise NotImplementedError

    async def read(self, file: str, jobs: list[Job]):
        """Yields (job, position within the job, data), each checked."""
        raise NotImplementedError
        yield


class LocalSource(Source):
    """A file on this node (a partial checkpoint in a store): read, not sent."""

    def __init__(self, root, files: set, name: str = "local"):
        self.root, self.files, self.name = root, files, name

    def has(self, file: str) -> bool:
        return file in self.files

    async def read(self, file, jobs):
        fd = await asyncio.to_thread(os.open, os.path.join(self.root, file), os.O_RDONLY)
        try:
            for job in jobs:
                chunks = read_part(fd, job.rng, job.done, CHUNK_BYTES)
                while (item := await asyncio.to_thread(next, chunks, None)) is not None:
                    position, data = item
                    yield job, position, data
        finally:
            os.close(fd)


class PeerSource(Source):
    """A peer that publishes the file in its record."""

    def __init__(self, node, node_id: str, name: str, model_id: str, revision: str, files: set):
        self.node, self.node_id, self.name = node, node_id, name
        self.model_id, self.revision, self.files = model_id, revision, files

    def has(self, file: str) -> bool:
        return file in self.files

    async def read(self, file, jobs):
        address = self.node._address_of(self.node_id)
        if address is None:
            raise FetchError(f"no address for node {self.name}")
        request = pb.ReadFileRequest(model_id=self.model_id, revision=self.revision, file=file)
        for job in jobs:
            offset, length, stride, count = job.rng
            request.ranges.append(pb.ByteRange(offset=offset, length=length, stride=stride, count=count, skip=job.done))
        call = self.node._stub(address).ReadModelFile(request, timeout=max(60.0, sum(j.left for j in jobs) / 1e6))
        try:
            while True:
                chunk = await asyncio.wait_for(call.read(), STALL_S)
                if chunk is grpc.aio.EOF:
                    return
                if chunk.range >= len(jobs):
                    raise FetchError(f"node {self.name} sent a chunk of a range it was not asked for")
                yield jobs[chunk.range], chunk.position, (chunk.data, chunk.sha256)
        finally:
            call.cancel()


# ------------------------------------------------------------------ fetching


@dataclass
class Progress:
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    sources: set = field(default_factory=set)
    window: list = field(default_factory=list)  # (time, done) over the last seconds

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        self.window.append((now, self.done))
        while len(self.window) > 2 and now - self.window[0][0] > 3.0:
            self.window.pop(0)

    @property
    def rate(self) -> float:
        if len(self.window) >= 2:
            (t0, d0), (t1, d1) = self.window[0], self.window[-1]
            if t1 > t0:
                return (d1 - d0) / (t1 - t0)
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def proto(self, deadline_s: float = 0.0) -> pb.Download:
        rate = self.rate
        return pb.Download(bytes_done=self.done, bytes_total=self.total, rate_bytes_per_s=rate,
                           source=", ".join(sorted(self.sources)),
                           eta_s=(self.total - self.done) / rate if rate > 0 else 0.0, deadline_s=deadline_s)


def _check_and_write(writer, job: Job, position: int, payload) -> int:
    """Runs in a worker thread: hashing and writing release the GIL."""
    if isinstance(payload, tuple):
        data, digest = payload
        if hashlib.sha256(data).digest() != digest:
            raise DigestMismatch(f"chunk at {job.start + position} of part {job.part}")
    else:
        data = payload
    if position != job.done or len(data) > job.left:
        raise FetchError(f"out-of-order chunk: at {position}, expected {job.done}")
    writer.write(job.part, job.start + position, data)
    return len(data)


class Fetch:
    """Fills a writer's parts from sources. `sources(file)` lists who has a
    file; `on_progress` is called at most every `report_s`."""

    def __init__(self, parts: list, writer, sources: list, on_progress: Optional[Callable] = None,
                 report_s: float = 0.5, describe: str = ""):
        self.parts = parts
        self.writer = writer
        self.sources = sources
        self.jobs = jobs_of(parts)
        self.pending = list(self.jobs)
        self.progress = Progress(sum(j.size for j in self.jobs))
        self.on_progress = on_progress
        self.report_s = report_s
        self.describe = describe
        self.failed: dict = {}  # source name -> why it was dropped
        # Called once, with the bytes still missing, when a source of last
        # resort first takes a job: it is slower, so a deadline planned
        # from the peers' rates is planned again (daemon/models.Deadline).
        self.on_last_resort: Optional[Callable[[int], None]] = None
        self._fell_back = False
        self._reported = 0.0
        self._wake = asyncio.Event()

    def _take(self, source: Source) -> tuple:
        """The next jobs of one file this source has and has not failed."""
        batch, file, size = [], None, 0
        for job in list(self.pending):
            f = self.parts[job.part].file
            if not source.has(f) or job.bad.get(source.name, 0) >= MAX_BAD_CHUNKS:
                continue
            if source.last_resort and any(not o.last_resort and o.name not in self.failed and o.has(f)
                                          and job.bad.get(o.name, 0) < MAX_BAD_CHUNKS for o in self.sources):
                continue  # a live source can serve it
            if job.bad.get(source.name) and any(o is not source and o.name not in self.failed and o.has(f)
                                                and not job.bad.get(o.name) for o in self.sources):
                continue  # it sent this job corrupt: another source gets it
            if file is None:
                file = f
            if f != file or (batch and size + job.left > REQUEST_BYTES):
                continue
            batch.append(job)
            size += job.left
            self.pending.remove(job)
        return file, batch

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress and (force or now - self._reported >= self.report_s):
            self._reported = now
            self.on_progress(self.progress)

    async def _worker(self, source: Source, busy: dict) -> None:
        while source.name not in self.failed:
            file, batch = self._take(source)
            if not batch:
                # Nothing for this source now. Another stream's jobs may come
                # back (its source failed): wait while any stream is busy.
                if not any(busy.values()):
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                continue
            if source.last_resort and not self._fell_back:
                self._fell_back = True
                if self.on_last_resort is not None:
                    self.on_last_resort(sum(j.left for j in self.pending) + sum(j.left for j in batch))
            busy[source.name] = busy.get(source.name, 0) + 1
            self.progress.sources.add(source.name)
            try:
                async with contextlib.aclosing(source.read(file, batch)) as chunks:
                    async for job, position, payload in chunks:
                        try:
                            n = await asyncio.to_thread(_check_and_write, self.writer, job, position, payload)
                        except DigestMismatch as e:
                            job.bad[source.name] = job.bad.get(source.name, 0) + 1
                            log.warning("a chunk did not match its digest; fetching it again", source=source.name,
                                        file=file, detail=str(e))
                            break  # this request's later chunks are suspect too: ask again
                        job.done += n
                        self.progress.add(n)
                        self._report()
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError, FetchError) as e:
                why = e.details() if isinstance(e, grpc.aio.AioRpcError) else (str(e) or type(e).__name__)
                if isinstance(e, grpc.aio.AioRpcError):
                    why = f"{e.code().name}: {why}"
                self.failed[source.name] = why
                log.warning("a source failed; its jobs go to the others", source=source.name, reason=why)
            finally:
                busy[source.name] -= 1
                if busy[source.name] == 0:
                    self.progress.sources.discard(source.name)
                self.pending.extend(j for j in batch if j.left > 0)
                self._wake.set()

    async def run(self) -> None:
        busy: dict = {}
        # Sources of last resort start last: their workers find the others
        # busy and wait for jobs those leave, instead of ending at once.
        ordered = sorted(self.sources, key=lambda s: s.last_resort)
        workers = [asyncio.create_task(self._worker(s, busy)) for s in ordered for _ in range(STREAMS_PER_SOURCE)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        self._report(force=True)
        if self.pending:
            missing = sum(j.left for j in self.pending)
            files = sorted({self.parts[j.part].file for j in self.pending})
            tried = "; ".join(f"{name}: {why}" for name, why in sorted(self.failed.items()))
            bad = sorted({s for j in self.pending for s, n in j.bad.items() if n >= MAX_BAD_CHUNKS})
            if bad:
                tried = (tried + "; " if tried else "") + f"corrupt data from {', '.join(bad)}"
            raise FetchError(f"{missing} bytes{' of ' + self.describe if self.describe else ''} are missing, from "
                             f"{', '.join(files)[:300]}: no source is left"
                             + (f" (was fetching from {tried})" if tried else
                                f" (sources: {', '.join(s.name for s in self.sources) or 'none'})"))
