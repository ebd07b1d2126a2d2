"""The NodePort entry's raw-header read handing a service's packet straight to the service path
(lib/nodeport.h KPR_NP_EARLY_PARSE: no second parse, no second bitmap test), on tc and XDP
with BPF_PROG_TEST_RUN: for every kind of packet that takes that route, the verdict, the
output bytes, the counters and the flow entries written are the ones of a build where the full
parse decides."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether

from kpr.testing.nodeport_bench import NODE4, NODEPORT, VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted

pytestmark = pytest.mark.kernel

HOOKS = ("tc", "xdp")


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2) as pl:
        for hook in HOOKS:
            pl.load(hook, hook)
            pl.load(hook, f"{hook}-full", ["-DKPR_NP_EARLY_PARSE=0"])
        for hook in HOOKS:
            # UDP port 80 too: a UDP packet to it takes the raw-header route (and finds no service)
            pl.builds[hook].set_frontend_ports([(80, 6), (80, 17), (NODEPORT, 6)])
        yield pl


def once(lab: ProgLab, hook: str, build: str, pkt: bytes) -> tuple[int, bytes, dict[str, int]]:
    return run_counted(lab, hook, build, pkt)


def _service_packets(lab: ProgLab) -> list[tuple[str, bytes, bytes | None]]:
    """(what, packet, the packet that starts its flow first or None)."""
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)
    client = "192.0.2.50"

    def tcp(dst: str, dport: int, sport: int, flags: str, payload: bytes = b"k" * 10) -> bytes:
        return bytes(eth / IP(src=client, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload)

    return [
        ("new flow to the NodePort (local backend)", tcp(NODE4, NODEPORT, 46000, "S"), None),
        ("established flow to the NodePort", tcp(NODE4, NODEPORT, 46001, "A"), tcp(NODE4, NODEPORT, 46001, "S")),
        ("established SNAT flow", tcp(VIP, 80, 46002, "A"), tcp(VIP, 80, 46002, "S")),
        ("established SNAT flow, FIN", tcp(VIP, 80, 46003, "FA"), tcp(VIP, 80, 46003, "S")),
        ("established SNAT flow, a longer segment", tcp(VIP, 80, 46004, "PA", b"x" * 900), tcp(VIP, 80, 46004, "S")),
        ("SYN on the tuple of a closed flow", tcp(VIP, 80, 46005, "S"), tcp(VIP, 80, 46005, "R")),
        ("UDP to a served port of the announced address, no UDP service",
         bytes(eth / IP(src=client, dst=VIP) / UDP(sport=46006, dport=80) / b"kpr"), None),
        ("UDP with checksum 0 to a served port", bytes(eth / IP(src=client, dst=VIP) / UDP(sport=46007, dport=80, chksum=0)
                                                  / b"kpr"), None),
        ("IPv6 TCP to a served port, no such service",
         bytes(eth / IPv6(src="2001:db8:c::50", dst="fd00::1") / TCP(sport=46008, dport=80, flags="S")), None),
        ("TCP to a node address's served port, no service there", tcp(NODE4, 80, 46009, "S"), None),
    ]


FLOW_MAPS = ("kpr_snat", "kpr_np_rev")  # and the conntrack entries, wherever the build put them ("ct")


def flows(lab: ProgLab) -> dict[str, list]:
    """The flow maps' entries (a begun flow: its backend and SNAT port were drawn at random):
    "ct", NodePort's conntrack (kpr.testing.np_conntrack: its slots or kpr_ct), then FLOW_MAPS."""
    from kpr.bpf import maps as M
    from kpr.testing.np_conntrack import ct_entries

    out: dict[str, list] = {"ct": ct_entries(lab.pin)}
    for name in FLOW_MAPS:
        with M.BpfMap.open_pinned(lab.pin / name) as m:
            out[name] = m.items()
    return out


# Each flow entry without its clock field (kpr_ct_entry.last_seen, kpr_np_rev.last_seen,
# kpr_nat_entry.created): what a packet wrote there, whenever it ran.
UNTIMED = {"kpr_np_rev": lambda v: v[:24], "kpr_snat": lambda v: v[:24] + v[32:]}


def state(lab: ProgLab) -> dict[str, set]:
    got = flows(lab)
    out: dict[str, set] = {"ct": {(e.where, e.key, e.val[1:]) for e in got.pop("ct")}}
    out.update({name: {(k, UNTIMED[name](v)) for k, v in items} for name, items in got.items()})
    return out


