"""What tells a program's cached next hops they may be wrong: every route and ip rule change, and
every neighbour whose link-layer address changes or that fails or goes away. A NextHopWatcher calls
each subscriber's `invalidate` (which bumps a generation the programs compare their entries with,
so each cached next hop is looked up again on its next packet) on such an event, once when it
subscribes, and every REFRESH_SECONDS without a bump, should an event be lost (a full socket
buffer): that bounds a stale next hop's life without a clock read per packet in the programs.

One watcher per network namespace serves every cache there (`subscribe`): the NodePort
programs' per-backend next hops (kpr.nodeport, kpr_np_nh) and host_routing's per-destination
ones (kpr_hr_out) are told by the same socket and thread, the first subscriber starts it, the
last one's close() stops it. Plugins ask for it as the core facility "nexthops"
(NextHopsFacility: it holds the agent namespace's watcher from before the first plugin starts
until after the last one stopped). A kpr.netlinkwatch event socket bound to the route, rule and
neighbour groups, in the namespace of the thread that starts it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from kpr import hookimpl

from kpr.netlinkwatch import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_NEIGH, Closed, EventSocket, stop_watch

log = logging.getLogger(__name__)

RTM_NEWLINK = 16
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
RTM_NEWRULE, RTM_DELRULE = 32, 33
# ip rules decide which table a FIB lookup (bpf_fib_lookup too) reads: RTNLGRP_IPV4_RULE (8)
# and RTNLGRP_IPV6_RULE (19) as bind() group bits
RTMGRP_IPV4_RULE, RTMGRP_IPV6_RULE = 1 << 7, 1 << 18
NUD_INCOMPLETE, NUD_FAILED = 0x01, 0x20
GROUPS = RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE
STOP_SECONDS = 2.0
REOPEN_PAUSE = 0.2  # before a new socket after one failed
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


class Subscription:
    """One cache told by a shared watcher: its `invalidate`, how often it ran and failed."""

    def __init__(self, watcher: "NextHopWatcher", invalidate: Callable[[], None], name: str) -> None:
        self.watcher = watcher
        self.invalidate = invalidate
        self.name = name
        self.invalidations = 0
        self.errors = 0
        self._closed = False
        # held while `invalidate` runs: close() waits for a call under way (re-entrant: a close
        # from inside the callback does not wait for itself)
        self._calling = threading.RLock()

    def close(self) -> None:
        """No more calls once this returns (a call under way is waited for: its owner may undo
        what it writes, e.g. disarm a cache, right after); the watcher stops with its last
        subscription (shared ones: see `subscribe`)."""
        with self._calling:
            if self._closed:
                return
            self._closed = True
        self.watcher.unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NextHopWatcher:
    """Calls every subscriber's `invalidate()` when it subscribes and after every event
    `NeighbourBook` says matters (or events were lost). Opens its socket in the caller's
    namespace (start() from there). `invalidate`, when given, is subscribed at construction."""

    def __init__(self, invalidate: Callable[[], None] | None = None, refresh: float | None = REFRESH_SECONDS, *,
                 name: str = "nexthops") -> None:
        self.name = name  # the thread's and the log events' name
        self.refresh = refresh  # bump after this long without one (None: only on events)
        self.book = NeighbourBook()
        self.invalidations = 0  # bumps (each tells every subscriber)
        self.errors = 0  # subscribers' invalidate() calls that raised
        self.on_idle: Callable[[NextHopWatcher], None] | None = None  # called when the last subscriber leaves
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._started = False
        self._halt = threading.Event()  # stop() was called: no new socket after a failed one
        self._stopped_itself = False  # stop() came from the thread (a callback): it closes the socket
        self._events: EventSocket | None = None
        self._thread: threading.Thread | None = None
        if invalidate is not None:
            self.subscribe(invalidate, name)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def subscribers(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._subs]

    def subscribe(self, invalidate: Callable[[], None], name: str) -> Subscription:
        """Tell `invalidate` from now on; once at once when the watcher runs already (arms the
        cache: nothing it remembered before this call is trusted), else at start()."""
        sub = Subscription(self, invalidate, name)
        with self._lock:
            self._subs.append(sub)
            started = self._started
        if started:
            self._call(sub, "subscribed")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            idle = not self._subs
        if idle and self.on_idle is not None:
            self.on_idle(self)

    def start(self) -> NextHopWatcher:
        # subscribed first: a change during the first invalidation is seen
        self._halt.clear()
        self._events = EventSocket(GROUPS, name=self.name)
        self._prime()
        with self._lock:
            self._started = True
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
        with self._lock:  # the thread swaps in a new socket under the lock (_reopen)
            self._halt.set()
            events = self._events
        if self._thread is not None and self._thread is threading.current_thread():
            # from a subscriber's callback (its close() of the last subscription): the thread
            # cannot join itself; it closes the socket as it leaves, at its next wait
            self._stopped_itself = True
            if events is not None:
                events.stop()
            return
        if stop_watch(events, self._thread, STOP_SECONDS, self.name):
            self._events, self._thread = None, None

    def _reopen(self) -> EventSocket | None:
        """A new socket after the old one failed (None: stopping). The watcher serves every cache
        of the namespace for the agent's life: a thread that ended here would leave them all
        trusted for good, and later subscribers with a watcher that never tells them."""
        while True:
            # a pause first: a socket that fails again at once must not spin the thread
            if self._halt.wait(REOPEN_PAUSE):
                return None
            try:
                new = EventSocket(GROUPS, name=self.name)
            except OSError as exc:
                log.error("event=nexthops_reopen_failed watcher=%s error=%s", self.name, exc)
                self._bump("reopen_failed")  # nothing watched meanwhile: the refresh's bound stands
                if self._halt.wait(self.refresh or STOP_SECONDS):
                    return None
                continue
            with self._lock:
                if self._halt.is_set():
                    new.close()
                    return None
                old, self._events = self._events, new
            if old is not None:
                old.close()
            self._prime()  # the neighbours as they are now: events of the gap are lost
            self._bump("reopened")
            log.warning("event=nexthops_watch_reopened watcher=%s", self.name)
            return new

    def _call(self, sub: Subscription, why: str) -> None:
        with sub._calling:
            if sub._closed:  # closed since _bump took its list
                return
            try:
                sub.invalidate()
                sub.invalidations += 1
                log.debug("event=nexthops_invalidated watcher=%s subscriber=%s why=%s", self.name, sub.name, why)
            except Exception:  # the refresh bounds the staleness meanwhile
                sub.errors += 1
                self.errors += 1
                log.exception("event=nexthops_invalidate_failed watcher=%s subscriber=%s why=%s", self.name, sub.name,
                              why)

    def _bump(self, why: str) -> None:
        with self._lock:
            subs = list(self._subs)
        self.invalidations += 1
        for sub in subs:
            self._call(sub, why)

    def _run(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        marshal = MarshalRtnl()
        ev = self._events
        assert ev is not None
        while True:
            try:
                got = ev.wait(self.refresh)
                if got == "stop":
                    if self._stopped_itself:  # nobody joins this thread to close the socket
                        ev.close()
                        self._events = None
                    return
                if got == "timeout":
                    self._bump("refresh")
                    continue
                datagrams, lost = ev.read()
            except Closed as exc:
                log.warning("event=nexthops_socket_failed watcher=%s error=%s", self.name, exc)
                new = self._reopen()
                if new is None:
                    return
                ev = new
                continue
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


# The shared watchers: network namespace (its inode) -> the watcher every cache there subscribes to.
_SHARED: dict[int, NextHopWatcher] = {}
_SHARED_LOCK = threading.Lock()


def _netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def subscribe(invalidate: Callable[[], None], name: str) -> Subscription:
    """Subscribe to the calling thread's namespace's shared watcher, started by the first
    subscriber; the last subscription's close() stops it. `invalidate` is called once now."""
    ino = _netns_ino()
    with _SHARED_LOCK:
        w = _SHARED.get(ino)
        if w is None:
            w = NextHopWatcher(refresh=REFRESH_SECONDS, name="nexthops")
            w.on_idle = lambda idle: _release(ino, idle)
            sub = w.subscribe(invalidate, name)
            try:
                w.start()
            except BaseException:
                w.on_idle = None
                raise
            _SHARED[ino] = w
            log.info("event=nexthops_watch_started netns_ino=%d", ino)
            return sub
        # under the lock: the last subscriber cannot stop this watcher meanwhile (_release)
        return w.subscribe(invalidate, name)


