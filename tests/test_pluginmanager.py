"""Plugin discovery, enabling by config, per-plugin config sections and start-up errors."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pluggy
import pydantic
import pytest

from kpr import hookimpl
from kpr.config import ConfigError, Section, parse_config
from kpr.pluginmanager import Discovered, PluginError, build_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


class WithSettings:
    class Cfg(Section):
        mode: str = "snat"
        table_size: int = pydantic.Field(16381, gt=0)

    @hookimpl
    def kpr_config_schema(self):
        return self.Cfg

    @hookimpl
    def kpr_status(self):
        return None


class NoSettings:
    @hookimpl
    def kpr_status(self):
        return None


class Misspelt:
    @hookimpl
    def kpr_service_upsret(self, service):
        pass


def found(**objs):
    return {n: Discovered(n, f"tests:{n}", "test-dist", "1", obj=o) for n, o in objs.items()}


def test_only_enabled_plugins_are_registered():
    cfg = parse_config("plugins: {a: {enabled: true}, b: {enabled: false}}")
    kpm = build_plugin_manager(cfg, discovered=found(a=WithSettings, b=WithSettings, c=WithSettings))
    assert [h.name for h in kpm.handles] == ["a"]
    assert kpm.pm.get_plugin("b") is None and kpm.pm.get_plugin("c") is None


def test_plugin_section_is_validated_and_handed_over():
    cfg = parse_config("plugins: {a: {enabled: true, mode: dsr, tableSize: 7}}")
    kpm = build_plugin_manager(cfg, discovered=found(a=WithSettings))
    section = kpm.handle("a").section
    assert (section.mode, section.table_size) == ("dsr", 7)
    assert cfg.plugin_sections["a"] is section


def test_a_disabled_plugins_section_is_still_checked():
    cfg = parse_config("plugins: {a: {enabled: false, tableSize: -1}}")
    with pytest.raises(ConfigError) as e:
        build_plugin_manager(cfg, discovered=found(a=WithSettings))
    assert "plugins.a.tableSize: Input should be greater than 0 (got -1)" in str(e.value)


def test_unknown_key_in_a_plugin_section_is_named():
    cfg = parse_config("plugins: {a: {enabled: true, mdoe: dsr}, n: {enabled: true, x: 1}}")
    with pytest.raises(ConfigError) as e:
        build_plugin_manager(cfg, discovered=found(a=WithSettings, n=NoSettings))
    assert "plugins.a.mdoe: unknown key" in str(e.value)
    assert "plugins.n.x: unknown key (plugin n has no settings)" in str(e.value)


def test_a_plugin_not_installed_stops_start_up():
    cfg = parse_config("plugins: {nope: {enabled: true}}")
    with pytest.raises(PluginError, match=r"not installed: plugins\.nope \(installed: a\)"):
        build_plugin_manager(cfg, discovered=found(a=WithSettings))


def test_a_hook_without_a_spec_stops_start_up():
    cfg = parse_config("plugins: {typo: {enabled: true}}")
    with pytest.raises(PluginError, match=r"plugin typo: .*kpr_service_upsret"):
        build_plugin_manager(cfg, discovered=found(typo=Misspelt))


def test_per_plugin_calls_reach_only_that_plugin():
    cfg = parse_config("plugins: {a: {enabled: true}, b: {enabled: true}}")
    kpm = build_plugin_manager(cfg, discovered=found(a=WithSettings, b=WithSettings))
    a, b = kpm.handle("a"), kpm.handle("b")
    assert a.plugin is not b.plugin, "a class entry point is instantiated per plugin"
    assert a.call("kpr_config_schema") == [WithSettings.Cfg]
    assert a.implements("kpr_status") and not a.implements("kpr_service_upsert")


def test_builtin_entry_points_are_discovered():
    from kpr.pluginmanager import discover

    builtins = {name: d for name, d in discover().items() if d.builtin}
    assert {"socklb", "tc_nodeport", "xdp_nodeport", "announce_bgp", "announce_arp"} <= set(builtins)
    for name, d in builtins.items():
        assert d.value.startswith("kpr.plugins."), f"built-in plugin {name} must live in plugins/"


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    """The example third-party package, pip-installed into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT / "examples" / "plugin")],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    return env