def restore(lab: ProgLab, saved: dict[str, list]) -> None:
    from kpr.bpf import maps as M
    from kpr.testing.np_conntrack import ct_write

    lab.flush_flows()
    for e in saved["ct"]:
        ct_write(lab.pin, e, e.val)
    for name in FLOW_MAPS:
        with M.BpfMap.open_pinned(lab.pin / name) as m:
            for k, v in saved[name]:
                m.update(k, v)


def _edge_packets(lab: ProgLab, hook: str) -> list[tuple[str, bytes, bytes | None]]:
    """Frames to a served port that the raw-header route must leave to the full parse (or, where
    it takes them, treat as the full parse does): each differs from a plain one in one header."""
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)
    client = "192.0.2.60"
    # to the NodePort of one local backend: a new flow there is the same in both builds (a
    # LoadBalancer frontend's new flow draws its backend and SNAT port at random)
    syn = TCP(sport=46200, dport=NODEPORT, flags="S")
    ip = IP(src=client, dst=NODE4)
    ip6 = IPv6(src="2001:db8:c::60", dst="fd00::1")
    plain = bytes(eth / ip / TCP(sport=46201, dport=NODEPORT, flags="A") / b"k")
    first_snat = bytes(eth / IP(src=client, dst=VIP) / TCP(sport=46210, dport=80, flags="S"))
    cut = [] if hook == "tc" else [  # tc: BPF_PROG_TEST_RUN refuses an skb without a whole IPv4 header
        ("IPv4 header cut short", plain[:14 + 16], None),
        ("Ethernet header only", plain[:14], None),
    ]
    return cut + [
        # the version nibble is the full parse's first test: a frame typed IPv6 that is not version 6
        ("IPv6 ethertype, version 4 in the header", bytes(eth / IPv6(version=4, src="2001:db8:c::60", dst="fd00::1")
                                                         / TCP(sport=46202, dport=80, flags="S")), None),
        ("IPv6 ethertype, version 0 in the header", bytes(eth / IPv6(version=0, src="2001:db8:c::60", dst="fd00::1")
                                                         / UDP(sport=46203, dport=80) / b"k"), None),
        ("IPv4 with options (IHL 6)", bytes(eth / IP(src=client, dst=NODE4, options=[IPOption_NOP()] * 4)
                                          / TCP(sport=46204, dport=NODEPORT, flags="S")), None),
        ("IPv4 first fragment (MF)", bytes(eth / IP(src=client, dst=NODE4, flags="MF") / syn / (b"k" * 16)), None),
        ("IPv4 later fragment", bytes(eth / IP(src=client, dst=NODE4, frag=2, proto=6) / bytes(syn)), None),
        ("IPv6 with a hop-by-hop header", bytes(eth / ip6 / IPv6ExtHdrHopByHop() / syn), None),
        ("IPv6 first fragment", bytes(eth / ip6 / IPv6ExtHdrFragment(m=1) / syn / (b"k" * 16)), None),
        ("802.1Q tag", bytes(eth / Dot1Q(vlan=7) / ip / syn), None),
        ("TCP header cut short", plain[:14 + 20 + 12], None),
        ("TCP data offset 2", bytes(eth / ip / TCP(sport=46205, dport=NODEPORT, flags="S", dataofs=2)), None),
        ("UDP length longer than the frame", bytes(eth / ip / UDP(sport=46206, dport=80, len=400) / b"k"), None),
        ("UDP length shorter than its header", bytes(eth / ip / UDP(sport=46207, dport=80, len=3) / b"kpr"), None),
        ("ICMP echo to the announced address", bytes(eth / IP(src=client, dst=VIP) / ICMP(id=46208)), None),
        # a reply to a source-NATed flow: the flow begun first by the SYN the route took
        ("reply to a source-NATed flow (port in the SNAT range)", b"snat-reply", first_snat),
        ("a port in the SNAT range, no flow", bytes(eth / IP(src="10.244.2.7", dst=NODE4)
                                                  / TCP(sport=8080, dport=61001, flags="SA")), None),
        ("a frontend's address, a port no frontend has",
         bytes(eth / IP(src=client, dst=VIP) / TCP(sport=46209, dport=81, flags="S")), None),
    ]


