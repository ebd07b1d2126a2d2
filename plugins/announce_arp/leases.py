"""`KubernetesMembership`: liveness and eligibility through coordination.k8s.io/v1 Leases.

Each node holds one Lease of its own, ``<leasePrefix><node>`` in ``leaseNamespace``
(holderIdentity = the node's name, leaseDurationSeconds, acquireTime, renewTime), renewed
every renewInterval; the addresses it may announce travel in the Lease's annotation
``announce-arp.kpr.io/eligible`` (a JSON list; absent or ``null`` while it has not finished
its initial sync). Every node lists and watches the Leases (label selector
``app.kubernetes.io/component=announce-arp,app.kubernetes.io/managed-by=kpr``, names filtered
by the prefix) through the core's informer, so a renewal, a release or a change of
eligibility reaches the plugin as soon as the API server sends it.

Clocks. A Lease is live while renewTime + leaseDurationSeconds is in the future, judged on one
time base, the API server's: the holder writes renewTime on the server's clock (its own
clock corrected by the offset measured from the Date header of its requests), and observers
time a renewal they see on the watch from the moment they see it (monotonic clock), as
client-go's leader election does, so two nodes' clocks never need to agree. Only a Lease seen
for the first time (start, relist after an outage) is judged by its renewTime against the
server's clock, with CLOCK_TOLERANCE for the one-second Date header: a node killed long
before this one started does not count as live for another leaseDuration.

API server unreachable. A node that cannot renew keeps its addresses while its own Lease is
still valid (last successful renewal + leaseDuration, timed from before the request was
sent, so it lets go no later than its peers see the Lease expire), then drops out and
announces nothing. While its own watch is broken it makes no new claims from others' silence
(their state is frozen as last seen) until a fresh list, or the replay of the events it
missed (THAW at most), shows where they stand. Peers that still reach the API server see
a cut-off node expire and take over. When the API server is down for every node, every
Lease lapses alike and nothing is announced until it is back: the trade-off of tying
liveness to the API server (the heartbeat membership does not depend on it).

A graceful stop releases the Lease (holderIdentity cleared, leaseDurationSeconds 1) so peers
take over at once; a killed node's Lease expires after leaseDuration.

This node's own eligibility, as `eligible(self_name)` gives it, is the one its Lease carries
on the server (written by a renewal that succeeded), not the one just published: the plugin
claims only addresses its peers can know it may announce. An address coming back to this node
(it ranks first again) is taken once the write that tells the holder has landed, so the two do
not both answer while the holder cannot know (up to a renewal when the write fails); giving an
address up does not wait (the plugin drops what it no longer finds eligible itself).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kpr.bus import Backoff
from kpr.kube.client import RateLimiter
from kpr.kube.informer import Informer, JitterBackoff, Watched
from kpr.kube.informer import describe_error
from kpr.kube.lease import ServerClock, holding_spec, micro_time, parse_time, released_spec

from .membership import Health, PublishingMembership

log = logging.getLogger(__name__)

ELIGIBLE_ANNOTATION = "announce-arp.kpr.io/eligible"
LABELS = {"app.kubernetes.io/component": "announce-arp", "app.kubernetes.io/managed-by": "kpr"}
LABEL_SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())
# Seconds of doubt on a renewTime judged by the server's clock: the Date header has a
# resolution of one second, on the holder's side and on ours.
CLOCK_TOLERANCE = 2.0
# Seconds a watch that answers again keeps the frozen view: the informer reports recovery
# before the events it missed are replayed, and those must land before anyone's silence
# counts (or this node would claim, and announce, a live peer's addresses for a moment).
THAW = 1.0


def encode_eligible(eligible: frozenset[str] | None) -> str:
    return "null" if eligible is None else json.dumps(sorted(eligible), separators=(",", ":"))


def decode_eligible(text: str | None) -> frozenset[str] | None:
    """The annotation's addresses; None when absent, ``null`` or unreadable (not ready)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        return None
    return frozenset(value)


@dataclass
class _Peer:
    holder: str
    duration: int
    renew_time: str
    eligible: frozenset[str] | None
    # Monotonic time the Lease stops counting, by this node's observation.
    expires_at: float
    resource_version: str = ""


