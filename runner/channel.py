"""Framed protobuf messages over a pipe: a 4-byte big-endian length, then the
serialized message. The runner writes RunnerEvent and reads RunnerCommand;
its parent does the opposite."""

import os
import struct
import threading

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ChannelClosed(Exception):
    pass


class Writer:
    """Writes whole messages; safe to share between threads."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def write(self, message) -> None:
        data = message.SerializeToString()
        frame = _HEADER.pack(len(data)) + data
        with self._lock:
            view = memoryview(frame)
            while view:
                try:
                    written = os.write(self.fd, view)
                except (BrokenPipeError, OSError) as e:
                    raise ChannelClosed(str(e)) from e
                view = view[written:]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            if left == n:
                return None
            raise ChannelClosed(f"pipe closed {n - left} bytes into a {n}-byte frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, message_type):
    """The next message, or None when the other end closed the pipe."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ChannelClosed(f"frame of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    data = _read_exact(fd, size) if size else b""
    if data is None:
        raise ChannelClosed("pipe closed before a frame's body")
    message = message_type()
    message.ParseFromString(data)
    return message
