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
        finally:
            daemon.kill()
            daemon.wait()
    assert not leftover_namespaces()
