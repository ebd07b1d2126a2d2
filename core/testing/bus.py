"""What the event bus's tests share (tests/test_bus.py, tests/test_bus_batches.py): a service,
a Recorder standing in for a plugin's hook invoker, and a bus with Recorders for plugins."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kpr import hookimpl
from kpr.bus import Backoff, EventBus
from kpr.model import Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey

__all__ = ["HookCalls", "Recorder", "make_bus", "svc"]


def svc(name: str, port: int = 80) -> Service:
    return Service(ServiceKey("default", name), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", port, Protocol.TCP),))


class Recorder:
    """Stands in for a plugin's hook invoker: records calls, can block or fail on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        # set once a delivery has begun: a test that holds the gate waits for this, not a sleep
        self.entered = threading.Event()
        self.fail_times: dict[str, int] = {}
        self.generations: list[Any] = []

    def __call__(self, hook: str, **kw: Any) -> None:
        self.entered.set()
        self.gate.wait(5)
        arg = kw.get("service") or kw.get("key") or kw.get("node")
        label = str(arg.key) if isinstance(arg, Service) else str(arg) if arg is not None else ""
        if self.fail_times.get(label, 0) > 0:
            self.fail_times[label] -= 1
            raise RuntimeError(f"boom {label}")
        self.calls.append((hook, arg))
        self.generations.append(kw.get("generation"))

    def order(self) -> list[str]:
        """Each call as "hook:label" (a service's label has its first port: web@80)."""
        out = []
        for hook, arg in self.calls:
            if isinstance(arg, Service):
                out.append(f"{hook}:{arg.key.name}@{arg.frontends[0].port}")
            elif isinstance(arg, NodeInfo):
                out.append(f"{hook}:{','.join(arg.addresses)}")
            else:
                out.append(f"{hook}:{arg}")
        return out


def make_bus(*names: str, on_event: Callable[..., Any] | None = None) -> tuple[EventBus, dict[str, Recorder]]:
    """A bus with quick retries and one Recorder per plugin name (on_event: the bus's metrics hook)."""
    bus = EventBus(backoff=Backoff(initial=0.01, maximum=0.05), on_event=on_event)
    recs = {n: Recorder() for n in names}
    for n, r in recs.items():
        bus.add_plugin(n, r)
    return bus, recs


class HookCalls:
    """A plugin mixin: the names of the service hooks called on it, in order, in `calls`
    (which the plugin's own hooks may add to)."""

    calls: list[str]

    @hookimpl
    def kpr_service_upsert(self, service: Any) -> None:
        self.calls.append("kpr_service_upsert")

    @hookimpl
    def kpr_sync_complete(self) -> None:
        self.calls.append("kpr_sync_complete")
