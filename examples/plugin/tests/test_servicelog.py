"""kpr-servicelog tested with kpr's testing kit (kpr.testing): the plugin driven as the agent
drives it (kpr.testing.harness), beside the real service maps where the machine allows, and
inside a real agent (kpr.testing.agent)."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from kpr.model import Backend, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.testing.agent import AgentConfig, running_agent
from kpr.testing.harness import plugin_harness
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for
from kpr_servicelog import ServiceLog

NODE = NodeInfo("node1", addresses=("10.0.0.1",))
WEB = Service(ServiceKey("default", "web"), (
    Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", 80, Protocol.TCP,
             (Backend("10.244.1.5", 8080), Backend("10.244.1.6", 8080))),
))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_change_is_one_line_in_order(tmp_path):
    log = tmp_path / "log" / "services.jsonl"
    with plugin_harness("kpr-servicelog", NODE, writer=False) as h:  # no maps: runs without root
        plugin = h.start(ServiceLog(), {"path": str(log)}, name="servicelog")
        h.apply(WEB)
        h.sync_complete()
        h.delete(WEB.key)
        assert plugin.kpr_status().counters == {"events": 4}
    assert [r["event"] for r in records(log)] == ["start", "upsert", "synced", "delete", "stop"]
    upsert = records(log)[1]
    assert upsert["service"] == "default/web"
    assert upsert["frontends"] == [{"type": "ClusterIP", "address": "10.96.0.10", "port": 80, "protocol": "TCP",
                                    "backends": ["10.244.1.5:8080", "10.244.1.6:8080"]}]


def test_without_backends(tmp_path):
    log = tmp_path / "services.jsonl"
    with plugin_harness("kpr-servicelog", NODE, writer=False) as h:
        h.start(ServiceLog(), {"path": str(log), "withBackends": False}, name="servicelog")
        h.apply(WEB)
    assert "backends" not in records(log)[1]["frontends"][0]


def test_a_bad_key_is_refused_by_name(tmp_path):
    with plugin_harness("kpr-servicelog", NODE, writer=False) as h:
        with pytest.raises(pydantic.ValidationError, match="withBackends"):
            h.start(ServiceLog(), {"path": str(tmp_path / "x"), "withBackends": "sometimes"}, name="servicelog")


@pytest.mark.kernel
def test_it_logs_what_the_maps_hold(harness, tmp_path):
    """With the real service map writer (BPF maps in a scratch pin directory): the backends
    logged are the ones the maps send the frontend to."""
    log = tmp_path / "services.jsonl"
    harness.start(ServiceLog(), {"path": str(log)}, name="servicelog")
    harness.apply(WEB)
    in_maps = harness.writer.read_back()["frontends"]["10.96.0.10:80/TCP external"]["backends"]
    assert sorted(in_maps) == records(log)[1]["frontends"][0]["backends"]
    harness.delete(WEB.key)
    assert harness.writer.read_back()["frontends"] == {}
    assert records(log)[-1] == {"event": "delete", "service": "default/web"}


def test_inside_an_agent_from_a_manifest(tmp_path):
    """A whole agent in this process (files source, the plugin loaded beside kpr's own): a
    manifest written to its directory reaches the log, translated by kpr."""
    log = tmp_path / "services.jsonl"
    cfg = AgentConfig(tmp_path / "agent", None).plugin("servicelog", path=str(log))
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    with running_agent(cfg, internal_plugins={"servicelog": ServiceLog()}):
        wait_for(lambda: log.exists() and any(r["event"] == "synced" for r in records(log)), 15, "the agent's sync")
    upserts = [r for r in records(log) if r["event"] == "upsert"]
    assert [u["service"] for u in upserts] == ["default/web"]
    assert upserts[0]["frontends"][0]["backends"] == ["10.244.1.5:8080"]
