"""One holder at a time for a coordination.k8s.io/v1 Lease: leader election, as client-go's.

The holder renews every retryPeriod (renewTime, with the Lease's resourceVersion, so two
nodes racing are told apart by 409 Conflict). Another node takes over when the Lease has
not changed for leaseDurationSeconds *by its own clock* (monotonic, timed from when it saw
the change), so no two clocks need to agree. The holder counts itself elected only until
the start of its last successful renewal plus the duration: it stops before any peer can
have taken over. A graceful stop releases the Lease (holder cleared, duration 1) so a peer
takes over at its next try.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .client import json_call
from .lease import holding_spec, micro_time, released_spec

log = logging.getLogger(__name__)


class LeaseElector:
    def __init__(
        self,
        client: Any,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        retry_period: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ):
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.retry_period = retry_period
        self.on_change = on_change
        from kubernetes.client import CoordinationV1Api

        self.api = CoordinationV1Api(client)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Monotonic time our hold ends unless renewed; 0: not held.
        self._valid_until = 0.0
        self._reported = False
        # (holder, renewTime, resourceVersion) last seen, and when (monotonic).
        self._seen: tuple[str, str, str] | None = None
        self._seen_at = 0.0
        self._lease: dict | None = None
        self.transitions = 0  # times this node won the Lease
        self.last_error = ""

    @property
    def elected(self) -> bool:
        return time.monotonic() < self._valid_until

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kpr-lease-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with `release`, hand the Lease back at once (else it lapses)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if release and self.elected and self._lease is not None:
            lease = dict(self._lease)
            lease["spec"] = released_spec(lease.get("spec"), micro_time())
            try:
                json_call(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
            except Exception as e:  # the peers wait for the duration instead
                log.warning("lease.release_failed lease=%s/%s error=%s", self.namespace, self.name, e)
        self._valid_until = 0.0
        self._notify()

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_once()
                self.last_error = ""
            except Exception as e:
                # Keep trying; the hold lapses on its own when renewals keep failing.
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("lease.error lease=%s/%s error=%s", self.namespace, self.name, self.last_error)
            self._notify()
            self._stop.wait(self.retry_period)

    def try_once(self) -> bool:
        """One acquire-or-renew step; returns whether this node holds the Lease."""
        started = time.monotonic()
        code, lease = json_call(self.api.read_namespaced_lease, self.name, self.namespace)
        if code == 404:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"namespace": self.namespace, "name": self.name},
                    "spec": holding_spec(None, self.identity, self.duration, micro_time(), acquire=True)}
            code, lease = json_call(self.api.create_namespaced_lease, self.namespace, body)
            return self._after_write(code, lease, started, new_holder=True)
        if code != 200 or not isinstance(lease, dict):
            raise RuntimeError(f"GET lease answered {code}")
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        seen = (holder, str(spec.get("renewTime") or ""), str((lease.get("metadata") or {}).get("resourceVersion")))
        now = time.monotonic()
        if seen != self._seen:
            self._seen, self._seen_at = seen, now
        lapsed = now - self._seen_at > float(spec.get("leaseDurationSeconds") or self.duration)
        if holder and holder != self.identity and not lapsed:
            self._valid_until = 0.0
            return False
        lease["spec"] = holding_spec(spec, self.identity, self.duration, micro_time(), acquire=holder != self.identity)
        code, answer = json_call(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        return self._after_write(code, answer, started, new_holder=holder != self.identity)

    def _after_write(self, code: int, lease: Any, started: float, new_holder: bool) -> bool:
        if code in (200, 201) and isinstance(lease, dict):
            self._lease = lease
            self._valid_until = started + self.duration
            if new_holder:
                self.transitions += 1
                log.info("lease.acquired lease=%s/%s identity=%s", self.namespace, self.name, self.identity)
            return True
        if code == 409:
            # Another node wrote first; its write is what we see next time.
            self._valid_until = 0.0
            return False
        raise RuntimeError(f"writing lease answered {code}")

    def _notify(self) -> None:
        now = self.elected
        if now != self._reported:
            self._reported = now
            log.info("lease.%s lease=%s/%s identity=%s", "elected" if now else "lost", self.namespace, self.name, self.identity)
            if self.on_change is not None:
                try:
                    self.on_change(now)
                except Exception:
                    log.exception("lease.on_change_failed")
