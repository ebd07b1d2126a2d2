"""Shared pieces of the tc_nodeport end-to-end tests and benchmark: a two-node cluster in
network namespaces with an external client behind a router, pods that report the client
address they see, and tc_nodeport plugins driven together with the service map writer
(services directly, or Kubernetes objects through each node's own object store).

    cl (10.100.0.2, fd10::2) -- rt -- node1 eth0 (10.0.1.10, fd01::10) -- pods p1a, p1b
                                 \\-- node2 eth0 (10.0.2.10, fd02::10) -- pods p2a, p2b
    cl2 (10.101.0.2) -- node1 eth1 (10.101.0.1)              (a second external device)

The router sends the LoadBalancer/External IPs (203.0.113.0/26, 2001:db8:f::/64) to node1
and the pod networks to their nodes. Every node and the router forward; clients have no
route off the machine. Each node has its own private bpffs and writer, as real nodes would.

Pods are laid out one of three ways (LAYOUTS), as the common pod networks do:
  veth:   one veth per pod, a /32 (/128) host route to it, the node answering for a link-local
          gateway on it (Cilium, Calico);
  bridge: the pods' veths are ports of a Linux bridge cni0 that holds the pod subnet's
          gateway (.1); the router routes each pod subnet to its node (flannel host-gw,
          kubenet, the bridge CNI plugin);
  vxlan:  pods on cni0 as in bridge, and the other node's pods behind a vxlan device
          flannel.1 (VNI 1, port 8472, 10.244.N.0/32 on it), routed "via 10.244.M.0 dev
          flannel.1 onlink" with a permanent neighbour and a static FDB entry for the other
          node's VTEP, as flannel's vxlan backend programs them; the router knows no pod
          subnet. Both nodes list flannel.1 among their devices (a DSR'd packet is stripped
          where it arrives: on the overlay device).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr.bpf.cleanup import scratch_pin_dir
from kpr.context import PluginContext
from kpr.model import Backend, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.plugins.tc_nodeport.plugin import TcNodePort
from kpr.servicemaps import ServiceMapWriter
from kpr.sources import ObjectRef
from kpr.store import ObjectStore
from kpr.testing import echo, harness
from kpr.testing.agent import AgentConfig
from kpr.testing.echo import PY, name_and_peer
from kpr.testing.harness import PluginHarness
from kpr.testing.netns import Topology

__all__ = ["PY", "name_and_peer"]  # the kit's, imported from here by the tests

CLIENT, CLIENT6, CLIENT2 = "10.100.0.2", "fd10::2", "10.101.0.2"
NODES = {
    "node1": {"addr": "10.0.1.10", "addr6": "fd01::10", "rt": "10.0.1.1", "rt6": "fd01::1", "pods4": "10.244.1.0/24", "pods6": "fd44:1::/64"},
    "node2": {"addr": "10.0.2.10", "addr6": "fd02::10", "rt": "10.0.2.1", "rt6": "fd02::1", "pods4": "10.244.2.0/24", "pods6": "fd44:2::/64"},
}
NODE1_ETH1 = "10.101.0.1"
PODS = {
    "p1a": ("node1", "10.244.1.11", "fd44:1::11"),
    "p1b": ("node1", "10.244.1.12", "fd44:1::12"),
    "p2a": ("node2", "10.244.2.11", "fd44:2::11"),
    "p2b": ("node2", "10.244.2.12", "fd44:2::12"),
}
PORT = 8080
NP, LB = FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER
TCP, UDP = Protocol.TCP, Protocol.UDP
VIP_NET, VIP6_NET = "203.0.113.0/26", "2001:db8:f::/64"

# Pods run kpr.testing.echo's server: "<name> <client address>" on TCP (then echoes) and UDP,
# dual-stack on [::]:PORT. CLIENT_SCRIPT is kpr.testing.echo's client; `client()` below runs
# it with this module's defaults (see there).
SERVER, CLIENT_SCRIPT = echo.SERVER, echo.CLIENT


LAYOUTS = ("veth", "bridge", "vxlan")
VXLAN_DEV, VXLAN_VNI, VXLAN_PORT, VXLAN_MTU = "flannel.1", 1, 8472, 1450


def vtep4(node: str) -> str:
    """The node's address on flannel.1: its pod subnet's network address (flannel's choice)."""
    return NODES[node]["pods4"].split("/")[0]


def vtep6(node: str) -> str:
    return NODES[node]["pods6"].split("/")[0] + "f"


def pod_gateways(node: str) -> tuple[str, str]:
    """The gateway cni0 holds in the bridge and vxlan layouts (the subnet's first address)."""
    return NODES[node]["pods4"].split("/")[0][:-1] + "1", NODES[node]["pods6"].split("/")[0] + "1"


def _bridge(topo: Topology, node: str) -> None:
    gw4, gw6 = pod_gateways(node)
    topo.run(node, f"ip link add cni0 type bridge && ip addr add {gw4}/24 dev cni0 && "
                   f"ip -6 addr add {gw6}/64 dev cni0 nodad && ip link set cni0 up")


def _bridge_pod(topo: Topology, node: str, pod: str, ip4: str, ip6: str) -> None:
    gw4, gw6 = pod_gateways(node)
    topo.add_namespace(pod, "pod")
    host_if = f"veth{pod}"
    topo.link(pod, node, [f"{ip4}/24", f"{ip6}/64"], ifname_a="eth0", ifname_b=host_if)
    topo.run(node, f"ip link set {host_if} master cni0")
    topo.add_route(pod, "default", gw4)
    topo.add_route(pod, "default", gw6)


def _vxlan(topo: Topology) -> None:
    for name, n in NODES.items():
        topo.run(name, f"ip link add {VXLAN_DEV} type vxlan id {VXLAN_VNI} local {n['addr']} dev eth0 "
                       f"dstport {VXLAN_PORT} nolearning && ip link set {VXLAN_DEV} mtu {VXLAN_MTU} up && "
                       f"ip addr add {vtep4(name)}/32 dev {VXLAN_DEV} && "
                       f"ip -6 addr add {vtep6(name)}/128 dev {VXLAN_DEV} nodad")
    for name in NODES:
        for other, o in NODES.items():
            if other == name:
                continue
            mac = topo.mac(other, VXLAN_DEV)
            topo.run(name, f"ip route replace {o['pods4']} via {vtep4(other)} dev {VXLAN_DEV} onlink && "
                           f"ip -6 route replace {o['pods6']} via {vtep6(other)} dev {VXLAN_DEV} onlink && "
                           f"ip neigh replace {vtep4(other)} lladdr {mac} dev {VXLAN_DEV} nud permanent && "
                           f"ip -6 neigh replace {vtep6(other)} lladdr {mac} dev {VXLAN_DEV} nud permanent && "
                           f"bridge fdb append {mac} dev {VXLAN_DEV} dst {o['addr']}")


def layout_devices(layout: str, node: str) -> tuple[str, ...]:
    """node.devices of a node in `layout` (no second external device)."""
    return ("eth0", VXLAN_DEV) if layout == "vxlan" else ("eth0",)


def build_topology(topo: Topology, *, second_device: bool = True, pods: tuple[str, ...] = tuple(PODS),
                   layout: str = "veth") -> None:
    """The two-node cluster with its pods laid out as `layout` says (LAYOUTS)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    topo.add_router("rt")
    topo.add_external("cl")
    topo.link("rt", "cl", ["10.100.0.1/24", "fd10::1/64"], [f"{CLIENT}/24", f"{CLIENT6}/64"])
    topo.add_route("cl", "default", "10.100.0.1")
    topo.add_route("cl", "default", "fd10::1")
    for name, n in NODES.items():
        topo.add_node(name)
        topo.link("rt", name, [f"{n['rt']}/24", f"{n['rt6']}/64"], [f"{n['addr']}/24", f"{n['addr6']}/64"])
        topo.add_route(name, "default", n["rt"])
        topo.add_route(name, "default", n["rt6"])
        if layout != "vxlan":  # an overlay's pod subnets are the nodes' business only
            topo.add_route("rt", n["pods4"], n["addr"])
            topo.add_route("rt", n["pods6"], n["addr6"])
        if layout != "veth":
            _bridge(topo, name)
    topo.add_route("rt", VIP_NET, NODES["node1"]["addr"])
    topo.add_route("rt", VIP6_NET, NODES["node1"]["addr6"])
    for ns in ("rt", "node1", "node2"):
        topo.sysctl(ns, {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"})
    if second_device:
        topo.add_external("cl2")
        topo.link("node1", "cl2", f"{NODE1_ETH1}/24", f"{CLIENT2}/24")
        topo.add_route("cl2", "default", NODE1_ETH1)
    if layout == "vxlan":
        _vxlan(topo)
    for pod in pods:
        node, ip4, ip6 = PODS[pod]
        if layout == "veth":
            topo.add_pod(node, pod, ip4, ip6=ip6)
        else:
            _bridge_pod(topo, node, pod, ip4, ip6)
        echo.start_echo(topo[pod], pod, PORT)


def backends(node: str, *pods: str, v6: bool = False, **kw: Any) -> tuple[Backend, ...]:
    """Backends as `node`'s kpr sees them (local when the pod runs there)."""
    return tuple(
        Backend(PODS[p][2 if v6 else 1], PORT, node_name=PODS[p][0], local=PODS[p][0] == node, **kw) for p in pods
    )


def client(topo: Topology, *args: Any, ns: str = "cl", timeout: float = 60) -> list[dict]:
    """kpr.testing.echo's client in `ns`, as these tests use it: "udp" is a connected socket
    (replies from another address than the one dialled are not taken: the reverse NAT must
    be right), sockets time out after 2 s unless timeout=S says otherwise."""
    mode, *rest = map(str, args)
    if not any(a.startswith("timeout=") for a in rest):
        rest.append("timeout=2")
    return echo.client(topo[ns], "udpconn" if mode == "udp" else mode, *rest, timeout=timeout)


# A failed attempt is its error's name among the answers: these tests expect some.
answers = echo.answers_or_errors


def node_info(node: str, devices: tuple[str, ...] = ("eth0",)) -> NodeInfo:
    """The node facts `node`'s agent would have with these devices."""
    addrs = (NODES[node]["addr"], NODES[node]["addr6"]) + ((NODE1_ETH1,) if "eth1" in devices else ())
    return NodeInfo(node, addresses=addrs, devices=devices)


def plugin_context(pin: Path, node: str, devices: tuple[str, ...], state_dir: Path | None = None,
                   name: str = "tc_nodeport") -> PluginContext:
    return harness.plugin_context(name, node_info(node, devices), pin, state_dir=state_dir)


def node_harness(topo: Topology, node: str, pin: Path, devices: tuple[str, ...] = ("eth0",)) -> PluginHarness:
    """`node`'s agent without a source: its writer on `pin` and the bus (kpr.testing.harness),
    plugins started in the node's namespace with the NodePort facility they require."""
    h = PluginHarness(node_info(node, devices), pin, netns=topo[node])
    h.open_writer()
    return h


def _node(h: PluginHarness, devices: tuple[str, ...] | None) -> NodeInfo | None:
    return node_info(h.node.name, devices) if devices is not None else None


def start_plugin(h: PluginHarness, devices: tuple[str, ...] | None = None, *,
                 extra_cflags: Iterable[str] = (), **cfg: Any) -> TcNodePort:
    """configure + start a TcNodePort on the harness's node, in its namespace, as the agent runs
    there (devices: other node.devices than the harness's, as an agent restarted with another
    config has; extra_cflags: a changed program, as an upgrade brings)."""
    plugin = TcNodePort()
    plugin.extra_cflags = list(extra_cflags)
    return h.start(plugin, cfg, name="tc_nodeport", node=_node(h, devices))


def nodeport(name: str, port: int, *pods: str, proto: Protocol = TCP, local_policy: bool = False, hc: int = 0,
             v6: bool = False, annotations: tuple = ()) -> Any:
    """A NodePort service as each node's kpr would receive it (frontends on that node's addresses)."""

    def make(node: str) -> Service:
        fes = [Frontend(NP, NODES[node]["addr"], port, proto, backends(node, *pods), external_local=local_policy,
                        health_check_node_port=hc)]
        if v6:
            fes.append(Frontend(NP, NODES[node]["addr6"], port, proto, backends(node, *pods, v6=True),
                                external_local=local_policy, health_check_node_port=hc))
        if node == "node1":
            fes.append(Frontend(NP, NODE1_ETH1, port, proto, backends(node, *pods), external_local=local_policy,
                                health_check_node_port=hc))
        return Service(ServiceKey("default", name), tuple(fes), annotations=annotations)

    return make


def loadbalancer(name: str, vip: str, *pods: str, proto: Protocol = TCP, mode: str = "", port: int = 80,
                 local_policy: bool = False, ranges: tuple[str, ...] = ()) -> Any:
    ann = (("service.kpr.io/lb-mode", mode),) if mode else ()

    def make(node: str) -> Service:
        fe = Frontend(LB, vip, port, proto, backends(node, *pods, v6=":" in vip), external_local=local_policy,
                      source_ranges=ranges)
        return Service(ServiceKey("default", name), (fe,), annotations=ann)

    return make


ServiceFactory = Callable[[str], Service]


@dataclass
class Cluster:
    topo: Topology
    pins: dict[str, Path]
    # each node's agent without a source: its writer, the bus, the NodePort facility
    harnesses: dict[str, PluginHarness]
    plugins: dict[str, TcNodePort] = field(default_factory=dict)
    applied: dict[ServiceKey, ServiceFactory] = field(default_factory=dict)
    # more plugins on a node, given every service as well (xdp_nodeport in front of tc_nodeport)
    extra: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def writers(self) -> dict[str, ServiceMapWriter]:
        return {n: h.writer for n, h in self.harnesses.items()}

    @property
    def stores(self) -> dict[str, ObjectStore]:
        """Each node's object store (the objects `feed` gave it)."""
        return {n: h.store for n, h in self.harnesses.items() if h.store is not None}

    def apply(self, factory: ServiceFactory) -> None:
        """One bus dispatch on every node: the writer first, then the facility and the plugins."""
        for node, h in self.harnesses.items():
            svc = factory(node)
            h.apply(svc)
            self.applied[svc.key] = factory

    def delete(self, key: ServiceKey) -> None:
        for h in self.harnesses.values():
            h.delete(key)
        self.applied.pop(key, None)

    def feed(self, *objs: dict, gone: Iterable[ObjectRef] = ()) -> None:
        """Kubernetes objects (Pods, Services, ...) in and `gone` refs out of each node's own
        object store, as each node's agent has one: a model change a store publishes is one
        dispatch on its node only."""
        for h in self.harnesses.values():
            h.feed(*objs, gone=gone)

    def stop(self, node: str) -> None:
        """Stop the node's plugin, as its agent does (the facility too when nothing else needs it)."""
        self.harnesses[node].stop(self.plugins.pop(node))

    def clear(self) -> None:
        """Delete every service applied or published by a store, and forget the objects fed."""
        for h in self.harnesses.values():
            h.clear()
        self.applied.clear()

    def stats(self, node: str) -> dict[str, int]:
        dp = self.plugins[node].datapath
        assert dp is not None
        return dp.stats()


@contextlib.contextmanager
def cluster(*, start: bool = True, second_device: bool = True, **cfg: Any) -> Iterator[Cluster]:
    with scratch_pin_dir("kpr-np-n1") as pin1, scratch_pin_dir("kpr-np-n2") as pin2, Topology() as topo:
        build_topology(topo, second_device=second_device)
        pins = {"node1": pin1, "node2": pin2}
        devices = {"node1": ("eth0", "eth1") if second_device else ("eth0",), "node2": ("eth0",)}
        with _stopping(topo, pins, devices) as c:
            if start:
                for node, h in c.harnesses.items():
                    c.plugins[node] = start_plugin(h, **cfg)
            yield c


@contextlib.contextmanager
def _stopping(topo: Topology, pins: dict[str, Path], devices: dict[str, tuple[str, ...]]) -> Iterator[Cluster]:
    """A Cluster with a harness per node; on exit every plugin is stopped (the extra ones, started
    last, first), then the facilities, and the writers closed."""
    with contextlib.ExitStack() as stack:
        harnesses = {n: stack.enter_context(node_harness(topo, n, p, devices[n])) for n, p in pins.items()}
        yield Cluster(topo, pins, harnesses)


TCX = 0  # tc_filters() lists tcx programs at "pref" 0: they run before every clsact filter


def tc_filters(topo: Topology, ns: str, dev: str, direction: str) -> list[tuple[int, str]]:
    """(pref, name) of the BPF programs at one hook: tcx programs (pref TCX, in the order
    they run, from BPF_PROG_QUERY) then clsact filters as tc(8) shows them."""
    import socket

    from kpr.plugins.tc_nodeport.attach import tcx_programs

    with topo[ns].enter():
        try:
            rows = [(TCX, name) for _pid, name in tcx_programs(socket.if_nametoindex(dev), direction)]
        except OSError:
            rows = []
    out = topo.run(ns, ["tc", "-j", "filter", "show", "dev", dev, direction]).stdout
    for f in json.loads(out or "[]"):
        opts = f.get("options") or {}
        if f.get("kind") == "bpf" and "handle" in opts:
            rows.append((int(f["pref"]), opts.get("bpf_name", "")))
    return [r for r in rows if r[0] == TCX] + sorted(r for r in rows if r[0] != TCX)


# ---------------------------------------------------------------------- XDP

XDP_FLAGS_DRV_MODE = 1 << 2

# Turns transmit checksum offload off on a device (legacy ETHTOOL_STXCSUM ioctl; no ethtool
# binary needed). A veth hands the peer CHECKSUM_PARTIAL packets; an XDP program that redirects
# one loses that state, so the receiver would see the bare pseudo-header sum. Senders on real
# wires always send full checksums: the test's senders do too.
TX_CSUM = r"""
import ctypes, fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for dev in sys.argv[2:]:
    buf = ctypes.create_string_buffer(struct.pack("II", 0x17, int(sys.argv[1])), 8)  # ETHTOOL_STXCSUM, 0 off / 1 on
    fcntl.ioctl(s, 0x8946, struct.pack("16sP", dev.encode(), ctypes.addressof(buf)))  # SIOCETHTOOL
"""

PASS = "int kpr_t_xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"


def xdp_on(topo: Topology, ns: str, dev: str) -> list[tuple[int, str]]:
    """(ip's mode number: 1 native, 2 generic; program name) of the XDP programs on a device."""
    links = json.loads(topo.run(ns, ["ip", "-j", "-d", "link", "show", "dev", dev]).stdout or "[]")
    xdp = (links[0] if links else {}).get("xdp") or {}
    return sorted((int(a.get("mode", 0)), (a.get("prog") or {}).get("name", ""))
                  for a in (xdp.get("attached") or ([xdp] if xdp.get("prog") else [])))


def dev_with(topo: Topology, ns: str, addr: str) -> str:
    for link in json.loads(topo.run(ns, ["ip", "-j", "addr", "show"]).stdout):
        if any(a.get("local") == addr for a in link.get("addr_info", [])):
            return str(link["ifname"])
    raise LookupError(f"no device with {addr} in {ns}")


@contextlib.contextmanager
def peer_pass(topo: Topology, ns: str, dev: str) -> Iterator[None]:
    """A bare XDP_PASS program on `dev` in `ns`, so frames redirected into its veth peer arrive."""
    from bcc import BPF

    from kpr.bpf.loader import compile_and_load, load_prog

    b = compile_and_load(PASS, name="xdp-pass")
    try:
        fn = load_prog(b, "kpr_t_xdp_pass", "XDP")
        with topo[ns].enter():
            BPF.attach_xdp(dev.encode(), fn, XDP_FLAGS_DRV_MODE)  # bcc wants bytes
        try:
            yield
        finally:
            with topo[ns].enter():
                BPF.remove_xdp(dev.encode(), XDP_FLAGS_DRV_MODE)
    finally:
        b.cleanup()


def full_checksums(topo: Topology, *namespaces: str, on: bool = True) -> None:
    """Each namespace's eth0 sends full checksums (transmit offload off), or with `on=False`
    offloads them again (the default of a veth)."""
    for ns in namespaces:
        topo.run(ns, [sys.executable, "-c", TX_CSUM, "0" if on else "1", "eth0"])


def start_xdp(h: PluginHarness, devices: tuple[str, ...] | None = None, **cfg: Any) -> Any:
    from kpr.plugins.xdp_nodeport.plugin import XdpNodePort

    # The context's name stays tc_nodeport's, as these tests always had it.
    return h.start(XdpNodePort(), cfg, name="tc_nodeport", node=_node(h, devices))


# ---------------------------------------------------------------------- the three pod layouts


@contextlib.contextmanager
def layout_cluster(layout: str, plugin: str = "tc_nodeport", **cfg: Any) -> Iterator[Cluster]:
    """Both nodes in `layout` (LAYOUTS) with tc_nodeport on their devices; plugin="xdp_nodeport"
    puts xdp_nodeport on node1 as well (in front of tc_nodeport, whose egress program gives the
    replies of node1's own pods the frontend's address: XDP has no egress hook), with what XDP
    on veths needs (an XDP program on the router's side of node1's link, full checksums from
    every sender)."""
    if plugin not in ("tc_nodeport", "xdp_nodeport"):
        raise ValueError(f"plugin {plugin!r}")
    with contextlib.ExitStack() as stack:
        pin1 = stack.enter_context(scratch_pin_dir("kpr-np-l1"))
        pin2 = stack.enter_context(scratch_pin_dir("kpr-np-l2"))
        topo = stack.enter_context(Topology())
        build_topology(topo, second_device=False, layout=layout)
        pins = {"node1": pin1, "node2": pin2}
        c = stack.enter_context(_stopping(topo, pins, {n: layout_devices(layout, n) for n in NODES}))
        for node, h in c.harnesses.items():
            c.plugins[node] = start_plugin(h, **cfg)
        if plugin == "xdp_nodeport":
            full_checksums(topo, "cl", *PODS)
            h1 = c.harnesses["node1"]
            stack.enter_context(peer_pass(topo, "rt", dev_with(topo, "rt", NODES["node1"]["rt"])))
            xcfg = {k: v for k, v in cfg.items() if k != "mode"}
            c.extra.append(("node1", start_xdp(h1, xdp_mode="auto", health_check=False, **xcfg)))
        yield c


# ---------------------------------------------------------------------- restarts under load

NP_RESTART_PORT = 30070  # the restart rig's NodePort (-> p1a on node1, p2a on node2)


def nodeport_manifests(pods: tuple[str, ...] = ("p1a", "p2a")) -> str:
    eps = "".join(f"  - addresses: [{PODS[p][1]}]\n    nodeName: {PODS[p][0]}\n" for p in pods)
    return (
        "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: default}\n"
        f"spec:\n  type: NodePort\n  clusterIP: 10.96.9.70\n"
        f"  ports: [{{name: http, port: 80, targetPort: {PORT}, nodePort: {NP_RESTART_PORT}}}]\n"
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        "metadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}\n"
        f"addressType: IPv4\nports: [{{name: http, port: {PORT}, protocol: TCP}}]\nendpoints:\n{eps}"
    )


@contextlib.contextmanager
def nodeport_restart_rig(name: str = "kpr-np-restart", *, keep_attached: bool = True, plugin: str = "tc_nodeport",
                         pods: tuple[str, ...] = ("p1a", "p2a"), section: dict[str, Any] | None = None) -> Iterator[Any]:
    """A NodePort plugin (tc_nodeport, or xdp_nodeport with `section` {"xdpMode": "native"} and
    remote pods only) under restarts: `kpr run` in node1's namespace on eth0
    (socklb_env.AgentRig), the NodePort NP_RESTART_PORT to `pods`, the load from the external
    client; the agent is killed and everything it attached removed (`kpr cleanup`) afterwards."""
    import tempfile

    from socklb_env import AgentRig

    n = NODES["node1"]
    with scratch_pin_dir(name) as pin, Topology() as topo, tempfile.TemporaryDirectory(prefix=f"{name}-") as work:
        build_topology(topo, second_device=False, pods=pods)
        agent = AgentConfig(Path(work), pin, addresses=(n["addr"], n["addr6"]), devices=("eth0",), shutdown_timeout=None)
        agent.plugin(plugin, keepAttachedOnStop=keep_attached, **(section or {}))
        rig = AgentRig(topo, pin, Path(work), "", nodeport_manifests(pods), agent_ns="node1", load_ns="cl", agent=agent)
        rig.write_config()
        try:
            yield rig
        finally:
            rig.kill()


def on_node_address(name: str, port: int, *pods: str, proto: Protocol = UDP, type_: FrontendType = NP,
                    annotations: tuple = (), **fe: Any) -> ServiceFactory:
    """A service with one frontend on each node's own address (fe: Frontend's other fields,
    e.g. external_local, source_ranges, affinity_timeout)."""

    def make(node: str) -> Service:
        f = Frontend(type_, NODES[node]["addr"], port, proto, backends(node, *pods), **fe)
        return Service(ServiceKey("default", name), (f,), annotations=annotations)

    return make


@contextlib.contextmanager
def one_device_cluster() -> Iterator[Cluster]:
    """cluster() with node1 on eth0 only (for tests that take `require_kernel`)."""
    with cluster(second_device=False) as c:
        yield c
