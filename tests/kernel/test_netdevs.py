"""kpr.netdevs against real links in a throw-away namespace: each kind of device is classified
as what it is, and the watcher follows links coming and going (netlink events, not polling)."""

from __future__ import annotations

import os
import threading

import pytest
from kpr.netdevs import DevKind, DeviceWatcher, NetDev, classify
from kpr.testing.netns import Topology
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel


def _by_name(devs: dict[int, NetDev]) -> dict[str, NetDev]:
    return {d.name: d for d in devs.values()}


def test_classify_each_kind(topology: Topology) -> None:
    node = topology.add_node("node")
    topology.add_namespace("pod")
    topology.link("node", "pod", ifname_a="lxcpod", ifname_b="eth0")
    ns = node.netns
    for cmd in (
        "ip link add vloca type veth peer name vlocb",
        "ip link add cni0 type bridge",
        "ip link add brp type veth peer name brpeer",
        "ip link set brp master cni0",
        "ip link add flannel.1 type vxlan id 1 dstport 8472 local 192.0.2.1 nolearning",
        "ip link add nic0 link vloca type macvlan",  # (no dummy module on every kernel)
        "ip tuntap add dev tun0 mode tun",
    ):
        node.run(cmd)
    devs = _by_name(classify(ns))
    want = {
        "lo": DevKind.L3,
        "lxcpod": DevKind.VETH_PEER,
        "vloca": DevKind.VETH_LOCAL,
        "vlocb": DevKind.VETH_LOCAL,
        "cni0": DevKind.BRIDGE,
        "brp": DevKind.VETH_LOCAL,
        "flannel.1": DevKind.OVERLAY,
        "nic0": DevKind.PHYSICAL,  # any other Ethernet device
        "tun0": DevKind.L3,
    }
    assert {n: devs[n].kind for n in want} == want
    assert devs["brp"].master == devs["cni0"].ifindex
    assert devs["lxcpod"].master is None
    assert devs["lxcpod"].mac == bytes.fromhex(topology.mac("node", "lxcpod").replace(":", ""))
    assert devs["tun0"].mac is None and devs["lo"].mac is None
    assert devs["cni0"].ifindex == topology.ifindex("node", "cni0")


def test_classify_missing_namespace_is_an_error() -> None:
    name = f"kpr-h4-missing-{os.getpid()}"
    with pytest.raises(FileNotFoundError, match=name):
        classify(name)
    with pytest.raises(FileNotFoundError, match=name):
        DeviceWatcher(lambda d: None, netns=name).start()
    assert not os.path.exists(f"/run/netns/{name}")  # and nothing was created by asking


def test_watcher_follows_links(topology: Topology) -> None:
    node = topology.add_node("node")
    calls: list[dict[int, NetDev]] = []
    lock = threading.Lock()

    def on_change(devs: dict[int, NetDev]) -> None:
        with lock:
            calls.append(devs)

    def told() -> dict[str, NetDev]:
        # The watcher keeps `devices` a moment before it calls on_change: a test of what the
        # callback was told waits for the call itself.
        with lock:
            return _by_name(calls[-1])

    w = DeviceWatcher(on_change, netns=node.netns).start()
    try:
        assert len(calls) == 1 and set(_by_name(calls[0])) == {"lo"}
        assert w.devices == calls[0]
        # a veth pair is several link messages; the watcher reports the pair once it is whole
        node.run("ip link add wa type veth peer name wb")
        wait_for(lambda: {"wa", "wb"} <= set(told()), 10, "the veth pair told")
        assert _by_name(w.devices)["wa"].kind is DevKind.VETH_LOCAL
        # moving one end to another namespace changes the other's kind
        topology.add_namespace("pod")
        node.run(f"ip link set wb netns {topology.netns_name('pod')}")
        wait_for(lambda: "wb" not in _by_name(w.devices), 5, "wb gone")
        wait_for(lambda: _by_name(w.devices)["wa"].kind is DevKind.VETH_PEER, 5, "wa seen as a pod veth")
        node.run("ip link add cni0 type bridge && ip link set wa master cni0")
        wait_for(lambda: _by_name(w.devices).get("wa", None) and _by_name(w.devices)["wa"].master, 5, "wa enslaved")
        assert _by_name(w.devices)["wa"].master == _by_name(w.devices)["cni0"].ifindex
        node.run("ip link del cni0")
        # (told what devices holds: every earlier call is in, cni0's coming and going too)
        wait_for(lambda: "cni0" not in told() and told() == _by_name(w.devices), 10, "cni0 gone, told")
        n = len(calls)
        # a change that does not alter any NetDev (carrier, mtu) calls nobody
        node.run("ip link set wa mtu 1400")
        node.run("ip link add probe0 link wa type macvlan")
        wait_for(lambda: "probe0" in told(), 10, "probe0 told")
        with lock:  # the mtu change alone made no call: every later call already has probe0
            assert calls[n:] and all("probe0" in _by_name(c) for c in calls[n:])
        assert w.errors == 0
    finally:
        w.stop()
    assert w._thread is None
    # stopped: no more calls
    n = len(calls)
    node.run("ip link add late0 type veth peer name late1")
    assert len(calls) == n


def test_watcher_in_callers_namespace(topology: Topology) -> None:
    node = topology.add_node("node")
    seen: list[dict[int, NetDev]] = []
    with node.enter():
        w = DeviceWatcher(seen.append).start()
    try:
        node.run("ip link add only0 type veth peer name only1")
        wait_for(lambda: "only0" in _by_name(w.devices), 5, "a link of the caller's namespace")
        assert set(_by_name(w.devices)) == {"lo", "only0", "only1"}
    finally:
        w.stop()


def test_watcher_callback_error_is_counted(topology: Topology) -> None:
    node = topology.add_node("node")
    fail = threading.Event()

    def on_change(devs: dict[int, NetDev]) -> None:
        if fail.is_set():
            raise RuntimeError("boom")

    w = DeviceWatcher(on_change, netns=node.netns).start()
    try:
        fail.set()
        node.run("ip link add d0 type veth peer name d0p")
        wait_for(lambda: w.errors == 1, 5, "the failed callback counted")
        fail.clear()
        node.run("ip link add d1 type veth peer name d1p")
        wait_for(lambda: "d1" in _by_name(w.devices), 5, "the watcher carries on")
    finally:
        w.stop()


def test_running_says_whether_events_are_followed(topology: Topology) -> None:
    node = topology.add_node("node")
    w = DeviceWatcher(lambda d: None, netns=node.netns)
    assert not w.running
    w.start()
    try:
        assert w.running
    finally:
        w.stop()
    assert not w.running
    w.stop()  # a second stop is harmless
