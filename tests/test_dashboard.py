"""The dashboard in a real headless Chromium (Debian's package, driven by
Playwright): nodes appear, placing from the form shows the runners progress
to Ready, the chat panel streams a two-turn conversation (exactly the
single-process model's greedy answers; the second turn served from the
prefix cache, which the instance's serving column shows with its batch,
queue and tok/s), Stop ends a generation on every rank, and a killed runner
shows as Failed with its reason. Checked in the DOM and with screenshots."""

import asyncio
import os
import shutil
import signal
import struct
import time
import zlib

from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler
from playwright.sync_api import sync_playwright

from exod.models import synthetic
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


def answers(model_dir, turns, max_tokens):
    """The single-process model's greedy answers to a conversation, turn by turn."""
    model, tokenizer = load(str(model_dir))
    conversation, said = [], []
    for text in turns:
        conversation.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        said.append(generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)))
        conversation.append({"role": "assistant", "content": said[-1]})
    return said


def poll(page, selector, predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        text = page.text_content(selector) or ""
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector}: {text!r} after {timeout} s")
        time.sleep(0.2)


TURNS = ["hello world, what is a token?", "and what is a model?"]


def chat(page, expected):
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "16")
    for i, (text, answer) in enumerate(zip(TURNS, expected)):
        page.fill("#chat-input", text)
        page.click("#chat-send")
        done = page.wait_for_selector(f'#chat-log .turn.assistant:nth-of-type({2 * i + 2})[data-done="true"]',
                                      timeout=60000)
        assert done.query_selector(".text").text_content() == answer
    assert "done" in page.text_content("#chat-status")
    # The second turn's prompt began with the first turn: its prefill came
    # from the prefix cache, and the serving column says so.
    poll(page, '#instances [data-field="prefix-cache"]', lambda s: s.startswith("cache ") and not
         s.startswith("cache 0/"), 10)
    assert poll(page, '#instances [data-field="batch"]', lambda s: s == "batch 0 / 8", 10)
    assert "tok/s" in page.text_content('#instances [data-field="tokens-per-s"]')
    assert page.text_content('#instances [data-field="queue"]') == "queue 0"

    # Stop: the browser aborts the request, and every rank drops it. (Greedy,
    # this prompt runs to max_tokens: no end-of-sequence token comes first.)
    page.fill("#chat-max-tokens", "900")  # the placement's context is 1024
    page.fill("#chat-input", "tell me everything")
    page.click("#chat-send")
    poll(page, '#instances [data-field="batch"]', lambda s: s == "batch 1 / 8", 30)
    page.click("#chat-stop")
    poll(page, "#chat-status", lambda s: s == "stopped", 10)
    poll(page, '#instances [data-field="batch"]', lambda s: s == "batch 0 / 8", 30)


def browse(url, shots, kill_runner, expected):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []  # the console's errors (a missing favicon was one) and uncaught exceptions
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
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
        page.wait_for_selector('#chat-model option[value="demo"]', state="attached", timeout=15000)
        chat(page, expected)
        page.screenshot(path=shots[1], full_page=True)
        assert errors == []
        # Long answers wrap inside the chat log, whatever their words: a run
        # without spaces once stretched the page to three times its width.
        page.fill("#chat-input", "x" * 600)
        page.click("#chat-send")
        page.locator("#chat-log .turn.user", has_text="x" * 600).wait_for(timeout=15000)
        wide, seen = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert wide <= seen, (wide, seen)

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
            # The built-in model is built the same everywhere: a copy of its own gives the answers.
            reference = await asyncio.to_thread(synthetic.ensure_named, "demo", tmp_path / "reference")
            expected = await asyncio.to_thread(answers, reference, TURNS, 16)
            await asyncio.to_thread(browse, f"http://127.0.0.1:{a.api_port}/", shots, kill_runner, expected)
            sizes = [png_size_and_colours(s) for s in shots]
            for width, height, colours in sizes:
                assert width == 1280 and height >= 600 and colours >= 8  # a page, not a blank
            assert len({open(s, "rb").read() for s in shots}) == 3  # each step changed what is shown
            assert all(os.path.getsize(s) > 20_000 for s in shots)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 300))
