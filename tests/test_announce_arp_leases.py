"""announce_arp's Lease membership against the test API server: several memberships in one
process, each a node with its own connection (the core's, from a config's `source` section),
as on separate machines. Liveness, eligibility, a killed node expiring, a stopping node
handing over at once, an API outage, and the first look at Leases left by dead nodes."""

from __future__ import annotations

import datetime
import json
import logging
import time

import pytest

from kpr.config import parse_config
from kpr.context import PluginContext
from kpr.model import NodeInfo
from kpr.plugins.announce_arp.leases import ELIGIBLE_ANNOTATION, LABELS, KubernetesMembership, ServerClock, decode_eligible
from kpr.plugins.announce_arp.plugin import AnnounceARP
from kpr.pluginmanager import build_plugin_manager
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.relay import TcpRelay
from kpr.testing.waiting import wait_for

NS = "kube-system"
PREFIX = "kpr-arp-"


def config_text(srv: KubeApiServer | None, announce: str = "membership: kubernetes", port: int | None = None) -> str:
    # port: reach the server through a relay on that loopback port instead
    url = f"https://127.0.0.1:{port}" if port else srv.url if srv else ""
    source = (
        f"source: {{kind: kubernetes, apiServer: '{url}', tokenFile: '{srv.token_file}', caFile: '{srv.ca_file}'}}\n"
        if srv is not None
        else "source: {kind: files}\n"
    )
    return source + f"plugins:\n  announce_arp: {{enabled: true, interfaces: [eth0], {announce}}}\n"


def context(srv: KubeApiServer | None, node: str, announce: str = "membership: kubernetes", port: int | None = None) -> PluginContext:
    cfg = parse_config(config_text(srv, announce, port))
    build_plugin_manager(cfg)
    return PluginContext("announce_arp", NodeInfo(node), logging.getLogger("t"), cfg, None)


@pytest.fixture
def srv():
    with KubeApiServer(bookmark_interval=0.5) as s:
        yield s


@pytest.fixture
def cluster(srv):
    """make(node, duration, renew) -> a started membership; all stopped and closed after."""
    made: list[tuple[KubernetesMembership, PluginContext]] = []

    def make(node: str, duration: int = 1, renew: float = 0.2, start: bool = True, port: int | None = None) -> KubernetesMembership:
        ctx = context(srv, node, port=port)
        m = KubernetesMembership(node, ctx.kube_client(), namespace=NS, prefix=PREFIX, lease_duration=duration, renew_interval=renew)
        made.append((m, ctx))
        if start:
            m.start()
        return m

    yield make
    for m, ctx in made:
        m.kill()
        if ctx.kube is not None:
            ctx.kube.close()


def lease(srv: KubeApiServer, node: str) -> dict | None:
    return srv.get("Lease", NS, PREFIX + node)


def all_see(members: list[KubernetesMembership], nodes: set[str], timeout: float = 5.0) -> None:
    wait_for(lambda: all(m.live_nodes() == nodes for m in members), timeout, f"every node to see {sorted(nodes)}")


def lease_runs_out(srv: KubeApiServer, node: str) -> float:
    """When `node`'s Lease runs out on the server's clock (the wall clock here): its last
    renewTime plus its duration. A peer sees the renewal no earlier than it was written, so it
    may not let the node go before then, however slowly the machine runs."""
    spec = lease(srv, node)["spec"]
    return datetime.datetime.fromisoformat(spec["renewTime"]).timestamp() + spec["leaseDurationSeconds"]


def unhealthy(m: KubernetesMembership):
    """m's health once it reports a problem, else None (for wait_for). Whether it still serves
    then depends on how long the machine took to look: a health looked at after its own Lease
    ran out says so (validForSeconds 0)."""
    h = m.health()
    return None if h.healthy else h


def holds_until(deadline: float, check, what: str) -> None:
    """`check()` holds at every look until the wall clock reaches `deadline`: a look that
    fails counts only when it ended before the deadline (a slow machine makes looks late,
    never early)."""
    while True:
        ok = check()
        ended = time.time()
        if ended >= deadline:
            return
        assert ok, f"{what}: failed {deadline - ended:.2f} s before {deadline:.2f}"
        time.sleep(0.05)