def test_example_third_party_plugin_is_discovered(example_plugin, tmp_path):
    cfg = tmp_path / "kpr.yaml"
    cfg.write_text("plugins: {servicelog: {enabled: true, path: /tmp/x.jsonl}}\n")
    out = subprocess.run([sys.executable, "-m", "kpr.cli", "plugins", "--json", "--config", str(cfg)], env=example_plugin, capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["servicelog"] == {
        "name": "servicelog",
        "enabled": True,
        "dist": "kpr-servicelog",
        "version": "0.1.0",
        "builtin": False,
        "entryPoint": "kpr_servicelog:ServiceLog",
    }
    ok = subprocess.run([sys.executable, "-m", "kpr.cli", "check-config", "--config", str(cfg)], env=example_plugin, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    cfg.write_text("plugins: {servicelog: {enabled: true, withBackends: sometimes}}\n")
    bad = subprocess.run([sys.executable, "-m", "kpr.cli", "check-config", "--config", str(cfg)], env=example_plugin, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "plugins.servicelog.withBackends: Input should be a valid boolean" in bad.stderr


class NeedsMaps:
    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]


class NeedsMagic:
    @hookimpl
    def kpr_requires(self):
        return ["magic"]


class FakeFacility:
    """Stands in for a core facility object; only its registration order is under test."""


def test_required_facility_is_registered_first_once():
    cfg = parse_config("plugins: {a: {enabled: true}, b: {enabled: true}, c: {enabled: false}}")
    made = []
    kpm = build_plugin_manager(
        cfg,
        discovered=found(a=NeedsMaps, b=NeedsMaps, c=NeedsMagic),
        facilities={"servicemaps": lambda c: made.append(c) or FakeFacility()},
    )
    assert [h.name for h in kpm.handles] == ["servicemaps", "a", "b"]
    assert len(made) == 1 and made[0] is cfg


def test_unknown_facility_stops_start_up():
    cfg = parse_config("plugins: {c: {enabled: true}}")
    with pytest.raises(PluginError, match="plugin c requires 'magic'"):
        build_plugin_manager(cfg, discovered=found(c=NeedsMagic), facilities={})


def test_no_facility_without_a_plugin_that_needs_it():
    cfg = parse_config("plugins: {a: {enabled: false}}")
    kpm = build_plugin_manager(cfg, discovered=found(a=NeedsMaps), facilities={"servicemaps": lambda c: 1 / 0})
    assert kpm.handles == []


class Hooks:
    """Implementations pluggy calls in different ways: a subset of the spec's arguments, a
    spec default, a keyword default of its own, a value or None, a wrapper."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def kpr_service_upsert(self, service):  # no generation: the spec's other argument
        self.seen.append(("upsert", service))

    @hookimpl
    def kpr_sync_complete(self, generation):  # the spec's default when the call omits it
        self.seen.append(("sync", generation))

    @hookimpl
    def kpr_service_delete(self, key, generation=7):
        self.seen.append(("delete", key, generation))

    @hookimpl
    def kpr_status(self):
        return "st"

    @hookimpl(wrapper=True)
    def kpr_node_changed(self, node):
        self.seen.append(("node", node))
        return (yield)


def test_a_handle_calls_its_plugin_as_pluggy_does():
    cfg = parse_config("plugins: {a: {enabled: true}}")
    answers = []
    for direct in (True, False):
        kpm = build_plugin_manager(cfg, discovered=found(a=Hooks))
        h = kpm.handle("a")
        if not direct:  # pluggy's own subset caller, as the handle used before
            others = [p for p in kpm.pm.get_plugins() if p is not h.plugin]
            h._callers = {n: kpm.pm.subset_hook_caller(n, remove_plugins=others) for n in (
                "kpr_service_upsert", "kpr_sync_complete", "kpr_service_delete", "kpr_status", "kpr_node_changed")}
        got = [
            h.call("kpr_service_upsert", service="s", generation=3),
            h.call("kpr_sync_complete"),
            h.call("kpr_service_delete", key="k", generation=2),
            h.call("kpr_service_delete", key="k"),
            h.call("kpr_status"),
            h.call("kpr_node_changed", node="n"),
        ]
        with pytest.raises(pluggy.HookCallError, match="must provide argument 'service'"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pluggy's own caller warns first
            h.call("kpr_service_upsert", generation=1)
        answers.append((got, h.plugin.seen))
    assert answers[0] == answers[1]
    assert answers[0][0] == [[], [], [], [], ["st"], []]
    assert answers[0][1] == [("upsert", "s"), ("sync", 0), ("delete", "k", 2), ("delete", "k", 0), ("node", "n")]
