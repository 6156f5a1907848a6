"""The dashboard in a real headless Chromium (Debian's package, driven by
Playwright): nodes appear, placing from the form shows the runners progress
to Ready, and a killed runner shows as Failed with its reason. Checked in
the DOM and with screenshots."""

import asyncio
import os
import shutil
import signal
import struct
import zlib

from playwright.sync_api import sync_playwright

from exod.proto import exod_pb2 as pb

from .daemon_helpers import settings, started, statuses, until
from .test_instances import instance_in

GB = 10**9


def png_size_and_colours(path):
    """Width, height and distinct colours of a PNG (no imaging library needed)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    idat, i = b"", 8
    while i < len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"IDAT":
            idat += data[i + 8:i + 8 + length]
        i += 12 + length
    raw = zlib.decompress(idat)
    channels = {2: 3, 6: 4}[colour_type]
    stride = width * channels + 1
    # Sample rows (filters make exact decoding longer than this needs): distinct byte runs.
    colours = {raw[r * stride + 1 + c:r * stride + 1 + c + channels] for r in range(0, height, 7)
               for c in range(0, width * channels, channels * 7)}
    return width, height, len(colours)


def browse(url, shots, kill_runner):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector('#nodes tr[data-node="a"] .UP', timeout=15000)
        page.wait_for_selector('#nodes tr[data-node="b"] .UP', timeout=15000)
        assert "2 of 2 nodes up" in page.text_content("#summary")
        page.wait_for_selector("#links tbody tr", timeout=15000)
        page.screenshot(path=shots[0], full_page=True)

        page.select_option("#strategy", "moe_tensor")
        page.fill("#ranks", "2")
        page.click("#preview-button")
        page.wait_for_selector("#candidates tbody tr", timeout=30000)
        assert "fits" in page.text_content("#candidates")
        page.click("#place-button")
        page.wait_for_selector("#instances tr[data-instance]", timeout=30000)
        # The runners report Ready before the owner marks the instance Ready: wait for both.
        # (Selectors, not wait_for_function: Playwright evals its string, which the page's CSP forbids.)
        page.wait_for_selector("#instances td.INSTANCE_READY", timeout=120000)
        page.wait_for_selector('#instances .rank[data-rank="1"] .READY', timeout=15000)
        assert page.locator("#instances .rank .READY").count() == 2
        assert "ready" in page.text_content("#instances td.state")
        # The built-in model was built on both nodes: each publishes it, the page lists both.
        page.wait_for_selector('#models tr[data-node="a"][data-model="demo"]', timeout=15000)
        page.wait_for_selector('#models tr[data-node="b"][data-model="demo"]', timeout=15000)
        assert "complete" in page.text_content('#models tr[data-node="b"]')
        page.screenshot(path=shots[1], full_page=True)

        kill_runner()
        page.wait_for_selector("#instances td.INSTANCE_FAILED", timeout=15000)
        text = page.text_content("#instances")
        # Either rank may report first: the killed one, or its peer that lost it.
        assert "failed" in text and ("rank 1 failed" in text or "rank 0 failed: peer rank lost" in text), text
        page.screenshot(path=shots[2], full_page=True)
        browser.close()


def test_the_dashboard_shows_nodes_placement_and_failure(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB, prestart_runner=True))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB,
                                   prestart_runner=True))
        loop = asyncio.get_running_loop()
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)

            def kill_runner():
                async def find():
                    instance = next(iter(a.work.owned.values()))
                    return next(r.pid for r in instance_in(a, instance.instance_id).runners if r.rank == 1)
                pid = asyncio.run_coroutine_threadsafe(find(), loop).result(10)
                os.kill(pid, signal.SIGKILL)

            shots = [str(tmp_path / f"dashboard-{i}.png") for i in range(3)]
            await asyncio.to_thread(browse, f"http://127.0.0.1:{a.api_port}/", shots, kill_runner)
            sizes = [png_size_and_colours(s) for s in shots]
            for width, height, colours in sizes:
                assert width == 1280 and height >= 600 and colours >= 8  # a page, not a blank
            assert len({open(s, "rb").read() for s in shots}) == 3  # each step changed what is shown
            assert all(os.path.getsize(s) > 20_000 for s in shots)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 300))
