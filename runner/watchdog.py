"""Deadlines for the runner's phases.

A thread fails the runner when a phase outlives its deadline. Some MLX calls
(mx.distributed.init among them) hold the GIL while they block, so the
thread cannot run then; a kernel interval timer backs it up and kills the
process with SIGALRM a moment later. The parent turns SIGALRM into the same
"timed out" reason from the last state it saw.
"""

import os
import signal
import threading
import time
from typing import Callable

EXIT_DEADLINE = 3
BACKSTOP_GRACE_S = 2.0


class Watchdog:
    def __init__(self, on_expire: Callable[[str], None]):
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._phase = ""
        self._seconds = 0.0
        self._expires_at = None
        self._thread = threading.Thread(target=self._run, name="exod-watchdog", daemon=True)
        self._thread.start()

    def arm(self, phase: str, seconds: float, backstop: bool = True) -> None:
        """backstop=False where every blocking call releases the GIL (serving:
        mx.eval does), which spares a system call per decode step."""
        with self._lock:
            self._phase, self._seconds = phase, seconds
            self._expires_at = time.monotonic() + seconds
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, seconds + BACKSTOP_GRACE_S if backstop else 0)

    def disarm(self) -> None:
        with self._lock:
            self._expires_at = None
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _run(self) -> None:
        while True:
            time.sleep(0.05)
            with self._lock:
                expired = self._expires_at is not None and time.monotonic() >= self._expires_at
                phase, seconds = self._phase, self._seconds
            if expired:
                try:
                    self._on_expire(f"timed out in {phase} after {seconds:g} s")
                finally:
                    os._exit(EXIT_DEADLINE)
