"""The shared maps' settings come from the enabled plugins' sections, which must agree."""

import pytest

from kpr import hookimpl
from kpr.config import ConfigError, Section, parse_config
from kpr.pluginmanager import Discovered, build_plugin_manager
from kpr.servicemaps import ServiceMapWriter, WriterParams, writer_params


class DatapathA:
    class Cfg(Section):
        algorithm: str = "random"

    @hookimpl
    def kpr_config_schema(self):
        return self.Cfg

    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]


class DatapathB:
    class Cfg(Section):
        algorithm: str = "random"
        maglev_table_size: int = 16381
        conntrack_size: int = 524288

    @hookimpl
    def kpr_config_schema(self):
        return self.Cfg

    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]


def found():
    return {n: Discovered(n, f"tests:{n}", "test-dist", "1", obj=o) for n, o in (("a", DatapathA), ("b", DatapathB))}


def test_the_core_writer_is_built_with_the_plugins_settings():
    cfg = parse_config("plugins: {a: {enabled: true, algorithm: maglev}, b: {enabled: true, algorithm: maglev, maglevTableSize: 251, conntrackSize: 1000}}")
    kpm = build_plugin_manager(cfg, discovered=found())
    writer = kpm.handle("servicemaps").plugin
    assert isinstance(writer, ServiceMapWriter)
    assert (writer.algorithm, writer.maglev_size) == ("maglev", 251)
    assert writer.specs["kpr_ct"].max_entries == 1000 and writer.specs["kpr_snat"].max_entries == 1000
    assert writer_params(cfg).cflags("/x")[:2] == ['-DKPR_PIN_PATH="/x"', "-DKPR_MAGLEV_M=251"]


def test_plugins_that_disagree_are_a_config_error_naming_both_keys():
    cfg = parse_config("plugins: {a: {enabled: true, algorithm: maglev}, b: {enabled: true, algorithm: random}}")
    with pytest.raises(ConfigError) as e:
        build_plugin_manager(cfg, discovered=found())
    assert "plugins.b.algorithm: 'random' disagrees with plugins.a.algorithm: 'maglev'" in str(e.value)


def test_disabled_plugins_do_not_count():
    cfg = parse_config("plugins: {a: {enabled: true, algorithm: maglev}, b: {enabled: false, algorithm: random}}")
    build_plugin_manager(cfg, discovered=found())
    assert writer_params(cfg) == WriterParams(algorithm="maglev")


def test_defaults_without_plugins():
    assert writer_params(parse_config("")) == WriterParams()


def test_bpf_map_sizes_size_the_service_maps_and_the_programs_declarations():
    cfg = parse_config("bpf: {mapSizes: {kprSvc: 262144, kprBackend: 131072}}\nplugins: {b: {enabled: true, conntrackSize: 4096}}")
    build_plugin_manager(cfg, discovered=found())
    params = writer_params(cfg)
    assert params.sizes == {"kpr_svc": 262144, "kpr_backend": 131072, "kpr_ct": 4096, "kpr_snat": 4096}
    flags = params.cflags("/sys/fs/bpf/x")
    assert "-DKPR_SVC_MAX=262144" in flags and "-DKPR_BACKEND_MAX=131072" in flags and "-DKPR_REVNAT_MAX=65536" in flags
    with pytest.raises(ConfigError, match="bpf.mapSizes.kprSvc: Input should be greater than or equal to 1024"):
        parse_config("bpf: {mapSizes: {kprSvc: 10}}")
    with pytest.raises(ConfigError, match="bpf.mapSizes.kprCt"):
        parse_config("bpf: {mapSizes: {kprCt: 4096}}")
