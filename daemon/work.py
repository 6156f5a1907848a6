"""Instances and runners on a node. The node owns the instances placed
through it (planned, reserved, started, supervised) and runs the ranks
placed on it; both travel to every node in its versioned WorkRecord."""

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path

import grpc
import structlog

from exod.placement.spec import layout as spec_layout
from exod.proto import exod_pb2 as pb

from . import expert_load, placement_api, reservations, signing, state, trust

log = structlog.get_logger("exod.work")
RESERVATION_HOLD_MS = 120_000  # from reserve to the runner's start
TERMINAL = (pb.FAILED, pb.SHUTDOWN)
MAX_HISTORY = 32  # state changes kept per rank status (the first and the latest)


DEFAULT_MAX_RESTARTS = 3
# Long enough for the views to agree on which node is gone, and for the failed
# instance's memory to be released everywhere.
REPLACE_AFTER_S = 1.0
# A re-placement that finds no candidate (the nodes it needs are cut off)
# tries again, backing off to REPLACE_MAX_PAUSE_S, for this long.
REPLACE_PATIENCE_S = 600.0
REPLACE_MAX_PAUSE_S = 15.0
# A node stops the ranks, and drops the reservations, of an owner that has
# been Down or Left this long: past any link cut worth riding out.
OWNER_GONE_MS = 30_000
# exod rebalance: how long the new placement may take to be Ready, how long
# the old one may take to finish its requests, and the cut in predicted
# routing imbalance below which the instance is left as it is.
REBALANCE_READY_S = 600.0
DRAIN_S = 120.0
REBALANCE_GAIN = 0.05


class Refused(Exception):
    pass


