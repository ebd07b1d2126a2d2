"""The NodePort programs on packets (BPF_PROG_TEST_RUN), table-driven as Katran's fixtures.

Every case: a description, a packet built with scapy, the expected verdict and the expected
output packet (byte for byte, or a check), with every IPv4/TCP/UDP/ICMP checksum of the
output verified (quoted headers of ICMP errors included). The programs run against maps the
core's ServiceMapWriter filled, inside a namespace whose routes and neighbours the FIB lookups
see (the test run's skb lives on that namespace's eth0), so the output MACs are the routed
next hop's.

Layout of the "lb" namespace (the node under test):
  eth0 10.0.0.1/24, fd00::1/64 (node addresses); outside next hop 10.0.0.2 / fd00::2 (default
       routes, clients 192.0.2.0/24, 198.51.100.0/24, 2001:db8:c::/64 behind it); node2 at
       10.0.0.3 / fd00::3 routes the remote pods 10.244.2.0/24 and fd00:244:2::/64.
  lxcpod -> pod 10.244.1.10 / fd00:244:1::10 (a local backend, static neighbour).
"""

from __future__ import annotations

import ctypes
import re
import struct
import time
from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from kpr.bpf import kernctx
from kpr.bpf import maps as M
from kpr.bpf.cleanup import scratch_pin_dir
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import CompileError, compile_and_load, load_prog
from kpr.netdevs import classify
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.nodeport import datapath as ND
from kpr.plugins.tc_nodeport import datapath as D
from kpr.plugins.xdp_nodeport import datapath as XD
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.netns import Topology, in_netns
from kpr.testing.prog_run import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, Case, run_cases, test_run
from kpr.testing.np_conntrack import ct_entries, ct_of_client, ct_write

pytestmark = pytest.mark.kernel

NP, LB, EIP = FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP
TCP_, UDP_ = Protocol.TCP, Protocol.UDP

NODE4, NODE6 = "10.0.0.1", "fd00::1"
OUT4, OUT6 = "10.0.0.2", "fd00::2"
NODE2_4, NODE2_6 = "10.0.0.3", "fd00::3"
POD4, POD6 = "10.244.1.10", "fd00:244:1::10"  # local backend
REM4, REM6 = "10.244.2.20", "fd00:244:2::20"  # remote backend (node2)
REM4_DSR = "10.244.2.21"
CLIENT4, CLIENT6 = "192.0.2.50", "2001:db8:c::50"
ALLOWED4 = "198.51.100.7"
MAC_OUT, MAC_NODE2, MAC_POD = "02:00:00:00:00:02", "02:00:00:00:00:03", "02:00:00:00:01:10"

VIP_REMOTE, VIP_DSR, VIP_LOCALPOL, VIP_RANGES, VIP_EMPTY = (
    "203.0.113.10", "203.0.113.11", "203.0.113.12", "203.0.113.13", "203.0.113.14",
)
VIP6_REMOTE, VIP6_DSR, VIP6_EMPTY = "2001:db8:f::10", "2001:db8:f::11", "2001:db8:f::14"
NODEPORT = 30080


def be(addr: str, port: int = 8080, *, local: bool = False) -> Backend:
    return Backend(addr, port, node_name="lb" if local else "node2", local=local)


def svc(name: str, frontends: list[Frontend], **kw: Any) -> Service:
    return Service(ServiceKey("default", name), tuple(frontends), **kw)


SERVICES = [
    svc("local", [Frontend(NP, NODE4, NODEPORT, p, (be(POD4, local=True),)) for p in (TCP_, UDP_)]
        + [Frontend(NP, NODE6, NODEPORT, p, (be(POD6, local=True),)) for p in (TCP_, UDP_)]),
    svc("remote", [Frontend(LB, VIP_REMOTE, 80, p, (be(REM4),)) for p in (TCP_, UDP_)]
        + [Frontend(LB, VIP6_REMOTE, 80, p, (be(REM6),)) for p in (TCP_, UDP_)]),
    svc("dsr", [Frontend(LB, VIP_DSR, 80, TCP_, (be(REM4_DSR),)), Frontend(LB, VIP6_DSR, 80, TCP_, (be(REM6),))],
        annotations=(("service.kpr.io/lb-mode", "dsr"),)),
    svc("localpol", [Frontend(LB, VIP_LOCALPOL, 80, TCP_, (be(REM4),), external_local=True)]),
    svc("ranges", [Frontend(LB, VIP_RANGES, 80, TCP_, (be(POD4, local=True),), source_ranges=("198.51.100.0/24",))]),
    svc("empty", [Frontend(LB, VIP_EMPTY, 80, TCP_), Frontend(LB, VIP_EMPTY, 53, UDP_), Frontend(LB, VIP6_EMPTY, 80, TCP_)]),
]


@dataclass
class Lab:
    topo: Topology
    pin: Path
    writer: ServiceMapWriter
    dp: D.Datapath
    ifindex: int
    mac: str  # eth0's MAC
    lxc_mac: str  # the node's side of the pod veth

    @property
    def ctx(self) -> bytes:
        # struct __sk_buff up to ifindex: the test run's skb is on eth0 of the lb namespace
        return struct.pack("=11I", 0, 0, 0, 0, 0, 0, 0, 0, 0, self.ifindex, self.ifindex)

    def run(self, prog: str, cases: list[Case]) -> list[Any]:
        for c in cases:
            c.ctx = self.ctx
        with in_netns(self.topo["lb"].path):
            return run_cases(self.dp.fd(prog), cases, kind="tc")

    def one(self, prog: str, pkt: Any) -> tuple[int, Ether]:
        with in_netns(self.topo["lb"].path):
            res = test_run(self.dp.fd(prog), bytes(pkt), ctx=self.ctx)
        return res.signed, Ether(res.data_out)

    def stats(self) -> dict[str, int]:
        return self.dp.stats()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, require_kernel: None) -> Iterator[Lab]:
    with scratch_pin_dir("kpr-np-prog") as pin, Topology() as topo:
        topo.add_node("lb")
        topo.add_namespace("out")
        topo.link("lb", "out", [f"{NODE4}/24", f"{NODE6}/64"], [f"{OUT4}/24", f"{OUT6}/64"])
        topo.add_pod("lb", "pod", POD4, ip6=POD6)
        lb = topo["lb"]
        lxc = next(i for i in lb.ifaces if i.startswith("lxc"))
        lb.run(
            f"ip neigh replace {OUT4} lladdr {MAC_OUT} dev eth0 nud permanent && "
            f"ip neigh replace {NODE2_4} lladdr {MAC_NODE2} dev eth0 nud permanent && "
            f"ip -6 neigh replace {OUT6} lladdr {MAC_OUT} dev eth0 nud permanent && "
            f"ip -6 neigh replace {NODE2_6} lladdr {MAC_NODE2} dev eth0 nud permanent && "
            f"ip neigh replace {POD4} lladdr {MAC_POD} dev {lxc} nud permanent && "
            f"ip -6 neigh replace {POD6} lladdr {MAC_POD} dev {lxc} nud permanent && "
            f"ip route replace default via {OUT4} && ip -6 route replace default via {OUT6} && "
            f"ip route replace 10.244.2.0/24 via {NODE2_4} && ip -6 route replace fd00:244:2::/64 via {NODE2_6}"
        )
        ifindex = topo.ifindex("lb", "eth0")
        writer = ServiceMapWriter(pin).open()
        dp = None
        try:
            for s in SERVICES:
                writer.upsert(s)
            dp = D.Datapath(pin, mode="snat").load()
            dp.set_devices({ifindex: (NODE4, NODE6)}, (NODE4, NODE6))
            dp.set_device_kinds({i: d.kind for i, d in classify(lb.netns).items()})  # as the agent's watcher does
            dp.set_node_addresses([NODE4, NODE6])
            dp.set_vips([VIP_REMOTE, VIP_DSR, VIP_LOCALPOL, VIP_RANGES, VIP_EMPTY, VIP6_REMOTE, VIP6_DSR, VIP6_EMPTY])
            dp.set_modes({(VIP_DSR, 80, 6): "dsr", (VIP6_DSR, 80, 6): "dsr"})
            dp.invalidate_next_hops()  # arms the next-hop cache, as the agent's watcher does at start
            yield Lab(topo, pin, writer, dp, ifindex, topo.mac("lb", "eth0"), topo.mac("lb", lxc))
        finally:
            if dp is not None:
                dp.close()
            writer.close()


@pytest.fixture(scope="module")
def lru_lab(lab: Lab) -> Iterator[Lab]:
    """The lab with the KPR_NP_SNAT_SLOTS=0 tc build on its maps (its own stage array): a new SNAT
    flow's reply side in kpr_snat, as before the slot tables were the default."""
    dp = D.Datapath(lab.pin, mode="snat", extra_cflags=["-DKPR_NP_SNAT_SLOTS=0"])
    try:
        yield dataclasses.replace(lab, dp=dp.load())
    finally:
        dp.close()


@pytest.fixture(scope="module")
def slot_lab(lab: Lab) -> Lab:
    """The lab's build with kpr_snat_slots (the default: README issue 14)."""
    assert lab.dp.snat_slots()
    return lab


@pytest.fixture(params=["default", "lru"])
def snat_lab(request: pytest.FixtureRequest, lab: Lab) -> Lab:
    """The default build (reverse entries in kpr_snat_slots), then the KPR_NP_SNAT_SLOTS=0 build."""
    return lab if request.param == "default" else request.getfixturevalue("lru_lab")


# ---------------------------------------------------------------------- packet builders


def eth_in(lab: Lab, src_mac: str = MAC_OUT) -> Ether:
    return Ether(src=src_mac, dst=lab.mac)


def tcp4(lab: Lab, src: str, dst: str, sport: int, dport: int, flags: str = "S", **ip: Any) -> Ether:
    return eth_in(lab) / IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags) / Raw(b"kpr")


def udp4(lab: Lab, src: str, dst: str, sport: int, dport: int, mac: str = MAC_OUT) -> Ether:
    return eth_in(lab, mac) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"kpr-udp")


def tcp6(lab: Lab, src: str, dst: str, sport: int, dport: int, flags: str = "S") -> Ether:
    return eth_in(lab) / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / Raw(b"kpr")


def routed(lab: Lab, to_mac: str) -> Ether:
    return Ether(src=lab.mac, dst=to_mac)


# ---------------------------------------------------------------------- layout


def test_struct_packers_match_the_c_structs(lab: Lab) -> None:
    t = lab.dp.bpf
    for name, key, leaf in (
        ("kpr_np_rev", D.CT_KEY, D.NP_REV),
        ("kpr_np_fe", D.NP_FE_KEY, D.NP_FE),
        ("kpr_np_dev", M.U32, D.NP_DEV),
        ("kpr_ct", D.CT_KEY, D.CT_ENTRY),
        ("kpr_snat", D.CT_KEY, D.NAT_ENTRY),
    ):
        table = t[name.encode()]
        assert ctypes.sizeof(table.Key) == key.size, name
        assert ctypes.sizeof(table.Leaf) == leaf.size, name
    assert len(D.STATS) == len(t[b"kpr_np_stats"]), "STATS mirrors KPR_NP_ST_MAX"
    assert ctypes.sizeof(M.CtKey) == D.CT_KEY.size and ctypes.sizeof(M.CtEntry) == D.CT_ENTRY.size
    assert ctypes.sizeof(M.NatEntry) == D.NAT_ENTRY.size


# ---------------------------------------------------------------------- requests


def test_dnat_to_a_local_backend_keeps_the_client_and_goes_into_the_pod(lab: Lab) -> None:
    lab.run(D.INGRESS, [
        Case(
            "TCP SYN to the NodePort on the node address: DNAT to the local pod, client address kept",
            tcp4(lab, CLIENT4, NODE4, 40000, NODEPORT),
            TC_ACT_REDIRECT,
            Ether(src=lab.lxc_mac, dst=MAC_POD) / IP(src=CLIENT4, dst=POD4) / TCP(sport=40000, dport=8080, flags="S") / Raw(b"kpr"),
        ),
        Case(
            "the same flow's next packet: conntrack, same backend",
            tcp4(lab, CLIENT4, NODE4, 40000, NODEPORT, flags="A"),
            TC_ACT_REDIRECT,
            Ether(src=lab.lxc_mac, dst=MAC_POD) / IP(src=CLIENT4, dst=POD4) / TCP(sport=40000, dport=8080, flags="A") / Raw(b"kpr"),
        ),
        Case(
            "IPv6 NodePort to the local pod",
            tcp6(lab, CLIENT6, NODE6, 40000, NODEPORT),
            TC_ACT_REDIRECT,
            Ether(src=lab.lxc_mac, dst=MAC_POD) / IPv6(src=CLIENT6, dst=POD6) / TCP(sport=40000, dport=8080, flags="S") / Raw(b"kpr"),
        ),
    ])
    # the pod's reply leaves through eth0 with the frontend as its source
    lab.run(D.EGRESS, [
        Case(
            "the pod's SYN-ACK leaving: source becomes the NodePort address",
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst=CLIENT4) / TCP(sport=8080, dport=40000, flags="SA") / Raw(b"kpr"),
            TC_ACT_OK,
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=NODE4, dst=CLIENT4) / TCP(sport=NODEPORT, dport=40000, flags="SA") / Raw(b"kpr"),
        ),
        Case(
            "IPv6 reply leaving",
            Ether(src=lab.mac, dst=MAC_OUT) / IPv6(src=POD6, dst=CLIENT6) / TCP(sport=8080, dport=40000, flags="SA") / Raw(b"kpr"),
            TC_ACT_OK,
            Ether(src=lab.mac, dst=MAC_OUT) / IPv6(src=NODE6, dst=CLIENT6) / TCP(sport=NODEPORT, dport=40000, flags="SA") / Raw(b"kpr"),
        ),
        Case(
            "a packet of no tracked flow leaving: untouched, later filters still see it",
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst=CLIENT4) / TCP(sport=8080, dport=41111, flags="A"),
            TC_ACT_UNSPEC,
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst=CLIENT4) / TCP(sport=8080, dport=41111, flags="A"),
        ),
    ])


def _snat_check(expect_dst: str, expect_dport: int, seen: dict[str, int], key: str, v6: bool = False) -> Any:
    def check(out: Ether) -> None:
        ip = out[IPv6] if v6 else out[IP]
        l4 = out[TCP] if TCP in out else out[UDP]
        assert out.dst == MAC_NODE2 and out.src != MAC_OUT, out.summary()
        assert (ip.src, ip.dst, l4.dport) == ((NODE6 if v6 else NODE4), expect_dst, expect_dport), out.summary()
        assert D.SNAT_PORT_MIN <= l4.sport <= D.SNAT_PORT_MAX, l4.sport
        seen[key] = l4.sport

    return check


