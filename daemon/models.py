"""Models on a node and across the cluster.

- What this node holds (models/store.py), published in its signed record
  and kept current: rescanned every few seconds, digests computed once.
- What a name is: a ModelSpec and, for real checkpoints, the checkpoint's
  small parts (config, index, headers) from this node's files, from a peer
  that holds them (kilobytes over ReadModelFile), or from the hub.
- The bytes one rank needs (models/shards.py), fetched before its runner
  starts from every Up peer that holds them, else the hub, into a shard
  checkpoint that the runner loads directly and the next placement of the
  same shard reuses.
- Whole checkpoints for `exod pull`.
- What moving bytes would cost each candidate of a plan."""

import asyncio
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import grpc
import structlog

from exod.models import ModelError, checkpoint as ckpt, shards, store as model_store
from exod.proto import exod_pb2 as pb

from . import fetch, hub

log = structlog.get_logger("exod.models")
MAX_CHECKPOINTS = 32        # described checkpoints kept in memory
UNPINNED_TTL_S = 30.0       # "org/name" without a revision: looked up again after this
META_TIMEOUT_S = 20.0       # a peer's config or header
DISK_MARGIN = 64 << 20      # left free besides what a fetch needs
HUB_RATE = 12.5e6           # bytes/s assumed for the hub when planning (100 Mbit/s)
DEADLINE_FACTOR = 4.0       # Downloading's deadline: this many times the predicted time,
DEADLINE_FLOOR_S = 60.0     # plus this
MIN_RATE = 1e6              # a link slower than this is planned at this rate


class Unavailable(Exception):
    """A rank's bytes cannot be had: the reason names what and from where."""


class Deadline:
    """Downloading's deadline, planned from the sources' measured rates. A
    slower source that takes over (the hub, when the peers fail) plans the
    rest again: the deadline moves out, never in."""

    def __init__(self, seconds: float):
        self.started = time.monotonic()
        self.at = self.started + seconds

    @property
    def seconds(self) -> float:
        return self.at - self.started

    @property
    def left(self) -> float:
        return self.at - time.monotonic()

    def extend(self, seconds_from_now: float) -> None:
        self.at = max(self.at, time.monotonic() + seconds_from_now)


def _describe_bytes(n: int) -> str:
    return f"{n} bytes ({n / 1e9:.2f} GB)" if n >= 1e8 else f"{n} bytes ({n / 1e6:.1f} MB)"


