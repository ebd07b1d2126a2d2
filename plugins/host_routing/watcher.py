"""Runs the plugin's sync whenever links or routes change, and every `interval` seconds.

One thread, in the namespace of the thread that started it (threads inherit it), so every
netlink dump and tcx attach the sync makes acts on the agent's namespace whichever thread
asked for the change (kick()). Events only say "look again": the sync dumps everything, so a
lost or overflowed event costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kpr.netlinkwatch import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, Closed, EventSocket, stop_watch

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0


class Watcher:
    def __init__(self, sync: Callable[[str], None], interval: float) -> None:
        self.sync = sync
        self.interval = interval
        self.runs = 0
        self.errors = 0
        self._events: EventSocket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "Watcher":
        self._events = EventSocket(RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE, name="host_routing")
        self._thread = threading.Thread(target=self._run, name="kpr-host-routing", daemon=True)
        self._thread.start()
        return self

    def kick(self) -> None:
        """Ask for a sync soon (from any thread)."""
        if self._events is not None:
            self._events.kick()

    def stop(self) -> None:
        if stop_watch(self._events, self._thread, STOP_SECONDS, "host_routing"):
            self._events, self._thread = None, None

    def _run(self) -> None:
        ev = self._events
        assert ev is not None
        while True:
            try:
                got = ev.wait(self.interval)
                if got == "stop":
                    return
                why = "interval" if got == "timeout" else ("kick" if ev.kicked.is_set() else "netlink")
                if got == "events":
                    ev.settle()  # let the burst end
            except Closed:
                return
            if ev.stopping:
                return
            ev.kicked.clear()
            try:
                self.sync(why)
                self.runs += 1
            except Exception:
                self.errors += 1
                log.exception("event=host_routing_sync_failed reason=%s", why)
