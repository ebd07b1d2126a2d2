"""When READY=1 may go out besides the initial state being in place (kpr.daemon._check_ready):
only once setup() is done (the local API listening), never after STOPPING=1, and a failure to
send it is the agent's, not the plugin whose worker handed over the last of the initial state
(readiness is looked at on that worker, before the bus settles the heap)."""

from __future__ import annotations

import threading

from kpr import daemon, hookimpl, memory
from kpr.daemon import Agent
from kpr.testing.agent import AgentConfig, run_agent_until
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for


class Plugin:
    @hookimpl
    def kpr_sync_complete(self):
        pass


def _config(tmp_path) -> AgentConfig:
    cfg = AgentConfig(tmp_path, None)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    return cfg


def _ready(sent: list[str]) -> bool:
    return any(m.startswith("READY=1") for m in sent)


def _settles(monkeypatch) -> list[bool]:
    """The bus's settles, recorded (and not run: the test process's heap is left unfrozen)."""
    settled: list[bool] = []
    monkeypatch.setattr(memory, "settle", lambda: (settled.append(True), 0)[1])
    return settled


def test_ready_waits_for_the_api_when_the_sync_ends_during_setup(tmp_path, monkeypatch) -> None:
    # The source's first pass beside the plugins' start: the workers, started in setup()
    # (bus.start), hand over the initial state while setup() still makes the local API.
    sent: list[str] = []
    monkeypatch.setattr(daemon.sdnotify, "notify", sent.append)
    settled = _settles(monkeypatch)
    at_api: list[bool] = []
    real = daemon.ApiServer

    def api_server(*a, **kw):
        # The bus settles right after its last worker looked at readiness: by then a READY=1
        # from that worker has gone out.
        wait_for(lambda: settled, what="the initial state handed over and the bus's settle")
        at_api.append(_ready(sent))
        return real(*a, **kw)

    monkeypatch.setattr(daemon, "ApiServer", api_server)
    agent = Agent(_config(tmp_path).parse(), internal_plugins={"p": Plugin()}, source_first=True)
    run_agent_until(agent, lambda: _ready(sent), "ready, from the end of setup()")
    assert at_api == [False], "READY=1 was sent before the local API was made"
    assert sum(m.startswith("READY=1") for m in sent) == 1


class SyncUntilStopping:
    """Still in kpr_sync_complete when the agent is told to stop; leaves once STOPPING=1 is out."""

    def __init__(self, sent: list[str]):
        self.sent, self.entered = sent, threading.Event()

    @hookimpl
    def kpr_sync_complete(self):
        self.entered.set()
        wait_for(lambda: "STOPPING=1" in self.sent, what="STOPPING=1")


def test_ready_never_follows_stopping(tmp_path, monkeypatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(daemon.sdnotify, "notify", sent.append)
    _settles(monkeypatch)
    plugin = SyncUntilStopping(sent)
    agent = Agent(_config(tmp_path).parse(), internal_plugins={"p": plugin}, source_first=False)
    # (run() returns after shutdown has joined the worker: its look at readiness is over)
    run_agent_until(agent, plugin.entered.is_set, "the plugin in kpr_sync_complete")
    assert sent == ["STOPPING=1"]


def test_ready_notify_failing_is_the_agents(tmp_path, monkeypatch, caplog) -> None:
    tried: list[str] = []

    def notify(message: str) -> bool:  # $NOTIFY_SOCKET set, nobody listening any more
        tried.append(message)
        if message.startswith("READY=1"):
            raise ConnectionRefusedError("notify socket gone")
        return True

    monkeypatch.setattr(daemon.sdnotify, "notify", notify)
    settled = _settles(monkeypatch)
    agent = Agent(_config(tmp_path).parse(), internal_plugins={"p": Plugin()}, source_first=False)
    code = run_agent_until(agent, lambda: _ready(tried), "READY=1 tried")
    stats, _ = agent.bus.stats_of("p")
    assert stats.errors == 0, f"the plugin is blamed: {stats.last_error}"
    assert settled == [True]  # (run() returned after shutdown joined the workers)
    # The agent stops itself through its shutdown (systemd would never hear it is ready).
    assert "agent.notify_failed message=READY=1" in caplog.text
    assert tried.count("STOPPING=1") == 1 and code == 1
