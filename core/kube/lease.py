"""The rules of a coordination.k8s.io/v1 Lease, shared by every kpr holder of one.

kpr holds Leases in two places: leader election among agents (kpr.kube.election, for writing
Service status) and announce_arp's per-node liveness Leases. Both follow client-go's rules,
kept here once:

- holding: the holder writes its identity, leaseDurationSeconds and renewTime; taking a Lease
  over (or creating it) also sets acquireTime and counts a transition;
- releasing: holder cleared and leaseDurationSeconds 1, so a peer takes over at its next try;
- times are metav1.MicroTime text (RFC 3339, microseconds, UTC).

How the clocks are read is the caller's: election times a change by when it saw it
(monotonic), announce_arp judges renewTime on the API server's clock (ServerClock).
Specs here are plain dicts in the API's JSON form (camelCase), as the kubernetes client
sends and, with ``sanitize_for_serialization``, reads them.
"""

from __future__ import annotations

import datetime
import email.utils
import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any


def micro_time(t: float | None = None) -> str:
    """metav1.MicroTime text of wall-clock time `t` (now when None)."""
    d = datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> datetime.datetime | None:
    """A MicroTime (text or datetime) as an aware datetime; None when absent or unreadable."""
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def holding_spec(old: Mapping[str, Any] | None, identity: str, duration: float, now: str, *, acquire: bool) -> dict[str, Any]:
    """The spec a holder writes: `old` with this holder renewed at `now`; with `acquire` (a new
    Lease, or one taken over) also acquireTime and one more transition (none for a new one)."""
    spec = dict(old or {})
    spec.update(holderIdentity=identity, leaseDurationSeconds=max(1, round(duration)), renewTime=now)
    if acquire:
        spec["acquireTime"] = now
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1 if old else 0
    return spec


def released_spec(old: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """The spec a graceful stop writes: no holder, a duration of one second."""
    spec = dict(old or {})
    spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=now)
    return spec


class ServerClock:
    """The API server's wall clock as seen from here: local time plus the median offset
    measured from the Date headers of recent answers (0 until the first one)."""

    def __init__(self, samples: int = 5):
        self._offsets: deque[float] = deque(maxlen=samples)
        self._lock = threading.Lock()

    def sample(self, headers: Any, sent: float, received: float) -> None:
        date = headers.get("Date") if headers is not None else None
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # Date is truncated to the second: its middle is the best guess.
        with self._lock:
            self._offsets.append(server + 0.5 - (sent + received) / 2)

    @property
    def offset(self) -> float:
        with self._lock:
            return statistics.median(self._offsets) if self._offsets else 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def now_datetime(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.now(), datetime.timezone.utc)

    def now_text(self) -> str:
        return micro_time(self.now())