def test_each_node_holds_its_lease_and_all_see_each_other(srv, cluster):
    a, b, c = cluster("node1"), cluster("node2"), cluster("node3")
    all_see([a, b, c], {"node1", "node2", "node3"})
    obj = lease(srv, "node1")
    spec = obj["spec"]
    assert spec["holderIdentity"] == "node1" and spec["leaseDurationSeconds"] == 1
    assert spec["leaseTransitions"] == 0 and spec["acquireTime"]
    assert obj["metadata"]["labels"].items() >= LABELS.items()
    # renewed: renewTime moves on, on the server's clock (the same machine here)
    first = spec["renewTime"]
    wait_for(lambda: lease(srv, "node1")["spec"]["renewTime"] != first, 10, "a renewal")
    renewed = datetime.datetime.fromisoformat(lease(srv, "node1")["spec"]["renewTime"])
    assert abs(renewed.timestamp() - time.time()) < 30, "the server's clock, not another"
    # not finished its initial sync: nothing published yet, peers know it as None
    assert obj["metadata"]["annotations"][ELIGIBLE_ANNOTATION] == "null"
    assert b.eligible("node1") is None
    # The server shows a renewal a moment before the renewing thread counts it.
    wait_for(lambda: a.health().counters["renewals"] >= 2, 10, "two renewals counted")
    h = a.health()
    assert h.healthy, h
    assert h.counters["renewals"] >= 2 and h.counters["renew_failures"] == 0 and h.counters["live_nodes"] == 3


def test_eligibility_travels_in_the_lease_at_once(srv, cluster):
    # the renewal every 60 s would come long after the wait below gives up: only the publish
    # itself can carry the addresses in time
    a, b = cluster("node1", duration=120, renew=60.0), cluster("node2", duration=120, renew=60.0)
    all_see([a, b], {"node1", "node2"})
    calls = []
    b.subscribe(lambda: calls.append(time.monotonic()))
    a.publish(frozenset({"10.0.100.10", "fd00:100::10"}))
    wait_for(lambda: b.eligible("node1") == {"10.0.100.10", "fd00:100::10"}, 30, "node2 to see node1's addresses")
    # Told by the thread that took the change in, a moment after it keeps it: wait for that.
    wait_for(lambda: calls, 10, "subscribers told")
    ann = lease(srv, "node1")["metadata"]["annotations"][ELIGIBLE_ANNOTATION]
    assert json.loads(ann) == ["10.0.100.10", "fd00:100::10"]
    a.publish(frozenset())
    wait_for(lambda: b.eligible("node1") == frozenset(), 10, "the empty set")
    # node1's own is what the server answered its write, which node2's watch may bring first
    wait_for(lambda: a.eligible("node1") == frozenset(), 10, "node1's write answered")


def test_the_own_eligibility_is_the_one_the_lease_carries(srv, cluster):
    """eligible(self) is what the node's Lease carries on the server, not what was just
    published: the plugin claims an address only once its peers can know (an address coming
    back to this node is not answered by it and its holder both while the write has not landed)."""
    a, b = cluster("node1", duration=120, renew=60.0), cluster("node2", duration=120, renew=60.0)
    all_see([a, b], {"node1", "node2"})
    one, two = frozenset({"10.0.100.10"}), frozenset({"10.0.100.10", "10.0.100.11"})
    a.publish(one)
    wait_for(lambda: a.eligible("node1") == one, 30, "node1's eligibility written")
    calls = []
    a.subscribe(lambda: calls.append(a.eligible("node1")))
    srv.down()
    a.publish(two)  # the write cannot land
    holds_until(time.time() + 0.6, lambda: a.eligible("node1") == one, "the unwritten eligibility not counted")
    srv.up()
    wait_for(lambda: a.eligible("node1") == two, 30, "node1's new eligibility written")
    assert json.loads(lease(srv, "node1")["metadata"]["annotations"][ELIGIBLE_ANNOTATION]) == sorted(two)
    wait_for(lambda: two in calls, 5, "subscribers told when it landed")


def test_a_killed_node_expires_after_the_lease_duration(srv, cluster):
    a, b, c = cluster("node1", duration=2, renew=0.3), cluster("node2", duration=2, renew=0.3), cluster("node3", duration=2, renew=0.3)
    all_see([a, b, c], {"node1", "node2", "node3"})
    a.kill()  # no release: the Lease stays, held by node1, and runs out
    runs_out = lease_runs_out(srv, "node1")
    # no later than the duration after the last renewal each peer saw
    for m in (b, c):
        assert (m.health().details["peers"]["node1"]["expiresInSeconds"] or 0) <= 2.0
    holds_until(runs_out, lambda: "node1" in b.live_nodes() and "node1" in c.live_nodes(), "node1 live until its Lease runs out")
    wait_for(lambda: b.live_nodes() == c.live_nodes() == {"node2", "node3"}, 30, "node1 to expire")
    assert time.time() >= runs_out, "expired before its Lease ran out"
    assert lease(srv, "node1")["spec"]["holderIdentity"] == "node1"
    assert b.health().counters["peer_expiries"] == 1


