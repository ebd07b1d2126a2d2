"""announce_arp config: every mistake is reported with the key it is about."""

import logging
import textwrap

import pytest

from kpr.config import ConfigError, parse_config
from kpr.context import PluginContext
from kpr.model import NodeInfo
from kpr.pluginmanager import build_plugin_manager
from kpr.plugins.announce_arp.config import AnnounceARPConfig
from kpr.plugins.announce_arp.plugin import AnnounceARP


def problems(section: str) -> list[str]:
    text = "plugins:\n  announce_arp:\n" + textwrap.indent(textwrap.dedent(section), "    ")
    with pytest.raises(ConfigError) as e:
        build_plugin_manager(parse_config(text))
    return e.value.problems


def test_defaults_and_camel_case_keys():
    cfg = AnnounceARPConfig.model_validate({"interfaces": ["eth0"]})
    assert (cfg.heartbeat_port, cfg.heartbeat_interval, cfg.dead_interval) == (7946, 0.2, 1.0)
    assert (cfg.garp_repeat, cfg.garp_interval, cfg.drop_unserved, cfg.responder) == (3, 0.0, "auto", "auto")
    cfg = AnnounceARPConfig.model_validate(
        {
            "interfaces": ["eth0", "eth1"],
            "members": ["node1=10.0.0.1", " node2 = 10.0.0.2 "],
            "heartbeatPort": 7000,
            "heartbeatInterval": 0.1,
            "deadInterval": 0.5,
            "keyFile": "/etc/kpr/arp.key",
            "garpRepeat": 5,
            "garpInterval": 10,
            "dropUnserved": True,
        }
    )
    assert [str(m) for m in cfg.member_list] == ["node1=10.0.0.1", "node2=10.0.0.2"]
    assert cfg.drop_unserved == "true"


def test_kubernetes_membership_defaults():
    cfg = AnnounceARPConfig.model_validate({"interfaces": ["eth0"], "membership": "kubernetes"})
    assert (cfg.lease_namespace, cfg.lease_duration, cfg.renew_interval, cfg.lease_prefix) == ("kube-system", 3, 1.0, "kpr-arp-")
    assert cfg.lease_name("node1") == "kpr-arp-node1"
    assert AnnounceARPConfig.model_validate({"interfaces": ["eth0"]}).membership == "heartbeat"


