"""The agent's side of the bridge: a unix socket ExaBGP's helper connects to.

The speaker keeps the desired routes and what it has told the current ExaBGP, sends the
difference as process-API commands, matches ExaBGP's in-order acknowledgements to them, and
follows each peer's session state from ExaBGP's JSON neighbor events.

Each ExaBGP start gets a fresh token (the supervisor's on_spawn calls `expect`): a bridge
presenting it gets every desired route; a bridge of an earlier run is turned away. Nothing
is sent before `set_synced` (the agent's kpr_sync_complete), and End-of-RIB goes to a peer
only after the routes, so a router holding our routes across a restart (graceful restart)
keeps them until they are refreshed.

No lock is held while writing to the socket: a writer thread per connection sends, so a
slow ExaBGP never blocks the thread reading its acknowledgements.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import exabgp as X
from .routes import Attrs, RouteKey

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0


@dataclass
class PeerState:
    address: str
    families: tuple[str, ...]
    state: str = "idle"  # idle | connected | up | down
    since: float = field(default_factory=time.time)
    reason: str = ""
    sessions: int = 0  # times the session came up
    eor_sent: bool = False


@dataclass
class _Pending:
    kind: str  # announce | withdraw | eor
    key: Any  # RouteKey, or the peer address for eor
    attrs: Attrs | None = None


class _Conn:
    def __init__(self, sock: socket.socket, token: str, pid: int) -> None:
        self.sock = sock
        self.token = token
        self.pid = pid
        self.out: queue.Queue[bytes | None] = queue.Queue()
        self.alive = True
        self.writer = threading.Thread(target=self._write, name="kpr-bgp-bridge-writer", daemon=True)
        self.writer.start()

    def send(self, line: str) -> None:
        self.out.put((line + "\n").encode())

    def _write(self) -> None:
        while True:
            item = self.out.get()
            if item is None:
                return
            chunks = [item]
            # Batch what is queued: a full resync is thousands of lines.
            while len(chunks) < 512:
                try:
                    nxt = self.out.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._sendall(chunks)
                    return
                chunks.append(nxt)
            if not self._sendall(chunks):
                return

    def _sendall(self, chunks: list[bytes]) -> bool:
        try:
            self.sock.sendall(b"".join(chunks))
            return True
        except OSError as e:
            log.warning("bridge.send_failed pid=%d error=%s", self.pid, e)
            self.close()
            return False

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.out.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class Speaker:
    def __init__(self, socket_path: Path, peers: Iterable[tuple[str, Iterable[str]]]) -> None:
        self.socket_path = Path(socket_path)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.peers: dict[str, PeerState] = {a: PeerState(a, tuple(f)) for a, f in peers}
        self.desired: dict[RouteKey, Attrs] = {}
        self.synced = False
        self._token: str | None = None
        self._conn: _Conn | None = None
        # What the current ExaBGP run was told (announced and not withdrawn since).
        self._told: dict[RouteKey, Attrs] = {}
        # Announcements ExaBGP acknowledged with "done".
        self.acked: dict[RouteKey, Attrs] = {}
        # Announcements ExaBGP answered with "error"; not retried until they change.
        self.failed: dict[RouteKey, Attrs] = {}
        self._pending: collections.deque[_Pending] = collections.deque()
        self.counters = collections.Counter()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self.generation = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        s.listen(4)
        s.settimeout(0.25)
        self._listener = s
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kpr-bgp-accept", daemon=True)
        self._accept_thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def expect(self, token: str) -> None:
        """A new ExaBGP run is starting: forget what the previous one was told."""
        with self._lock:
            self._token = token
            self.generation += 1
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._told.clear()
            self.acked.clear()
            self.failed.clear()
            self._pending.clear()
            now = time.time()
            for p in self.peers.values():
                if p.state != "idle":
                    p.state, p.since, p.reason = "idle", now, "exabgp restarted"
                p.eor_sent = False
            self._changed.notify_all()

    def exabgp_exited(self, rc: int) -> None:
        with self._lock:
            now = time.time()
            for p in self.peers.values():
                p.state, p.since, p.reason, p.eor_sent = "down", now, f"exabgp exited ({rc})", False
            self._changed.notify_all()

    # --- desired state -------------------------------------------------------------------

    def update(self, changes: Mapping[RouteKey, Attrs | None]) -> None:
        """Apply changed routes (None: no longer wanted) and send what differs."""
        with self._lock:
            for rk, attrs in changes.items():
                if attrs is None:
                    self.desired.pop(rk, None)
                else:
                    self.desired[rk] = attrs
            self._reconcile()

    def replace(self, routes: Mapping[RouteKey, Attrs]) -> None:
        with self._lock:
            self.desired = dict(routes)
            self._reconcile()

    def set_synced(self) -> None:
        with self._lock:
            self.synced = True
            self._reconcile()
            for p in self.peers.values():
                if p.state == "up":
                    self._send_eor(p)

    # --- sending -------------------------------------------------------------------------

    def _reconcile(self) -> None:
        conn = self._conn
        if not self.synced or conn is None or not conn.alive:
            return
        for rk in [rk for rk in self._told if rk not in self.desired]:
            self._send(conn, X.withdraw_command(*rk), _Pending("withdraw", rk))
            del self._told[rk]
            self.failed.pop(rk, None)
            self.counters["withdraws"] += 1
        for rk, attrs in self.desired.items():
            if self._told.get(rk) == attrs:
                continue
            self._send(conn, X.announce_command(rk[0], rk[1], attrs), _Pending("announce", rk, attrs))
            self._told[rk] = attrs
            self.failed.pop(rk, None)
            self.counters["announces"] += 1
        self._changed.notify_all()

    def _send(self, conn: _Conn, line: str, pending: _Pending) -> None:
        self._pending.append(pending)
        log.debug("bridge.command line=%s", line)
        conn.send(line)

    def _send_eor(self, peer: PeerState) -> None:
        conn = self._conn
        if conn is None or not conn.alive or peer.eor_sent:
            return
        for line in X.eor_commands(peer.address, peer.families):
            self._send(conn, line, _Pending("eor", peer.address))
        peer.eor_sent = True
        log.info("bgp.eor_sent peer=%s families=%s", peer.address, ",".join(peer.families))

    # --- the bridge connection -----------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve, args=(sock,), name="kpr-bgp-bridge-reader", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(HELLO_TIMEOUT)
        reader = sock.makefile("rb")
        try:
            first = reader.readline()
            hello = json.loads(first)["hello"]
            token, pid = str(hello["token"]), int(hello.get("pid", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("bridge.bad_hello error=%r", e)
            sock.close()
            return
        sock.settimeout(None)
        with self._lock:
            if token != self._token or self._stop.is_set():
                log.info("bridge.stale pid=%d (a bridge of an earlier exabgp run)", pid)
                sock.close()
                return
            if self._conn is not None:
                self._conn.close()
            conn = self._conn = _Conn(sock, token, pid)
            # Same run reconnecting (ExaBGP respawned its helper): commands in flight may be
            # lost, so tell it everything again; withdrawals of routes it may still hold first.
            self._pending.clear()
            self._told = {rk: a for rk, a in self._told.items() if rk not in self.desired}
            self.counters["bridge_connects"] += 1
            log.info("bridge.connected pid=%d generation=%d", pid, self.generation)
            self._reconcile()
            for p in self.peers.values():
                if p.state == "up" and self.synced:
                    p.eor_sent = False
                    self._send_eor(p)
        try:
            for raw in reader:
                line = raw.decode(errors="replace").strip()
                if line:
                    self._handle(conn, line)
        except OSError:
            pass
        finally:
            with self._lock:
                conn.close()
                if self._conn is conn:
                    self._conn = None
                    self._pending.clear()
                    log.info("bridge.disconnected pid=%d", pid)
                self._changed.notify_all()

    def _handle(self, conn: _Conn, line: str) -> None:
        with self._lock:
            if self._conn is not conn:
                return
            if line in ("done", "error"):
                self._ack(line == "done")
            elif line.startswith("{"):
                try:
                    self._event(json.loads(line))
                except ValueError:
                    log.warning("bridge.bad_json line=%s", line[:200])
            elif line == "shutdown":
                log.info("bridge.exabgp_shutdown")
            else:
                log.debug("bridge.unknown line=%s", line[:200])
            self._changed.notify_all()

    def _ack(self, ok: bool) -> None:
        if not self._pending:
            log.warning("bridge.unexpected_ack ok=%s", ok)
            return
        p = self._pending.popleft()
        if ok:
            self.counters["acks_done"] += 1
        else:
            self.counters["acks_error"] += 1
        if p.kind == "announce":
            if ok:
                self.acked[p.key] = p.attrs
            else:
                self.acked.pop(p.key, None)
                self.failed[p.key] = p.attrs
                log.error("bgp.announce_refused peer=%s prefix=%s (see exabgp's log)", p.key[0], p.key[1])
        elif p.kind == "withdraw":
            self.acked.pop(p.key, None)
        elif p.kind == "eor" and not ok:
            # The session went down before the EOR went out: it is sent again on the next up.
            log.info("bgp.eor_refused peer=%s", p.key)

    def _event(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "state":
            nb = msg.get("neighbor") or {}
            address = str((nb.get("address") or {}).get("peer", ""))
            peer = self.peers.get(address)
            if peer is None:
                return
            state = str(nb.get("state", ""))
            peer.state, peer.since, peer.reason = state, time.time(), str(nb.get("reason", ""))
            log.info("bgp.peer_state peer=%s state=%s reason=%s", address, state, peer.reason or "-")
            if state == "up":
                peer.sessions += 1
                peer.eor_sent = False
                self.counters["sessions_up"] += 1
                if self.synced:
                    # ExaBGP re-sends its whole RIB on a new session; our EOR follows it.
                    self._reconcile()
                    self._send_eor(peer)
            elif state == "down":
                peer.eor_sent = False
        elif kind == "notification":
            log.info("bgp.exabgp_notification what=%s", msg.get("notification"))

    # --- observation ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._conn is not None and self._conn.alive

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait(self, predicate, timeout: float) -> bool:
        """Wait until predicate(self) holds (checked whenever the state changes)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
            return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            up = {a for a, p in self.peers.items() if p.state == "up"}
            advertised = [rk for rk in self.acked if rk[0] in up and self.desired.get(rk) == self.acked[rk]]
            return {
                "peers": {
                    a: {
                        "state": p.state,
                        "since": round(p.since, 3),
                        "reason": p.reason,
                        "families": list(p.families),
                        "sessions": p.sessions,
                        "routes": sum(1 for rk in advertised if rk[0] == a),
                    }
                    for a, p in self.peers.items()
                },
                "routes": [
                    {
                        "peer": rk[0],
                        "prefix": rk[1],
                        "nextHop": a.next_hop,
                        "communities": list(a.communities),
                        "largeCommunities": list(a.large_communities),
                        "localPreference": a.local_preference,
                        "med": a.med,
                        "state": "advertised" if rk in advertised else "failed" if rk in self.failed else "acked" if rk in self.acked else "pending",
                    }
                    for rk, a in sorted(self.desired.items())
                ],
                "advertised": len(advertised),
                "desired": len(self.desired),
                "failed": len(self.failed),
                "inFlight": len(self._pending),
                "connected": self._conn is not None and self._conn.alive,
                "synced": self.synced,
                "generation": self.generation,
                "counters": dict(self.counters),
            }
