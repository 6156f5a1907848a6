"""The peer plane under attack, with real daemons on loopback: a machine
without the cluster key gets no further than the TLS handshake, and a
member that holds the key cannot speak for another member, forge or replay
its records, start or stop processes it did not place, hold memory for
good, or flood a node's view."""

import asyncio
import time

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from exod.daemon import keys, signing, transport
from exod.daemon.config import PROTOCOL_VERSION
from exod.proto import exod_pb2 as pb

from .daemon_helpers import join_as_member, member_channel, member_identity, settings, started, statuses, until

GB = 10**9
OTHER_KEY = keys.new_cluster_key()


def run(coro, timeout=90):
    asyncio.run(asyncio.wait_for(coro, timeout))


def now_ms():
    return int(time.time() * 1000)


def record_of(identity, name="x", incarnation=None, version=1, signer=None, **profile):
    record = pb.NodeRecord(profile=pb.NodeProfile(node_id=identity.node_id, name=name, **profile), version=version,
                           incarnation=incarnation or now_ms(), cluster_id="default",
                           protocol_version=PROTOCOL_VERSION)
    signing.sign(signer or identity, record)
    if signer is not None:  # signed by someone else, but claiming identity's id and key
        record.public_key = identity.public_key_der
    return record


async def expect_code(call, *codes):
    try:
        await call
    except grpc.aio.AioRpcError as e:
        assert e.code() in codes, (e.code(), e.details())
        return e
    raise AssertionError(f"accepted; expected {codes}")


def snapshot(node):
    """What an attack could change: who is a member with which record and
    status, links, work, reservations, runners, the node's own id."""
    members = {k: (m.record.SerializeToString(deterministic=True), m.status) for k, m in node.view.members.items()}
    return (members, dict(node.view.links), dict(node.view.work), dict(node.ledger.held),
            dict(node.work.processes), node.node_id)


