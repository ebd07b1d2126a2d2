"""The next-hop watcher (kpr.nexthops) in a namespace of its own: it invalidates once
at start, on a route added or removed and on a neighbour whose address changes; a neighbour
merely confirmed (the same address) leaves the cache alone; and every refresh period without
an event (a lost event's bound). A neighbour that existed before the watcher started and
whose address then changes invalidates on its first event (the watcher reads every
neighbour's address at start; otherwise that first event would look like a new neighbour)."""

from __future__ import annotations

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
