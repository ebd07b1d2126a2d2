"""The socklb plugin's config section and its wiring into the plugin manager (no kernel needed)."""

from __future__ import annotations

from pathlib import Path

import logging

import pytest

from kpr.config import ConfigError, parse_config
from kpr.pluginmanager import build_plugin_manager, discover, validate_section
from kpr.plugins.socklb.config import SockLBConfig
from kpr.plugins.socklb.plugin import BIND_HOOKS, HOOKS, STATS, SockLB


def section(raw: dict) -> tuple[SockLBConfig | None, list[str]]:
    return validate_section("socklb", SockLBConfig, raw)  # type: ignore[return-value]


def test_defaults() -> None:
    cfg, errs = section({})
    assert errs == []
    assert cfg.cgroup_path is None  # the root of the mounted cgroup v2 hierarchy, found at start
    assert (cfg.host_namespace_only, cfg.bind_protection, cfg.terminate_connections) == (False, True, False)
    assert cfg.algorithm == "random"
    assert cfg.reverse_nat_map_size == 262144


def test_camel_case_keys_of_the_issue() -> None:
    cfg, errs = section(
        {
            "cgroupPath": "/sys/fs/cgroup",
            "hostNamespaceOnly": True,
            "bindProtection": False,
            "terminateConnections": True,
            "algorithm": "maglev",
            "reverseNatMapSize": 4096,
        }
    )
    assert errs == []
    assert cfg.cgroup_path == Path("/sys/fs/cgroup")
    assert (cfg.host_namespace_only, cfg.bind_protection, cfg.terminate_connections) == (True, False, True)
    assert (cfg.algorithm, cfg.reverse_nat_map_size) == ("maglev", 4096)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"cgroupPth": "/x"}, "plugins.socklb.cgroupPth: unknown key"),
        ({"algorithm": "roundrobin"}, "plugins.socklb.algorithm: Input should be 'random' or 'maglev'"),
        ({"cgroupPath": "relative/dir"}, "plugins.socklb.cgroupPath: must be an absolute path, got 'relative/dir'"),
        ({"reverseNatMapSize": 10}, "plugins.socklb.reverseNatMapSize: Input should be greater than or equal to 1024"),
        ({"bindProtection": "sometimes"}, "plugins.socklb.bindProtection: Input should be a valid boolean"),
    ],
)
def test_mistakes_are_named_with_their_key(raw: dict, expected: str) -> None:
    cfg, errs = section(raw)
    assert cfg is None
    assert len(errs) == 1 and errs[0].startswith(expected), errs


def test_discovered_through_the_entry_point() -> None:
    found = discover()
    assert "socklb" in found
    assert found["socklb"].value == "kpr.plugins.socklb.plugin:SockLB"
    assert found["socklb"].builtin


def test_enabled_plugin_brings_the_service_map_writer_first(tmp_path: Path) -> None:
    cfg = parse_config(f"bpf: {{pinPath: {tmp_path}/pins}}\nplugins: {{socklb: {{enabled: true, hostNamespaceOnly: true}}}}")
    kpm = build_plugin_manager(cfg)
    assert [h.name for h in kpm.handles] == ["servicemaps", "socklb"]
    h = kpm.handle("socklb")
    assert isinstance(h.plugin, SockLB)
    assert h.section.host_namespace_only is True
    assert h.call("kpr_requires") == [["servicemaps"]]


def test_disabled_section_is_still_validated() -> None:
    cfg = parse_config("plugins: {socklb: {enabled: false, terminateConnection: true}}")
    with pytest.raises(ConfigError) as err:
        build_plugin_manager(cfg)
    assert "plugins.socklb.terminateConnection: unknown key" in str(err.value)


def test_hook_table_matches_the_program_file() -> None:
    from kpr.plugins.socklb.plugin import SOURCE

    text = SOURCE.read_text()
    for prog, _ptype, _atype in HOOKS + BIND_HOOKS:
        assert f"int {prog}(" in text, prog
        assert len(prog) <= 15, f"{prog}: the kernel keeps 15 characters of a program name"
    header = (Path(__file__).resolve().parents[1] / "core/bpf/lib/sock.h").read_text()
    values = [
        int(ln.split()[2])
        for ln in header.splitlines()
        if ln.startswith("#define KPR_SOCK_ST_") and not ln.startswith("#define KPR_SOCK_ST_MAX")
    ]
    assert values == list(range(len(STATS))), "every datapath counter has a name in STATS, in slot order"


def test_status_says_when_terminating_connections_cannot_work() -> None:
    plugin = SockLB()
    plugin.cfg = SockLBConfig.model_validate({"terminateConnections": True})
    plugin._destroy_unsupported = "the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)"
    status = plugin.kpr_status()
    assert not status.healthy  # nothing attached
    assert "terminateConnections cannot work: the kernel cannot destroy sockets" in status.message
    assert status.details["terminateConnections"]["supported"] is False


def test_status_names_the_algorithm_the_shared_maps_use(tmp_path) -> None:
    from kpr.config import parse_config
    from kpr.context import PluginContext
    from kpr.model import NodeInfo
    from kpr.pluginmanager import build_plugin_manager

    cfg = parse_config("plugins: {socklb: {enabled: true, algorithm: maglev}}")
    kpm = build_plugin_manager(cfg)
    assert kpm.handle("servicemaps").plugin.algorithm == "maglev", "socklb's algorithm reaches the writer"
    plugin = kpm.handle("socklb").plugin
    ctx = PluginContext("socklb", NodeInfo("n1"), logging.getLogger("t"), cfg, tmp_path)
    plugin.kpr_configure(config=kpm.handle("socklb").section, context=ctx)
    assert plugin.kpr_status().details["algorithm"].startswith("maglev unless a service is annotated")


@pytest.mark.parametrize("cache", [True, False])
def test_its_start_is_off_the_gil_when_a_compile_would_run_in_the_child(tmp_path, cache) -> None:
    """kpr.daemon.STARTS_OFF_THE_GIL: the program cache on, a compile runs in
    kpr.bpf.compile_child; off, in the agent, and the agent's first pass must not run beside it
    on a busy node."""
    from kpr.config import parse_config
    from kpr.context import PluginContext
    from kpr.daemon import STARTS_OFF_THE_GIL
    from kpr.model import NodeInfo
    from kpr.pluginmanager import build_plugin_manager

    cfg = parse_config(
        f"bpf: {{pinPath: {tmp_path / 'pins'}, programCache: {str(cache).lower()}}}\n"
        f"agent: {{stateDir: {tmp_path / 'state'}}}\n"
        "plugins: {socklb: {enabled: true}}"
    )
    kpm = build_plugin_manager(cfg)
    plugin = kpm.handle("socklb").plugin
    assert getattr(plugin, STARTS_OFF_THE_GIL) is False, "not configured: nothing known"
    ctx = PluginContext("socklb", NodeInfo("n1"), logging.getLogger("t"), cfg, tmp_path)
    plugin.kpr_configure(config=kpm.handle("socklb").section, context=ctx)
    try:
        assert getattr(plugin, STARTS_OFF_THE_GIL) is cache
        assert getattr(kpm.handle("servicemaps").plugin, STARTS_OFF_THE_GIL) is True
    finally:
        plugin._close_compiler()
