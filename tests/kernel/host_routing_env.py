"""Shared pieces of the host_routing end-to-end tests and benchmark: one node in a network
namespace with an external client on its external device, pods on per-pod veths with /32
routes (Cilium, Calico) and pods on a Linux bridge (flannel host-gw, kubenet, bridge CNI);
and (overlay_rig) the tc_nodeport tests' two-node cluster in its vxlan layout (flannel vxlan).

    cl (10.210.0.2, fd21::2) -- eth0 node (10.210.0.1, fd21::1)
                                     |-- lxcp1 / lxcp2 -- pods p1, p2 (10.244.9.x, fd44:9::x, /32 routes)
                                     `-- cni0 (10.245.9.1/24, fd45:9::1/64) -- brb1 / brb2 -- pods b1, b2

The client routes both pod networks to the node. Every pod and the client run kpr.testing.echo's
server (answers "<name> <client address>"), so a test sees who answered and from
which address. The plugin runs as the agent would, in the node's namespace, with its own
private pin directory and service map writer. Namespace names are unique per run
(kpr.testing.netns), pin directories too (scratch_pin_dir).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kpr.context import PluginContext
from kpr.model import Backend, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.plugins.host_routing import datapath as D
from kpr.plugins.host_routing.plugin import HostRouting
from kpr.servicemaps import ServiceMapWriter
from kpr.testing import echo, harness
from kpr.testing.bpffs import scratch_pin_dir
from kpr.testing.netns import Topology, in_netns

import tc_nodeport_env as np_env
from tc_nodeport_env import PORT, PY, SERVER, answers, client

__all__ = ["PORT", "PY", "SERVER", "answers", "client"]

CLIENT, CLIENT6 = "10.210.0.2", "fd21::2"
NODE, NODE6 = "10.210.0.1", "fd21::1"
VETH_PODS = {"p1": ("10.244.9.11", "fd44:9::11"), "p2": ("10.244.9.12", "fd44:9::12")}
BRIDGE_PODS = {"b1": ("10.245.9.11", "fd45:9::11"), "b2": ("10.245.9.12", "fd45:9::12")}
BRIDGE, BRIDGE_GW, BRIDGE_GW6 = "cni0", "10.245.9.1", "fd45:9::1"
BRIDGE_MAC = "02:00:00:c0:00:01"
PODS = {**VETH_PODS, **BRIDGE_PODS}


def start_server(topo: Topology, ns: str) -> None:
    echo.start_echo(topo[ns], ns, PORT)


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
                   addresses: tuple[str, ...] = (NODE, NODE6), name: str = "host_routing") -> PluginContext:
    return harness.plugin_context(name, NodeInfo(node, addresses=addresses, devices=devices), pin)


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
        self.plugin = self.start_other(plugin, cfg, "host_routing")
        return plugin

    def start_other(self, plugin: Any, section: dict[str, Any], name: str, devices: tuple[str, ...] = ("eth0",)) -> Any:
        """Another plugin (tc_nodeport, socklb...) on the same node, pins and writer; the caller stops it."""
        ctx = plugin_context(self.pin, devices, node=self.node, addresses=self.addresses, name=name)
        return harness.start_plugin(plugin, section, ctx, netns=self.topo[self.node])

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


def rig_fixtures(make: Callable[..., Any] | None = None, *, prefix: str, delete: tuple[ServiceKey, ...] = ()) -> tuple[Any, Any]:
    """The two fixtures a test module of a rig takes, as `env, hr = rig_fixtures(prefix=...)`:
    `env`, the rig (`make`: rig or overlay_rig) once per module; `hr`, that rig for one test,
    whatever plugin it started stopped and detached afterwards and the services `delete`
    names deleted from the maps."""
    make = make or rig

    @pytest.fixture(scope="module")
    def env() -> Iterator[Rig]:
        with make(prefix=prefix) as r:
            yield r

    @pytest.fixture
    def hr(env: Rig) -> Iterator[Rig]:
        try:
            yield from stopping(env)
        finally:
            for key in delete:
                env.writer.delete(key)

    return env, hr


def sent_out(d: dict[str, int]) -> int:
    """Packets host_routing sent out of the node through an external device: by bpf_redirect_neigh
    (a pair's first packets, and one at least every few seconds) or by bpf_redirect with the
    remembered next hop's MACs (KPR_HR_OUT_CACHE 2, the rest)."""
    return d.get("redirect_neigh", 0) + d.get("redirect_out", 0)


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


# ---------------------------------------------------------------------- BPF_PROG_TEST_RUN lab

NODE4, LAB_NODE6 = "10.0.0.1", "fd00::1"  # the lab node's eth0
OUT4, OUT6 = "10.0.0.2", "fd00::2"
POD4, POD6 = "10.244.1.10", "fd00:244:1::10"
FAR4 = "192.0.2.50"  # somewhere outside, via OUT4
REMOTE4, REMOTE6 = "10.244.2.10", "fd00:244:2::10"  # another node's pod, behind the vxlan device
REMOTE_NET4, REMOTE_NET6 = "10.244.2.0/24", "fd00:244:2::/64"
VTEP4, VTEP6 = "10.244.2.0", "fd00:244:2::f"  # that node's address on the overlay (flannel's choice)
CIP, CIP_EMPTY = "10.96.0.10", "10.96.0.11"
MAC_OUT, MAC_POD, MAC_VTEP = "02:00:00:00:00:02", "02:00:00:00:01:10", "02:00:00:00:02:00"
LAB_OVERLAY = "vx0"


@dataclass
class Lab:
    topo: Topology
    dp: D.Datapath
    eth0: int
    lxc: int
    mac: str  # eth0's
    lxc_mac: str
    overlay: int  # the vxlan device's ifindex
    overlay_mac: str

    @staticmethod
    def ctx(ifindex: int) -> bytes:
        # struct __sk_buff up to ifindex (ingress_ifindex, ifindex): the skb is on that device
        return struct.pack("=11I", 0, 0, 0, 0, 0, 0, 0, 0, 0, ifindex, ifindex)

    def run(self, prog: str, ifindex: int, case: Any, counter: str) -> None:
        """One kpr.testing.prog_run Case through `prog` on the device `ifindex`; `counter` must
        move by exactly one."""
        from kpr.testing.prog_run import run_cases

        case.ctx = self.ctx(ifindex)
        before = self.dp.stats()
        with in_netns(self.topo["hr"].path):
            run_cases(self.dp.fd(prog), [case], kind="tc")
        moved = self.dp.stats()[counter] - before[counter]
        assert moved == 1, f"{case.description}: counter {counter} moved by {moved}"


@contextlib.contextmanager
def prog_lab(prefix: str, *, helpers: D.Helpers = D.Helpers(peer=True, neigh=True),
             extra_cflags: tuple[str, ...] = ()) -> Iterator[Lab]:
    """A namespace shaped like a node for BPF_PROG_TEST_RUN: an external veth eth0 (the outside
    at OUT4/OUT6, default route), one pod on a veth with /32 and /128 routes, a vxlan device
    with another node's pods behind it (routed via its VTEP address onlink, as flannel does),
    permanent neighbour entries everywhere; a ClusterIP CIP:80 -> FAR4:8080 and CIP_EMPTY:80
    without backends; the programs loaded and their maps filled as the plugin's sync would."""
    from kpr.netdevs import classify
    from kpr.plugins.host_routing.discovery import Route, plan

    with scratch_pin_dir(prefix) as pin, Topology() as topo:
        topo.add_node("hr")
        topo.add_namespace("out")
        topo.link("hr", "out", [f"{NODE4}/24", f"{LAB_NODE6}/64"], [f"{OUT4}/24", f"{OUT6}/64"],
                  ifname_a="eth0", ifname_b="eth0")
        topo.add_pod("hr", "pod", POD4, ip6=POD6)
        hr = topo["hr"]
        lxc = next(i for i in hr.ifaces if i.startswith("lxc"))
        hr.run(f"ip neigh replace {OUT4} lladdr {MAC_OUT} dev eth0 nud permanent && "
               f"ip -6 neigh replace {OUT6} lladdr {MAC_OUT} dev eth0 nud permanent && "
               f"ip neigh replace {POD4} lladdr {MAC_POD} dev {lxc} nud permanent && "
               f"ip -6 neigh replace {POD6} lladdr {MAC_POD} dev {lxc} nud permanent && "
               f"ip route replace default via {OUT4} && "
               f"ip link add {LAB_OVERLAY} type vxlan id 1 local {NODE4} dev eth0 dstport 8472 nolearning && "
               f"ip link set {LAB_OVERLAY} up && "
               f"ip route replace {REMOTE_NET4} via {VTEP4} dev {LAB_OVERLAY} onlink && "
               f"ip -6 route replace {REMOTE_NET6} via {VTEP6} dev {LAB_OVERLAY} onlink && "
               f"ip neigh replace {VTEP4} lladdr {MAC_VTEP} dev {LAB_OVERLAY} nud permanent && "
               f"ip -6 neigh replace {VTEP6} lladdr {MAC_VTEP} dev {LAB_OVERLAY} nud permanent")
        writer = ServiceMapWriter(pin).open()
        backend = (Backend(FAR4, 8080, node_name="other"),)
        writer.upsert(Service(ServiceKey("t", "cip"), (
            Frontend(FrontendType.CLUSTER_IP, CIP, 80, Protocol.TCP, backend),
            Frontend(FrontendType.CLUSTER_IP, CIP_EMPTY, 80, Protocol.TCP, ()),
        )))
        dp = None
        try:
            dp = D.Datapath(pin, helpers, extra_cflags=extra_cflags).load()
            devs = classify(hr.netns)
            routes = [Route(POD4, 32, topo.ifindex("hr", lxc)), Route(POD6, 128, topo.ifindex("hr", lxc))]
            p = plan(devs, routes, {}, ["eth0"])  # what the plugin's sync computes
            dp.set_devices(p.devices)
            dp.set_pods(p.pods)
            yield Lab(topo, dp, topo.ifindex("hr", "eth0"), topo.ifindex("hr", lxc), topo.mac("hr", "eth0"),
                      topo.mac("hr", lxc), topo.ifindex("hr", LAB_OVERLAY), topo.mac("hr", LAB_OVERLAY))
        finally:
            if dp is not None:
                dp.close()
            writer.close()