class Models:
    def __init__(self, node):
        self.node = node
        self.store = model_store.Store(node.data_dir, node.settings.models_dirs,
                                       Path(node.settings.hf_cache).expanduser() if node.settings.hf_cache else None)
        self.server = fetch.Server(self.store)
        self._checkpoints: "OrderedDict[tuple, tuple[float, ckpt.Checkpoint]]" = OrderedDict()
        self._describing: dict = {}  # (model_id, revision) -> asyncio.Task

    # ---------------------------------------------------------------- what this node holds

    async def refresh(self) -> list:
        """Rescan the stores and publish what changed."""
        holdings = await asyncio.to_thread(self.store.refresh)
        self.node.publish_models(bounded([h.to_proto() for h in holdings]))
        return holdings

    async def digest_round(self) -> float:
        """One missing file digest at a time, in a worker thread; republished
        once known. Returns the pause before the next round."""
        missing = await asyncio.to_thread(self.store.missing_digests)
        if not missing:
            await self.refresh()
            return 5.0
        try:
            await asyncio.to_thread(self.store.digests.compute, missing[0])
        except OSError as e:
            log.warning("cannot hash a model file", path=str(missing[0]), reason=e.strerror)
            return 5.0
        await self.refresh()
        return 0.0

    def holders(self, model_id: str, revision: str = "", include_self: bool = False) -> list:
        """(node_id, name, ModelHolding) of Up nodes that hold files of the
        checkpoint (shard checkpoints left out: they hold parts)."""
        found = []
        for member in self.node.view.members.values():
            node_id = member.record.profile.node_id
            if member.status != pb.UP or (node_id == self.node.node_id and not include_self):
                continue
            for h in member.record.profile.models:
                if h.store != "shard" and h.model_id == model_id and (not revision or not h.revision
                                                                       or h.revision == revision):
                    found.append((node_id, member.record.profile.name, h))
        return found

    # ---------------------------------------------------------------- names

    def parse(self, text: str, local: bool) -> model_store.ModelName:
        return model_store.parse(text, allow_local=local)

    async def spec(self, text: str, local: bool) -> tuple:
        """(ModelSpec, Checkpoint or None) for a name as a user typed it.
        Raises ModelError when nothing describes it."""
        from exod.models import catalog, inventory, synthetic

        name = self.parse(text, local)
        if name.kind == "builtin":
            built = self.store.exod_dir / name.model_id
            if (built / "config.json").is_file():
                return await asyncio.to_thread(inventory.from_directory, built), None
            config = {**synthetic.NAMED[name.model_id], "vocab_size": synthetic.TOKENIZER_VOCAB,
                      "torch_dtype": "float32"}
            return await asyncio.to_thread(inventory.from_config, config, name.model_id), None
        if name.kind == "local":
            path = Path(name.model_id)
            return await asyncio.to_thread(inventory.from_directory, path), None
        try:
            checkpoint = await self.checkpoint(name.model_id, name.revision)
        except Unavailable as e:
            if name.kind == "catalog":  # a card describes it without any file
                return await asyncio.to_thread(catalog.resolve, name.card), None
            raise ModelError(f"unknown model {text.strip()[:200]!r}: {e}") from None
        spec = await asyncio.to_thread(checkpoint.spec, text.strip())
        return spec, checkpoint

    async def checkpoint(self, model_id: str, revision: str = "") -> ckpt.Checkpoint:
        """The checkpoint's small parts: from this node's files, else a peer
        that holds it, else the hub. Raises Unavailable."""
        key = (model_id, revision)
        cached = self._checkpoints.get(key)
        if cached and (revision or time.monotonic() - cached[0] < UNPINNED_TTL_S):
            self._checkpoints.move_to_end(key)
            return cached[1]
        if not revision:  # any revision described before that the name still means
            for (model, _), (_, known) in reversed(self._checkpoints.items()):
                if model == model_id and self._still_current(known):
                    return known
        task = self._describing.get(key)
        if task is None:
            task = asyncio.ensure_future(self._describe(model_id, revision))
            self._describing[key] = task
            task.add_done_callback(lambda _: self._describing.pop(key, None))
        found = await asyncio.shield(task)
        for k in (key, (model_id, found.revision)):
            self._checkpoints[k] = (time.monotonic(), found)
            self._checkpoints.move_to_end(k)
        while len(self._checkpoints) > MAX_CHECKPOINTS:
            self._checkpoints.popitem(last=False)
        return found

    def _still_current(self, checkpoint: ckpt.Checkpoint) -> bool:
        """An unpinned name still means this revision: the node or the peer
        that would be asked first holds exactly it."""
        held = self.store.find(checkpoint.model_id)
        if held is not None:
            return held.revision == checkpoint.revision
        first = self._ranked_holders(checkpoint.model_id, "")
        return bool(first) and first[0][2].complete and first[0][2].revision == checkpoint.revision

    async def _describe(self, model_id: str, revision: str) -> ckpt.Checkpoint:
        problems = []
        held = self.store.find(model_id, revision)
        if held is not None:
            try:
                return await asyncio.to_thread(
                    ckpt.local, model_id, held.revision, held.root,
                    {n: (f.size, f.sha256) for n, f in held.files.items()})
            except (ModelError, OSError) as e:
                problems.append(f"this node's copy: {e}")
        for node_id, name, holding in self._ranked_holders(model_id, revision):
            try:
                return await self._peer_checkpoint(node_id, holding)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, ModelError, fetch.FetchError) as e:
                why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
                problems.append(f"node {name}: {why}")
        if "/" not in model_id:
            pass  # a store name, not a Hugging Face repo id: the hub has nothing by it
        elif not hub.offline():
            try:
                return await asyncio.to_thread(hub.checkpoint, model_id, revision, self.store.hf_cache)
            except hub.HubError as e:
                problems.append(str(e))
        else:
            problems.append("the hub: HF_HUB_OFFLINE is set")
        raise Unavailable(f"no node holds {model_id}{'@' + revision if revision else ''}"
                          + (f" ({'; '.join(problems)})" if problems else ""))

    def _ranked_holders(self, model_id: str, revision: str) -> list:
        """Complete holdings first, then the revision most complete holders agree on."""
        holders = self.holders(model_id, revision)
        votes: dict = {}
        for _, _, h in holders:
            if h.complete:
                votes[h.revision] = votes.get(h.revision, 0) + 1
        return sorted(holders, key=lambda x: (not x[2].complete, -votes.get(x[2].revision, 0), x[2].revision))

    async def _peer_bytes(self, node_id: str, holding: pb.ModelHolding, file: str, offset: int, length: int) -> bytes:
        """A few bytes of a peer's file, each chunk checked against its
        digest; asked again when one does not match."""
        import hashlib

        address = self.node._address_of(node_id)
        if address is None:
            raise fetch.FetchError("no address for it")
        request = pb.ReadFileRequest(model_id=holding.model_id, revision=holding.revision, file=file,
                                     ranges=[pb.ByteRange(offset=offset, length=length)])
        for _ in range(fetch.MAX_BAD_CHUNKS):
            parts = []
            call = self.node._stub(address).ReadModelFile(request, timeout=META_TIMEOUT_S)
            async for chunk in call:
                if hashlib.sha256(chunk.data).digest() != chunk.sha256:
                    log.warning("a chunk did not match its digest; asking again", file=file, node=node_id[:12])
                    call.cancel()
                    break
                parts.append(chunk.data)
            else:
                data = b"".join(parts)
                if len(data) != length:
                    raise fetch.FetchError(f"{file}: {len(data)} of {length} bytes")
                return data
        raise fetch.FetchError(f"{file}: {fetch.MAX_BAD_CHUNKS} times a chunk did not match its digest")

    async def _peer_checkpoint(self, node_id: str, holding: pb.ModelHolding) -> ckpt.Checkpoint:
        from exod.models.safetensors_header import header_length, parse_layout

        files = {f.name: (f.size, f.sha256) for f in holding.files}
        if "config.json" not in files:
            raise ModelError("it lists no config.json")
        config = ckpt.parse_config(await self._peer_bytes(node_id, holding, "config.json", 0, files["config.json"][0]),
                                   holding.model_id)
        index = None
        if ckpt.INDEX in files:
            if files[ckpt.INDEX][0] > ckpt.MAX_INDEX_BYTES:
                raise ModelError("its index is too large")
            index = ckpt.parse_index(await self._peer_bytes(node_id, holding, ckpt.INDEX, 0, files[ckpt.INDEX][0]),
                                     holding.model_id)
        names = ckpt.weight_files_of(files, index)
        missing = [n for n in names if n not in files]
        if missing or not names:
            raise ModelError(f"it lacks {', '.join(missing[:3]) or 'every weight file'}")

        async def layout(name: str):
            size = files[name][0]
            length = header_length(await self._peer_bytes(node_id, holding, name, 0, 8), size, name)
            return name, parse_layout(await self._peer_bytes(node_id, holding, name, 8, length), size, name)

        layouts = dict(await asyncio.gather(*(layout(n) for n in names)))
        return ckpt.Checkpoint(holding.model_id, holding.revision, config, files, layouts)

    # ---------------------------------------------------------------- a rank's bytes

    def local_root(self, model_id: str, revision: str) -> Optional[Path]:
        held = self.store.find(model_id, revision)
        return held.root if held is not None else None

    def _sources(self, checkpoint: ckpt.Checkpoint, files: set) -> list:
        """This node's partial copies and every Up peer whose copy of a file
        is the one planned (same size, and same digest where both know it)."""
        sources = []
        for h in self.store.holdings():
            if h.store == "shard" or h.model_id != checkpoint.model_id:
                continue
            same = {n for n, f in h.files.items() if n in files and self._same(checkpoint, n, f.size, f.sha256, h.revision)}
            if same:
                sources.append(fetch.LocalSource(str(h.root), same, name=f"{self.node.record.profile.name} (local)"))
        by_node: dict = {}
        for node_id, name, h in self.holders(checkpoint.model_id):
            same = {f.name for f in h.files if f.name in files and self._same(checkpoint, f.name, f.size, f.sha256,
                                                                               h.revision)}
            if same and len(same) > len(by_node.get(node_id, (None, None, set()))[2]):
                by_node[node_id] = (name, h, same)
        for node_id, (name, h, same) in sorted(by_node.items(), key=lambda x: x[1][0]):
            sources.append(fetch.PeerSource(self.node, node_id, name, h.model_id, h.revision, same))
        return sources

    @staticmethod
    def _same(checkpoint: ckpt.Checkpoint, name: str, size: int, sha: str, revision: str) -> bool:
        want_size, want_sha = checkpoint.files.get(name, (None, ""))
        if want_size != size:
            return False
        if want_sha and sha:
            return want_sha == sha
        # Without digests on both sides, only the same revision vouches for it.
        return bool(revision) and revision == checkpoint.revision

    def link_rate(self, node_id: str) -> float:
        """Measured throughput between this node and another, either direction."""
        view = self.node.view
        rates = [r.link.bandwidth_bytes_per_s for k, r in view.links.items() if set(k) == {self.node.node_id, node_id}]
        return max([MIN_RATE, *rates])

    def plan_rank(self, checkpoint: ckpt.Checkpoint, spec: pb.RunnerSpec) -> shards.RankPlan:
        return shards.plan_rank(checkpoint, spec.strategy, spec.rank, spec.world_size, list(spec.pipeline_layers),
                                rank_shares=list(spec.shares),
                                expert_layout=spec.expert_layout if spec.HasField("expert_layout") else None,
                                stage_ranks=list(spec.stage_ranks), stage_strategy=spec.stage_strategy)

    def deadline_s(self, nbytes: int, sources: list, hub_bytes: int = 0) -> float:
        rate = max([MIN_RATE, *(self.link_rate(s.node_id) for s in sources if s.node_id)])
        return DEADLINE_FLOOR_S + DEADLINE_FACTOR * (nbytes / rate + hub_bytes / HUB_RATE)

    @staticmethod
    def hub_deadline_s(nbytes: int) -> float:
        return DEADLINE_FLOOR_S + DEADLINE_FACTOR * nbytes / HUB_RATE

    @staticmethod
    async def within(deadline: "Deadline", work, timed_out: Callable[[], str]):
        """`work`'s result, or Unavailable(timed_out()) once the deadline
        passes; the deadline may move while it runs."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=max(0.0, deadline.left))
                if done:
                    return task.result()
                if deadline.left <= 0:
                    raise Unavailable(timed_out())
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def prepare_rank(self, spec: pb.RunnerSpec, model: str, revision: str,
                           on_progress: Callable[[pb.Download], None]) -> Path:
        """The folder the rank's runner loads: the whole checkpoint where
        this node holds it, else the rank's shard (reused, or fetched now).
        Raises Unavailable with the reason."""
        name = self.parse(model, local=False)
        revision = revision or name.revision
        root = await asyncio.to_thread(self.local_root, name.model_id, revision)
        if root is not None:
            return root
        try:
            checkpoint = await self.checkpoint(name.model_id, revision)
        except Unavailable as e:
            raise Unavailable(f"model {model[:200]} is not on node {self.node.record.profile.name}: {e}") from None
        plan = await asyncio.to_thread(self.plan_rank, checkpoint, spec)
        final = self.store.shard_path(checkpoint.model_id, checkpoint.revision, plan.key)
        if shards.read_manifest(final) is not None:
            log.info("shard already here", key=plan.key)
            return final
        return await self._fetch_shard(checkpoint, plan, final, spec, on_progress)

    def _check_disk(self, where: Path, needed: int, what: str) -> None:
        probe = where
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if needed + DISK_MARGIN > free:
            raise Unavailable(f"not enough disk space on node {self.node.record.profile.name} for {what}: "
                              f"needs {_describe_bytes(needed)}, {_describe_bytes(free)} free in {probe}")

    async def _fetch_shard(self, checkpoint, plan: shards.RankPlan, final: Path, spec: pb.RunnerSpec,
                           on_progress) -> Path:
        sizes = {n: s for n, (s, _) in checkpoint.files.items()}
        side = [(n, sizes[n]) for n in plan.side_files]
        parts = plan.needs.parts
        needed_files = {p.file for p in parts} | {n for n, _ in side}
        sources = self._sources(checkpoint, needed_files)
        orphans = sorted(f for f in needed_files if not any(s.has(f) for s in sources))
        what = f"rank {spec.rank}'s shard of {checkpoint.model_id}"
        # Files no peer holds: those of which this rank needs clearly less than
        # the whole are range-read from the hub into the shard; the others
        # are downloaded whole into the HF cache (where later placements
        # find them too).
        ranged = await asyncio.to_thread(hub.ranged, parts, sizes, set(orphans) - set(plan.side_files)) \
            if orphans and self._hub_usable(checkpoint) else set()
        whole = [f for f in orphans if f not in ranged]
        hub_bytes = sum(sizes[f] for f in whole)
        shard_bytes = sum(p.nbytes for p in parts) + sum(s for _, s in side)
        self._check_disk(final.parent, shard_bytes, what)
        if whole:
            self._check_disk(self.store.hf_cache, hub_bytes, f"{len(whole)} file(s) of {checkpoint.model_id} "
                                                             "from the hub")
        ranged_bytes = sum(p.nbytes for p in parts if p.file in ranged)
        deadline = Deadline(self.deadline_s(shard_bytes - ranged_bytes, sources, hub_bytes + ranged_bytes))
        progress = fetch.Progress(shard_bytes + hub_bytes)
        names = ", ".join(s.name for s in sources) + (", hub" if orphans or self._hub_usable(checkpoint) else "")
        return await self.within(
            deadline, self._transfer(checkpoint, plan, final, sources, whole, side, progress, on_progress, deadline,
                                     what),
            lambda: f"timed out in Downloading after {deadline.seconds:.0f} s: {progress.done} of {progress.total} "
                    f"bytes of {what} had arrived from {names or 'no source'}")

    async def _transfer(self, checkpoint, plan, final, sources, orphans, side, progress, on_progress, deadline,
                        what) -> Path:
        """orphans: the files to download whole from the hub first."""
        if orphans:
            sources.append(await self._from_hub(checkpoint, orphans, progress, on_progress, deadline))
        if self._hub_usable(checkpoint):
            # The hub serves by range reads what no peer holds, and what a peer
            # leaves when it fails mid-fetch (a source of last resort).
            files = {p.file for p in plan.needs.parts} | {n for n, _ in side}
            sources.append(hub.HubSource(checkpoint.model_id, checkpoint.revision,
                                         {n: checkpoint.files[n] for n in files if n in checkpoint.files}))
        writer = await asyncio.to_thread(shards.ShardWriter, final, plan.needs.parts, plan.meta, side)
        job = fetch.Fetch(writer.all_parts, writer, sources, describe=what)
        job.progress = progress  # one count over the hub's files and the shard's parts
        job.on_progress = lambda p: on_progress(p.proto(deadline.seconds))
        job.on_last_resort = lambda left: deadline.extend(self.hub_deadline_s(left))
        log.info("fetching a shard", key=plan.key, bytes=progress.total, sources=[s.name for s in sources])
        try:
            await job.run()
            path = await asyncio.to_thread(writer.commit)
        except fetch.FetchError as e:
            writer.abort()
            raise Unavailable(str(e)) from None
        except BaseException:  # cancelled (stopped, or the deadline): nothing half-written stays
            writer.abort()
            raise
        log.info("shard fetched", key=plan.key, bytes=progress.total,
                 seconds=round(time.monotonic() - progress.started, 2))
        self.node._spawn(self.refresh())
        return path

    @staticmethod
    def _hub_usable(checkpoint) -> bool:
        """The hub may be asked for this checkpoint's bytes: not offline, and
        its id is a Hugging Face repo id (org/name), not a store's name."""
        return not hub.offline() and "/" in checkpoint.model_id

    async def _from_hub(self, checkpoint, names: list, progress: fetch.Progress, on_progress,
                        deadline: Deadline) -> fetch.Source:
        """Files no peer holds, downloaded whole into the HF cache: then
        they are this node's own, a local source."""
        if hub.offline():
            raise Unavailable(f"{', '.join(names[:5])} of {checkpoint.model_id} are on no Up node, and "
                              "HF_HUB_OFFLINE is set")
        loop = asyncio.get_running_loop()
        progress.sources.add("hub")

        def counted(n: int) -> None:
            loop.call_soon_threadsafe(lambda: (progress.add(n), on_progress(progress.proto(deadline.seconds))))

        stopped = {"now": False}
        try:
            snapshot = await asyncio.to_thread(hub.download, checkpoint.model_id, checkpoint.revision, names,
                                               self.store.hf_cache, counted, lambda: stopped["now"],
                                               {n: checkpoint.files[n][1] for n in names if n in checkpoint.files})
        except hub.HubError as e:
            raise Unavailable(f"{', '.join(names[:5])} of {checkpoint.model_id} are on no Up node, and {e}") from None
        except BaseException:
            stopped["now"] = True
            raise
        progress.sources.discard("hub")
        await asyncio.to_thread(self.store.refresh)
        return fetch.LocalSource(str(snapshot), set(names), name="hub download")

    # ---------------------------------------------------------------- whole checkpoints

    async def pull(self, text: str, on_progress: Callable[[pb.Download], None]) -> pb.ModelHolding:
        """The whole checkpoint onto this node: from peers into the exod
        store, else from the hub into the Hugging Face cache."""
        from exod.models import synthetic

        name = self.parse(text, local=False)
        if name.kind == "builtin":
            await asyncio.to_thread(synthetic.ensure_named, name.model_id, self.store.exod_dir)
            await self.refresh()
            return next(h for h in self.node.record.profile.models if h.model_id == name.model_id)
        checkpoint = await self.checkpoint(name.model_id, name.revision)
        held = await asyncio.to_thread(self.store.find, checkpoint.model_id, checkpoint.revision)
        if held is not None:
            return held.to_proto()
        names = sorted(checkpoint.files)
        sizes = {n: s for n, (s, _) in checkpoint.files.items()}
        total = sum(sizes.values())
        sources = [s for s in self._sources(checkpoint, set(names))]
        orphans = [n for n in names if not any(s.has(n) for s in sources)]
        deadline = Deadline(self.deadline_s(total, sources, sum(sizes[n] for n in orphans)))
        progress = fetch.Progress(total)
        sources_named = ", ".join(s.name for s in sources) or "the hub"

        def timed_out() -> str:
            return (f"timed out pulling {checkpoint.model_id} after {deadline.seconds:.0f} s: {progress.done} of "
                    f"{progress.total} bytes had arrived from {sources_named}")

        if orphans:  # not all on peers: the hub has it all, into its own cache
            self._check_disk(self.store.hf_cache, total, f"{checkpoint.model_id}")
            await self.within(deadline, self._from_hub(checkpoint, names, progress, on_progress, deadline), timed_out)
        else:
            final = self.store.exod_path(checkpoint.model_id)
            self._check_disk(final.parent, total, f"{checkpoint.model_id}")
            if self._hub_usable(checkpoint):
                # What a peer leaves when it fails mid-pull, with no other
                # peer holding it: from the hub, checked by the whole files'
                # digests as the rest is.
                sources.append(hub.HubSource(checkpoint.model_id, checkpoint.revision, dict(checkpoint.files)))
            await self.within(deadline, self._pull_files(checkpoint, final, names, sizes, sources, progress,
                                                         on_progress, deadline), timed_out)
        await self.refresh()
        held = await asyncio.to_thread(self.store.find, checkpoint.model_id, checkpoint.revision)
        if held is None:
            raise Unavailable(f"{checkpoint.model_id} was fetched but the store does not find it complete")
        return held.to_proto()

    async def _pull_files(self, checkpoint, final: Path, names: list, sizes: dict, sources: list,
                          progress: fetch.Progress, on_progress, deadline: Deadline) -> None:
        writer = await asyncio.to_thread(FilesWriter, final, [(n, sizes[n]) for n in names], checkpoint.revision)
        job = fetch.Fetch(writer.parts, writer, sources, describe=checkpoint.model_id)
        job.progress = progress
        job.on_progress = lambda p: on_progress(p.proto(deadline.seconds))
        job.on_last_resort = lambda left: deadline.extend(self.hub_deadline_s(left))
        try:
            await job.run()
            await asyncio.to_thread(writer.verify, {n: sha for n, (_, sha) in checkpoint.files.items()})
            await asyncio.to_thread(writer.commit)
        except fetch.FetchError as e:
            await asyncio.to_thread(writer.abort)
            raise Unavailable(str(e)) from None
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise

    async def pull_progress(self, text: str, every_s: float = 0.5):
        """PullProgress while `pull` runs, then one with done or the error."""
        latest: list = [pb.Download()]
        task = asyncio.ensure_future(self.pull(text, lambda d: latest.__setitem__(0, d)))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=every_s)
                if not task.done():
                    yield pb.PullProgress(download=latest[0])
            try:
                held = task.result()
            except (Unavailable, ModelError, fetch.FetchError, OSError) as e:
                yield pb.PullProgress(done=False, error=str(e)[:2000], download=latest[0])
                return
            yield pb.PullProgress(model_id=held.model_id, revision=held.revision, done=True, download=latest[0])
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # ---------------------------------------------------------------- what moving bytes costs a plan

    async def annotate(self, result: pb.Plan, checkpoint: Optional[ckpt.Checkpoint], cluster: pb.Cluster) -> pb.Plan:
        if checkpoint is None:
            return result
        return await asyncio.to_thread(annotate, result, checkpoint, cluster)


