"""kpr.testing.agent.running_agent(netns=...): the agent runs in the node's namespace from its
set-up to its shutdown; its plugins' kpr_stop, which shutdown() calls from threads of its own,
runs there as their kpr_start did (else a plugin stopping by device name would act on the
machine's own devices)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kpr import hookimpl
from kpr.testing.agent import AgentConfig, running_agent
from kpr.testing.netns import Topology

pytestmark = pytest.mark.kernel


def _netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


class WhereHooksRun:
    """A plugin that notes the network namespace its start and stop hooks run in."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    @hookimpl
    def kpr_start(self, context: Any) -> None:
        self.seen["start"] = _netns_ino()

    @hookimpl
    def kpr_stop(self, context: Any) -> None:
        self.seen["stop"] = _netns_ino()


def test_the_agent_starts_and_stops_its_plugins_in_its_namespace(tmp_path: Path, topology: Topology) -> None:
    node = topology.add_node("node")
    node_ino = os.stat(node.path).st_ino
    assert node_ino != _netns_ino()
    where = WhereHooksRun()
    with running_agent(AgentConfig(tmp_path, None), internal_plugins={"where": where}, netns=node):
        assert where.seen == {"start": node_ino}
    assert where.seen == {"start": node_ino, "stop": node_ino}
