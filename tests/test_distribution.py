"""Checkpoints on nodes that lack them, on three real daemons on loopback:
only `a` holds a mixture-of-experts in its Hugging Face cache (written by
huggingface_hub from a local mirror). Every node sees what `a` holds; a
member reads only listed files of it; `b` plans it without any weight of
its own; placed moe_tensor on b and c, each fetches only its rank's bytes
into a shard checkpoint, both reach Ready, and the greedy answer is a
single-node instance's on `a`; placed again, nothing moves; placed as a
pipeline, each fetches only its stage."""

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest

from exod.daemon import state, transport
from exod.models import shards
from exod.proto import exod_pb2 as pb

from .daemon_helpers import member_channel, member_identity, settings, started, statuses, until
from .model_fixtures import build_moe, build_moe_by_layers, hf_cache_with

GB = 10**9
REPO_ID = "acme/moe-16x"
PROMPT = [1, 17, 42, 99, 7, 300, 5, 250]


@pytest.fixture(scope="module")
def moe_cache(tmp_path_factory):
    source = build_moe(tmp_path_factory.mktemp("moe"))
    return source, hf_cache_with(tmp_path_factory.mktemp("a-cache") / "hub", source, REPO_ID)


def checkpoint_bytes(source) -> int:
    return sum(p.stat().st_size for p in source.iterdir() if p.is_file())


