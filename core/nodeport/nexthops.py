"""The next hops the NodePort programs cache per backend (kpr_np_nh, lib/nodeport.h), and what
tells them a cached one may be wrong: every route change, and every neighbour whose link-layer
address changes or that fails or goes away, bumps the cache's generation (key 0), so the next
packet of each backend looks its route up again. So does every REFRESH_SECONDS without a
bump, should an event be lost (a full socket buffer): that bounds a stale next hop's life
without a clock read per packet in the programs.

A plain NETLINK_ROUTE socket bound to the route and neighbour groups, waited on together with a
stop pipe (as kpr.netdevs does for links), in the agent's namespace.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x4, 0x40, 0x400
RTM_NEWLINK = 16
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
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
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
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


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class NextHopWatcher:
    """Calls `invalidate()` once at start and after every event `NeighbourBook` says matters
    (or events were lost). Opens its socket in the caller's namespace (start() from there)."""

    def __init__(self, invalidate: Callable[[], None], refresh: float | None = REFRESH_SECONDS) -> None:
        self.invalidate = invalidate
        self.refresh = refresh  # bump after this long without one (None: only on events)
        self.book = NeighbourBook()
        self.invalidations = 0
        self.errors = 0
        self._sock: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> NextHopWatcher:
        self._sock = _socket()  # subscribed first: a change during the first invalidation is seen
        self._wake_r, self._wake_w = os.pipe()
        self._bump("start")
        self._thread = threading.Thread(target=self._run, name="kpr-nodeport-nexthops", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        t = self._thread
        if t is not None:
            t.join(STOP_SECONDS)
            if t.is_alive():
                log.warning("event=nexthops_stop_timeout seconds=%.1f", STOP_SECONDS)
                return
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _bump(self, why: str) -> None:
        try:
            self.invalidate()
            self.invalidations += 1
            log.debug("event=nexthops_invalidated why=%s", why)
        except Exception:  # the TTL in the programs bounds the staleness meanwhile
            self.errors += 1
            log.exception("event=nexthops_invalidate_failed why=%s", why)

    def _run(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        marshal = MarshalRtnl()
        assert self._sock is not None
        fds = [self._sock.fileno(), self._wake_r]
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select(fds, [], [], self.refresh)
            except OSError as exc:
                log.warning("event=nexthops_select_failed error=%s", exc)
                return
            if self._stopping.is_set() or self._wake_r in ready:
                return
            if not ready:
                self._bump("refresh")
                continue
            why = None
            while True:
                try:
                    data = self._sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        why = "events_lost"
                        continue
                    log.warning("event=nexthops_recv_failed error=%s", exc)
                    return
                if not data:
                    return
                try:
                    # every message goes through the book (it keeps the neighbours' addresses)
                    if [m for m in marshal.parse(data) if self.book.changes(m)]:
                        why = why or "route_or_neighbour"
                except Exception as exc:  # an unparsable message: assume it mattered
                    log.debug("event=nexthops_parse_failed error=%r", exc)
                    why = why or "unparsed"
            if why:
                self._bump(why)
