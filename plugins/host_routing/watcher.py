"""Runs the plugin's sync whenever links or routes change, and every `interval` seconds.

One thread, in the namespace of the thread that started it (threads inherit it), so every
netlink dump and tcx attach the sync makes acts on the agent's namespace whichever thread
asked for the change (kick()). Events only say "look again": the sync dumps everything, so a
lost or overflowed event costs nothing.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
# Legacy group bitmasks bind() takes: RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE.
RTMGRP_LINK, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400
# Quiet time that ends a burst (a pod's setup: link, addresses, routes within milliseconds).
COALESCE_SECONDS = 0.05
STOP_SECONDS = 5.0


class Watcher:
    def __init__(self, sync: Callable[[str], None], interval: float) -> None:
        self.sync = sync
        self.interval = interval
        self.runs = 0
        self.errors = 0
        self._sock: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._kicked = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watcher":
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="kpr-host-routing", daemon=True)
        self._thread.start()
        return self

    def kick(self) -> None:
        """Ask for a sync soon (from any thread)."""
        self._kicked.set()
        self._wake()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        t = self._thread
        if t is not None:
            t.join(STOP_SECONDS)
            if t.is_alive():
                log.warning("event=host_routing_watcher_stop_timeout seconds=%.1f", STOP_SECONDS)
                return
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _drain(self, fd: int) -> None:
        while True:
            try:
                if fd == self._wake_r:
                    os.read(fd, 4096)
                    return
                assert self._sock is not None
                if not self._sock.recv(1 << 16):
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: events lost; the sync catches up anyway
                    continue
                log.warning("event=host_routing_socket_error error=%s", exc)
                return

    def _run(self) -> None:
        assert self._sock is not None
        fds = [self._sock.fileno(), self._wake_r]
        while not self._stopping.is_set():
            ready, _, _ = select.select(fds, [], [], self.interval)
            if self._stopping.is_set():
                return
            why = "interval" if not ready else ("kick" if self._kicked.is_set() else "netlink")
            for fd in ready:
                self._drain(fd)
            while ready and not self._stopping.is_set():  # let the burst end
                ready, _, _ = select.select(fds, [], [], COALESCE_SECONDS)
                for fd in ready:
                    self._drain(fd)
            if self._stopping.is_set():
                return
            self._kicked.clear()
            try:
                self.sync(why)
                self.runs += 1
            except Exception:
                self.errors += 1
                log.exception("event=host_routing_sync_failed reason=%s", why)