async def answer(node, instance_id):
    request = pb.GenerateRequest(request_id=f"q-{instance_id}", prompt_tokens=PROMPT,
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    instance = state.instance(node.view, instance_id)
    tokens = []
    async for chunk in node.generate_on(instance, request):
        assert not chunk.error, chunk.error
        tokens += [t.token for t in chunk.tokens]
    return tokens


async def place(node, body):
    from exod.daemon import placement_api

    request = placement_api.parse_request(body)
    return await node.work.create(request, local=True)


async def ready(nodes, instance_id, timeout=240):
    def check():
        i = state.instance(nodes[0].view, instance_id)
        if i is not None and i.state == pb.INSTANCE_FAILED:
            raise AssertionError(f"failed: {i.reason}")
        return all((i := state.instance(n.view, instance_id)) is not None and i.state == pb.INSTANCE_READY
                   for n in nodes)
    await until(check, timeout, 0.2)


def test_ranks_fetch_only_their_bytes_from_the_node_that_holds_the_model(tmp_path, moe_cache):
    source, cache = moe_cache
    total = checkpoint_bytes(source)

    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=8 * GB, hf_cache=str(cache)))
        peers = [f"127.0.0.1:{a.grpc_port}"]
        b = await started(settings(tmp_path, "b", peers, memory_limit=8 * GB, hf_cache=str(tmp_path / "b-hub")))
        c = await started(settings(tmp_path, "c", peers, memory_limit=8 * GB, hf_cache=str(tmp_path / "c-hub")))
        nodes = [a, b, c]
        try:
            await until(lambda: all(statuses(n) == {"a": pb.UP, "b": pb.UP, "c": pb.UP} for n in nodes), 15)
            # Every node sees what a holds: complete, with the LFS files' digests.
            def published(n):
                m = n.view.member(a.node_id)
                return [h for h in m.record.profile.models if h.model_id == REPO_ID] if m else []
            await until(lambda: all(published(n) for n in nodes), 15)
            [held] = published(c)
            assert held.complete and held.store == "hf-cache" and len(held.revision) == 40
            digests = {f.name: f.sha256 for f in held.files}
            weights = "model-00001-of-00002.safetensors"
            assert digests[weights] == hashlib.sha256((source / weights).read_bytes()).hexdigest()

            # A member reads ranges of listed files, each chunk with its digest; nothing else.
            channel = member_channel(f"127.0.0.1:{a.grpc_port}", b.identity)
            stub = transport.peer_stub(channel)
            ask = lambda f, *ranges: stub.ReadModelFile(pb.ReadFileRequest(  # noqa: E731
                model_id=REPO_ID, revision=held.revision, file=f, ranges=list(ranges)), timeout=10)
            chunks = [c async for c in ask(weights, pb.ByteRange(offset=8, length=1000, stride=4000, count=3))]
            data = b"".join(c.data for c in chunks)
            raw = (source / weights).read_bytes()
            assert data == raw[8:1008] + raw[4008:5008] + raw[8008:9008]
            assert all(hashlib.sha256(c.data).digest() == c.sha256 for c in chunks)
            for name, code in (("../../../etc/passwd", grpc.StatusCode.NOT_FOUND),
                               (str(source / weights), grpc.StatusCode.NOT_FOUND),
                               ("refs/main", grpc.StatusCode.NOT_FOUND)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [c async for c in ask(name, pb.ByteRange(offset=0, length=10))]
                assert e.value.code() == code, name
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [c async for c in ask(weights, pb.ByteRange(offset=len(raw) - 5, length=10))]
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
            await channel.close()
            stranger = member_channel(f"127.0.0.1:{a.grpc_port}", member_identity())  # holds the key, not in the view
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [c async for c in transport.peer_stub(stranger).ReadModelFile(pb.ReadFileRequest(
                    model_id=REPO_ID, file=weights, ranges=[pb.ByteRange(offset=0, length=8)]), timeout=10)]
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await stranger.close()

            # b plans it from a's headers: each rank's bytes to fetch, from a.
            from exod.daemon import placement_api

            plan = await placement_api.preview(b, placement_api.parse_request(
                {"model": REPO_ID, "strategy": "moe_tensor", "nodes": ["b", "c"], "ranks": 2}), local=False)
            assert plan.chosen.revision == held.revision
            for r in plan.chosen.ranks:
                t = r.transfer
                assert t.bytes_local == 0 and t.sources == ["a"] and 0 < t.bytes_to_fetch < 0.75 * total
                assert t.predicted_s > 0

            # Placed moe_tensor on b and c: Downloading, then Ready; each fetched under 0.75x.
            served = a.models.server.bytes_served
            instance = await place(b, {"model": REPO_ID, "strategy": "moe_tensor", "nodes": ["b", "c"], "ranks": 2,
                                       "context_length": 256})
            seen = set()

            async def watch():
                while True:
                    i = state.instance(b.view, instance.instance_id)
                    for r in (i.runners if i else []):
                        if r.state == pb.DOWNLOADING:
                            seen.add((r.rank, r.download.bytes_total))
                    await asyncio.sleep(0.05)
            watcher = asyncio.create_task(watch())
            await ready(nodes, instance.instance_id)
            watcher.cancel()
            assert {rank for rank, _ in seen} == {0, 1}, seen
            fetched = a.models.server.bytes_served - served
            for node in (b, c):
                [shard] = node.models.store.shards(REPO_ID)
                size = sum(f.size for f in shard.files.values())
                assert size < 0.75 * total, (size, total)
                assert shard.shard["strategy"] == "moe_tensor"
            assert fetched < 2 * 0.75 * total
            # The same greedy answer as a single node that holds it all.
            sharded = await answer(b, instance.instance_id)
            single = await place(a, {"model": REPO_ID, "nodes": ["a"], "ranks": 1, "context_length": 256})
            await ready(nodes, single.instance_id)
            assert a.models.server.bytes_served - served == fetched  # a reads its own cache
            assert await answer(c, single.instance_id) == sharded and len(sharded) == 12
            await a.work.delete(single.instance_id)
            await b.work.delete(instance.instance_id)

            # Placed again the same way: the shards are reused, nothing moves.
            before = a.models.server.bytes_served
            again = await place(c, {"model": REPO_ID, "strategy": "moe_tensor", "nodes": ["b", "c"], "ranks": 2,
                                    "context_length": 256})
            await ready(nodes, again.instance_id)
            assert a.models.server.bytes_served == before
            assert sharded == await answer(a, again.instance_id)
            await c.work.delete(again.instance_id)

            # Every node lists every node's models, shards included.
            await until(lambda: all(any(h.store == "shard" for h in n.view.member(b.node_id).record.profile.models)
                                    for n in nodes), 15)

            # A pipeline over b and c: each fetches its stage and the layers-free tensors only.
            before = a.models.server.bytes_served
            pipe = await place(b, {"model": REPO_ID, "strategy": "pipeline", "nodes": ["b", "c"], "ranks": 2,
                                   "context_length": 256})
            await ready(nodes, pipe.instance_id)
            stages = {}
            for r in pipe.placement.ranks:
                node = {"b": b, "c": c}[r.node_name]
                [shard] = [h for h in node.models.store.shards(REPO_ID) if h.shard["strategy"] == "pipeline"]
                stages[r.rank] = (r.layer_start, r.layer_end, sum(f.size for f in shard.files.values()))
                assert (shard.shard["layer_start"], shard.shard["layer_end"]) == (r.layer_start, r.layer_end)
            fetched = a.models.server.bytes_served - before
            assert fetched == sum(r.transfer.bytes_to_fetch for r in pipe.placement.ranks)
            assert fetched < 1.3 * total  # the stages, plus the embedding and head each stage needs
            assert sharded == await answer(c, pipe.instance_id)
        finally:
            for n in nodes:
                await n.stop()

    asyncio.run(asyncio.wait_for(scenario(), 900))


def test_pull_detects_corrupt_chunks_and_ls_lists_every_node(tmp_path, moe_cache, monkeypatch):
    """The source flips a byte in its first chunks after hashing them (a test
    hook, as a corrupting link would): the receiver notices each, fetches
    those bytes again, and the pulled files are the source's exactly."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    source, cache = moe_cache

    async def scenario():
        monkeypatch.setenv("EXOD_TEST_CORRUPT_SERVED_CHUNKS", "3")
        a = await started(settings(tmp_path, "a", memory_limit=8 * GB, hf_cache=str(cache)))
        monkeypatch.delenv("EXOD_TEST_CORRUPT_SERVED_CHUNKS")
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=8 * GB,
                                   hf_cache=str(tmp_path / "b-hub")))
        try:
            await until(lambda: statuses(b) == {"a": pb.UP, "b": pb.UP}, 15)
            await until(lambda: any(h.model_id == REPO_ID for h in b.view.member(a.node_id).record.profile.models), 15)
            out = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "exod.daemon.cli", "pull", REPO_ID, "--node", "b", "--api",
                f"http://127.0.0.1:{a.api_port}"], capture_output=True, text=True, cwd=REPO, timeout=300,
                env={**__import__("os").environ, "EXOD_PROGRESS": "1"})
            assert out.returncode == 0, out.stderr
            assert "GB" in out.stderr and "#" in out.stderr  # the progress bar
            pulled = b.models_dir / REPO_ID
            for f in source.iterdir():
                assert (pulled / f.name).read_bytes() == f.read_bytes(), f.name
            assert a.models.server.bytes_served > checkpoint_bytes(source)  # the corrupt chunks went twice
            assert not list(pulled.parent.glob(".partial-*"))
            await until(lambda: any(h.model_id == REPO_ID and h.store == "exod" and h.complete
                                    for h in a.view.member(b.node_id).record.profile.models), 15)
            listing = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "exod.daemon.cli", "ls", "--json", "--api", f"http://127.0.0.1:{a.api_port}"],
                capture_output=True, text=True, cwd=REPO, timeout=60)
            rows = {(r["node"], r["store"]): r for r in json.loads(listing.stdout) if r["model_id"] == REPO_ID}
            assert rows[("a", "hf-cache")]["complete"] and rows[("b", "exod")]["complete"]
            assert rows[("a", "hf-cache")]["revision"] == rows[("b", "exod")]["revision"]
            table = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "exod.daemon.cli", "ls", "--api", f"http://127.0.0.1:{b.api_port}"],
                capture_output=True, text=True, cwd=REPO, timeout=60)
            assert table.returncode == 0 and REPO_ID in table.stdout and "complete" in table.stdout
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(asyncio.wait_for(scenario(), 600))


def test_a_disk_too_small_is_a_clear_error_and_leaves_nothing(tmp_path, moe_cache):
    """b's shard store is a 30 MB tmpfs: the rank fails before anything is
    fetched, naming the bytes needed and free, and nothing is left there."""
    import subprocess

    source, cache = moe_cache
    shards_dir = tmp_path / "b" / "shards"
    shards_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(shards_dir)], check=True)

    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=8 * GB, hf_cache=str(cache)))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=8 * GB,
                                   hf_cache=str(tmp_path / "b-hub")))
        try:
            await until(lambda: statuses(b) == {"a": pb.UP, "b": pb.UP}, 15)
            await until(lambda: any(h.model_id == REPO_ID for h in b.view.member(a.node_id).record.profile.models), 15)
            instance = await place(b, {"model": REPO_ID, "nodes": ["b"], "ranks": 1, "context_length": 256})

            def failed():
                i = state.instance(b.view, instance.instance_id)
                return i is not None and i.state == pb.INSTANCE_FAILED
            await until(failed, 60)
            reason = state.instance(b.view, instance.instance_id).reason
            assert "not enough disk space on node b" in reason and "needs" in reason and "free in" in reason, reason
            assert str(shards_dir) in reason
            assert a.models.server.bytes_served < 1_000_000  # headers only
            assert [p for p in shards_dir.rglob("*") if p.is_file()] == []
        finally:
            await b.stop()
            await a.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        subprocess.run(["umount", str(shards_dir)], check=False)


def hub_online(monkeypatch, url):
    """The daemons of this process ask the mirror at `url` as their hub.
    huggingface_hub read HF_HUB_OFFLINE (set by conftest) at import."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def mirror_sent(mirror) -> dict:
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{mirror.url}/_stats", timeout=10).read())


def same_tensors(shard_dir, source) -> None:
    """Every tensor of a whole-strategy shard equals the source checkpoint's, bit for bit."""
    import mlx.core as mx
    import numpy as np

    stored = mx.load(str(shard_dir / shards.SHARD_FILE))
    expected = {}
    for f in source.glob("*.safetensors"):
        expected.update(mx.load(str(f)))
    assert set(stored) == set(expected)
    for name, value in expected.items():
        assert np.array_equal(np.array(stored[name]), np.array(value)), name


@pytest.fixture(scope="module")
def layered_mirror(tmp_path_factory):
    """The model on a mirror only, its files split by layers as hub
    checkpoints are: the layer-free tensors, then layers 0-1, 2-3, 4-5."""
    import shutil

    source = build_moe_by_layers(tmp_path_factory.mktemp("moe-layers"))
    root = tmp_path_factory.mktemp("mirror")
    shutil.copytree(source, root / REPO_ID)
    return source, root


def test_ranks_range_read_only_their_bytes_from_the_hub(tmp_path, layered_mirror, monkeypatch):
    """No node holds the model; a mirror at HF_ENDPOINT does. Placed
    moe_tensor on b and c, each rank range-reads its slices of the files
    whose every tensor it cuts (layers 2-5), moving under 0.75 of each
    (slices along the last axis are read through: a request per row would
    cost more); the files it needs nearly whole (the layer-free tensors,
    layers 0-1 with the layer the canary computes uncut) it downloads whole
    into its HF cache. The greedy answer is a single-node instance's."""
    from .hf_mirror import Mirror

    source, root = layered_mirror
    sizes = {p.name: p.stat().st_size for p in source.glob("*.safetensors")}
    total = checkpoint_bytes(source)
    ranged = ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]

    async def scenario(mirror):
        b = await started(settings(tmp_path, "b", memory_limit=8 * GB, hf_cache=str(tmp_path / "b-hub")))
        c = await started(settings(tmp_path, "c", [f"127.0.0.1:{b.grpc_port}"], memory_limit=8 * GB,
                                   hf_cache=str(tmp_path / "c-hub")))
        nodes = [b, c]
        try:
            await until(lambda: all(statuses(n) == {"b": pb.UP, "c": pb.UP} for n in nodes), 15)
            instance = await place(b, {"model": REPO_ID, "strategy": "moe_tensor", "nodes": ["b", "c"], "ranks": 2,
                                       "context_length": 256})
            await ready(nodes, instance.instance_id)
            sent = mirror_sent(mirror)
            for n in ranged:  # two ranks' slices (and headers), each under 0.75 of the file
                got = sent.get(f"{REPO_ID}/{n}", 0)
                assert 2 * 0.5 * sizes[n] < got < 2 * 0.75 * sizes[n], (n, got, sizes[n])
                for node in nodes:
                    assert not list((tmp_path / f"{node.record.profile.name}-hub").rglob(n))
            weights = sum(sent.get(f"{REPO_ID}/{n}", 0) for n in sizes)
            assert weights < 2 * 0.9 * sum(sizes.values()), (weights, total)
            for node in nodes:
                [shard] = node.models.store.shards(REPO_ID)
                assert shard.shard["strategy"] == "moe_tensor"
            sharded = await answer(b, instance.instance_id)
            await b.work.delete(instance.instance_id)

            single = await place(b, {"model": REPO_ID, "nodes": ["b"], "ranks": 1, "context_length": 256})
            await ready(nodes, single.instance_id)
            for n in ranged:  # every byte needed: downloaded whole, into b's HF cache
                assert list((tmp_path / "b-hub").rglob(n))
            assert await answer(c, single.instance_id) == sharded and len(sharded) == 12
        finally:
            for n in nodes:
                await n.stop()

    with Mirror(root) as mirror:
        hub_online(monkeypatch, mirror.url)
        asyncio.run(asyncio.wait_for(scenario(mirror), 900))