def annotate(result: pb.Plan, checkpoint: ckpt.Checkpoint, cluster: pb.Cluster) -> pb.Plan:
    """Per rank of every candidate: the bytes it needs, those already on its
    node (the whole checkpoint, the same shard, or files of it), those to
    fetch, from which nodes (or the hub), and the predicted time over the
    measured links; then `rechoose`. Pure: the holdings and links are the
    cluster's (what the planner was given), so `exod plan --cluster` shows
    the same as the daemon's preview."""
    from exod.placement.spec import layout as spec_layout

    spec = checkpoint.spec(checkpoint.model_id)
    sizes = {n: s for n, (s, _) in checkpoint.files.items()}
    nodes = {n.node_id: n for n in cluster.nodes}
    rates: dict = {}
    for link in cluster.links:
        key = frozenset((link.from_node, link.to_node))
        rates[key] = max(rates.get(key, 0.0), link.bandwidth_bytes_per_s)
    holders = [(n.node_id, n.name, h) for n in cluster.nodes for h in n.models
               if h.store != "shard" and h.model_id == checkpoint.model_id]
    cache: dict = {}
    for candidate in [*result.candidates, *([result.chosen] if result.HasField("chosen") else [])]:
        if not candidate.fits:
            continue  # a cut that does not divide has no bytes to name
        fields = spec_layout(candidate)
        strategy, split = fields.strategy, fields.pipeline_layers
        world = len(candidate.ranks)
        rank_shares = [r.share for r in candidate.ranks] if strategy != "pipeline" else []
        layout = candidate.expert_layout if candidate.HasField("expert_layout") else None
        layout_key = layout.SerializeToString(deterministic=True) if layout is not None else b""
        slowest, total = 0.0, 0
        candidate.revision = checkpoint.revision
        for r in candidate.ranks:
            key = (strategy, r.rank, world, tuple(split), tuple(rank_shares), layout_key, tuple(fields.stage_ranks))
            if key not in cache:
                cache[key] = shards.plan_rank(checkpoint, strategy, r.rank, world, split, spec=spec,
                                              rank_shares=rank_shares, expert_layout=layout,
                                              stage_ranks=fields.stage_ranks, stage_strategy=fields.stage_strategy)
            plan = cache[key]
            needed = plan.needs.tensor_bytes + sum(sizes[n] for n in plan.side_files)
            held = list(nodes[r.node_id].models) if r.node_id in nodes else []
            local = min(needed, _local_bytes(checkpoint, plan, held, sizes, strategy, r.rank, world))
            to_fetch = needed - local
            sources, rate = [], 0.0
            if to_fetch:
                files = {p.file for p in plan.needs.parts} | set(plan.side_files)
                for node_id, name, h in holders:
                    if node_id != r.node_id and name not in sources and any(f.name in files for f in h.files):
                        sources.append(name)
                        rate = max(rate, rates.get(frozenset((r.node_id, node_id)), 0.0))
                if not sources:
                    sources, rate = ["hub"], HUB_RATE
            seconds = to_fetch / max(rate, MIN_RATE) if to_fetch else 0.0
            r.transfer.CopyFrom(pb.Transfer(bytes_needed=needed, bytes_local=local, bytes_to_fetch=to_fetch,
                                            sources=sources, predicted_s=seconds))
            total += to_fetch
            slowest = max(slowest, seconds)
        candidate.bytes_to_fetch, candidate.predicted_transfer_s = total, slowest
    return rechoose(result)


