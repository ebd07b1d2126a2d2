"""With the source's first pass beside the plugins' start, the writer stage starts with the
writer: a pass that ends while a plugin is still starting (socklb's compile and attach) has
its initial state written into the maps meanwhile, while no plugin is handed anything and
the agent is not ready before every plugin has started. A plugin's start that fails after
the stage started stops it: setup names the plugin and nothing was delivered."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpr import hookimpl
from kpr.daemon import Agent, PluginError
from kpr.testing.agent import AgentConfig
from kpr.testing.bus import HookCalls
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel


class LastToStart(HookCalls):
    """Needs the service maps and starts without the source (as socklb); its start waits until
    the writer has the initial state in the maps (or gives up after `patience` s), recording
    what it saw; it records every hook."""

    starts_without_source = True

    def __init__(self, box: list, patience: float = 15.0, fail: bool = False):
        self.box = box
        self.patience = patience
        self.fail = fail
        self.calls: list[str] = []
        self.written_in_start: bool | None = None
        self.ready_in_start: bool | None = None

    @hookimpl
    def kpr_requires(self) -> list[str]:
        return ["servicemaps"]

    @hookimpl
    def kpr_start(self, context):
        agent = self.box[0]
        writer = agent.kpm.facility("servicemaps").plugin
        try:
            wait_for(lambda: writer.initial_written, timeout=self.patience, what="the initial state in the maps")
            self.written_in_start = True
        except AssertionError:
            self.written_in_start = False
        self.ready_in_start = agent._ready_sent
        self.calls.append("kpr_start")
        if self.fail:
            raise RuntimeError("cannot attach")


def _agent(tmp_path: Path, pin: Path, plugin: LastToStart) -> Agent:
    cfg = AgentConfig(tmp_path, pin)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    agent = Agent(cfg.parse(), internal_plugins={"last": plugin}, source_first=True)
    plugin.box.append(agent)
    return agent


def test_the_initial_state_is_written_while_the_last_plugin_starts(tmp_path, pin_dir):
    last = LastToStart([])
    agent = _agent(tmp_path, pin_dir, last)
    try:
        agent.setup()
        assert last.written_in_start is True, "the initial state waited for every plugin's start"
        assert last.ready_in_start is False
        assert last.calls[0] == "kpr_start", "a plugin was handed something before its start returned"
        wait_for(lambda: "kpr_sync_complete" in last.calls, what="the initial state delivered")
        wait_for(lambda: (agent._tick(), agent._ready_sent)[1], what="ready")
    finally:
        agent.shutdown()


def test_a_start_failing_after_the_stage_started(tmp_path, pin_dir):
    last = LastToStart([], fail=True)
    agent = _agent(tmp_path, pin_dir, last)
    try:
        with pytest.raises(PluginError, match="plugin last: start failed"):
            agent.setup()
        assert last.written_in_start is True
        assert last.calls == ["kpr_start"]
        assert agent.bus.join("servicemaps", 10), "the writer stage still runs after the failed start"
    finally:
        agent.shutdown()
    assert last.calls == ["kpr_start"]
