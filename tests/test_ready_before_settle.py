"""READY=1 goes out from the bus worker that hands over the last of the initial state, before
the bus settles the heap (the writer's identities moved, a collection, malloc_trim): the main
loop, woken instead, waited for that settle to leave it the GIL (15-40 ms at 20k services)."""

from __future__ import annotations

import time

from kpr import daemon, hookimpl, memory
from kpr.daemon import Agent
from kpr.testing.agent import AgentConfig, run_agent_until
from kpr.testing.manifests import endpoint_slice, service, yaml_docs


class Plugin:
    @hookimpl
    def kpr_sync_complete(self):
        pass


def test_ready_is_sent_before_the_heap_is_settled(tmp_path, monkeypatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(daemon.sdnotify, "notify", sent.append)
    at_settle: list[bool] = []
    settle = memory.settle

    def settling() -> int:
        at_settle.append(any(m.startswith("READY=1") for m in sent))
        return settle()

    monkeypatch.setattr(memory, "settle", settling)
    cfg = AgentConfig(tmp_path, None)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    agent = Agent(cfg.parse(), internal_plugins={"p": Plugin()}, source_first=False)

    run_agent_until(agent, lambda: at_settle, "the bus's settle")
    assert at_settle == [True]
    assert sum(m.startswith("READY=1") for m in sent) == 1


def test_ready_is_sent_before_the_heap_is_settled_when_the_sync_beats_setup(tmp_path, monkeypatch) -> None:
    """The source's first pass may end, and the bus hand the initial state over, while setup()
    is still on its way out (a small state on a busy machine): READY=1 still goes out before
    the settle (setup() counted as done before the source starts, so the bus worker that
    hands over the last of the state finds nothing left to wait for)."""
    sent: list[str] = []
    monkeypatch.setattr(daemon.sdnotify, "notify", sent.append)
    at_settle: list[bool] = []
    settle = memory.settle

    def settling() -> int:
        at_settle.append(any(m.startswith("READY=1") for m in sent))
        return settle()

    monkeypatch.setattr(memory, "settle", settling)
    start_source = Agent._start_source

    def start_then_wait(self) -> None:
        start_source(self)
        # (what follows the source's start in setup() waits here until the bus has settled)
        deadline = time.monotonic() + 5
        while not at_settle and time.monotonic() < deadline:
            time.sleep(0.005)

    monkeypatch.setattr(Agent, "_start_source", start_then_wait)
    cfg = AgentConfig(tmp_path, None)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    agent = Agent(cfg.parse(), internal_plugins={"p": Plugin()}, source_first=False)

    run_agent_until(agent, lambda: at_settle, "the bus's settle")
    assert at_settle == [True]
    assert sum(m.startswith("READY=1") for m in sent) == 1
