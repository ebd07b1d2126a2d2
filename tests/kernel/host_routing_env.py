"""Shared pieces of the host_routing end-to-end tests and benchmark: one node in a network
namespace with an external client on its external device, pods on per-pod veths with /32
routes (Cilium, Calico) and pods on a Linux bridge (flannel host-gw, kubenet, bridge CNI);
and (overlay_rig) the tc_nodeport tests' two-node cluster in its vxlan layout (flannel vxlan).

    cl (10.210.0.2, fd21::2) -- eth0 node (10.210.0.1, fd21::1)
                                     |-- lxcp1 / lxcp2 -- pods p1, p2 (10.244.9.x, fd44:9::x, /32 routes)
                                     `-- cni0 (10.245.9.1/24, fd45:9::1/64) -- brb1 / brb2 -- pods b1, b2

The client routes both pod networks to the node. Every pod and the client run the tc_nodeport
tests' echo server (answers "<name> <client address>"), so a test sees who answered and from
which address. The plugin runs as the agent would, in the node's namespace, with its own
private pin directory and service map writer. Namespace names are unique per run
(kpr.testing.netns), pin directories too (scratch_pin_dir).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr.bpf.cleanup import scratch_pin_dir
from kpr.config import KprConfig
from kpr.context import PluginContext
from kpr.model import NodeInfo
from kpr.plugins.host_routing.config import HostRoutingConfig
from kpr.plugins.host_routing.plugin import HostRouting
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.netns import Topology

import tc_nodeport_env as np_env
from tc_nodeport_env import PORT, PY, SERVER, answers, client

__all__ = ["PORT", "answers", "client"]

CLIENT, CLIENT6 = "10.210.0.2", "fd21::2"
NODE, NODE6 = "10.210.0.1", "fd21::1"
VETH_PODS = {"p1": ("10.244.9.11", "fd44:9::11"), "p2": ("10.244.9.12", "fd44:9::12")}
BRIDGE_PODS = {"b1": ("10.245.9.11", "fd45:9::11"), "b2": ("10.245.9.12", "fd45:9::12")}
BRIDGE, BRIDGE_GW, BRIDGE_GW6 = "cni0", "10.245.9.1", "fd45:9::1"
BRIDGE_MAC = "02:00:00:c0:00:01"
PODS = {**VETH_PODS, **BRIDGE_PODS}


def start_server(topo: Topology, ns: str) -> None:
    proc = topo.popen(ns, [PY, "-c", SERVER, ns, str(PORT)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"server in {ns} did not start: {line!r}")


def add_veth_pod(topo: Topology, name: str, ip4: str, ip6: str, *, server: bool = True) -> None:
    topo.add_pod("node", name, ip4, ip6=ip6)
    if server:
        start_server(topo, name)


def add_bridge_pod(topo: Topology, name: str, ip4: str, ip6: str, *, server: bool = True) -> None:
    """A pod on the node's bridge: its subnet's route names the bridge, not the pod."""
    topo.add_namespace(name, "pod")
    host_if = f"br{name}"
    topo.link(name, "node", [f"{ip4}/24", f"{ip6}/64"], ifname_a="eth0", ifname_b=host_if)
    topo.run("node", ["ip", "link", "set", host_if, "master", BRIDGE])
    topo.add_route(name, "default", BRIDGE_GW)
    topo.add_route(name, "default", BRIDGE_GW6)
    if server:
        start_server(topo, name)


def build_topology(topo: Topology, *, pods: tuple[str, ...] = tuple(PODS), servers: bool = True) -> None:
    topo.add_node("node")
    topo.add_external("cl")
    topo.link("cl", "node", [f"{CLIENT}/24", f"{CLIENT6}/64"], [f"{NODE}/24", f"{NODE6}/64"],
              ifname_a="eth0", ifname_b="eth0")
    for net in ("10.244.0.0/16", "10.245.0.0/16"):
        topo.add_route("cl", net, NODE)
    for net in ("fd44::/16", "fd45::/16"):
        topo.add_route("cl", net, NODE6)
    topo.sysctl("node", {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"})
    topo.run("node", ["ip", "link", "add", BRIDGE, "type", "bridge"])
    topo.run("node", ["ip", "link", "set", BRIDGE, "address", BRIDGE_MAC, "up"])
    topo.run("node", ["ip", "addr", "add", f"{BRIDGE_GW}/24", "dev", BRIDGE])
    topo.run("node", ["ip", "addr", "add", f"{BRIDGE_GW6}/64", "dev", BRIDGE, "nodad"])
    for name in pods:
        ip4, ip6 = PODS[name]
        (add_veth_pod if name in VETH_PODS else add_bridge_pod)(topo, name, ip4, ip6, server=servers)
    if servers:
        start_server(topo, "cl")  # a backend outside the node (per-packet services' remote backend)


def plugin_context(pin: Path, devices: tuple[str, ...] = ("eth0",), node: str = "node",
                   addresses: tuple[str, ...] = (NODE, NODE6)) -> PluginContext:
    config = KprConfig.model_validate({"bpf": {"pinPath": str(pin)}, "agent": {"stateDir": str(pin)}})
    return PluginContext(
        name="host_routing",
        node=NodeInfo(node, addresses=addresses, devices=devices),
        log=logging.getLogger("kpr.plugins.host_routing"),
        config=config,
        state_dir=pin,
    )


@dataclass
class Rig:
    topo: Topology
    pin: Path
    writer: ServiceMapWriter
    plugin: HostRouting | None = None
    extra_cflags: list[str] = field(default_factory=list)
    # the namespace the plugin runs in, its addresses, and pod name -> (IPv4, IPv6) of every pod
    node: str = "node"
    addresses: tuple[str, ...] = (NODE, NODE6)
    pods: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(PODS))

    def start(self, **cfg: Any) -> HostRouting:
        """configure + start the plugin in the node's namespace, as the agent would."""
        plugin = HostRouting()
        plugin.extra_cflags = list(self.extra_cflags)
        ctx = plugin_context(self.pin, node=self.node, addresses=self.addresses)
        plugin.kpr_configure(config=HostRoutingConfig.model_validate(cfg), context=ctx)
        with self.topo[self.node].enter():
            plugin.kpr_start(context=ctx)
        self.plugin = plugin
        return plugin

    def stop(self) -> None:
        if self.plugin is not None:
            p, self.plugin = self.plugin, None
            p.kpr_stop(context=p.context)

    def stats(self) -> dict[str, int]:
        assert self.plugin is not None and self.plugin.datapath is not None
        return self.plugin.datapath.stats()

    def source_pods(self, *names: str) -> None:
        """The pod addresses the source would deliver (Pod objects on this node)."""
        assert self.plugin is not None
        self.plugin.set_source_pods([a for n in names for a in self.pods[n]])