def shared_watcher() -> NextHopWatcher | None:
    """The calling thread's namespace's shared watcher, when one runs."""
    with _SHARED_LOCK:
        return _SHARED.get(_netns_ino())


def _release(ino: int, w: NextHopWatcher) -> None:
    with _SHARED_LOCK:
        if w.subscribers or _SHARED.get(ino) is not w:
            return  # a subscriber came back meanwhile
        del _SHARED[ino]
    w.stop()
    log.info("event=nexthops_watch_stopped netns_ino=%d", ino)


class NextHopsFacility:
    """The core facility "nexthops" (kpr.pluginmanager.FACILITIES) plugins with next-hop caches
    ask for with kpr_requires: it holds the agent namespace's shared watcher from its start
    (ahead of every plugin) to its stop (after them), so a plugin restarted in between finds it
    running, and reports its subscribers. The caches subscribe with kpr.nexthops.subscribe()."""

    def __init__(self) -> None:
        self.sub: Subscription | None = None

    @hookimpl
    def kpr_start(self, context: Any) -> None:
        # a subscriber of its own with nothing to invalidate: the watcher lives while it holds
        self.sub = subscribe(lambda: None, "facility")

    @hookimpl
    def kpr_stop(self, context: Any) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None

    @hookimpl
    def kpr_status(self) -> Any:
        from kpr.model import PluginStatus

        w = self.sub.watcher if self.sub is not None else None
        if w is None:
            return PluginStatus(healthy=False, message="not started")
        names = [n for n in w.subscribers if n != "facility"]
        return PluginStatus(healthy=w.running, message=f"next-hop watcher for {', '.join(names) or 'no cache yet'}",
                            counters={"invalidations": float(w.invalidations), "invalidate_errors": float(w.errors)})