def _local_bytes(checkpoint, plan, held: list, sizes: dict, strategy: str, rank: int, world: int) -> int:
    whole = plan.needs.tensor_bytes + sum(sizes[n] for n in plan.side_files)
    files: set = set()
    for h in held:
        if h.model_id != checkpoint.model_id or (h.revision and checkpoint.revision
                                                 and h.revision != checkpoint.revision):
            continue
        if h.store == "shard":
            s = h.shard
            if (s.strategy, s.rank, s.world_size) == (strategy, rank, world) and \
                    (strategy not in ("pipeline", "hybrid") or (s.layer_start, s.layer_end) == tuple(plan.needs.layer_range)) and \
                    tuple(s.grains) == tuple(plan.needs.grains):
                return whole
            continue
        if h.complete:
            return whole
        files |= {f.name for f in h.files if sizes.get(f.name) == f.size}
    return sum(p.nbytes for p in plan.needs.parts if p.file in files) + sum(sizes[n] for n in plan.side_files
                                                                            if n in files)


def bounded(holdings: list) -> list:
    """What fits the record's bounds (daemon/trust.py): whole checkpoints
    first, then partial ones, then shards."""
    from .trust import MAX_HELD_FILES, MAX_HOLDINGS

    kept, files, left_out = [], 0, []
    for h in sorted(holdings, key=lambda h: (h.store == "shard", not h.complete)):
        if len(kept) >= MAX_HOLDINGS or files + len(h.files) > MAX_HELD_FILES:
            left_out.append(h.model_id)
            continue
        kept.append(h)
        files += len(h.files)
    if left_out and tuple(left_out) != _warned[0]:  # once per change, not every rescan
        _warned[0] = tuple(left_out)
        log.warning("not publishing every model this node holds: over the record's bounds", left_out=left_out[:10])
    return kept