def test_snat_to_a_remote_backend_and_the_reverse_nat_of_its_reply(lab: Lab) -> None:
    seen: dict[str, int] = {}
    lab.run(D.INGRESS, [
        Case("TCP SYN to a LoadBalancer IP with a remote backend: DNAT + SNAT to the node address, routed to node2",
             tcp4(lab, CLIENT4, VIP_REMOTE, 40001, 80), TC_ACT_REDIRECT, _snat_check(REM4, 8080, seen, "tcp")),
        Case("UDP to the same LoadBalancer IP", udp4(lab, CLIENT4, VIP_REMOTE, 5001, 80), TC_ACT_REDIRECT,
             _snat_check(REM4, 8080, seen, "udp")),
        Case("IPv6 TCP to a remote backend: SNAT to the node's IPv6 address",
             tcp6(lab, CLIENT6, VIP6_REMOTE, 40001, 80), TC_ACT_REDIRECT, _snat_check(REM6, 8080, seen, "tcp6", v6=True)),
    ])
    # the same flow keeps its mapping
    verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40001, 80, flags="A"))
    assert verdict == TC_ACT_REDIRECT and out[TCP].sport == seen["tcp"]
    lab.run(D.INGRESS, [
        Case(
            "the backend's SYN-ACK to the node's SNAT port: back to the client, from the LoadBalancer IP",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / TCP(sport=8080, dport=seen["tcp"], flags="SA") / Raw(b"ok"),
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / TCP(sport=80, dport=40001, flags="SA") / Raw(b"ok"),
        ),
        Case(
            "the UDP reply",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=seen["udp"]) / Raw(b"ok"),
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=5001) / Raw(b"ok"),
        ),
        Case(
            "the IPv6 reply",
            Ether(src=MAC_NODE2, dst=lab.mac) / IPv6(src=REM6, dst=NODE6) / TCP(sport=8080, dport=seen["tcp6"], flags="SA") / Raw(b"ok"),
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IPv6(src=VIP6_REMOTE, dst=CLIENT6) / TCP(sport=80, dport=40001, flags="SA") / Raw(b"ok"),
        ),
        Case(
            "a packet to a SNAT port nobody holds: not ours, untouched",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / TCP(sport=8080, dport=65000 if seen["tcp"] != 65000 else 64999, flags="A"),
            TC_ACT_UNSPEC,
            None,
        ),
    ])
    # ICMP error from the backend about the UDP flow: translated back to the client
    inner = IP(src=NODE4, dst=REM4) / UDP(sport=seen["udp"], dport=8080) / Raw(b"kpr-udp")
    want_inner = IP(src=CLIENT4, dst=VIP_REMOTE) / UDP(sport=5001, dport=80) / Raw(b"kpr-udp")
    lab.run(D.INGRESS, [
        Case(
            "ICMP port unreachable from the backend about the source-NATed UDP flow: to the client, about its own packet",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / ICMP(type=3, code=3) / bytes(inner)[:28],
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / ICMP(type=3, code=3) / bytes(want_inner)[:28],
        ),
        Case(
            "ICMP fragmentation needed from a router on the way (its own address kept)",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=NODE2_4, dst=NODE4) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(inner)[:28],
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=NODE2_4, dst=CLIENT4) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(want_inner)[:28],
        ),
    ])
    st = lab.stats()
    assert st["new_snat"] >= 3 and st["reply_snat"] >= 3 and st["icmp_translated"] >= 2, st


def _flow_entries(lab: Lab, client: str, cport: int, proto: int) -> dict[str, list[tuple[tuple, tuple]]]:
    """Every entry of kpr_snat, kpr_snat_slots and kpr_np_rev naming the client address and port,
    and "ct": its conntrack entries wherever the build put them (kpr_np_ct_slots or kpr_ct)."""
    c = M.addr_to_bytes(client)
    out: dict[str, list[tuple[tuple, tuple]]] = {
        "ct": [(e.key, e.val) for e in ct_of_client(lab.pin, c, cport, proto)]}
    for name, leaf in (("kpr_snat", D.NAT_ENTRY), (D.REV_MAP, D.NP_REV), (ND.SNAT_SLOTS_MAP, D.NAT_ENTRY)):
        if name == ND.SNAT_SLOTS_MAP:
            with _slots(lab) as t:
                rows = [(D.CT_KEY.unpack(k), leaf.unpack(v)) for _i, _s, k, v in t.held()]
        else:
            with M.BpfMap.open_pinned(lab.pin / name) as m:
                rows = [(D.CT_KEY.unpack(k), leaf.unpack(v)) for k, v in m.items()]
        out[name] = [(k, v) for k, v in rows if k[4] == proto and (
            (k[0] == c and k[2] == M.htons(cport)) or (k[1] == c and k[3] == M.htons(cport))
            or (name in ("kpr_snat", ND.SNAT_SLOTS_MAP) and v[0] == c and v[1] == M.htons(cport)))]
    return out


def test_a_new_snat_flow_writes_two_entries(snat_lab: Lab) -> None:
    """KPR_NP_SNAT_IN_CT: the conntrack entry holds the SNAT address and port, one reverse entry
    keyed by the reply tuple (a kpr_snat_slots slot: KPR_NP_SNAT_SLOTS, the backend's next hop
    cached) holds client and frontend (kpr_snat in the default build); no SNAT forward entry, no kpr_np_rev entry. The reply
    finds the flow through that one entry (checked above)."""
    lab = snat_lab
    slots = lab.dp.snat_slots()
    cport = 5177 if slots else 5077  # each build's own flow (the lab's maps are shared)
    _warm(lab, udp4(lab, CLIENT4, VIP_REMOTE, cport - 1, 80))
    verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, cport, 80))
    assert verdict == TC_ACT_REDIRECT
    port = out[UDP].sport
    e = _flow_entries(lab, CLIENT4, cport, 17)
    (ck, cv), = e["ct"]
    assert ck[1] == M.addr_to_bytes(VIP_REMOTE) and ck[5] == D.CT_DIR_ORIGINAL
    last_seen, _bid, _rn, flags, _tf, _pad, nat_port, _pad2, nat_addr = cv
    assert flags & D.CT_F_SNAT and (nat_port, nat_addr) == (M.htons(port), M.addr_to_bytes(NODE4))
    assert e["kpr_snat" if slots else ND.SNAT_SLOTS_MAP] == []
    (sk, sv), = e[ND.SNAT_SLOTS_MAP if slots else "kpr_snat"]
    assert sk == (M.addr_to_bytes(REM4), M.addr_to_bytes(NODE4), M.htons(8080), M.htons(port), 17, D.CT_DIR_REPLY, 0)
    addr, rport, fe_port, _p2, _created, fe_addr = sv
    assert (addr, rport, fe_addr, fe_port) == (M.addr_to_bytes(CLIENT4), M.htons(cport), M.addr_to_bytes(VIP_REMOTE), M.htons(80))
    assert e[D.REV_MAP] == []
    # the next packet of the flow keeps its port and writes nothing new
    verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, cport, 80))
    assert verdict == TC_ACT_REDIRECT and out[UDP].sport == port
    assert {k: len(v) for k, v in _flow_entries(lab, CLIENT4, cport, 17).items()} == {
        "ct": 1, "kpr_snat": 0 if slots else 1, ND.SNAT_SLOTS_MAP: 1 if slots else 0, D.REV_MAP: 0}


def test_conntrack_stamps_are_on_the_collectors_clock(lab: Lab) -> None:
    """lib/conntrack.h's kpr_ct_now() (jiffies by default, the kernel's HZ passed at build) and
    the collector's now_ns() agree within a few ticks: the jiffies base sits a few hundred ms
    from CLOCK_MONOTONIC's (as read here), so an unconverted clock on either side fails this."""
    from kpr.bpf import ctclock
    from kpr.nodeport import gc as G

    assert ctclock.JIFFIES and any(f.startswith("-DKPR_HZ=") for f in lab.dp.cflags()), "the default build ages on jiffies"
    before = G.now_ns()
    verdict, _out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, 5079, 80))
    after = G.now_ns()
    assert verdict == TC_ACT_REDIRECT
    e = _flow_entries(lab, CLIENT4, 5079, 17)
    (_ck, cv), = e["ct"]
    (_sk, sv), = e["kpr_snat"] + e[ND.SNAT_SLOTS_MAP]
    tick = ctclock.tick_nsec(ctclock.kernel_hz())
    for stamp in (cv[0], sv[4]):  # the reverse entry's created
        assert before - 3 * tick <= stamp <= after + 3 * tick, (before, stamp, after)


def test_a_conntrack_stamp_ahead_of_the_programs_clock_is_fresh(lab: Lab) -> None:
    """A build on the coarse clock stamps CLOCK_MONOTONIC, which runs the boot's offset (a few
    hundred ms) ahead of the jiffies clock: right after an upgrade to a jiffies build, a flow
    refreshed just before it holds a stamp ahead of the program's now. That flow is live (its
    port kept, counted established), not 2^64 ns old and picked afresh with a new SNAT port."""
    from kpr.nodeport import gc as G

    verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, 5081, 80))
    assert verdict == TC_ACT_REDIRECT
    port = out[UDP].sport
    e, = ct_of_client(lab.pin, M.addr_to_bytes(CLIENT4), 5081, 17)
    # 200 ms ahead of the programs' clock: what the coarse clock read just now here
    ct_write(lab.pin, e, (G.now_ns() + 200 * 10**6, *e.val[1:]))
    before = lab.stats()
    verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, 5081, 80))
    after = lab.stats()
    assert verdict == TC_ACT_REDIRECT and out[UDP].sport == port
    assert (after["established"] - before["established"], after["new_snat"] - before["new_snat"]) == (1, 0)


def zero_udp(pkt: Ether) -> Ether:
    """The packet with its UDP checksum 0 (IPv4: none)."""
    pkt[UDP].chksum = 0
    return pkt


def _zero_udp_snat_check(expect_dst: str, expect_dport: int, seen: dict[str, int], key: str) -> Any:
    check = _snat_check(expect_dst, expect_dport, seen, key)

    def run(out: Ether) -> None:
        check(out)
        assert out[UDP].chksum == 0, f"UDP checksum 0 became 0x{out[UDP].chksum:04x}"
    return run


def test_one_pass_rewrites_keep_checksums_and_a_zero_udp_checksum(lab: Lab) -> None:
    """KPR_REWRITE_ONE_CSUM: the DNAT+SNAT of an established flow with a cached next hop (the
    entry program's KPR_NP_EST_INLINE path) and of a reply patch each checksum once: the output's
    checksums are right (run_cases recomputes them), and an IPv4 UDP checksum of 0 ("none")
    stays 0 both ways instead of becoming a checksum of the zero field."""
    seen: dict[str, int] = {}
    cached = lab.stats()["fwd_nh_cached"]

    def kept_zero(expect_dst: str, expect_dport: int, key: str) -> Any:
        return _zero_udp_snat_check(expect_dst, expect_dport, seen, key)

    lab.run(D.INGRESS, [
        Case("TCP SYN of a new SNAT flow", tcp4(lab, CLIENT4, VIP_REMOTE, 40701, 80), TC_ACT_REDIRECT,
             _snat_check(REM4, 8080, seen, "tcp")),
        Case("its ACK: established, next hop cached, rewritten in one pass", tcp4(lab, CLIENT4, VIP_REMOTE, 40701, 80, flags="A"),
             TC_ACT_REDIRECT, _snat_check(REM4, 8080, seen, "tcp")),
        Case("UDP with checksum 0, new flow", zero_udp(udp4(lab, CLIENT4, VIP_REMOTE, 5701, 80)), TC_ACT_REDIRECT,
             kept_zero(REM4, 8080, "udp")),
        Case("UDP with checksum 0, established (one pass)", zero_udp(udp4(lab, CLIENT4, VIP_REMOTE, 5701, 80)),
             TC_ACT_REDIRECT, kept_zero(REM4, 8080, "udp")),
        Case("established TCP with IP options (the L4 header further in)",
             tcp4(lab, CLIENT4, VIP_REMOTE, 40701, 80, flags="PA", options=[IPOption(b"\x94\x04\x00\x00")]),
             TC_ACT_REDIRECT, _snat_check(REM4, 8080, seen, "tcp")),
    ])
    assert lab.stats()["fwd_nh_cached"] >= cached + 3, "the established packets took the cached next hop"
    reply = Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=seen["udp"]) / Raw(b"ok")
    lab.run(D.INGRESS, [
        Case("the UDP reply with checksum 0: still 0", zero_udp(reply), TC_ACT_REDIRECT,
             zero_udp(routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=5701) / Raw(b"ok"))),
        Case("the TCP reply", Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4)
             / TCP(sport=8080, dport=seen["tcp"], flags="A") / Raw(b"ok"), TC_ACT_REDIRECT,
             routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / TCP(sport=80, dport=40701, flags="A") / Raw(b"ok")),
    ])


BPF_FUNC_L3_CSUM_REPLACE = 10  # include/uapi/linux/bpf.h


def _helper_calls(bpf: Any, prog: str, helper: int) -> int:
    """Calls of BPF helper `helper` in a program's instructions as loaded (bcc's copy)."""
    code = bpf.dump_func(prog.encode())
    calls = 0
    for i in range(0, len(code), 8):
        op, regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        calls += op == 0x85 and regs >> 4 == 0 and imm == helper  # BPF_JMP | BPF_CALL, src 0: a helper
    return calls


def _scapy_checksums(out: Ether) -> None:
    """The output's IPv4 and L4 checksums as scapy computes them for its headers."""
    again = out.copy()
    del again[IP].chksum
    l4 = again[TCP] if TCP in again else again[UDP]
    if not (UDP in out and out[UDP].chksum == 0):  # IPv4 UDP checksum 0: none, kept
        del l4.chksum
    again = Ether(bytes(again))
    assert (out[IP].chksum, (out[TCP] if TCP in out else out[UDP]).chksum) == (
        again[IP].chksum, (again[TCP] if TCP in again else again[UDP]).chksum), out.summary()


def _one_pass_cases(lab: Lab, dp: Any, port: int) -> None:
    """A new SNAT flow's first packets and their one-pass successors from the cache (TCP, TCP
    with IP options, UDP, UDP with checksum 0 kept), through `dp`'s entry program: the outputs
    carry the checksums scapy computes."""
    seen: dict[str, int] = {}

    def snat(key: str, zero: bool = False) -> Any:
        check = _snat_check(REM4, 8080, seen, key)

        def run(out: Ether) -> None:
            check(out)
            _scapy_checksums(out)
            if zero:
                assert out[UDP].chksum == 0, f"UDP checksum 0 became 0x{out[UDP].chksum:04x}"
        return run

    cached = lab.stats()["fwd_nh_cached"]
    cases = [
        Case("TCP SYN, new SNAT flow", tcp4(lab, CLIENT4, VIP_REMOTE, port, 80), TC_ACT_REDIRECT, snat("tcp")),
        Case("its ACK: one pass", tcp4(lab, CLIENT4, VIP_REMOTE, port, 80, flags="A"), TC_ACT_REDIRECT, snat("tcp")),
        Case("established TCP with IP options", tcp4(lab, CLIENT4, VIP_REMOTE, port, 80, flags="PA",
             options=[IPOption(b"\x94\x04\x00\x00")]), TC_ACT_REDIRECT, snat("tcp")),
        Case("UDP, new flow", udp4(lab, CLIENT4, VIP_REMOTE, port, 80), TC_ACT_REDIRECT, snat("udp")),
        Case("UDP, one pass", udp4(lab, CLIENT4, VIP_REMOTE, port, 80), TC_ACT_REDIRECT, snat("udp")),
        Case("UDP with checksum 0, new flow", zero_udp(udp4(lab, CLIENT4, VIP_REMOTE, port + 10, 80)),
             TC_ACT_REDIRECT, snat("udp0", zero=True)),
        Case("UDP with checksum 0, one pass", zero_udp(udp4(lab, CLIENT4, VIP_REMOTE, port + 10, 80)),
             TC_ACT_REDIRECT, snat("udp0", zero=True)),
    ]
    for c in cases:
        c.ctx = lab.ctx
    with in_netns(lab.topo["lb"].path):
        run_cases(dp.fd(D.INGRESS), cases, kind="tc")
    assert lab.stats()["fwd_nh_cached"] >= cached + 4, "the established packets took the cached next hop"


@pytest.mark.parametrize("direct", [True, False], ids=["KPR_CSUM_IP_DIRECT=1", "KPR_CSUM_IP_DIRECT=0"])
def test_the_one_pass_rewrite_patches_the_ip_checksum_in_place(lab: Lab, direct: bool) -> None:
    """KPR_CSUM_IP_DIRECT: tc patches every IPv4 header checksum through the packet pointer
    (the one-pass DNAT+SNAT of the entry program's established path, and every one-field
    rewrite, DSR option and ICMP inner header): no program of the build calls
    bpf_l3_csum_replace, where the build without it does; both builds' outputs carry the
    checksums scapy computes (TCP, UDP, UDP with checksum 0 kept, IP options), established
    packets from the cache."""
    off = D.Datapath(lab.pin, mode="snat", extra_cflags=["-DKPR_CSUM_IP_DIRECT=0"]).load()
    dp = lab.dp if direct else off
    try:
        calls = {name: _helper_calls(dp.bpf, name, BPF_FUNC_L3_CSUM_REPLACE) for name in dp.progs}
        if direct:
            assert not any(calls.values()), f"bpf_l3_csum_replace calls left: {calls}"
        else:
            assert calls[D.INGRESS] and calls[D.EGRESS], calls
        _one_pass_cases(lab, dp, 40801 if direct else 40802)  # a flow per build
    finally:
        off.close()


