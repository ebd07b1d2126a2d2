"""The event bus: delivers service and node events to each enabled plugin.

Each plugin has its own worker thread and queue, so a slow or failing plugin never holds up
the others. The queue is keyed by service: a burst of changes to one service collapses into
its latest state (level-triggered), and one worker per plugin means calls for a service never
overlap. A failed delivery is retried with exponential backoff until it succeeds or a newer
state replaces it.

A node change is a barrier in every queue: what is queued after it is delivered after it,
even a service that was already waiting (that one is then delivered twice, before and after
the node change), so the services the store re-delivers because of new node facts never
overtake them.

When a plugin needs the shared service maps, the bus has a writer stage in front of the
workers (kpr.pipeline): every change is applied to the maps first, in batches, and reaches
the plugins with the generation the maps then hold.

An agent's bus also tends the process's memory (kpr.memory): it gives back what the plugins'
BPF compiles freed when it starts, and settles the heap once the initial state has reached
every plugin, the agent's one big burst of allocations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Iterable

from . import memory
from .model import NodeInfo, Service, ServiceKey, _quick_init

log = logging.getLogger(__name__)

# Sentinel queue keys; services use their ServiceKey.
_SYNC = ("__sync__",)
_NODE = ("__node__",)
_PODS = ("__pods__",)

# The hook each event is delivered through.
HOOKS = {
    "upsert": "kpr_service_upsert",
    "delete": "kpr_service_delete",
    "node": "kpr_node_changed",
    "pods": "kpr_pods_changed",
    "sync": "kpr_sync_complete",
}


@_quick_init  # (40k made on the way to ready at 20k services: 0.48 -> 0.35 us each)
@dataclass(frozen=True, slots=True, init=False)
class Event:
    """One queued change: `event` names the hook (HOOKS), `generation` the service maps'
    generation once the writer stage applied it (0 without a writer stage)."""

    key: Any
    event: str
    payload: Any
    generation: int = 0

    @property
    def barrier(self) -> bool:
        return self.event == "node"


_KEY_OF, _EVENT_OF = attrgetter("key"), attrgetter("event")


class KeyedQueue:
    """Pending events in arrival order, one per key: a newer event for a key that is still
    waiting takes its place (coalescing), unless a barrier (a node change) was queued since;
    then it goes behind the barrier and the older one is delivered first. Not locked: the
    owner holds its own lock."""

    def __init__(self) -> None:
        # One plain dict (ordered, by key) per stretch between barriers, a barrier the last
        # event of its stretch; the last stretch takes what comes. Keyed by the key alone and
        # drained by values(): ServiceKey's hash is a Python call, and an initial sync's 20k
        # events went through three queues (the writer stage's, its held events, a plugin's
        # worker's) hashed three times each in OrderedDicts keyed by (epoch, key), whose
        # values() looks every key up again.
        self._parts: list[dict[Any, Event]] = [{}]

    def put(self, ev: Event) -> None:
        self._parts[-1][ev.key] = ev
        if ev.barrier:
            self._parts.append({})

    def put_many(self, events: list[Event]) -> None:
        """put() each event in turn; without a barrier among them, at C speed (an initial
        sync's 20k services reach the writer stage and then every plugin's worker at once)."""
        if "node" in map(_EVENT_OF, events):
            for ev in events:
                self.put(ev)
            return
        # (as put(): a key already waiting in the last stretch keeps its place and takes the newer event)
        self._parts[-1].update(zip(map(_KEY_OF, events), events))

    def pop(self) -> Event:
        """The first event (meant for a queue of one or a few: drain() takes many)."""
        parts = self._parts
        while not parts[0] and len(parts) > 1:
            del parts[0]
        first = parts[0]
        ev = first.pop(next(iter(first)))
        if not first:
            if len(parts) > 1:
                del parts[0]
            else:
                # A dict never shrinks: after an initial sync's burst, a small one.
                parts[0] = {}
        return ev

    def drain(self) -> list[Event]:
        parts, self._parts = self._parts, [{}]
        if len(parts) == 1:
            return list(parts[0].values())
        return [ev for part in parts for ev in part.values()]

    def waiting(self, key: Any) -> bool:
        return any(key in part for part in self._parts)

    def __len__(self) -> int:
        parts = self._parts
        return len(parts[0]) if len(parts) == 1 else sum(map(len, parts))


@dataclass
class WorkerStats:
    delivered: int = 0
    errors: int = 0
    retries: int = 0
    last_error: str = ""
    synced: bool = False
    # Keys currently failing, with the error; cleared when a delivery succeeds.
    failing: dict[str, str] = field(default_factory=dict)


class Backoff:
    """Exponential backoff with a cap: initial, initial*2, ... max."""

    def __init__(self, initial: float = 0.1, maximum: float = 30.0):
        self.initial = initial
        self.maximum = maximum

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * (2 ** max(0, attempt - 1)))


# A hook invoker: (hook name, kwargs) -> None, raising what the plugin raised.
Invoker = Callable[..., Any]
# Counts handled events: (plugin or stage, event, ok) for one, (..., n) for n of one kind.
EventCounter = Callable[..., None]


class QueueThread:
    """A keyed queue with retries and the one thread that drains it: a plugin's worker, and
    the writer stage (kpr.pipeline)."""

    def __init__(
        self,
        name: str,
        backoff: Backoff,
        on_event: EventCounter | None,
        synchronous: bool,
        thread_name: str,
    ):
        self.name = name
        self._backoff = backoff
        self._on_event = on_event
        # Tests: work in the caller's thread at once, a failure raised to the caller.
        self._synchronous = synchronous
        self._cond = threading.Condition()
        self._pending = KeyedQueue()
        # key -> (due monotonic time, attempt number, event)
        self._retry: dict[Any, tuple[float, int, Event]] = {}
        self._busy = False
        # The hook (or writer call) the thread is inside, None between: named when a stop waits.
        self.busy_hook: str | None = None
        self._stopping = False
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def _enqueue(self, events: Iterable[Event]) -> None:
        events = list(events)
        with self._cond:
            if self._retry:
                for ev in events:
                    self._retry.pop(ev.key, None)  # a newer state replaces a pending retry
            self._pending.put_many(events)
            self._cond.notify()

    def put(self, ev: Event) -> None:
        raise NotImplementedError

    def put_many(self, events: Iterable[Event]) -> None:
        """Queue these events in order (synchronous: handle each in turn, as put() does)."""
        if self._synchronous:
            for ev in events:
                self.put(ev)
            return
        self._enqueue(events)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float) -> bool:
        """True once the thread has left its hook and ended (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    def _waiting(self) -> int:
        """Events held besides the queue and the retries (under the lock)."""
        return 0

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._retry and not self._busy and not self._waiting()

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._retry) + self._waiting()

    def _failed(self, ev: Event, err: Exception) -> None:
        """Count a failed event in the stats and the metrics."""
        self.stats.errors += 1
        self.stats.last_error = f"{ev.event} {_show(ev.key)}: {type(err).__name__}: {err}"
        self.stats.failing[_show(ev.key)] = f"{type(err).__name__}: {err}"
        if self._on_event:
            self._on_event(self.name, ev.event, False)

    def _schedule_retry(self, ev: Event, attempt: int) -> float | None:
        """Retry a failed event with backoff unless a newer one for its key is queued; the
        delay, or None. Call with the lock held."""
        if self._pending.waiting(ev.key) or self._stopping:
            return None
        attempt += 1
        delay = self._backoff.delay(attempt)
        self._retry[ev.key] = (time.monotonic() + delay, attempt, ev)
        self.stats.retries += 1
        return delay


