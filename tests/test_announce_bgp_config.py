"""announce_bgp's config section: mistakes name their key; the generated ExaBGP config passes
`exabgp validate`; the process-API commands; a missing exabgp is a clear error."""

import base64
import logging
import subprocess
import textwrap

import pytest

from kpr.config import KprConfig, parse_config
from kpr.context import PluginContext
from kpr.model import NodeInfo
from kpr.pluginmanager import check_config, validate_section
from kpr.plugins.announce_bgp import exabgp as X
from kpr.plugins.announce_bgp.config import AnnounceBGPConfig
from kpr.plugins.announce_bgp.plugin import AnnounceBGP
from kpr.plugins.announce_bgp.routes import Attrs

BASE = {"localASN": 64512, "routerID": "10.0.0.1", "peers": [{"address": "10.0.0.254", "asn": 64500}]}


def problems(section):
    cfg, errs = validate_section("announce_bgp", AnnounceBGPConfig, section)
    return errs


def with_peer(**kw):
    return {**BASE, "peers": [{"address": "10.0.0.254", "asn": 64500, **kw}]}


def with_adv(**kw):
    return {**BASE, "advertisements": [kw]}


def test_the_documented_example_is_valid():
    section = {
        "localASN": 64512,
        "routerID": "10.0.0.1",
        "peers": [{"address": "10.0.0.254", "asn": 64500, "port": 179, "holdTime": 90, "password": None, "multihop": None}],
        "advertisements": [
            {
                "addresses": ["LoadBalancer", "ExternalIP"],
                "communities": ["64512:100"],
                "largeCommunities": [],
                "localPreference": None,
                "med": None,
                "serviceSelector": {},
                "namespaces": [],
            }
        ],
    }
    assert problems(section) == []
    cfg = AnnounceBGPConfig.model_validate(section)
    assert cfg.local_asn == 64512 and cfg.router_id == "10.0.0.1"
    assert cfg.peers[0].address_families == ("ipv4",)


def test_defaults():
    cfg = AnnounceBGPConfig.model_validate({"localASN": 65000})
    assert cfg.peers == [] and cfg.graceful_restart_time == 120 and cfg.netns == ""
    assert cfg.advertisements[0].addresses == ["LoadBalancer", "ExternalIP"]