def test_a_stopping_node_releases_its_lease_and_peers_take_over_at_once(srv, cluster):
    a, b = cluster("node1", duration=10, renew=0.5), cluster("node2", duration=10, renew=0.5)
    all_see([a, b], {"node1", "node2"})
    a.stop()
    # the release, not the expiry: the Lease would hold node1 for the wait's whole timeout
    # (peer_expiries below stays 0 too)
    wait_for(lambda: b.live_nodes() == {"node2"}, 8, "node1 to leave")
    spec = lease(srv, "node1")["spec"]
    assert not spec.get("holderIdentity") and spec["leaseDurationSeconds"] == 1
    assert b.health().counters["peer_expiries"] == 0
    # it comes back: the released Lease is taken again, a transition
    a2 = cluster("node1", duration=10, renew=0.5)
    all_see([a2, b], {"node1", "node2"})
    assert lease(srv, "node1")["spec"]["leaseTransitions"] == 1
    assert a2.health().counters["transitions"] == 1


def test_api_outage_keeps_serving_while_the_own_lease_is_valid_then_stops_and_recovers(srv, cluster):
    a, b = cluster("node1", duration=2, renew=0.3), cluster("node2", duration=2, renew=0.3)
    all_see([a, b], {"node1", "node2"})
    srv.down()
    # still valid (renewed within 0.3 s of a 2 s Lease): each keeps its part, and makes no claim
    # from the other's silence
    holds_until(time.time() + 0.8, lambda: a.live_nodes() == b.live_nodes() == {"node1", "node2"}, "both keep serving")
    for m in (a, b):  # and no longer than their own Lease lasts
        assert m.health().details["validForSeconds"] <= 2.0
    h = wait_for(lambda: unhealthy(a), 10, "node1 to notice")
    assert "cannot renew" in h.message and h.counters["renew_failures"] >= 1, h
    assert "still serving" in h.message or h.details["validForSeconds"] == 0, h
    # run out: no part at all, so nothing is announced
    wait_for(lambda: a.live_nodes() == frozenset() and b.live_nodes() == frozenset(), 30, "both to drop out")
    assert "not announcing" in a.health().message
    srv.up()
    all_see([a, b], {"node1", "node2"}, timeout=10)
    wait_for(lambda: a.health().healthy and b.health().healthy, 5, "healthy again")


def test_the_health_message_follows_the_own_lease_running_out_between_renewals(srv, cluster):
    """The message says whether the node serves at the moment health() is asked, as
    live_nodes() does: a Lease that ran out since the last failed renewal is "not announcing",
    not the "still serving" of that failure (CI read the stale text once both had dropped out)."""
    # no renewal attempt of its own during the test; a Lease that cannot run out by itself
    # before the test says so (it sets the end by hand below)
    a = cluster("node1", duration=60, renew=60)
    all_see([a], {"node1"})
    a._renew_failed(ConnectionRefusedError(111, "Connection refused"))
    assert "still serving" in a.health().message and "node1" in a.live_nodes()
    with a._lock:
        a._valid_until = time.monotonic() - 0.01  # ran out, and no renewal failed since
    assert a.live_nodes() == frozenset()
    h = a.health()
    assert "not announcing" in h.message and "still serving" not in h.message, h


def test_a_node_cut_off_from_the_api_server_lets_go_before_the_others_take_over(srv, cluster):
    with TcpRelay(srv.port) as relay:
        port = relay.listen()
        a = cluster("node1", duration=2, renew=0.3)
        b = cluster("node2", duration=2, renew=0.3, port=port)
        c = cluster("node3", duration=2, renew=0.3)
        everyone = {"node1", "node2", "node3"}
        all_see([a, b, c], everyone)
        relay.cut()  # node2 alone loses the API server
        holds_until(time.time() + 0.8, lambda: b.live_nodes() == everyone, "node2 keeps its part while its Lease lasts")
        h = wait_for(lambda: unhealthy(b), 10, "node2 to notice")
        assert "still serving" in h.message or h.details["validForSeconds"] == 0, h
        assert a.health().healthy
        # node1 and node3 see it expire; by then node2 has stopped counting itself
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if "node2" not in a.live_nodes():
                assert b.live_nodes() == frozenset(), "node2 still took part after its peers saw it expire"
                break
            time.sleep(0.01)
        else:
            raise AssertionError("node1 never saw node2 expire")
        wait_for(lambda: c.live_nodes() == {"node1", "node3"}, 10, "node3 to see node2 expire")
        relay.listen(port)  # back
        all_see([a, b, c], everyone, timeout=10)


