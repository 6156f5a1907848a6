"""Dashboard clients for bench/traffic.py: N independent pollers doing what
daemon/static/index.html does, GET /v1/state once a second.

  python bench/dashboard_clients.py URL CLIENTS SECONDS

Each poller has a session (and so a keep-alive connection) of its own, as
separate browsers would, and starts at a random phase within the first second
so that the requests are not all in step. Prints one JSON line: requests_ok,
requests_failed, mean_response_bytes (body only) and the first error seen."""

import asyncio
import json
import random
import sys
import time

import aiohttp

PERIOD_S = 1.0
TIMEOUT_S = 5.0


async def _poller(url: str, until: float, tally: dict) -> None:
    await asyncio.sleep(random.uniform(0, PERIOD_S))
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tick = time.monotonic()
        while tick < until:
            try:
                async with session.get(url) as response:
                    body = await response.read()
                if response.status == 200:
                    tally["ok"] += 1
                    tally["bytes"] += len(body)
                else:
                    _fail(tally, f"HTTP {response.status}")
            except (TimeoutError, aiohttp.ClientError) as e:
                _fail(tally, f"{type(e).__name__}: {e}")
            # setInterval keeps its beat; a slow answer skips ticks rather than piling them up.
            tick = max(tick + PERIOD_S, time.monotonic())
            await asyncio.sleep(max(0.0, tick - time.monotonic()))


def _fail(tally: dict, why: str) -> None:
    tally["failed"] += 1
    tally["error"] = tally["error"] or why


async def main(url: str, clients: int, seconds: float) -> dict:
    tally = {"ok": 0, "failed": 0, "bytes": 0, "error": None}
    until = time.monotonic() + seconds
    await asyncio.gather(*(_poller(url, until, tally) for _ in range(clients)))
    return {"requests_ok": tally["ok"], "requests_failed": tally["failed"],
            "mean_response_bytes": tally["bytes"] / tally["ok"] if tally["ok"] else 0, "error": tally["error"]}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))), flush=True)
