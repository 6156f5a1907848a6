"""The peer plane's transport: gRPC over mutual TLS with certificates from
the cluster CA (daemon/keys.py), channel and server options, and the
identity a caller proved.

Every connection, in both directions, is authenticated and encrypted: the
server asks for a client certificate and refuses a handshake without one
the cluster CA issued, and a client accepts only a server that presents
one. A machine without the cluster key gets no further than the handshake.
Which member is on the other end is the hash of the key its certificate
carries (`caller_id`), never a name it chose."""

from collections import OrderedDict

import grpc

from exod.proto import exod_pb2_grpc as pb_grpc

from . import keys

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Clients ping every 10 s when idle; the server allows one every 5 s, so it
# never answers with GOAWAY too_many_pings.
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    # A peer that comes back is retried within 2 s (gRPC's default backoff
    # grows to 120 s); a restarted one also gets a fresh channel (node.py).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Peers are reached by address; every member's certificate names this.
    ("grpc.ssl_target_name_override", keys.PEER_NAME),
]
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share it
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    # Pings never cost a member its connection: BDP probes under many streams
    # at once counted as strikes and drew GOAWAY too_many_pings.
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A handshake that never completes must not hold a connection for long
    # (generous: a busy 2-core machine completes many at once slowly).
    ("grpc.server_handshake_timeout_ms", 20_000),
    ("grpc.max_concurrent_streams", 256),
]


def server_credentials(identity: keys.NodeIdentity) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)],
                                       root_certificates=identity.ca.pem, require_client_auth=True)


def channel_credentials(identity: keys.NodeIdentity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=identity.ca.pem, private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)


def secure_channel(address: str, identity: keys.NodeIdentity) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, channel_credentials(identity), options=CLIENT_OPTIONS)


def peer_stub(channel: grpc.aio.Channel) -> pb_grpc.PeerServiceStub:
    return pb_grpc.PeerServiceStub(channel)


_ids: "OrderedDict[bytes, str]" = OrderedDict()  # certificate PEM -> node id, the most recent few


def caller_id(context) -> str:
    """The node id the caller proved in the TLS handshake ("" when none:
    only possible on a listener without TLS, which exod never opens)."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        return ""
    pem = pems[0]
    found = _ids.get(pem)
    if found is None:
        found = keys.node_id_from_cert_pem(pem)
        _ids[pem] = found
        if len(_ids) > 256:
            _ids.popitem(last=False)
    else:
        _ids.move_to_end(pem)
    return found


def handshake_refused(error: grpc.aio.AioRpcError) -> bool:
    """An RPC that failed because the other end is not of this cluster key
    (or speaks no TLS): the address belongs to a stranger, not a dead peer."""
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and (
        "handshake" in details or "certificate" in details or "ssl" in details or "tls" in details)
