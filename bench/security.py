"""`python -m bench security [--quick]`: what authentication costs on the
peer plane, with and without it, in the same run.

A server process listens twice with the same handlers: once with exod's
mutual TLS (transport.server_credentials, a certificate of a CA derived
from a fresh cluster key, the caller's id read from its certificate on
every call as PeerService does) and once without TLS. A client process
measures, interleaved, on each:

  heartbeat  round trip of a HeartbeatRequest/HeartbeatResponse pair (median, p90)
  chat       a 64-token answer streamed as 64 GenerationChunks, one token
             each: time to the first chunk and to the last (median)
  bulk       bytes/s of a 64 MiB client stream in 64 KiB chunks (median)

Both processes share this machine's cores and talk over loopback, so TLS's
CPU cost shows fully; on two machines the wire hides part of it."""

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import grpc

from exod.proto import exod_pb2 as pb

SERVICE = "exodbench.Plane"
CHUNK = 64 * 1024
TOKENS = 64


def _identity(cluster_key: str):
    from cryptography.hazmat.primitives.asymmetric import ec

    from exod.daemon import keys

    return keys.issue(keys.derive_ca(keys.parse_cluster_key(cluster_key)), ec.generate_private_key(ec.SECP256R1()))


async def _serve(cluster_key: str) -> None:
    from exod.daemon import transport

    async def heartbeat(request: bytes, context) -> bytes:
        ask = pb.HeartbeatRequest.FromString(request)
        caller = transport.caller_id(context)  # what PeerService does on every call
        return pb.HeartbeatResponse(node_id=caller or ask.node_id, incarnation=ask.incarnation,
                                    memory_available_bytes=1).SerializeToString()

    async def chat(request: bytes, context):
        transport.caller_id(context)
        for i in range(TOKENS):
            yield pb.GenerationChunk(request_id="bench", tokens=[pb.GeneratedToken(token=i, text=" word")]
                                     ).SerializeToString()

    async def bulk(requests, context) -> bytes:
        transport.caller_id(context)
        total = 0
        async for chunk in requests:
            total += len(chunk)
        return pb.ThroughputResult(bytes=total).SerializeToString()

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Heartbeat": grpc.unary_unary_rpc_method_handler(heartbeat),
        "Chat": grpc.unary_stream_rpc_method_handler(chat),
        "Bulk": grpc.stream_unary_rpc_method_handler(bulk),
    })
    options = [o for o in transport.SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    plain = server.add_insecure_port("127.0.0.1:0")
    secure = server.add_secure_port("127.0.0.1:0", transport.server_credentials(_identity(cluster_key)))
    await server.start()
    print(json.dumps({"plain": plain, "secure": secure}), flush=True)
    await server.wait_for_termination()


async def _measure(ports: dict, cluster_key: str, rounds: int, heartbeats: int, bulk_bytes: int) -> dict:
    from exod.daemon import transport

    client = _identity(cluster_key)
    options = [o for o in transport.CLIENT_OPTIONS if "message_length" not in o[0]]
    channels = {"plain": grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}", options=options),
                "tls": grpc.aio.secure_channel(f"127.0.0.1:{ports['secure']}",
                                               transport.channel_credentials(client), options=options)}
    samples = {mode: {"heartbeat_s": [], "chat_first_s": [], "chat_total_s": [], "bulk_bytes_per_s": []}
               for mode in channels}
    block = os.urandom(CHUNK)
    request = pb.HeartbeatRequest(node_id="0" * 32, incarnation=1, cluster_id="default").SerializeToString()
    for mode, channel in channels.items():  # connect (and handshake) before timing anything
        await channel.unary_unary(f"/{SERVICE}/Heartbeat")(request, timeout=10)
    for _ in range(rounds):
        for mode, channel in channels.items():  # interleaved: drift hits both alike
            beat = channel.unary_unary(f"/{SERVICE}/Heartbeat")
            for _ in range(heartbeats):
                t = time.perf_counter()
                await beat(request, timeout=5)
                samples[mode]["heartbeat_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            first = None
            async for _ in channel.unary_stream(f"/{SERVICE}/Chat")(b"", timeout=10):
                first = first or time.perf_counter() - t
            samples[mode]["chat_first_s"].append(first)
            samples[mode]["chat_total_s"].append(time.perf_counter() - t)

            async def chunks():
                for _ in range(bulk_bytes // CHUNK):
                    yield block
            t = time.perf_counter()
            answer = await channel.stream_unary(f"/{SERVICE}/Bulk")(chunks(), timeout=120)
            sent = pb.ThroughputResult.FromString(answer).bytes
            samples[mode]["bulk_bytes_per_s"].append(sent / (time.perf_counter() - t))
    for channel in channels.values():
        await channel.close()
    result = {}
    for mode, s in samples.items():
        beats = sorted(s["heartbeat_s"])
        result[mode] = {"heartbeat_median_us": statistics.median(beats) * 1e6,
                        "heartbeat_p90_us": beats[int(0.9 * (len(beats) - 1))] * 1e6,
                        "chat_first_chunk_median_us": statistics.median(s["chat_first_s"]) * 1e6,
                        "chat_64_tokens_median_ms": statistics.median(s["chat_total_s"]) * 1e3,
                        "bulk_median_mb_per_s": statistics.median(s["bulk_bytes_per_s"]) / 1e6,
                        "samples": {k: len(v) for k, v in s.items()}}
    plain, tls = result["plain"], result["tls"]
    result["tls_over_plain"] = {
        "heartbeat": tls["heartbeat_median_us"] / plain["heartbeat_median_us"],
        "chat_64_tokens": tls["chat_64_tokens_median_ms"] / plain["chat_64_tokens_median_ms"],
        "bulk_throughput": tls["bulk_median_mb_per_s"] / plain["bulk_median_mb_per_s"],
    }
    return result


def run(quick: bool = False) -> dict:
    from exod.daemon import keys

    cluster_key = keys.new_cluster_key()
    server = subprocess.Popen([sys.executable, "-m", "bench.security", "--serve", cluster_key],
                              stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        ports = json.loads(server.stdout.readline())
        rounds = 3 if quick else 7
        figures = asyncio.run(_measure(ports, cluster_key, rounds, heartbeats=100 if quick else 300,
                                       bulk_bytes=(16 if quick else 64) * 2**20))
    finally:
        server.kill()
        server.wait()
    return {"bench": "security", "ok": True, "quick": quick, "rounds": rounds, **figures}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(_serve(sys.argv[2]))
