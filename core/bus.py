"""The event bus: delivers service and node events to each enabled plugin.

Each plugin has its own worker thread and queue, so a slow or failing plugin never holds up
the others. The queue is keyed by service: a burst of changes to one service collapses into
its latest state (level-triggered), and one worker per plugin means calls for a service never
overlap. A failed delivery is retried with exponential backoff until it succeeds or a newer
state replaces it.

An agent's bus also tends the process's memory (kpr.memory): it gives back what the plugins'
BPF compiles freed when it starts, and settles the heap once the initial state has reached
every plugin, the agent's one big burst of allocations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import memory
from .model import NodeInfo, Service, ServiceKey

log = logging.getLogger(__name__)

# Sentinel queue keys; services use their ServiceKey.
_SYNC = ("__sync__",)
_NODE = ("__node__",)
_PODS = ("__pods__",)


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


class PluginWorker:
    def __init__(
        self,
        name: str,
        invoke: Invoker,
        backoff: Backoff,
        on_event: Callable[[str, str, bool], None] | None = None,
        on_synced: Callable[[], None] | None = None,
    ):
        self.name = name
        self._invoke = invoke
        self._backoff = backoff
        self._on_event = on_event
        self._on_synced = on_synced
        self._cond = threading.Condition()
        self._pending: OrderedDict[Any, tuple[str, Any]] = OrderedDict()
        # key -> (due monotonic time, attempt number, (event, payload))
        self._retry: dict[Any, tuple[float, int, tuple[str, Any]]] = {}
        self._busy_key: Any = None
        self._stopping = False
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._loop, name=f"kpr-bus-{name}", daemon=True)

    # --- producer side -------------------------------------------------------------------

    def put(self, key: Any, event: str, payload: Any) -> None:
        with self._cond:
            self._retry.pop(key, None)
            self._pending[key] = (event, payload)
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._retry and self._busy_key is None

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._retry)

    # --- worker side ---------------------------------------------------------------------

    def _next(self) -> tuple[Any, str, Any, int] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._pending:
                    key, (event, payload) = self._pending.popitem(last=False)
                    if not self._pending:
                        # A dict never shrinks: after an initial sync's burst, a small one.
                        self._pending = OrderedDict()
                    self._busy_key = key
                    return key, event, payload, 0
                now = time.monotonic()
                due = [(t, k) for k, (t, _, _) in self._retry.items()]
                if due:
                    t, key = min(due, key=lambda x: x[0])
                    if t <= now:
                        _, attempt, (event, payload) = self._retry.pop(key)
                        self._busy_key = key
                        return key, event, payload, attempt
                    self._cond.wait(t - now)
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            key, event, payload, attempt = item
            ok = self._deliver(key, event, payload, attempt)
            with self._cond:
                self._busy_key = None
                if not ok and key not in self._pending and not self._stopping:
                    attempt += 1
                    delay = self._backoff.delay(attempt)
                    self._retry[key] = (time.monotonic() + delay, attempt, (event, payload))
                    self.stats.retries += 1
                    log.info("bus.retry plugin=%s key=%s attempt=%d delay=%.2f", self.name, _show(key), attempt, delay)

    def _deliver(self, key: Any, event: str, payload: Any, attempt: int) -> bool:
        try:
            if event == "upsert":
                self._invoke("kpr_service_upsert", service=payload)
            elif event == "delete":
                self._invoke("kpr_service_delete", key=payload)
            elif event == "node":
                self._invoke("kpr_node_changed", node=payload)
            elif event == "pods":
                self._invoke("kpr_pods_changed", pods=payload)
            elif event == "sync":
                self._invoke("kpr_sync_complete")
                self._synced()
        except Exception as e:  # a plugin's bug must not stop the agent or the other plugins
            self.stats.errors += 1
            self.stats.last_error = f"{event} {_show(key)}: {type(e).__name__}: {e}"
            self.stats.failing[_show(key)] = f"{type(e).__name__}: {e}"
            log.error("bus.error plugin=%s event=%s key=%s attempt=%d error=%r", self.name, event, _show(key), attempt, e, exc_info=True)
            if self._on_event:
                self._on_event(self.name, event, False)
            if event == "sync":
                # The initial state was handed over; the plugin's failure is its own.
                self._synced()
                return True
            return False
        self.stats.delivered += 1
        self.stats.failing.pop(_show(key), None)
        if self._on_event:
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
    """Fan-out of service events to one worker per plugin."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        on_event: Callable[[str, str, bool], None] | None = None,
        settle_memory: bool = False,
    ):
        """`settle_memory`: settle the process's memory once every plugin has the initial
        state (an agent's bus; tests sharing a process with many buses leave it off)."""
        self._backoff = backoff or Backoff()
        self._on_event = on_event
        self._settle_memory = settle_memory
        self._settled = False
        self._settle_lock = threading.Lock()
        self.workers: dict[str, PluginWorker] = {}
        self._started = False

    def add_plugin(self, name: str, invoke: Invoker) -> None:
        if self._started:
            raise RuntimeError("plugins must be added before the bus starts")
        self.workers[name] = PluginWorker(name, invoke, self._backoff, self._on_event, self._worker_synced)

    def start(self) -> None:
        self._started = True
        if self._settle_memory:
            # The plugins have started: what compiling their BPF code freed goes back to the
            # system before the initial state comes in (it is not pymalloc's to reuse).
            memory.trim()
        for w in self.workers.values():
            w.start()

    def _worker_synced(self) -> None:
        # On the worker that delivered the last initial sync, after it counts as synced:
        # readiness does not wait for this.
        with self._settle_lock:
            if not self._settle_memory or self._settled or not self.synced():
                return
            self._settled = True
        memory.settle()

    def upsert(self, service: Service) -> None:
        for w in self.workers.values():
            w.put(service.key, "upsert", service)

    def delete(self, key: ServiceKey) -> None:
        for w in self.workers.values():
            w.put(key, "delete", key)

    def node_changed(self, node: NodeInfo) -> None:
        for w in self.workers.values():
            w.put(_NODE, "node", node)

    def pods_changed(self, pods: dict[str, tuple[str, ...]]) -> None:
        """The pods on this node (the whole set; a newer one replaces one not delivered yet)."""
        for w in self.workers.values():
            w.put(_PODS, "pods", pods)

    def sync_complete(self) -> None:
        """Queue sync complete behind everything queued so far: the initial state."""
        for w in self.workers.values():
            w.put(_SYNC, "sync", None)

    def resync(self, services: Iterable[Service]) -> None:
        """Level-based resync: hand every plugin every service again (handlers are idempotent)."""
        for s in services:
            self.upsert(s)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(w.idle() for w in self.workers.values()):
                return True
            time.sleep(0.005)
        return False

    def synced(self) -> bool:
        return all(w.stats.synced for w in self.workers.values())

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Stop every worker; returns the names of workers still busy at the deadline."""
        for w in self.workers.values():
            w.stop()
        deadline = time.monotonic() + timeout
        stuck = []
        for w in self.workers.values():
            if not w.join(max(0.0, deadline - time.monotonic())):
                stuck.append(w.name)
        return stuck