_warned: list = [()]


def rechoose(result: pb.Plan, within: float = 0.05) -> pb.Plan:
    """Tokens/s first: among the fitting candidates within `within` of the
    fastest, the fewest bytes to move wins; the planner's own choice wins
    ties."""
    fitting = [c for c in result.candidates if c.fits]
    if not fitting or not result.HasField("chosen"):
        return result
    best = max(c.predicted_decode_tokens_per_s for c in fitting)
    close = [c for c in fitting if c.predicted_decode_tokens_per_s >= best * (1 - within)]

    def same(a, b) -> bool:
        return a.strategy == b.strategy and a.backend == b.backend and \
            [(r.node_id, r.layer_start, r.layer_end) for r in a.ranks] == \
            [(r.node_id, r.layer_start, r.layer_end) for r in b.ranks]

    pick = min(close, key=lambda c: (c.bytes_to_fetch, not same(c, result.chosen), -c.predicted_decode_tokens_per_s))
    if not same(pick, result.chosen):
        result.chosen.CopyFrom(pick)
        result.chosen.reasons.append(f"chosen for moving fewer bytes ({pick.bytes_to_fetch}) among candidates "
                                     f"within {within:.0%} of the fastest")
    else:
        result.chosen.bytes_to_fetch, result.chosen.predicted_transfer_s = pick.bytes_to_fetch, pick.predicted_transfer_s
        result.chosen.revision = pick.revision
    return result


