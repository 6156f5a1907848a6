"""Who may change the cluster (place, delete): a client on this machine, or
one that presents the daemon's bearer token. The same rule for HTTP and
gRPC, so that a daemon on a LAN never lets a passer-by start processes."""

import hmac
import ipaddress


def may_mutate(remote_ip: str, authorization: str, token: str) -> bool:
    try:
        if ipaddress.ip_address(remote_ip).is_loopback:
            return True
    except ValueError:
        pass
    return bool(token) and hmac.compare_digest(authorization or "", f"Bearer {token}")


def grpc_peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' or 'ipv6:[::1]:5000' -> the address alone."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""  # unix sockets and the like are not loopback addresses
