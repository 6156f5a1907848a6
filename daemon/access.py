"""Who may change the cluster (place, delete): a client on this machine, or
one that presents the daemon's bearer token. The same rule for HTTP and
gRPC, so that a daemon on a LAN never lets a passer-by start processes."""

import hmac
import ipaddress


def is_loopback(remote_ip: str) -> bool:
    try:
        return ipaddress.ip_address(remote_ip).is_loopback
    except ValueError:
        return False


def may_mutate(remote_ip: str, authorization: str, token: str) -> bool:
    if is_loopback(remote_ip):
        return True
    # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError, so a
    # 500), and HTTP servers hand over odd header bytes as surrogate escapes.
    presented = (authorization or "").encode("utf-8", "surrogateescape")
    return bool(token) and hmac.compare_digest(presented, f"Bearer {token}".encode("utf-8", "surrogateescape"))


def grpc_peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' or 'ipv6:[::1]:5000' -> the address alone."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""  # unix sockets and the like are not loopback addresses