def _snat_reply(lab: ProgLab, first_out: bytes) -> bytes:
    """The backend's answer to the packet the node sent out (source-NATed: node -> backend)."""
    out = Ether(first_out)
    return bytes(Ether(src="02:00:00:00:00:03", dst=lab.mac) / IP(src=out[IP].dst, dst=out[IP].src)
                 / TCP(sport=out[TCP].dport, dport=out[TCP].sport, flags="A"))


def differences(lab: ProgLab, hook: str, cases: list[tuple[str, bytes, bytes | None]]) -> list[str]:
    """The cases where the build with the raw-header route and the one where the full parse
    decides differ in verdict, output bytes, counters or flow entries, from the same flows."""
    differ = []
    for what, pkt, first in cases:
        lab.flush_flows()
        if first is not None:
            _v, first_out, _m = once(lab, hook, hook, first)
            if pkt == b"snat-reply":
                pkt = _snat_reply(lab, first_out)
        saved = flows(lab)
        early = once(lab, hook, hook, pkt) + (state(lab),)
        restore(lab, saved)  # the same flow state for the other build
        full = once(lab, hook, f"{hook}-full", pkt) + (state(lab),)
        if early != full:
            differ.append(f"{what}: early {early[0]} {early[2]}, full {full[0]} {full[2]}")
    return differ


@pytest.mark.parametrize("hook", HOOKS)
def test_the_raw_header_route_to_the_service_path_matches_the_full_parse(lab: ProgLab, hook: str) -> None:
    differ = differences(lab, hook, _service_packets(lab))
    assert not differ, "\n".join(differ)


@pytest.mark.parametrize("hook", HOOKS)
def test_frames_unlike_a_plain_one_are_treated_as_the_full_parse_treats_them(lab: ProgLab, hook: str) -> None:
    differ = differences(lab, hook, _edge_packets(lab, hook))
    assert not differ, "\n".join(differ)


@pytest.mark.parametrize("hook", HOOKS)
def test_an_established_snat_packet_from_the_raw_header_route_is_rewritten_right(lab: ProgLab, hook: str) -> None:
    """Checksums and addresses of the rewritten packet as scapy computes them: the offsets
    the raw-header route hands over (L3, L4, checksum field) are the ones rewritten."""
    lab.flush_flows()
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)
    syn = bytes(eth / IP(src="192.0.2.50", dst=VIP) / TCP(sport=46100, dport=80, flags="S") / (b"k" * 10))
    ack = bytes(eth / IP(src="192.0.2.50", dst=VIP) / TCP(sport=46100, dport=80, flags="A") / (b"k" * 10))
    _v, first, moved = once(lab, hook, hook, syn)
    assert moved.get("new_snat") == 1, moved
    _v, out, moved = once(lab, hook, hook, ack)
    assert moved.get("established") == 1, moved
    p, f = Ether(out), Ether(first)
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (f[IP].src, f[IP].dst, f[TCP].sport, f[TCP].dport)
    assert p[IP].src == NODE4 and p[IP].dst.startswith("10.244.2.")
    ip_sum, tcp_sum = p[IP].chksum, p[TCP].chksum
    del p[IP].chksum
    del p[TCP].chksum
    q = Ether(bytes(p))
    assert (ip_sum, tcp_sum) == (q[IP].chksum, q[TCP].chksum)


def test_a_gso_packet_too_long_for_the_route_keeps_the_cached_next_hop_a_single_one_does_not(lab: ProgLab) -> None:
    """tc's ctx_gso_size (skb->gso_size, read only for a packet longer than the cached route's
    MTU): a GSO packet's segments are the kernel's to fit, so it keeps the cached next hop; a
    single packet that long takes the FIB lookup, which hands it to the kernel (the ICMP error
    path MTU discovery needs)."""
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)
    ip = IP(src="192.0.2.70", dst=VIP)
    got = {}
    for gso in (0, 1448):
        lab.flush_flows()
        once(lab, "tc", "tc", bytes(eth / ip / TCP(sport=47000, dport=80, flags="S")))
        _v, _out, moved = once(lab, "tc", "tc", bytes(eth / ip / TCP(sport=47000, dport=80, flags="A") / b"k"))
        assert moved.get("fwd_nh_cached") == 1, moved  # the flow's next hop is cached
        big = bytes(eth / ip / TCP(sport=47000, dport=80, flags="A") / (b"k" * 2000))
        verdict, _out, moved = run_counted(lab, "tc", "tc", big, gso_size=gso)
        got[gso] = (verdict, moved.get("fwd_nh_cached", 0), moved.get("fib_to_kernel", 0))
    assert got == {0: (0, 0, 1), 1448: (7, 1, 0)}, got  # TC_ACT_OK to the kernel; TC_ACT_REDIRECT


