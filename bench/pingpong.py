"""python -m bench.pingpong serve HOST:PORT
python -m bench.pingpong probe HOST:PORT COUNT STREAM_BYTES

A TCP ping-pong and a streaming transfer, to measure what a link (or an
emulated one: relay plus token bucket) really delivers. probe prints one
JSON line: every round trip of a 64-byte message, and the throughput of
STREAM_BYTES sent one way and acknowledged."""

import json
import socket
import sys
import threading
import time

PING = 64
STREAM = b"S"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _exactly(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise ConnectionError("closed")
        data += part
    return bytes(data)


def _answer(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            kind = _exactly(conn, 1)
            if kind == STREAM:
                remaining = int.from_bytes(_exactly(conn, 8), "big")
                while remaining:
                    remaining -= len(conn.recv(min(remaining, 1 << 20)))
                conn.sendall(b"k")
            else:
                conn.sendall(kind + _exactly(conn, PING - 1))
    except (ConnectionError, OSError):
        conn.close()


def serve(listen: str) -> None:
    server = socket.create_server(_address(listen))
    print("serving", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_answer, args=(conn,), daemon=True).start()


def probe(target: str, count: int, stream_bytes: int) -> dict:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(_address(target), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = b"p" * PING
    rtts = []
    for _ in range(count):
        start = time.perf_counter()
        conn.sendall(message)
        _exactly(conn, PING)
        rtts.append(time.perf_counter() - start)
    start = time.perf_counter()
    conn.sendall(STREAM + stream_bytes.to_bytes(8, "big"))
    block = b"x" * (1 << 20)
    left = stream_bytes
    while left:
        n = min(left, len(block))
        conn.sendall(block[:n])
        left -= n
    _exactly(conn, 1)
    seconds = time.perf_counter() - start
    conn.close()
    return {"rtt_s": rtts, "stream_bytes": stream_bytes, "stream_s": seconds}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        print(json.dumps(probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))), flush=True)
