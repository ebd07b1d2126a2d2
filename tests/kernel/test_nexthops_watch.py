"""The next-hop watcher (kpr.nexthops) in a namespace of its own: it invalidates once
at start, on a route added or removed and on a neighbour whose address changes; a neighbour
merely confirmed (the same address) leaves the cache alone; and every refresh period without
an event (a lost event's bound). A neighbour that existed before the watcher started and
whose address then changes invalidates on its first event (the watcher reads every
neighbour's address at start; otherwise that first event would look like a new neighbour)."""

from __future__ import annotations

import threading
import time

import pytest

from kpr.nexthops import NextHopWatcher
from kpr.testing.netns import Namespace, Topology
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel


@pytest.fixture
def ns(topology: Topology) -> Namespace:
    topology.add_namespace("a")
    topology.add_namespace("b")
    topology.link("a", "b", "10.9.0.1/24", "10.9.0.2/24")
    return topology["a"]


def test_route_and_neighbour_changes_invalidate(ns: Namespace) -> None:
    seen: list[float] = []
    with ns.enter():
        w = NextHopWatcher(lambda: seen.append(time.monotonic()), refresh=None).start()
    try:
        assert len(seen) == 1, "once at start (arms the cache)"
        ns.run("ip neigh replace 10.9.0.7 lladdr 02:00:00:00:00:07 dev eth0 nud permanent")
        time.sleep(0.3)  # a neighbour seen for the first time: nothing cached can point elsewhere
        n = len(seen)
        ns.run("ip neigh replace 10.9.0.7 lladdr 02:00:00:00:00:08 dev eth0 nud permanent")
        wait_for(lambda: len(seen) > n, 5, "an invalidation for the neighbour's new address")
        n = len(seen)
        ns.run("ip neigh replace 10.9.0.7 lladdr 02:00:00:00:00:08 dev eth0 nud permanent")
        time.sleep(0.3)
        assert len(seen) == n, "the same address again: no invalidation"
        ns.run("ip route add 10.77.0.0/16 via 10.9.0.2")
        wait_for(lambda: len(seen) > n, 5, "an invalidation for the route")
        n = len(seen)
        ns.run("ip route del 10.77.0.0/16")
        wait_for(lambda: len(seen) > n, 5, "an invalidation for the route's removal")
        assert w.running and w.errors == 0 and w.invalidations == len(seen)
    finally:
        w.stop()
    assert not w.running


def test_without_events_it_still_invalidates_every_refresh(ns: Namespace) -> None:
    seen: list[float] = []
    with ns.enter():
        w = NextHopWatcher(lambda: seen.append(time.monotonic()), refresh=0.2).start()
    try:
        wait_for(lambda: len(seen) >= 3, 5, "two refreshes after the start")
    finally:
        w.stop()


def test_a_neighbour_known_before_the_start_that_changes_invalidates(ns: Namespace) -> None:
    ns.run("ip neigh replace 10.9.0.9 lladdr 02:00:00:00:01:07 dev eth0 nud permanent")
    seen: list[float] = []
    with ns.enter():
        w = NextHopWatcher(lambda: seen.append(time.monotonic()), refresh=None, name="test-prime").start()
    try:
        assert len(seen) == 1, "once at start (arms the cache)"
        ns.run("ip neigh replace 10.9.0.9 lladdr 02:00:00:00:01:08 dev eth0 nud permanent")
        wait_for(lambda: len(seen) > 1, 5, "an invalidation for the address the neighbour had before the start")
        n = len(seen)
        ns.run("ip neigh replace 10.9.0.9 lladdr 02:00:00:00:01:08 dev eth0 nud permanent")
        time.sleep(0.3)
        assert len(seen) == n, "the same address again: no invalidation"
        assert w.errors == 0
    finally:
        w.stop()