def _kfunc_calls(bpf: Any, prog: str) -> int:
    """Kernel function calls (BPF_PSEUDO_KFUNC_CALL) in a program's instructions as loaded."""
    code = bpf.dump_func(prog.encode())
    return sum(code[i] == 0x85 and code[i + 1] >> 4 == 2 for i in range(0, len(code), 8))


@pytest.mark.parametrize("build", ["state read", "state inferred", "two calls"])
def test_the_one_pass_rewrite_patches_the_l4_checksum_as_the_helper_does(lab: Lab, build: str) -> None:
    """The L4 checksum of the one-pass DNAT+SNAT (lib/csum.h kpr_csum_l4_diff2): patched in
    place when the entry program read the skb's state as not offloaded (ctx_csum_state, the
    default build on a kernel with BTF: test_run's skbs are CHECKSUM_NONE), the ports' part in
    place after one helper call when inferred from that call's result (a build without the
    kernel's offsets), two helper calls without either (KPR_CSUM_L4_INFER=0). Every build's
    outputs carry scapy's checksums (_one_pass_cases)."""
    flags = {"state read": [], "state inferred": ["-UKPR_SKB_KERN_CTX_FN"],
             "two calls": ["-UKPR_SKB_KERN_CTX_FN", "-DKPR_CSUM_L4_INFER=0"]}[build]
    dp = D.Datapath(lab.pin, mode="snat", extra_cflags=flags).load() if flags else lab.dp
    try:
        assert bool(_kfunc_calls(dp.bpf, D.INGRESS)) == (build == "state read" and bool(kernctx.cflags()))
        _one_pass_cases(lab, dp, {"state read": 40811, "state inferred": 40812, "two calls": 40813}[build])
    finally:
        if flags:
            dp.close()


def test_one_field_rewrites_patch_the_ip_checksum_in_place_as_the_helper_does(lab: Lab) -> None:
    """KPR_CSUM_IP_DIRECT on the one-field rewrites (kpr_nat_rewrite_addr: DNAT to a local
    pod, the reverse NAT of its reply leaving): byte for byte what the build patching the
    IPv4 header checksum with bpf_l3_csum_replace makes, with the checksums scapy computes."""
    off = D.Datapath(lab.pin, mode="snat", extra_cflags=["-DKPR_CSUM_IP_DIRECT=0"]).load()
    try:
        sport = 40950
        for prog, pkt, verdict in (
            (D.INGRESS, tcp4(lab, CLIENT4, NODE4, sport, NODEPORT), TC_ACT_REDIRECT),
            (D.INGRESS, tcp4(lab, CLIENT4, NODE4, sport, NODEPORT, flags="A"), TC_ACT_REDIRECT),
            (D.INGRESS, udp4(lab, CLIENT4, NODE4, sport, NODEPORT), TC_ACT_REDIRECT),
            (D.EGRESS, Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst=CLIENT4) / TCP(
                sport=8080, dport=sport, flags="SA") / Raw(b"kpr"), TC_ACT_OK),
        ):
            outs = []
            with in_netns(lab.topo["lb"].path):
                for dp in (lab.dp, off):  # the second finds the flow the first made
                    res = test_run(dp.fd(prog), bytes(pkt), ctx=lab.ctx)
                    assert res.signed == verdict, (prog, pkt.summary(), res.signed)
                    outs.append(res.data_out)
            assert outs[0] == outs[1], f"KPR_CSUM_IP_DIRECT=1 and =0 differ: {pkt.summary()}"
            out = Ether(outs[0])
            assert out[IP].src != pkt[IP].src or out[IP].dst != pkt[IP].dst, out.summary()  # rewritten
            _scapy_checksums(out)
    finally:
        off.close()


def _at_the_checksum_edge(lab: Lab, first: Any, run: Any, proto: Any, port: int) -> Ether:
    """An established flow's packet whose rewritten IPv4 header and L4 checksums sum to 0xffff
    (the ones-complement edge), as `run` (a packet -> the redirected output) sends it on, after
    `first` made the flow. A probe with IP id 0 and payload word 0 comes out with checksums c;
    the same packet with id c and word c comes out at the edge: IP 0x0000 and TCP 0x0000 as
    scapy computes them, UDP 0xffff (a result of 0 is never sent: it means "none")."""

    def pkt(ip_id: int, word: int, flags: str = "A") -> Ether:
        l4 = TCP(sport=port, dport=80, flags=flags) if proto is TCP else UDP(sport=port, dport=80)
        return eth_in(lab) / IP(src=CLIENT4, dst=VIP_REMOTE, id=ip_id) / l4 / Raw(b"kp" + word.to_bytes(2, "big"))

    seen: dict[str, int] = {}
    _snat_check(REM4, 8080, seen, "new")(first(pkt(0, 0, "S")))
    probe = run(pkt(0, 0))
    _snat_check(REM4, 8080, seen, "probe")(probe)
    _scapy_checksums(probe)
    edge = run(pkt(probe[IP].chksum, probe[proto].chksum))
    _snat_check(REM4, 8080, seen, "edge")(edge)
    assert seen["new"] == seen["probe"] == seen["edge"]
    _scapy_checksums(edge)
    assert (edge[IP].chksum, edge[proto].chksum) == (0, 0 if proto is TCP else 0xFFFF), edge.summary()
    return edge


def test_checksum_edges_of_the_one_pass_rewrite(lab: Lab) -> None:
    """tc's one-pass DNAT+SNAT at the checksum edge (_at_the_checksum_edge): the IPv4 header
    checksum patched in place (KPR_CSUM_IP_DIRECT) comes out 0x0000 as scapy computes it, byte
    for byte what the build patching it with bpf_l3_csum_replace makes. (The XDP build, which
    patches every checksum by hand, meets the same edges in the XDP test below.)"""
    off = D.Datapath(lab.pin, mode="snat", extra_cflags=["-DKPR_CSUM_IP_DIRECT=0"]).load()
    try:
        def first(pkt: Ether) -> Ether:
            verdict, out = lab.one(D.INGRESS, pkt)
            assert verdict == TC_ACT_REDIRECT, verdict
            return out

        def both(pkt: Ether) -> Ether:
            outs = []
            with in_netns(lab.topo["lb"].path):
                for dp in (lab.dp, off):
                    res = test_run(dp.fd(D.INGRESS), bytes(pkt), ctx=lab.ctx)
                    assert res.signed == TC_ACT_REDIRECT, res.signed
                    outs.append(res.data_out)
            assert outs[0] == outs[1], "KPR_CSUM_IP_DIRECT=1 and =0 differ"
            return Ether(outs[0])

        cached = lab.stats()["fwd_nh_cached"]
        _at_the_checksum_edge(lab, first, both, TCP, 40901)
        _at_the_checksum_edge(lab, first, both, UDP, 40902)
        assert lab.stats()["fwd_nh_cached"] >= cached + 4, "the probes and edges took the one-pass path"
    finally:
        off.close()

def test_the_entry_programs_established_path_refreshes_and_closes_the_flow(lab: Lab) -> None:
    """KPR_NP_EST_INLINE sends an established SNAT packet with a cached next hop from the entry
    program, without the stages: its conntrack entry is still refreshed (last_seen, at most once
    a second, so an active flow outlives its timeout) and a FIN marks it closing (the short
    timeout), as on the staged path."""
    from kpr.nodeport import gc as G

    sport = 40811
    # REM4's next hop cached by a flow of this test's own (VIP_REMOTE's one backend), not left
    # to earlier tests: the count below holds in any order and alone
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport - 1, 80))[0] == TC_ACT_REDIRECT
    cached = lab.stats()["fwd_nh_cached"]
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport, 80))[0] == TC_ACT_REDIRECT
    e, = ct_of_client(lab.pin, M.addr_to_bytes(CLIENT4), sport, 6)
    old = G.now_ns() - 5 * 10**9
    ct_write(lab.pin, e, (old, *e.val[1:]))
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport, 80, flags="A"))[0] == TC_ACT_REDIRECT
    (_ck, cv), = _flow_entries(lab, CLIENT4, sport, 6)["ct"]
    assert cv[0] > old + 4 * 10**9, "last_seen refreshed"
    assert not cv[3] & D.CT_F_CLOSING
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport, 80, flags="FA"))[0] == TC_ACT_REDIRECT
    (_ck, cv), = _flow_entries(lab, CLIENT4, sport, 6)["ct"]
    assert cv[3] & D.CT_F_CLOSING and cv[4] & 0x01, "FIN seen: closing"
    # the new flow's first packet too (KPR_NP_NEW_NH: its backend's next hop was cached by
    # the flow above, so no FIB lookup for it either)
    assert lab.stats()["fwd_nh_cached"] == cached + 3, "the first packet and both established ones went by the cached next hop"


def test_a_cached_redirect_counts_the_helper_the_kind_and_the_cache(lab: Lab) -> None:
    """A packet sent to a cached next hop counts what a redirect by the FIB counts (fwd_redirect,
    egress_<kind>) and fwd_nh_cached besides: the program counts one per-kind cached slot and
    the reader derives the three (README issue 14, "One forwarding counter instead of three"),
    so fwd_redirect and the egress kinds tell how many packets left whichever path found their
    next hop."""

    def fwd_moved(pkt: Ether) -> dict[str, int]:
        before = lab.stats()
        assert lab.one(D.INGRESS, pkt)[0] == TC_ACT_REDIRECT
        after = lab.stats()
        return {k: after[k] - before[k] for k in D.FWD_STATS.values() if after[k] != before[k]}

    # the first packet by the FIB (a new flow takes a cached next hop: KPR_NP_NEW_NH): the
    # backend's entries stale (generation 0), the other backends' left as they are
    with M.BpfMap.open_pinned(lab.pin / D.NH_MAP) as nh:
        for k, v in nh.items():
            e = list(D.NP_NH.unpack(v))
            if M.U32.unpack(k)[0] != D.NH_GEN and e[-1] == M.addr_to_bytes(REM4):
                e[0] = 0
                nh.update(k, D.NP_NH.pack(*e))
    first = fwd_moved(tcp4(lab, CLIENT4, VIP_REMOTE, 40971, 80))
    kinds = [k for k in first if k.startswith("egress_")]
    assert len(kinds) == 1 and first == {"fwd_redirect": 1, kinds[0]: 1}, first
    cached = fwd_moved(tcp4(lab, CLIENT4, VIP_REMOTE, 40971, 80, flags="A"))
    assert cached == {"fwd_redirect": 1, kinds[0]: 1, "fwd_nh_cached": 1}, cached
    # a new flow to the same backend: its next hop is cached now, no FIB lookup (KPR_NP_NEW_NH)
    new = fwd_moved(tcp4(lab, CLIENT4, VIP_REMOTE, 40972, 80))
    assert new == {"fwd_redirect": 1, kinds[0]: 1, "fwd_nh_cached": 1}, new


def test_a_flow_of_the_four_entry_layout_keeps_its_port_and_replies(lab: Lab) -> None:
    """A flow a KPR_NP_SNAT_IN_CT=0 build began (conntrack entry without a mapping, SNAT forward
    and reverse entries, a kpr_np_rev entry; written here as that build writes them) goes on
    with its port, and its replies still find their frontend."""
    c, fe, rem, node = (M.addr_to_bytes(a) for a in (CLIENT4, VIP_REMOTE, REM4, NODE4))
    port = 61234
    with M.BpfMap.open_pinned(lab.pin / "kpr_backend") as b:
        bid = next(M.U32.unpack(k)[0] for k, v in b.items() if M.BACKEND.unpack(v)[:2] == (rem, M.htons(8080)))
    with M.BpfMap.open_pinned(lab.pin / "kpr_svc") as s:
        rev_nat = next(M.SVC_VAL.unpack(v)[3] for k, v in s.items()
                       if M.SVC_KEY.unpack(k)[:3] == (fe, M.htons(80), 17) and M.SVC_KEY.unpack(k)[4] == 0)
    now = time.monotonic_ns() - 10**9  # a second ago: the programs' coarse clock may lag monotonic_ns
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as ct:
        ct.update(D.CT_KEY.pack(c, fe, M.htons(5078), M.htons(80), 17, D.CT_DIR_ORIGINAL, 0),
                  D.CT_ENTRY.pack(now, bid, rev_nat, D.CT_F_NODE_PORT | D.CT_F_SNAT, 0, 0, 0, 0, bytes(16)))
    with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as sn:
        sn.update(D.CT_KEY.pack(c, rem, M.htons(5078), M.htons(8080), 17, D.CT_DIR_ORIGINAL, 0),
                  D.NAT_ENTRY.pack(node, M.htons(port), 0, 0, now, bytes(16)))
        sn.update(D.CT_KEY.pack(rem, node, M.htons(8080), M.htons(port), 17, D.CT_DIR_REPLY, 0),
                  D.NAT_ENTRY.pack(c, M.htons(5078), 0, 0, now, bytes(16)))
    with M.BpfMap.open_pinned(lab.pin / D.REV_MAP) as rv:
        rv.update(D.CT_KEY.pack(rem, c, M.htons(8080), M.htons(5078), 17, D.CT_DIR_REPLY, 0),
                  D.NP_REV.pack(fe, M.htons(80), 0, 0, now))
    before = lab.stats()
    verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, 5078, 80))
    assert verdict == TC_ACT_REDIRECT and (out[IP].src, out[UDP].sport, out[IP].dst) == (NODE4, port, REM4)
    assert lab.stats()["established"] == before["established"] + 1
    lab.run(D.INGRESS, [Case(
        "the reply finds its frontend in kpr_np_rev",
        Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=port) / Raw(b"ok"),
        TC_ACT_REDIRECT,
        routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=5078) / Raw(b"ok"),
    )])


def test_a_packet_too_big_for_the_cached_route_is_looked_up(lab: Lab) -> None:
    """The cached next hop keeps the route's MTU (tc): an established packet larger than it is
    not sent from the cache but takes the FIB lookup, whose FRAG_NEEDED passes it to the stack
    (which sends the ICMP error path MTU discovery needs), as before the cache."""
    verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40310, 80))
    assert verdict == TC_ACT_REDIRECT and out[Ether].dst == MAC_NODE2
    before = lab.stats()
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40310, 80, flags="A"))[0] == TC_ACT_REDIRECT
    assert lab.stats()["fwd_nh_cached"] == before["fwd_nh_cached"] + 1, "a packet that fits: from the cache"
    big = eth_in(lab) / IP(src=CLIENT4, dst=VIP_REMOTE, flags="DF") / TCP(sport=40310, dport=80, flags="A") / Raw(
        b"x" * 1600)
    verdict, _ = lab.one(D.INGRESS, big)
    after = lab.stats()
    assert after["fwd_nh_cached"] == before["fwd_nh_cached"] + 1, "too big: not sent from the cache"
    assert verdict != TC_ACT_REDIRECT and after["fib_to_kernel"] == before["fib_to_kernel"] + 1


def test_a_next_hop_cached_without_an_mtu_is_looked_up_on_tc(lab: Lab) -> None:
    """An entry whose MTU is 0 (XDP caches next hops without one: its lookup reports none) is
    a miss for tc, which looks the route up (FRAG_NEEDED for a packet too big) and caches it
    again with the MTU; otherwise an entry XDP wrote let tc skip the MTU check."""
    verdict, _ = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40320, 80))
    assert verdict == TC_ACT_REDIRECT
    with M.BpfMap.open_pinned(lab.pin / D.NH_MAP) as nh:
        for k, v in nh.items():
            e = list(D.NP_NH.unpack(v))
            if M.U32.unpack(k)[0] != D.NH_GEN and e[0] and e[-1] == M.addr_to_bytes(REM4):
                e[4] &= 0xFFFF  # as XDP writes it: no MTU
                nh.update(k, D.NP_NH.pack(*e))
    before = lab.stats()
    big = eth_in(lab) / IP(src=CLIENT4, dst=VIP_REMOTE, flags="DF") / TCP(sport=40320, dport=80, flags="A") / Raw(
        b"x" * 1600)
    verdict, _ = lab.one(D.INGRESS, big)
    after = lab.stats()
    assert after["fwd_nh_cached"] == before["fwd_nh_cached"], "no MTU: not sent from the cache"
    assert verdict != TC_ACT_REDIRECT and after["fib_to_kernel"] == before["fib_to_kernel"] + 1
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40320, 80, flags="A"))[0] == TC_ACT_REDIRECT
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40320, 80, flags="A"))[0] == TC_ACT_REDIRECT
    assert lab.stats()["fwd_nh_cached"] == after["fwd_nh_cached"] + 1, "cached again, with the MTU"