def stopping(r: Rig) -> Iterator[Rig]:
    """For a per-test fixture over a module's rig: whatever plugin the test started is stopped
    and detached afterwards."""
    try:
        yield r
    finally:
        if r.plugin is not None:
            r.plugin.cfg = r.plugin.cfg.model_copy(update={"keep_attached_on_stop": False})
            r.stop()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


@contextlib.contextmanager
def _running(r: Rig) -> Iterator[Rig]:
    try:
        yield r
    finally:
        with contextlib.suppress(Exception):
            if r.plugin is not None:
                r.plugin.cfg = r.plugin.cfg.model_copy(update={"keep_attached_on_stop": False})
            r.stop()
        r.writer.close()


@contextlib.contextmanager
def rig(*, pods: tuple[str, ...] = tuple(PODS), servers: bool = True, prefix: str = "kpr-hr") -> Iterator[Rig]:
    with scratch_pin_dir(prefix) as pin, Topology() as topo:
        build_topology(topo, pods=pods, servers=servers)
        with _running(Rig(topo, pin, ServiceMapWriter(pin).open())) as r:
            yield r


OVERLAY_NODE, OVERLAY_DEV = "node1", np_env.VXLAN_DEV
OVERLAY_PODS = {name: (ip4, ip6) for name, (_node, ip4, ip6) in np_env.PODS.items()}


@contextlib.contextmanager
def overlay_rig(*, pods: tuple[str, ...] = ("p1a", "p1b", "p2a"), prefix: str = "kpr-hr-ovl") -> Iterator[Rig]:
    """tc_nodeport_env's cluster in its vxlan layout (flannel vxlan: each node's pods on cni0,
    the other node's pods behind flannel.1), the plugin to run on node1. The router also routes
    node1's pod subnet to node1, so the external client reaches node1's pods directly (as a
    router that learned the node's pod CIDR would); node2's pods stay reachable only through
    the overlay."""
    with scratch_pin_dir(prefix) as pin, Topology() as topo:
        np_env.build_topology(topo, second_device=False, pods=pods, layout="vxlan")
        n1 = np_env.NODES[OVERLAY_NODE]
        topo.add_route("rt", n1["pods4"], n1["addr"])
        topo.add_route("rt", n1["pods6"], n1["addr6"])
        r = Rig(topo, pin, ServiceMapWriter(pin).open(), node=OVERLAY_NODE, addresses=(n1["addr"], n1["addr6"]),
                pods=dict(OVERLAY_PODS))
        with _running(r):
            yield r
