"""Range reads from the hub: the needed blocks of a file grouped into few
spans (one HTTP range request each). Whatever the ranges, skips and limits,
the bytes cut out of the spans are exactly the ranges' bytes, the spans are
disjoint, in order and within the limit, and a gap is read through only
when it is small."""

import os

from hypothesis import given, settings, strategies as st

from exod.daemon import hub
from exod.models.shards import read_part


def layout(draw_items):
    """Non-overlapping (offset, length, stride, count) ranges, as a file's
    tensors are, with a skip each (what had arrived)."""
    cursor, out = 0, []
    for pre, length, gap, count, skip in draw_items:
        offset = cursor + pre
        stride = length + gap if count > 1 else length
        out.append(((offset, length, stride, count), min(skip, length * count - 1)))
        cursor = offset + (count - 1) * stride + length
    return out, cursor


ranges = st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 700), st.integers(0, 2000), st.integers(1, 40),
                            st.integers(0, 20000)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(ranges, st.integers(1, 9000), st.integers(0, 1500))
def test_spans_give_back_exactly_the_ranges_bytes(items, max_span, gap_bytes):
    rngs, size = layout(items)
    data = os.urandom(size + 17)
    tagged = [(r, i) for i, (rng, skip) in enumerate(rngs) for r in hub.runs(rng, skip, max_span, gap_bytes)]
    grouped = hub.spans(tagged, max_span, gap_bytes)
    got = {i: bytearray() for i in range(len(rngs))}
    previous_end = -1
    for start, end, members in grouped:
        assert previous_end <= start < end <= len(data)
        assert end - start <= max_span
        previous_end = end
        read = data[start:end]  # what one range request returns
        for run, i in members:
            rng, skip = rngs[i]
            assert run[1] == skip + len(got[i])  # in order within each range: position is where it resumes
            got[i] += hub.cut(read, start, run)
        needed = sum(run[2] * run[4] for run, _ in members)
        runs_gaps = [hub.extent(b)[0] - hub.extent(a)[1] for (a, _), (b, _) in zip(members, members[1:])]
        assert all(g >= 0 for g in runs_gaps)
        # Every byte dropped is a gap under gap_bytes, or within a quarter of the span.
        large = sum(g for g in runs_gaps if g > gap_bytes)
        assert large <= 0.25 * (end - start) or large == 0
        assert needed <= end - start
    for i, (rng, skip) in enumerate(rngs):
        offset, length, stride, count = rng
        want = b"".join(data[offset + b * stride:offset + b * stride + length] for b in range(count))[skip:]
        assert bytes(got[i]) == want


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.integers(0, 64), st.integers(2, 500))
def test_small_gaps_are_read_through_and_large_ones_are_not(length, gap, count):
    rng = (10, length, length + gap, count)
    extent = (count - 1) * (length + gap) + length
    grouped = hub.spans([(r, 0) for r in hub.runs(rng, 0, 1 << 20, gap_bytes=32)], 1 << 20, gap_bytes=32)
    read = sum(end - start for start, end, _ in grouped)
    if gap <= 32:  # cheaper to read than to ask again: one request
        assert len(grouped) == 1 and read == extent
    elif gap <= 0.25 * (length + gap):  # a small share of the span: read through
        assert len(grouped) == 1 and read == extent
    else:  # large: never more than a quarter of what is read is dropped
        assert read - length * count <= 0.25 * read
        assert len(grouped) >= count / 2


def test_a_block_larger_than_a_span_is_read_in_pieces():
    grouped = hub.spans([(r, 0) for r in hub.runs((5, 10_000, 10_000, 1), 1234, 4096)], 4096)
    assert [(s, e) for s, e, _ in grouped] == [(1239, 5335), (5335, 9431), (9431, 10005)]


