"""Signed records: node, link and work records carry their owner's
signature, so that a record passed on second hand (or by a member that
lies) is accepted only when its owner wrote it.

A signature covers the record serialized deterministically with its
`signature` field empty. Freshness is the record's own (incarnation,
version), which the receiver compares with what it holds: a record
replayed later is older than the one it replaced and changes nothing."""

from exod.proto import exod_pb2 as pb

from . import keys


def _payload(message) -> bytes:
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.signature = b""
    return unsigned.SerializeToString(deterministic=True)


def sign(identity: keys.NodeIdentity, message) -> None:
    """Sign a NodeRecord, LinkRecord or WorkRecord in place."""
    if isinstance(message, pb.NodeRecord):
        message.public_key = identity.public_key_der
    message.signature = identity.sign(_payload(message))


def node_record_valid(record: pb.NodeRecord) -> bool:
    """Its key hashes to its node id, and that key signed it."""
    return (bool(record.public_key) and keys.node_id_of(record.public_key) == record.profile.node_id
            and keys.verify(record.public_key, record.signature, _payload(record)))


def signed_by(public_key_der: bytes, message) -> bool:
    return bool(public_key_der) and keys.verify(public_key_der, message.signature, _payload(message))