def test_the_next_hop_is_cached_per_backend_until_the_generation_changes(lab: Lab) -> None:
    """KPR_NP_NH_CACHE: the SNAT stage's packets after the first reuse the backend's next hop
    (the node2 neighbour's MAC) without a FIB lookup: a neighbour changed behind the cache's
    back is not seen; once the generation is bumped (the agent's watcher does on every route
    or neighbour change) the next packet looks the route up again."""
    other_mac = "02:00:00:00:00:99"
    first = tcp4(lab, CLIENT4, VIP_REMOTE, 40300, 80)
    verdict, out = lab.one(D.INGRESS, first)
    assert verdict == TC_ACT_REDIRECT and out[Ether].dst == MAC_NODE2
    with M.BpfMap.open_pinned(lab.pin / D.NH_MAP) as nh:
        gen = D.NP_NH.unpack(nh.lookup(M.U32.pack(D.NH_GEN)))[0]
        cached = [D.NP_NH.unpack(v) for k, v in nh.items() if M.U32.unpack(k)[0] != D.NH_GEN and D.NP_NH.unpack(v)[0]]
    rem4 = [(c[0], c[1], c[3]) for c in cached if c[-1] == M.addr_to_bytes(REM4)]
    assert gen and set(rem4) == {(gen, lab.ifindex, bytes.fromhex(MAC_NODE2.replace(":", "")))}  # its TCP and UDP ids
    lb = lab.topo["lb"]
    try:
        lb.run(f"ip neigh replace {NODE2_4} lladdr {other_mac} dev eth0 nud permanent")
        again = tcp4(lab, CLIENT4, VIP_REMOTE, 40300, 80, flags="A")
        cached_before = lab.stats()["fwd_nh_cached"]
        assert lab.one(D.INGRESS, again)[1][Ether].dst == MAC_NODE2, "the cached next hop"
        assert lab.stats()["fwd_nh_cached"] == cached_before + 1
        lab.dp.invalidate_next_hops()
        assert lab.one(D.INGRESS, again)[1][Ether].dst == other_mac, "looked up again after the bump"
    finally:
        lb.run(f"ip neigh replace {NODE2_4} lladdr {MAC_NODE2} dev eth0 nud permanent")
        lab.dp.invalidate_next_hops()
    assert lab.one(D.INGRESS, again)[1][Ether].dst == MAC_NODE2


def test_a_device_change_bumps_the_next_hop_generation(lab: Lab) -> None:
    """A cached next hop carries its device's kind and external-ness from when it was cached (the
    established local and inline SNAT paths read them from kpr_np_nh): a change of kpr_np_devkind
    or kpr_np_dev bumps the generation, as a route change does; writing what is there does not."""
    from kpr.netdevs import DevKind

    def gen() -> int:
        return D.NP_NH.unpack(lab.dp.maps[D.NH_MAP].lookup(M.U32.pack(D.NH_GEN)))[0]

    kinds = {M.U32.unpack(k)[0]: M.U32.unpack(v)[0] for k, v in lab.dp.maps[D.DEVKIND_MAP].items()}
    start = gen()
    assert start and lab.dp.set_device_kinds(kinds) == (0, 0) and gen() == start, "nothing changed, nothing bumped"
    try:
        lab.dp.set_device_kinds({**kinds, lab.ifindex: DevKind.UNKNOWN})
        assert gen() not in (0, start), "a device's kind changed"
        bumped = gen()
        lab.dp.set_devices({lab.ifindex: ("10.0.0.9", NODE6)}, (NODE4, NODE6))
        assert gen() not in (0, bumped), "a device's SNAT address changed"
    finally:
        lab.dp.set_device_kinds(kinds)
        lab.dp.set_devices({lab.ifindex: (NODE4, NODE6)}, (NODE4, NODE6))


def test_an_ipv4_backends_snat_address_is_cached_with_its_next_hop(snat_lab: Lab) -> None:
    """kpr_np_nh.nat4: caching an IPv4 backend's next hop caches its egress device's SNAT address
    too, and a new flow to that backend takes the address from there (no kpr_np_dev lookups):
    the cached value is the node's address, and one written there by hand is the next new flow's
    source, until the generation is bumped. Both paths of a new flow: the claim stage's (default)
    and the SNAT stage's, which a build without kpr_snat_slots takes (and any flow whose slots
    are all held)."""
    lab = snat_lab
    sport = 40610 if lab.dp.snat_slots() else 40620  # (the builds share the lab's conntrack)

    def rem4_entries(nh: M.BpfMap) -> list[tuple[bytes, list[Any]]]:
        return [(k, list(D.NP_NH.unpack(v))) for k, v in nh.items()
                if M.U32.unpack(k)[0] != D.NH_GEN and D.NP_NH.unpack(v)[-1] == M.addr_to_bytes(REM4)]

    def be32(addr: str) -> int:
        return M.U32.unpack(bytes(map(int, addr.split("."))))[0]

    verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport, 80))
    assert verdict == TC_ACT_REDIRECT and out[IP].src == NODE4
    try:
        with M.BpfMap.open_pinned(lab.pin / D.NH_MAP) as nh:
            cached = [e for _, e in rem4_entries(nh) if e[0]]
            assert cached and {e[5] for e in cached} == {be32(NODE4)}, "the device's address cached"
            for k, e in rem4_entries(nh):
                e[5] = be32("10.0.0.77")
                nh.update(k, D.NP_NH.pack(*e))
        new = lab.dp.stats().get("new_snat", 0)
        verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport + 1, 80))
        assert verdict == TC_ACT_REDIRECT and out[IP].src == "10.0.0.77", "the new flow took the cached address"
        assert lab.dp.stats()["new_snat"] == new + 1, "a new flow (not one an earlier build's run left)"
    finally:
        lab.dp.invalidate_next_hops()
    verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, sport + 2, 80))
    assert verdict == TC_ACT_REDIRECT and out[IP].src == NODE4, "looked up again after the bump"


def test_dsr_adds_the_frontend_and_the_backend_node_strips_it(lab: Lab) -> None:
    opt4 = IPOption(b"\x9a\x08" + (80).to_bytes(2, "big") + bytes(map(int, VIP_DSR.split("."))))
    lab.run(D.INGRESS, [
        Case(
            "TCP SYN to a DSR LoadBalancer IP: DNAT, client address kept, frontend in an IPv4 option",
            tcp4(lab, CLIENT4, VIP_DSR, 40002, 80),
            TC_ACT_REDIRECT,
            routed(lab, MAC_NODE2) / IP(src=CLIENT4, dst=REM4_DSR, options=[opt4]) / TCP(sport=40002, dport=8080, flags="S") / Raw(b"kpr"),
        ),
        Case(
            "IPv6: the frontend in a destination option",
            tcp6(lab, CLIENT6, VIP6_DSR, 40002, 80),
            TC_ACT_REDIRECT,
            lambda out: _check_dsr6(out),
        ),
    ])
    # this node as the backend's node: a DSR packet for the local pod arrives from the LB node
    dsr_in = Ether(src=MAC_NODE2, dst=lab.mac) / IP(src="192.0.2.60", dst=POD4, options=[opt4]) / TCP(sport=40003, dport=8080, flags="S") / Raw(b"kpr")
    forged = IPOption(b"\x9a\x08" + (80).to_bytes(2, "big") + bytes((203, 0, 113, 99)))
    lab.run(D.INGRESS, [
        Case(
            "a DSR packet for a local pod: the option is stripped, the kernel delivers it",
            dsr_in,
            TC_ACT_OK,
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src="192.0.2.60", dst=POD4) / TCP(sport=40003, dport=8080, flags="S") / Raw(b"kpr"),
        ),
        Case(
            "a DSR option naming no frontend of the cluster: dropped",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src="192.0.2.61", dst=POD4, options=[forged]) / TCP(sport=40004, dport=8080, flags="S"),
            TC_ACT_SHOT,
            None,
        ),
    ])
    lab.run(D.EGRESS, [
        Case(
            "the pod's reply leaves this node straight to the client, from the DSR frontend",
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst="192.0.2.60") / TCP(sport=8080, dport=40003, flags="SA") / Raw(b"ok"),
            TC_ACT_OK,
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=VIP_DSR, dst="192.0.2.60") / TCP(sport=80, dport=40003, flags="SA") / Raw(b"ok"),
        ),
    ])
    # IPv6 decapsulation on the backend node
    dst6 = _dsr6_hdr(VIP6_DSR, 80, next_header=6)
    # the TCP segment with its checksum over the final addresses (extension headers do not count)
    tcp = TCP(bytes(IPv6(src="2001:db8:c::60", dst=POD6) / TCP(sport=40005, dport=8080, flags="S") / Raw(b"kpr"))[40:])
    lab.run(D.INGRESS, [
        Case(
            "an IPv6 DSR packet for a local pod: the destination options header is stripped",
            Ether(src=MAC_NODE2, dst=lab.mac) / IPv6(src="2001:db8:c::60", dst=POD6, nh=60) / Raw(dst6 + bytes(tcp)),
            TC_ACT_OK,
            Ether(src=MAC_NODE2, dst=lab.mac) / IPv6(src="2001:db8:c::60", dst=POD6) / TCP(sport=40005, dport=8080, flags="S") / Raw(b"kpr"),
        ),
    ])
    st = lab.stats()
    assert st["new_dsr"] >= 2 and st["dsr_received"] >= 2 and st["drop_dsr_unknown_frontend"] >= 1, st


def _dsr6_hdr(addr: str, port: int, next_header: int) -> bytes:
    """kpr's IPv6 DSR destination options header, as lib/dsr.h writes it (24 bytes)."""
    import ipaddress

    return bytes((next_header, 2, 0x1B, 18)) + port.to_bytes(2, "big") + ipaddress.IPv6Address(addr).packed + b"\x01\x00"


def _check_dsr6(out: Ether) -> None:
    ip = out[IPv6]
    assert out.dst == MAC_NODE2 and (ip.src, ip.dst) == (CLIENT6, REM6), out.summary()
    assert ip.nh == 60, "a destination options header follows the IPv6 header"
    assert bytes(ip)[40:64] == _dsr6_hdr(VIP6_DSR, 80, next_header=6), bytes(ip)[40:64].hex()
    assert out[TCP].dport == 8080 and out[TCP].sport == 40002


def test_external_traffic_policy_local_without_local_backend_drops(lab: Lab) -> None:
    lab.run(D.INGRESS, [
        Case("eTP=Local LoadBalancer IP whose only backend is on another node: dropped",
             tcp4(lab, CLIENT4, VIP_LOCALPOL, 40010, 80), TC_ACT_SHOT, None),
    ])
    assert lab.stats()["drop_no_local_backend"] >= 1


def test_source_ranges(lab: Lab) -> None:
    lab.run(D.INGRESS, [
        Case("client outside loadBalancerSourceRanges: dropped", tcp4(lab, CLIENT4, VIP_RANGES, 40020, 80), TC_ACT_SHOT, None),
        Case(
            "client inside the range: served",
            tcp4(lab, ALLOWED4, VIP_RANGES, 40020, 80),
            TC_ACT_REDIRECT,
            Ether(src=lab.lxc_mac, dst=MAC_POD) / IP(src=ALLOWED4, dst=POD4) / TCP(sport=40020, dport=8080, flags="S") / Raw(b"kpr"),
        ),
    ])
    assert lab.stats()["drop_source_range"] >= 1


def test_frontend_without_backends_answers_icmp_unreachable(lab: Lab) -> None:
    syn = tcp4(lab, CLIENT4, VIP_EMPTY, 40030, 80)
    dns = udp4(lab, CLIENT4, VIP_EMPTY, 5030, 53)
    syn6 = tcp6(lab, CLIENT6, VIP6_EMPTY, 40030, 80)
    lab.run(D.INGRESS, [
        Case(
            "TCP SYN to a LoadBalancer IP without backends: ICMP port unreachable back out of eth0",
            syn,
            TC_ACT_REDIRECT,
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=VIP_EMPTY, dst=CLIENT4, tos=0xC0, id=0, ttl=64)
            / ICMP(type=3, code=3) / bytes(syn[IP])[:28],
        ),
        Case(
            "UDP too",
            dns,
            TC_ACT_REDIRECT,
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=VIP_EMPTY, dst=CLIENT4, tos=0xC0, id=0, ttl=64)
            / ICMP(type=3, code=3) / bytes(dns[IP])[:28],
        ),
        Case(
            "IPv6: ICMPv6 destination unreachable, port unreachable",
            syn6,
            TC_ACT_REDIRECT,
            Ether(src=lab.mac, dst=MAC_OUT) / IPv6(src=VIP6_EMPTY, dst=CLIENT6, hlim=64)
            / ICMPv6DestUnreach(code=4) / bytes(syn6[IPv6])[:48],
        ),
    ])
    assert lab.stats()["icmp_sent"] >= 3


def test_unserved_port_or_protocol_on_an_announced_address_is_dropped(lab: Lab) -> None:
    lab.run(D.INGRESS, [
        Case("TCP to a LoadBalancer IP on a port it does not serve: dropped, never routed back out",
             tcp4(lab, CLIENT4, VIP_REMOTE, 40040, 443), TC_ACT_SHOT, None),
        Case("UDP to a port only TCP serves: dropped", udp4(lab, CLIENT4, VIP_DSR, 5040, 80), TC_ACT_SHOT, None),
        Case("ICMP echo to the LoadBalancer IP: dropped",
             eth_in(lab) / IP(src=CLIENT4, dst=VIP_REMOTE) / ICMP(type=8, id=7), TC_ACT_SHOT, None),
        Case("IPv6 to an unserved port of an announced address: dropped",
             tcp6(lab, CLIENT6, VIP6_REMOTE, 40040, 22), TC_ACT_SHOT, None),
        Case("ssh to the node address: not kpr's, untouched",
             tcp4(lab, CLIENT4, NODE4, 40041, 22), TC_ACT_UNSPEC, tcp4(lab, CLIENT4, NODE4, 40041, 22)),
        Case("ARP: untouched", Ether(src=MAC_OUT, dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(bytes(28)), TC_ACT_UNSPEC, None,
             check_checksums=False),
    ])
    assert lab.stats()["drop_vip_unserved"] >= 4


def test_icmp_error_from_a_local_backend_is_translated_back(lab: Lab) -> None:
    # a UDP flow to the local backend through the NodePort
    verdict, _ = lab.one(D.INGRESS, udp4(lab, CLIENT4, NODE4, 5050, NODEPORT))
    assert verdict == TC_ACT_REDIRECT
    quoted = IP(src=CLIENT4, dst=POD4) / UDP(sport=5050, dport=8080) / Raw(b"kpr-udp")
    want = IP(src=CLIENT4, dst=NODE4) / UDP(sport=5050, dport=NODEPORT) / Raw(b"kpr-udp")
    lab.run(D.EGRESS, [
        Case(
            "the pod's ICMP port unreachable leaving: from the NodePort address, quoting the client's own packet",
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst=CLIENT4) / ICMP(type=3, code=3) / bytes(quoted),
            TC_ACT_OK,
            Ether(src=lab.mac, dst=MAC_OUT) / IP(src=NODE4, dst=CLIENT4) / ICMP(type=3, code=3) / bytes(want),
        ),
    ])


def test_dsr_packet_too_big_for_the_route_answers_fragmentation_needed(lab: Lab) -> None:
    big = eth_in(lab) / IP(src=CLIENT4, dst=VIP_DSR, flags="DF") / TCP(sport=40060, dport=80, flags="A") / Raw(b"x" * 1460)
    assert len(big) - 14 == 1500
    verdict, out = lab.one(D.INGRESS, big)
    assert verdict == TC_ACT_REDIRECT, verdict
    assert out[IP].src == VIP_DSR and out[IP].dst == CLIENT4 and out[ICMP].type == 3 and out[ICMP].code == 4
    assert out[ICMP].nexthopmtu == 1492, "the route's MTU less the 8 bytes of the DSR option"


# ---------------------------------------------------------------------- the same logic for XDP

# The XDP build is the xdp_nodeport plugin's entry file (the same lib/nodeport.h, ctx/xdp.h).
XDP_ENTRY = XD.SOURCE.read_text()

