"""A stop lets the bus's settle end first (EventBus.join_settle): the settle that waited for
READY=1 (kpr.bus settle_after) in its own thread runs once the agent stops, and must be over
before the plugins, the service map writer among them, stop (it compacts the writer's ids).
Each test holds the settle on an Event of its own and lets it go only once the stop is seen
waiting in join_settle: without that join the plugins stop (or EventBus.stop returns) while
the settle is still held, and the test fails, whatever the timing. And the settle's thread is
made under the lock join_settle reads it under: a stop between the decision to wait and the
thread's start no longer finds nothing to join."""

from __future__ import annotations

import sys
import threading

import pytest

from kpr import daemon, hookimpl, memory
from kpr.bus import EventBus
from kpr.daemon import Agent
from kpr.model import PluginStatus
from kpr.testing.agent import AgentConfig, run_agent_until
from kpr.testing.bus import Recorder
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

SETTLER = "kpr-bus-settle"  # the settle's thread's name (README)


class HeldSettle:
    """memory.settle replaced by one that waits for `release` (set by the test), recording
    that it began and ended."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.release, self.ended = threading.Event(), threading.Event(), threading.Event()
        monkeypatch.setattr(memory, "settle", self._settle)

    def _settle(self) -> int:
        self.entered.set()
        self.release.wait(60)
        self.ended.set()
        return 0


def _inside(thread: threading.Thread, function: str) -> bool:
    """Whether `thread` is running `function` now (anywhere in its stack)."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _release_when(held: HeldSettle, ready: object) -> threading.Thread:
    """A thread that lets the held settle go once `ready()` holds."""

    def run() -> None:
        try:
            wait_for(ready, timeout=30, what="the stop waiting in join_settle, or gone past it")
        finally:
            held.release.set()

    t = threading.Thread(target=run, name="test-release-settle", daemon=True)
    t.start()
    return t


def test_the_bus_s_stop_returns_once_the_settle_has_ended(monkeypatch) -> None:
    held = HeldSettle(monkeypatch)
    gate = threading.Event()
    bus = EventBus(settle_memory=True, settle_after=gate, settle_wait=600.0)
    bus.add_plugin("p", Recorder())
    bus.start()
    main, returned = threading.current_thread(), threading.Event()
    try:
        bus.sync_complete()
        wait_for(lambda: any(t.name == SETTLER for t in threading.enumerate()), what="the settle waiting for the gate")
        gate.set()  # (as the agent's stop does)
        assert held.entered.wait(10), "the settle began"
        releaser = _release_when(held, lambda: _inside(main, "join_settle") or returned.is_set())
        bus.stop()
        ended_at_return = held.ended.is_set()
        returned.set()
        releaser.join(30)
    finally:
        gate.set()
        held.release.set()
    assert ended_at_return, "EventBus.stop returned while the settle still ran"


class NeverInPlace:
    """A plugin whose initial state is never in place: READY=1 never comes, the settle waits
    for the gate until the agent stops. Its kpr_stop records whether the settle had ended."""

    def __init__(self, held: HeldSettle) -> None:
        self.held = held
        self.stopped = threading.Event()
        self.settle_ended_at_stop: list[bool] = []

    @hookimpl
    def kpr_sync_complete(self) -> None:
        pass

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        return PluginStatus(details={"synced": False})

    @hookimpl
    def kpr_stop(self) -> None:
        self.settle_ended_at_stop.append(self.held.ended.is_set())
        self.stopped.set()


def test_the_agent_stops_its_plugins_once_the_settle_has_ended(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(daemon, "SETTLE_WAIT", 600.0)  # (only the stop ends the wait)
    held = HeldSettle(monkeypatch)
    plugin = NeverInPlace(held)
    cfg = AgentConfig(tmp_path, None, shutdown_timeout=10)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    agent = Agent(cfg.parse(), internal_plugins={"p": plugin}, source_first=True)
    main = threading.current_thread()
    releaser = _release_when(held, lambda: _inside(main, "join_settle") or plugin.stopped.is_set())
    try:
        code = run_agent_until(
            agent, lambda: any(t.name == SETTLER for t in threading.enumerate()), "the settle waiting for READY=1"
        )
    finally:
        held.release.set()
        releaser.join(30)
    assert held.entered.is_set() and held.ended.is_set()
    assert plugin.settle_ended_at_stop == [True], "a plugin stopped while the settle still ran"
    assert code == 0


def test_a_stop_while_the_settle_s_thread_is_being_made_waits_for_it(monkeypatch) -> None:
    """The worker that handed over the last of the initial state decides the settle waits and
    makes its thread; a stop (the gate set, join_settle) meanwhile used to find no thread yet
    and return at once, the settle running after the plugins had stopped. The thread's
    construction is held here until the join has had its chance to return early: a join that
    is slow to get going only lets the old code pass, never fails the fixed one."""
    settled: list[bool] = []
    monkeypatch.setattr(memory, "settle", lambda: (settled.append(True), 0)[1])
    making, proceed = threading.Event(), threading.Event()
    real_thread = threading.Thread

    class SlowToMake(real_thread):  # type: ignore[misc,valid-type]
        def __init__(self, *a, **kw) -> None:
            if kw.get("name") == SETTLER:
                making.set()
                proceed.wait(30)
            super().__init__(*a, **kw)

    monkeypatch.setattr(threading, "Thread", SlowToMake)
    gate = threading.Event()
    bus = EventBus(settle_memory=True, settle_after=gate, settle_wait=600.0)
    bus.add_plugin("p", Recorder())
    bus.start()
    joined: list[tuple[bool, bool]] = []
    try:
        bus.sync_complete()
        assert making.wait(10), "the settle's thread being made"
        gate.set()  # the agent's stop: the gate, then the join
        joiner = real_thread(target=lambda: joined.append((bus.join_settle(30), bool(settled))), daemon=True)
        joiner.start()
        joiner.join(0.5)  # (the old code's join returns here, nothing to wait for found)
        proceed.set()
        joiner.join(30)
    finally:
        proceed.set()
        gate.set()
        monkeypatch.undo()
        bus.stop()
    assert joined == [(True, True)], "join_settle returned before the settle had run"