def test_without_the_key_nothing_gets_past_the_handshake(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        try:
            before = snapshot(a)
            address = f"127.0.0.1:{a.grpc_port}"
            strangers = [grpc.aio.insecure_channel(address),  # no TLS at all
                         member_channel(address, member_identity(OTHER_KEY))]  # TLS, another cluster key
            # A certificate that names the victim, self-signed: not issued by the cluster CA.
            forged_ca = keys.derive_ca(keys.parse_cluster_key(keys.new_cluster_key()))
            strangers.append(member_channel(address, keys.issue(forged_ca, a.identity.private_key)))
            reservation = pb.Reservation(reservation_id="0123456789ab-0", instance_id="0123456789ab", bytes=GB,
                                         expires_at_unix_ms=-1)
            for channel in strangers:
                stub = transport.peer_stub(channel)
                calls = [
                    stub.Exchange(pb.ExchangeRequest(sender=a.record), timeout=3),
                    stub.Heartbeat(pb.HeartbeatRequest(node_id=a.node_id, cluster_id="default"), timeout=3),
                    stub.Reserve(pb.ReserveRequest(reservation=reservation), timeout=3),
                    stub.Release(pb.ReleaseRequest(reservation_id="0123456789ab-0"), timeout=3),
                    stub.StartRunner(pb.StartRunnerRequest(spec=pb.RunnerSpec(instance_id="0123456789ab",
                                                                              world_size=1), model="demo"), timeout=3),
                    stub.StopInstance(pb.StopInstanceRequest(instance_id="0123456789ab"), timeout=3),
                    stub.Leave(pb.LeaveRequest(node_id=a.node_id, incarnation=2**62), timeout=3),
                    stub.Ping(pb.PingRequest(payload=b"x"), timeout=3),
                    stub.DeleteInstance(pb.InstanceRef(instance_id="0123456789ab"), timeout=3),
                ]
                for call in calls:
                    await expect_code(call, grpc.StatusCode.UNAVAILABLE)
                await expect_code(stub.Generate(pb.GenerateOnInstance(instance_id="0123456789ab"),
                                                timeout=3).read(), grpc.StatusCode.UNAVAILABLE)
                await channel.close()
            assert snapshot(a) == before
            assert statuses(a) == {"a": pb.UP}
        finally:
            await a.stop()

    run(scenario())


def test_a_member_cannot_pose_as_another_member(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        b = await started(settings(tmp_path, "b", [f"127.0.0.1:{a.grpc_port}"], memory_limit=4 * GB))
        mallory = member_identity()
        try:
            await until(lambda: statuses(a) == {"a": pb.UP, "b": pb.UP}, 10)
            await until(lambda: len(a.view.links) == 1, 10)
            await join_as_member([a], mallory, name="mallory")
            stub = transport.peer_stub(member_channel(f"127.0.0.1:{a.grpc_port}", mallory))
            b_record = a.view.member(b.node_id).record
            before = snapshot(a)

            # Requests that speak for b (or for a itself) are refused outright.
            for call in (stub.Heartbeat(pb.HeartbeatRequest(node_id=b.node_id, incarnation=b.incarnation,
                                                            cluster_id="default"), timeout=3),
                         stub.Leave(pb.LeaveRequest(node_id=b.node_id, incarnation=2**62), timeout=3),
                         stub.Exchange(pb.ExchangeRequest(sender=b_record), timeout=3),
                         stub.Exchange(pb.ExchangeRequest(sender=a.record), timeout=3)):
                await expect_code(call, grpc.StatusCode.PERMISSION_DENIED)

            # Forged records inside an honest-looking exchange change nothing.
            me = record_of(mallory, "mallory", version=2)
            forged_b = pb.NodeRecord()
            forged_b.CopyFrom(b_record)
            forged_b.version += 5
            forged_b.profile.memory_usable_bytes = 10**15
            signing.sign(mallory, forged_b)  # mallory's key, b's id
            b_as_mallory_key = record_of(b.identity, "b", incarnation=2**62, signer=mallory)
            stolen_id = record_of(a.identity, "a", incarnation=a.incarnation + 1, signer=mallory)
            link = pb.LinkRecord(link=pb.Link(from_node=a.node_id, to_node=b.node_id, from_address="6.6.6.6:1",
                                              to_address="6.6.6.6:2", rtt_s=1e-6), version=now_ms() + 1000)
            signing.sign(mallory, link)
            ready = pb.Instance(instance_id="0123456789ab", state=pb.INSTANCE_READY,
                                placement=pb.Placement(model_id="demo", ranks=[pb.RankPlacement(node_id=b.node_id)]))
            work = pb.WorkRecord(node_id=b.node_id, version=now_ms() + 1000, instances=[ready],
                                 runners=[pb.RunnerStatus(instance_id="0123456789ab", node_id=b.node_id,
                                                          state=pb.FAILED)])
            signing.sign(mallory, work)
            await stub.Exchange(pb.ExchangeRequest(sender=me, nodes=[forged_b, b_as_mallory_key, stolen_id],
                                                   links=[link], work=[work]), timeout=3)
            after = snapshot(a)
            members = dict(after[0])
            members.pop(mallory.node_id)
            assert a.view.member(mallory.node_id).record.version == 2  # its own record: taken
            expected = {k: v for k, v in before[0].items() if k != mallory.node_id}
            assert members == expected and after[1:] == before[1:]
            assert a.node_id == before[-1]  # no new id for the victim

            # Its own record, but with an incarnation far in the future: refused (it would block every later one).
            await stub.Exchange(pb.ExchangeRequest(sender=me, nodes=[record_of(mallory, "m", incarnation=2**63 - 1)]),
                                timeout=3)
            assert a.view.member(mallory.node_id).record.incarnation < 2**62
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_recorded_records_replayed_later_change_nothing(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        mallory = member_identity()
        try:
            carol = member_identity()
            old = await join_as_member([a], carol, name="carol-v1")
            newer = record_of(carol, "carol-v2", incarnation=old.incarnation, version=2)
            await join_as_member([a], mallory, name="mallory")
            stub = transport.peer_stub(member_channel(f"127.0.0.1:{a.grpc_port}", mallory))
            me = a.view.member(mallory.node_id).record
            await stub.Exchange(pb.ExchangeRequest(sender=me, nodes=[newer]), timeout=3)
            assert a.view.member(carol.node_id).record.profile.name == "carol-v2"
            await stub.Exchange(pb.ExchangeRequest(sender=me, nodes=[old]), timeout=3)  # replayed
            assert a.view.member(carol.node_id).record.profile.name == "carol-v2"
        finally:
            await a.stop()

    run(scenario())


def test_runners_start_only_for_the_owners_own_reservation(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        mallory, owner = member_identity(), member_identity()
        try:
            await join_as_member([a], mallory, name="mallory")
            await join_as_member([a], owner, name="owner")
            as_mallory = transport.peer_stub(member_channel(f"127.0.0.1:{a.grpc_port}", mallory))
            as_owner = transport.peer_stub(member_channel(f"127.0.0.1:{a.grpc_port}", owner))
            iid = "0123456789ab"

            def start(**spec):
                base = dict(instance_id=iid, rank=0, world_size=1)
                base.update(spec)
                return pb.StartRunnerRequest(spec=pb.RunnerSpec(**base), reservation_id=f"{iid}-0", model="demo")

            # No reservation at all.
            answer = await as_mallory.StartRunner(start(), timeout=10)
            assert not answer.started and "no reservation" in answer.reason
            # The owner reserves; a reservation that asks never to lapse lapses all the same.
            reserved = await as_owner.Reserve(pb.ReserveRequest(reservation=pb.Reservation(
                reservation_id=f"{iid}-0", instance_id=iid, rank=0, bytes=GB, expires_at_unix_ms=-1)), timeout=5)
            assert reserved.admitted
            held = a.ledger.held[f"{iid}-0"]
            assert held.owner_node_id == owner.node_id
            assert now_ms() < held.expires_at_unix_ms <= now_ms() + 10 * 60_000
            # Someone else's reservation: neither started nor released by mallory.
            answer = await as_mallory.StartRunner(start(), timeout=10)
            assert not answer.started and "no reservation" in answer.reason
            assert not (await as_mallory.Release(pb.ReleaseRequest(reservation_id=f"{iid}-0"), timeout=5)).released
            assert f"{iid}-0" in a.ledger.held
            # Ids that would become paths, ranks past the world, and paths as models: refused.
            for spec, why in ((dict(instance_id="/tmp/x"), "instance id"), (dict(instance_id="../../etc"), "instance id"),
                              (dict(rank=3, world_size=2), "rank"), (dict(world_size=2), "ring needs")):
                answer = await as_owner.StartRunner(start(**spec), timeout=10)
                assert not answer.started and why in answer.reason, answer.reason
            path_model = start()
            path_model.model = str(tmp_path / "a" / "models" / "demo")
            answer = await as_owner.StartRunner(path_model, timeout=10)
            assert not answer.started and "is a path" in answer.reason
            assert not a.work.processes and not list((tmp_path / "a").glob("**/*x.log"))
            # Reservations must name a well-formed instance and rank.
            for bad in (pb.Reservation(reservation_id="x", instance_id="/abs/x", bytes=GB),
                        pb.Reservation(reservation_id=f"{iid}-1", instance_id=iid, rank=2, bytes=GB),
                        pb.Reservation(reservation_id=f"{iid}-1", instance_id=iid, rank=1, bytes=10**15)):
                assert not (await as_mallory.Reserve(pb.ReserveRequest(reservation=bad), timeout=5)).admitted
            # Stopping an instance someone else placed stops nothing; the owner releases its own.
            assert (await as_mallory.StopInstance(pb.StopInstanceRequest(instance_id=iid), timeout=5)).stopped == 0
            assert (await as_owner.Release(pb.ReleaseRequest(reservation_id=f"{iid}-0"), timeout=5)).released
            assert not a.ledger.held
        finally:
            await a.stop()

    run(scenario())


def test_floods_are_bounded(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", max_members=6))
        mallory = member_identity()
        try:
            await join_as_member([a], mallory, name="mallory")
            stub = transport.peer_stub(member_channel(f"127.0.0.1:{a.grpc_port}", mallory))
            me = a.view.member(mallory.node_id).record
            fakes = [record_of(member_identity(), f"fake{i}") for i in range(20)]
            await stub.Exchange(pb.ExchangeRequest(sender=me, nodes=fakes), timeout=10)
            assert len(a.view.members) == 6  # a, mallory and 4 of the fakes
            # Over the per-message cap: refused whole.
            many = [fakes[0]] * 1000
            await expect_code(stub.Exchange(pb.ExchangeRequest(sender=me, nodes=many), timeout=10),
                              grpc.StatusCode.RESOURCE_EXHAUSTED)
            # Discovered addresses waiting to be met are bounded too.
            a.found([f"127.0.0.{i // 250 + 2}:{1000 + i}" for i in range(1000)])
            assert len(a._unknown) <= 64
        finally:
            await a.stop()

    run(scenario())


def test_a_planner_view_with_a_bad_member_still_plans(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a", memory_limit=4 * GB))
        try:
            # A member that took a's name and has no memory or bandwidth. Its id
            # sorts after a's: the planner keeps the first node of a name.
            impostor = member_identity()
            while impostor.node_id < a.node_id:
                impostor = member_identity()
            await join_as_member([a], impostor, name="a")
            assert len(a.view.members) == 2
            plan = await __import__("exod.daemon.placement_api", fromlist=["x"]).preview(
                a, pb.PlacementRequest(model="demo"), local=True)
            assert plan.chosen.fits and {r.node_id for r in plan.chosen.ranks} == {a.node_id}
            assert any("left out" in r for r in plan.reasons), plan.reasons
        finally:
            await a.stop()

    run(scenario())


def test_a_second_daemon_on_one_data_dir_is_refused_and_a_failed_start_leaves_nothing(tmp_path):
    async def scenario():
        a = await started(settings(tmp_path, "a"))
        try:
            from exod.daemon.identity import DataDirInUse
            from exod.daemon.node import Node

            twin = Node(settings(tmp_path, "a"))
            try:
                await twin.start()
                raise AssertionError("a second daemon started on the same data dir")
            except DataDirInUse as e:
                assert "in use by exod pid" in str(e)
            # The API port taken: the start fails, and its gRPC server and lock are gone.
            clash = Node(settings(tmp_path, "b", api_port=a.api_port))
            try:
                await clash.start()
                raise AssertionError("started on a taken port")
            except OSError:
                pass
            assert clash._grpc_server is None and clash._lock_fd is None
            again = await started(settings(tmp_path, "b"))  # the lock was released
            await again.stop()
        finally:
            await a.stop()

    run(scenario())


def test_keys_and_certificates():
    text = keys.new_cluster_key()
    raw = keys.parse_cluster_key(text)
    assert keys.derive_ca(raw).fingerprint == keys.derive_ca(raw).fingerprint
    assert keys.derive_ca(raw).fingerprint != keys.derive_ca(keys.parse_cluster_key(keys.new_cluster_key())).fingerprint
    for bad in ("", "exod1-", "exod1-AAAA", "nope-" + text[6:], text + "AA"):
        try:
            keys.parse_cluster_key(bad)
            raise AssertionError(f"accepted {bad!r}")
        except keys.ClusterKeyError:
            pass
    identity = keys.issue(keys.derive_ca(raw), ec.generate_private_key(ec.SECP256R1()))
    assert keys.node_id_from_cert_pem(identity.cert_pem) == identity.node_id
    record = record_of(identity)
    assert signing.node_record_valid(record)
    record.profile.memory_usable_bytes = 1  # changed after signing
    assert not signing.node_record_valid(record)