def test_read_part_and_the_spans_agree_on_a_file(tmp_path):
    """The same bytes as a peer serves (read_part) for an expert-like slice
    (one block per expert, half of each) and a last-axis slice (small
    blocks, one per row)."""
    data = os.urandom(1 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for rng in ((0, 4096, 8192, 64), (3, 64, 128, 4000)):
            served = b"".join(d for _, d in read_part(fd, rng, 100))
            grouped = hub.spans([(r, 0) for r in hub.runs(rng, 100, 65536, 1024)], 65536, 1024)
            got = b"".join(hub.cut(data[s:e], s, run) for s, e, members in grouped for run, _ in members)
            assert got == served
    finally:
        os.close(fd)


def test_a_download_that_does_not_match_its_sha256_is_refused_and_removed(tmp_path, monkeypatch):
    """The mirror announces a file's sha256 (its LFS etag) and then sends
    other bytes of the same size, as a corrupting cache would:
    huggingface_hub stores them under the announced name; the download is
    refused and nothing of it is left in the HF cache. The right bytes are
    accepted."""
    import hashlib

    import pytest
    from huggingface_hub import constants

    from .hf_mirror import Mirror, commit_of

    repo = tmp_path / "mirror" / "acme" / "r"
    repo.mkdir(parents=True)
    good = os.urandom(300_000)
    (repo / "model.safetensors").write_bytes(good)
    (repo / "config.json").write_text("{}")
    want = hashlib.sha256(good).hexdigest()
    commit = commit_of(repo)
    with Mirror(tmp_path / "mirror") as mirror:  # etags computed now, from the good bytes
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        (repo / "model.safetensors").write_bytes(bytes([good[0] ^ 1]) + good[1:])
        got = []
        with pytest.raises(hub.HubError, match="does not match its sha256"):
            hub.download("acme/r", commit, ["model.safetensors"], tmp_path / "bad", got.append,
                         digests={"model.safetensors": want})
        assert sum(got) == len(good)
        assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file() and p.stat().st_size == len(good)]
        (repo / "model.safetensors").write_bytes(good)
        snapshot = hub.download("acme/r", commit, ["model.safetensors"], tmp_path / "ok", got.append,
                                digests={"model.safetensors": want})
        assert (snapshot / "model.safetensors").read_bytes() == good


def test_a_fetch_from_the_hub_alone_by_range_reads(tmp_path, monkeypatch):
    """A Fetch whose only source is a HubSource on the mirror: strided
    slices and a whole block arrive exactly, the mirror sends the spans'
    bytes and not the file; a file that is not the planned one (another
    sha256) is refused, naming the hub."""
    import asyncio
    import hashlib
    import json
    import urllib.request

    import pytest
    from huggingface_hub import constants

    from exod.daemon import fetch
    from exod.models.shards import Part

    from .hf_mirror import Mirror, commit_of

    repo = tmp_path / "mirror" / "acme" / "r"
    repo.mkdir(parents=True)
    data = os.urandom(6 << 20)
    (repo / "model.safetensors").write_bytes(data)
    commit = commit_of(repo)
    sha = hashlib.sha256(data).hexdigest()
    # Half of each of 8 "experts" of 512 KiB, and the 512-byte halves of 1 KiB rows.
    parts = [Part("experts", "model.safetensors", "U8", (8, 512 << 10), (8, 256 << 10), 1, (0, 1, 2),
                  0, 256 << 10, 512 << 10, 8),
             Part("rows", "model.safetensors", "U8", (1024, 1024), (1024, 512), 1, (1, 2, 2),
                  (4 << 20) + 512, 512, 1024, 1024)]

    class Collect:
        def __init__(self):
            self.out = [bytearray(p.nbytes) for p in parts]

        def write(self, index, position, chunk):
            self.out[index][position:position + len(chunk)] = chunk

    def expected(p):
        return b"".join(data[p.offset + b * p.stride:p.offset + b * p.stride + p.length] for b in range(p.count))

    with Mirror(tmp_path / "mirror") as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        writer = Collect()
        source = hub.HubSource("acme/r", commit, {"model.safetensors": (len(data), sha)})
        asyncio.run(fetch.Fetch(parts, writer, [source]).run())
        assert [bytes(o) for o in writer.out] == [expected(p) for p in parts]
        sent = json.loads(urllib.request.urlopen(f"{mirror.url}/_stats", timeout=10).read())
        # The experts' halves block by block (2 MiB), the rows read through (1 MiB less the last
        # half row): 3 of 6 MiB.
        assert sent["acme/r/model.safetensors"] == (2 << 20) + (1 << 20) - 512

        wrong = hub.HubSource("acme/r", commit, {"model.safetensors": (len(data), "0" * 64)})
        with pytest.raises(fetch.FetchError, match="hub.*not the planned one"):
            asyncio.run(fetch.Fetch(parts, Collect(), [wrong]).run())
