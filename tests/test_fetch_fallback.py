"""The fetch engine hands what a failed source left to a source of last
resort, and says so once with the bytes still missing; the Downloading
deadline is then planned again from the slower source and only moves out.
A real file, the real engine and writer; the failing source is a local
copy that gives up after its first chunk, as a killed peer does."""

import asyncio
import os

import pytest

from exod.daemon import fetch
from exod.daemon.models import Deadline, Models, Unavailable
from exod.models.shards import file_part


class Quits(fetch.LocalSource):
    """Serves one chunk, then fails as a dead peer's stream does."""

    async def read(self, file, jobs):
        async for item in super().read(file, jobs[:1]):
            yield item
            raise fetch.FetchError("the peer went away")


class Written:
    def __init__(self, path, size):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)

    def write(self, index, position, data):
        os.pwrite(self.fd, data, position)


def test_a_source_of_last_resort_takes_what_a_failed_one_left_and_is_announced_once(tmp_path):
    size = 40 << 20
    data = os.urandom(size)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(data)
    peer = Quits(str(tmp_path / "src"), {"w.bin"}, name="peer")
    hub = fetch.LocalSource(str(tmp_path / "src"), {"w.bin"}, name="hub")
    hub.last_resort = True
    writer = Written(tmp_path / "out.bin", size)
    job = fetch.Fetch([file_part("w.bin", size)], writer, [peer, hub])
    announced = []
    job.on_last_resort = announced.append
    asyncio.run(job.run())
    os.close(writer.fd)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert job.failed == {"peer": "the peer went away"}
    # Once, with what was missing then: all but what the peer delivered
    # (its first chunk of each of its two streams at most).
    assert len(announced) == 1
    assert size - 2 * fetch.CHUNK_BYTES <= announced[0] <= size


def test_the_deadline_moves_out_never_in_and_bounds_the_work():
    async def scenario():
        deadline = Deadline(0.5)
        first = deadline.at
        deadline.extend(0.1)  # earlier than planned: no change
        assert deadline.at == first

        async def slow_then_extended():
            deadline.extend(30.0)  # a slower source took over
            await asyncio.sleep(1.0)
            return "done"
        assert await Models.within(deadline, slow_then_extended(), lambda: "late") == "done"
        assert deadline.seconds >= 30.0

        cancelled = asyncio.Event()

        async def never_extended():
            try:
                await asyncio.sleep(30)
            finally:
                cancelled.set()
        with pytest.raises(Unavailable, match="timed out"):
            await Models.within(Deadline(0.2), never_extended(), lambda: "timed out, as planned")
        assert cancelled.is_set()  # the work is stopped, not left running

    asyncio.run(scenario())