async def holder_that_stops(tmp_path, cache, monkeypatch, after_bytes: int):
    """a holds the model and stops serving after `after_bytes` (a test hook,
    as a node killed mid-transfer would); b holds nothing and sees a's
    model. Both started; the caller stops them."""
    monkeypatch.setenv("EXOD_TEST_FAIL_SERVING_AFTER_BYTES", str(after_bytes))
    a = await started(settings(tmp_path, "a", memory_limit=8 * GB, hf_cache=str(cache)))
    monkeypatch.delenv("EXOD_TEST_FAIL_SERVING_AFTER_BYTES")
    b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=8 * GB,
                               hf_cache=str(tmp_path / "b-hub")))
    try:
        await until(lambda: statuses(b) == {"a": pb.UP, "b": pb.UP}, 15)
        await until(lambda: any(h.model_id == REPO_ID for h in b.view.member(a.node_id).record.profile.models), 15)
    except BaseException:
        await b.stop()
        await a.stop()
        raise
    return a, b


def test_the_hub_finishes_a_fetch_its_only_peer_left(tmp_path, moe_cache, monkeypatch):
    """a, the only node that holds the model, stops serving a third of the
    way through b's fetch (a test hook, as a killed node would): the rest
    comes from the mirror at HF_ENDPOINT, by range reads from where a left
    off, the rank reaches Ready, and its shard is the checkpoint exactly."""
    from .hf_mirror import Mirror

    source, cache = moe_cache
    total = checkpoint_bytes(source)
    cut_at = total // 3

    async def scenario(mirror):
        a, b = await holder_that_stops(tmp_path, cache, monkeypatch, cut_at)
        try:
            before = mirror_sent(mirror)
            instance = await place(b, {"model": REPO_ID, "nodes": ["b"], "ranks": 1, "context_length": 256})
            await ready([a, b], instance.instance_id)
            served = a.models.server.bytes_served
            assert cut_at <= served < cut_at + 8 * (1 << 20)  # a stopped where the hook said
            sent = mirror_sent(mirror)
            from_hub = sum(v - before.get(k, 0) for k, v in sent.items() if k.endswith(".safetensors"))
            weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
            # The rest only (what a sent in its last requests may come again), not the whole files.
            assert weights - served <= from_hub < weights - served + 64 * (1 << 20), (from_hub, served, weights)
            assert not list((tmp_path / "b-hub").rglob("*.safetensors"))  # ranges, not downloads
            [shard] = b.models.store.shards(REPO_ID)
            same_tensors(Path(shard.root), source)
            assert len(await answer(b, instance.instance_id)) == 12
        finally:
            await b.stop()
            await a.stop()

    with Mirror(Path(str(cache) + "-mirror")) as mirror:
        hub_online(monkeypatch, mirror.url)
        asyncio.run(asyncio.wait_for(scenario(mirror), 600))


