"""Mutations are for loopback, or need the daemon's bearer token: a daemon
on a LAN must not start processes for any passer-by. Run in a network
namespace so that a request can come from a non-loopback address."""

import json
import subprocess
import sys
import time

from .conftest import REPO
from .netns import lab, leftover_namespaces


def curl(net, url, *extra):
    out = subprocess.run(["ip", "netns", "exec", net.hosts[0], "curl", "-s", "-m", "5", "-o", "/dev/stdout",
                          "-w", "\n%{http_code}", "-X", "POST", "-H", "Content-Type: application/json",
                          "-d", "{}", *extra, url], capture_output=True, text=True)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


GRPC_CLIENT = """
import sys, grpc
from exod.proto import exod_pb2 as pb, exod_pb2_grpc as pb_grpc
from tests.daemon_helpers import member_channel_sync
address, token = sys.argv[1], sys.argv[2]
stub = pb_grpc.ClusterServiceStub(member_channel_sync(address))  # holds the key, not the API token
metadata = [("authorization", "Bearer " + token)] if token else None
for call, request in ((stub.CreateInstance, pb.PlacementRequest(model=" ")),
                      (stub.DeleteInstance, pb.InstanceRef(instance_id="nope"))):
    try:
        call(request, timeout=10, metadata=metadata)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name)
"""


def grpc_codes(net, address, token=""):
    out = subprocess.run(["ip", "netns", "exec", net.hosts[0], sys.executable, "-c", GRPC_CLIENT, address, token],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    return out.stdout.split()


def test_non_loopback_mutations_need_the_token(tmp_path):
    with lab(1) as net:
        daemon = net.run(0, [sys.executable, "-m", "exod.daemon.cli", "start", "--api-host", "0.0.0.0",
                             "--api-port", "52415", "--no-discovery", "--data-dir", str(tmp_path / "d")],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**__import__("os").environ, "EXOD_API_TOKEN": "s3cret"})
        try:
            lan = f"http://{net.addresses[0]}:52415/v1/instances"
            local = "http://127.0.0.1:52415/v1/instances"
            deadline = time.monotonic() + 20
            while curl(net, local)[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            code, body = curl(net, lan)
            assert code == 403 and "bearer token" in json.loads(body)["error"]["message"]
            assert curl(net, lan, "-H", "Authorization: Bearer wrong")[0] == 403
            # With the token, or from loopback, the request is looked at (and this body is bad).
            assert curl(net, lan, "-H", "Authorization: Bearer s3cret")[0] == 400
            assert curl(net, local)[0] == 400
            # The same rule over gRPC: refused from the LAN address, looked at with the token or from loopback.
            lan_grpc, local_grpc = f"{net.addresses[0]}:52416", "127.0.0.1:52416"
            assert grpc_codes(net, lan_grpc) == ["PERMISSION_DENIED", "PERMISSION_DENIED"]
            assert grpc_codes(net, lan_grpc, "wrong") == ["PERMISSION_DENIED", "PERMISSION_DENIED"]
            assert grpc_codes(net, lan_grpc, "s3cret") == ["INVALID_ARGUMENT", "NOT_FOUND"]
            assert grpc_codes(net, local_grpc) == ["INVALID_ARGUMENT", "NOT_FOUND"]
        finally:
            daemon.kill()
            daemon.wait()
    assert not leftover_namespaces()
