"""The code that only runs on a Mac, run here with the platform given as
data: Metal's working set and the wired limit, the interface kinds macOS
names, RDMA devices, and what a jaccl rank writes before MLX's init (which
this Linux build of MLX refuses, as it must, with a GroupError)."""

import json
import os

import pytest

from exod.daemon import profile as machine
from exod.models import catalog
from exod.placement import plan
from exod.placement.wired import MB, wired_limit_mb
from exod.proto import exod_pb2 as pb
from exod.runner import distributed, loading

GB = 10**9

# `networksetup -listallhardwareports` on a Mac Studio with a Thunderbolt
# Ethernet adapter and a USB LAN dongle.
HARDWARE_PORTS = """
Hardware Port: Ethernet
Device: en0
Ethernet Address: aa:bb:cc:dd:ee:00

Hardware Port: Thunderbolt Bridge
Device: bridge0
Ethernet Address: N/A

Hardware Port: Wi-Fi
Device: en1
Ethernet Address: aa:bb:cc:dd:ee:01

Hardware Port: Thunderbolt 1
Device: en2
Ethernet Address: aa:bb:cc:dd:ee:02

Hardware Port: Thunderbolt Ethernet Slot 0
Device: en5
Ethernet Address: aa:bb:cc:dd:ee:05

Hardware Port: USB 10/100/1000 LAN
Device: en7
Ethernet Address: aa:bb:cc:dd:ee:07

Hardware Port: iPhone USB
Device: en8
Ethernet Address: aa:bb:cc:dd:ee:08

VLAN Configurations
===================
"""

IBV_DEVICES = """    device                 node GUID
    ------              ----------------
    rdma_en2            0000000000000000
    rdma_en3            0000000000000000
"""


def test_interface_kinds_from_networksetup():
    kinds = machine.parse_hardware_ports(HARDWARE_PORTS)
    assert kinds == {"en0": pb.ETHERNET, "bridge0": pb.THUNDERBOLT, "en1": pb.WIFI, "en2": pb.THUNDERBOLT,
                     "en5": pb.ETHERNET, "en7": pb.ETHERNET, "en8": pb.OTHER}
    assert machine.interface_kind("lo0", kinds, "darwin") == pb.LOOPBACK
    assert machine.interface_kind("en2", kinds, "darwin") == pb.THUNDERBOLT
    assert machine.interface_kind("utun3", kinds, "darwin") == pb.OTHER


def test_rdma_devices_from_ibv_devices():
    assert [d.name for d in machine.parse_ibv_devices(IBV_DEVICES)] == ["rdma_en2", "rdma_en3"]
    assert machine.parse_ibv_devices("") == []


def test_usable_memory_is_the_working_set_on_a_mac():
    assert machine.usable_memory(128 * GB, 96 * GB, "darwin") == 96 * GB
    assert machine.usable_memory(128 * GB, 0, "darwin") == int(128 * GB * machine.MAC_FALLBACK_USABLE_FRACTION)
    assert machine.usable_memory(128 * GB, 0, "linux") == int(128 * GB * machine.LINUX_USABLE_FRACTION)
    # Off macOS there is no working set; on this Linux build, MLX has no Metal device either.
    assert machine.metal_working_set("linux") == 0
    assert machine.metal_working_set("darwin") == 0


def test_the_runner_wires_its_weights_up_to_the_working_set():
    mac = {"max_recommended_working_set_size": 96 * 2**30, "memory_size": 128 * 2**30}
    assert loading.wired_limit(40 * GB, mac) == (96 * 2**30, "")
    limit, warning = loading.wired_limit(100 * GB, mac)
    assert limit == 96 * 2**30
    mb = wired_limit_mb(100 * GB / loading.WIRED_WARNING_FRACTION, 128 * 2**30)
    assert f"sudo sysctl iogpu.wired_limit_mb={mb}" in warning and mb * MB > 96 * 2**30
    assert loading.wired_limit(40 * GB, {"architecture": "x86_64"}) == (0, "")
    # No Metal here: nothing is wired and nothing is said.
    assert loading.wire_weights(None) == ""


def mac(name: str, total: int, working_set: int) -> pb.NodeProfile:
    return pb.NodeProfile(node_id=name, name=name, memory_total_bytes=total, memory_usable_bytes=working_set,
                          gpu_working_set_bytes=working_set, memory_bandwidth_bytes_per_s=800e9,
                          backends=["ring"], os="Darwin 25.2.0")


def test_a_rank_over_the_working_set_names_the_sysctl_that_lets_it_fit():
    spec = catalog.resolve("llama-3.3-70b-4bit")  # 44.8 GB on one rank
    request = pb.PlacementRequest(model=spec.model_id, ranks=1)
    small = plan(spec, pb.Cluster(nodes=[mac("studio", 64 * 2**30, 40 * 2**30)]), request)
    assert not small.HasField("chosen")
    reason = small.candidates[0].reasons[0]
    assert "Metal's recommended working set caps studio" in reason, reason
    mb = int(reason.split("iogpu.wired_limit_mb=")[1].split("`")[0])
    # With the limit it names, the same rank fits, and no lower limit would do.
    assert plan(spec, pb.Cluster(nodes=[mac("studio", 64 * 2**30, mb * MB)]), request).HasField("chosen")
    assert not plan(spec, pb.Cluster(nodes=[mac("studio", 64 * 2**30, (mb - 64) * MB)]), request).HasField("chosen")


def test_no_sysctl_is_named_when_no_limit_leaves_macos_enough():
    spec = catalog.resolve("llama-3.3-70b-4bit")
    result = plan(spec, pb.Cluster(nodes=[mac("mini", 48 * 2**30, 36 * 2**30)]), pb.PlacementRequest(model="x"))
    reason = result.candidates[0].reasons[0]
    assert "no wired limit leaves macOS enough" in reason and "sysctl" not in reason, reason


def test_a_memory_limit_below_the_working_set_gets_no_sysctl_advice():
    # The daemon publishes the working set only when it is the cap.
    spec = catalog.resolve("llama-3.3-70b-4bit")
    node = mac("studio", 128 * 2**30, 30 * 2**30)
    node.gpu_working_set_bytes = 0
    reason = plan(spec, pb.Cluster(nodes=[node]), pb.PlacementRequest(model="x")).candidates[0].reasons[0]
    assert "working set" not in reason


def test_a_jaccl_rank_writes_the_device_matrix_and_fails_cleanly_without_jaccl(tmp_path, monkeypatch):
    for key in ("MLX_RANK", "MLX_WORLD_SIZE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR"):
        monkeypatch.setenv(key, "")  # restored after the test: init_group sets them
    spec = pb.RunnerSpec(instance_id="i1", rank=1, world_size=2, backend=pb.JACCL, coordinator="10.0.0.1:5000",
                         rdma_devices=[",rdma_en3", "rdma_en2,"])
    with pytest.raises(distributed.GroupError, match="jaccl init failed"):
        distributed.init_group(spec, tmp_path)
    devices = json.loads(open(os.environ["MLX_IBV_DEVICES"]).read())
    assert devices == [[None, "rdma_en3"], ["rdma_en2", None]]
    assert os.environ["MLX_JACCL_COORDINATOR"] == "10.0.0.1:5000"
    assert (os.environ["MLX_RANK"], os.environ["MLX_WORLD_SIZE"]) == ("1", "2")