# Programs of the XDP build and the KPR_NP_CALL_* slot each fills (None: entry program).
# DSR (slot 2) and DSR receive (5) are not built for XDP.
XDP_PROGS = {XD.INGRESS: None, XD.EGRESS: None, **{name: i for i, name in enumerate(XD.CALLS) if name}}
XDP_DSR_ONLY = {"kpr_xnp_dsr", "kpr_xnp_dsr_recv"}


def xdp_ctx(lab: Lab, data: bytes) -> bytes:
    # xdp_md: data 0, data_end = length, data_meta 0, ingress_ifindex = eth0
    return struct.pack("=6I", 0, len(data), 0, lab.ifindex, 0, 0)


def test_the_same_nodeport_logic_builds_for_xdp(lab: Lab) -> None:
    from kpr.bpf.loader import VerifierError
    from kpr.testing.prog_run import XDP_DROP, XDP_PASS, XDP_REDIRECT

    built = {n for n in re.findall(r"^int (kpr_xnp_\w+)\(", XDP_ENTRY, re.M)} - XDP_DSR_ONLY
    assert built == set(XDP_PROGS), "XDP_PROGS lists every program the XDP build defines"
    flags = M.cflags(lab.pin)
    b = compile_and_load(inline_includes(XDP_ENTRY, [XD.SOURCE.parent], label=str(XD.SOURCE)), cflags=flags, name="xdp-nodeport")
    xdp_counters = XD.Datapath(lab.pin)
    try:
        # every stage of the XDP build passes the verifier, ICMP-in included
        progs, rejected = {}, {}
        for name in XDP_PROGS:
            try:
                progs[name] = load_prog(b, name, "XDP")
            except VerifierError as exc:
                rejected[name] = exc.log_tail
        assert not rejected, "\n".join(f"{n} rejected:\n{tail}" for n, tail in rejected.items())
        # the XDP build counts into its own maps (kpr_np_xstats, kpr_np_xfwd), never the tc build's
        for pin_name in (xdp_counters.STATS_MAP, xdp_counters.FWD_MAP):
            xdp_counters.maps[pin_name] = M.BpfMap.open_pinned(lab.pin / pin_name)
        xstats = xdp_counters.stats
        tc_before = lab.stats()
        calls = b[b"kpr_np_xcalls"]
        for name, idx in XDP_PROGS.items():
            if idx is not None:
                calls[calls.Key(idx)] = calls.Leaf(progs[name].fd)
        # the XDP build on packets: a remote backend is source-NATed and redirected by the FIB
        # result; an unserved port on an announced address is dropped
        with in_netns(lab.topo["lb"].path):

            def xrun(pkt: Ether) -> Any:
                data = bytes(pkt)
                return test_run(progs[XD.INGRESS].fd, data, ctx=xdp_ctx(lab, data))

            res = xrun(tcp4(lab, CLIENT4, VIP_REMOTE, 41000, 80))
            assert res.retval == XDP_REDIRECT, res.retval
            out = Ether(res.data_out)
            assert (out[IP].src, out[IP].dst, out.dst) == (NODE4, REM4, MAC_NODE2), out.summary()
            assert xrun(tcp4(lab, CLIENT4, VIP_REMOTE, 41001, 443)).retval == XDP_DROP
            # a local pod: XDP_REDIRECT cannot reach its veth (no XDP on the peer), so the
            # translated frame goes to the stack with the MACs it came with
            before = xstats()
            res = xrun(tcp4(lab, CLIENT4, NODE4, 41002, NODEPORT))
            out = Ether(res.data_out)
            assert res.retval == XDP_PASS and (out.src, out.dst, out[IP].dst) == (MAC_OUT, lab.mac, POD4), out.summary()
            after = xstats()
            assert after["fwd_stack_xdp_unreachable"] - before["fwd_stack_xdp_unreachable"] == 1
            assert after["fwd_redirect"] == before["fwd_redirect"] and after["fwd_peer"] == before["fwd_peer"]

            # ICMP errors about source-NATed flows, translated back by the XDP build's ICMP-in
            # stage (reached from the entry program by tail call)
            res = xrun(udp4(lab, CLIENT4, VIP_REMOTE, 5101, 80))
            assert res.retval == XDP_REDIRECT, res.retval
            snat4 = Ether(res.data_out)[UDP].sport
            flow6 = eth_in(lab) / IPv6(src=CLIENT6, dst=VIP6_REMOTE) / UDP(sport=5102, dport=80) / Raw(b"kpr-udp6")
            res = xrun(flow6)
            assert res.retval == XDP_REDIRECT, res.retval
            out6 = Ether(res.data_out)
            assert (out6[IPv6].src, out6[IPv6].dst) == (NODE6, REM6), out6.summary()
            snat6 = out6[UDP].sport
            before = xstats()["icmp_translated"]

            inner = IP(src=NODE4, dst=REM4) / UDP(sport=snat4, dport=8080) / Raw(b"kpr-udp")
            want_inner = IP(src=CLIENT4, dst=VIP_REMOTE) / UDP(sport=5101, dport=80) / Raw(b"kpr-udp")
            inner6 = IPv6(src=NODE6, dst=REM6) / UDP(sport=snat6, dport=8080) / Raw(b"kpr-udp6")
            want_inner6 = IPv6(src=CLIENT6, dst=VIP6_REMOTE) / UDP(sport=5102, dport=80) / Raw(b"kpr-udp6")
            cases = [
                Case(
                    "XDP: ICMP port unreachable from the backend: to the client from the frontend, about its own packet",
                    Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / ICMP(type=3, code=3) / bytes(inner)[:28],
                    XDP_REDIRECT,
                    routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / ICMP(type=3, code=3) / bytes(want_inner)[:28],
                ),
                Case(
                    "XDP: the same error quoting the whole packet (quoted UDP checksum kept right)",
                    Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / ICMP(type=3, code=3) / bytes(inner),
                    XDP_REDIRECT,
                    routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / ICMP(type=3, code=3) / bytes(want_inner),
                ),
                Case(
                    "XDP: fragmentation needed from a router on the way (its own address kept)",
                    Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=NODE2_4, dst=NODE4) / ICMP(type=3, code=4, nexthopmtu=1400)
                    / bytes(inner)[:28],
                    XDP_REDIRECT,
                    routed(lab, MAC_OUT) / IP(src=NODE2_4, dst=CLIENT4) / ICMP(type=3, code=4, nexthopmtu=1400)
                    / bytes(want_inner)[:28],
                ),
                Case(
                    "XDP: ICMPv6 port unreachable from the backend: to the client from the frontend",
                    Ether(src=MAC_NODE2, dst=lab.mac) / IPv6(src=REM6, dst=NODE6) / ICMPv6DestUnreach(code=4) / bytes(inner6),
                    XDP_REDIRECT,
                    routed(lab, MAC_OUT) / IPv6(src=VIP6_REMOTE, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / bytes(want_inner6),
                ),
            ]
            for c in cases:
                c.ctx = xdp_ctx(lab, bytes(c.packet))
            run_cases(progs[XD.INGRESS].fd, cases, kind="xdp")
            icmp_after = xstats()["icmp_translated"]

            # the one-pass rewrite (KPR_REWRITE_ONE_CSUM) patches XDP checksums by hand: an
            # IPv4 UDP checksum of 0 stays 0 on a new flow, an established one (the entry
            # program's cached-next-hop path) and its reply
            seen: dict[str, int] = {}
            nh_before = xstats()["fwd_nh_cached"]
            zcases = [
                Case("XDP: UDP with checksum 0, new flow", zero_udp(udp4(lab, CLIENT4, VIP_REMOTE, 5103, 80)), XDP_REDIRECT,
                     _zero_udp_snat_check(REM4, 8080, seen, "udp")),
                Case("XDP: UDP with checksum 0, established", zero_udp(udp4(lab, CLIENT4, VIP_REMOTE, 5103, 80)),
                     XDP_REDIRECT, _zero_udp_snat_check(REM4, 8080, seen, "udp")),
                Case("XDP: TCP established, checksums patched once", tcp4(lab, CLIENT4, VIP_REMOTE, 41003, 80, flags="A"),
                     XDP_REDIRECT, _snat_check(REM4, 8080, seen, "tcp")),
                Case("XDP: TCP established again", tcp4(lab, CLIENT4, VIP_REMOTE, 41003, 80, flags="PA"),
                     XDP_REDIRECT, _snat_check(REM4, 8080, seen, "tcp")),
            ]
            for c in zcases:
                c.ctx = xdp_ctx(lab, bytes(c.packet))
            run_cases(progs[XD.INGRESS].fd, zcases, kind="xdp")
            assert xstats()["fwd_nh_cached"] >= nh_before + 2, "established packets took the cached next hop"
            reply = zero_udp(Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=seen["udp"]) / Raw(b"ok"))
            rcase = Case("XDP: the UDP reply with checksum 0: still 0", reply, XDP_REDIRECT,
                         zero_udp(routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=5103) / Raw(b"ok")))
            rcase.ctx = xdp_ctx(lab, bytes(reply))
            run_cases(progs[XD.INGRESS].fd, [rcase], kind="xdp")

            # the same at the checksum edge (every XDP checksum patched by hand, kpr_csum_patch_diff)
            def xout(pkt: Ether) -> Ether:
                res = xrun(pkt)
                assert res.retval == XDP_REDIRECT, res.retval
                return Ether(res.data_out)

            nh_before = xstats()["fwd_nh_cached"]
            _at_the_checksum_edge(lab, xout, xout, TCP, 41010)
            _at_the_checksum_edge(lab, xout, xout, UDP, 41011)
            assert xstats()["fwd_nh_cached"] >= nh_before + 4, "the probes and edges took the cached next hop"
        assert icmp_after == before + len(cases)
        assert lab.stats() == tc_before, "nothing counted in the tc build's maps"
    finally:
        xdp_counters.close()
        b.cleanup()
    # DSR edits the packet between L3 and L4 (bpf_skb_adjust_room): asking an XDP build for it
    # fails the build, naming the missing operation
    with pytest.raises(CompileError, match="__kpr_xdp_has_no_adjust_room"):
        compile_and_load(inline_includes(XDP_ENTRY, [XD.SOURCE.parent], label=str(XD.SOURCE)), cflags=flags + ["-DKPR_NP_DSR=1"], name="xdp-nodeport-dsr")
    # so does delivering into a pod's namespace (bpf_redirect_peer)
    with pytest.raises(CompileError, match="__kpr_xdp_has_no_redirect_peer"):
        compile_and_load(inline_includes(XDP_ENTRY, [XD.SOURCE.parent], label=str(XD.SOURCE)), cflags=flags + ["-DKPR_NP_PEER=1"], name="xdp-nodeport-peer")


class XdpBuild:
    """One XDP build of the NodePort programs on the lab's pinned maps (its stages put in the
    shared kpr_np_xcalls by `own_stages`), and the XDP counters."""

    def __init__(self, lab: Lab, extra: list[str]) -> None:
        self.lab = lab
        self.b = compile_and_load(inline_includes(XDP_ENTRY, [XD.SOURCE.parent], label=str(XD.SOURCE)),
                                  cflags=M.cflags(lab.pin) + extra, name="xdp-nodeport")
        self.progs = {name: load_prog(self.b, name, "XDP") for name in XDP_PROGS}
        self.counters = XD.Datapath(lab.pin)
        for pin_name in (self.counters.STATS_MAP, self.counters.FWD_MAP):
            self.counters.maps[pin_name] = M.BpfMap.open_pinned(lab.pin / pin_name)
        self.calls = self.b[b"kpr_np_xcalls"]

    def own_stages(self, without: str | None = None) -> None:
        for name, idx in XDP_PROGS.items():
            if idx is not None:
                key = self.calls.Key(idx)
                if name == without:
                    del self.calls[key]
                else:
                    self.calls[key] = self.calls.Leaf(self.progs[name].fd)

    def run(self, pkt: Ether) -> tuple[int, bytes, dict[str, int]]:
        """Verdict, output bytes and the counters it moved (XDP's maps)."""
        data = bytes(pkt)
        before = self.counters.stats()
        with in_netns(self.lab.topo["lb"].path):
            res = test_run(self.progs[XD.INGRESS].fd, data, ctx=xdp_ctx(self.lab, data))
        after = self.counters.stats()
        return res.retval, res.data_out, {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}

    def close(self) -> None:
        self.counters.close()
        self.b.cleanup()


def _dnat_to_pod(pkt: Ether, *, src: str | None = None, dst: str | None = None) -> bytes:
    """The established local flow's expected output: the frame as it came (XDP: the stack takes
    it; tc: with the route's MACs `src`, `dst`), DNAT to the pod's port 8080, checksums made anew."""
    out = Ether(bytes(pkt))
    if src is not None:
        out.src, out.dst = src, dst
    ip = out[IP] if IP in out else out[IPv6]
    ip.dst = POD4 if IP in out else POD6
    l4 = out[TCP] if TCP in out else out[UDP]
    l4.dport = 8080
    del l4.chksum
    if IP in out:
        del out[IP].chksum
    return bytes(Ether(bytes(out)))


def _udp6(lab: Lab, src: str, dst: str, sport: int, dport: int) -> Ether:
    return eth_in(lab) / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"kpr-udp6")


# Established flows to the local backend in the XDP build (KPR_NP_EST_LOCAL): description, the
# flow's first packet, an established packet and its expected output (the stack takes it).
EST_LOCAL_CASES = [
    ("IPv4 TCP", lambda lab: tcp4(lab, CLIENT4, NODE4, 43100, NODEPORT), lambda lab: tcp4(lab, CLIENT4, NODE4, 43100, NODEPORT, flags="A")),
    ("IPv4 UDP", lambda lab: udp4(lab, CLIENT4, NODE4, 43101, NODEPORT), lambda lab: udp4(lab, CLIENT4, NODE4, 43101, NODEPORT)),
    ("IPv6 TCP", lambda lab: tcp6(lab, CLIENT6, NODE6, 43102, NODEPORT), lambda lab: tcp6(lab, CLIENT6, NODE6, 43102, NODEPORT, flags="A")),
    ("IPv6 UDP", lambda lab: _udp6(lab, CLIENT6, NODE6, 43103, NODEPORT), lambda lab: _udp6(lab, CLIENT6, NODE6, 43103, NODEPORT)),
]


@pytest.fixture(scope="module")
def xdp_builds(lab: Lab) -> Iterator[tuple[XdpBuild, XdpBuild]]:
    """The default XDP build and its KPR_NP_EST_LOCAL=0 build (the local stage for every packet)."""
    on = off = None
    try:
        on = XdpBuild(lab, [])
        off = XdpBuild(lab, ["-DKPR_NP_EST_LOCAL=0"])
        yield on, off
    finally:
        for b in (on, off):
            if b is not None:
                b.close()


@pytest.mark.parametrize("desc,first,est", EST_LOCAL_CASES, ids=[c[0] for c in EST_LOCAL_CASES])
def test_xdp_established_local_flows_from_the_cached_next_hop_match_the_stage(
        lab: Lab, xdp_builds: tuple[XdpBuild, XdpBuild], desc: str, first: Any, est: Any) -> None:
    """An established packet to the local backend: the stage's output (KPR_NP_EST_LOCAL=0),
    the default build's first (its stage, which caches the route's outcome) and its next (the
    entry program, from the cache: it passes with the stage gone from kpr_np_xcalls) are the
    same frame, verdict and counters."""
    from kpr.testing.prog_run import XDP_PASS

    on, off = xdp_builds
    off.own_stages()
    lab.dp.invalidate_next_hops()  # nothing cached for the pod by an earlier test
    assert off.run(first(lab))[0] == XDP_PASS, "the flow's first packet"
    pkt = est(lab)
    want = (XDP_PASS, _dnat_to_pod(pkt))
    v, out, c_off = off.run(pkt)
    assert (v, out) == want, f"{desc}, the stage: {Ether(out).summary()}"
    assert c_off.get("established") == 1 and c_off.get("fwd_stack_xdp_unreachable") == 1, c_off
    on.own_stages()
    v, out, c1 = on.run(pkt)
    assert (v, out, c1) == (*want, c_off), f"{desc}, the default build's stage: {Ether(out).summary()} {c1}"
    on.own_stages(without="kpr_xnp_local")
    try:
        v, out, c2 = on.run(pkt)
    finally:
        on.own_stages()
    assert (v, out, c2) == (*want, c_off), f"{desc}, from the cache: {Ether(out).summary()} {c2}"