def test_policy_rule_changes_invalidate(ns: Namespace) -> None:
    """An ip rule changes which table a FIB lookup reads (bpf_fib_lookup follows the rules), so
    remembered routes (a pod's by its source address, say) may be wrong: IPv4 and IPv6 rules."""
    seen: list[float] = []
    with ns.enter():
        w = NextHopWatcher(lambda: seen.append(time.monotonic()), refresh=None).start()
    try:
        for cmd in ("ip rule add from 10.244.1.5 table 100", "ip rule del from 10.244.1.5 table 100",
                    "ip -6 rule add from fd00:10::5 table 100", "ip -6 rule del from fd00:10::5 table 100"):
            n = len(seen)
            ns.run(cmd)
            wait_for(lambda: len(seen) > n, 5, f"an invalidation for `{cmd}`")
    finally:
        w.stop()


def test_one_shared_watcher_serves_every_subscriber_of_a_namespace(topology: Topology, ns: Namespace) -> None:
    """kpr.nexthops.subscribe: the NodePort facility's and host_routing's caches in one namespace
    are told by one watcher (one socket, one thread); each subscriber is called once as it
    subscribes (arming its cache) and on every event; the last one's close() stops the watcher;
    another namespace has its own."""
    from kpr import nexthops

    a: list[float] = []
    b: list[float] = []
    threads_before = {t.name for t in threading.enumerate()}
    with ns.enter():
        assert nexthops.shared_watcher() is None
        sa = nexthops.subscribe(lambda: a.append(time.monotonic()), "nodeport")
        sb = nexthops.subscribe(lambda: b.append(time.monotonic()), "host_routing")
        w = nexthops.shared_watcher()
    other = topology["b"]
    try:
        assert w is not None and sa.watcher is w and sb.watcher is w and w.running
        assert w.subscribers == ["nodeport", "host_routing"]
        assert len(a) == 1 and len(b) == 1, "each called once as it subscribed"
        new = [t for t in threading.enumerate() if t.name not in threads_before and t.name.startswith("kpr-nexthops")]
        assert len(new) == 1, f"one watcher thread for both: {new}"
        with other.enter():
            sc = nexthops.subscribe(lambda: None, "elsewhere")
        assert sc.watcher is not w, "another namespace: its own watcher"
        sc.close()
        assert not sc.watcher.running

        ns.run("ip route add 10.77.0.0/16 via 10.9.0.2")
        wait_for(lambda: len(a) > 1 and len(b) > 1, 5, "both subscribers told of the route")
        # A subscription counts its call once the callback has returned (a moment after it
        # appended here): wait for the counts to catch up rather than read them once.
        wait_for(lambda: sa.invalidations == len(a) and sb.invalidations == len(b), 5, "each call counted",
                 lambda: (sa.invalidations, len(a), sb.invalidations, len(b)))
        sa.close()
        n = len(a)
        m = len(b)
        ns.run("ip route del 10.77.0.0/16")
        wait_for(lambda: len(b) > m, 5, "the remaining subscriber told of the removal")
        time.sleep(0.2)
        assert len(a) == n, "a closed subscription is not called"
        assert w.running, "still serving the other subscriber"
    finally:
        sa.close()
        sb.close()
    assert not w.running, "the last subscriber's close() stops the watcher"
    with ns.enter():
        assert nexthops.shared_watcher() is None


def test_the_nexthops_facility_holds_the_shared_watcher(ns: Namespace) -> None:
    """The core facility "nexthops" (what host_routing asks for with kpr_requires) keeps the
    namespace's watcher running between its start and stop, whoever subscribes meanwhile."""
    from kpr import nexthops
    from kpr.pluginmanager import FACILITIES
    from kpr.plugins.host_routing.plugin import HostRouting

    assert "nexthops" in HostRouting().kpr_requires()
    fac = FACILITIES["nexthops"](None)
    with ns.enter():
        fac.kpr_start(context=None)
        w = nexthops.shared_watcher()
        try:
            assert w is not None and w.running
            sub = nexthops.subscribe(lambda: None, "host_routing")
            assert sub.watcher is w
            sub.close()
            assert w.running, "the facility still holds it"
            st = fac.kpr_status()
            assert st.healthy and "no cache yet" in st.message
        finally:
            fac.kpr_stop(context=None)
        assert not w.running and nexthops.shared_watcher() is None


