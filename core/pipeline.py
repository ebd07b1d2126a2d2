"""The writer stage: the store's changes reach the shared service maps before any plugin.

When an enabled plugin requires ``"servicemaps"``, the bus puts the core's service map writer
in front of the plugins' workers. The stage has one keyed queue (coalescing as a worker's
does, node changes as barriers) and one thread, which takes everything waiting as one batch,
applies it through the writer (``apply_batch``), and only then hands the batch's events to
every plugin's worker, each carrying the generation the maps now hold. So a plugin's
``kpr_service_upsert(service, generation)`` runs when the maps already hold that state (or a
newer one): no plugin polls the maps to learn what the writer did.

Before the initial state is written (the writer collects it and writes it in one full sync at
sync complete, retried with backoff when it fails), the stage holds every event back and
hands them on, in order and coalesced, once the writer says it is written. A change the
writer fails to apply is retried with backoff and reaches the plugins once applied, unless a
newer state of the same service replaces it first.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from operator import attrgetter
from typing import Any, Callable, Protocol, Sequence

from . import memory
from .bus import Backoff, Event, EventCounter, KeyedQueue, QueueThread, _show

log = logging.getLogger(__name__)

# The name the writer has as a facility, in kpr_requires and `kpr status`.
WRITER_FACILITY = "servicemaps"

# Events the writer applies; node and pod changes only keep their place in the order.
_WRITER_EVENTS = ("upsert", "delete", "sync")
_EVENT_OF = attrgetter("event")


class MapWriter(Protocol):
    """What the stage needs from the writer (kpr.servicemaps.ServiceMapWriter)."""

    # Set by the stage: called (from any thread) when the initial state got written later,
    # by a retry of a failed initial sync.
    on_written: Callable[[], None] | None

    @property
    def initial_written(self) -> bool: ...

    def apply_batch(self, changes: Sequence[tuple[str, Any]]) -> dict[int, Exception]: ...


class WriterStage(QueueThread):
    """The writer's queue and thread; `fan_out` hands applied events to the plugins' workers."""

    def __init__(
        self,
        name: str,
        writer: MapWriter,
        fan_out: Callable[[list[Event]], None],
        backoff: Backoff,
        on_event: EventCounter | None = None,
        synchronous: bool = False,
    ):
        # synchronous (tests): apply and hand on in the caller's thread, a failed write raised.
        super().__init__(name, backoff, on_event, synchronous, f"kpr-stage-{name}")
        self.writer = writer
        self._fan_out = fan_out
        # Applied but not handed on: everything before the initial state is in the maps.
        # Only the stage's thread (or, synchronous, the caller under the lock) changes it.
        self._held = KeyedQueue()
        self._kicked = False
        # Grows by one with every batch handed on; the events of a batch carry it.
        self.generation = 0
        writer.on_written = self.kick

    # --- producer side -------------------------------------------------------------------

    def put(self, ev: Event) -> None:
        if self._synchronous:
            with self._cond:  # one caller at a time, as the stage's one thread
                self._busy = True
                try:
                    self._step([ev], {})
                finally:
                    self._busy = False
            return
        self._enqueue((ev,))

    def kick(self) -> None:
        """Look at the writer again (its initial state may be written now)."""
        if self._synchronous:
            # The writer's own retry thread: hand on what it held, under the stage's lock.
            with self._cond:
                if not self._busy and self._held and self.writer.initial_written:
                    self._hand_on()
            return
        with self._cond:
            self._kicked = True
            self._cond.notify()

    def _waiting(self) -> int:
        return len(self._held)

    # --- the stage's thread --------------------------------------------------------------

    def _next_batch(self) -> tuple[list[Event], dict[Any, int]] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                due = [k for k, (t, _, _) in self._retry.items() if t <= now]
                if self._pending or due or self._kicked:
                    break
                wake = min((t for t, _, _ in self._retry.values()), default=None)
                self._cond.wait(None if wake is None else wake - now)
            self._kicked = False
            batch = self._pending.drain()
            attempts: dict[Any, int] = {}
            for k in due:
                _, attempts[k], ev = self._retry.pop(k)
                batch.append(ev)
            self._busy = True
            return batch, attempts

    def _loop(self) -> None:
        while True:
            item = self._next_batch()
            if item is None:
                return
            try:
                self._step(*item)
            except Exception:  # noqa: BLE001 - the stage must outlive a bug in one batch
                log.exception("pipeline.step_failed stage=%s", self.name)
            finally:
                with self._cond:
                    self._busy = False
                    self.busy_hook = None

    def _step(self, batch: list[Event], attempts: dict[Any, int]) -> None:
        # The collector waits for the step (kpr.memory): an initial sync makes the writer's
        # shadow and 20k events to hand on, which collections walked (0.05-0.1 s at 20k).
        with memory.paused():
            self._apply_and_hold(batch, attempts)
            if self._held and self.writer.initial_written:
                self._hand_on()

    def _apply_and_hold(self, batch: list[Event], attempts: dict[Any, int]) -> None:
        changes = [i for i, ev in enumerate(batch) if ev.event in _WRITER_EVENTS]
        failed: dict[int, Exception] = {}
        if changes:
            self.busy_hook = "apply_batch"
            try:
                bad = self.writer.apply_batch([(batch[i].event, batch[i].payload) for i in changes])
                failed = {changes[j]: e for j, e in bad.items()}
            except Exception as e:  # noqa: BLE001 - the whole batch is retried
                failed = {i: e for i in changes}
        failing = self.stats.failing
        if not failed:
            self._held.put_many(batch)  # (at C speed: an initial sync's 20k)
            if failing:  # the key's text is made only to clear a failure
                for ev in batch:
                    failing.pop(_show(ev.key), None)
            return
        last = {ev.key: i for i, ev in enumerate(batch)}
        for i, ev in enumerate(batch):
            err = failed.get(i)
            if err is None:
                self._held.put(ev)
                if failing:
                    failing.pop(_show(ev.key), None)
            elif last[ev.key] == i:  # an older state followed by a newer one is not retried
                self._write_failed(ev, attempts.get(ev.key, 0), err)

    def _hand_on(self) -> None:
        self.generation += 1
        # Made directly: dataclasses.replace costs about 3 us an event (20k in an initial sync).
        gen = self.generation
        events = [Event(ev.key, ev.event, ev.payload, gen) for ev in self._held.drain()]
        self._fan_out(events)
        # Counted per kind, once a batch (an initial sync hands on 20k events at once).
        kinds = Counter(map(_EVENT_OF, events))
        for kind, n in kinds.items():
            if kind in _WRITER_EVENTS:
                self.stats.delivered += n
                if self._on_event:
                    self._on_event(self.name, kind, True, n)
        if "sync" in kinds:
            self.stats.synced = True
        log.debug("pipeline.batch stage=%s generation=%d events=%d", self.name, self.generation, len(events))

    def _write_failed(self, ev: Event, attempt: int, err: Exception) -> None:
        self._failed(ev, err)
        if self._synchronous:
            raise err
        with self._cond:
            delay = self._schedule_retry(ev, attempt)
        log.error(
            "pipeline.write_failed stage=%s event=%s key=%s attempt=%d retry_in=%s error=%r: plugins wait for it",
            self.name, ev.event, _show(ev.key), attempt + 1, "-" if delay is None else f"{delay:.2f}", err,
        )