# Established SNAT flows to the remote backend: the flow's first packet and an established one.
EST_SNAT_CASES = [
    ("IPv4 TCP", lambda lab: tcp4(lab, CLIENT4, VIP_REMOTE, 43120, 80), lambda lab: tcp4(lab, CLIENT4, VIP_REMOTE, 43120, 80, flags="A")),
    ("IPv4 UDP", lambda lab: udp4(lab, CLIENT4, VIP_REMOTE, 43121, 80), lambda lab: udp4(lab, CLIENT4, VIP_REMOTE, 43121, 80)),
    ("IPv6 TCP", lambda lab: tcp6(lab, CLIENT6, VIP6_REMOTE, 43122, 80), lambda lab: tcp6(lab, CLIENT6, VIP6_REMOTE, 43122, 80, flags="A")),
    ("IPv6 UDP", lambda lab: _udp6(lab, CLIENT6, VIP6_REMOTE, 43123, 80), lambda lab: _udp6(lab, CLIENT6, VIP6_REMOTE, 43123, 80)),
]


@pytest.mark.parametrize("desc,first,est", EST_SNAT_CASES, ids=[c[0] for c in EST_SNAT_CASES])
def test_xdp_established_snat_flows_from_the_entry_program_match_the_other_build(
        lab: Lab, xdp_builds: tuple[XdpBuild, XdpBuild], desc: str, first: Any, est: Any) -> None:
    """An established SNAT packet sent from the cached next hop by the entry program, in both
    builds (KPR_NP_EST_LOCAL leaves that path alone): the same frame (DNAT + SNAT, node2's MAC),
    verdict and counters (established, the cached send: fwd_redirect, egress_<kind>,
    fwd_nh_cached), the SNAT stage not reached."""
    from kpr.testing.prog_run import XDP_REDIRECT

    on, off = xdp_builds
    off.own_stages()
    assert off.run(first(lab))[0] == XDP_REDIRECT, "the flow's first packet"
    pkt = est(lab)
    v, want, c_off = off.run(pkt)
    o = Ether(want)
    ip = o[IP] if IP in o else o[IPv6]
    assert v == XDP_REDIRECT and (o.dst, ip.src, ip.dst) == (MAC_NODE2, NODE4 if IP in o else NODE6,
                                                             REM4 if IP in o else REM6), o.summary()
    assert {k: c_off.get(k) for k in ("established", "fwd_redirect", "fwd_nh_cached")} == dict.fromkeys(
        ("established", "fwd_redirect", "fwd_nh_cached"), 1), c_off
    on.own_stages(without="kpr_xnp_snat")
    try:
        got = on.run(pkt)
    finally:
        on.own_stages()
    assert got == (v, want, c_off), f"{desc}: {Ether(got[1]).summary()} {got[2]} against {c_off}"


def test_xdp_a_route_change_sends_the_established_local_flow_its_new_way(
        lab: Lab, xdp_builds: tuple[XdpBuild, XdpBuild]) -> None:
    """The local flow's cached outcome lasts until the generation changes (the agent's watcher
    bumps it on every route change): then the next packet takes the new route (out of eth0, to
    node2's MAC: XDP_REDIRECT), which is cached in turn."""
    from kpr.testing.prog_run import XDP_DROP, XDP_PASS, XDP_REDIRECT

    on, _off = xdp_builds
    on.own_stages()
    lab.dp.invalidate_next_hops()
    lxc = next(i for i in lab.topo["lb"].ifaces if i.startswith("lxc"))
    assert on.run(tcp4(lab, CLIENT4, NODE4, 43110, NODEPORT))[0] == XDP_PASS
    pkt = tcp4(lab, CLIENT4, NODE4, 43110, NODEPORT, flags="A")
    assert on.run(pkt)[0] == XDP_PASS  # cached: the pod's veth, which XDP_REDIRECT cannot reach
    lab.topo["lb"].run(f"ip route replace {POD4}/32 via {NODE2_4} dev eth0")
    try:
        on.own_stages(without="kpr_xnp_local")
        try:
            v, out, c = on.run(pkt)
            assert (v, c.get("fwd_stack_xdp_unreachable")) == (XDP_PASS, 1), "the cached outcome until the generation changes"
            lab.dp.invalidate_next_hops()
            v, out, c = on.run(pkt)
            assert (v, c.get("tail_call_missing")) == (XDP_DROP, 1), "a changed generation: the stage's path again"
        finally:
            on.own_stages()
        v, out, c = on.run(pkt)
        o = Ether(out)
        assert v == XDP_REDIRECT and (o.src, o.dst, o[IP].dst, o[TCP].dport) == (lab.mac, MAC_NODE2, POD4, 8080), o.summary()
        assert c.get("fwd_redirect") == 1 and "fwd_stack_xdp_unreachable" not in c, c
        on.own_stages(without="kpr_xnp_local")
        try:
            v, out2, c = on.run(pkt)
        finally:
            on.own_stages()
        assert (v, out2) == (XDP_REDIRECT, out) and c.get("fwd_nh_cached") == 1, f"the new route cached: {c}"
    finally:
        lab.topo["lb"].run(f"ip route replace {POD4}/32 dev {lxc}")
        lab.dp.invalidate_next_hops()


@pytest.fixture(scope="module")
def tc_est_local_off(lab: Lab) -> Iterator[D.Datapath]:
    """The tc build with KPR_NP_EST_LOCAL=0 on the lab's maps (its own stage array): every
    established local packet through the local stage and its FIB lookup."""
    dp = D.Datapath(lab.pin, mode="snat", extra_cflags=["-DKPR_NP_EST_LOCAL=0"])
    try:
        yield dp.load()
    finally:
        dp.close()


def _tc_run(lab: Lab, dp: D.Datapath, pkt: Ether) -> tuple[int, bytes, dict[str, int]]:
    """Verdict, output bytes and the counters it moved (the maps every build shares)."""
    before = lab.stats()
    with in_netns(lab.topo["lb"].path):
        res = test_run(dp.fd(D.INGRESS), bytes(pkt), ctx=lab.ctx)
    after = lab.stats()
    return res.signed, res.data_out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


class _StageOut:
    """lab.dp's local stage out of its stage array for the block: what still leaves by the
    entry program's own path, the rest counts tail_call_missing."""

    def __init__(self, lab: Lab) -> None:
        self.calls = lab.dp.bpf[lab.dp.CALLS_MAP.encode()]
        self.key = self.calls.Key(D.CALLS.index("kpr_np_local"))
        self.fd = lab.dp.fd("kpr_np_local")

    def __enter__(self) -> None:
        del self.calls[self.key]

    def __exit__(self, *exc: object) -> None:
        self.calls[self.key] = self.calls.Leaf(self.fd)


@pytest.mark.parametrize("desc,first,est", EST_LOCAL_CASES, ids=[c[0] for c in EST_LOCAL_CASES])
def test_tc_established_local_flows_from_the_cached_next_hop_match_the_stage(
        lab: Lab, tc_est_local_off: D.Datapath, desc: str, first: Any, est: Any) -> None:
    """tc, KPR_NP_EST_LOCAL: an established packet to the local backend comes out of the stage
    (the off build), of the default build's stage (which caches the route) and of its entry
    program alone (the stage out of its array) as the same frame (DNAT, the veth's MACs),
    verdict (redirect_peer) and counters (established, fwd_peer, egress_veth_peer); a packet
    too big for the cached route's MTU, or any packet after the generation changed, is the
    stage's again."""
    off = tc_est_local_off
    lab.dp.invalidate_next_hops()  # nothing cached for the pod by an earlier test
    assert _tc_run(lab, off, first(lab))[0] == TC_ACT_REDIRECT, "the flow's first packet"
    pkt = est(lab)
    want = _dnat_to_pod(pkt, src=lab.lxc_mac, dst=MAC_POD)
    v, out, c_off = _tc_run(lab, off, pkt)
    assert (v, out) == (TC_ACT_REDIRECT, want), f"{desc}, the stage: {Ether(out).summary()}"
    assert c_off == {"established": 1, "fwd_peer": 1, "egress_veth_peer": 1}, c_off
    got = _tc_run(lab, lab.dp, pkt)
    assert got == (v, out, c_off), f"{desc}, the default build's stage: {Ether(got[1]).summary()} {got[2]}"
    big = est(lab)
    big[Raw].load = b"x" * 1500  # over the pod veth's 1500-byte MTU, not GSO
    with _StageOut(lab):
        got = _tc_run(lab, lab.dp, pkt)
        assert got == (v, out, c_off), f"{desc}, from the cache: {Ether(got[1]).summary()} {got[2]}"
        assert _tc_run(lab, lab.dp, big)[2].get("tail_call_missing") == 1, "too big for the cached MTU: the stage"
        lab.dp.invalidate_next_hops()
        assert _tc_run(lab, lab.dp, pkt)[2].get("tail_call_missing") == 1, "a new generation: the stage"


def test_tc_established_local_flows_to_a_bridge_are_cached_redirects(lab: Lab, tc_est_local_off: D.Datapath) -> None:
    """A pod device without a peer (a bridge): the stage's bpf_redirect with the route's MACs
    (the off build; the default build's stage, caching), and from the cache the same frame
    counted as a cached redirect (fwd_nh_cached besides), as a remote backend's cached next hop
    counts."""
    from kpr.netdevs import DevKind

    lxc_idx = lab.topo.ifindex("lb", next(i for i in lab.topo["lb"].ifaces if i.startswith("lxc")))
    kinds = lab.dp.maps[D.DEVKIND_MAP]
    saved = kinds.lookup(M.U32.pack(lxc_idx))
    kinds.update(M.U32.pack(lxc_idx), M.U32.pack(DevKind.BRIDGE))
    try:
        lab.dp.invalidate_next_hops()
        assert _tc_run(lab, tc_est_local_off, tcp4(lab, CLIENT4, NODE4, 43130, NODEPORT))[0] == TC_ACT_REDIRECT
        pkt = tcp4(lab, CLIENT4, NODE4, 43130, NODEPORT, flags="A")
        want = (TC_ACT_REDIRECT, _dnat_to_pod(pkt, src=lab.lxc_mac, dst=MAC_POD),
                {"established": 1, "fwd_redirect": 1, "egress_bridge": 1})
        assert _tc_run(lab, tc_est_local_off, pkt) == want, "the stage"
        assert _tc_run(lab, lab.dp, pkt) == want, "the default build's stage"
        with _StageOut(lab):
            got = _tc_run(lab, lab.dp, pkt)
        assert got == (*want[:2], {**want[2], "fwd_nh_cached": 1}), f"from the cache: {Ether(got[1]).summary()} {got[2]}"
    finally:
        kinds.update(M.U32.pack(lxc_idx), saved)
        lab.dp.invalidate_next_hops()


# Builds of the local DNAT (KPR_NP_DNAT_ONE_PASS): -D flags.
DNAT_BUILDS = {
    "one pass, state read": [],
    "one pass, state inferred": ["-UKPR_SKB_KERN_CTX_FN"],
    "per field": ["-DKPR_NP_DNAT_ONE_PASS=0"],
}


def _local_out(pkt: Ether, lab: Lab) -> bytes:
    """A local flow's packet as redirect_peer hands it to the pod: the veth's MACs, DNAT to
    POD4:8080, checksums made anew (an IPv4 UDP checksum of 0 kept: none)."""
    out = Ether(bytes(pkt))
    out.src, out.dst = lab.lxc_mac, MAC_POD
    out[IP].dst = POD4
    l4 = out[TCP] if TCP in out else out[UDP]
    l4.dport = 8080
    if not (UDP in out and out[UDP].chksum == 0):
        del l4.chksum
    del out[IP].chksum
    return bytes(Ether(bytes(out)))


def _udp_summing_to_zero_after_dnat(lab: Lab, sport: int) -> Ether:
    """A UDP packet to the NodePort whose checksum, once DNAT'd to POD4:8080, computes to 0
    (so is sent as 0xffff, 0 meaning none): its payload's last word is the checksum the DNAT'd
    packet has with that word 0, which brings the one's-complement sum to 0xffff."""
    pkt = eth_in(lab) / IP(src=CLIENT4, dst=NODE4) / UDP(sport=sport, dport=NODEPORT) / Raw(b"kpr-\0\0")
    dnat = IP(bytes(pkt[IP]))
    dnat.dst, dnat[UDP].dport = POD4, 8080
    del dnat.chksum, dnat[UDP].chksum
    word = IP(bytes(dnat))[UDP].chksum
    pkt[Raw].load = b"kpr-" + word.to_bytes(2, "big")
    return pkt


@pytest.mark.parametrize("build", list(DNAT_BUILDS), ids=list(DNAT_BUILDS))
def test_dnat_to_a_local_backend_patches_the_checksums_as_the_per_field_rewrite(lab: Lab, build: str) -> None:
    """KPR_NP_DNAT_ONE_PASS: DNAT to a local pod of IPv4 TCP/UDP (the local stage for a flow's
    first packet, the entry program from the cached next hop after it) writes the address and
    port and patches each checksum once; every build's output is the frame with scapy's
    checksums (TCP, TCP with IP options, UDP, UDP with checksum 0 kept, UDP whose patched checksum
    computes to 0: sent as 0xffff), with redirect_peer's
    counters, the established packets counted as established."""
    flags = DNAT_BUILDS[build]
    dp = D.Datapath(lab.pin, mode="snat", extra_cflags=flags).load() if flags else lab.dp
    port = 43200 + 10 * list(DNAT_BUILDS).index(build)
    try:
        lab.dp.invalidate_next_hops()
        for desc, pkt, est in [
            ("TCP", tcp4(lab, CLIENT4, NODE4, port, NODEPORT), tcp4(lab, CLIENT4, NODE4, port, NODEPORT, flags="A")),
            ("TCP with IP options", tcp4(lab, CLIENT4, NODE4, port + 1, NODEPORT, options=[IPOption(b"\x94\x04\x00\x00")]),
             tcp4(lab, CLIENT4, NODE4, port + 1, NODEPORT, flags="PA", options=[IPOption(b"\x94\x04\x00\x00")])),
            ("UDP", udp4(lab, CLIENT4, NODE4, port + 2, NODEPORT), udp4(lab, CLIENT4, NODE4, port + 2, NODEPORT)),
            ("UDP with checksum 0", zero_udp(udp4(lab, CLIENT4, NODE4, port + 3, NODEPORT)),
             zero_udp(udp4(lab, CLIENT4, NODE4, port + 3, NODEPORT))),
            ("UDP whose checksum computes to 0", _udp_summing_to_zero_after_dnat(lab, port + 4),
             _udp_summing_to_zero_after_dnat(lab, port + 4)),
        ]:
            for when, p, moved in (("first packet", pkt, {"new_local": 1}), ("established", est, {"established": 1}),
                                   ("established again", est, {"established": 1})):
                got = _tc_run(lab, dp, p)
                want = (TC_ACT_REDIRECT, _local_out(p, lab), {**moved, "fwd_peer": 1, "egress_veth_peer": 1})
                assert got == want, f"{build}, {desc}, {when}: {Ether(got[1]).summary()} {got[2]}"
                if desc == "UDP whose checksum computes to 0":
                    assert Ether(got[1])[UDP].chksum == 0xffff, f"{build}, {when}: 0 is sent as 0xffff"
    finally:
        if flags:
            dp.close()


def test_a_reused_client_port_never_meets_a_stale_reverse_entry(lab: Lab) -> None:
    pod_synack = Ether(src=lab.mac, dst=MAC_OUT) / IP(src=POD4, dst=CLIENT4) / TCP(sport=8080, dport=40100, flags="SA")
    via_np = Ether(src=lab.mac, dst=MAC_OUT) / IP(src=NODE4, dst=CLIENT4) / TCP(sport=NODEPORT, dport=40100, flags="SA")
    lab.run(D.INGRESS, [
        Case("a NodePort connection to the local pod", tcp4(lab, CLIENT4, NODE4, 40100, NODEPORT), TC_ACT_REDIRECT, None),
        Case("... the client closes it", tcp4(lab, CLIENT4, NODE4, 40100, NODEPORT, flags="FA"), TC_ACT_REDIRECT, None),
    ])
    before = lab.stats()["reverse_entry_stale"]
    lab.run(D.EGRESS, [
        Case(
            "the same client port then dials the pod directly: the pod's SYN-ACK is not rewritten",
            pod_synack, TC_ACT_UNSPEC, pod_synack,
        ),
    ])
    assert lab.stats()["reverse_entry_stale"] == before + 1
    lab.run(D.INGRESS, [
        Case("a new NodePort SYN on the ended flow's tuple starts it over",
             tcp4(lab, CLIENT4, NODE4, 40100, NODEPORT), TC_ACT_REDIRECT, None),
    ])
    lab.run(D.EGRESS, [Case("its SYN-ACK is translated again", pod_synack, TC_ACT_OK, via_np)])


