"""Which nodes are alive, and which addresses each may announce.

`Membership` is the interface the plugin uses; `HeartbeatMembership` implements it with
authenticated UDP heartbeats between the nodes of `plugins.announce_arp.members`, and
`SoloMembership` for a node that announces alone; `KubernetesMembership` (leases.py) with one
coordination.k8s.io Lease per node, behind the same interface.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kpr.bus import Backoff

from .config import Member
from .heartbeat import MAX_DATAGRAM, Codec, Heartbeat, PeerTable, Rejected

log = logging.getLogger(__name__)


@dataclass
class Health:
    healthy: bool = True
    message: str = ""
    counters: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


class Membership(Protocol):
    """Liveness and per-node eligibility as every node sees it.

    ``live_nodes`` includes this node only while it takes part (its own channel works and
    it has listened long enough to know who else is up); ``eligible`` gives the addresses a
    live node may announce, or None while that node has not finished its initial sync
    (``publish(None)``). Callbacks run on the membership's own threads, must be quick, and
    are called after any change of either.
    """

    self_name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def live_nodes(self) -> frozenset[str]: ...
    def eligible(self, node: str) -> frozenset[str] | None: ...
    def publish(self, eligible: frozenset[str] | None) -> None: ...
    def subscribe(self, callback: Callable[[], None]) -> None: ...
    def health(self) -> Health: ...


class PublishingMembership:
    """What the memberships that talk to peers share: this node's eligibility (published to
    the peers at once, by waking the sender), the peers' (`_peer_eligible`), subscribers."""

    self_name: str
    _lock: threading.Lock
    _wake: threading.Event
    _eligible: frozenset[str] | None
    _callbacks: list[Callable[[], None]]

    def _peer_eligible(self, node: str) -> frozenset[str] | None:
        raise NotImplementedError

    def _own_eligible(self) -> frozenset[str] | None:
        """This node's eligibility as `eligible(self_name)` gives it (under the lock): the
        one published."""
        return self._eligible

    def eligible(self, node: str) -> frozenset[str] | None:
        with self._lock:
            if node == self.self_name:
                return self._own_eligible()
            return self._peer_eligible(node)

    def publish(self, eligible: frozenset[str] | None) -> None:
        with self._lock:
            if eligible == self._eligible:
                return
            self._eligible = eligible
        # Sent at once: peers act on eligibility changes within one round trip.
        self._wake.set()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _fire(self) -> None:
        for cb in self._callbacks:
            try:
                cb()
            except Exception:
                log.exception("event=membership_callback_failed")


class SoloMembership:
    """No peers: this node is always the only live one."""

    def __init__(self, self_name: str):
        self.self_name = self_name
        self._eligible: frozenset[str] | None = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def live_nodes(self) -> frozenset[str]:
        return frozenset({self.self_name})

    def eligible(self, node: str) -> frozenset[str] | None:
        return self._eligible if node == self.self_name else None

    def publish(self, eligible: frozenset[str] | None) -> None:
        self._eligible = eligible

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass

    def health(self) -> Health:
        return Health(True, "standalone (no members configured)", {"live_nodes": 1})


