"""Waiting for rtnetlink events together with a stop signal: the one loop under kpr's watchers
(links: kpr.netdevs; routes and neighbours: kpr.nexthops; host_routing's sync).

A plain NETLINK_ROUTE socket bound to the multicast groups asked for, rather than pyroute2's
IPRoute.bind(): a watcher has to wait on it together with a pipe another thread writes to stop
or kick it, which pyroute2's asyncio-backed sync socket does not offer across threads.
Messages come back as raw bytes (pyroute2's marshal parses them where a watcher needs the
content); a full socket buffer (ENOBUFS, events lost) is reported, never raised, so a watcher
that dumps after events, or invalidates everything, catches up.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
# Legacy group bitmasks bind() takes.
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
# Quiet time that ends a burst of events (a pod's setup: link, addresses, routes within ms).
COALESCE_SECONDS = 0.05


class Closed(Exception):
    """The socket failed or was closed under the watcher: it stops following events."""


class EventSocket:
    """An rtnetlink event socket and a wake pipe. Open it in the namespace to watch (`netns`:
    a name under /run/netns, made there by pyroute2; None: the caller's)."""

    def __init__(self, groups: int, netns: str | None = None, *, name: str = "netlink") -> None:
        self.name = name  # for log events
        self.kicked = threading.Event()  # set by kick(): someone asked for a look now
        self._sock = _open(groups, netns)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()

    # --- any thread ----------------------------------------------------------------------

    def kick(self) -> None:
        """Wake the waiting thread with `kicked` set."""
        self.kicked.set()
        self._poke()

    def stop(self) -> None:
        """Wake the waiting thread for good: wait() answers "stop" from now on."""
        self._stopping.set()
        self._poke()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def close(self) -> None:
        """Close the socket and the pipe (after the watching thread is gone)."""
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _poke(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    # --- the watching thread -------------------------------------------------------------

    def wait(self, timeout: float | None) -> str:
        """"stop", "events" (messages or a kick waiting), or "timeout" after `timeout` seconds
        (None: no timeout). Raises Closed when the socket fails."""
        if self._stopping.is_set():
            return "stop"
        try:
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [], timeout)
        except (OSError, ValueError) as exc:
            raise Closed(f"select: {exc}") from exc
        if self._stopping.is_set():
            return "stop"
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        return "events" if ready else "timeout"

    def read(self) -> tuple[list[bytes], bool]:
        """Everything the socket holds now: (datagrams, whether events were lost). Raises
        Closed when the socket failed or was closed."""
        out: list[bytes] = []
        lost = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return out, lost
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                log.warning("event=netlink_socket_error watcher=%s error=%s", self.name, exc)
                raise Closed(str(exc)) from exc
            if not data:
                raise Closed("socket closed")
            out.append(data)

    def settle(self, quiet: float = COALESCE_SECONDS) -> tuple[list[bytes], bool]:
        """Read until no event came for `quiet` seconds (a burst ends by quiet time, not by
        its length): (datagrams, events lost). Returns early when stopping."""
        out, lost = self.read()
        while not self._stopping.is_set():
            if self.wait(quiet) != "events":
                break
            more, more_lost = self.read()
            out += more
            lost = lost or more_lost
        return out, lost


def netns_path(netns: str) -> str:
    """The namespace's path (a name under /run/netns, or a path); a clear error when it is missing."""
    path = netns if "/" in netns else f"/run/netns/{netns}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {netns!r} does not exist ({path})")
    return path


def _open(groups: int, netns: str | None) -> socket.socket:
    if netns:
        from pyroute2 import netns as pnetns

        sock: Any = pnetns.create_socket(netns_path(netns), socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
    else:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, groups))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def stop_watch(events: EventSocket | None, thread: threading.Thread | None, seconds: float, name: str) -> bool:
    """Stop a watcher's thread (bounded by `seconds`) and close its socket. False when the thread
    is still running at the deadline: its socket is then left to it rather than closed under it."""
    if events is not None:
        events.stop()
    if thread is not None:
        thread.join(seconds)
        if thread.is_alive():
            log.warning("event=netlink_watch_stop_timeout watcher=%s seconds=%.1f", name, seconds)
            return False
    if events is not None:
        events.close()
    return True