def test_maglev_picks_follow_the_writer_table(lab: Lab) -> None:
    from test_servicemaps import tuple_hash

    from kpr.bpf.maglev import build_table

    vip = "203.0.113.30"
    pods = [f"10.244.2.{i}" for i in (31, 32, 33)]
    lab.writer.upsert(svc("maglev", [Frontend(LB, vip, 80, TCP_, tuple(be(p) for p in pods))],
                          annotations=(("service.kpr.io/lb-algorithm", "maglev"),)))
    try:
        ids = lab.writer.backend_ids()
        table = build_table([(ids[f"{p}:8080/TCP"], f"{p}:8080") for p in pods], lab.dp.maglev_size)
        by_id = {ids[f"{p}:8080/TCP"]: p for p in pods}
        seen = set()
        for sport in range(42000, 42060):
            verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, vip, sport, 80))
            assert verdict == TC_ACT_REDIRECT
            want = by_id[table[tuple_hash(CLIENT4, vip, sport, 80, 6) % lab.dp.maglev_size]]
            assert out[IP].dst == want, sport
            seen.add(want)
        assert seen == set(pods)
    finally:
        lab.writer.delete(ServiceKey("default", "maglev"))


def test_the_egress_device_kind_picks_the_helper(lab: Lab) -> None:
    """Local delivery by the pod device's kind (kpr_np_devkind): redirect_peer into a veth with a
    peer, bpf_redirect with the route's MACs into a bridge, the stack (the frame's MACs as they
    came, the packet translated) for a device not classified yet. The verdict is TC_ACT_REDIRECT
    for both helpers: the counters tell them apart. A source-NATed flow through a device of
    unknown kind takes bpf_redirect_neigh."""
    from kpr.netdevs import DevKind

    lxc_idx = lab.topo.ifindex("lb", next(i for i in lab.topo["lb"].ifaces if i.startswith("lxc")))
    kinds = lab.dp.maps[D.DEVKIND_MAP]
    saved = kinds.lookup(M.U32.pack(lxc_idx))
    assert saved is not None and M.U32.unpack(saved)[0] == DevKind.VETH_PEER, "the lab's pod veth is classified"
    want = Ether(src=lab.lxc_mac, dst=MAC_POD) / IP(src=CLIENT4, dst=POD4) / TCP(sport=40500, dport=8080, flags="S") / Raw(b"kpr")

    def one(sport: int) -> tuple[int, Ether, dict[str, int]]:
        before = lab.stats()
        verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, NODE4, sport, NODEPORT))
        after = lab.stats()
        return verdict, out, {k: after[k] - before[k] for k in after if after[k] != before[k]}

    try:
        verdict, out, d = one(40500)
        assert verdict == TC_ACT_REDIRECT and bytes(out) == bytes(want)
        assert d["fwd_peer"] == 1 and d["egress_veth_peer"] == 1 and "fwd_redirect" not in d, d

        kinds.update(M.U32.pack(lxc_idx), M.U32.pack(DevKind.BRIDGE))
        verdict, out, d = one(40501)
        assert verdict == TC_ACT_REDIRECT and (out.src, out.dst, out[IP].dst) == (lab.lxc_mac, MAC_POD, POD4)
        assert d["fwd_redirect"] == 1 and d["egress_bridge"] == 1 and "fwd_peer" not in d, d

        kinds.delete(M.U32.pack(lxc_idx))
        verdict, out, d = one(40502)
        assert verdict == TC_ACT_OK, "an unclassified device: the stack, never a helper that may drop"
        assert (out.src, out.dst) == (MAC_OUT, lab.mac), "the frame as it came, for the stack to accept"
        assert (out[IP].dst, out[TCP].dport) == (POD4, 8080), "translated: the stack routes it to the pod"
        assert d["fwd_stack_unknown_dev"] == 1 and d["egress_unknown"] == 1, d
        # a source-NATed flow through a device of unknown kind: not the stack (the node's own
        # source address would be a martian there) but the neighbour helper, safe on any device
        eth0 = M.U32.pack(lab.ifindex)
        saved_eth0 = kinds.lookup(eth0)
        kinds.update(eth0, M.U32.pack(DevKind.UNKNOWN))
        # next hops cached while eth0 was a known kind are dropped, as the agent's next bump (at
        # most 2 s away) drops them: a new flow takes a current cached one (KPR_NP_NEW_NH)
        lab.dp.invalidate_next_hops()
        try:
            before = lab.stats()
            verdict, out = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40503, 80))
            after = lab.stats()
        finally:
            if saved_eth0 is not None:
                kinds.update(eth0, saved_eth0)
            else:
                kinds.delete(eth0)
        assert verdict == TC_ACT_REDIRECT and (out[IP].src, out[IP].dst) == (NODE4, REM4), out.summary()
        assert after["fwd_neigh"] - before["fwd_neigh"] == 1 and after["egress_unknown"] - before["egress_unknown"] == 1
        assert after["fwd_stack_unknown_dev"] == before["fwd_stack_unknown_dev"]
        status_names = set(D.FWD_STATS.values())
        assert {"fwd_peer", "fwd_redirect", "fwd_neigh", "fwd_stack_unknown_dev", "egress_bridge"} <= status_names
    finally:
        kinds.update(M.U32.pack(lxc_idx), saved)


def test_a_stage_missing_from_the_tail_call_array_drops_and_tells_the_monitor(lab: Lab) -> None:
    from kpr.monitor import Monitor

    calls = lab.dp.bpf[lab.dp.CALLS_MAP.encode()]
    key = calls.Key(D.CALLS.index("kpr_np_snat"))
    before = lab.stats()["tail_call_missing"]
    del calls[key]
    try:
        with Monitor(lab.pin) as m:
            verdict, _ = lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40070, 80))
            events = m.collect(2, timeout=3.0)
    finally:
        calls[key] = calls.Leaf(lab.dp.fd("kpr_np_snat"))
    assert verdict == TC_ACT_SHOT
    assert lab.stats()["tail_call_missing"] == before + 1
    # the flow was balanced (new, snat) before its stage was looked up; the drop has no tuple
    assert [(e.type, e.hook, e.reason, e.client, e.frontend) for e in events] == [
        ("new", "tc", "snat", f"{CLIENT4}:40070", f"{VIP_REMOTE}:80"),
        ("drop", "tc", "tail_call_missing", None, ""),
    ]
    # the stage back: the same flow is source-NATed again
    assert lab.one(D.INGRESS, tcp4(lab, CLIENT4, VIP_REMOTE, 40071, 80))[0] == TC_ACT_REDIRECT


# ---------------------------------------------------------------------- SNAT slots (issue 14 item 4)


def _slots(lab: Lab) -> Any:
    from kpr.bpf.slots import SlotTable

    return SlotTable.open(lab.pin / ND.SNAT_SLOTS_MAP, ND.SNAT_SLOT)


def _reply_key(backend: str, bport: int, nat_port: int, proto: int, nat: str = NODE4) -> bytes:
    return D.CT_KEY.pack(M.addr_to_bytes(backend), M.addr_to_bytes(nat), M.htons(bport), M.htons(nat_port), proto,
                         D.CT_DIR_REPLY, 0)


def _hold_even_ports(lab: Lab, backend: str, proto: int, ports: range, nat: str = NODE4) -> int:
    """Hold every probe of the reply keys of these (even) SNAT ports with keys no flow has: a claim
    for them finds no free slot. Returns the slots written."""
    from kpr.bpf.slots import slot_hash

    n = 0
    with _slots(lab) as t:
        stamp = ND_now() | 1
        for port in ports:
            h = slot_hash(_reply_key(backend, 8080, port, proto, nat))
            for j in range(ND.SNAT_SLOT_PROBES):
                idx = (h + j) & (t.slots - 1)
                if not t.claim(idx):
                    t.put(idx, stamp, _reply_key("192.0.2.250", 1, n % 60000 + 1, 99), bytes(t.val_size))
                    n += 1
    return n


def slot_hash_of(key: bytes) -> int:
    from kpr.bpf.slots import slot_hash

    return slot_hash(key)


def ND_now() -> int:
    from kpr.bpf import ctclock

    return ctclock.now_ns()


def _warm(lab: Lab, pkt: Ether) -> None:
    """One flow to the backend first: its next hop is cached (a new flow claims a slot only then)."""
    verdict, _ = lab.one(D.INGRESS, pkt)
    assert verdict == TC_ACT_REDIRECT


SLOT_CASES = [  # (name, first packet, reply builder(port), expected reply, proto, backend)
    ("IPv4 TCP", lambda lab: tcp4(lab, CLIENT4, VIP_REMOTE, 41001, 80),
     lambda lab, p: Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / TCP(sport=8080, dport=p, flags="SA") / Raw(b"ok"),
     lambda lab: routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / TCP(sport=80, dport=41001, flags="SA") / Raw(b"ok"),
     6, REM4, NODE4),
    ("IPv4 UDP", lambda lab: udp4(lab, CLIENT4, VIP_REMOTE, 41002, 80),
     lambda lab, p: Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=p) / Raw(b"ok"),
     lambda lab: routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=41002) / Raw(b"ok"),
     17, REM4, NODE4),
    ("IPv6 TCP", lambda lab: tcp6(lab, CLIENT6, VIP6_REMOTE, 41003, 80),
     lambda lab, p: Ether(src=MAC_NODE2, dst=lab.mac) / IPv6(src=REM6, dst=NODE6) / TCP(sport=8080, dport=p, flags="SA") / Raw(b"ok"),
     lambda lab: routed(lab, MAC_OUT) / IPv6(src=VIP6_REMOTE, dst=CLIENT6) / TCP(sport=80, dport=41003, flags="SA") / Raw(b"ok"),
     6, REM6, NODE6),
    ("IPv6 UDP", lambda lab: eth_in(lab) / IPv6(src=CLIENT6, dst=VIP6_REMOTE) / UDP(sport=41004, dport=80) / Raw(b"kpr-udp"),
     lambda lab, p: Ether(src=MAC_NODE2, dst=lab.mac) / IPv6(src=REM6, dst=NODE6) / UDP(sport=8080, dport=p) / Raw(b"ok"),
     lambda lab: routed(lab, MAC_OUT) / IPv6(src=VIP6_REMOTE, dst=CLIENT6) / UDP(sport=80, dport=41004) / Raw(b"ok"),
     17, REM6, NODE6),
]


@pytest.mark.parametrize("name, first, reply, want, proto, backend, nat", SLOT_CASES, ids=[c[0] for c in SLOT_CASES])
def test_a_new_snat_flow_claims_a_slot_and_its_reply_comes_from_it(slot_lab: Lab, name: str, first: Any, reply: Any,
                                                                    want: Any, proto: int, backend: str, nat: str) -> None:
    lab = slot_lab
    pkt = first(lab)
    _warm(lab, _other_client(pkt))
    before = lab.stats()
    verdict, out = lab.one(D.INGRESS, pkt)
    assert verdict == TC_ACT_REDIRECT
    port = (out[TCP] if TCP in out else out[UDP]).sport
    assert port % 2 == 0, f"{name}: a slot's port is even ({port})"
    with _slots(lab) as t:
        idx = t.find(_reply_key(backend, 8080, port, proto, nat), ND.SNAT_SLOT_PROBES)
        assert idx is not None, f"{name}: no slot holds the reply key"
        _stamp, _k, val = t.read(idx)
    with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
        assert m.lookup(_reply_key(backend, 8080, port, proto, nat)) is None, "a slot's flow has no kpr_snat entry"
    addr, cport = D.NAT_ENTRY.unpack(val)[:2]
    assert addr == M.addr_to_bytes(pkt[IPv6].src if IPv6 in pkt else pkt[IP].src)
    lab.run(D.INGRESS, [Case(f"{name}: the reply, from the slot", reply(lab, port), TC_ACT_REDIRECT, want(lab))])
    after = lab.stats()
    assert after["snat_slot_full"] == before["snat_slot_full"]


def _other_client(pkt: Ether) -> Ether:
    """The same packet from another client port (a warm-up flow of its own)."""
    p = Ether(bytes(pkt))
    l4 = p[TCP] if TCP in p else p[UDP]
    l4.sport += 500
    del l4.chksum
    return Ether(bytes(p))


def test_held_slots_make_a_claim_take_other_ports_then_kpr_snat_counted(slot_lab: Lab) -> None:
    """Half the even ports' probes held: every slot claimed is of the other half; all of them
    held: the flow's reply side goes into kpr_snat (an odd port), counted, and its reply works."""
    lab = slot_lab
    _warm(lab, udp4(lab, CLIENT4, VIP_REMOTE, 42000, 80))
    lo, hi = D.SNAT_PORT_MIN, D.SNAT_PORT_MAX
    evens = range(lo + lo % 2, hi + 1, 2)
    held = [p for i, p in enumerate(evens) if i % 2 == 0]
    try:
        _hold_even_ports(lab, REM4, 17, held)
        got = []
        for cport in range(42001, 42013):
            verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, cport, 80))
            assert verdict == TC_ACT_REDIRECT
            got.append(out[UDP].sport)
        in_slots = [p for p in got if p % 2 == 0]
        assert in_slots, f"no flow claimed a slot: {got}"
        assert not set(in_slots) & set(held), f"a held slot was taken: {sorted(set(in_slots) & set(held))}"

        _hold_even_ports(lab, REM4, 17, evens)
        before = lab.stats()
        verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, 42100, 80))
        assert verdict == TC_ACT_REDIRECT
        port = out[UDP].sport
        assert port % 2 == 1, f"every slot held: kpr_snat's odd port expected, got {port}"
        assert lab.stats()["snat_slot_full"] == before["snat_slot_full"] + 1
        with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
            assert m.lookup(_reply_key(REM4, 8080, port, 17)) is not None
        lab.run(D.INGRESS, [Case(
            "the overflowed flow's reply, from kpr_snat",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=port) / Raw(b"ok"),
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=42100) / Raw(b"ok"))])
    finally:
        with _slots(lab) as t:
            t.clear()


def test_a_claim_beside_another_cpus_half_written_one_never_doubles_a_reply_key(slot_lab: Lab) -> None:
    """R3's race (README issue 14, H1's round reviewed): another CPU has claimed each even port's
    first probe for the same backend but not yet written its key (word 0 set, key zero). A new
    flow must not claim another slot for one of those keys: when the other CPU's key lands, two
    slots would hold it and replies (read in probe order) would go to the other flow's client.
    With one slot per key (KPR_SNAT_SLOT_PROBES 1) the flow takes an odd port from kpr_snat.
    Fails with KPR_SNAT_SLOT_PROBES=4 (H1's): the flow claimed the second probe of an even port."""
    from kpr.bpf.slots import slot_hash

    lab = slot_lab
    _warm(lab, udp4(lab, CLIENT4, VIP_REMOTE, 45000, 80))
    lo, hi = D.SNAT_PORT_MIN, D.SNAT_PORT_MAX
    evens = range(lo + lo % 2, hi + 1, 2)
    try:
        with _slots(lab) as t:
            stamp = ND_now() | 1
            half = bytes(t.key_size)  # the other CPU's claim: word 0 written, key not yet
            for port in evens:
                idx = slot_hash(_reply_key(REM4, 8080, port, 17)) & (t.slots - 1)
                if not t.claim(idx):
                    t.put(idx, stamp, half, bytes(t.val_size))
        for cport in range(45001, 45009):
            verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, cport, 80))
            assert verdict == TC_ACT_REDIRECT
            port = out[UDP].sport
            key = _reply_key(REM4, 8080, port, 17)
            with _slots(lab) as t:
                first = slot_hash(key) & (t.slots - 1)
                _s, _k, _v = t.read(first)
                if t.claim(first) and _k == half:  # the other CPU's key lands
                    t.put(first, stamp, key, _v)
                # H1's four probes from the key's hash: where a second copy would be
                near = [(first + j) & (t.slots - 1) for j in range(4)]
                holding = [i for i in near if t.claim(i) and t.read(i)[1] == key]
            assert len(holding) <= 1, f"client port {cport}: slots {holding} hold one reply key (port {port})"
    finally:
        with _slots(lab) as t:
            t.clear()


