"""The ARP/NDP answering program (core/bpf/lib/arp.h) on packets, through BPF_PROG_TEST_RUN:
one table of (description, packet, verdict, output) cases run through both builds, tc and
XDP, with the maps filled by the plugin's own BpfAnswerer. Expected replies come from the
Python responder's builder (build_reply) where it has one, so the two answer alike, and
every output's checksums are verified from its bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from kpr.plugins.announce_arp.bpfanswer import COUNTERS, U64, BpfAnswerer
from kpr.plugins.announce_arp.responder import Request, build_reply
from kpr.bpf import maps as M
from kpr.testing.netns import Topology, in_netns
from kpr.testing.prog_run import TC_ACT_REDIRECT, TC_ACT_UNSPEC, XDP_PASS, XDP_TX, Case, run_cases, test_run

pytestmark = pytest.mark.kernel

VIP4, VIP6 = "10.0.100.10", "fd00:100::10"
OTHER4, OTHER6 = "10.0.100.99", "fd00:100::99"
ASKER4, ASKER6 = "10.0.0.254", "fd00::fe"
ASKER_MAC = "02:00:00:00:00:fe"
INTRUDER_MAC = "02:00:00:00:00:66"
BCAST = "ff:ff:ff:ff:ff:ff"


def solicited_node(addr: str) -> tuple[str, str]:
    """The solicited-node multicast address of `addr` and its MAC."""
    import ipaddress

    low = ipaddress.IPv6Address(addr).packed[-3:]
    ip = str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))
    return ip, "33:33:ff:" + ":".join(f"{b:02x}" for b in low)


def arp_request(target: str, *, sender: str = ASKER4, mac: str = ASKER_MAC, op: int = 1) -> Ether:
    return Ether(dst=BCAST, src=mac) / ARP(op=op, hwsrc=mac, psrc=sender, hwdst="00:00:00:00:00:00", pdst=target)


def ns(target: str, *, src: str = ASKER6, mac: str = ASKER_MAC, hlim: int = 255, sllao: bool = True) -> Ether:
    dst, dst_mac = solicited_node(target)
    pkt = Ether(dst=dst_mac, src=mac) / IPv6(src=src, dst=dst, hlim=hlim) / ICMPv6ND_NS(tgt=target)
    return pkt / ICMPv6NDOptSrcLLAddr(lladdr=mac) if sllao else pkt


@dataclass
class Lab:
    topo: Topology
    answerer: dict[str, BpfAnswerer]  # hook -> loaded program and its maps
    ifindex: dict[str, int]
    mac: str  # eth0's

    def ctx(self, hook: str, ifname: str, data: bytes) -> bytes:
        idx = self.ifindex[ifname]
        if hook == "xdp":
            # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index
            return struct.pack("=6I", 0, len(data), 0, idx, 0, 0)
        # struct __sk_buff up to ifindex (ingress_ifindex, ifindex)
        return struct.pack("=11I", 0, 0, 0, 0, 0, 0, 0, 0, 0, idx, idx)

    def run(self, hook: str, cases: list[Case]) -> None:
        for c in cases:
            c.ctx = self.ctx(hook, c.extra.get("ifname", "eth0"), bytes(c.packet))
        with in_netns(self.topo["n"].path):
            run_cases(self.answerer[hook].fd, cases, kind=hook)

    def counters(self, hook: str) -> dict[str, int]:
        return self.answerer[hook].counters().get("eth0", {})


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[Lab]:
    with Topology() as topo:
        topo.add_node("n")
        topo.add_namespace("peer")
        topo.link("n", "peer", None, None, ifname_a="eth0", ifname_b="eth0")
        topo.link("n", "peer", None, None, ifname_a="eth1", ifname_b="eth1")
        ans = {}
        try:
            with in_netns(topo["n"].path):
                for hook in ("tc", "xdp"):
                    # eth1 exists and is not configured: nothing is answered there
                    a = BpfAnswerer(["eth0"], f"/nonexistent-h7-{os.getpid()}", hold=3600, hook=hook)
                    assert a.load(), a.load_error
                    a.bind("eth0")
                    a.set_owned({VIP4, VIP6})
                    ans[hook] = a
            yield Lab(topo, ans, {i: topo.ifindex("n", i) for i in ("eth0", "eth1")}, topo.mac("n", "eth0"))
        finally:
            for a in ans.values():
                a._stop.set()


def cases(lab: Lab, hook: str) -> list[Case]:
    reply, passed = (TC_ACT_REDIRECT, TC_ACT_UNSPEC) if hook == "tc" else (XDP_TX, XDP_PASS)
    mac = lab.mac
    dst6, _ = solicited_node(VIP6)

    def arp_reply_to(asker_ip: str, asker_mac: str) -> bytes:
        return build_reply(Request("arp", VIP4, asker_mac, asker_ip), mac)

    def na_to(src: str) -> bytes:
        return build_reply(Request("ns", VIP6, ASKER_MAC, src), mac)

    def padded_reply(p: Ether) -> None:
        assert len(p) == 60, len(p)
        assert p.dst == ASKER_MAC and p.src == mac
        a = p[ARP]
        assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, mac, VIP4, ASKER_MAC, ASKER4), a.summary()

    def dad_reply(p: Ether) -> None:
        assert p.dst == "33:33:00:00:00:01" and p[IPv6].dst == "ff02::1" and p[IPv6].src == VIP6
        na = p[ICMPv6ND_NA]
        assert (na.S, na.O, na.R, na.tgt) == (0, 1, 0, VIP6)
        assert p[ICMPv6NDOptDstLLAddr].lladdr == mac

    def unchanged(pkt: Ether) -> bytes:
        return bytes(pkt)

    req = arp_request(VIP4)
    probe = arp_request(VIP4, sender="0.0.0.0")
    garp = arp_request(VIP4, sender=VIP4, mac=INTRUDER_MAC)
    tcp = Ether(dst=mac, src=ASKER_MAC) / IP(src=ASKER4, dst=VIP4) / TCP(dport=80, flags="S")
    echo6 = Ether(dst=mac, src=ASKER_MAC) / IPv6(src=ASKER6, dst=VIP6) / ICMPv6EchoRequest()
    dad = ns(VIP6, src="::", sllao=False)
    return [
        Case("ARP request for an owned address: reply with the interface MAC", req, reply, arp_reply_to(ASKER4, ASKER_MAC)),
        Case("ARP request padded to 60 bytes (a real NIC's minimum): reply, same length",
             Ether(bytes(req) + b"\0" * 18), reply, padded_reply),
        Case("ARP probe (sender 0.0.0.0, RFC 5227): reply to 0.0.0.0 at the prober's MAC", probe, reply,
             arp_reply_to("0.0.0.0", ASKER_MAC)),
        Case("gratuitous ARP for an owned address from another node: to the kernel, untouched", garp, passed, unchanged(garp)),
        Case("gratuitous ARP reply: to the kernel", arp_request(VIP4, sender=VIP4, op=2), passed),
        Case("ARP request for an address not owned: to the kernel", arp_request(OTHER4), passed, unchanged(arp_request(OTHER4))),
        Case("ARP request on an interface not configured: to the kernel", req, passed, unchanged(req), extra={"ifname": "eth1"}),
        Case("ARP reply (not a request): to the kernel", arp_request(VIP4, op=2), passed),
        Case("ARP request from our own MAC: never answered", arp_request(VIP4, mac=mac), passed),
        Case("NS with source link-layer option: solicited NA, override, target option", ns(VIP6), reply, na_to(ASKER6)),
        Case("NS without options (78 bytes): the NA grows to 86", ns(VIP6, sllao=False), reply, na_to(ASKER6)),
        Case("DAD NS from :: : NA to all-nodes, not solicited", dad, reply, dad_reply),
        Case("DAD NS answered like the Python responder", dad, reply, build_reply(Request("ns", VIP6, ASKER_MAC, "::"), mac)),
        Case("NS for an address not owned: to the kernel", ns(OTHER6), passed, unchanged(ns(OTHER6))),
        Case("NS that crossed a router (hop limit 64): to the kernel", ns(VIP6, hlim=64), passed),
        Case("NS on an interface not configured: to the kernel", ns(VIP6), passed, extra={"ifname": "eth1"}),
        Case("NS whose source is its target (a node announcing itself): to the kernel",
             ns(VIP6, src=VIP6, mac=INTRUDER_MAC), passed),
        Case("TCP to the VIP: to the kernel, untouched", tcp, passed, unchanged(tcp)),
        Case("ICMPv6 echo to the VIP: to the kernel, untouched", echo6, passed, unchanged(echo6)),
        Case("a truncated frame: to the kernel", Ether(bytes(req)[:30]), passed, check_checksums=False),
    ]


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_answers_table(lab: Lab, hook: str) -> None:
    before = lab.counters(hook)
    table = cases(lab, hook)
    lab.run(hook, table)
    after = lab.counters(hook)
    diff = {k: after[k] - before.get(k, 0) for k in COUNTERS}
    # eth0's counters only: the eth1 cases count nowhere
    assert diff == {
        "arp_replies": 3,
        "na_replies": 4,
        "requests_not_owned": 2,
        "conflicts": 3,  # gratuitous request and reply, and the NS whose source is its target
        "agent_silent": 0,
        "invalid": 1,
        "reply_errors": 0,
    }, diff


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_dropped_addresses_and_a_silent_agent_are_not_answered(lab: Lab, hook: str) -> None:
    a = lab.answerer[hook]
    passed = TC_ACT_UNSPEC if hook == "tc" else XDP_PASS
    try:
        a.set_owned({VIP6})
        lab.run(hook, [Case("ARP for an address just dropped: to the kernel", arp_request(VIP4), passed)])
        a.set_owned({VIP4, VIP6})
        before = lab.counters(hook)["agent_silent"]
        # the agent stops vouching (killed): its link stays, its answers stop
        a._alive_map.update(M.U32.pack(0), U64.pack(0))
        lab.run(hook, [Case("ARP while the agent is silent: to the kernel", arp_request(VIP4), passed),
                       Case("NS while the agent is silent: to the kernel", ns(VIP6), passed)])
        assert lab.counters(hook)["agent_silent"] == before + 2
    finally:
        a.set_owned({VIP4, VIP6})
        a._vouch()
    with in_netns(lab.topo["n"].path):
        res = test_run(a.fd, bytes(arp_request(VIP4)), ctx=lab.ctx(hook, "eth0", bytes(arp_request(VIP4))))
    assert res.signed == (TC_ACT_REDIRECT if hook == "tc" else XDP_TX)