class Work:
    def __init__(self, node):
        self.node = node
        self.version = 0
        self.processes: dict = {}   # (instance, rank) -> RankProcess on this node
        self.statuses: dict = {}    # (instance, rank) -> RunnerStatus
        self.held: dict = {}        # (instance, rank) -> reservation id
        self.owners: dict = {}      # (instance, rank) -> the node that placed it (may stop it)
        self.owned: dict = {}       # instance id -> Instance placed through this node
        self._push_scheduled = False
        self.streams: dict = {}     # request id -> asyncio.Queue of GenerationChunk (rank 0 here)
        self.downloads: dict = {}   # (instance, rank) -> the task fetching its bytes, then starting it
        self.spare = None           # a runner started ahead of need (settings.prestart_runner)
        self._prestarting = False

    # ---------------------------------------------------------------- the record

    def record(self) -> pb.WorkRecord:
        record = pb.WorkRecord(node_id=self.node.node_id, version=self.version,
                               runners=[self.statuses[k] for k in sorted(self.statuses)],
                               instances=[self.owned[k] for k in sorted(self.owned)])
        signing.sign(self.node.identity, record)
        return record

    def changed(self) -> None:
        self.version = max(self.version + 1, int(time.time() * 1000))
        record = self.record()
        self.node.view = state.apply_work(self.node.view, record)
        self.node._spawn(asyncio.to_thread(self._save, list(record.instances)))
        if not self._push_scheduled:
            self._push_scheduled = True
            self.node._spawn(self._push())

    # ---------------------------------------------------------------- surviving a restart

    def _path(self) -> Path:
        return self.node.data_dir / "instances.json"

    def _save(self, instances: list) -> None:
        from google.protobuf import json_format

        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(json.dumps([json_format.MessageToDict(i) for i in instances]))
        tmp.replace(path)

    async def recover(self) -> None:
        """Instances this node owned before it restarted: never forgotten. Their
        runners here died with the daemon; the ones elsewhere are stopped, and
        each instance is reported Failed with the reason."""
        from google.protobuf import json_format

        try:
            saved = json.loads(await asyncio.to_thread(self._path().read_text))
        except (OSError, ValueError):
            return
        for item in saved:
            instance = json_format.ParseDict(item, pb.Instance(), ignore_unknown_fields=True)
            if instance.state in (pb.INSTANCE_STARTING, pb.INSTANCE_READY, pb.INSTANCE_PENDING):
                instance.state = pb.INSTANCE_FAILED
                instance.reason = "the daemon that owned this instance restarted; its runners were stopped"
                self.node._spawn(self._stop_when_reachable(instance))
            self.owned[instance.instance_id] = instance
        if saved:
            log.warning("recovered instances after a restart", count=len(saved))
            self.changed()

    async def _push(self) -> None:
        """Tell every peer now: statuses must reach every view within a second."""
        await asyncio.sleep(0.05)
        self._push_scheduled = False
        await self.node.exchange_with_all()

    # ---------------------------------------------------------------- runners here

    async def prestart(self) -> None:
        """Keep one runner process with MLX and mlx-lm imported, so that the
        next rank placed here skips most of a second of start-up."""
        from exod.runner.launch import SpareRunner

        if not self.node.settings.prestart_runner or self.node.stopping or self._prestarting:
            return
        if self.spare is not None:
            if self.spare.alive():
                return
            await self._close_spare()  # died while it waited
        self._prestarting = True
        try:
            logs = self.node.data_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            spare = await asyncio.to_thread(SpareRunner, None, logs / f"spare-{uuid.uuid4().hex[:8]}.log",
                                            self.node.data_dir / "run")
        finally:
            self._prestarting = False
        if self.node.stopping:
            await asyncio.to_thread(spare.close)
        else:
            self.spare = spare

    async def _close_spare(self) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            await asyncio.to_thread(spare.close)

    def _start_problem(self, request: pb.StartRunnerRequest, owner: str) -> "str | None":
        """Why this node must not start the runner: a runner starts only for a
        reservation this node admitted for that rank, asked for by its owner."""
        spec = request.spec
        problem = trust.spec_problem(spec)
        if problem is not None:
            return problem
        if (spec.instance_id, spec.rank) in self.processes:
            return f"rank {spec.rank} of {spec.instance_id} runs here already"
        if len(self.processes) >= self.node.settings.max_runners:
            return f"this node runs {len(self.processes)} runners already (max_runners)"
        held = self.node.ledger.held.get(request.reservation_id)
        if held is None or held.owner_node_id != owner or held.instance_id != spec.instance_id \
                or held.rank != spec.rank:
            return f"no reservation here for rank {spec.rank} of {spec.instance_id} from this node"
        return None

    async def _model_dir(self, name, revision: str) -> "Path | None":
        """Where the model already is on this node: a built-in model (built
        on demand), a local directory (only when this node's own user
        placed it: the name parsed as local), or a complete checkpoint in a
        store. None: the rank's bytes must be fetched first."""
        from exod.models import synthetic

        if name.kind == "builtin":
            return await asyncio.to_thread(synthetic.ensure_named, name.model_id, self.node.models.store.exod_dir)
        if name.kind == "local":
            return Path(name.model_id)
        return await asyncio.to_thread(self.node.models.local_root, name.model_id, revision or name.revision)

    async def start_runner(self, request: pb.StartRunnerRequest, asked_by: "str | None" = None) -> pb.StartRunnerResponse:
        """`asked_by`: the node that asked, as its certificate proved (None:
        this node). Where the node lacks bytes the rank needs, the rank is
        Downloading first and its runner starts once they are here."""
        from exod.models import ModelError

        owner = asked_by or self.node.node_id
        problem = self._start_problem(request, owner)
        if problem is not None:
            return pb.StartRunnerResponse(started=False, reason=problem)
        spec = pb.RunnerSpec()
        spec.CopyFrom(request.spec)
        key = (spec.instance_id, spec.rank)
        try:
            name = self.node.models.parse(request.model, local=asked_by is None)
        except ModelError as e:
            return pb.StartRunnerResponse(started=False, reason=f"node {self.node.record.profile.name}: {e}")
        path = await self._model_dir(name, request.revision)
        if key in self.processes or key in self.downloads:  # started meanwhile
            return pb.StartRunnerResponse(started=False, reason=f"rank {spec.rank} of {spec.instance_id} runs here already")
        spec.node_id = self.node.node_id
        self.node.ledger = reservations.confirm(self.node.ledger, request.reservation_id)
        self.held[key] = request.reservation_id
        self.owners[key] = owner
        self.statuses[key] = pb.RunnerStatus(instance_id=spec.instance_id, rank=spec.rank, node_id=self.node.node_id,
                                             state=pb.IDLE, estimated_bytes=spec.estimated_bytes)
        if path is not None:
            await self._launch(key, spec, path)
        else:
            self.statuses[key].state = pb.DOWNLOADING
            task = asyncio.ensure_future(self._download_then_launch(key, spec, request.model, request.revision))
            self.downloads[key] = task
            task.add_done_callback(lambda _: self.downloads.pop(key, None))
        self.changed()
        return pb.StartRunnerResponse(started=True)

    async def _download_then_launch(self, key, spec: pb.RunnerSpec, model: str, revision: str) -> None:
        from .models import Unavailable

        started = time.monotonic()
        published = [0.0]

        def progress(download: pb.Download) -> None:
            status = self.statuses.get(key)
            if status is not None and status.state == pb.DOWNLOADING:
                status.download.CopyFrom(download)
                status.changed_at_unix_ms = int(time.time() * 1000)
                # Every change goes to every peer: twice a second is news enough.
                if time.monotonic() - published[0] >= 0.5 or download.bytes_done == download.bytes_total:
                    published[0] = time.monotonic()
                    self.changed()

        try:
            path = await self.node.models.prepare_rank(spec, model, revision, progress)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the rank's news, with the reason: never a lost task
            reason = str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
            log.warning("rank not started: its bytes could not be had", instance=key[0], rank=key[1], reason=reason)
            self._on_status(key, pb.RunnerStatus(instance_id=key[0], rank=key[1], state=pb.FAILED,
                                                 estimated_bytes=spec.estimated_bytes,
                                                 reason=f"Downloading failed: {reason}"[:2000],
                                                 download=self.statuses[key].download if key in self.statuses
                                                 else None))
            return
        if key not in self.statuses:
            return  # stopped meanwhile
        log.info("rank's bytes are here", instance=key[0], rank=key[1], path=str(path),
                 seconds=round(time.monotonic() - started, 2))
        await self._launch(key, spec, path)
        self.changed()

    async def _launch(self, key, spec: pb.RunnerSpec, path: Path) -> None:
        from exod.runner.launch import RankProcess

        spec.model_dir = str(path)
        loop = asyncio.get_running_loop()
        logs = self.node.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)

        def on_event(rank_process, event):
            if event.HasField("status"):
                loop.call_soon_threadsafe(self._on_status, key, event.status)
            else:
                loop.call_soon_threadsafe(self._on_chunk, event.chunk)

        spare, self.spare = self.spare, None
        self.processes[key] = await asyncio.to_thread(
            RankProcess, spec, on_event, None, logs / f"{spec.instance_id}-rank{spec.rank}.log",
            self.node.data_dir / "run", spare)

    def _on_status(self, key, status: pb.RunnerStatus) -> None:
        if key not in self.statuses:
            return  # stopped meanwhile
        copy = pb.RunnerStatus()
        copy.CopyFrom(status)
        copy.node_id = self.node.node_id
        if not copy.HasField("download") and self.statuses[key].HasField("download"):
            copy.download.CopyFrom(self.statuses[key].download)  # what the fetch took stays on show
        copy.diagnostics = ""  # stays in the rank's log; the record travels everywhere
        if copy.rank != 0:
            copy.ClearField("expert_counts")  # the router is replicated: rank 0's counts are every rank's
        copy.history.extend(self.statuses[key].history)
        if not copy.history or copy.history[-1].state != copy.state:
            copy.history.append(pb.StateChange(state=copy.state,
                                               at_unix_ms=copy.changed_at_unix_ms or int(time.time() * 1000)))
            if len(copy.history) > MAX_HISTORY:
                del copy.history[1:len(copy.history) - MAX_HISTORY + 1]
        self.statuses[key] = copy
        if copy.state in TERMINAL and key in self.held:
            self.node.release(self.held.pop(key))
        if copy.state in (pb.READY, *TERMINAL) and self.spare is None:
            # Not while ranks load: its imports would take CPU from them.
            self.node._spawn(self.prestart())
        self.changed()

    def _on_chunk(self, chunk: pb.GenerationChunk) -> None:
        queue = self.streams.get(chunk.request_id)
        if queue is not None:
            queue.put_nowait(chunk)

    async def generate_here(self, instance_id: str, request: pb.GenerateRequest, timeout_s: float = 600):
        """Chunks from rank 0 of an instance running on this node. A runner
        that dies mid-request ends the stream with an error, never a hang."""
        process = self.processes.get((instance_id, 0))
        if process is None or process.terminal.is_set():
            yield pb.GenerationChunk(request_id=request.request_id, finish_reason=pb.FINISH_ERROR,
                                     error=f"rank 0 of instance {instance_id} does not run on this node")
            return
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request.request_id] = queue
        try:
            if not process.send(pb.RunnerCommand(generate=request)):
                raise ConnectionError("rank 0 is gone")
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if process.terminal.is_set() or time.monotonic() > deadline:
                        why = process.status.reason or "rank 0 ended" if process.terminal.is_set() else "timed out"
                        yield pb.GenerationChunk(request_id=request.request_id, finish_reason=pb.FINISH_ERROR,
                                                 error=why)
                        return
                    continue
                yield chunk
                if chunk.finish_reason:
                    return
        except ConnectionError as e:
            yield pb.GenerationChunk(request_id=request.request_id, finish_reason=pb.FINISH_ERROR, error=str(e))
        finally:
            self.streams.pop(request.request_id, None)
            if process.process.poll() is None:
                process.send(pb.RunnerCommand(cancel=pb.CancelRequest(request_id=request.request_id)))

    async def stop_instance(self, instance_id: str, asked_by: "str | None" = None) -> int:
        """Stop this node's ranks of an instance; another node may stop only
        the ranks it placed (`asked_by`, as proven)."""
        fetching = [k for k in self.downloads if k[0] == instance_id
                    and (asked_by is None or self.owners.get(k) == asked_by)]
        for key in fetching:  # a rank still Downloading: stop the fetch (its partial shard goes with it)
            self.downloads[key].cancel()
        await asyncio.gather(*(self.downloads[k] for k in fetching if k in self.downloads), return_exceptions=True)
        for key in fetching:
            self.statuses.pop(key, None)
            self.owners.pop(key, None)
            if key in self.held:
                self.node.release(self.held.pop(key))
        keys = [k for k in self.processes if k[0] == instance_id
                and (asked_by is None or self.owners.get(k) == asked_by)]
        for key in keys:
            self.processes[key].send(pb.RunnerCommand(shutdown=pb.ShutdownRequest()))

        def finish():
            for key in keys:
                process = self.processes[key]
                if not process.wait(5):
                    process.kill()
                    process.wait(5)

        await asyncio.to_thread(finish)
        for key in keys:
            self.processes.pop(key, None)
            self.statuses.pop(key, None)
            self.owners.pop(key, None)
            if key in self.held:
                self.node.release(self.held.pop(key))
        if keys or fetching:
            self.changed()
        return len(keys) + len(fetching)

    async def stop_all(self) -> None:
        await self._close_spare()
        for instance_id in {k[0] for k in [*self.processes, *self.downloads]}:
            await self.stop_instance(instance_id)

    # ---------------------------------------------------------------- instances placed through here

    async def create(self, request: pb.PlacementRequest, replaces: "pb.Instance | None" = None,
                     local: bool = True, expert_counts: "pb.ExpertCounts | None" = None) -> pb.Instance:
        """local: this node's own user asked (a directory may name the model).
        expert_counts: the routing load to place experts by (default: the
        model's measured load)."""
        plan = await placement_api.preview(self.node, request, local, expert_counts)
        if not plan.HasField("chosen"):
            raise placement_api.PlanError("; ".join(plan.reasons) or "no placement fits")
        chosen = plan.chosen
        instance_id = uuid.uuid4().hex[:12]
        admitted, hosts = [], []
        try:
            for rank in chosen.ranks:
                reservation = pb.Reservation(
                    reservation_id=f"{instance_id}-{rank.rank}", instance_id=instance_id, rank=rank.rank,
                    bytes=rank.memory.total_bytes, expires_at_unix_ms=int(time.time() * 1000) + RESERVATION_HOLD_MS)
                try:
                    answer = await self.node.reserve_on(rank.node_id, reservation)
                except grpc.aio.AioRpcError as e:
                    raise Refused(f"node {rank.node_name} did not answer for rank {rank.rank}: "
                                  f"{e.code().name} {e.details()}") from None
                if not answer.admitted:
                    raise Refused(f"node {rank.node_name} refused rank {rank.rank}: {answer.reason}")
                admitted.append((rank.node_id, reservation.reservation_id))
                hosts.append(f"{self.node.host_of(rank.node_id)}:{answer.port}")
        except BaseException:
            await asyncio.gather(*(self.node.release_on(n, r) for n, r in admitted), return_exceptions=True)
            raise
        instance = pb.Instance(instance_id=instance_id, placement=chosen, state=pb.INSTANCE_STARTING,
                               created_at_unix_ms=int(time.time() * 1000), request=request,
                               restarts=replaces.restarts + 1 if replaces else 0,
                               replaces=replaces.instance_id if replaces else "")
        self.owned[instance_id] = instance
        self.changed()
        fields = spec_layout(chosen)
        strategy = fields.strategy
        # Travels only inside StartRunner, over the authenticated peer plane.
        rendezvous_secret = secrets.token_hex(32)
        starts = []
        for rank, (node_id, reservation_id) in zip(chosen.ranks, admitted):
            spec = pb.RunnerSpec(instance_id=instance_id, node_id=node_id, rank=rank.rank,
                                 world_size=len(chosen.ranks), backend=chosen.backend, hosts=hosts,
                                 strategy=strategy, pipeline_layers=fields.pipeline_layers, shares=fields.shares,
                                 stage_ranks=fields.stage_ranks, stage_strategy=fields.stage_strategy,
                                 rendezvous_secret=rendezvous_secret,
                                 estimated_bytes=rank.memory.total_bytes, context_length=chosen.context_length,
                                 max_batch=chosen.concurrency, prefix_cache_tokens=chosen.prefix_cache_tokens,
                                 prefix_cache_bytes=rank.memory.prefix_cache_bytes,
                                 max_queue=self.node.settings.max_queue)
            if chosen.HasField("expert_layout"):
                spec.expert_layout.CopyFrom(chosen.expert_layout)
            starts.append(self.node.start_on(node_id, pb.StartRunnerRequest(
                spec=spec, reservation_id=reservation_id, model=request.model, revision=chosen.revision)))
        answers = await asyncio.gather(*starts, return_exceptions=True)
        problems = [str(a) if isinstance(a, Exception) else a.reason for a in answers
                    if isinstance(a, Exception) or not a.started]
        if problems:
            await self.fail(instance_id, "; ".join(problems))
        log.info("instance placed", instance=instance_id, model=request.model, strategy=strategy,
                 nodes=[r.node_name for r in chosen.ranks])
        return self.owned[instance_id]

    async def fail(self, instance_id: str, reason: str) -> None:
        instance = self.owned.get(instance_id)
        if instance is None or instance.state in (pb.INSTANCE_FAILED, pb.INSTANCE_STOPPED):
            return
        instance.state = pb.INSTANCE_FAILED
        instance.reason = reason
        self.changed()
        log.warning("instance failed", instance=instance_id, reason=reason)
        await self._stop_everywhere(instance)
        policy = instance.request
        if policy.restart_policy == pb.RESTART_REPLACE:
            if instance.restarts < (policy.max_restarts or DEFAULT_MAX_RESTARTS):
                self.node._spawn(self._replace(instance_id))
            else:
                instance.reason += f"; not placed again: {instance.restarts} restarts already"
                self.changed()

    async def _replace(self, instance_id: str) -> None:
        """restart_policy "replace": the same request, planned again on the
        nodes that are up now (a pinned node that is down is left out). When
        nothing fits yet (a partition, the pinned nodes gone), it tries again
        with backoff until REPLACE_PATIENCE_S has passed: nodes that come
        back make it fit."""
        await asyncio.sleep(REPLACE_AFTER_S)
        deadline = time.monotonic() + REPLACE_PATIENCE_S
        pause, tries = REPLACE_AFTER_S, 0
        while True:
            old = self.owned.get(instance_id)
            if old is None or old.replaced_by or self.node.stopping:
                return  # deleted meanwhile
            request = pb.PlacementRequest()
            request.CopyFrom(old.request)
            gone = {key for m in self.node.view.members.values() if m.status in (pb.DOWN, pb.LEFT)
                    for key in (m.record.profile.node_id, m.record.profile.name)}
            if request.nodes:
                kept = [n for n in request.nodes if n not in gone]
                del request.nodes[:]
                request.nodes.extend(kept or old.request.nodes)  # all pinned nodes gone: wait for them
            tries += 1
            try:
                new = await self.create(request, replaces=old)
                break
            except (placement_api.PlanError, placement_api.ModelError, Refused) as e:
                if time.monotonic() + pause > deadline:
                    old.reason += f"; placing it again failed {tries} times, the last: {e}"
                    self.changed()
                    log.warning("instance not replaced", instance=instance_id, reason=str(e), tries=tries)
                    return
                log.info("instance not replaced yet; trying again", instance=instance_id, reason=str(e),
                         retry_in_s=pause)
            except Exception as e:  # whatever stops it is the instance's news, not a lost task's
                old.reason += f"; placing it again failed: {e}"
                self.changed()
                log.warning("instance not replaced", instance=instance_id, reason=str(e))
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, REPLACE_MAX_PAUSE_S)
        old.replaced_by = new.instance_id
        self.changed()
        log.info("instance replaced", instance=instance_id, by=new.instance_id, restarts=new.restarts)

    async def rebalance(self, instance_id: str) -> "tuple[pb.Instance, str]":
        """`exod rebalance`: a moe_experts instance's experts placed again by
        the routing load its runners measured, without losing the instance.
        Make before break: the new placement is reserved beside the old one
        (so the nodes need room for both), made Ready, then takes every new
        request while the old one finishes what it has (within DRAIN_S), and
        only then is the old one stopped. A new placement that fails is
        removed and the old one keeps serving. Returns (the instance now
        serving, what was done)."""
        from exod.placement import experts as expert_placement
        from exod.placement.cost import decode_rates

        old = self.owned.get(instance_id)
        if old is None:
            raise KeyError(instance_id)
        if old.state != pb.INSTANCE_READY or old.replaced_by:
            raise Refused(f"instance {instance_id} is {pb.InstanceState.Name(old.state).removeprefix('INSTANCE_')}"
                          f"{' and already replaced' if old.replaced_by else ''}; only a Ready instance is rebalanced")
        if old.placement.strategy != pb.MOE_EXPERTS or len(old.placement.ranks) < 2:
            raise Refused(f"instance {instance_id} runs {placement_api.STRATEGY_NAMES[old.placement.strategy]} on "
                          f"{len(old.placement.ranks)} rank(s); rebalance places whole experts (moe_experts)")
        live = state.instance(self.node.view, instance_id)
        if live and live.runners and live.runners[0].HasField("expert_counts"):
            self.node.expert_load.observe(old.placement.model_id, instance_id, live.runners[0].expert_counts)
        # The model's counts: this instance's live ones with those of its
        # recent predecessors, so that a layout is not chased after the noise
        # of one instance's few tokens.
        counts = self.node.expert_load.counts(old.placement.model_id)
        if counts is None:
            raise Refused(f"instance {instance_id} has no routing counts yet; they come with its warm-up and traffic")
        request = pb.PlacementRequest()
        request.CopyFrom(old.request)
        request.strategy, request.ranks = pb.MOE_EXPERTS, len(old.placement.ranks)
        del request.nodes[:]
        request.nodes.extend(r.node_id for r in old.placement.ranks)
        plan = await placement_api.preview(self.node, request, True, counts)
        profiles = {n.node_id: n for n in state.cluster_for_planner(self.node.view).nodes}
        speed = [decode_rates(profiles[r.node_id])[0] if r.node_id in profiles else 1.0 for r in old.placement.ranks]
        before = _layout_imbalance(old.placement, counts, speed, expert_placement)
        after = plan.chosen.predicted_routing_imbalance if plan.HasField("chosen") else None
        if after is not None and before is not None and after >= before * (1 - REBALANCE_GAIN):
            return old, (f"already balanced: routing imbalance {before:.3f}, a new layout {after:.3f}")
        try:
            new = await self.create(request, local=True, expert_counts=counts)
        except (placement_api.PlanError, Refused) as e:
            raise Refused(f"no room to place the rebalanced instance beside {instance_id}, which keeps serving: {e}")
        deadline = time.monotonic() + REBALANCE_READY_S
        while self.owned.get(new.instance_id) is not None and \
                self.owned[new.instance_id].state == pb.INSTANCE_STARTING and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        placed = self.owned.get(new.instance_id)
        if placed is None or placed.state != pb.INSTANCE_READY:
            reason = placed.reason if placed is not None else "deleted meanwhile"
            await self.delete(new.instance_id)
            raise Refused(f"the rebalanced placement did not become Ready ({reason or 'deadline'}); "
                          f"{instance_id} keeps serving")
        old.replaced_by = new.instance_id  # new requests go to the new one from here on
        self.changed()
        drain = time.monotonic() + DRAIN_S
        while time.monotonic() < drain:
            live = state.instance(self.node.view, instance_id)
            if live is None or not live.runners or (live.runners[0].batch_size + live.runners[0].queue_depth == 0):
                break
            await asyncio.sleep(0.2)
        await self.delete(instance_id)
        log.info("instance rebalanced", instance=instance_id, by=new.instance_id, imbalance_before=before,
                 imbalance_after=after)
        return placed, (f"rebalanced: routing imbalance {before:.3f} to {after:.3f}" if before and after
                        else "rebalanced")

    async def delete(self, instance_id: str) -> bool:
        instance = self.owned.get(instance_id)
        if instance is None:
            return False
        await self._stop_everywhere(instance)
        self.owned.pop(instance_id, None)
        self.changed()
        return True

    def owner_of(self, instance_id: str) -> "str | None":
        return next((node_id for node_id, record in self.node.view.work.items()
                     if any(i.instance_id == instance_id for i in record.instances)), None)

    async def delete_anywhere(self, instance_id: str) -> bool:
        """Delete from any node: the owner does it; False when nobody knows
        the instance. Raises grpc.aio.AioRpcError when the owner refuses."""
        if instance_id in self.owned:
            return await self.delete(instance_id)
        owner = self.owner_of(instance_id)
        if owner is None or self.node._address_of(owner) is None:
            return False
        # Over the peer plane, as this node: the user's token never leaves it.
        await self.node._stub(self.node._address_of(owner)).DeleteInstance(
            pb.InstanceRef(instance_id=instance_id), timeout=60)
        return True

    async def _stop_when_reachable(self, instance: pb.Instance, patience_s: float = 60.0) -> None:
        """After a restart the peers are not known yet: stop each node's ranks
        as soon as that node can be reached."""
        pending = {r.node_id for r in instance.placement.ranks} - {self.node.node_id}
        deadline = time.monotonic() + patience_s
        while pending and time.monotonic() < deadline:
            for node_id in list(pending):
                if self.node._address_of(node_id) is None:
                    continue
                try:
                    await self.node.stop_on(node_id, instance.instance_id)
                    pending.discard(node_id)
                except Exception:  # unreachable for now: try again
                    pass
            await asyncio.sleep(0.5)

    async def _stop_everywhere(self, instance: pb.Instance) -> None:
        nodes = {r.node_id for r in instance.placement.ranks}
        await asyncio.gather(*(self.node.stop_on(n, instance.instance_id) for n in nodes), return_exceptions=True)
        # Reservations that never got a runner; a node that is gone holds nothing of ours.
        await asyncio.gather(*(self.node.release_on(r.node_id, f"{instance.instance_id}-{r.rank}")
                               for r in instance.placement.ranks), return_exceptions=True)

    def _owner_gone(self, owner: str, now_ms: int) -> bool:
        member = self.node.view.member(owner)
        return member is None or (member.status in (pb.DOWN, pb.LEFT)
                                  and now_ms - member.last_seen_ms >= OWNER_GONE_MS)

    def reap(self) -> None:
        """What other nodes placed here, whose owner has been gone a while:
        nobody is left to stop those ranks or start on those reservations.
        (An owner that comes back restarted reports them Failed and stops
        them too; one that never does must not hold this node for good.)"""
        now = int(time.time() * 1000)
        gone = {k for k, owner in self.owners.items()
                if owner != self.node.node_id and k in self.processes and self._owner_gone(owner, now)}
        for instance_id in {k[0] for k in gone}:
            log.warning("stopping ranks whose owner is gone", instance=instance_id, owner=self.owners.get(
                next(k for k in gone if k[0] == instance_id))[:12])
            self.node._spawn(self.stop_instance(instance_id))
        # Ranks of an instance its owner's own record says has ended: its
        # StopInstance may have been lost (a link cut at that moment).
        ended = set()
        for k, owner in self.owners.items():
            record = self.node.view.work.get(owner)
            if owner != self.node.node_id and k in self.processes and k[0] not in gone and record is not None \
                    and any(i.instance_id == k[0] and i.state in (pb.INSTANCE_FAILED, pb.INSTANCE_STOPPED)
                            for i in record.instances):
                ended.add(k[0])
        for instance_id in ended:
            log.warning("stopping ranks of an instance its owner ended", instance=instance_id)
            self.node._spawn(self.stop_instance(instance_id))
        started = set(self.held.values())
        for reservation_id, held in list(self.node.ledger.held.items()):
            if reservation_id not in started and held.owner_node_id != self.node.node_id \
                    and self._owner_gone(held.owner_node_id, now):
                self.node.release(reservation_id)

    def supervise(self) -> None:
        """Owned instances follow their runners: all Ready is Ready; a failed
        rank or a node gone down fails the instance and stops the rest. Rank
        0's routing counts are kept for the model's next placement."""
        self.reap()
        if self.node.expert_load.due():
            self.node._spawn(asyncio.to_thread(expert_load.save, self.node.expert_load.snapshot()))
        current = {i.instance_id: i for i in state.instances(self.node.view)}
        for instance_id, owned in list(self.owned.items()):
            if owned.state not in (pb.INSTANCE_STARTING, pb.INSTANCE_READY):
                continue
            view = current.get(instance_id)
            if view is None:
                continue
            if view.runners and view.runners[0].HasField("expert_counts"):
                self.node.expert_load.observe(owned.placement.model_id, instance_id, view.runners[0].expert_counts)
            failed = [r for r in view.runners if r.state == pb.FAILED]
            down = [r for r in owned.placement.ranks
                    if (m := self.node.view.member(r.node_id)) is not None and m.status in (pb.DOWN, pb.LEFT)]
            if failed:
                r = failed[0]
                self.node._spawn(self.fail(instance_id, f"rank {r.rank} failed: {r.reason}"))
            elif down:
                self.node._spawn(self.fail(instance_id, f"node {down[0].node_name} of rank {down[0].rank} is down"))
            elif owned.state == pb.INSTANCE_STARTING and all(r.state in (pb.READY, pb.RUNNING) for r in view.runners):
                owned.state = pb.INSTANCE_READY
                self.changed()
                log.info("instance ready", instance=instance_id)


def _layout_imbalance(placement: pb.Placement, counts: pb.ExpertCounts, speed: list[float],
                      experts) -> "float | None":
    """The routing imbalance a running moe_experts placement has under these
    counts (speed: each rank's node's decode rate): its own layout, or
    contiguous experts by share without one."""
    by_layer = {c.layer: list(c.counts) for c in counts.layers}
    total = placement.ranks[0].share_of if placement.HasField("expert_layout") else 0
    loads = []
    if placement.HasField("expert_layout"):
        for layer in placement.expert_layout.layers:
            if layer.layer in by_layer and len(by_layer[layer.layer]) == total:
                freq = experts.frequencies(by_layer[layer.layer], total)
                loads.append(experts.loads(freq, [list(s.experts) for s in layer.ranks])[1])
    else:
        for values in by_layer.values():
            freq = experts.frequencies(values, len(values))
            shares = [r.share for r in placement.ranks]
            if sum(shares) != len(values):
                return None  # shares in grains of several experts: no per-expert view
            loads.append(experts.loads(freq, experts.contiguous(len(values), shares))[1])
    return experts.imbalance(loads, speed) if loads else None