def test_a_shut_gate_keeps_a_claim_off_a_port_kpr_snat_holds(slot_lab: Lab) -> None:
    """The gate (R3 item 7: no test failed with the claim's kpr_snat look removed, `lru = 0`): a
    build whose SNAT ports are 61000-61001 (one even port) and a reverse entry for 61000 in
    kpr_snat (an older build's flow): with the gate shut the claim must not take 61000 (two
    entries would hold its reply key, the old flow's replies at risk); it overflows to kpr_snat's
    odd port 61001. Fails with `lru = 0` in kpr_snat_claim (the flow took 61000)."""
    lab = slot_lab
    dp = D.Datapath(lab.pin, mode="snat", snat_ports=(61000, 61001))
    key = _reply_key(REM4, 8080, 61000, 17)
    old_client, old_cport = "192.0.2.78", 43001
    try:
        narrow = dataclasses.replace(lab, dp=dp.load())
        _warm(narrow, udp4(narrow, CLIENT4, VIP_REMOTE, 47000, 80))
        with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
            for k, _v in list(m.items()):  # the warm-up's own odd port: 61001 free again
                if D.CT_KEY.unpack(k)[3] == M.htons(61001):
                    m.delete(k)
            m.update(key, D.NAT_ENTRY.pack(M.addr_to_bytes(old_client), M.htons(old_cport), M.htons(80), 0,
                                           ND_now(), M.addr_to_bytes(VIP_REMOTE)))
        with _slots(lab) as t:
            t.clear()
        with M.BpfMap.open_pinned(lab.pin / ND.SNAT_GATE_MAP) as g:
            D.snat_gate_open(g)
        verdict, out = narrow.one(D.INGRESS, udp4(narrow, CLIENT4, VIP_REMOTE, 47001, 80))
        assert verdict == TC_ACT_REDIRECT
        assert out[UDP].sport == 61001, f"the claim took {out[UDP].sport}, whose reply key kpr_snat holds"
        with _slots(lab) as t:
            assert t.find(key, ND.SNAT_SLOT_PROBES) is None, "a slot holds the reply key kpr_snat holds"
    finally:
        dp.close()
        with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
            m.delete(key)
        with _slots(lab) as t:
            t.clear()


def test_a_one_port_snat_range_is_kept_by_both_tables(slot_lab: Lab) -> None:
    """snatPortRange of one port with kpr_snat_slots (the default): slots take even ports, kpr_snat
    odd ones, and neither may round a port out of the range. 61001 alone: the flow takes it in
    kpr_snat (no even port for a slot); 61000 alone: the first flow takes it in a slot, a second
    client's flow to the same backend finds it held and is dropped, counted (no odd port for
    kpr_snat). Before the mend the first got 61000 and the last 61001: ports outside the range."""
    lab = slot_lab
    keys = [_reply_key(REM4, 8080, p, 17) for p in (61000, 61001)]

    def free_ports() -> None:  # (the lab's earlier flows, and the warm-up's, may hold them)
        with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m, _slots(lab) as t:
            for k in keys:
                m.delete(k)
                i = t.find(k, ND.SNAT_SLOT_PROBES)
                if i is not None:
                    t.free(i)

    for port in (61001, 61000):
        dp = D.Datapath(lab.pin, mode="snat", snat_ports=(port, port))
        try:
            one = dataclasses.replace(lab, dp=dp.load())
            free_ports()
            _warm(one, udp4(one, CLIENT4, VIP_REMOTE, 49000 + port % 2, 80))  # (the next hop cached)
            free_ports()
            verdict, out = one.one(D.INGRESS, udp4(one, CLIENT4, VIP_REMOTE, 49010 + port % 2, 80))
            assert verdict == TC_ACT_REDIRECT and out[UDP].sport == port, f"range {port}: {out[UDP].sport}"
            with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m, _slots(lab) as t:
                where = ("slot" if t.find(_reply_key(REM4, 8080, port, 17), ND.SNAT_SLOT_PROBES) is not None
                         else "kpr_snat" if m.lookup(_reply_key(REM4, 8080, port, 17)) is not None else None)
            assert where == ("slot" if port % 2 == 0 else "kpr_snat"), (port, where)
            if port % 2 == 0:
                before = one.stats()
                verdict, _out = one.one(D.INGRESS, udp4(one, "192.0.2.79", VIP_REMOTE, 49020, 80))
                assert verdict == TC_ACT_SHOT, "the range's one port is held: no port outside it"
                assert one.stats()["drop_snat_no_port"] == before["drop_snat_no_port"] + 1
        finally:
            dp.close()
            free_ports()


def test_only_an_even_ports_kpr_snat_insert_counts_at_the_gate(lab: Lab) -> None:
    """R3 item 6: the programs count kpr_snat inserts of even ports only (odd ones are never a
    slot's): a build whose only SNAT port is 61001 leaves the gate's count as it was, one
    whose only port is 61000 adds 1. Failed before the mend (61001's insert counted too)."""
    for port, added in ((61001, 0), (61000, 1)):
        # (without kpr_snat_slots: the default build would take 61000 in a slot, not in kpr_snat)
        dp = D.Datapath(lab.pin, mode="snat", snat_ports=(port, port), extra_cflags=["-DKPR_NP_SNAT_SLOTS=0"])
        key = _reply_key(REM4, 8080, port, 17)
        try:
            one = dataclasses.replace(lab, dp=dp.load())
            with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
                for k, _v in list(m.items()):  # the port free for this build's flow
                    if D.CT_KEY.unpack(k)[3] == M.htons(port):
                        m.delete(k)
            with M.BpfMap.open_pinned(lab.pin / ND.SNAT_GATE_MAP) as g:
                before = D.snat_gate_overflows(g)
                verdict, out = one.one(D.INGRESS, udp4(one, CLIENT4, VIP_REMOTE, 48000 + port % 2, 80))
                assert verdict == TC_ACT_REDIRECT and out[UDP].sport == port
                assert D.snat_gate_overflows(g) - before == added, f"port {port}"
        finally:
            dp.close()
            with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
                m.delete(key)


def test_a_flow_an_older_build_began_in_kpr_snat_still_gets_its_replies(slot_lab: Lab) -> None:
    """Upgrade: a reverse entry pinned in kpr_snat by an older build (the LRU layout, no slot) and
    its conntrack entry: the new build's reply path finds it after a slot miss."""
    lab = slot_lab
    port = 61234  # even: the slots' half, as an older build took any port
    client, cport = "192.0.2.77", 43000
    key = _reply_key(REM4, 8080, port, 6)
    from kpr.bpf import ctclock

    now = ctclock.now_ns()
    with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
        m.update(key, D.NAT_ENTRY.pack(M.addr_to_bytes(client), M.htons(cport), M.htons(80), 0, now,
                                       M.addr_to_bytes(VIP_REMOTE)))
    try:
        lab.run(D.INGRESS, [Case(
            "the old flow's reply: from kpr_snat",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / TCP(sport=8080, dport=port, flags="A") / Raw(b"ok"),
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=client) / TCP(sport=80, dport=cport, flags="A") / Raw(b"ok"))])
    finally:
        with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
            m.delete(key)


def test_the_collector_frees_the_slot_of_an_ended_flow_not_of_a_live_one(slot_lab: Lab) -> None:
    lab = slot_lab
    from kpr.nodeport.gc import GRACE_NS, Collector

    _warm(lab, udp4(lab, CLIENT4, VIP_REMOTE, 44000, 80))
    ports = {}
    for cport in (44001, 44002):
        verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, cport, 80))
        assert verdict == TC_ACT_REDIRECT and out[UDP].sport % 2 == 0
        ports[cport] = out[UDP].sport
    # 44001's conntrack entry expired; both slots' claims past the grace period
    ck = D.CT_KEY.pack(M.addr_to_bytes(CLIENT4), M.addr_to_bytes(VIP_REMOTE), M.htons(44001), M.htons(80), 17,
                       D.CT_DIR_ORIGINAL, 0)
    old = ND_now() - 10 * GRACE_NS
    e, = ct_entries(lab.pin, lambda k: D.CT_KEY.pack(*k) == ck)  # (its slot or kpr_ct)
    ct_write(lab.pin, e, (old, *e.val[1:]), stamp=old | 1)  # (a slot's claim as old: past the grace too)
    idx = {}
    with _slots(lab) as t:
        for cport, port in ports.items():
            idx[cport] = t.find(_reply_key(REM4, 8080, port, 17), ND.SNAT_SLOT_PROBES)
            _s, k, val = t.read(idx[cport])
            t.put(idx[cport], old | 1, k, val)
        # a slot just claimed whose conntrack entry is not written yet: young, kept
        young = t.find(_reply_key(REM4, 8080, 61998, 17), 1) or (slot_hash_of(_reply_key(REM4, 8080, 61998, 17)) & (t.slots - 1))
        t.put(young, ND_now() | 1, _reply_key(REM4, 8080, 61998, 17), D.NAT_ENTRY.pack(
            M.addr_to_bytes(CLIENT4), M.htons(44003), M.htons(80), 0, 0, M.addr_to_bytes(VIP_REMOTE)))
    maps = {n: M.BpfMap.open_pinned(lab.pin / n) for n in
            ("kpr_ct", "kpr_snat", "kpr_backend", D.REV_MAP, ND.SNAT_SLOTS_MAP, ND.SNAT_GATE_MAP)}
    c = None
    try:
        c = Collector(maps, lambda *a: None, lambda: {M.addr_to_bytes(NODE4), M.addr_to_bytes(NODE6)}, 60,
                      pin=lab.pin)  # (as the agent's: it finds kpr_np_ct_slots there)
        res = c.run()
        assert res.ct_expired >= 1
        with _slots(lab) as t:
            assert t.claim(idx[44001]) == 0, "the ended flow's slot is freed"
            assert t.claim(idx[44002]) != 0, "the live flow's slot is kept"
            assert t.find(_reply_key(REM4, 8080, ports[44002], 17), ND.SNAT_SLOT_PROBES) == idx[44002]
            assert t.claim(young) != 0, "a young slot without its conntrack entry (yet) is kept"
            t.free(young)
    finally:
        if c is not None:
            c.stop()  # (closes the slot table and gate it opened from the pin)
        for m in maps.values():
            m.close()


def _reverse_entries(lab: Lab, keys: dict[int, bytes]) -> dict[int, bool]:
    """port -> whether a reverse entry (a slot, else kpr_snat) still holds its reply key."""
    with _slots(lab) as t, M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
        return {p: t.find(k, ND.SNAT_SLOT_PROBES) is not None or m.lookup(k) is not None for p, k in keys.items()}


def test_the_collector_keeps_a_live_flows_reverse_entry_beside_another_frontends(snat_lab: Lab) -> None:
    """R3 (README issue 14, H1's SNAT slots reviewed): one client address and port to two
    frontends with the same backend are two conntrack entries, two SNAT ports, two reverse
    entries. The collector keys live ports by (flow, port): with both flows live and both reverse
    entries past the grace both are kept, and when the other frontend's entry expires only its
    reverse entry goes, at once; the live flow's replies still come back. Failed before the mend
    with the slot build (live ports one per flow: one slot freed after the grace; `gone` freed
    both) and the default one (`gone` freed the live flow's kpr_snat entry)."""
    from kpr.nodeport.gc import GRACE_NS, Collector

    lab = snat_lab
    slots = lab.dp.snat_slots()
    cport = 46101 if slots else 46001
    other_fe = "203.0.113.99"  # a frontend the collector does not know: never judged stale
    _warm(lab, udp4(lab, CLIENT4, VIP_REMOTE, cport - 1, 80))
    verdict, out = lab.one(D.INGRESS, udp4(lab, CLIENT4, VIP_REMOTE, cport, 80))
    assert verdict == TC_ACT_REDIRECT
    port = out[UDP].sport
    # even (a slot's port in the slot build), its key in no map and its home slot free: the lab's
    # earlier flows hold ports and slots of their own
    with _slots(lab) as t, M.BpfMap.open_pinned(lab.pin / "kpr_snat") as m:
        other = next(p for p in range(61000, 65536, 2) if p != port and m.lookup(_reply_key(REM4, 8080, p, 17)) is None
                     and not t.claim(slot_hash_of(_reply_key(REM4, 8080, p, 17)) & (t.slots - 1)))
    keys = {port: _reply_key(REM4, 8080, port, 17), other: _reply_key(REM4, 8080, other, 17)}
    old = ND_now() - 10 * GRACE_NS
    ck = D.CT_KEY.pack(M.addr_to_bytes(CLIENT4), M.addr_to_bytes(VIP_REMOTE), M.htons(cport), M.htons(80), 17,
                       D.CT_DIR_ORIGINAL, 0)
    ok = D.CT_KEY.pack(M.addr_to_bytes(CLIENT4), M.addr_to_bytes(other_fe), M.htons(cport), M.htons(80), 17,
                       D.CT_DIR_ORIGINAL, 0)
    rev = D.NAT_ENTRY.pack(M.addr_to_bytes(CLIENT4), M.htons(cport), M.htons(80), 0, old, M.addr_to_bytes(other_fe))
    maps = {n: M.BpfMap.open_pinned(lab.pin / n) for n in
            ("kpr_ct", "kpr_snat", "kpr_backend", D.REV_MAP, ND.SNAT_SLOTS_MAP, ND.SNAT_GATE_MAP)}
    c = None
    try:
        ct = maps["kpr_ct"]
        e, = ct_entries(lab.pin, lambda k: D.CT_KEY.pack(*k) == ck)  # (its slot or kpr_ct)
        v = list(e.val)
        v[6] = M.htons(other)
        ct.update(ok, D.CT_ENTRY.pack(*v))  # the other frontend's flow: live, its own port
        with _slots(lab) as t:
            if slots:
                i = slot_hash_of(keys[port]) & (t.slots - 1)
                _s, k, val = t.read(i)
                assert k == keys[port]
                t.put(i, old | 1, k, val)  # past the grace
                j = slot_hash_of(keys[other]) & (t.slots - 1)
                assert not t.claim(j), "the other port's slot is free"
                t.put(j, old | 1, keys[other], rev)
            else:
                r = list(D.NAT_ENTRY.unpack(maps["kpr_snat"].lookup(keys[port])))
                r[4] = old
                maps["kpr_snat"].update(keys[port], D.NAT_ENTRY.pack(*r))
                maps["kpr_snat"].update(keys[other], rev)
        c = Collector(maps, lambda *a: None, lambda: {M.addr_to_bytes(NODE4), M.addr_to_bytes(NODE6)}, 60,
                      pin=lab.pin)  # (as the agent's: it finds kpr_np_ct_slots there)
        c.run()
        assert _reverse_entries(lab, keys) == {port: True, other: True}, "both flows live: both kept"
        v[0] = old  # the other frontend's conntrack entry expires
        ct.update(ok, D.CT_ENTRY.pack(*v))
        c.run()
        assert _reverse_entries(lab, keys) == {port: True, other: False}, "only the expired flow's entry goes"
        lab.run(D.INGRESS, [Case(
            "the live flow's reply",
            Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=REM4, dst=NODE4) / UDP(sport=8080, dport=port) / Raw(b"ok"),
            TC_ACT_REDIRECT,
            routed(lab, MAC_OUT) / IP(src=VIP_REMOTE, dst=CLIENT4) / UDP(sport=80, dport=cport) / Raw(b"ok"))])
    finally:
        ct.delete(ok)
        with _slots(lab) as t:
            j = t.find(keys[other], ND.SNAT_SLOT_PROBES)
            if j is not None:
                t.free(j)
        maps["kpr_snat"].delete(keys[other])
        if c is not None:
            c.stop()  # (closes the slot table and gate it opened from the pin)
        for m in maps.values():
            m.close()