def test_a_dsr_frontend_from_the_raw_header_route_matches_the_full_parse(lab: ProgLab) -> None:
    """tc (XDP has no DSR): a client's packets to a frontend in DSR mode take the raw-header
    route (no DSR header: the full parse's DSR test lets them through) and leave with the
    header the service path adds, as from the full parse."""
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)

    def tcp(sport: int, flags: str) -> bytes:
        return bytes(eth / IP(src="192.0.2.80", dst=VIP) / TCP(sport=sport, dport=80, flags=flags) / b"k")

    lab.builds["tc"].set_modes({(VIP, 80, 6): "dsr"})  # kpr_np_fe: shared by every build in the lab
    try:
        _v, out, moved = once(lab, "tc", "tc", tcp(46300, "S"))
        assert moved.get("new_dsr") == 1 and Ether(out)[IP].ihl > 5, moved  # DSR taken, its header added
        # (a new flow's backend is drawn at random: compared from the same flow entry)
        differ = differences(lab, "tc", [("established DSR flow", tcp(46302, "A"), tcp(46302, "S")),
                                         ("established DSR flow, FIN", tcp(46303, "FA"), tcp(46303, "S"))])
    finally:
        lab.builds["tc"].set_modes({})
    assert not differ, "\n".join(differ)


@pytest.mark.parametrize("hook", HOOKS)
def test_source_ranges_and_local_policy_from_the_raw_header_route_match_the_full_parse(lab: ProgLab,
                                                                                       hook: str) -> None:
    """loadBalancerSourceRanges and externalTrafficPolicy=Local are the service path's tests: the
    route hands them the same client and frontend as the full parse (allowed and refused
    clients, a Local frontend with and without a backend on this node)."""
    from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
    from kpr.testing.nodeport_bench import POD4

    ranged, local, local_none = "203.0.113.50", "203.0.113.51", "203.0.113.52"
    pod = Backend(POD4, 8080, node_name="lb", local=True)
    remote = Backend("10.244.2.9", 8080, node_name="node2")
    extra = [
        Service(ServiceKey("r2", "ranged"), (Frontend(FrontendType.LOAD_BALANCER, ranged, 80, Protocol.TCP, (pod,),
                                                      source_ranges=("198.51.100.0/24",)),)),
        Service(ServiceKey("r2", "local"), (Frontend(FrontendType.LOAD_BALANCER, local, 80, Protocol.TCP,
                                                     (pod, remote), external_local=True),)),
        Service(ServiceKey("r2", "local-none"), (Frontend(FrontendType.LOAD_BALANCER, local_none, 80, Protocol.TCP,
                                                          (remote,), external_local=True),)),
    ]
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)

    def tcp(src: str, dst: str, sport: int, flags: str) -> bytes:
        return bytes(eth / IP(src=src, dst=dst) / TCP(sport=sport, dport=80, flags=flags) / b"k")

    cases = [
        ("a client inside the source ranges", tcp("198.51.100.9", ranged, 46400, "S"), None),
        ("established, inside the source ranges", tcp("198.51.100.9", ranged, 46401, "A"),
         tcp("198.51.100.9", ranged, 46401, "S")),
        ("a client outside the source ranges", tcp("192.0.2.90", ranged, 46402, "S"), None),
        ("Local policy, a backend on this node", tcp("192.0.2.90", local, 46403, "S"), None),
        ("Local policy, none on this node", tcp("192.0.2.90", local_none, 46404, "S"), None),
    ]
    lab.writer.full_sync(lab._services() + extra)
    try:
        _v, _out, moved = once(lab, hook, hook, cases[2][1])
        assert moved.get("drop_source_range") == 1, moved  # the services are there and enforced
        differ = differences(lab, hook, cases)
    finally:
        lab.writer.full_sync(lab._services())
    assert not differ, "\n".join(differ)