def test_a_broken_watch_freezes_the_view_of_others_until_fresh_leases_arrive(srv, cluster):
    a, b = cluster("node1", duration=2, renew=0.3), cluster("node2", duration=2, renew=0.3)
    all_see([a, b], {"node1", "node2"})
    a.failed("Lease", "test: watch broken")  # as its informer reports a failing watch
    b.kill()
    # past the moment node2's Lease ran out: its own Lease is renewed, so node1 takes part, but
    # claims nothing from node2's silence
    runs_out = lease_runs_out(srv, "node2")
    wait_for(lambda: time.time() > runs_out + 0.5, 10, "node2's Lease to run out")
    assert a.live_nodes() == {"node1", "node2"}
    assert "watching Leases: test: watch broken" in a.health().message
    t0 = time.monotonic()
    a.recovered("Lease")
    assert a.live_nodes() == {"node1", "node2"}, "thawed before the missed events could land"
    wait_for(lambda: a.live_nodes() == {"node1"}, 10, "node2 to expire once the watch is back")
    assert time.monotonic() - t0 >= 0.9, "thawed before THAW"
    assert a.health().healthy


def test_a_dead_nodes_old_lease_does_not_count_on_first_sight(srv, cluster):
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=60)
    fresh = datetime.datetime.now(datetime.timezone.utc)
    for node, t in (("ghost", old), ("fresh", fresh)):
        srv.create(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": PREFIX + node, "namespace": NS, "labels": LABELS, "annotations": {ELIGIBLE_ANNOTATION: '["10.0.100.10"]'}},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 2, "renewTime": t.isoformat(), "acquireTime": t.isoformat()},
            }
        )
    a = cluster("node1", duration=2, renew=0.3)
    wait_for(lambda: "node1" in a.live_nodes(), 5, "node1 live")
    live = a.live_nodes()
    assert "ghost" not in live and "fresh" in live, live
    assert a.eligible("fresh") == {"10.0.100.10"}
    # nobody renews "fresh": it runs out on time
    wait_for(lambda: a.live_nodes() == {"node1"}, 10, "fresh to expire")


def test_renewals_count_whatever_the_holders_clock_says(srv, cluster):
    """A holder with a clock an hour behind still counts while it renews: renewals are timed
    when seen, not by their renewTime."""
    a = cluster("node1", duration=2, renew=0.3)
    wait_for(lambda: "node1" in a.live_nodes(), 5, "node1 live")
    skewed = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    obj = srv.create(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": PREFIX + "late", "namespace": NS, "labels": LABELS},
            "spec": {"holderIdentity": "late", "leaseDurationSeconds": 2, "renewTime": skewed.isoformat()},
        }
    )
    deadline = time.monotonic() + 3.0
    seen = False
    while time.monotonic() < deadline:
        skewed += datetime.timedelta(seconds=0.3)
        obj["spec"]["renewTime"] = skewed.isoformat()
        obj = srv.update(obj)
        time.sleep(0.3)
        seen = seen or "late" in a.live_nodes()
        if seen:
            assert "late" in a.live_nodes(), "a renewing holder dropped out"
    assert seen
    wait_for(lambda: "late" not in a.live_nodes(), 10, "late to expire once it stops renewing")


def test_server_clock_follows_the_date_header():
    c = ServerClock()
    assert abs(c.now() - time.time()) < 0.1
    t = time.time()
    ahead = datetime.datetime.fromtimestamp(t + 3600, datetime.timezone.utc)
    c.sample({"Date": ahead.strftime("%a, %d %b %Y %H:%M:%S GMT")}, t, t)
    assert 3599 < c.offset < 3601


def test_eligible_annotation_decoding():
    assert decode_eligible(None) is None
    assert decode_eligible("null") is None
    assert decode_eligible("garbage") is None
    assert decode_eligible('["10.0.0.1"]') == {"10.0.0.1"}
    assert decode_eligible("[]") == frozenset()


def test_no_api_server_is_a_configure_error_naming_the_key():
    ctx = context(None, "node1")
    section = ctx.config.plugin_sections["announce_arp"]
    with pytest.raises(ValueError, match=r"plugins\.announce_arp\.membership: kubernetes needs an API server: .*apiServer"):
        AnnounceARP().kpr_configure(config=section, context=ctx)


def test_plugin_builds_the_lease_membership_from_the_core_client(srv):
    ctx = context(srv, "node1", "membership: kubernetes, leaseDuration: 4, renewInterval: 0.5, leasePrefix: arp-, leaseNamespace: kpr-system")
    plugin = AnnounceARP()
    plugin.kpr_configure(config=ctx.config.plugin_sections["announce_arp"], context=ctx)
    m = plugin._membership(plugin.cfg, ctx)
    try:
        assert isinstance(m, KubernetesMembership)
        assert (m.namespace, m.lease_name, m.duration, m.interval) == ("kpr-system", "arp-node1", 4, 0.5)
        assert m.api.api_client is ctx.kube_client()
        m.start()
        wait_for(lambda: srv.get("Lease", "kpr-system", "arp-node1"), 5, "the Lease")
    finally:
        m.stop()
        ctx.kube.close()
