"""READY=1 goes out before the bus settles the heap (the writer's identities moved, a collection,
malloc_trim): the settle held the GIL 15-40 ms at 20k services, on the way to ready. From the
bus worker that hands over the last of the initial state when setup() has ended; with the
first pass beside the plugins' start (early: the production default) the state is handed over
during setup(), READY=1 comes from the main thread at its end, and the settle waits for it
(kpr.bus settle_after, set by the agent after READY=1 or once it stops)."""

from __future__ import annotations

import time

import pytest

from kpr import daemon, hookimpl, memory
from kpr.daemon import Agent
from kpr.model import PluginStatus
from kpr.testing.agent import AgentConfig, run_agent_until
from kpr.testing.manifests import endpoint_slice, service, yaml_docs


class Plugin:
    never_in_place = False

    @hookimpl
    def kpr_sync_complete(self):
        pass

    @hookimpl
    def kpr_status(self):
        return PluginStatus(details={"synced": False}) if self.never_in_place else None


class Settles:
    """What sd_notify was sent, and at each settle of the heap whether READY=1 was out."""

    def __init__(self, monkeypatch) -> None:
        self.sent: list[str] = []
        self.at_settle: list[bool] = []
        monkeypatch.setattr(daemon.sdnotify, "notify", self.sent.append)
        settle = memory.settle

        def settling() -> int:
            self.at_settle.append(self.ready_sent() > 0)
            return settle()

        monkeypatch.setattr(memory, "settle", settling)

    def ready_sent(self) -> int:
        return sum(m.startswith("READY=1") for m in self.sent)


@pytest.fixture
def settles(monkeypatch) -> Settles:
    return Settles(monkeypatch)


def _agent(tmp_path, source_first: bool, plugin: Plugin | None = None, **kw) -> Agent:
    cfg = AgentConfig(tmp_path, None, **kw)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    return Agent(cfg.parse(), internal_plugins={"p": plugin or Plugin()}, source_first=source_first)


@pytest.mark.parametrize("source_first", [False, True], ids=["pass_after_start", "pass_beside_start"])
def test_ready_is_sent_before_the_heap_is_settled(tmp_path, settles, source_first) -> None:
    agent = _agent(tmp_path, source_first)
    run_agent_until(agent, lambda: settles.at_settle, "the bus's settle")
    assert settles.at_settle == [True]
    assert settles.ready_sent() == 1


def test_ready_is_sent_before_the_heap_is_settled_when_the_sync_beats_setup(tmp_path, monkeypatch, settles) -> None:
    """The source's first pass may end, and the bus hand the initial state over, while setup()
    is still on its way out (a small state on a busy machine): READY=1 still goes out before
    the settle (setup() counted as done before the source starts, so the bus worker that
    hands over the last of the state finds nothing left to wait for)."""
    start_source = Agent._start_source

    def start_then_wait(self) -> None:
        start_source(self)
        # (what follows the source's start in setup() waits here until the bus has settled)
        deadline = time.monotonic() + 5
        while not settles.at_settle and time.monotonic() < deadline:
            time.sleep(0.005)

    monkeypatch.setattr(Agent, "_start_source", start_then_wait)
    run_agent_until(_agent(tmp_path, False), lambda: settles.at_settle, "the bus's settle")
    assert settles.at_settle == [True]
    assert settles.ready_sent() == 1


def test_a_stop_before_ready_lets_the_waiting_settle_go_on(tmp_path, monkeypatch, settles) -> None:
    """A plugin never in place: the bus has handed the state over and its settle waits for a
    READY=1 that never comes. The agent's stop lets it go on (the settle is not lost), and the
    bus worker leaves in time: the stop is clean, not one that waited out the worker."""
    monkeypatch.setattr(daemon, "SETTLE_WAIT", 600.0)  # (only the stop may end the wait)
    plugin = Plugin()
    plugin.never_in_place = True
    agent = _agent(tmp_path, True, plugin, shutdown_timeout=2)
    code = run_agent_until(agent, lambda: agent.bus.synced(), "the initial state handed over")
    assert code == 0
    assert settles.at_settle == [False]
    assert settles.ready_sent() == 0
