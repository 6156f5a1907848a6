"""mDNS: advertise `_exod._tcp.local.` and browse for other nodes with
python-zeroconf's asyncio API. The TXT record carries only the node id, the
gRPC port, the protocol version, the cluster id and the cluster key's public
fingerprint; profiles travel over gRPC. Nodes of another cluster or protocol
are ignored with a log line; a node of another cluster key (or none) is
shown as seen, not a member, and never contacted."""

import asyncio
import ipaddress
import re
import socket

import structlog
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .config import PROTOCOL_VERSION
from .identity import NODE_ID

log = structlog.get_logger("exod.discovery")
SERVICE_TYPE = "_exod._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
CLUSTER = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
DIGITS = re.compile(r"^[0-9]{1,5}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")


class Discovery:
    def __init__(self, node):
        self.node = node
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()

    def _service_info(self) -> AsyncServiceInfo:
        node = self.node
        addresses = [socket.inet_aton(a.rsplit(":", 1)[0]) for a in node.grpc_addresses()
                     if ipaddress.ip_address(a.rsplit(":", 1)[0]).version == 4]
        return AsyncServiceInfo(
            SERVICE_TYPE, f"exod-{node.node_id}.{SERVICE_TYPE}", port=node.grpc_port, addresses=addresses,
            properties={"id": node.node_id, "grpc": str(node.grpc_port), "pv": str(PROTOCOL_VERSION),
                        "cluster": node.settings.cluster, "ck": node.identity.ca.fingerprint},
        )

    async def start(self) -> None:
        interfaces = [a.rsplit(":", 1)[0] for a in self.node.grpc_addresses()]
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        # Browse first: meeting the others does not wait for our own announcement.
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._info = self._service_info()
        # The instance name holds the node id, so the RFC 6762 probe for a name
        # conflict (~750 ms) is skipped; a copied id is caught over gRPC.
        await self._zc.async_register_service(self._info, allow_name_change=True, cooperating_responders=True)

    async def republish(self) -> None:
        if self._zc is None:
            return
        await self._zc.async_unregister_service(self._info)
        self._info = self._service_info()
        await self._zc.async_register_service(self._info, allow_name_change=True, cooperating_responders=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(self._resolve(service_type, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        try:
            await self._resolve_once(service_type, name)
        except asyncio.CancelledError:
            raise
        except Exception:  # one odd record must not stop discovery
            log.exception("mDNS record failed to resolve", service=name)

    async def _resolve_once(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        peer = parse_txt(info.properties or {})
        if isinstance(peer, str):
            log.warning("ignoring an mDNS record", service=name, reason=peer)
            return
        node_id, port, protocol, cluster, fingerprint = peer
        addresses = [f"{a}:{port}" for a in info.parsed_addresses(IPVersion.V4Only)]
        if node_id == self.node.node_id and set(addresses) <= set(self.node.grpc_addresses()):
            return  # ourselves (the same id elsewhere is a copied data dir: met, then told apart)
        if fingerprint != self.node.identity.ca.fingerprint:
            for address in addresses[:4]:
                self.node.saw_stranger(address, "another cluster key" if fingerprint else "no cluster key", node_id)
            return
        if cluster != self.node.settings.cluster:
            log.info("ignoring a node of another cluster", service=name, cluster=cluster)
            return
        if protocol != PROTOCOL_VERSION:
            log.info("ignoring a node with another protocol version", service=name, protocol=protocol)
            return
        if addresses:
            self.node.found(addresses, node_id)


def parse_txt(properties: dict) -> tuple[str, int, int, str, str] | str:
    """(node id, gRPC port, protocol version, cluster, key fingerprint or "")
    or why the record is unusable."""
    def text(key):
        value = properties.get(key.encode())
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else None

    node_id, port, protocol, cluster = text("id"), text("grpc"), text("pv"), text("cluster")
    fingerprint = text("ck") or ""
    if node_id is None or not NODE_ID.match(node_id):
        return f"bad or missing node id {node_id!r}"
    if port is None or not DIGITS.match(port) or not 0 < int(port) < 65536:
        return f"bad or missing gRPC port {port!r}"
    if protocol is None or not DIGITS.match(protocol):
        return f"bad or missing protocol version {protocol!r}"
    if cluster is None or not CLUSTER.match(cluster):
        return f"bad or missing cluster id {cluster!r}"
    if fingerprint and not FINGERPRINT.match(fingerprint):
        return f"bad cluster key fingerprint {fingerprint!r}"
    return node_id, int(port), int(protocol), cluster, fingerprint
