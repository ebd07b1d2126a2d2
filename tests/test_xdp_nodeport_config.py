"""xdp_nodeport without a kernel: its config section (SNAT only), its registration, and its
build of the shared NodePort programs."""

from __future__ import annotations

import re

import pytest

from kpr.config import ConfigError, parse_config
from kpr.nodeport.config import NodePortSection
from kpr.pluginmanager import build_plugin_manager
from kpr.plugins.xdp_nodeport import datapath as XD
from kpr.plugins.xdp_nodeport.config import XdpNodePortConfig
from kpr.plugins.xdp_nodeport.plugin import XdpNodePort
from kpr.servicemaps import writer_params


def test_defaults_and_the_documented_shape() -> None:
    cfg = XdpNodePortConfig.model_validate(
        {"mode": "snat", "algorithm": "maglev", "maglevTableSize": 16381, "conntrackSize": 524288,
         "snatPortRange": "62000-63000", "healthCheck": False, "gcInterval": 5, "xdpMode": "native"}
    )
    assert (cfg.mode, cfg.algorithm, cfg.maglev_table_size, cfg.conntrack_size, cfg.snat_ports, cfg.health_check,
            cfg.gc_interval, cfg.xdp_mode) == ("snat", "maglev", 16381, 524288, (62000, 63000), False, 5.0, "native")
    d = XdpNodePortConfig()
    assert d.mode == "snat" and d.xdp_mode == "auto" and d.keep_attached_on_stop
    assert isinstance(d, NodePortSection), "the keys tc_nodeport has too come from one place"


@pytest.mark.parametrize("mode", ["dsr", "hybrid"])
def test_dsr_and_hybrid_are_refused_naming_the_key(mode: str) -> None:
    config = parse_config(f"plugins:\n  xdp_nodeport: {{enabled: true, mode: {mode}}}\n")
    with pytest.raises(ConfigError) as exc:
        build_plugin_manager(config, facilities={"servicemaps": lambda cfg: object()})
    problems = [p for p in exc.value.problems if "plugins.xdp_nodeport.mode" in p]
    assert problems, exc.value.problems
    assert "XDP" in problems[0] and "snat" in problems[0] and "tc_nodeport" in problems[0], problems


@pytest.mark.parametrize(
    "section, problem",
    [
        ({"xdpMode": "offload"}, "plugins.xdp_nodeport.xdpMode"),
        ({"maglevTableSize": 16380}, "must be a prime number"),
        ({"conntrackSize": 10}, "plugins.xdp_nodeport.conntrackSize"),
        ({"snatPortRange": "70000-1"}, "plugins.xdp_nodeport.snatPortRange"),
        ({"gcInterval": 0}, "plugins.xdp_nodeport.gcInterval"),
        ({"tcPriority": 1}, "plugins.xdp_nodeport.tcPriority: unknown key"),
        ({"redirectPeer": True}, "plugins.xdp_nodeport.redirectPeer: unknown key"),
    ],
)
def test_check_config_names_the_key(section: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg = parse_config("plugins:\n  xdp_nodeport: {enabled: false}\n")
        cfg.plugins["xdp_nodeport"] = type(cfg.plugins["xdp_nodeport"]).model_validate({"enabled": False, **section})
        build_plugin_manager(cfg)
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_enabled_plugin_requires_the_service_maps_and_shares_the_writer_knobs() -> None:
    config = parse_config("plugins:\n  xdp_nodeport: {enabled: true, algorithm: maglev, conntrackSize: 65536}\n")
    kpm = build_plugin_manager(config, facilities={"servicemaps": lambda cfg: object(), "nodeport": lambda cfg: object()})
    assert [h.name for h in kpm.handles] == ["servicemaps", "nodeport", "xdp_nodeport"]
    assert isinstance(kpm.handle("xdp_nodeport").plugin, XdpNodePort)
    params = writer_params(config)
    assert params.algorithm == "maglev" and params.sizes == {"kpr_ct": 65536, "kpr_snat": 65536}
    # with tc_nodeport, the shared knobs must agree
    both = parse_config(
        "plugins:\n  xdp_nodeport: {enabled: true, algorithm: maglev}\n  tc_nodeport: {enabled: true, algorithm: random}\n"
    )
    with pytest.raises(ConfigError, match="algorithm"):
        build_plugin_manager(both, facilities={"servicemaps": lambda cfg: writer_params(cfg), "nodeport": lambda cfg: object()})


def test_the_xdp_build_is_the_entry_file_over_the_shared_library() -> None:
    text = XD.SOURCE.read_text()
    assert '#include "ctx/xdp.h"' in text and '#include "lib/nodeport.h"' in text
    defined = set(re.findall(r"^int (kpr_xnp_\w+)\(", text, re.M))
    assert {XD.INGRESS, XD.EGRESS, *filter(None, XD.CALLS)} <= defined
    assert len(XD.INGRESS) <= 15, "the kernel keeps 15 characters of a program's name"
    # DSR slots (KPR_NP_CALL_DSR 2, KPR_NP_CALL_DSR_RECV 5) stay empty in XDP
    assert len(XD.CALLS) == 9 and XD.CALLS[2] == XD.CALLS[5] == ""
    dp = XD.Datapath("/nonexistent", redirect_peer=True)
    assert "-DKPR_NP_PEER=0" in dp.cflags() and "-DKPR_NP_MODE=0" in dp.cflags()