@pytest.mark.parametrize(
    "section,key,words",
    [
        ("enabled: true\n", "plugins.announce_arp.interfaces", "required"),
        ("enabled: true\ninterfaces: []\n", "plugins.announce_arp.interfaces", "at least 1"),
        ("enabled: true\ninterfaces: [eth0, eth0]\n", "plugins.announce_arp.interfaces", "twice"),
        ("enabled: true\ninterfaces: [a-very-long-interface-name]\n", "plugins.announce_arp.interfaces", "not a valid interface name"),
        ("enabled: true\ninterfaces: ['we\"ird']\n", "plugins.announce_arp.interfaces", "not a valid interface name"),
        ("enabled: true\ninterfaces: [eth0]\nmembers: [node1]\n", "plugins.announce_arp.members", "name=address"),
        ("enabled: true\ninterfaces: [eth0]\nmembers: [node1=10.0.0.300]\n", "plugins.announce_arp.members", "not an IP address"),
        ("enabled: true\ninterfaces: [eth0]\nmembers: [node1=224.0.0.1]\n", "plugins.announce_arp.members", "cannot be a heartbeat endpoint"),
        ("enabled: true\ninterfaces: [eth0]\nkeyFile: /k\nmembers: [a=10.0.0.1, a=10.0.0.2]\n", "plugins.announce_arp.members", "listed twice"),
        ("enabled: true\ninterfaces: [eth0]\nkeyFile: /k\nmembers: [a=10.0.0.1, b=10.0.0.1]\n", "plugins.announce_arp.members", "listed twice"),
        ("enabled: true\ninterfaces: [eth0]\nkeyFile: /k\nmembers: [a=10.0.0.1, b=fd00::2]\n", "plugins.announce_arp.members", "all be IPv4 or all IPv6"),
        ("enabled: true\ninterfaces: [eth0]\nmembers: [a=10.0.0.1, b=10.0.0.2]\n", "plugins.announce_arp.keyFile", "required"),
        ("enabled: true\ninterfaces: [eth0]\nkeyFile: relative.key\n", "plugins.announce_arp.keyFile", "absolute"),
        ("enabled: true\ninterfaces: [eth0]\nheartbeatInterval: 0.5\ndeadInterval: 0.6\n", "plugins.announce_arp.deadInterval", "twice heartbeatInterval"),
        ("enabled: true\ninterfaces: [eth0]\nheartbeatPort: 70000\n", "plugins.announce_arp.heartbeatPort", "less than or equal"),
        ("enabled: true\ninterfaces: [eth0]\ngarpRepeat: 0\n", "plugins.announce_arp.garpRepeat", "greater than or equal"),
        ("enabled: true\ninterfaces: [eth0]\ngarpInterval: -1\n", "plugins.announce_arp.garpInterval", "greater than or equal"),
        ("enabled: true\ninterfaces: [eth0]\ndropUnserved: maybe\n", "plugins.announce_arp.dropUnserved", "auto"),
        ("enabled: true\ninterfaces: [eth0]\nfrontendTypes: [ClusterIP]\n", "plugins.announce_arp.frontendTypes", "LoadBalancer"),
        ("enabled: true\ninterfaces: [eth0]\ngarpRepeats: 3\n", "plugins.announce_arp.garpRepeats", "unknown key"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: lease\n", "plugins.announce_arp.membership", "heartbeat"),
        ("enabled: true\ninterfaces: [eth0]\nresponder: bpf\n", "plugins.announce_arp.responder", "'auto' or 'python'"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nmembers: [a=10.0.0.1]\n", "plugins.announce_arp.members", "only for membership: heartbeat"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nkeyFile: /k\n", "plugins.announce_arp.keyFile", "only for membership: heartbeat"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\ndeadInterval: 2\n", "plugins.announce_arp.deadInterval", "only for membership: heartbeat"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nheartbeatPort: 7000\n", "plugins.announce_arp.heartbeatPort", "only for membership: heartbeat"),
        ("enabled: true\ninterfaces: [eth0]\nleaseDuration: 5\n", "plugins.announce_arp.leaseDuration", "only for membership: kubernetes"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: heartbeat\nleaseNamespace: kpr\n", "plugins.announce_arp.leaseNamespace", "only for membership: kubernetes"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nleaseDuration: 1\n", "plugins.announce_arp.renewInterval", "at most half leaseDuration"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nleaseDuration: 1.5\n", "plugins.announce_arp.leaseDuration", "integer"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nleaseNamespace: Kube_System\n", "plugins.announce_arp.leaseNamespace", "not a valid namespace"),
        ("enabled: true\ninterfaces: [eth0]\nmembership: kubernetes\nleasePrefix: ARP/\n", "plugins.announce_arp.leasePrefix", "cannot start a Lease name"),
    ],
)
def test_errors_name_the_key(section, key, words):
    found = problems(section)
    assert any((p.startswith(key + ":") or p.startswith(key + ".")) and words in p for p in found), found


def test_disabled_sections_are_validated_too():
    found = problems("enabled: false\ninterfaces: [eth0]\nmembers: [nope]\n")
    assert any(p.startswith("plugins.announce_arp.members:") for p in found), found


def context(cfg_text: str, node: str = "node1") -> tuple[AnnounceARPConfig, PluginContext]:
    cfg = parse_config(cfg_text)
    build_plugin_manager(cfg)
    section = cfg.plugin_sections["announce_arp"]
    return section, PluginContext("announce_arp", NodeInfo(node), logging.getLogger("t"), cfg, None)


def test_node_must_be_a_member(tmp_path):
    key = tmp_path / "k"
    key.write_bytes(b"s" * 32)
    section, ctx = context(
        f"plugins:\n  announce_arp: {{enabled: true, interfaces: [eth0], keyFile: {key}, members: [a=10.0.0.1, b=10.0.0.2]}}\n",
        node="node7",
    )
    with pytest.raises(ValueError, match=r"plugins\.announce_arp\.members: this node \('node7'"):
        AnnounceARP().kpr_configure(config=section, context=ctx)


@pytest.mark.parametrize("content,words", [(None, "cannot read"), (b"short\n", "holds 5 bytes, at least 16")])
def test_key_file_problems_name_the_key(tmp_path, content, words):
    key = tmp_path / "k"
    if content is not None:
        key.write_bytes(content)
    section, ctx = context(
        f"plugins:\n  announce_arp: {{enabled: true, interfaces: [eth0], keyFile: {key}, members: [node1=10.0.0.1, b=10.0.0.2]}}\n"
    )
    with pytest.raises(ValueError, match=r"plugins\.announce_arp\.keyFile: .*" + words):
        AnnounceARP().kpr_configure(config=section, context=ctx)


def test_unknown_interface_is_refused_at_start_naming_the_key():
    section, ctx = context("plugins:\n  announce_arp: {enabled: true, interfaces: [kprnosuch0]}\n")
    plugin = AnnounceARP()
    plugin.kpr_configure(config=section, context=ctx)
    with pytest.raises(ValueError, match=r"plugins\.announce_arp\.interfaces: no such interface on this node: kprnosuch0"):
        plugin.kpr_start(context=ctx)
    # nothing was started
    assert plugin.responder is None and plugin.membership is None


@pytest.mark.parametrize(
    "setting,others,expected",
    [
        ("auto", "", True),
        ("auto", "  tc_nodeport: {enabled: true}\n", False),
        ("auto", "  xdp_nodeport: {enabled: true}\n", False),
        ("auto", "  tc_nodeport: {enabled: false}\n", True),
        ("true", "  tc_nodeport: {enabled: true}\n", True),
        ("false", "", False),
    ],
)
def test_drop_unserved_follows_the_config_not_imports(setting, others, expected):
    text = f"plugins:\n  announce_arp: {{enabled: true, interfaces: [eth0], dropUnserved: {setting}}}\n" + others
    cfg = parse_config(text)
    section = AnnounceARPConfig.model_validate(cfg.plugin_raw("announce_arp"))
    plugin = AnnounceARP()
    plugin.kpr_configure(config=section, context=PluginContext("announce_arp", NodeInfo("node1"), logging.getLogger("t"), cfg, None))
    assert plugin.drop is expected
