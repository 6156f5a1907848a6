"""What a record or request from another node must satisfy before this node
acts on it: a valid owner signature, and figures within bounds. Pure: the
caller passes the time.

Every bound is far above what a real cluster produces and low enough that
one member (or a stolen key) cannot grow another node's view, block a
node's record forever, or hold memory for good."""

import re

from exod.proto import exod_pb2 as pb

from . import signing

MAX_SKEW_MS = 5 * 60_000          # clocks of members may differ this much
MAX_RECORD_VERSION = 2**40        # node record versions count changes from 1
MAX_ADDRESSES = 16                # gRPC addresses in one node record
MAX_INTERFACES = 32
MAX_TEXT = 256                    # a node's name, chip, os
MAX_RESERVATION_TTL_MS = 10 * 60_000
MAX_WORLD_SIZE = 64
MAX_RUNNERS_PER_RECORD = 256
MAX_INSTANCES_PER_RECORD = 256

MAX_HOLDINGS = 64                 # checkpoints one node publishes
MAX_HELD_FILES = 2048             # files over all of them: a record stays far below the 4 MiB message
MAX_FILE_NAME = 1024

INSTANCE_ID = re.compile(r"^[0-9a-f]{12}$")


def node_record_problem(record: pb.NodeRecord, now_ms: int) -> str | None:
    """Why this node record must be refused, or None."""
    profile = record.profile
    if record.incarnation <= 0 or record.incarnation > now_ms + MAX_SKEW_MS:
        return f"incarnation {record.incarnation} is not a start time up to now + {MAX_SKEW_MS // 1000} s"
    if not 0 < record.version <= MAX_RECORD_VERSION:
        return f"version {record.version} is out of range"
    if len(record.grpc_addresses) > MAX_ADDRESSES or len(profile.interfaces) > MAX_INTERFACES:
        return "too many addresses"
    if any(len(text) > MAX_TEXT for text in (profile.name, profile.chip, profile.os, record.api_address)):
        return "a text field is too long"
    if len(profile.models) > MAX_HOLDINGS or sum(len(h.files) for h in profile.models) > MAX_HELD_FILES:
        return f"more than {MAX_HOLDINGS} models or {MAX_HELD_FILES} model files"
    if any(len(h.model_id) > MAX_TEXT or len(h.revision) > 64 or len(h.store) > 16
           or any(len(f.name) > MAX_FILE_NAME or len(f.sha256) > 64 for f in h.files) for h in profile.models):
        return "a model field is too long"
    if not signing.node_record_valid(record):
        return "its signature does not verify, or its key is not its node id's"
    return None


def link_problem(link: pb.LinkRecord, owner_key: bytes, now_ms: int) -> str | None:
    if link.version > now_ms + MAX_SKEW_MS:
        return "version from the future"
    if len(link.link.probes) > MAX_ADDRESSES:
        return "too many probes"
    if not signing.signed_by(owner_key, link):
        return "not signed by link.from_node"
    return None


def work_problem(work: pb.WorkRecord, owner_key: bytes, now_ms: int) -> str | None:
    if work.version > now_ms + MAX_SKEW_MS:
        return "version from the future"
    if len(work.runners) > MAX_RUNNERS_PER_RECORD or len(work.instances) > MAX_INSTANCES_PER_RECORD:
        return "too many runners or instances"
    if any(r.node_id != work.node_id for r in work.runners):
        return "a runner status names another node"
    if not signing.signed_by(owner_key, work):
        return "not signed by its node"
    return None


def reservation_problem(reservation: pb.Reservation, usable: int) -> str | None:
    if not INSTANCE_ID.match(reservation.instance_id):
        return "instance id must be 12 lowercase hex digits"
    if reservation.reservation_id != f"{reservation.instance_id}-{reservation.rank}":
        return "reservation id must be INSTANCE-RANK"
    if reservation.rank >= MAX_WORLD_SIZE:
        return f"rank must be below {MAX_WORLD_SIZE}"
    if not 0 < reservation.bytes <= usable:
        return f"needs {reservation.bytes} bytes, this node has {usable} usable"
    return None


def clamp_expiry(expires_at_ms: int, now_ms: int, default_ttl_ms: int) -> int:
    """An unconfirmed reservation always lapses, and soon."""
    if expires_at_ms <= now_ms:
        return now_ms + default_ttl_ms
    return min(expires_at_ms, now_ms + MAX_RESERVATION_TTL_MS)


def spec_problem(spec: pb.RunnerSpec) -> str | None:
    if not INSTANCE_ID.match(spec.instance_id):
        return "instance id must be 12 lowercase hex digits"
    if not 0 < spec.world_size <= MAX_WORLD_SIZE or spec.rank >= spec.world_size:
        return f"needs 0 <= rank < world_size <= {MAX_WORLD_SIZE}"
    if spec.backend in (pb.RING, pb.BACKEND_UNSPECIFIED) and spec.world_size > 1 \
            and len(spec.hosts) != spec.world_size:
        return "ring needs one host per rank"
    if len(spec.hosts) > MAX_WORLD_SIZE or len(spec.pipeline_layers) > MAX_WORLD_SIZE:
        return "too many hosts or stages"
    if spec.shares and len(spec.shares) != spec.world_size:
        return "shares name one count of grains per rank"
    if spec.world_size > 1 and len(spec.rendezvous_secret) < 32:
        return "a multi-rank spec needs its instance's rendezvous secret"
    return None
