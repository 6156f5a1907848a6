"""python -m bench.relay LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_S JITTER_S SEED

A TCP relay that holds each chunk for DELAY_S plus a uniform random share of
JITTER_S, in both directions, before passing it on: latency without netem
(this kernel has none). Every direction of every connection has its own
reader and writer thread; the writer sleeps to each chunk's due time with
time.sleep (nanosleep, microsecond resolution: asyncio's epoll timeouts
round up to a whole millisecond, which is coarser than the links emulated
here). A chunk is never delivered before the one read ahead of it, so jitter
never reorders the stream, as on a real TCP path. Bandwidth is left to the
kernel (`tc tbf` on the hosts' links). Prints "relaying" once it listens."""

import ctypes
import random
import socket
import sys
import threading
import time
from collections import deque

CHUNK = 256 * 1024


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _pipe(src: socket.socket, dst: socket.socket, delay_s: float, jitter_s: float, rng: random.Random) -> None:
    if not delay_s and not jitter_s:
        _copy(src, dst)
        return
    pending: deque = deque()
    ready = threading.Condition()
    done = []

    def deliver() -> None:
        _precise_sleeps()
        try:
            while True:
                with ready:
                    while not pending and not done:
                        ready.wait()
                    if not pending:
                        return
                    due, data = pending.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _end_writing(dst)

    writer = threading.Thread(target=deliver, daemon=True)
    writer.start()
    last_due = 0.0
    try:
        while data := src.recv(CHUNK):
            due = max(last_due, time.monotonic() + delay_s + (rng.random() * jitter_s if jitter_s else 0.0))
            last_due = due
            with ready:
                pending.append((due, data))
                ready.notify()
    except OSError:
        pass
    finally:
        with ready:
            done.append(True)
            ready.notify()
        writer.join()


def _precise_sleeps() -> None:
    """Linux lets a sleeping thread oversleep by its timer slack (50 us by
    default), as much as the delays emulated here; 1 ns keeps them true."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """No added delay: the relay's own cost (two socket hops and a Python
    thread's wake-up) is the latency."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _end_writing(dst)


def _end_writing(dst: socket.socket) -> None:
    """Pass the end of one direction on; the other may still be talking."""
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _serve(conn: socket.socket, target: tuple[str, int], delay_s: float, jitter_s: float, seed: int) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)
    for s in (conn, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rng = random.Random(seed)
    back = threading.Thread(target=_pipe, args=(upstream, conn, delay_s, jitter_s, random.Random(rng.random())),
                            daemon=True)
    back.start()
    _pipe(conn, upstream, delay_s, jitter_s, rng)
    back.join()
    conn.close()
    upstream.close()


def main(listen: str, target: str, delay_s: str, jitter_s: str, seed: str = "0") -> None:
    server = socket.create_server(_address(listen), reuse_port=False)
    print("relaying", flush=True)
    for n in range(1 << 62):
        conn, _ = server.accept()
        threading.Thread(target=_serve, args=(conn, _address(target), float(delay_s), float(jitter_s),
                                              int(seed) * 1000 + n), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:6])