def test_a_pull_its_only_peer_left_is_finished_from_the_hub(tmp_path, moe_cache, monkeypatch):
    """`exod pull` from the only node that holds the model, which stops
    serving a third of the way: the rest comes from the mirror by range
    reads, and the pulled files are the checkpoint's (each checked against
    its sha256). (How the deadline is planned again for the hub:
    tests/test_fetch_fallback.py.)"""
    from .hf_mirror import Mirror

    source, cache = moe_cache
    total = checkpoint_bytes(source)
    cut_at = total // 3

    async def scenario(mirror):
        a, b = await holder_that_stops(tmp_path, cache, monkeypatch, cut_at)
        try:
            before = mirror_sent(mirror)
            seen = []
            held = await b.models.pull(REPO_ID, seen.append)
            assert held.complete and held.store == "exod"
            pulled = b.models_dir / REPO_ID
            for f in source.iterdir():
                assert (pulled / f.name).read_bytes() == f.read_bytes(), f.name
            served = a.models.server.bytes_served
            assert cut_at <= served < cut_at + 8 * (1 << 20)
            from_hub = sum(v - before.get(k, 0) for k, v in mirror_sent(mirror).items())
            assert total - served <= from_hub < total - served + 64 * (1 << 20), (from_hub, served, total)
            assert seen and seen[-1].bytes_done == total
        finally:
            await b.stop()
            await a.stop()

    with Mirror(Path(str(cache) + "-mirror")) as mirror:
        hub_online(monkeypatch, mirror.url)
        asyncio.run(asyncio.wait_for(scenario(mirror), 600))


def test_offline_a_fetch_its_only_peer_left_fails_naming_what_is_missing(tmp_path, moe_cache, monkeypatch):
    """The same cut with HF_HUB_OFFLINE set (as conftest sets it): the hub is
    not asked, and the rank fails naming the missing bytes and the source
    it was fetching from; no partial shard is left."""
    source, cache = moe_cache
    total = checkpoint_bytes(source)

    async def scenario():
        a, b = await holder_that_stops(tmp_path, cache, monkeypatch, total // 3)
        try:
            instance = await place(b, {"model": REPO_ID, "nodes": ["b"], "ranks": 1, "context_length": 256})

            def failed():
                i = state.instance(b.view, instance.instance_id)
                return i is not None and i.state == pb.INSTANCE_FAILED
            await until(failed, 60)
            reason = state.instance(b.view, instance.instance_id).reason
            assert "missing" in reason and "no source is left" in reason and "a: " in reason, reason
            assert "hub" not in reason, reason
            assert not [p for p in (tmp_path / "b" / "shards").rglob("*") if p.is_file()]
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(asyncio.wait_for(scenario(), 300))
