"""Which addresses are local pods and which devices get which program: a pure function of the
namespace's links (kpr.netdevs), its routes and the pod addresses the source delivered.

A pod is
  - the destination of a /32 (IPv4) or /128 (IPv6) route through a veth whose peer lives in
    another namespace, or a netkit device (Cilium, Calico: one device per pod), or
  - a pod address from the source (Pod objects on this node) whose route names such a device
    or a bridge (flannel host-gw, kubenet, the bridge CNI: pods share a subnet on cni0).
An address routed anywhere else (an external device, an overlay) is not local and is left out.

Ethernet overlays (vxlan, geneve: a MAC, a neighbour per remote VTEP, flannel vxlan) are
marked so that what pods send to other nodes' pods leaves through them by bpf_redirect_neigh,
whether or not they are external devices; L3 tunnels (wireguard, ipip, gre) are not: their
traffic is the stack's.

Programs go on: the external devices' ingress (traffic to pods); every pod's host-side device,
ingress (what the pod sends) and egress (per-packet service replies via the stack); for a
bridge with pods, each of its veth ports stands for a pod's host-side device.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kpr.netdevs import DevKind, NetDev

from .datapath import DEV_F_BRIDGE, DEV_F_EXTERNAL, DEV_F_L2, DEV_F_OVERLAY, DEV_F_POD, DevEntry

PEER_KINDS = (DevKind.VETH_PEER, DevKind.NETKIT)


@dataclass(frozen=True)
class Route:
    dst: str  # network address
    dst_len: int
    oif: int


@dataclass
class Plan:
    # pod address -> ifindex of the device its route names
    pods: dict[str, int] = field(default_factory=dict)
    # pod address -> "route" | "source" (where it was learned first)
    origin: dict[str, str] = field(default_factory=dict)
    devices: dict[int, DevEntry] = field(default_factory=dict)
    # ifname -> ifindex of external devices found; names configured but absent
    external: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    # ifname -> ifindex of pods' host-side devices (veth/netkit, bridge ports)
    pod_devices: dict[str, int] = field(default_factory=dict)
    # source pod addresses that are not routed to a pod device here
    not_local: list[str] = field(default_factory=list)


def _mac(dev: NetDev) -> str:
    return dev.mac.hex(":") if dev.mac else ""


def _eth_overlay(dev: NetDev) -> bool:
    """An overlay with an Ethernet header (vxlan, geneve), which bpf_redirect_neigh can feed."""
    return dev.kind is DevKind.OVERLAY and dev.mac is not None


def plan(devs: Mapping[int, NetDev], routes: Iterable[Route], source_pods: Mapping[str, int | None],
         external: Iterable[str]) -> Plan:
    """`source_pods`: pod address -> ifindex of the device the kernel routes it through (None:
    no route)."""
    out = Plan()
    by_name = {d.name: d for d in devs.values()}
    for name in external:
        d = by_name.get(name)
        if d is None:
            out.missing.append(name)
            continue
        out.external[name] = d.ifindex
        out.devices[d.ifindex] = DevEntry(DEV_F_EXTERNAL | (DEV_F_OVERLAY if _eth_overlay(d) else 0), int(d.kind))
    ext_idx = set(out.external.values())
    for d in devs.values():
        if d.ifindex not in ext_idx and _eth_overlay(d):
            out.devices[d.ifindex] = DevEntry(DEV_F_OVERLAY, int(d.kind))

    for r in routes:
        full = 32 if ":" not in r.dst else 128
        d = devs.get(r.oif)
        if r.dst_len == full and d is not None and d.kind in PEER_KINDS and r.oif not in ext_idx:
            addr = str(ipaddress.ip_address(r.dst))
            out.pods.setdefault(addr, r.oif)
            out.origin.setdefault(addr, "route")
    for addr, oif in sorted(source_pods.items()):
        addr = str(ipaddress.ip_address(addr))
        if addr in out.pods:
            continue
        d = devs.get(oif) if oif is not None else None
        if d is None or oif in ext_idx or d.kind not in (*PEER_KINDS, DevKind.BRIDGE):
            out.not_local.append(addr)
            continue
        out.pods[addr] = d.ifindex
        out.origin[addr] = "source"

    for oif in sorted(set(out.pods.values())):
        d = devs[oif]
        if d.kind in PEER_KINDS:
            out.devices[oif] = DevEntry(DEV_F_POD, int(d.kind))
            out.pod_devices[d.name] = oif
        elif d.kind is DevKind.BRIDGE:
            out.devices[oif] = DevEntry(DEV_F_BRIDGE, int(d.kind))
            for port in devs.values():
                if port.master == oif and port.kind in PEER_KINDS:
                    out.devices[port.ifindex] = DevEntry(DEV_F_POD | DEV_F_L2, int(port.kind), _mac(d))
                    out.pod_devices[port.name] = port.ifindex
    return out
