"""The writer as the bus's writer stage (kpr.pipeline) and as a core facility: it applies
the bus's changes in batches (the initial state collected and written in one full sync at
sync complete, then change by change), retries a failed initial sync, runs check()
periodically (kpr_start / kpr_stop) and reports status (kpr_status)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from .. import hookimpl
from ..bpf.fs import mount_bpffs_for_pins
from ..context import PluginContext
from ..model import PluginStatus, Service, ServiceKey
from .groups import _fk_label

log = logging.getLogger("kpr.servicemaps")  # one logger for the whole writer, as before the split

# Seconds from a change of the desired state to the next try of a failed initial sync.
_RETRY_ON_CHANGE = 2.0
# New backend identities waiting in KeyIds's dict before they are moved into its table
# (compact_ids), and seconds the checker thread waits first (what follows the initial sync, the
# plugins' initial state and ready, is not held up by it).
_COMPACT_MIN = 1024
_COMPACT_DELAY = 0.5


class HooksMixin:
    """ServiceMapWriter as the writer stage and a facility (state: see ServiceMapWriter.__init__)."""

    # Entries compact_ids moves per hold of the lock when asked in chunks (the checker thread;
    # the bus before its memory settle): a change that comes meanwhile waits for one chunk.
    COMPACT_CHUNK = 16384

    # Called (from whichever thread wrote it) once the initial state is in the maps; the
    # writer stage sets it to learn that a retried initial sync succeeded.
    on_written: Callable[[], None] | None = None

    # ------------------------------------------------------------------ plugin hooks

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        if not self.maps:
            # (an agent mounted it before any plugin started, kpr.daemon; a writer on its own here)
            mount_bpffs_for_pins(self.pin_path)
            self.open(read=False)  # (read by the initial sync, or the first operation before it)
        if self.check_interval is None:
            self.check_interval = float(context.config.agent.resync_interval) if context is not None else 0.0
        self._stopping = False
        self._checker = threading.Thread(target=self._check_loop, name="kpr-servicemaps-check", daemon=True)
        self._checker.start()

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        self._stopping = True
        self._kick.set()
        if self._checker is not None:
            self._checker.join(10)
            self._checker = None
        self.close()  # pins stay: established flows keep working until the next agent adopts them

    def _check_loop(self) -> None:
        """Retries a failed initial sync with backoff, and runs check() every check_interval."""
        interval = self.check_interval or 0.0
        next_check = time.monotonic() + interval
        while True:
            due = [t for t in (self._retry_at, next_check if interval else None, self._compact_at) if t is not None]
            self._kick.wait(max(0.0, min(due) - time.monotonic()) if due else None)
            self._kick.clear()
            if self._stopping:
                return
            now = time.monotonic()
            try:
                if self._retry_at is not None and now >= self._retry_at:
                    self._initial_sync()
                elif interval and now >= next_check:
                    next_check = now + interval
                    self.check()
                if self._compact_at is not None and now >= self._compact_at:
                    self.compact_ids(self.COMPACT_CHUNK)
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("event=servicemaps_check_failed")

    def _ids_added(self) -> None:
        """After an outermost operation: backend identities it added wait in KeyIds's dict
        (fast to fill, about a hundred bytes each); many of them are moved into its table soon,
        off the operations' path, by the checker thread (or at once with _compact_in_op)."""
        waiting = self._backend_ids.pending()
        if self._compact_in_op:
            if waiting:
                self.compact_ids()
        elif waiting >= _COMPACT_MIN and self._compact_at is None and self._checker is not None:
            self._compact_at = time.monotonic() + _COMPACT_DELAY
            self._kick.set()

    def compact_ids(self, chunk: int | None = None) -> int:
        """Move the new backend identities into the compact table (kpr.idtables.KeyIds), `chunk`
        at a time per hold of the lock (None: all at once); returns how many moved."""
        moved = 0
        while True:
            with self._lock:
                self._compact_at = None
                ids = self._backend_ids
                n = ids.compact(chunk)
                moved += n
                if not n or chunk is None or not ids.pending():
                    if moved >= _COMPACT_MIN:
                        log.debug("event=servicemaps_ids_compacted moved=%d waiting=%d", moved, ids.pending())
                    return moved

    # Through the writer stage, the initial state is collected and written in one batched
    # full sync at sync complete (adopted maps keep serving the old state until then); later
    # changes are applied as they come.

    @property
    def initial_written(self) -> bool:
        """True once the initial state is in the maps (before, the stage holds events back)."""
        return self._initial is None

    def apply_batch(self, changes: Sequence[tuple[str, Any]]) -> dict[int, Exception]:
        """Apply a batch of the bus's changes in order, under one hold of the lock:
        ``("upsert", Service)``, ``("delete", ServiceKey)``, ``("sync", None)``. Returns the
        changes that failed, by index (each left the maps as they were; the stage retries
        it). A failed initial sync is not one of them: the writer retries it itself."""
        failed: dict[int, Exception] = {}
        # one batch is one operation: a kpr_slots range freed by one change is not reused by
        # the next change of the same batch (kpr.servicemaps.slots); maps a restart left unread
        # are read by the first change that needs them (the initial sync may not: adopt.py)
        with self._op(read=False):
            start = self._collect_initial(changes) if self._initial is not None else 0
            for i, (event, payload) in enumerate(changes[start:] if start else changes, start):
                try:
                    if event == "upsert":
                        self._take_upsert(payload)
                    elif event == "delete":
                        self._take_delete(payload)
                    elif event == "sync":
                        self._take_sync()
                    else:
                        raise ValueError(f"unknown change {event!r} (upsert, delete or sync)")
                except Exception as e:  # noqa: BLE001 - reported to the stage, which retries
                    failed[i] = e
        return failed

    def _collect_initial(self, changes: Sequence[tuple[str, Any]]) -> int:
        """Before the initial state is written: its leading upserts and deletes only change
        what it will be (an initial sync's 20k at once), taken in one loop; returns how many
        (the rest, from a sync or a change that is not well formed on, go one by one)."""
        initial = self._initial
        assert initial is not None
        n = 0
        try:
            for event, payload in changes:
                if event == "upsert":
                    initial[payload.key] = payload
                elif event == "delete":
                    initial.pop(payload, None)
                else:
                    break
                n += 1
        except Exception:  # noqa: BLE001 - that change fails on its own below, reported
            pass
        if n:
            self._desired_changed()
        return n

    def _take_upsert(self, service: Service) -> None:
        if self._initial is not None:
            self._initial[service.key] = service
            self._desired_changed()
            return
        self.upsert(service)

    def _take_delete(self, key: ServiceKey) -> None:
        if self._initial is not None:
            self._initial.pop(key, None)
            self._desired_changed()
            return
        self.delete(key)

    def _take_sync(self) -> None:
        if self._initial is None:
            self.gc()
            return
        self._sync_requested = True
        self._initial_sync()

    def _desired_changed(self) -> None:
        # While a failed initial sync waits for its retry, a new desired state is tried soon
        # (but not more often than every _RETRY_ON_CHANGE seconds under churn).
        if self._retry_at is not None:
            self._retry_at = min(self._retry_at, time.monotonic() + _RETRY_ON_CHANGE)
            self._kick.set()

    def _initial_sync(self) -> bool:
        """Write the initial state (one full sync); on failure the maps are rolled back, the
        writer stays not synced and a retry is scheduled with backoff."""
        with self._lock:
            initial = self._initial
            if initial is None or not self._sync_requested:
                return initial is None
            t0 = time.monotonic()
            try:
                self.full_sync(initial.values(), keyed=initial)
            except Exception as e:  # noqa: BLE001 - reported in status, retried
                self._sync_attempts += 1
                self.sync_error = f"{type(e).__name__}: {e}"
                delay = self._backoff.delay(self._sync_attempts)
                self._retry_at = time.monotonic() + delay
                self._kick.set()
                log.error(
                    "event=servicemaps_initial_sync_failed services=%d attempt=%d retry_in=%.1f error=%r: not ready",
                    len(initial), self._sync_attempts, delay, self.sync_error,
                )
                return False
            self._initial = None
            self._retry_at = None
            self.sync_error = ""
            log.info(
                "event=servicemaps_initial_sync services=%d seconds=%.3f attempts=%d refused=%d",
                len(initial), time.monotonic() - t0, self._sync_attempts + 1, len(self.refused),
            )
        if self.on_written is not None:
            self.on_written()
        return True

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        """Counts read back from the kernel maps; `details.synced` is false until the initial
        state is in the maps (the agent is not ready before)."""
        with self._lock:
            # A restart's maps left unread until the initial sync (kpr.servicemaps.adopt) are
            # counted, not read into the shadow: a scrape or `kpr status` before that sync
            # would make it read and diff them (0.3 s at 20k) instead of taking them as they
            # are. What reading them gives before the sync: no service owns a frontend yet,
            # the shadow is the maps (no drift).
            unread = self._unread and bool(self.maps)
            if not unread:
                self._ensure_read()
            counts, frontends = self._kernel_counts(unread) if self.maps else ({}, 0)
            expected = counts if unread else self.entry_counts()
            conflicts = len(self.conflicts)
            synced = self._initial is None
            counters = {
                "services": float(len(self._by_service) - (1 if None in self._by_service else 0)),
                "frontends": float(frontends if unread else len(self._groups)),
                "backends": float(counts.get("kpr_backend", 0)),
                "map_entries": float(sum(counts.values())),
                "errors": float(self.errors),
                "conflicts": float(conflicts),
                "refused": float(len(self.refused)),
                "refusals": float(self.refusals),
                "rollbacks": float(self.rollbacks),
                "repairs": float(self.repairs),
                "checks": float(self.checks),
            }
            for name, n in counts.items():
                counters[f"entries_{name}"] = float(n)
                counters[f"max_entries_{name}"] = float(self.limits[name])
            details: dict[str, Any] = {
                "synced": synced,
                "refused": {str(k): r.text() for k, r in sorted(self.refused.items())},
            }
            if conflicts:
                # a count alone does not tell an operator which service a shared address left
                # unserved: the frontend, its holder, and who waits, in the order they are served
                details["conflicts"] = {
                    _fk_label(fk): {"owner": str(self._holder(fk) or ""), "waiting": list(map(str, keys))}
                    for fk, keys in sorted(self.conflicts.items())[:50]
                }
            drift = {name: {"kernel": n, "desired": expected[name]} for name, n in counts.items() if n != expected[name]}
            if drift:
                details["drift"] = drift
            healthy = bool(self.maps)
            msg = f"{int(counters['services'])} services, {int(counters['backends'])} backends"
            if not healthy:
                msg = "maps not open"
            if conflicts:
                label, first = next(iter(details["conflicts"].items()))
                msg += f", {conflicts} conflicting frontends (first {label}: {', '.join(first['waiting'])} not served there)"
            if self.refused:
                healthy = False
                first = min(self.refused)
                msg += f", {len(self.refused)} refused (first {first}: {self.refused[first].map} full)"
            if not synced and self._sync_attempts:
                healthy = False
                waiting = sorted(str(k) for k in (self._initial or {}))
                details["missing"] = waiting[:50]
                details["syncError"] = self.sync_error
                msg += (
                    f"; initial state not in the maps ({len(waiting)} services waiting, attempt "
                    f"{self._sync_attempts} failed: {self.sync_error}; retrying)"
                )
            elif not synced:
                msg += "; waiting for the initial state"
            if drift:
                msg += f"; maps differ from the desired state in {', '.join(sorted(drift))} (check() repairs)"
            return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)