def test_a_watcher_whose_socket_fails_opens_another_and_keeps_telling(ns: Namespace) -> None:
    """The namespace's one watcher serves every cache there for the agent's life: a socket that
    fails under it (here: closed, then the thread woken) is replaced, the subscribers are told at
    once (the gap's events are lost) and of every change after, and stop() still ends it."""
    seen: list[float] = []
    with ns.enter():
        w = NextHopWatcher(lambda: seen.append(time.monotonic()), refresh=None, name="test-reopen").start()
    try:
        old = w._events
        assert old is not None
        n = len(seen)
        old._sock.close()  # the socket fails: the next read raises
        old.kick()
        wait_for(lambda: w._events is not old and len(seen) > n, 5, "a new socket, and the subscriber told")
        assert w.running
        n = len(seen)
        ns.run("ip route add 10.78.0.0/16 via 10.9.0.2")
        wait_for(lambda: len(seen) > n, 5, "an invalidation for a route added after the new socket")
        assert w.errors == 0
    finally:
        w.stop()
    assert not w.running and w._events is None


def test_close_waits_for_a_call_under_way_and_none_starts_after(ns: Namespace) -> None:
    """A subscriber undoes what its callback writes right after close() (host_routing disarms
    kpr_hr_gen, then programs may stay attached without an agent): a call under way when close()
    is called finishes before close() returns, and none starts after it."""
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def invalidate() -> None:
        calls.append("start")
        if len(calls) > 1:  # not the call at subscription: the one an event makes
            entered.set()
            release.wait(5)
        calls.append("end")

    with ns.enter():
        w = NextHopWatcher(refresh=None, name="test-close-wait")
        sub = w.subscribe(invalidate, "slow")
        w.start()
    closed = threading.Event()
    try:
        ns.run("ip route add 10.79.0.0/16 via 10.9.0.2")
        assert entered.wait(5), "the route's invalidation under way"
        closer = threading.Thread(target=lambda: (sub.close(), closed.set()))
        closer.start()
        time.sleep(0.3)
        assert not closed.is_set(), "close() returned while the callback still ran"
        release.set()
        closer.join(5)
        assert closed.is_set() and calls[-1] == "end"
        n = len(calls)
        ns.run("ip route del 10.79.0.0/16")
        time.sleep(0.3)
        assert len(calls) == n, "called after close()"
    finally:
        release.set()
        w.stop()


def test_a_callback_closing_the_last_subscription_stops_the_shared_watcher(ns: Namespace) -> None:
    """A subscriber may close its subscription from its own callback (the watcher's thread): when
    it was the last, the watcher stops without the thread joining itself (that raised, counted as
    the callback's error, and left the socket open)."""
    from kpr import nexthops

    subs: list[nexthops.Subscription] = []
    calls: list[float] = []

    def invalidate() -> None:
        calls.append(time.monotonic())
        if len(calls) > 1:  # an event's call, on the watcher's thread
            subs[0].close()

    with ns.enter():
        subs.append(nexthops.subscribe(invalidate, "closes-itself"))
        w = nexthops.shared_watcher()
    assert w is not None and w.running
    events = w._events
    assert events is not None
    try:
        ns.run("ip route add 10.80.0.0/16 via 10.9.0.2")
        wait_for(lambda: not w.running, 5, "the watcher stopped")
        assert w.errors == 0 and subs[0].errors == 0
        assert w._events is None and events._wake_r == -1, "its socket closed"
        with ns.enter():
            assert nexthops.shared_watcher() is None
    finally:
        subs[0].close()
        w.stop()