class PluginWorker(QueueThread):
    def __init__(
        self,
        name: str,
        invoke: Invoker,
        backoff: Backoff,
        on_event: EventCounter | None = None,
        on_synced: Callable[[], None] | None = None,
        synchronous: bool = False,
    ):
        super().__init__(name, backoff, on_event, synchronous, f"kpr-bus-{name}")
        self._invoke = invoke
        self._on_synced = on_synced
        # Events of the batch being delivered not delivered yet (see _next), under the lock.
        self._inflight = 0

    # --- producer side -------------------------------------------------------------------

    def put(self, ev: Event) -> None:
        if self._synchronous:
            self._deliver(ev, 0, raise_errors=True)
            return
        self._enqueue((ev,))

    # --- worker side ---------------------------------------------------------------------

    def _next(self) -> tuple[list[Event], int] | None:
        """The next events to deliver: every pending one (in order; a retry waits for none of
        them), or one retry that is due, with its attempt number."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._pending:
                    # All at once: an initial sync's 20k events took a hold of the lock and
                    # a queue pop each (about 1.5 us an event on the way to ready).
                    batch = self._pending.drain() if len(self._pending) > 1 else [self._pending.pop()]
                    self._inflight = len(batch)
                    self._busy = True
                    self.busy_hook = HOOKS[batch[0].event]
                    return batch, 0
                now = time.monotonic()
                if self._retry:
                    key = min(self._retry, key=lambda k: self._retry[k][0])
                    t = self._retry[key][0]
                    if t <= now:
                        _, attempt, ev = self._retry.pop(key)
                        self._inflight = 1
                        self._busy = True
                        self.busy_hook = HOOKS[ev.event]
                        return [ev], attempt
                    self._cond.wait(t - now)
                else:
                    self._cond.wait()

    def _waiting(self) -> int:
        # Taken from the queue and not delivered yet (the rest of a batch), besides the one
        # being delivered.
        return max(0, self._inflight - 1) if self._busy else 0

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            batch, attempt = item
            done: Counter[str] = Counter()
            last: dict[Any, int] | None = None  # each key's last place in the batch, made at a first failure
            try:
                for i, ev in enumerate(batch):
                    if i and self._stopping:
                        break  # (left undelivered, as a stop leaves the queue)
                    self.busy_hook = HOOKS[ev.event]
                    ok = self._deliver(ev, attempt, count=False)
                    if ok:
                        done[ev.event] += 1
                        if not self._retry:
                            # Nothing to drop from the retries, and only this thread writes
                            # _inflight (readers take the lock): no lock for it, which was
                            # 0.4 of about 2.5 us an event (an initial sync's 20k before ready).
                            # (Other threads only ever remove retries: none can appear now.)
                            self._inflight -= 1
                            continue
                    elif ok is False and last is None:
                        last = {e.key: j for j, e in enumerate(batch)}
                    with self._cond:
                        self._inflight -= 1
                        if ok and self._retry:
                            # A newer state of a key an earlier batch had failed: the retry
                            # would bring back the old one.
                            self._retry.pop(ev.key, None)
                        # (behind a node change a key is queued twice: its newer state later
                        # in this batch takes the failed one's place, as a queued one would)
                        delay = None if ok is not False or last[ev.key] != i else self._schedule_retry(ev, attempt)  # type: ignore[index]
                    if delay is not None:
                        log.info("bus.retry plugin=%s key=%s attempt=%d delay=%.2f", self.name, _show(ev.key), attempt + 1, delay)
            finally:
                # (also when something escapes the loop: what was delivered is counted, the worker not left busy)
                if self._on_event:
                    for event, n in done.items():
                        self._on_event(self.name, event, True, n)
                with self._cond:
                    self._busy = False
                    self._inflight = 0
                    self.busy_hook = None

    def _deliver(self, ev: Event, attempt: int, raise_errors: bool = False, count: bool = True) -> bool | None:
        """Hand one event to the plugin: True when delivered, False when it failed (to be
        retried), None when a sync failed (handed over all the same; counted as an error only).
        `count`: count it delivered in the metrics now; the worker's loop counts a batch at once."""
        key, event, payload = ev.key, ev.event, ev.payload
        try:
            if event == "upsert":
                self._invoke("kpr_service_upsert", service=payload, generation=ev.generation)
            elif event == "delete":
                self._invoke("kpr_service_delete", key=payload, generation=ev.generation)
            elif event == "node":
                self._invoke("kpr_node_changed", node=payload)
            elif event == "pods":
                self._invoke("kpr_pods_changed", pods=payload)
            elif event == "sync":
                self._invoke("kpr_sync_complete", generation=ev.generation)
                self._synced()
        except Exception as e:  # a plugin's bug must not stop the agent or the other plugins
            self._failed(ev, e)
            log.error("bus.error plugin=%s event=%s key=%s attempt=%d error=%r", self.name, event, _show(key), attempt, e, exc_info=True)
            if raise_errors:
                raise
            if event == "sync":
                # The initial state was handed over; the plugin's failure is its own.
                self._synced()
                return None
            return False
        self.stats.delivered += 1
        if self.stats.failing:  # the key's text is made only to clear a failure (20k events at start)
            self.stats.failing.pop(_show(key), None)
        if count and self._on_event:
            self._on_event(self.name, event, True)
        return True


    def _synced(self) -> None:
        first = not self.stats.synced
        self.stats.synced = True
        if first and self._on_synced:
            self._on_synced()


