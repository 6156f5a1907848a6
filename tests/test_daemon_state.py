"""The membership reducer, without I/O."""

from exod.daemon import state
from exod.proto import exod_pb2 as pb

T = state.Timing(suspect_after_ms=1500, down_after_ms=3000)


def record(node_id, version=1, incarnation=100, cluster="c", memory=10):
    return pb.NodeRecord(profile=pb.NodeProfile(node_id=node_id, name=node_id, memory_usable_bytes=memory),
                         version=version, incarnation=incarnation, cluster_id=cluster, protocol_version=1)


def fresh():
    view = state.View(self_id="a", cluster_id="c")
    return state.set_self(view, record("a"), 5, 0)


def test_new_records_join_and_stale_ones_do_not_replace():
    view = state.apply_record(fresh(), record("b", version=2), 10)
    assert view.member("b").record.version == 2 and view.member("b").status == pb.UP
    assert state.apply_record(view, record("b", version=1), 20) is view
    newer = state.apply_record(view, record("b", version=3, memory=99), 20)
    assert newer.member("b").record.profile.memory_usable_bytes == 99


def test_other_clusters_and_our_own_id_are_ignored():
    view = fresh()
    assert state.apply_record(view, record("b", cluster="other"), 1) is view
    assert state.apply_record(view, record("a", version=9), 1) is view


def test_missing_heartbeats_go_suspect_then_down_and_a_restart_comes_back_up():
    view = state.heard_from(state.apply_record(fresh(), record("b"), 0), "b", 100, 7, 0)
    assert state.tick(view, 1000, T).member("b").status == pb.UP
    assert state.tick(view, 1600, T).member("b").status == pb.SUSPECT
    down = state.tick(state.tick(view, 1600, T), 3100, T)
    assert down.member("b").status == pb.DOWN
    # A heartbeat from the old incarnation does not revive it; the restart does.
    assert state.heard_from(down, "b", 99, 0, 3200).member("b").status == pb.DOWN
    restarted = state.apply_record(down, record("b", version=1, incarnation=200), 3300)
    assert restarted.member("b").status == pb.UP and restarted.member("b").record.incarnation == 200


def test_heartbeats_carry_the_dynamic_memory():
    view = state.heard_from(state.apply_record(fresh(), record("b"), 0), "b", 100, 1234, 50)
    assert view.member("b").memory_available_bytes == 1234 and view.member("b").last_seen_ms == 50


def test_left_nodes_stay_left_until_they_return():
    view = state.left(state.apply_record(fresh(), record("b"), 0), "b", 100, 10)
    assert view.member("b").status == pb.LEFT
    assert state.tick(view, 10**6, T).member("b").status == pb.LEFT
    assert state.heard_from(view, "b", 100, 0, 20).member("b").status == pb.LEFT  # a late heartbeat
    back = state.apply_record(view, record("b", incarnation=101), 30)
    assert back.member("b").status == pb.UP


def test_a_twin_that_left_never_comes_back_over_the_original():
    # A copied data dir: the twin (incarnation 200) said goodbye and moved to
    # a new id; the original (incarnation 100) took the id back. The twin's
    # old record, still gossiping with its higher incarnation, is refused.
    twin = state.left(state.apply_record(fresh(), record("b", incarnation=200), 0), "b", 200, 10)
    original = state.apply_record(twin, record("b", incarnation=100), 20)
    assert original.member("b").status == pb.UP and original.member("b").record.incarnation == 100
    assert state.apply_record(original, record("b", incarnation=200, version=9), 30) is original
    # The original's own restarts still win, and still remember the twin.
    restarted = state.apply_record(original, record("b", incarnation=300), 40)
    assert restarted.member("b").record.incarnation == 300
    assert state.apply_record(restarted, record("b", incarnation=200, version=9), 50) is restarted


def test_links_keep_the_highest_version():
    link = pb.LinkRecord(link=pb.Link(from_node="a", to_node="b", rtt_s=0.001), version=2)
    view = state.apply_link(fresh(), link)
    older = pb.LinkRecord(link=pb.Link(from_node="a", to_node="b", rtt_s=9.0), version=1)
    assert state.apply_link(view, older).links[("a", "b")].link.rtt_s == 0.001
    assert state.apply_link(view, pb.LinkRecord(link=pb.Link(from_node="a", to_node="a"), version=5)) is view


def test_the_planner_sees_only_up_nodes_and_their_links():
    view = state.apply_record(fresh(), record("b"), 0)
    view = state.apply_record(view, record("c"), 0)
    view = state.heard_from(view, "b", 100, 0, 5000)
    view = state.apply_link(view, pb.LinkRecord(link=pb.Link(from_node="a", to_node="b"), version=1))
    view = state.apply_link(view, pb.LinkRecord(link=pb.Link(from_node="a", to_node="c"), version=1))
    view = state.tick(view, 5000, T)  # c was never heard: down
    cluster = state.cluster_for_planner(view)
    assert [n.node_id for n in cluster.nodes] == ["a", "b"]
    assert [(l.from_node, l.to_node) for l in cluster.links] == [("a", "b")]
    assert len(state.to_proto(view).nodes) == 3


def test_a_left_entry_gives_way_to_any_other_life_of_the_id():
    # A copy of b's data dir started later, was stored under b's id, then
    # moved to a new id and said goodbye for the old one: b itself, older, returns.
    view = state.left(state.apply_record(fresh(), record("b", incarnation=200), 0), "b", 200, 10)
    back = state.apply_record(view, record("b", incarnation=100), 20)
    assert back.member("b").status == pb.UP and back.member("b").record.incarnation == 100


def test_long_gone_nodes_are_forgotten_with_their_links():
    timing = state.Timing(suspect_after_ms=1500, down_after_ms=3000, forget_after_ms=10_000)
    view = state.apply_record(fresh(), record("b"), 0)
    view = state.apply_link(view, pb.LinkRecord(link=pb.Link(from_node="a", to_node="b"), version=1))
    view = state.tick(view, 3000, timing)
    assert view.member("b").status == pb.DOWN
    assert state.tick(view, 9000, timing).member("b") is not None
    gone = state.tick(view, 10_000, timing)
    assert gone.member("b") is None and not gone.links and gone.member("a") is not None


def test_a_rank_status_counts_only_from_the_node_that_runs_it():
    from exod.daemon import state as cluster

    view = cluster.View("a", "c")
    placement = pb.Placement(ranks=[pb.RankPlacement(rank=0, node_id="b"), pb.RankPlacement(rank=1, node_id="a")])
    owned = pb.WorkRecord(node_id="a", version=1, instances=[pb.Instance(instance_id="i", placement=placement)],
                          runners=[pb.RunnerStatus(instance_id="i", rank=1, node_id="a", state=pb.READY)])
    view = cluster.apply_work(view, owned)
    honest = pb.WorkRecord(node_id="b", version=1,
                           runners=[pb.RunnerStatus(instance_id="i", rank=0, node_id="b", state=pb.READY)])
    view = cluster.apply_work(view, honest)
    # A third member's own record claims rank 0 failed (and that it runs it).
    liar = pb.WorkRecord(node_id="m", version=9,
                         runners=[pb.RunnerStatus(instance_id="i", rank=0, node_id="m", state=pb.FAILED)])
    view = cluster.apply_work(view, liar)
    assert [r.state for r in cluster.instance(view, "i").runners] == [pb.READY, pb.READY]
