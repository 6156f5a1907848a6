"""The daemon on one machine: its identity and profile, the gRPC peer
service, discovery, membership and the HTTP API. Every background task is
owned here and cancelled on stop; blocking work runs in worker threads."""

import asyncio
import json
import sys
import time
from dataclasses import replace

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exod.proto import exod_pb2 as pb
from exod.proto import exod_pb2_grpc as pb_grpc
from exod.runner.launch import free_ports

from . import identity, keys, profile, reservations, signing, state, transport, trust
from .config import PROTOCOL_VERSION, Settings
from .peers import (ClusterServicer, PeerServicer, WrongNode, gather_quietly, local_address_towards, measure_rtt,
                    measure_throughput, now_ms, split_hostport, valid_address)

log = structlog.get_logger("exod")
THROUGHPUT_PROBE_BYTES = 2 * 1024 * 1024
UNKNOWN_EXPIRY_S = 60.0  # a discovered address that never answers is dropped
RESERVATION_TTL_MS = 60_000  # an unconfirmed reservation lapses after this
DOWN_HEARTBEAT_EVERY = 4  # rounds between heartbeats to a Down peer
MAX_PENDING_ADDRESSES = 64  # discovered addresses not met yet
MAX_STRANGERS = 64


class Node:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.timing = state.Timing(int(settings.suspect_after_s * 1000), int(settings.down_after_s * 1000))
        self.data_dir = settings.data_path()
        self.ledger = reservations.Ledger()
        from .expert_load import ExpertLoad
        from .models import Models
        from .work import Work

        self.models = Models(self)  # what this node holds, and moving checkpoint bytes
        self.work = Work(self)
        # Routing counts of the moe models placed through this node (the owner's).
        self.expert_load = ExpertLoad(self.data_dir / "expert-load")
        self.node_id = ""
        self.identity: keys.NodeIdentity | None = None  # key pair and certificate; node_id is its hash
        self.incarnation = 0
        self.strangers: dict[str, pb.Stranger] = {}  # address -> seen there, not a member
        self._lock_fd = None
        self._made_key: str | None = None  # a cluster key this start made: saved only if the start succeeds
        self.record = pb.NodeRecord()
        self.view: state.View | None = None
        self.available_memory = 0
        self.grpc_port = 0
        self.api_port = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._candidates: dict[str, set] = {}  # node id -> grpc addresses to try
        self._route: dict[str, str] = {}       # node id -> the agreed address
        self._unknown: set = set(settings.peers)  # addresses whose node we have not met
        self._link_versions: dict[str, int] = {}
        self._last_throughput: dict[str, tuple[float, float]] = {}
        self._exchange_now: set = set()
        self._unknown_since: dict[str, float] = {}
        self._rounds = 0
        self._refreshes = 0
        self._tasks: list[asyncio.Task] = []
        self._grpc_server = None
        self._http = None
        self.discovery = None
        self.stopping = False
        self.started_at = 0.0

    @property
    def models_dir(self):
        """The exod store (built-in models, pulled checkpoints)."""
        return self.models.store.exod_dir

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start everything, or, when any part fails, stop what started and
        raise: a failed start leaves no server, task or lock behind."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    def _cluster_key(self) -> bytes:
        s = self.settings
        if s.cluster_key:
            return keys.parse_cluster_key(s.cluster_key)
        if s.cluster_key_file:
            return keys.read_key_file(s.cluster_key_file)
        key = keys.load_generated(self.data_dir)
        if key is None:  # kept, and shown, once the start has succeeded
            self._made_key = keys.new_cluster_key()
            key = keys.parse_cluster_key(self._made_key)
        return key

    def _keep_made_key(self) -> None:
        if self._made_key is None:
            return
        path = keys.save_generated(self.data_dir, self._made_key)
        print(f"exod: no cluster key was given, so this node made one ({path}). Every other node of "
              f"this cluster needs the same key:\n  exod start --cluster-key {self._made_key}\n"
              f"or copy the file and use --cluster-key-file.", file=sys.stderr, flush=True)
        self._made_key = None

    async def _start(self) -> None:
        self.started_at = time.monotonic()
        s = self.settings
        self._lock_fd = await asyncio.to_thread(identity.lock, self.data_dir)
        ca = await asyncio.to_thread(lambda: keys.derive_ca(self._cluster_key()))
        node_key = await asyncio.to_thread(identity.load_or_create, self.data_dir)
        self.identity = keys.issue(ca, node_key)
        self.node_id = self.identity.node_id
        self.incarnation = now_ms()
        node_profile = await asyncio.to_thread(profile.collect, self.node_id, s.name, s.memory_limit,
                                               s.interfaces, self.data_dir)
        self.available_memory = node_profile.memory_available_bytes
        node_profile.models.extend(h.to_proto() for h in await asyncio.to_thread(self.models.store.refresh))

        self._grpc_server = grpc.aio.server(options=transport.SERVER_OPTIONS)
        pb_grpc.add_PeerServiceServicer_to_server(PeerServicer(self), self._grpc_server)
        pb_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(self), self._grpc_server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc_server)
        try:
            self.grpc_port = self._grpc_server.add_secure_port(f"{s.grpc_host}:{s.grpc_port}",
                                                               transport.server_credentials(self.identity))
        except RuntimeError:
            self.grpc_port = 0
        if not self.grpc_port:
            raise OSError(f"cannot listen for gRPC on {s.grpc_host}:{s.grpc_port}")
        await self._grpc_server.start()
        for service in ("", "exod.v1.PeerService", "exod.v1.ClusterService"):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

        from .http_api import start_http

        self._http, self.api_port = await start_http(self, s.api_host, s.api_port)
        self.record = self._make_record(node_profile, version=1)
        self.view = state.set_self(state.View(self.node_id, s.cluster), self.record, self.available_memory, now_ms())
        await self.work.recover()
        if s.discovery:
            from .discovery import Discovery

            self.discovery = Discovery(self)
            await self.discovery.start()
        for round_fn in (self._heartbeat_round, self._exchange_round, self._tick_round, self._probe_round,
                         self._refresh_round, self._meet_round, self.models.digest_round):
            self._tasks.append(asyncio.create_task(self._forever(round_fn), name=f"exod-{round_fn.__name__}"))
        self._spawn(self.work.prestart())
        self._keep_made_key()
        log.info("started", node_id=self.node_id, name=self.record.profile.name, cluster=s.cluster,
                 grpc=self.grpc_addresses(), api=f"{s.api_host}:{self.api_port}",
                 usable_gb=round(node_profile.memory_usable_bytes / 1e9, 1))

    async def stop(self) -> None:
        """Also undoes a start that failed halfway: each part is stopped only
        if it started."""
        self.stopping = True
        await self.work.stop_all()
        await self._cancel_tasks()
        if self.view is not None:
            leave = pb.LeaveRequest(node_id=self.node_id, incarnation=self.incarnation)
            await gather_quietly(*(self._stub(a).Leave(leave, timeout=0.5) for a in self._peer_addresses()),
                                 timeout=0.7)
        if self.discovery is not None:
            await self.discovery.stop()
        if self._http is not None:
            await self._http.cleanup()
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=0.2)
            self._grpc_server = None
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()
        if self._lock_fd is not None:
            identity.unlock(self._lock_fd)
            self._lock_fd = None
        if self.view is not None:
            log.info("stopped", node_id=self.node_id)

    # ---------------------------------------------------------------- records

    def grpc_addresses(self) -> list[str]:
        host = self.settings.grpc_host
        if host not in ("0.0.0.0", "::", ""):
            return [f"{host}:{self.grpc_port}"]
        ips = [a for i in self.record.profile.interfaces or [] for a in i.addresses if i.kind != pb.LOOPBACK]
        if not ips:
            ips = [a for i in self.record.profile.interfaces for a in i.addresses] or ["127.0.0.1"]
        return [f"{ip}:{self.grpc_port}" for ip in ips]

    def _make_record(self, node_profile: pb.NodeProfile, version: int) -> pb.NodeRecord:
        record = pb.NodeRecord(profile=node_profile, version=version, incarnation=self.incarnation,
                               cluster_id=self.settings.cluster, protocol_version=PROTOCOL_VERSION,
                               api_address=f"{self.settings.api_host}:{self.api_port}")
        record.profile.version = version
        self.record = record  # grpc_addresses reads the interfaces from it
        record.grpc_addresses.extend(self.grpc_addresses())
        signing.sign(self.identity, record)
        return record

    def publish_models(self, models: list) -> None:
        """A new record when the checkpoints this node holds change."""
        if self.view is None or list(self.record.profile.models) == list(models):
            return
        fresh = pb.NodeProfile()
        fresh.CopyFrom(self.record.profile)
        del fresh.models[:]
        fresh.models.extend(models)
        self.view = state.set_self(self.view, self._make_record(fresh, self.record.version + 1),
                                   self.available_memory, now_ms())

    def known_records(self) -> tuple[list, list]:
        # A Left member's record is kept only to refuse it: sent on, it would
        # make whoever never heard the goodbye take the node for live.
        return [m.record for m in self.view.members.values() if m.status != pb.LEFT], list(self.view.links.values())

    def known_work(self) -> list:
        return list(self.view.work.values())

    def absorb(self, sender: pb.NodeRecord, records, links, direct: bool, work=()) -> None:
        """Records from an exchange. Each is applied only when it is newer
        than what the view holds and its owner's signature verifies (checked
        in that order: a stale record costs no verification)."""
        now = now_ms()
        if sender.profile.node_id == self.node_id and sender.incarnation != self.incarnation:
            # A live node with our key (a copied data dir); second-hand, it is only our past life.
            if direct and trust.node_record_problem(sender, now) is None:
                self._same_id(sender)
            return
        for record in [sender, *records]:
            self._learn(record, now)
        for link in links:
            after = state.apply_link(self.view, link)
            owner = self.view.member(link.link.from_node)
            if after is not self.view and owner is not None \
                    and trust.link_problem(link, owner.record.public_key, now) is None:
                self.view = after
        for record in work:
            owner = self.view.member(record.node_id)
            if record.node_id == self.node_id or owner is None:
                continue
            after = state.apply_work(self.view, record)
            if after is not self.view and trust.work_problem(record, owner.record.public_key, now) is None:
                self.view = after
        if direct and sender.profile.node_id != self.node_id and self.view.member(sender.profile.node_id):
            self.view = state.heard_from(self.view, sender.profile.node_id, sender.incarnation, 0, now)

    def _learn(self, record: pb.NodeRecord, now: int) -> None:
        node_id = record.profile.node_id
        if node_id == self.node_id:
            # Ours, our previous life's, or a twin's (a copied data dir): meet
            # whoever answers there, and the exchange tells twins apart.
            if record.incarnation != self.incarnation and trust.node_record_problem(record, now) is None:
                self.found([a for a in record.grpc_addresses if a not in self.grpc_addresses()])
            return
        if record.cluster_id != self.settings.cluster or record.protocol_version != PROTOCOL_VERSION:
            return
        before = self.view.member(node_id)
        changed = state.apply_record(self.view, record, now)
        if changed is self.view:
            return
        problem = trust.node_record_problem(record, now)
        if problem is None and before is None and len(self.view.members) >= self.settings.max_members:
            problem = f"the view holds {self.settings.max_members} members already (max_members)"
        if problem is not None:
            log.warning("refusing a node record", node_id=node_id[:32], reason=problem)
            return
        self.view = changed
        after = self.view.member(node_id)
        if after is not None and after is not before:
            self._candidates.setdefault(node_id, set()).update(a for a in record.grpc_addresses if valid_address(a))
            if before is None or before.record.incarnation != after.record.incarnation:
                log.info("node up", node_id=node_id, name=record.profile.name,
                         usable_gb=round(record.profile.memory_usable_bytes / 1e9, 1))
            if before is not None and before.record.incarnation != after.record.incarnation:
                # A restarted node: our channel to its old process may sit in
                # gRPC's reconnect backoff (calls refused for half a minute
                # while the node shows Up): start afresh.
                self._drop_channels({*self._candidates.get(node_id, ()), self._route.get(node_id, "")})

    def _same_id(self, other: pb.NodeRecord) -> None:
        """Two live nodes with one id (a copied data dir): the newer one takes a new id."""
        if other.incarnation >= self.incarnation:
            return  # the other is newer: it will move
        old, old_identity = self.node_id, self.identity
        self.identity = keys.issue(self.identity.ca, identity.regenerate(self.data_dir))
        self.node_id = self.identity.node_id
        # Channels present the old certificate: peers would take our calls for the old id's.
        stale, self._channels = self._channels, {}
        self._spawn(gather_quietly(*(c.close() for c in stale.values()), timeout=1.0))
        node_profile = pb.NodeProfile()
        node_profile.CopyFrom(self.record.profile)
        node_profile.node_id = self.node_id
        # The old id stays in the view as Left at our old incarnation: our old
        # record, still gossiping, must not come back to us as a live member.
        members = dict(self.view.members)
        members[old] = state.Member(self.record, pb.LEFT, now_ms())
        self.view = replace(self.view, self_id=self.node_id, members=members)
        self.view = state.set_self(self.view, self._make_record(node_profile, self.record.version + 1),
                                   self.available_memory, now_ms())
        log.warning("duplicate node id: another node started earlier with it; this node now has a new id",
                    old_id=old, new_id=self.node_id)
        # Whoever stored our record under the old id must let the earlier node have it back.
        # Only the old key may say the old id leaves: say it over channels that present it.
        self._spawn(self._leave_as(old_identity, pb.LeaveRequest(node_id=old, incarnation=self.incarnation),
                                   self._peer_addresses()))
        if self.discovery is not None:
            self._spawn(self.discovery.republish())

    async def _leave_as(self, who: keys.NodeIdentity, leave: pb.LeaveRequest, addresses: list[str]) -> None:
        channels = [transport.secure_channel(a, who) for a in addresses]
        try:
            await gather_quietly(*(transport.peer_stub(c).Leave(leave, timeout=0.5) for c in channels), timeout=0.7)
        finally:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    # ---------------------------------------------------------------- reservations

    def reserve(self, reservation: pb.Reservation, owner: str = "") -> pb.ReserveResponse:
        """Admit or refuse on this node alone; the event loop runs one at a
        time. `owner` is the node that asked, as its certificate proved."""
        pending = pb.Reservation()
        pending.CopyFrom(reservation)
        pending.owner_node_id = owner or self.node_id
        pending.expires_at_unix_ms = trust.clamp_expiry(pending.expires_at_unix_ms, now_ms(), RESERVATION_TTL_MS)
        usable = self.record.profile.memory_usable_bytes
        problem = trust.reservation_problem(pending, usable)
        if problem is not None:
            return pb.ReserveResponse(admitted=False, reason=problem, usable_bytes=usable,
                                      reserved_bytes=self.ledger.reserved_bytes())
        self.ledger, admitted, reason = reservations.admit(self.ledger, pending, usable)
        self._publish_reserved()
        port = free_ports(1, host="")[0] if admitted else 0
        if admitted:
            log.info("reserved", reservation=pending.reservation_id, instance=pending.instance_id,
                     gb=round(pending.bytes / 1e9, 2))
        return pb.ReserveResponse(admitted=admitted, reason=reason, usable_bytes=usable,
                                  reserved_bytes=self.ledger.reserved_bytes(), port=port)

    async def exchange_with_all(self) -> None:
        addresses = [a for m in self.view.peers() if m.status == pb.UP
                     if (a := self._address_of(m.record.profile.node_id))]
        await gather_quietly(*(self._exchange(a) for a in addresses), timeout=3.0)

    def host_of(self, node_id: str) -> str:
        """The address a node's ranks listen on: where its peers reach it."""
        address = self.grpc_addresses()[0] if node_id == self.node_id else self._address_of(node_id)
        return split_hostport(address)[0] if address else ""

    async def reserve_on(self, node_id: str, reservation: pb.Reservation) -> pb.ReserveResponse:
        if node_id == self.node_id:
            return self.reserve(reservation)
        return await self._stub(self._address_of(node_id)).Reserve(
            pb.ReserveRequest(reservation=reservation), timeout=5)

    async def release_on(self, node_id: str, reservation_id: str) -> None:
        if node_id == self.node_id:
            self.release(reservation_id)
            return
        await self._stub(self._address_of(node_id)).Release(pb.ReleaseRequest(reservation_id=reservation_id), timeout=5)

    async def start_on(self, node_id: str, request: pb.StartRunnerRequest) -> pb.StartRunnerResponse:
        if node_id == self.node_id:
            return await self.work.start_runner(request)
        return await self._stub(self._address_of(node_id)).StartRunner(request, timeout=600)

    async def generate_on(self, instance: pb.Instance, request: pb.GenerateRequest):
        """Chunks of one request, from whichever node runs the instance's rank 0."""
        rank0 = next(r for r in instance.placement.ranks if r.rank == 0)
        if rank0.node_id == self.node_id:
            async for chunk in self.work.generate_here(instance.instance_id, request):
                yield chunk
            return
        call = self._stub(self._address_of(rank0.node_id)).Generate(
            pb.GenerateOnInstance(instance_id=instance.instance_id, request=request), timeout=600)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            yield pb.GenerationChunk(request_id=request.request_id, finish_reason=pb.FINISH_ERROR,
                                     error=f"rank 0's node: {e.code().name} {e.details()}")
        finally:
            call.cancel()

    def member_by_ref(self, ref: str) -> str | None:
        """The id of an Up node named by its name or id."""
        for member in self.view.members.values():
            p = member.record.profile
            if ref in (p.node_id, p.name) and member.status == pb.UP:
                return p.node_id
        return None

    async def pull_on(self, node_id: str, model: str):
        """PullProgress of a whole checkpoint fetched onto a node."""
        if node_id == self.node_id:
            async for progress in self.models.pull_progress(model):
                yield progress
            return
        call = self._stub(self._address_of(node_id)).Pull(pb.PullRequest(model=model), timeout=24 * 3600)
        try:
            async for progress in call:
                yield progress
        except grpc.aio.AioRpcError as e:
            yield pb.PullProgress(error=f"node {node_id[:12]}: {e.code().name} {e.details()}")
        finally:
            call.cancel()

    async def stop_on(self, node_id: str, instance_id: str) -> None:
        if node_id == self.node_id:
            await self.work.stop_instance(instance_id)
            return
        await self._stub(self._address_of(node_id)).StopInstance(
            pb.StopInstanceRequest(instance_id=instance_id), timeout=30)

    def release(self, reservation_id: str, asked_by: str | None = None) -> bool:
        """This node releases what it holds when it likes; another node only
        what it reserved itself (`asked_by`, the id its certificate proved)."""
        held = self.ledger.held.get(reservation_id)
        if held is None or (asked_by is not None and held.owner_node_id != asked_by):
            return False
        self.ledger, released = reservations.release(self.ledger, reservation_id)
        self._publish_reserved()
        return released

    def _publish_reserved(self) -> None:
        self.view = state.heard_from(self.view, self.node_id, self.incarnation, self.available_memory, now_ms(),
                                     reserved=self.ledger.reserved_bytes())

    def on_heartbeat(self, node_id: str, incarnation: int, version: int, available: int,
                     reserved: int = 0) -> None:
        if node_id == self.node_id:
            return  # a twin shows itself through an exchange, which compares ages
        if incarnation > now_ms() + trust.MAX_SKEW_MS:
            return
        member = self.view.member(node_id)
        if member is None or (incarnation, version) > member.key or (
                member.status == pb.LEFT and incarnation != member.record.incarnation):
            self._exchange_now.add(node_id)
            if member is None:
                return
        self.view = state.heard_from(self.view, node_id, incarnation, available, now_ms(), reserved)

    def on_leave(self, node_id: str, incarnation: int) -> None:
        self.view = state.left(self.view, node_id, incarnation, now_ms())
        log.info("node left", node_id=node_id)

    def found(self, addresses: list[str], node_id: str = "") -> None:
        """Discovery or a static peer: addresses to meet a node at. At most
        MAX_PENDING_ADDRESSES wait to be met; more are dropped until some are."""
        addresses = [a for a in addresses if valid_address(a)][:trust.MAX_ADDRESSES]
        if node_id and node_id in self._candidates and node_id != self.node_id:
            self._candidates[node_id].update(addresses)
            return
        fresh = [a for a in dict.fromkeys(addresses) if a not in self._unknown]
        room = MAX_PENDING_ADDRESSES - len(self._unknown)
        if len(fresh) > room:
            log.warning("too many addresses waiting to be met; dropping some", dropped=len(fresh) - max(room, 0))
            fresh = fresh[:max(room, 0)]
        self._unknown.update(fresh)
        for address in fresh:  # meet at once; the meet loop retries
            self._spawn(self._exchange(address))

    def saw_stranger(self, address: str, reason: str, node_id: str = "") -> None:
        """A daemon that is not a member (another key, none, no TLS): kept to
        show people, bounded, and never sent anything."""
        now = now_ms()
        seen = self.strangers.get(address)
        if seen is None:
            if len(self.strangers) >= MAX_STRANGERS:
                oldest = min(self.strangers.values(), key=lambda s: s.last_seen_unix_ms)
                del self.strangers[oldest.address]
            log.info("seen, not a member", address=address, reason=reason)
            seen = self.strangers[address] = pb.Stranger(address=address, first_seen_unix_ms=now)
        seen.node_id, seen.reason, seen.last_seen_unix_ms = node_id[:32], reason[:200], now

    def cluster_state(self) -> pb.ClusterState:
        cluster = state.to_proto(self.view)
        cluster.strangers.extend(self.strangers[a] for a in sorted(self.strangers))
        return cluster

    # ---------------------------------------------------------------- peers

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = transport.secure_channel(address, self.identity)
            self._channels[address] = channel
        return channel

    def _drop_channels(self, addresses) -> None:
        stale = [self._channels.pop(a) for a in addresses if a in self._channels]
        if stale:
            self._spawn(gather_quietly(*(c.close() for c in stale), timeout=1.0))

    def _stub(self, address: str) -> pb_grpc.PeerServiceStub:
        return pb_grpc.PeerServiceStub(self._channel(address))

    def _address_of(self, node_id: str) -> str | None:
        route = self._route.get(node_id)
        if route:
            return route
        candidates = sorted(self._candidates.get(node_id, ()))
        return candidates[0] if candidates else None

    def _peer_addresses(self) -> list[str]:
        return [a for m in self.view.peers() if m.status != pb.LEFT if (a := self._address_of(m.record.profile.node_id))]

    def _spawn(self, coro) -> None:
        if self.stopping:
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: t in self._tasks and self._tasks.remove(t))

    async def _exchange(self, address: str) -> pb.ExchangeResponse | None:
        records, links = self.known_records()
        request = pb.ExchangeRequest(sender=self.record, nodes=records, links=links, work=self.known_work())
        try:
            response = await self._stub(address).Exchange(request, timeout=2.0)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.info("ignoring a node of another cluster", address=address, detail=e.details())
            elif transport.handshake_refused(e):
                self.saw_stranger(address, "TLS handshake refused: another cluster key, or none")
            return None
        self.strangers.pop(address, None)
        responder = response.responder
        if responder.cluster_id != self.settings.cluster or responder.protocol_version != PROTOCOL_VERSION:
            log.info("ignoring node", address=address, cluster=responder.cluster_id,
                     protocol=responder.protocol_version)
            return None
        self.absorb(responder, response.nodes, response.links, direct=True, work=response.work)
        if responder.profile.node_id and responder.profile.node_id != self.node_id and valid_address(address):
            self._candidates.setdefault(responder.profile.node_id, set()).add(address)
        return response

    async def _cancel_tasks(self, within_s: float = 1.0) -> None:
        """Cancel every owned task, and again while any lives on: on Python
        3.11 asyncio.wait_for can swallow a cancel that lands as its inner
        call completes."""
        deadline = asyncio.get_running_loop().time() + within_s
        while pending := [t for t in self._tasks if not t.done()]:
            for task in pending:
                task.cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("tasks still running at stop", tasks=[t.get_name() for t in pending])
                break
            await asyncio.wait(pending, timeout=min(0.1, left))
        self._tasks.clear()

    async def _forever(self, round_fn) -> None:
        """Run one background round after another. A failing round is logged
        and retried: a loop must never die silently."""
        while not self.stopping:
            try:
                pause = await round_fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background round failed; retrying", loop=round_fn.__name__)
                pause = 1.0
            await asyncio.sleep(pause)

    async def _meet_round(self) -> float:
        """Addresses from --peer and discovery whose node we do not know yet.
        Static peers stay on the list (a restarted peer is met again);
        discovered ones are dropped once met or after UNKNOWN_EXPIRY_S."""
        pending = list(self._unknown)
        results = await gather_quietly(*(self._exchange(a) for a in pending), timeout=3.0)
        now = time.monotonic()
        for address, result in zip(pending, results):
            if address in self.settings.peers:
                continue
            first = self._unknown_since.setdefault(address, now)
            if isinstance(result, pb.ExchangeResponse) or now - first > UNKNOWN_EXPIRY_S:
                self._unknown.discard(address)
                self._unknown_since.pop(address, None)
        return 0.2 if self._unknown - set(self.settings.peers) else 1.0

    async def _heartbeat_round(self) -> float:
        self._rounds += 1
        request = pb.HeartbeatRequest(node_id=self.node_id, incarnation=self.incarnation,
                                      version=self.record.version, cluster_id=self.settings.cluster,
                                      memory_available_bytes=self.available_memory,
                                      memory_reserved_bytes=self.ledger.reserved_bytes())
        # Down peers are asked less often, and no round waits longer than the
        # period, so one dead peer never delays the others' heartbeats.
        peers = [m for m in self.view.peers()
                 if m.status not in (pb.LEFT, pb.DOWN) or self._rounds % DOWN_HEARTBEAT_EVERY == 0]
        await gather_quietly(*(self._heartbeat(m.record.profile.node_id, request) for m in peers),
                             timeout=self.settings.heartbeat_s)
        for node_id in list(self._exchange_now):
            self._exchange_now.discard(node_id)
            if (address := self._address_of(node_id)) is not None:
                self._spawn(self._exchange(address))
        return self.settings.heartbeat_s

    async def _heartbeat(self, node_id: str, request: pb.HeartbeatRequest) -> None:
        route = self._address_of(node_id)
        candidates = [route] + sorted(self._candidates.get(node_id, set()) - {route})
        for address in filter(None, candidates):
            try:
                response = await self._stub(address).Heartbeat(request, timeout=self.settings.heartbeat_s)
            except grpc.aio.AioRpcError:
                if self._route.get(node_id) == address:
                    self._route.pop(node_id, None)  # try the others next time
                continue
            if response.node_id != node_id:
                continue  # someone else answers there now
            member = self.view.member(node_id)
            if member is not None and ((response.incarnation, response.version) > member.key
                                       or member.status == pb.LEFT):
                self._exchange_now.add(node_id)
            self.view = state.heard_from(self.view, node_id, response.incarnation,
                                         response.memory_available_bytes, now_ms(), response.memory_reserved_bytes)
            return

    async def _exchange_round(self) -> float:
        await self.exchange_with_all()
        await self._forget_stale()
        return self.settings.exchange_s

    async def _forget_stale(self) -> None:
        """Addresses and channels of nodes the view has forgotten."""
        for node_id in set(self._candidates) - set(self.view.members):
            self._candidates.pop(node_id, None)
            self._route.pop(node_id, None)
            self._link_versions.pop(node_id, None)
        wanted = set(self._unknown).union(*self._candidates.values()) if self._candidates else set(self._unknown)
        for address in set(self._channels) - wanted:
            await self._channels.pop(address).close()

    async def _tick_round(self) -> float:
        before = {k: m.status for k, m in self.view.members.items()}
        self.work.supervise()
        lapsed = reservations.expire(self.ledger, now_ms())
        if lapsed is not self.ledger:
            self.ledger = lapsed
            self._publish_reserved()
        self.view = state.tick(self.view, now_ms(), self.timing)
        for node_id, member in self.view.members.items():
            if before.get(node_id) not in (None, member.status):
                log.info("node status", node_id=node_id, name=member.record.profile.name,
                         status=pb.NodeStatus.Name(member.status))
        return 0.1

    async def _refresh_round(self) -> float:
        self._refreshes += 1
        self.available_memory = await asyncio.to_thread(profile.available_memory)
        self.view = state.heard_from(self.view, self.node_id, self.incarnation, self.available_memory, now_ms())
        if self._refreshes % 10 == 0:  # static fields: sent again only when they change
            node_id = self.node_id
            fresh = await asyncio.to_thread(profile.collect, node_id, self.settings.name,
                                            self.settings.memory_limit, self.settings.interfaces, self.data_dir)
            if node_id != self.node_id:
                return self.settings.profile_refresh_s  # the id changed meanwhile
            fresh.memory_available_bytes = self.record.profile.memory_available_bytes
            fresh.version = self.record.profile.version
            fresh.memory_bandwidth_bytes_per_s = self.record.profile.memory_bandwidth_bytes_per_s
            fresh.models.extend(self.record.profile.models)  # kept current by publish_models
            if fresh != self.record.profile:
                self.view = state.set_self(self.view, self._make_record(fresh, self.record.version + 1),
                                           self.available_memory, now_ms())
        return self.settings.profile_refresh_s

    # ---------------------------------------------------------------- links

    async def _probe_round(self) -> float:
        """The lower id of each pair measures the link on every address of the
        other and keeps the fastest; both ends then use that address pair.
        New peers are probed at once, known links every rtt_probe_s."""
        due = now_ms() - int(self.settings.rtt_probe_s * 1000)
        owned = []
        for member in self.view.peers():
            other = member.record.profile.node_id
            if member.status != pb.UP or other < self.node_id:
                continue
            link = self.view.links.get((self.node_id, other))
            if link is None or link.link.measured_at_unix_ms <= due:
                owned.append(other)
        await gather_quietly(*(self._probe(other) for other in owned), timeout=30.0)
        for member in self.view.peers():
            other = member.record.profile.node_id
            link = self.view.links.get((other, self.node_id))
            if link is not None and link.link.from_address in self._candidates.get(other, ()):
                self._route[other] = link.link.from_address
        return 0.5

    async def _probe(self, node_id: str) -> None:
        probes = []
        for address in sorted(self._candidates.get(node_id, ())):
            try:
                rtt = await measure_rtt(self._stub(address), node_id)
                probes.append(pb.AddressProbe(address=address, rtt_s=rtt, reachable=True))
            except grpc.aio.AioRpcError as e:
                probes.append(pb.AddressProbe(address=address, reachable=False, error=e.code().name))
            except WrongNode as e:
                probes.append(pb.AddressProbe(address=address, reachable=False, error=str(e)))
        reachable = [p for p in probes if p.reachable]
        if not reachable:
            return
        best = min(reachable, key=lambda p: p.rtt_s)
        self._route[node_id] = best.address
        host, _ = split_hostport(best.address)
        now = time.monotonic()
        measured_at, bandwidth = self._last_throughput.get(best.address, (0.0, 0.0))
        if now - measured_at >= self.settings.throughput_probe_s or not bandwidth:
            try:
                bandwidth = await measure_throughput(self._stub(best.address), THROUGHPUT_PROBE_BYTES, 20.0)
                self._last_throughput[best.address] = (now, bandwidth)
            except grpc.aio.AioRpcError:
                pass
        local = await asyncio.to_thread(local_address_towards, host)
        # Versions outlive restarts: a restarted node's links must win over its old ones.
        version = max(self._link_versions.get(node_id, 0) + 1, now_ms())
        self._link_versions[node_id] = version
        link = pb.Link(from_node=self.node_id, to_node=node_id,
                       from_address=f"{local}:{self.grpc_port}" if local else "", to_address=best.address,
                       rtt_s=best.rtt_s, bandwidth_bytes_per_s=bandwidth, measured_at_unix_ms=now_ms(),
                       probes=probes)
        record = pb.LinkRecord(link=link, version=version)
        signing.sign(self.identity, record)
        self.view = state.apply_link(self.view, record)


async def serve(settings: Settings, ready_line: bool = True) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly."""
    import signal

    node = Node(settings)
    await node.start()
    if ready_line:
        print(json.dumps({"event": "listening", "node_id": node.node_id, "grpc_port": node.grpc_port,
                          "api": f"http://{settings.api_host}:{node.api_port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    try:
        await asyncio.wait_for(node.stop(), timeout=1.8)
    except asyncio.TimeoutError:
        log.warning("stop took too long; exiting anyway")
    sys.stdout.flush()
