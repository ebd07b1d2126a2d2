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
    ("an infinite resync interval", "agent: {resyncInterval: .inf}", "agent.resyncInterval: Input should be a finite number (got inf)"),
    ("NaN as a poll interval", "source: {pollInterval: .nan}", "source.pollInterval: Input should be a finite number"),
    ("inf spelt as a string", "source: {qps: 'inf'}", "source.qps: Input should be a finite number"),
    ("a negative grace period", "source: {emptyGracePeriod: -1}", "source.emptyGracePeriod: Input should be greater than or equal to 0"),
    ("an infinite grace period", "source: {emptyGracePeriod: .inf}", "source.emptyGracePeriod: Input should be a finite number"),
    ("a tiny file size cap", "source: {maxFileSize: 10}", "source.maxFileSize: Input should be greater than or equal to 1024"),
    ("a file size cap that is no integer", "source: {maxFileSize: 1.5}", "source.maxFileSize"),
    ("a control character", "node: {name: \x01}", "not valid YAML: unacceptable character #x0001"),
    ("a date that is none", "node: {name: 2024-13-45}", "not valid YAML: month must be in 1..12"),
    ("a Python tag", "node: !!python/object:os.system {}", "could not determine a constructor"),
    ("an unhashable key", "plugins: {[1, 2]: x}", "found unhashable key"),
    ("deeply nested flow YAML", "node: " + "[" * 5000 + "]" * 5000, "not valid YAML: "),
    ("nesting at the recursion limit", "node: " + "[" * 500 + "]" * 500, "nested deeper than 32 levels"),
    ("nested plugin keys", "plugins: {x: " + "{a: " * 40 + "1" + "}" * 41, "(top level): nested deeper than 32 levels"),
    ("an alias bomb", "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")), "(top level): more than 100000 values (YAML aliases expanded)"),
    ("a huge value", "node: {devices: " + "x" * 100000 + "}", "node.devices: Input should be a valid list (got 'xxxxx"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[d for d, _, _ in BAD])
def test_bad_config_names_the_key_and_value(text, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "test.yaml")
    assert expected in str(exc.value)
    assert "test.yaml" in str(exc.value)
    # One line per problem, each short: never a traceback, never a dump of the input.
    assert all(len(line) < 300 for line in str(exc.value).splitlines())


def test_new_source_keys():
    c = parse_config("source: {emptyGracePeriod: 0, maxFileSize: 1048576}")
    assert c.source.empty_grace_period == 0 and c.source.max_file_size == 1048576
    d = parse_config("")
    assert d.source.empty_grace_period == 60 and d.source.max_file_size == 10 * 1024 * 1024


def _float_keys(model, prefix=""):
    import typing

    from kpr.config import Section

    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from _float_keys(ann, key + ".")
        elif ann is float or float in typing.get_args(ann):
            yield key


def test_every_float_key_refuses_non_finite_numbers():
    from kpr.config import KprConfig

    keys = list(_float_keys(KprConfig))
    assert {"agent.resyncInterval", "agent.shutdownTimeout", "source.pollInterval", "source.qps", "source.emptyGracePeriod"} <= set(keys)
    for key in keys:
        section, leaf = key.split(".")
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
                parse_config(f"{section}: {{{leaf}: {bad}}}")


def test_plugin_sections_refuse_non_finite_numbers_too():
    from kpr.config import Section

    class Plugin(Section):
        interval: float = 1.0

    with pytest.raises(ValueError, match="finite number"):
        Plugin.model_validate({"interval": float("inf")})


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"\x7fELF\x02\x01\x01\x00\x00", "(top level): a binary file, not YAML text (NUL byte at offset 7)"),
        (b"node: {name: caf\xe9}\n", "(top level): not UTF-8 text (byte 16)"),
        (b"\xff\xfe\x00n\x00o", "(top level): a binary file, not YAML text (NUL byte at offset 2)"),
        (b"# big\n" + b"x" * (1024 * 1024), "(top level): larger than 1048576 bytes; not a kpr config"),
    ],
    ids=["binary", "latin-1", "utf-16", "huge"],
)
def test_load_config_refuses_what_is_no_text(tmp_path, data, expected):
    from kpr.config import load_config

    path = tmp_path / "kpr.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"invalid config {path}:\n  {expected}"


def test_check_config_prints_one_line_for_a_binary_config(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "kpr.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    out = subprocess.run([sys.executable, "-m", "kpr.cli", "check-config", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert [l.strip() for l in out.stderr.strip().splitlines()[1:]] == ["(top level): a binary file, not YAML text (NUL byte at offset 0)"]