def _show(key: Any) -> str:
    if key == _SYNC:
        return "sync"
    if key == _NODE:
        return "node"
    if key == _PODS:
        return "pods"
    return str(key)


class EventBus:
    """Fan-out of service events to one worker per plugin, behind the writer stage if any."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        on_event: EventCounter | None = None,
        settle_memory: bool = False,
        synchronous: bool = False,
        on_synced: Callable[[], None] | None = None,
        settle_after: threading.Event | None = None,
        settle_wait: float = 1.0,
    ):
        """`settle_memory`: settle the process's memory once every plugin has the initial
        state (an agent's bus; tests sharing a process with many buses leave it off).

        `synchronous` (tests and test harnesses): no threads; each change goes through the
        writer stage and every plugin in the caller's thread before the call returns, in the
        same order and with the same generations as the threaded bus; a failed write or a
        plugin's exception is raised to the caller instead of retried.

        `on_synced`: called once every plugin's worker has delivered the initial state (the
        agent looks whether it is ready then, not at its next poll).

        `settle_after`: the settle waits for this event, up to `settle_wait` seconds (then
        settles anyway: never lost), in a thread of its own (no plugin's worker held: its
        events go on); the agent sets it once READY=1 is out, or once it stops, so the settle
        never delays READY=1."""
        self._synchronous = synchronous
        self._on_synced = on_synced
        self._settle_after = settle_after
        self._settle_wait = settle_wait
        self._backoff = backoff or Backoff()
        self._on_event = on_event
        self._settle_memory = settle_memory
        self._settled = False
        self._settle_lock = threading.Lock()
        # The thread a settle waits for settle_after in (none while it need not wait).
        self._settler: threading.Thread | None = None
        self.workers: dict[str, PluginWorker] = {}
        # The writer stage (kpr.pipeline.WriterStage), when a plugin needs the service maps.
        self.stage: Any = None
        self._started = False

    def add_plugin(self, name: str, invoke: Invoker) -> None:
        if self._started:
            raise RuntimeError("plugins must be added before the bus starts")
        self.workers[name] = PluginWorker(
            name, invoke, self._backoff, self._on_event, self._worker_synced, synchronous=self._synchronous
        )

    def set_writer(self, name: str, writer: Any) -> None:
        """Put the service map writer in front of the plugins (see kpr.pipeline): every change
        is applied to the maps before any plugin's worker gets it."""
        if self._started:
            raise RuntimeError("the writer must be set before the bus starts")
        from .pipeline import WriterStage

        self.stage = WriterStage(name, writer, self._fan_out, self._backoff, self._on_event, synchronous=self._synchronous)

    def start(self) -> None:
        self._started = True
        if self._settle_memory:
            # The plugins have started: what compiling their BPF code freed goes back to the
            # system before the initial state comes in (it is not pymalloc's to reuse).
            memory.trim()
        if self._synchronous:
            return
        for w in self.workers.values():
            w.start()
        self.start_stage()

    def start_stage(self) -> None:
        """Start the writer stage (once), ahead of the plugins' workers when called before
        start(): the maps take what is queued while plugins still start, and what the stage
        hands on waits in the workers' queues until start()."""
        if self.stage is not None and not self._synchronous and self.stage._thread.ident is None:
            self.stage.start()

    def _worker_synced(self) -> None:
        # On the worker that delivered the last initial sync, after it counts as synced:
        # readiness does not wait for what follows.
        if self._on_synced is not None and self.synced():
            try:
                self._on_synced()
            except Exception:  # noqa: BLE001 - the caller's failure: neither this plugin's sync nor a reason to skip the settle
                log.exception("bus.on_synced_failed")
        with self._settle_lock:
            if not self._settle_memory or self._settled or not self.synced():
                return
            self._settled = True
            gate = self._settle_after
            if gate is not None and not self._synchronous and not gate.is_set():
                # READY=1 is still on its way from another thread (the agent's setup() had not
                # ended when the last of the initial state was handed over): the settle waits
                # for it in a thread of its own, not in this worker, whose plugin gets its
                # events meanwhile (up to settle_wait: a second of a plugin's changes held back
                # before). Looked at, made and started under the lock join_settle reads
                # _settler under: a stop that sets the gate and then joins either finds this
                # thread or makes this worker settle itself (which the stop's join of the
                # workers waits for). Made outside it, a stop in between found no thread and
                # the settle ran after the plugins had stopped.
                self._settler = threading.Thread(target=self._settle_when_gate, name="kpr-bus-settle", daemon=True)
                self._settler.start()
                return
        self._settle()

    def _settle_when_gate(self) -> None:
        """The settle, once settle_after is set (READY=1 out, or the agent stopping), or after
        settle_wait seconds anyway (never lost, never waited for for good)."""
        assert self._settle_after is not None
        if not self._settle_after.wait(self._settle_wait):
            log.info("bus.settle_not_waited_for seconds=%.1f", self._settle_wait)
        try:
            self._settle()
        except Exception:  # noqa: BLE001 - no worker to fail: the heap stays as it is
            log.exception("event=bus_settle_failed")

    def _settle(self) -> None:
        # The writer's new backend identities (the whole initial sync's) go into its compact
        # table first: what they leave behind is then given back by the settle below, not
        # left scattered in the heap by the checker thread's move after it.
        # (in the writer's chunks: a change that comes meanwhile waits for one chunk, not all)
        writer = self.stage.writer if self.stage is not None else None
        compact = getattr(writer, "compact_ids", None)
        if compact is not None:
            try:
                compact(getattr(writer, "COMPACT_CHUNK", None))
            except Exception:  # noqa: BLE001 - the checker thread's move tries again
                log.exception("event=bus_compact_ids_failed")
        memory.settle()

    def _put(self, ev: Event) -> None:
        if self.stage is not None:
            self.stage.put(ev)
        else:
            for w in self.workers.values():
                w.put(ev)

    def changes(self, changes: Iterable[Service | ServiceKey]) -> None:
        """Upserts (a Service) and deletes (its ServiceKey) in order, queued at once: as many
        upsert() and delete() calls, with one hold of each queue's lock (the store's initial
        sync: 20k services)."""
        events = [Event(p, "delete", p) if type(p) is ServiceKey else Event(p.key, "upsert", p) for p in changes]
        if self.stage is not None:
            self.stage.put_many(events)
        else:
            for w in self.workers.values():
                w.put_many(events)

    def _fan_out(self, events: list[Event]) -> None:
        """The writer stage's output: events the maps now hold, to every plugin's worker."""
        for w in self.workers.values():
            w.put_many(events)

    def upsert(self, service: Service) -> None:
        self._put(Event(service.key, "upsert", service))

    def delete(self, key: ServiceKey) -> None:
        self._put(Event(key, "delete", key))

    def node_changed(self, node: NodeInfo) -> None:
        """New node facts; a barrier: everything queued after it reaches plugins after it."""
        self._put(Event(_NODE, "node", node))

    def pods_changed(self, pods: dict[str, tuple[str, ...]]) -> None:
        """The pods on this node (the whole set; a newer one replaces one not delivered yet)."""
        self._put(Event(_PODS, "pods", pods))

    def sync_complete(self) -> None:
        """Queue sync complete behind everything queued so far: the initial state."""
        self._put(Event(_SYNC, "sync", None))

    def resync(self, services: Iterable[Service]) -> None:
        """Level-based resync: hand every plugin every service again (handlers are idempotent)."""
        for s in services:
            self.upsert(s)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once the writer stage and every worker have nothing left to deliver."""
        deadline = time.monotonic() + timeout
        while True:
            # The stage first: what it hands on lands in the workers' queues before it is idle.
            if (self.stage is None or self.stage.idle()) and all(w.idle() for w in self.workers.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def synced(self) -> bool:
        return all(w.stats.synced for w in self.workers.values())

    def stats_of(self, name: str) -> tuple[WorkerStats, int] | None:
        """(delivery counters, events waiting) of a plugin's worker or of the writer stage."""
        if self.stage is not None and self.stage.name == name:
            return self.stage.stats, self.stage.pending_count()
        w = self.workers.get(name)
        return (w.stats, w.pending_count()) if w is not None else None

    def request_stop(self) -> None:
        """Tell the writer stage and every worker to stop after the hook they are in."""
        if self.stage is not None:
            self.stage.stop()
        for w in self.workers.values():
            w.stop()

    def join(self, name: str, timeout: float) -> bool:
        """Wait until the plugin's worker (or the writer stage, by its name) has left its
        hook and ended; False when it is still inside at the timeout."""
        if self.stage is not None and self.stage.name == name:
            return self.stage.join(timeout)
        w = self.workers.get(name)
        return w is None or w.join(timeout)

    def join_settle(self, timeout: float) -> bool:
        """Wait until a settle waiting for settle_after (set: the agent stops) has ended;
        False when it is still running at the timeout. A stop lets it finish before the
        plugins (the writer among them) stop, as the worker it once waited in did."""
        with self._settle_lock:  # (made and started under it: _worker_synced)
            t = self._settler
        if t is None:
            return True
        t.join(max(0.0, timeout))
        return not t.is_alive()

    def busy_hook(self, name: str) -> str | None:
        """The hook the plugin's worker (or the writer stage) is inside, if any."""
        if self.stage is not None and self.stage.name == name:
            return self.stage.busy_hook
        w = self.workers.get(name)
        return w.busy_hook if w is not None else None

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Stop every worker; returns the names of workers still busy at the deadline."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        names = ([self.stage.name] if self.stage is not None else []) + list(self.workers)
        busy = [n for n in names if not self.join(n, deadline - time.monotonic())]
        self.join_settle(deadline - time.monotonic())
        return busy
