"""host_routing's discovery (which addresses are local pods, which devices get which program)
and its config section; root-free."""

from __future__ import annotations

import pydantic
import pytest

from kpr.config import KprConfig
from kpr.netdevs import DevKind, NetDev
from kpr.pluginmanager import validate_section
from kpr.plugins.host_routing import datapath as D
from kpr.plugins.host_routing.config import HostRoutingConfig
from kpr.plugins.host_routing.discovery import Route, plan

MAC = bytes.fromhex("020000000001")
DEVS = {
    1: NetDev(1, "lo", DevKind.L3, None, None),
    2: NetDev(2, "eth0", DevKind.PHYSICAL, None, MAC),
    3: NetDev(3, "lxca", DevKind.VETH_PEER, None, MAC),
    4: NetDev(4, "cni0", DevKind.BRIDGE, None, bytes.fromhex("02000000c001")),
    5: NetDev(5, "vetb1", DevKind.VETH_PEER, 4, MAC),
    6: NetDev(6, "vxlan0", DevKind.OVERLAY, None, MAC),
    7: NetDev(7, "lxck", DevKind.NETKIT, None, None),
    8: NetDev(8, "vloc", DevKind.VETH_LOCAL, None, MAC),
    9: NetDev(9, "wg0", DevKind.OVERLAY, None, None),
}


def test_pods_from_routes_and_from_the_source() -> None:
    routes = [
        Route("10.244.1.5", 32, 3),       # a per-pod veth: a pod
        Route("fd44::5", 128, 3),
        Route("10.244.1.6", 32, 7),       # netkit: a pod
        Route("10.244.1.0", 24, 3),       # not a host route
        Route("10.244.2.0", 32, 6),       # through an overlay: not local
        Route("10.244.1.7", 32, 8),       # a host-local veth pair: not a pod
    ]
    source = {"10.245.0.11": 4, "10.244.1.5": 3, "10.244.9.9": 2, "10.244.9.10": None}
    p = plan(DEVS, routes, source, ["eth0", "eth9"])
    assert p.pods == {"10.244.1.5": 3, "fd44::5": 3, "10.244.1.6": 7, "10.245.0.11": 4}
    assert p.origin["10.244.1.5"] == "route" and p.origin["10.245.0.11"] == "source"
    assert sorted(p.not_local) == ["10.244.9.10", "10.244.9.9"]
    assert p.external == {"eth0": 2} and p.missing == ["eth9"]
    # the bridge's veth port stands for its pod's host-side device; the bridge's MAC is the gateway
    assert p.pod_devices == {"lxca": 3, "lxck": 7, "vetb1": 5}
    assert p.devices[2] == D.DevEntry(D.DEV_F_EXTERNAL, DevKind.PHYSICAL)
    assert p.devices[3] == D.DevEntry(D.DEV_F_POD, DevKind.VETH_PEER)
    assert p.devices[4] == D.DevEntry(D.DEV_F_BRIDGE, DevKind.BRIDGE)
    assert p.devices[5] == D.DevEntry(D.DEV_F_POD | D.DEV_F_L2, DevKind.VETH_PEER, "02:00:00:00:c0:01")
    assert 8 not in p.devices
    # an Ethernet overlay carries pods' traffic to other nodes (bpf_redirect_neigh); an L3 tunnel
    # is the stack's, and neither is ever a pod device (no bpf_redirect_peer into them)
    assert p.devices[6] == D.DevEntry(D.DEV_F_OVERLAY, DevKind.OVERLAY)
    assert 9 not in p.devices


def test_an_overlay_listed_as_external_device() -> None:
    p = plan(DEVS, [Route("10.244.2.0", 32, 6)], {"10.244.2.11": 6}, ["eth0", "vxlan0"])
    assert p.devices[6] == D.DevEntry(D.DEV_F_EXTERNAL | D.DEV_F_OVERLAY, DevKind.OVERLAY)
    assert p.external == {"eth0": 2, "vxlan0": 6}
    assert p.pods == {} and p.not_local == ["10.244.2.11"] and p.pod_devices == {}


def test_an_external_device_is_never_a_pod_device() -> None:
    devs = dict(DEVS)
    devs[2] = NetDev(2, "eth0", DevKind.VETH_PEER, None, MAC)  # a node whose uplink is a veth (tests, some VMs)
    p = plan(devs, [Route("10.0.0.9", 32, 2)], {"10.0.0.8": 2}, ["eth0"])
    assert p.pods == {} and p.pod_devices == {} and p.devices[2].flags == D.DEV_F_EXTERNAL


def test_config_keys_and_errors() -> None:
    cfg = HostRoutingConfig.model_validate({"redirectPeer": False, "clusterIP": False, "devices": ["eth0"]})
    assert (cfg.redirect_peer, cfg.redirect_neigh, cfg.cluster_ip) == (False, True, False)
    _, problems = validate_section("host_routing", HostRoutingConfig, {"devices": ["eth0/1"], "maxPods": 1})
    assert any(p.startswith("plugins.host_routing.devices") and "eth0/1" in p for p in problems), problems
    assert any(p.startswith("plugins.host_routing.maxPods") for p in problems), problems
    with pytest.raises(pydantic.ValidationError):
        HostRoutingConfig.model_validate({"redirectPer": True})


def test_the_plugin_is_installed() -> None:
    from kpr.pluginmanager import discover

    assert discover()["host_routing"].value == "kpr.plugins.host_routing.plugin:HostRouting"
    KprConfig.model_validate({"plugins": {"host_routing": {"enabled": True}}})
