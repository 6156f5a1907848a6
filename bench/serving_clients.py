"""Concurrent streamed chats against an OpenAI-compatible server, for bench
serving: python serving_clients.py SPEC_JSON. The same client measures exod
and mlx_lm.server, from wherever it runs (a network-namespace host for a
cluster there).

SPEC: {"url", "model", "requests": [{"messages", "max_tokens"}...]}: all
requests start at once. Prints one JSON line: per request its start, first
token and end (seconds since the first start), completion tokens (from the
final usage, else the content events), and any error."""

import asyncio
import json
import sys
import time

import aiohttp


async def one(session, url, model, request, t0):
    body = {"model": model, "messages": request["messages"], "max_tokens": request["max_tokens"],
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter() - t0
    first, events, usage, error = None, 0, None, None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                return {"start": start, "error": f"{response.status}: {(await response.text())[:200]}"}
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    for line in block.decode().splitlines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if event.get("error"):  # the instance failed mid-answer
                            error = str(event["error"].get("message"))
                        if event.get("usage"):
                            usage = event["usage"]
                        for choice in event.get("choices") or []:
                            if (choice.get("delta") or {}).get("content"):
                                events += 1
                                if first is None:
                                    first = time.perf_counter() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else events
    return {"start": start, "first": first, "end": end, "tokens": tokens,
            "prompt_tokens": usage.get("prompt_tokens") if usage else None, "error": error}


async def main(spec):
    timeout = aiohttp.ClientTimeout(total=spec.get("timeout_s", 900))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(session, spec["url"], spec["model"], r, t0)
                                         for r in spec["requests"]))
    print(json.dumps({"requests": results}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
