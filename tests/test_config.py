"""Config validation: defaults, and errors that name the key path and the bad value."""

import pytest

from kpr.config import ConfigError, parse_config


def test_defaults_match_the_documented_ones():
    c = parse_config("")
    assert c.source.kind == "files"
    assert str(c.source.path) == "/etc/kpr/services.d"
    assert c.service.node_port_range == "30000-32767"
    assert c.service.cluster_cidr == []
    assert str(c.bpf.pin_path) == "/sys/fs/bpf/kpr"
    assert str(c.api.socket) == "/run/kpr/kpr.sock"
    assert c.metrics.address == "127.0.0.1:9963"
    assert c.enabled_plugins() == []


def test_camel_case_keys_are_read():
    c = parse_config(
        """
node: {name: n1, addresses: [10.0.0.1, "fd00::1"], devices: [eth1]}
source: {kind: files, path: /srv/m, statePath: /tmp/a.json, pollInterval: 2}
service: {nodePortRange: 20000-20100, clusterCIDR: [10.96.0.0/12, "fd00:96::/108"], proxyName: kpr}
bpf: {pinPath: /sys/fs/bpf/x}
api: {socket: /tmp/k.sock}
metrics: {address: ""}
agent: {shutdownTimeout: 3, resyncInterval: 0}
plugins: {socklb: {enabled: true, algorithm: maglev}, other: {enabled: false}}
"""
    )
    assert c.node.addresses == ["10.0.0.1", "fd00::1"]
    assert c.service.port_range.first == 20000 and 20100 in c.service.port_range
    assert c.service.cluster_cidr == ["10.96.0.0/12", "fd00:96::/108"]
    assert c.enabled_plugins() == ["socklb"]
    assert c.plugin_raw("socklb") == {"algorithm": "maglev"}
    assert c.metrics.address == ""


BAD = [
    ("an unknown top-level key", "nodes: {}", "nodes: unknown key"),
    ("an unknown nested key", "node: {nmae: x}", "node.nmae: unknown key"),
    ("a bad node address", "node: {addresses: [10.0.0.300]}", "node.addresses.0: not an IP address: '10.0.0.300'"),
    ("a reversed port range", "service: {nodePortRange: 32767-30000}", "service.nodePortRange: must be an ascending range"),
    ("a port range that is not a range", "service: {nodePortRange: lots}", "service.nodePortRange: must look like 30000-32767"),
    ("a host address as a CIDR", "service: {clusterCIDR: 10.96.0.1/12}", "service.clusterCIDR: not a CIDR: '10.96.0.1/12'"),
    ("two CIDRs of one family", "service: {clusterCIDR: [10.0.0.0/8, 11.0.0.0/8]}", "two CIDRs of IPv4"),
    ("an unknown source kind", "source: {kind: etcd}", "source.kind: Input should be 'files' or 'kubernetes'"),
    ("a metrics address without port", "metrics: {address: localhost}", "metrics.address: must be host:port"),
    ("a plugin section that is a list", "plugins: {socklb: [1]}", "plugins.socklb: must be a mapping"),
    ("enabled that is not a boolean", "plugins: {socklb: {enabled: maybe}}", "plugins.socklb.enabled"),
    ("broken YAML", "node: {name: [", "not valid YAML"),
    ("a document that is a list", "- 1", "must be a mapping"),
    ("a negative shutdown timeout", "agent: {shutdownTimeout: -1}", "agent.shutdownTimeout: Input should be greater than 0"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[d for d, _, _ in BAD])
def test_bad_config_names_the_key_and_value(text, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "test.yaml")
    assert expected in str(exc.value)
    assert "test.yaml" in str(exc.value)