class FilesWriter:
    """Whole files of a pulled checkpoint: into a private folder beside the
    store's, verified against their digests, then renamed into place."""

    def __init__(self, final: Path, files: list, revision: str):
        import os
        import tempfile

        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.final.parent))
        self.files = files
        self.revision = revision
        self.parts = [shards.file_part(n, s) for n, s in files]
        self.fds = []
        try:
            for name, size in files:
                path = self.tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self.fds.append(fd)
                if size:
                    os.posix_fallocate(fd, 0, size)
        except OSError:
            self.abort()
            raise

    def write(self, index: int, position: int, data) -> None:
        import os

        os.pwrite(self.fds[index], data, position)

    def verify(self, digests: dict) -> None:
        """Each whole file against the digest its holder published."""
        from exod.models.store import hash_file

        for name, _ in self.files:
            want = digests.get(name)
            if want and hash_file(self.tmp / name) != want:
                raise fetch.FetchError(f"{name}: the whole file does not match its sha256 {want[:12]}…")

    def commit(self) -> Path:
        import os

        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        if self.revision:
            (self.tmp / model_store.REVISION_FILE).write_text(self.revision)
        if self.final.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise fetch.FetchError(f"{self.final} appeared meanwhile")
        os.rename(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        import os

        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        shutil.rmtree(self.tmp, ignore_errors=True)