@pytest.mark.parametrize(
    "section,expected",
    [
        ({**BASE, "localASN": 0}, "plugins.announce_bgp.localASN: must be an AS number 1-4294967295, got 0"),
        ({**BASE, "localASN": 4294967296}, "plugins.announce_bgp.localASN: must be an AS number"),
        ({**BASE, "localASN": "sixty"}, "plugins.announce_bgp.localASN: must be an AS number"),
        ({**BASE, "localASN": True}, "plugins.announce_bgp.localASN: must be an AS number"),
        ({**BASE, "localASN": 23456}, "plugins.announce_bgp.localASN: 23456 is AS_TRANS"),
        ({"routerID": "10.0.0.1"}, "plugins.announce_bgp.localASN: Field required"),
        ({**BASE, "routerID": "10.0.0.300"}, "plugins.announce_bgp.routerID: not an IP address"),
        ({**BASE, "routerID": "fd00::1"}, "plugins.announce_bgp.routerID: must be an IPv4 address"),
        (with_peer(asn=-1), "plugins.announce_bgp.peers.0.asn: must be an AS number"),
        (with_peer(address="10.0.0"), "plugins.announce_bgp.peers.0.address: not an IP address"),
        (with_peer(port=0), "plugins.announce_bgp.peers.0.port:"),
        (with_peer(holdTime=2), "plugins.announce_bgp.peers.0.holdTime: must be 0 or at least 3"),
        (with_peer(password=""), "plugins.announce_bgp.peers.0.password: must be 1-80 bytes"),
        (with_peer(password="x" * 81), "plugins.announce_bgp.peers.0.password: must be 1-80 bytes"),
        (with_peer(password="a\nb"), "plugins.announce_bgp.peers.0.password: must not contain control characters"),
        (with_peer(multihop=0), "plugins.announce_bgp.peers.0.multihop:"),
        (with_peer(sourceAddress="fd00::1"), "plugins.announce_bgp.peers.0: sourceAddress fd00::1 and address 10.0.0.254 must be of the same family"),
        (with_peer(families=["ipv5"]), "plugins.announce_bgp.peers.0.families.0:"),
        (with_peer(holdtime=9), "plugins.announce_bgp.peers.0.holdtime: unknown key"),
        ({**BASE, "peers": BASE["peers"] * 2}, "plugins.announce_bgp.peers: peers.0 and peers.1 both have address 10.0.0.254"),
        (with_adv(communities=["64512:70000"]), "plugins.announce_bgp.advertisements.0.communities.0: not a BGP community: '64512:70000'"),
        (with_adv(communities=["no-such-name"]), "plugins.announce_bgp.advertisements.0.communities.0: not a BGP community"),
        (with_adv(largeCommunities=["1:2"]), "plugins.announce_bgp.advertisements.0.largeCommunities.0: not a BGP large community"),
        (with_adv(largeCommunities=["1:2:4294967296"]), "plugins.announce_bgp.advertisements.0.largeCommunities.0: not a BGP large community"),
        (with_adv(localPreference=-1), "plugins.announce_bgp.advertisements.0.localPreference:"),
        (with_adv(med=2**32), "plugins.announce_bgp.advertisements.0.med:"),
        (with_adv(addresses=["NodePort"]), "plugins.announce_bgp.advertisements.0.addresses.0:"),
        (with_adv(addresses=[]), "plugins.announce_bgp.advertisements.0.addresses: must name at least one"),
        (with_adv(serviceSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
         "plugins.announce_bgp.advertisements.0.serviceSelector.matchExpressions.0: operator In needs at least one value"),
        (with_adv(serviceSelector={"matchLabels": {"bad key": "x"}}), "plugins.announce_bgp.advertisements.0.serviceSelector.matchLabels: not a valid label key"),
        (with_adv(peers=["10.9.9.9"]), "advertisements.0.peers: 10.9.9.9 is not one of the configured peers"),
        ({**BASE, "netns": "../etc"}, "plugins.announce_bgp.netns: not a network namespace name"),
        ({**BASE, "exabgp": "/opt/my exabgp"}, "plugins.announce_bgp.exabgp: must be a plain path"),
        ({**BASE, "gracefulRestartTime": 5000}, "plugins.announce_bgp.gracefulRestartTime:"),
    ],
)
def test_mistakes_name_their_key(section, expected):
    errs = problems(section)
    assert any(expected in e for e in errs), errs


def test_values_are_normalised():
    cfg = AnnounceBGPConfig.model_validate(
        {
            "localASN": "1.10",  # asdot
            "peers": [{"address": "FD00:0::FE", "asn": "64500", "multihop": True, "families": ["ipv6", "ipv4"]}],
            "advertisements": [{"communities": ["064512:0100", "NO_EXPORT", "64512:100"], "largeCommunities": ["01:2:3"]}],
        }
    )
    assert cfg.local_asn == 65546
    assert cfg.peers[0].address == "fd00::fe" and cfg.peers[0].asn == 64500 and cfg.peers[0].multihop == 255
    assert cfg.peers[0].address_families == ("ipv6", "ipv4")
    assert cfg.advertisements[0].communities == ["64512:100", "no-export"]
    assert cfg.advertisements[0].large_communities == ["1:2:3"]


def test_check_config_reports_the_plugin_section(tmp_path):
    text = textwrap.dedent(
        """
        plugins:
          announce_bgp:
            enabled: false
            localASN: 64512
            peers: [{address: 10.0.0.254, asn: 0}]
        """
    )
    from kpr.config import ConfigError

    with pytest.raises(ConfigError) as e:
        check_config(parse_config(text))
    assert "plugins.announce_bgp.peers.0.asn: must be an AS number 1-4294967295, got 0" in str(e.value)


# --- generated ExaBGP config -----------------------------------------------------------------

FULL = {
    "localASN": 64512,
    "routerID": "10.0.0.1",
    "gracefulRestartTime": 60,
    "peers": [
        {"address": "10.0.0.254", "asn": 64500, "holdTime": 9, "password": 'p"a;s{s} w#rd', "multihop": 4, "sourceAddress": "10.0.0.1"},
        {"address": "fd00::fe", "asn": 64501, "port": 1790, "families": ["ipv6", "ipv4"]},
        {"address": "10.0.0.253", "asn": 64512, "holdTime": 0},
    ],
}


def exabgp_or_skip() -> str:
    try:
        return X.find_exabgp()
    except X.ExaBGPMissing as e:
        pytest.skip(str(e))


def test_generated_config_passes_exabgp_validate(tmp_path):
    exabgp = exabgp_or_skip()
    cfg = AnnounceBGPConfig.model_validate(FULL)
    text = X.render_config(cfg, "10.0.0.1", str(tmp_path / "bridge.sock"))
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    X.validate_config(exabgp, conf)  # raises ConfigRejected otherwise
    # What each key became.
    assert "neighbor 10.0.0.254 {" in text and "local-as 64512;" in text and "peer-as 64500;" in text
    assert "hold-time 9;" in text and "outgoing-ttl 4;" in text and "local-address 10.0.0.1;" in text
    encoded = base64.b64encode('p"a;s{s} w#rd'.encode()).decode()
    assert f'md5-password "{encoded}";' in text and "md5-base64 true;" in text
    assert "connect 1790;" in text and "graceful-restart 60;" in text and "manual-eor true;" in text
    v6 = text.split("neighbor fd00::fe {")[1].split("neighbor 10.0.0.253")[0]
    assert "family {\n        ipv6 unicast;\n        ipv4 unicast;\n    }" in v6
    assert f"run {X.sys.executable} {X.BRIDGE} {tmp_path / 'bridge.sock'};" in text
    # ExaBGP's own reading of it agrees.
    res = subprocess.run([exabgp, "validate", "-nrv", str(conf)], capture_output=True, text=True, env=X._env())
    out = res.stdout + res.stderr
    assert "peer-as 64501;" in out and "md5-base64 true;" in out


def test_graceful_restart_can_be_switched_off_and_still_validates(tmp_path):
    exabgp = exabgp_or_skip()
    cfg = AnnounceBGPConfig.model_validate({**BASE, "gracefulRestartTime": 0})
    text = X.render_config(cfg, "10.0.0.1", str(tmp_path / "b.sock"))
    assert "graceful-restart" not in text
    (tmp_path / "c.conf").write_text(text)
    X.validate_config(exabgp, tmp_path / "c.conf")


def test_validate_rejects_a_broken_config(tmp_path):
    exabgp = exabgp_or_skip()
    conf = tmp_path / "bad.conf"
    conf.write_text("neighbor 10.0.0.1 { local-as 1; }\n")
    with pytest.raises(X.ConfigRejected, match="exabgp validate rejected"):
        X.validate_config(exabgp, conf)


def test_run_line_refuses_paths_with_spaces(tmp_path):
    cfg = AnnounceBGPConfig.model_validate(BASE)
    with pytest.raises(ValueError, match="run line"):
        X.render_config(cfg, "10.0.0.1", "/tmp/with space/b.sock")


def test_commands():
    attrs = Attrs(communities=("64512:100", "no-export"), large_communities=("1:2:3",), local_preference=200, med=5)
    assert X.announce_command("10.0.0.254", "10.0.100.10/32", attrs) == (
        "neighbor 10.0.0.254 announce route 10.0.100.10/32 next-hop self community [ 64512:100 no-export ] "
        "large-community [ 1:2:3 ] local-preference 200 med 5"
    )
    assert X.announce_command("10.0.0.254", "fd00::10/128", Attrs(next_hop="fd00:50::10")) == (
        "neighbor 10.0.0.254 announce route fd00::10/128 next-hop fd00:50::10"
    )
    assert X.withdraw_command("fd00::fe", "fd00::10/128") == "neighbor fd00::fe withdraw route fd00::10/128"
    assert X.eor_commands("10.0.0.254", ["ipv4", "ipv6"]) == [
        "neighbor 10.0.0.254 announce eor ipv4 unicast",
        "neighbor 10.0.0.254 announce eor ipv6 unicast",
    ]


def test_missing_exabgp_is_a_clear_error_at_start(tmp_path):
    plugin = AnnounceBGP()
    cfg = AnnounceBGPConfig.model_validate({**BASE, "exabgp": "/nonexistent/exabgp"})
    ctx = PluginContext("announce_bgp", NodeInfo("n1", ("10.0.0.1",)), logging.getLogger("t"), KprConfig(), tmp_path)
    plugin.kpr_configure(config=cfg, context=ctx)
    with pytest.raises(X.ExaBGPMissing, match="plugins.announce_bgp.exabgp: '/nonexistent/exabgp' is not an executable program"):
        plugin.kpr_start(context=ctx)
    assert plugin.supervisor is None and plugin.run_dir is None


def test_exabgp_not_installed_anywhere(monkeypatch, tmp_path):
    monkeypatch.setattr(X.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(X.ExaBGPMissing, match=r"exabgp not found .*pip install 'kpr\[bgp\]'"):
        X.find_exabgp()


def test_router_id_defaults_to_a_node_address_and_is_required_without_one(tmp_path):
    cfg = AnnounceBGPConfig.model_validate({"localASN": 64512, "peers": BASE["peers"]})
    plugin = AnnounceBGP()
    ctx = PluginContext("announce_bgp", NodeInfo("n1", ("fd00::1", "192.168.50.10")), logging.getLogger("t"), KprConfig(), tmp_path)
    plugin.kpr_configure(config=cfg, context=ctx)
    assert plugin.router_id == "192.168.50.10"
    ctx.node = NodeInfo("n1", ("fd00::1",))
    with pytest.raises(ValueError, match="plugins.announce_bgp.routerID: not set"):
        AnnounceBGP().kpr_configure(config=cfg, context=ctx)


def test_no_peers_means_nothing_runs(tmp_path):
    plugin = AnnounceBGP()
    cfg = AnnounceBGPConfig.model_validate({"localASN": 64512})
    ctx = PluginContext("announce_bgp", NodeInfo("n1", ()), logging.getLogger("t"), KprConfig(), tmp_path)
    plugin.kpr_configure(config=cfg, context=ctx)
    plugin.kpr_start(context=ctx)
    st = plugin.kpr_status()
    assert st.healthy and "no peers" in st.message
    plugin.kpr_stop(context=ctx)


def test_source_addresses_become_local_addresses():
    cfg = AnnounceBGPConfig.model_validate(FULL)
    text = X.render_config(cfg, "10.0.0.1", "/run/x/b.sock", {"fd00::fe": "fd00::1", "10.0.0.253": None, "10.0.0.254": "10.9.9.9"})
    blocks = {b.split(" {")[0]: b for b in text.split("neighbor ")[1:]}
    assert "local-address fd00::1;" in blocks["fd00::fe"]
    assert "local-address" not in blocks["10.0.0.253"]  # unknown: ExaBGP picks
    assert "local-address 10.0.0.1;" in blocks["10.0.0.254"]  # a configured sourceAddress wins
