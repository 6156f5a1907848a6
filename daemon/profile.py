"""What this node is: from psutil and the OS (/proc and /sys on Linux,
sysctl and networksetup on macOS). Blocking calls; the daemon runs them in
a worker thread."""

import ipaddress
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

from exod.proto import exod_pb2 as pb

from . import calibration

# Unified-memory bandwidth of Apple chips, bytes/s, from Apple's published
# specifications (apple.com/mac/compare, and each chip's press release).
APPLE_BANDWIDTH = {
    "Apple M1": 68.25e9, "Apple M1 Pro": 200e9, "Apple M1 Max": 400e9, "Apple M1 Ultra": 800e9,
    "Apple M2": 100e9, "Apple M2 Pro": 200e9, "Apple M2 Max": 400e9, "Apple M2 Ultra": 800e9,
    "Apple M3": 100e9, "Apple M3 Pro": 150e9, "Apple M3 Max": 400e9, "Apple M3 Ultra": 819e9,
    "Apple M4": 120e9, "Apple M4 Pro": 273e9, "Apple M4 Max": 546e9,
}
# Linux has no working-set limit to read: leave this share of RAM to the OS.
LINUX_USABLE_FRACTION = 0.85


def chip() -> str:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str], timeout: float = 3.0) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# macOS before a Metal device answers: Apple's working set is about this share.
MAC_FALLBACK_USABLE_FRACTION = 0.75


def metal_working_set(platform_name: str = sys.platform) -> int:
    """Metal's recommended working set (what the GPU may wire, following the
    iogpu.wired_limit_mb sysctl); 0 off macOS or without a Metal device."""
    if platform_name != "darwin":
        return 0
    try:
        import mlx.core as mx

        # mx.device_info() replaced mx.metal.device_info() (deprecated in MLX 0.29).
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return int(info.get("max_recommended_working_set_size") or 0)
    except Exception:
        return 0


def usable_memory(total: int, working_set: int, platform_name: str = sys.platform) -> int:
    """What exod may plan onto: the working set on a Mac (beyond it, a rank
    pages), a share of RAM elsewhere."""
    if platform_name == "darwin":
        return working_set or int(total * MAC_FALLBACK_USABLE_FRACTION)
    return int(total * LINUX_USABLE_FRACTION)


def measured_bandwidth(cache: Path, name: str) -> float:
    """A short copy benchmark (read + write), cached per chip in the data dir."""
    try:
        cached = json.loads(cache.read_text())
        if cached.get("chip") == name:
            return float(cached["bytes_per_s"])
    except (OSError, ValueError, KeyError):
        pass
    import numpy as np

    src = np.ones(64 * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    rate = 2 * src.nbytes / best
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"chip": name, "bytes_per_s": rate}))
    except OSError:
        pass
    return rate


def _mac_port_kinds() -> dict[str, int]:
    return parse_hardware_ports(_run(["networksetup", "-listallhardwareports"]))


def parse_hardware_ports(text: str) -> dict[str, int]:
    """Device -> kind from `networksetup -listallhardwareports`. "Thunderbolt
    Ethernet" (an Ethernet adapter on a Thunderbolt port) is Ethernet; a
    Thunderbolt port or the Thunderbolt Bridge is Thunderbolt."""
    kinds, port = {}, ""
    for line in text.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip().lower()
        elif line.startswith("Device:"):
            device = line.split(":", 1)[1].strip()
            kinds[device] = (pb.WIFI if "wi-fi" in port or "airport" in port
                             else pb.ETHERNET if "ethernet" in port or "lan" in port
                             else pb.THUNDERBOLT if "thunderbolt" in port else pb.OTHER)
    return kinds


def interface_kind(name: str, mac_kinds: dict, platform_name: str = sys.platform) -> int:
    if name == "lo" or name.startswith("lo0"):
        return pb.LOOPBACK
    if platform_name == "darwin":
        return mac_kinds.get(name, pb.OTHER)
    sys_net = Path("/sys/class/net") / name
    if (sys_net / "wireless").exists() or (sys_net / "phy80211").exists():
        return pb.WIFI
    driver = (sys_net / "device" / "driver")
    if "thunderbolt" in name or (driver.exists() and "thunderbolt" in os.path.realpath(driver)):
        return pb.THUNDERBOLT
    if (sys_net / "device").exists():
        return pb.ETHERNET
    return pb.OTHER


def interfaces(only: list[str]) -> list[pb.NetworkInterface]:
    mac_kinds = _mac_port_kinds() if sys.platform == "darwin" else {}
    stats = psutil.net_if_stats()
    found = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if only and name not in only:
            continue
        if name in stats and not stats[name].isup:
            continue
        v4 = [a.address for a in addrs if a.family.name == "AF_INET"
              and not ipaddress.ip_address(a.address).is_link_local]
        if not v4:
            continue
        speed = stats[name].speed * 1_000_000 if name in stats and stats[name].speed > 0 else 0
        found.append(pb.NetworkInterface(name=name, kind=interface_kind(name, mac_kinds), addresses=v4,
                                         speed_bits_per_s=speed))
    return found


def rdma_devices() -> list[pb.RdmaDevice]:
    root = Path("/sys/class/infiniband")
    if root.is_dir():
        devices = []
        for dev in sorted(root.iterdir()):
            nets = list((dev / "device" / "net").glob("*")) if (dev / "device" / "net").is_dir() else []
            devices.append(pb.RdmaDevice(name=dev.name, interface=nets[0].name if nets else ""))
        return devices
    if sys.platform == "darwin":
        return parse_ibv_devices(_run(["ibv_devices"]))
    return []


def parse_ibv_devices(text: str) -> list[pb.RdmaDevice]:
    """`ibv_devices` prints a header, a rule, then one device per line."""
    return [pb.RdmaDevice(name=line.split()[0]) for line in text.splitlines()[2:] if line.strip()]


def collect(node_id: str, name: str, memory_limit: int, only_interfaces: list[str], data_dir: Path) -> pb.NodeProfile:
    memory = psutil.virtual_memory()
    chip_name = chip()
    working_set = metal_working_set()
    usable = usable_memory(memory.total, working_set)
    if memory_limit:
        usable = min(usable, memory_limit)
    rdma = rdma_devices()
    bandwidth = APPLE_BANDWIDTH.get(chip_name) or measured_bandwidth(data_dir / "bandwidth.json", chip_name)
    calibrated = calibration.load(data_dir)
    if calibrated is not None and calibrated.chip != chip_name:
        calibrated = None  # a data dir copied from another machine
    return pb.NodeProfile(
        node_id=node_id, name=name or platform.node(), chip=chip_name, cores=psutil.cpu_count() or 1,
        memory_total_bytes=memory.total, memory_available_bytes=memory.available, memory_usable_bytes=usable,
        memory_bandwidth_bytes_per_s=bandwidth, backends=["ring"] + (["jaccl"] if rdma else []),
        interfaces=interfaces(only_interfaces), rdma_devices=rdma,
        os=f"{platform.system()} {platform.release()}", calibration=calibrated,
        # Only where raising the wired limit would give the planner more room.
        gpu_working_set_bytes=working_set if working_set and usable == working_set else 0,
    )


def available_memory() -> int:
    return psutil.virtual_memory().available