class HeartbeatMembership(PublishingMembership):
    """UDP heartbeats to every member, from and to each member's address on one port.

    One thread sends (every heartbeatInterval, and at once when eligibility changes) and
    expires silent peers; another receives. The socket is (re)opened with backoff when it
    cannot be bound or fails; while it is down this node does not count itself live, so it
    announces nothing while its peers, no longer hearing it, take over.
    """

    def __init__(
        self,
        self_name: str,
        members: list[Member],
        port: int,
        codec: Codec,
        *,
        heartbeat_interval: float,
        dead_interval: float,
        max_skew: float,
        backoff: Backoff | None = None,
    ):
        self.self_name = self_name
        by_name = {m.name: m for m in members}
        if self_name not in by_name:
            raise ValueError(f"node {self_name!r} is not in members")
        self.address = by_name[self_name].address
        self.port = port
        self.codec = codec
        self.interval = heartbeat_interval
        self.dead_interval = dead_interval
        self.table = PeerTable(self_name, members, dead_interval, max_skew)
        self.peers = [m for m in members if m.name != self_name]
        self.family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self._backoff = backoff or Backoff(0.2, 10.0)
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._sock: socket.socket | None = None
        self._up_since: float | None = None
        self._error = ""
        self._last_live: frozenset[str] = frozenset()
        self._eligible: frozenset[str] | None = None
        self.incarnation = time.time_ns()
        self._seq = 0
        self.counters: dict[str, int] = {"sent": 0, "send_errors": 0, "received": 0, "socket_errors": 0}
        self._rejected: dict[str, int] = {}
        self._last_reject: dict[str, float] = {}
        self._last_reject_log: dict[str, float] = {}
        self._threads: list[threading.Thread] = []

    # --- interface -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._send_loop, name="kpr-arp-hb-send", daemon=True),
            threading.Thread(target=self._recv_loop, name="kpr-arp-hb-recv", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        # A last heartbeat marked leaving lets peers take over at once instead of after
        # deadInterval (SIGTERM, not SIGKILL).
        with self._lock:
            sock = self._sock
        if sock is not None:
            for _ in range(2):
                self._send_all(sock, leaving=True)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=2)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def live_nodes(self) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            if not self._participating(now):
                return frozenset()
            return self.table.live(now) | {self.self_name}

    def _peer_eligible(self, node: str) -> frozenset[str] | None:
        peer = self.table.peers.get(node)
        return peer.eligible if peer is not None else None

    def health(self) -> Health:
        now = time.monotonic()
        with self._lock:
            live = sorted(self.table.live(now))
            counters = {**self.counters, **{f"rejected_{k}": v for k, v in self._rejected.items()}}
            counters["live_nodes"] = len(live) + (1 if self._participating(now) else 0)
            details = {
                "self": f"{self.self_name}={self.address}:{self.port}",
                "livePeers": live,
                "participating": self._participating(now),
                "peers": {
                    n: {
                        "lastHeardSecondsAgo": round(now - p.last_heard, 3) if p.last_heard > float("-inf") else None,
                        "eligible": None if p.eligible is None else sorted(p.eligible),
                    }
                    for n, p in self.table.peers.items()
                },
            }
            if self._error:
                return Health(False, f"heartbeat: {self._error}", counters, details)
            mismatch = self._rejected.get("config_mismatch", 0)
            if mismatch and now - self._last_reject.get("config_mismatch", float("-inf")) < 10 * self.dead_interval:
                return Health(False, "heartbeat: a member signs with the same key but another members list or port", counters, details)
            return Health(True, f"{len(live) + 1} of {len(self.peers) + 1} members live", counters, details)

    # --- internals -----------------------------------------------------------------------

    def _participating(self, now: float) -> bool:
        # Until it has heard every peer, or listened for deadInterval, a node that just
        # (re)opened its socket cannot tell who is up and would claim every address.
        if self._sock is None or self._up_since is None:
            return False
        return now - self._up_since >= self.dead_interval or self.table.heard_all_since(self._up_since)

    def _notify_if_changed(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            live = (self.table.live(now) | {self.self_name}) if self._participating(now) else frozenset()
            changed = live != self._last_live
            gone, came = self._last_live - live, live - self._last_live
            self._last_live = live
        if changed:
            log.info("event=membership_changed live=%s joined=%s left=%s", ",".join(sorted(live)) or "-", ",".join(sorted(came)) or "-", ",".join(sorted(gone)) or "-")
        if changed or force:
            self._fire()

    def _open(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bound to our member address so peers see the source they expect.
            sock.bind((self.address, self.port))
            sock.settimeout(0.2)
        except OSError:
            sock.close()
            raise
        return sock

    def _send_loop(self) -> None:
        attempt = 0
        next_send = 0.0
        while not self._stop.is_set():
            with self._lock:
                sock = self._sock
            if sock is None:
                try:
                    sock = self._open()
                except OSError as e:
                    attempt += 1
                    delay = self._backoff.delay(attempt)
                    self._set_error(f"cannot bind {self.address}:{self.port}: {e}; retrying in {delay:.1f}s")
                    self._stop.wait(delay)
                    continue
                attempt = 0
                with self._lock:
                    self._sock, self._up_since, self._error = sock, time.monotonic(), ""
                log.info("event=heartbeat_socket_open address=%s port=%d", self.address, self.port)
            now = time.monotonic()
            if self._wake.is_set() or now >= next_send:
                self._wake.clear()
                self._send_all(sock)
                next_send = now + self.interval
            self._notify_if_changed()
            with self._lock:
                expiry = self.table.next_expiry(now)
                up_since = self._up_since
            deadline = next_send
            if expiry is not None:
                deadline = min(deadline, expiry + 0.001)
            if up_since is not None and now - up_since < self.dead_interval:
                deadline = min(deadline, up_since + self.dead_interval + 0.001)
            self._wake.wait(max(0.0, deadline - time.monotonic()))

    def _send_all(self, sock: socket.socket, leaving: bool = False) -> None:
        with self._lock:
            self._seq += 1
            hb = Heartbeat(self.self_name, self.incarnation, self._seq, time.time(), self._eligible, leaving)
        data = self.codec.encode(hb)
        if len(data) > MAX_DATAGRAM:
            self._set_error(f"heartbeat of {len(data)} bytes exceeds one datagram ({len(hb.eligible or ())} addresses)")
            return
        for peer in self.peers:
            try:
                sock.sendto(data, (peer.address, self.port))
                self.counters["sent"] += 1
            except OSError as e:
                # One unreachable peer is normal (it may be down); the others still get theirs.
                self.counters["send_errors"] += 1
                log.debug("event=heartbeat_send_failed peer=%s error=%s", peer.name, e)

    def _recv_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                sock = self._sock
            if sock is None:
                self._stop.wait(0.05)
                continue
            try:
                data, src = sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                self.counters["socket_errors"] += 1
                self._set_error(f"receive failed: {e}; reopening")
                with self._lock:
                    if self._sock is sock:
                        self._sock, self._up_since = None, None
                sock.close()
                self._wake.set()
                self._notify_if_changed()
                continue
            self._handle(data, src[0])

    def _handle(self, data: bytes, source: str) -> None:
        source = source.split("%", 1)[0]
        try:
            hb = self.codec.decode(data)
            with self._lock:
                changed = self.table.accept(hb, source, time.monotonic(), time.time())
        except Rejected as r:
            self._reject(r, source)
            return
        self.counters["received"] += 1
        if hb.leaving:
            log.info("event=member_leaving node=%s", hb.node)
        if changed:
            # force: a live peer's eligibility may have changed without any liveness change.
            self._notify_if_changed(force=True)

    def _reject(self, r: Rejected, source: str) -> None:
        with self._lock:
            self._rejected[r.reason] = self._rejected.get(r.reason, 0) + 1
            now = time.monotonic()
            self._last_reject[r.reason] = now
            quiet = now - self._last_reject_log.get(r.reason, float("-inf")) < 10.0
            if not quiet:
                self._last_reject_log[r.reason] = now
        if not quiet:
            log.warning("event=heartbeat_rejected reason=%s source=%s detail=%s", r.reason, source, r.detail)

    def _set_error(self, message: str) -> None:
        with self._lock:
            changed = message != self._error
            self._error = message
        if changed and message:
            log.error("event=heartbeat_unhealthy reason=%s", message)
