"""The testing kit's root-free parts (kpr.testing.agent, .manifests, .harness without maps):
what the kernel tests and plugin authors build on."""

from __future__ import annotations

import json

import yaml

from kpr import hookimpl
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

    @hookimpl
    def kpr_service_upsert(self, service) -> None:
        self.seen.append(("upsert", service))

    @hookimpl
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


class Shared:
    """A core facility as kpr.pluginmanager.FACILITIES makes them (one per agent)."""

    def __init__(self, config, log: list) -> None:
        self.sections = dict(config.plugin_sections)
        self.log = log

    @hookimpl
    def kpr_start(self, context) -> None:
        self.log.append(("fac start", context.name))

    @hookimpl
    def kpr_service_upsert(self, service) -> None:
        self.log.append(("fac upsert", str(service.key)))

    @hookimpl
    def kpr_node_changed(self, node) -> None:
        self.log.append(("fac node", node.addresses))

    @hookimpl
    def kpr_stop(self, context) -> None:
        self.log.append(("fac stop",))


class Needy:
    """A plugin that asks for the facility, as the NodePort plugins ask for "nodeport"."""

    def __init__(self, log: list, tag: str) -> None:
        self.log, self.tag = log, tag

    @hookimpl
    def kpr_requires(self) -> list[str]:
        return ["shared"]

    def kpr_configure(self, config, context) -> None:
        pass

    def kpr_start(self, context) -> None:
        self.log.append((f"{self.tag} start",))

    @hookimpl
    def kpr_service_upsert(self, service) -> None:
        self.log.append((f"{self.tag} upsert", str(service.key)))

    def kpr_service_delete(self, key) -> None:  # not a hook implementation: the agent never calls it
        self.log.append((f"{self.tag} delete", str(key)))

    @hookimpl
    def kpr_node_changed(self, node) -> None:
        self.log.append((f"{self.tag} node", node.addresses))

    def kpr_stop(self, context) -> None:
        self.log.append((f"{self.tag} stop",))


def test_the_harness_runs_the_facilities_a_plugin_requires_as_the_agent_does(monkeypatch):
    """Facilities come from kpr.pluginmanager.FACILITIES, start before the plugin (with what was
    applied before them), get every change first, and stop after the last plugin needing them;
    only @hookimpl methods are called, through the agent's synchronous bus."""
    from kpr import pluginmanager
    from kpr.model import Frontend, FrontendType, Protocol, Service, ServiceKey

    log: list = []
    made: list[Shared] = []
    monkeypatch.setitem(pluginmanager.FACILITIES, "shared", lambda config: made.append(Shared(config, log)) or made[-1])
    svc = Service(ServiceKey("default", "web"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.1", 80, Protocol.TCP),))
    with PluginHarness(NodeInfo("node1", addresses=("10.0.0.1",))) as h:
        h.apply(svc)  # before any plugin: the facility gets it when it starts
        a = h.start(Needy(log, "a"), name="a")
        assert log == [("fac start", "shared"), ("fac upsert", "default/web"), ("a start",)]
        assert list(made[0].sections) == ["a"], "the requiring plugin's section, as the plugin manager gives it"
        b = h.start(Needy(log, "b"), name="b")
        assert len(made) == 1, "one facility for both"
        del log[:]
        h.node_changed(NodeInfo("node1", addresses=("10.0.0.2",)))
        h.apply(svc)
        h.delete(svc.key)
        assert log == [("fac node", ("10.0.0.2",)), ("a node", ("10.0.0.2",)), ("b node", ("10.0.0.2",)),
                       ("fac upsert", "default/web"), ("a upsert", "default/web"), ("b upsert", "default/web")]
        assert h.context(a).node.addresses == ("10.0.0.2",)
        del log[:]
        h.stop(a)
        assert log == [("a stop",)], "b still needs it"
        h.stop(b)
        assert log == [("a stop",), ("b stop",), ("fac stop",)]
        assert h.facilities == {}


def test_a_plugin_requiring_the_maps_needs_a_writer():
    import pytest

    class Maps:
        @hookimpl
        def kpr_requires(self) -> list[str]:
            return ["servicemaps"]

    with PluginHarness(NodeInfo("node1")) as h, pytest.raises(ValueError, match="requires 'servicemaps'"):
        h.start(Maps(), name="maps")


def test_stays_checks_to_the_end_and_names_what_stopped_holding():
    import pytest

    from kpr.testing.waiting import stays

    calls = []
    assert stays(lambda: calls.append(1) or True, 0.05, interval=0.01) == len(calls) >= 2, "checked until the end"
    values = iter([True, True, 0, True])
    with pytest.raises(AssertionError, match=r"^the thing stopped holding after 2 checks \(value: 0\); state: seen$"):
        stays(lambda: next(values), 10, "the thing", lambda: "seen", interval=0.001)
