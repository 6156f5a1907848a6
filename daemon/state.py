"""The cluster view and the pure reducer that changes it. No I/O, no clocks:
every function takes `now_ms` and returns a new View.

Each node writes only its own NodeRecord and the links it measures. A record
replaces another of the same owner when its (incarnation, version) is
higher, so a restarted node's records win over its previous life's. Status
is each observer's own judgement from the heartbeats it receives."""

from dataclasses import dataclass, field, replace

from exod.proto import exod_pb2 as pb


MAX_DEPARTED = 4  # earlier lives remembered per id


@dataclass(frozen=True)
class Timing:
    suspect_after_ms: int = 1500
    down_after_ms: int = 3000
    forget_after_ms: int = 3_600_000  # Down or Left this long: dropped from the view


@dataclass(frozen=True)
class Member:
    record: pb.NodeRecord
    status: int = pb.UP
    last_seen_ms: int = 0
    memory_available_bytes: int = 0
    memory_reserved_bytes: int = 0
    # Earlier lives of this id that said goodbye (a copied data dir's twin
    # that moved to a new id): their records, still gossiping, never return.
    departed: tuple = ()

    @property
    def key(self) -> tuple[int, int]:
        return (self.record.incarnation, self.record.version)


@dataclass(frozen=True)
class View:
    self_id: str
    cluster_id: str
    members: dict = field(default_factory=dict)  # node id -> Member
    links: dict = field(default_factory=dict)    # (from, to) -> LinkRecord
    work: dict = field(default_factory=dict)     # node id -> WorkRecord (runners, owned instances)

    def member(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def peers(self) -> list[Member]:
        return [m for node_id, m in sorted(self.members.items()) if node_id != self.self_id]


def _with_member(view: View, member: Member) -> View:
    members = dict(view.members)
    members[member.record.profile.node_id] = member
    return replace(view, members=members)


def set_self(view: View, record: pb.NodeRecord, available: int, now_ms: int) -> View:
    current = view.members.get(record.profile.node_id)
    reserved = current.memory_reserved_bytes if current is not None else 0
    return _with_member(view, Member(record, pb.UP, now_ms, available, reserved))


def apply_record(view: View, record: pb.NodeRecord, now_ms: int) -> View:
    """A node's record, from itself or second hand. Other clusters' records
    and stale ones change nothing."""
    node_id = record.profile.node_id
    if not node_id or record.cluster_id != view.cluster_id or node_id == view.self_id:
        return view
    current = view.members.get(node_id)
    key = (record.incarnation, record.version)
    if current is not None and record.incarnation in current.departed:
        return view
    if current is not None and current.status == pb.LEFT and record.incarnation != current.record.incarnation:
        # Whoever held that incarnation is gone; any other life of the id may
        # come back, even an older one (the original of a copied data dir).
        departed = (*current.departed, current.record.incarnation)[-MAX_DEPARTED:]
        return _with_member(view, Member(record, pb.UP, now_ms, record.profile.memory_available_bytes,
                                         departed=departed))
    if current is not None and key <= current.key:
        return view
    if current is None or record.incarnation > current.record.incarnation:
        # New, or restarted: up until its heartbeats say otherwise.
        return _with_member(view, Member(record, pb.UP, now_ms, record.profile.memory_available_bytes,
                                         departed=current.departed if current is not None else ()))
    return _with_member(view, replace(current, record=record))


def apply_link(view: View, link: pb.LinkRecord) -> View:
    key = (link.link.from_node, link.link.to_node)
    if not all(key) or key[0] == key[1]:
        return view
    current = view.links.get(key)
    if current is not None and link.version <= current.version:
        return view
    links = dict(view.links)
    links[key] = link
    return replace(view, links=links)


def apply_work(view: View, record: pb.WorkRecord) -> View:
    current = view.work.get(record.node_id)
    if not record.node_id or (current is not None and record.version <= current.version):
        return view
    return replace(view, work={**view.work, record.node_id: record})


def instances(view: View) -> list[pb.Instance]:
    """Every owned instance, with each rank's latest status from the node that runs it."""
    # A rank's status counts only from the node its placement put it on: a
    # member cannot fail (or ready) a rank that runs elsewhere.
    statuses = {}
    for node_id, record in view.work.items():
        for runner in record.runners:
            statuses[(runner.instance_id, runner.rank, node_id)] = runner
    found = []
    for node_id in sorted(view.work):
        for owned in view.work[node_id].instances:
            instance = pb.Instance()
            instance.CopyFrom(owned)
            del instance.runners[:]
            # A rank without a status has not started yet, or was stopped with its instance.
            absent = pb.SHUTDOWN if owned.state in (pb.INSTANCE_FAILED, pb.INSTANCE_STOPPED) else pb.IDLE
            for rank in owned.placement.ranks:
                status = statuses.get((owned.instance_id, rank.rank, rank.node_id))
                instance.runners.append(status or pb.RunnerStatus(instance_id=owned.instance_id, rank=rank.rank,
                                                                  node_id=rank.node_id, state=absent))
            found.append(instance)
    return found


def instance(view: View, instance_id: str) -> "pb.Instance | None":
    return next((i for i in instances(view) if i.instance_id == instance_id), None)


def heard_from(view: View, node_id: str, incarnation: int, available: int, now_ms: int,
               reserved: int | None = None) -> View:
    """A direct answer from the node (heartbeat, exchange): it is up, with
    this much memory free and reserved (None: not said)."""
    current = view.members.get(node_id)
    if current is None or incarnation < current.record.incarnation:
        return view
    if current.status == pb.LEFT and incarnation == current.record.incarnation:
        return view  # a late message from a node that already said goodbye
    return _with_member(view, replace(current, status=pb.UP, last_seen_ms=now_ms,
                                      memory_available_bytes=available or current.memory_available_bytes,
                                      memory_reserved_bytes=current.memory_reserved_bytes if reserved is None
                                      else reserved))


def left(view: View, node_id: str, incarnation: int, now_ms: int) -> View:
    current = view.members.get(node_id)
    if current is None or incarnation < current.record.incarnation or node_id == view.self_id:
        return view
    return _with_member(view, replace(current, status=pb.LEFT, last_seen_ms=now_ms))


def tick(view: View, now_ms: int, timing: Timing) -> View:
    """Up -> Suspect -> Down as heartbeats stay missing; nodes Down or Left
    for forget_after_ms leave the view, with their links."""
    changed, forgotten = {}, set()
    for node_id, member in view.members.items():
        if node_id == view.self_id:
            continue
        if member.status in (pb.LEFT, pb.DOWN):
            if now_ms - member.last_seen_ms >= timing.forget_after_ms:
                forgotten.add(node_id)
            continue
        silent = now_ms - member.last_seen_ms
        status = pb.DOWN if silent >= timing.down_after_ms else pb.SUSPECT if silent >= timing.suspect_after_ms \
            else member.status
        if status != member.status:
            changed[node_id] = replace(member, status=status)
    if not changed and not forgotten:
        return view
    members = {k: v for k, v in {**view.members, **changed}.items() if k not in forgotten}
    links = {k: v for k, v in view.links.items() if not (set(k) & forgotten)}
    work = {k: v for k, v in view.work.items() if k not in forgotten}
    return replace(view, members=members, links=links, work=work)


def to_proto(view: View) -> pb.ClusterState:
    state = pb.ClusterState(cluster_id=view.cluster_id, self_id=view.self_id)
    for node_id in sorted(view.members):
        m = view.members[node_id]
        state.nodes.append(pb.NodeState(record=m.record, status=m.status, last_seen_unix_ms=m.last_seen_ms,
                                        memory_available_bytes=m.memory_available_bytes,
                                        memory_reserved_bytes=m.memory_reserved_bytes))
    for key in sorted(view.links):
        state.links.append(view.links[key].link)
    state.instances.extend(instances(view))
    return state


def cluster_for_planner(view: View) -> pb.Cluster:
    """The nodes that are up, with their current free memory and what is not
    yet reserved, and the links between them: what the planner plans onto."""
    cluster = pb.Cluster()
    up = {node_id for node_id, m in view.members.items() if m.status == pb.UP}
    for node_id in sorted(up):
        member = view.members[node_id]
        profile = pb.NodeProfile()
        profile.CopyFrom(member.record.profile)
        profile.memory_available_bytes = member.memory_available_bytes or profile.memory_available_bytes
        profile.memory_usable_bytes = max(0, profile.memory_usable_bytes - member.memory_reserved_bytes)
        cluster.nodes.append(profile)
    for (a, b), record in sorted(view.links.items()):
        if a in up and b in up:
            cluster.links.append(record.link)
    return cluster