class _HeldByOther(Exception):
    pass


class KubernetesMembership(PublishingMembership):
    """See the module docstring. `api_client` is the core's (PluginContext.kube_client())."""

    counter_prefix = "lease"

    def __init__(
        self,
        self_name: str,
        api_client: Any,
        *,
        namespace: str,
        prefix: str,
        lease_duration: int,
        renew_interval: float,
        limiter: RateLimiter | None = None,
        backoff: Backoff | None = None,
        watch_backoff: JitterBackoff | None = None,
    ):
        from kubernetes.client import CoordinationV1Api

        self.self_name = self_name
        self.namespace = namespace
        self.prefix = prefix
        self.lease_name = f"{prefix}{self_name}"
        self.duration = lease_duration
        self.interval = renew_interval
        self.api = CoordinationV1Api(api_client)
        self.clock = ServerClock()
        self._limiter = limiter or RateLimiter(10.0, 20)
        self._backoff = backoff or Backoff(0.2, renew_interval)
        self._watch_backoff = watch_backoff
        # A renewal must give up well before the Lease it renews runs out.
        self._timeout = max(1.0, lease_duration / 3)
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.informer: Informer | None = None
        self._lease: Any = None  # our Lease as the server last returned it
        self._valid_until = float("-inf")  # monotonic: our Lease counts until then
        self._eligible: frozenset[str] | None = None
        self._written: str | None = None  # eligibility as last written
        self._written_eligible: frozenset[str] | None = None  # the same, decoded
        self._peers: dict[str, _Peer] = {}
        self._listed = False
        # While the watch is broken (and THAW after), peers are judged as at _frozen_at.
        self._frozen_at: float | None = None
        self._thaw_at = float("inf")
        self._watch_error = ""
        self._error = ""
        self._last_live: frozenset[str] = frozenset()
        self.counters: dict[str, int] = {
            "renewals": 0,
            "renew_failures": 0,
            "transitions": 0,
            "peer_expiries": 0,
            "watch_errors": 0,
        }

    # --- interface -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self.informer = Informer(
            Watched(
                "Lease",
                "coordination.k8s.io/v1",
                functools.partial(self.api.list_namespaced_lease, self.namespace),
                label_selector=LABEL_SELECTOR,
            ),
            self,
            self._limiter,
            backoff=self._watch_backoff,
            # Every node renews every renewInterval, this one included: a quiet watch is broken.
            idle_timeout=max(10.0, 5 * self.interval),
        )
        self._thread = threading.Thread(target=self._loop, name="kpr-arp-lease", daemon=True)
        self._thread.start()
        self.informer.start()
        log.info(
            "event=lease_membership_start lease=%s/%s duration=%d renew_interval=%s",
            self.namespace, self.lease_name, self.duration, self.interval,
        )

    def stop(self) -> None:
        self._halt(release=True)

    def kill(self) -> None:
        """Stop renewing without releasing, as a SIGKILL would: for tests."""
        self._halt(release=False)

    def _halt(self, release: bool) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 2)
        if release:
            self._release()
        if self.informer is not None:
            self.informer.stop()
            self.informer.join(1.0)

    def live_nodes(self) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            return self._live(now)

    def _peer_eligible(self, node: str) -> frozenset[str] | None:
        peer = self._peers.get(node)
        return peer.eligible if peer is not None else None

    def _own_eligible(self) -> frozenset[str] | None:
        return self._written_eligible  # as the server has it (module docstring)

    def health(self) -> Health:
        now = time.monotonic()
        with self._lock:
            live = self._live(now)
            peers_live = sorted(n for n in live if n != self.self_name)
            counters: dict[str, float] = {**self.counters, "live_nodes": len(live)}
            details: dict[str, object] = {
                "lease": f"{self.namespace}/{self.lease_name}",
                "validForSeconds": round(max(0.0, self._valid_until - now), 3),
                "participating": self.self_name in live,
                "livePeers": peers_live,
                "serverClockOffsetSeconds": round(self.clock.offset, 3),
                "watch": self.informer.stats.state if self.informer else "stopped",
                "peers": {
                    n: {
                        "holder": p.holder,
                        "expiresInSeconds": round(p.expires_at - now, 3) if p.expires_at > float("-inf") else None,
                        "eligible": None if p.eligible is None else sorted(p.eligible),
                    }
                    for n, p in sorted(self._peers.items())
                },
            }
            own = ""
            if self._error:
                serving = self.self_name in live
                own = self._error + (f"; still serving for {self._valid_until - now:.1f}s" if serving else "; not announcing")
            problems = [m for m in (own, self._watch_error) if m]
            listed = self._listed
        if problems:
            return Health(False, "lease: " + "; ".join(problems), counters, details)
        if not listed:
            return Health(True, "lease: listing the Leases", counters, details)
        return Health(True, f"{len(live)} nodes live (Leases in {self.namespace})", counters, details)

    # --- liveness ------------------------------------------------------------------------

    def _live(self, now: float) -> frozenset[str]:
        # Caller holds the lock. Until this node holds a valid Lease and has seen the others'
        # it takes no part: it could not tell who is up and would claim every address.
        if self._stop.is_set() or not self._listed or now >= self._valid_until:
            return frozenset()
        # While the watch is broken, others are judged as they stood when it broke.
        at = now
        if self._frozen_at is not None:
            if now < self._thaw_at:
                at = min(now, self._frozen_at)
            else:
                self._frozen_at = None
        return frozenset(n for n, p in self._peers.items() if at < p.expires_at) | {self.self_name}

    def _next_expiry(self, now: float) -> float | None:
        with self._lock:
            times = [p.expires_at for p in self._peers.values() if p.expires_at > now]
            if self._valid_until > now:
                times.append(self._valid_until)
            if self._frozen_at is not None and self._thaw_at > now:
                times.append(self._thaw_at)
        return min(times) if times else None

    def _notify_if_changed(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            live = self._live(now)
            gone, came = self._last_live - live, live - self._last_live
            # A peer that was live and is still in the table has run out (not released).
            self.counters["peer_expiries"] += sum(1 for n in gone if n != self.self_name and n in self._peers and self._peers[n].holder == n)
            self._last_live = live
        if gone or came:
            log.info("event=membership_changed live=%s joined=%s left=%s", ",".join(sorted(live)) or "-", ",".join(sorted(came)) or "-", ",".join(sorted(gone)) or "-")
        if gone or came or force:
            self._fire()

    # --- informer handler (the Leases of every node) --------------------------------------

    def _node_of(self, obj: dict) -> str | None:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = str(meta.get("name") or "")
        if not name.startswith(self.prefix) or len(name) == len(self.prefix):
            return None
        node = name[len(self.prefix):]
        return None if node == self.self_name else node

    def _peer(self, node: str, obj: dict, old: _Peer | None, now: float, first_sight: bool) -> _Peer:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        holder = str(spec.get("holderIdentity") or "")
        try:
            duration = int(spec.get("leaseDurationSeconds") or 0)
        except (TypeError, ValueError):
            duration = 0
        renew_raw = str(spec.get("renewTime") or "")
        annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
        eligible = decode_eligible(annotations.get(ELIGIBLE_ANNOTATION))
        peer = _Peer(holder, duration, renew_raw, eligible, float("-inf"), str(meta.get("resourceVersion") or ""))
        renew = parse_time(renew_raw)
        if holder != node or duration <= 0 or renew is None:
            return peer  # released, held by another identity, or unreadable: not live
        if old is not None and (old.holder, old.duration, old.renew_time) == (holder, duration, renew_raw):
            peer.expires_at = old.expires_at  # no new renewal
        elif first_sight or old is None:
            # Judged by the server's clock: a Lease that ran out before we looked stays out.
            remaining = renew.timestamp() + duration - self.clock.now() + CLOCK_TOLERANCE
            peer.expires_at = now + min(float(duration), remaining)
        else:
            peer.expires_at = now + duration  # a renewal seen as it happened
        return peer

    def listed(self, kind: str, items: list[dict], resource_version: str) -> None:
        now = time.monotonic()
        with self._lock:
            fresh: dict[str, _Peer] = {}
            for obj in items:
                node = self._node_of(obj)
                if node is not None:
                    old = self._peers.get(node)
                    # After a gap the list is all we know: a change seen now may be old.
                    fresh[node] = self._peer(node, obj, old, now, first_sight=True)
            self._peers = fresh
            # A whole fresh list: nothing left to wait for.
            self._frozen_at = None
            first = not self._listed
            self._listed = True
        if first:
            log.info("event=leases_listed leases=%d resource_version=%s", len(fresh), resource_version)
        self._wake.set()
        self._notify_if_changed(force=True)

    def event(self, kind: str, type_: str, obj: dict) -> None:
        node = self._node_of(obj)
        if node is None:
            return
        now = time.monotonic()
        with self._lock:
            old = self._peers.get(node)
            if type_ == "DELETED":
                self._peers.pop(node, None)
            else:
                self._peers[node] = self._peer(node, obj, old, now, first_sight=False)
        self._wake.set()
        self._notify_if_changed(force=True)

    def failed(self, kind: str, reason: str) -> None:
        with self._lock:
            if self._frozen_at is None:
                self._frozen_at = time.monotonic()
            self._thaw_at = float("inf")
            self._watch_error = f"watching Leases: {reason}"
            self.counters["watch_errors"] += 1

    def recovered(self, kind: str) -> None:
        # The watch answers again: a relist (listed) or the replay of missed events comes
        # next; the frozen view holds until then, or THAW at most.
        with self._lock:
            if self._frozen_at is not None:
                self._thaw_at = time.monotonic() + THAW
            self._watch_error = ""
        log.info("event=lease_watch_recovered")
        self._wake.set()

    # --- our own Lease -------------------------------------------------------------------

    def _loop(self) -> None:
        attempt = 0
        next_renew = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                eligibility_changed = encode_eligible(self._eligible) != self._written
            if now >= next_renew or (eligibility_changed and attempt == 0):
                if self._renew():
                    attempt = 0
                    next_renew = now + self.interval
                else:
                    attempt += 1
                    next_renew = time.monotonic() + min(self._backoff.delay(attempt), self.interval)
            self._notify_if_changed()
            deadline = next_renew
            expiry = self._next_expiry(time.monotonic())
            if expiry is not None:
                deadline = min(deadline, expiry + 0.001)
            self._wake.wait(max(0.0, deadline - time.monotonic()))

    def _body(self, lease: dict | None, acquire: bool) -> tuple[dict, str]:
        """Our Lease as we write it (held by this node, eligibility annotated); `acquire`: taken
        over or created. `lease`: as the server last returned it, None for a new one."""
        with self._lock:
            eligible = encode_eligible(self._eligible)
        if lease is None:
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": self.lease_name, "namespace": self.namespace}}
        meta = dict(lease.get("metadata") or {})
        meta["labels"] = {**(meta.get("labels") or {}), **LABELS}
        meta["annotations"] = {**(meta.get("annotations") or {}), ELIGIBLE_ANNOTATION: eligible}
        spec = holding_spec(lease.get("spec"), self.self_name, self.duration, micro_time(self.clock.now()), acquire=acquire)
        return {**lease, "metadata": meta, "spec": spec}, eligible

    def _call(self, method: Callable[..., Any], *args: Any, limited: bool = True) -> dict | None:
        """One API call, its answer as plain JSON; the Date header feeds the server clock.
        Errors the server answers raise ApiException."""
        if limited and not self._limiter.wait(self._stop):
            raise InterruptedError("stopping")
        t0 = time.time()
        resp = method(*args, _preload_content=False, _request_timeout=(min(2.0, self._timeout), self._timeout))
        self.clock.sample(resp.headers, t0, time.time())
        return json.loads(resp.data) if resp.data else None

    def _acquire(self) -> tuple[Any, str]:
        """Read our Lease, create it or take it back; returns it and the eligibility written."""
        from kubernetes.client.exceptions import ApiException

        try:
            current = self._call(self.api.read_namespaced_lease, self.lease_name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            current = None
        if current is None:
            body, eligible = self._body(None, acquire=True)
            created = self._call(self.api.create_namespaced_lease, self.namespace, body)
            with self._lock:
                self.counters["transitions"] += 1
            log.info("event=lease_created lease=%s/%s", self.namespace, self.lease_name)
            return created, eligible
        spec = current.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder == self.self_name:
            # Ours already (a restart within leaseDuration): carry on renewing it.
            body, eligible = self._body(current, acquire=False)
        else:
            renew = parse_time(spec.get("renewTime"))
            duration = spec.get("leaseDurationSeconds") or 0
            if holder and renew is not None and renew.timestamp() + duration > self.clock.now() - CLOCK_TOLERANCE:
                raise _HeldByOther(f"Lease {self.namespace}/{self.lease_name} is held by {holder!r} (another node with this name?)")
            body, eligible = self._body(current, acquire=True)
            with self._lock:
                self.counters["transitions"] += 1
            log.info("event=lease_acquired lease=%s/%s previous_holder=%s", self.namespace, self.lease_name, holder or "-")
        return self._call(self.api.replace_namespaced_lease, self.lease_name, self.namespace, body), eligible

    def _renew(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        sent = time.monotonic()
        try:
            if self._lease is None:
                lease, eligible = self._acquire()
            else:
                body, eligible = self._body(self._lease, acquire=False)
                try:
                    lease = self._call(self.api.replace_namespaced_lease, self.lease_name, self.namespace, body)
                except ApiException as e:
                    if e.status not in (404, 409):
                        raise
                    # Deleted or written by someone else: read it again and decide afresh.
                    log.warning("event=lease_conflict lease=%s/%s status=%d", self.namespace, self.lease_name, e.status)
                    self._lease = None
                    lease, eligible = self._acquire()
        except InterruptedError:
            return False
        except Exception as e:  # noqa: BLE001 - any failure: count, report, retry
            self._renew_failed(e)
            return False
        with self._lock:
            self._lease = lease
            self._valid_until = sent + self.duration
            landed = eligible != self._written
            self._written = eligible
            self._written_eligible = decode_eligible(eligible)
            recovered = bool(self._error)
            self._error = ""
            self.counters["renewals"] += 1
        if recovered:
            log.info("event=lease_renew_recovered lease=%s/%s", self.namespace, self.lease_name)
        if landed:
            self._fire()  # what this node may claim grew or shrank with it
        return True

    def _renew_failed(self, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, _HeldByOther) else describe_error(exc)
        now = time.monotonic()
        with self._lock:
            self.counters["renew_failures"] += 1
            left = self._valid_until - now
            first = not self._error
            # whether it still serves is added when health() is asked: the Lease may run out
            # before the next renewal fails, and the message must not say "still serving" then
            self._error = f"cannot renew {self.namespace}/{self.lease_name}: {reason}"
            if isinstance(exc, _HeldByOther):
                self._lease = None
        if first:
            log.error("event=lease_renew_failed lease=%s/%s reason=%s valid_for=%.1f", self.namespace, self.lease_name, reason, max(0.0, left))

    def _release(self) -> None:
        """Hand the Lease back so peers take over at once (holder cleared, duration 1 s)."""
        lease = self._lease
        if lease is None:
            return
        try:
            meta = dict(lease.get("metadata") or {})
            meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ELIGIBLE_ANNOTATION}
            body = {**lease, "metadata": meta, "spec": released_spec(lease.get("spec"), micro_time(self.clock.now()))}
            # not rate-limited: the limiter gives nothing once stopping
            self._call(self.api.replace_namespaced_lease, self.lease_name, self.namespace, body, limited=False)
            log.info("event=lease_released lease=%s/%s", self.namespace, self.lease_name)
        except Exception as e:  # noqa: BLE001 - peers see it expire instead
            log.warning("event=lease_release_failed lease=%s/%s reason=%s: peers take over after %ds", self.namespace, self.lease_name, describe_error(e), self.duration)
        finally:
            with self._lock:
                self._lease = None
                self._valid_until = float("-inf")
