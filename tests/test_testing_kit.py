"""The testing kit's root-free parts (kpr.testing.agent, .manifests, .harness without maps):
what the kernel tests and plugin authors build on."""

from __future__ import annotations

import json

import yaml

from kpr.model import NodeInfo
from kpr.testing.agent import AgentConfig
from kpr.testing.harness import PluginHarness
from kpr.testing.manifests import endpoint_slice, service, yaml_docs


class Recorder:
    """A plugin that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def kpr_configure(self, config, context) -> None:
        self.seen.append(("configure", config, context.name))

    def kpr_start(self, context) -> None:
        self.seen.append(("start",))

    def kpr_service_upsert(self, service) -> None:
        self.seen.append(("upsert", service))

    def kpr_service_delete(self, key, generation) -> None:
        self.seen.append(("delete", str(key), generation))

    def kpr_stop(self, context) -> None:
        self.seen.append(("stop",))


def test_agent_config_paths_are_the_tests_own(tmp_path):
    cfg = AgentConfig(tmp_path, tmp_path / "pins", poll_interval=None,
                      extra={"bpf": {"mapSizes": {"kprSvc": 1024}}}).plugin("socklb", cgroupPath="/x")
    doc = json.loads(cfg.text())
    assert doc["api"]["socket"] == str(tmp_path / "kpr.sock") and doc["agent"]["stateDir"] == str(tmp_path / "state")
    assert doc["source"] == {"kind": "files", "path": str(tmp_path / "manifests"), "statePath": str(tmp_path / "alloc.json")}
    assert doc["bpf"] == {"pinPath": str(tmp_path / "pins"), "mapSizes": {"kprSvc": 1024}}, "extra merges into a section"
    assert doc["plugins"] == {"socklb": {"enabled": True, "cgroupPath": "/x"}}
    assert doc["metrics"] == {"address": ""}
    parsed = cfg.parse()
    assert parsed.bpf.pin_path == tmp_path / "pins"
    assert "bpf" not in AgentConfig(tmp_path, None).document()


def test_manifests_reach_a_plugin_through_the_agents_store():
    text = yaml_docs(service("web", cluster_ip="10.96.0.10", port_name="http"),
                     endpoint_slice("web", ["10.244.1.5", ("10.244.2.5", "node2")], port_name="http", ready=True))
    rec = Recorder()
    with PluginHarness(NodeInfo("node1", addresses=("10.0.0.1",))) as h:
        h.start(rec, {"enabled": True}, name="rec")
        h.feed(*yaml.safe_load_all(text))
        [(_, svc)] = [e for e in rec.seen if e[0] == "upsert"]
        [fe] = [f for f in svc.frontends if f.address == "10.96.0.10"]
        assert (fe.port, sorted((b.address, b.port, b.local) for b in fe.backends)) == (
            80, [("10.244.1.5", 8080, True), ("10.244.2.5", 8080, False)])
        h.delete(svc.key)
    assert rec.seen[0][0] == "configure" and rec.seen[0][2] == "rec"
    assert rec.seen[-2:] == [("delete", "default/web", 0), ("stop",)], "generation 0 without a writer"
