"""What tells a program's cached next hops they may be wrong: every route and ip rule change, and
every neighbour whose link-layer address changes or that fails or goes away. A NextHopWatcher calls
its `invalidate` (which bumps a generation the programs compare their entries with, so each
cached next hop is looked up again on its next packet) on such an event, once at start, and
every REFRESH_SECONDS without a bump, should an event be lost (a full socket buffer): that
bounds a stale next hop's life without a clock read per packet in the programs.

Shared by the NodePort programs' per-backend next hops (kpr.nodeport, kpr_np_nh) and
host_routing's per-destination ones (kpr_hr_out). A kpr.netlinkwatch event socket bound to
the route, rule and neighbour groups, in the namespace of the thread that starts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kpr.netlinkwatch import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_NEIGH, Closed, EventSocket, stop_watch

log = logging.getLogger(__name__)

RTM_NEWLINK = 16
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
RTM_NEWRULE, RTM_DELRULE = 32, 33
# ip rules decide which table a FIB lookup (bpf_fib_lookup too) reads: RTNLGRP_IPV4_RULE (8)
# and RTNLGRP_IPV6_RULE (19) as bind() group bits
RTMGRP_IPV4_RULE, RTMGRP_IPV6_RULE = 1 << 7, 1 << 18
NUD_INCOMPLETE, NUD_FAILED = 0x01, 0x20
STOP_SECONDS = 2.0
REFRESH_SECONDS = 2.0


class NeighbourBook:
    """Which neighbour events can make a cached next hop wrong (pure logic: messages parsed by
    pyroute2's marshal, or anything with the same get/get_attr)."""

    def __init__(self) -> None:
        self.lladdr: dict[tuple[int, str], str] = {}

    def changes(self, msg: Any) -> bool:
        kind = msg["header"]["type"]
        if kind in (RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE):
            return True
        if kind not in (RTM_NEWNEIGH, RTM_DELNEIGH):
            return False
        key = (msg["ifindex"], msg.get_attr("NDA_DST"))
        if kind == RTM_DELNEIGH or msg["state"] & (NUD_INCOMPLETE | NUD_FAILED):
            return self.lladdr.pop(key, None) is not None
        mac = msg.get_attr("NDA_LLADDR")
        old = self.lladdr.get(key)
        self.lladdr[key] = mac
        # a neighbour seen for the first time since the watcher started cannot be cached with
        # another address: the generation was bumped when the watcher started
        return old is not None and old != mac


class NextHopWatcher:
    """Calls `invalidate()` once at start and after every event `NeighbourBook` says matters
    (or events were lost). Opens its socket in the caller's namespace (start() from there)."""

    def __init__(self, invalidate: Callable[[], None], refresh: float | None = REFRESH_SECONDS, *,
                 name: str = "nexthops") -> None:
        self.invalidate = invalidate
        self.name = name  # the thread's and the log events' name
        self.refresh = refresh  # bump after this long without one (None: only on events)
        self.book = NeighbourBook()
        self.invalidations = 0
        self.errors = 0
        self._events: EventSocket | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> NextHopWatcher:
        # subscribed first: a change during the first invalidation is seen
        groups = RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE
        self._events = EventSocket(groups, name=self.name)
        self._prime()
        self._bump("start")
        self._thread = threading.Thread(target=self._run, name=f"kpr-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _prime(self) -> None:
        """The neighbours' addresses as they are now: a neighbour that already existed and whose
        first event after the start carries another address is then seen as the change it is
        (without this, the book would take that address as the first it ever had)."""
        from pyroute2 import IPRoute

        try:
            with IPRoute() as ipr:
                for msg in ipr.get_neighbours():
                    self.book.changes(msg)
        except Exception as exc:  # the refresh bounds what is missed
            log.warning("event=nexthops_prime_failed watcher=%s error=%r", self.name, exc)

    def stop(self) -> None:
        if stop_watch(self._events, self._thread, STOP_SECONDS, self.name):
            self._events, self._thread = None, None

    def _bump(self, why: str) -> None:
        try:
            self.invalidate()
            self.invalidations += 1
            log.debug("event=nexthops_invalidated watcher=%s why=%s", self.name, why)
        except Exception:  # the TTL in the programs bounds the staleness meanwhile
            self.errors += 1
            log.exception("event=nexthops_invalidate_failed watcher=%s why=%s", self.name, why)

    def _run(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        marshal = MarshalRtnl()
        ev = self._events
        assert ev is not None
        while True:
            try:
                got = ev.wait(self.refresh)
                if got == "stop":
                    return
                if got == "timeout":
                    self._bump("refresh")
                    continue
                datagrams, lost = ev.read()
            except Closed as exc:
                log.warning("event=nexthops_watch_ended watcher=%s error=%s", self.name, exc)
                return
            why = "events_lost" if lost else None
            for data in datagrams:
                try:
                    # every message goes through the book (it keeps the neighbours' addresses)
                    if [m for m in marshal.parse(data) if self.book.changes(m)]:
                        why = why or "route_or_neighbour"
                except Exception as exc:  # an unparsable message: assume it mattered
                    log.debug("event=nexthops_parse_failed error=%r", exc)
                    why = why or "unparsed"
            if why:
                self._bump(why)
