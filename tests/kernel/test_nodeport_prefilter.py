"""The NodePort programs' fast exit for ports no frontend has (kpr_np_ports, lib/nodeport.h
KPR_NP_PREFILTER), on tc and XDP with BPF_PROG_TEST_RUN: what it lets go early, and what
still takes its path (frontends, replies to source-NATed flows, announced addresses)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from kpr.testing.nodeport_bench import MAC_NODE2, NODE4, NODEPORT, VIP, ProgLab
from kpr.testing.nodeport_runs import filter_bit_set, run_counted
from kpr.testing.prog_run import TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS

pytestmark = pytest.mark.kernel

PASS = {"tc": TC_ACT_UNSPEC & 0xFFFFFFFF, "xdp": XDP_PASS}
DROP = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2) as pl:
        for hook in ("tc", "xdp"):
            pl.load(hook, hook)
        yield pl


FULL = (1 << 64) - 1  # a kpr_np_unserved word with no port of its 64 served


def word(m, i: int) -> int:
    """Word i of an array map of u64 words (kpr_np_ports, kpr_np_unserved)."""
    from kpr.bpf import maps as M

    return int.from_bytes(m.lookup(M.U32.pack(i)), "little")


def run(lab: ProgLab, hook: str, pkt: bytes) -> tuple[int, bytes, dict[str, int]]:
    return run_counted(lab, hook, hook, pkt)


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_frontend_ports_pass_the_filter_and_replies_still_find_their_flow(lab: ProgLab, hook: str) -> None:
    lab.flush_flows()
    verdict, out, moved = run(lab, hook, lab.packet(VIP, 80, sport=45000, flags="S"))
    assert moved.get("new_snat") == 1, moved
    snat = Ether(out)
    assert snat[IP].src == NODE4 and snat[IP].dst.startswith("10.244.2.")
    # the backend's reply comes to a SNAT port, which no frontend has: it must not exit early
    reply = bytes(Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=snat[IP].dst, dst=NODE4)
                  / TCP(sport=snat[TCP].dport, dport=snat[TCP].sport, flags="SA") / (b"k" * 10))
    verdict, out, moved = run(lab, hook, reply)
    assert moved.get("reply_snat") == 1, moved
    assert Ether(out)[IP].src == VIP and Ether(out)[TCP].sport == 80


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_other_ports_leave_early_and_announced_addresses_still_drop(lab: ProgLab, hook: str) -> None:
    verdict, _out, moved = run(lab, hook, lab.packet(NODE4, 22, sport=45001, flags="S"))
    assert verdict == PASS[hook] and moved == {}
    verdict, _out, moved = run(lab, hook, lab.packet(VIP, 443, sport=45002, flags="S"))
    assert verdict == DROP[hook] and moved == {"drop_vip_unserved": 1}, moved


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_a_port_taken_out_of_the_bitmap_is_not_balanced(lab: ProgLab, hook: str) -> None:
    dp = lab.builds[hook]
    lab.flush_flows()  # the builds share the flow maps: no flow of the other hook's test may answer
    try:
        dp.set_frontend_ports([(NODEPORT, 6)])
        verdict, _out, moved = run(lab, hook, lab.packet(VIP, 80, sport=45003, flags="S"))
        assert verdict == DROP[hook] and moved == {"drop_vip_unserved": 1}, moved
        verdict, _out, moved = run(lab, hook, lab.packet(NODE4, NODEPORT, sport=45004, flags="S"))
        assert moved.get("new_local") == 1, moved
    finally:
        dp.set_frontend_ports([(80, 6), (NODEPORT, 6)])


@pytest.mark.parametrize("hook", ["tc", "xdp"])
@pytest.mark.parametrize("armed, balanced", [(0, True), (1, False)], ids=["not armed", "armed"])
def test_a_clear_port_bit_counts_only_once_the_bitmap_is_armed(lab: ProgLab, hook: str, armed: int,
                                                               balanced: bool) -> None:
    """Frontend port 80's bit cleared: before the agent armed the bitmap (kpr_np_unserved all
    zero, as created) the frontend is still balanced, by the early exit's test and the full
    path's; armed (the port words inverted there), its packet is taken for unserved (dropped:
    an announced address). The programs read kpr_np_unserved alone, not kpr_np_ports' port
    words and armed word (its own line): here that word says the opposite each time."""
    import struct

    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    lab.flush_flows()
    dp = lab.builds[hook]
    with M.BpfMap.open_pinned(lab.pin / ND.PORTS_MAP) as ports, \
            M.BpfMap.open_pinned(lab.pin / ND.UNSERVED_MAP) as unserved:
        try:
            dp.set_frontend_ports([(NODEPORT, 6)])  # port 80's bit clear
            if not armed:
                unserved.update_many([M.U32.pack(i) for i in range(ND.UNSERVED_WORDS)],
                                     [bytes(8)] * ND.UNSERVED_WORDS)
            ports.update(M.U32.pack(ND.PORTS_ARMED), struct.pack("=Q", 1 - armed))
            verdict, _out, moved = run(lab, hook, lab.packet(VIP, 80, sport=45007 + armed, flags="S"))
            if balanced:
                assert moved.get("new_snat") == 1, moved
            else:
                assert verdict == DROP[hook] and moved == {"drop_vip_unserved": 1}, moved
            # a port whose bit is set is served either way
            verdict, _out, moved = run(lab, hook, lab.packet(NODE4, NODEPORT, sport=45009 + armed, flags="S"))
            assert moved.get("new_local") == 1, moved
        finally:
            dp.set_frontend_ports([(80, 6), (NODEPORT, 6)])


def test_the_tables_write_the_unserved_words_once_armed(require_kernel: None) -> None:
    """kpr.nodeport.tables keeps kpr_np_unserved the inverse of kpr_np_ports' port words once
    armed, all zero before: ports added and removed before arming leave it zero, arming fills
    it, later changes follow."""
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport import datapath as ND
    from kpr.nodeport.tables import NodePortTables

    with scratch_pin_dir("kpr-unserved") as pin:
        pin.mkdir()
        t = NodePortTables(pin, 1024)
        try:
            un = t.maps[ND.UNSERVED_MAP]
            t.add_ports([(80, 6), (53, 17), (8080, 6)])
            t.remove_ports([(8080, 6)])
            assert word(un, 1) == 0 and word(un, 1024) == 0 and word(un, 8080 >> 6) == 0  # not armed: nothing leaves early
            t.set_ports([(80, 6), (53, 17)])
            assert word(un, 1) == FULL & ~(1 << 16)  # port 80: word 1, bit 16
            assert word(un, 1024) == FULL & ~(1 << 53)
            assert word(un, 5) == FULL and word(un, 2047) == FULL
            t.add_ports([(30080, 6)])
            assert word(un, 30080 >> 6) == FULL & ~(1 << (30080 & 63))
            t.remove_ports([(80, 6)])
            assert word(un, 1) == FULL
        finally:
            t.close()


def test_an_upgrade_from_pins_without_the_unserved_words_fills_them_when_armed(require_kernel: None) -> None:
    """Pins an older kpr left (kpr_np_ports armed, no kpr_np_unserved): the new map starts all
    zero, so nothing leaves early (every port reads as served) until the agent's start arms
    the tables, which writes every word."""
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport import datapath as ND
    from kpr.nodeport.tables import NodePortTables

    with scratch_pin_dir("kpr-unserved-up") as pin:
        pin.mkdir()
        old = NodePortTables(pin, 1024)
        try:
            old.set_ports([(80, 6)])
            old.arm()
        finally:
            old.close()
        (pin / ND.UNSERVED_MAP).unlink()  # as an older kpr left them
        t = NodePortTables(pin, 1024)
        try:
            un = t.maps[ND.UNSERVED_MAP]
            assert word(t.maps[ND.PORTS_MAP], ND.PORTS_ARMED) != 0
            assert word(un, 1) == 0 and word(un, 5) == 0
            t.set_ports([(80, 6)])
            t.arm()
            assert word(un, 1) == FULL & ~(1 << 16) and word(un, 5) == FULL
        finally:
            t.close()


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_an_address_whose_filter_bit_another_set_still_leaves_early(lab: ProgLab, hook: str) -> None:
    """The announced-address filter is a hash: with many announced addresses a node address's
    bit may be set by another's. The early exit then looks the address up exactly: port 22 on
    it passes untouched, the announced address with an unserved port still drops."""
    with filter_bit_set(lab, NODE4):
        verdict, _out, moved = run(lab, hook, lab.packet(NODE4, 22, sport=45005, flags="S"))
        assert verdict == PASS[hook] and moved == {}
        verdict, _out, moved = run(lab, hook, lab.packet(VIP, 443, sport=45006, flags="S"))
        assert verdict == DROP[hook] and moved == {"drop_vip_unserved": 1}, moved


def _odd_packets(lab: ProgLab) -> list[tuple[str, bytes]]:
    """Packets the raw-header exit (KPR_NP_EARLY_EXIT) must leave to the full path, each to the
    announced address on a port no frontend has (or a node address), as the full parse sees them."""
    from scapy.layers.inet import ICMP, UDP, IPOption
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
    from scapy.layers.l2 import Dot1Q

    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)
    client = "192.0.2.50"
    # a non-first fragment: its first bytes are payload, here looking like ports 22 -> 22
    frag_payload = b"\x00\x16\x00\x16" + b"k" * 20
    return [
        ("non-first fragment to the announced address", bytes(eth / IP(src=client, dst=VIP, proto=6, frag=100) / frag_payload)),
        ("non-first fragment to a node address", bytes(eth / IP(src=client, dst=NODE4, proto=6, frag=100) / frag_payload)),
        ("first fragment (MF) to the announced address, unserved port",
         bytes(eth / IP(src=client, dst=VIP, flags="MF") / TCP(sport=45100, dport=443, flags="A") / (b"k" * 8))),
        ("IPv4 options to the announced address, unserved port",
         bytes(eth / IP(src=client, dst=VIP, options=[IPOption(b"\x94\x04\x00\x00")]) / TCP(sport=45101, dport=443, flags="A"))),
        ("IPv4 options to the frontend", bytes(eth / IP(src=client, dst=VIP, options=[IPOption(b"\x94\x04\x00\x00")])
                                          / TCP(sport=45102, dport=80, flags="S"))),
        ("VLAN tag to the announced address, unserved port",
         bytes(eth / Dot1Q(vlan=7) / IP(src=client, dst=VIP) / TCP(sport=45103, dport=443, flags="A"))),
        ("ICMP echo to the announced address", bytes(eth / IP(src=client, dst=VIP) / ICMP())),
        ("UDP with checksum 0 to the announced address, unserved port",
         bytes(eth / IP(src=client, dst=VIP) / UDP(sport=45104, dport=443, chksum=0) / b"kpr")),
        ("UDP with checksum 0 to a node address, unserved port",
         bytes(eth / IP(src=client, dst=NODE4) / UDP(sport=45105, dport=53, chksum=0) / b"kpr")),
        ("TCP header cut after the ports, to the announced address",
         bytes(eth / IP(src=client, dst=VIP, proto=6) / b"\xb0\x00\x01\xbb")),
        # (the full parse counts these malformed: the raw-header exit passed them uncounted)
        ("TCP header cut after the ports, to a node address's unserved port",
         bytes(eth / IP(src=client, dst=NODE4, proto=6) / b"\xb0\x0a\x00\x16\x00\x00")),
        ("UDP header cut after the ports, to a node address's unserved port",
         bytes(eth / IP(src=client, dst=NODE4, proto=17) / b"\xb0\x0b\x00\x35")),
        ("TCP to the wildcard NodePort on a node address", lab.packet(NODE4, NODEPORT, sport=45106, flags="S")),
        ("IPv6 with a destination-options header, unserved port",
         bytes(eth / IPv6(src="2001:db8:c::50", dst="fd00::1") / IPv6ExtHdrDestOpt() / TCP(sport=45107, dport=22))),
        ("IPv6 to an unserved port", bytes(eth / IPv6(src="2001:db8:c::50", dst="fd00::1") / TCP(sport=45108, dport=22))),
    ]


@pytest.fixture(scope="module")
def full_parse_builds(lab: ProgLab) -> dict[str, str]:
    """Per hook, the name of a build without the raw-header exit (the full parse decides)."""
    for hook in ("tc", "xdp"):
        lab.load(hook, f"{hook}-full", ["-DKPR_NP_EARLY_EXIT=0"])
    return {"tc": "tc-full", "xdp": "xdp-full"}


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_the_raw_header_exit_decides_as_the_full_parse(lab: ProgLab, hook: str, full_parse_builds: dict[str, str]) -> None:
    """Fragments, IPv4 options, VLAN tags, ICMP, zero UDP checksums, cut headers, IPv6
    extension headers: the build with the raw-header exit gives each the verdict, output and
    counters the build without it gives."""
    def once(name: str, pkt: bytes) -> tuple[int, bytes, dict[str, int]]:
        lab.flush_flows()
        # And no next hop cached: a new flow picks one of the frontend's 100 backends at
        # random, and one whose next hop an earlier run cached (this packet through the other
        # build, or an earlier test: the builds share kpr_np_nh) skips the FIB lookup and
        # counts fwd_nh_cached where the other build's run did not (1 in 100 or so; seen in CI).
        lab.builds[name].invalidate_next_hops()
        return run_counted(lab, hook, name, pkt)

    differ = []
    for what, pkt in _odd_packets(lab):
        early, full = once(hook, pkt), once(full_parse_builds[hook], pkt)
        # a new flow's SNAT port is drawn at random: only untouched output is compared byte for byte
        if early[0] != full[0] or early[2] != full[2] or (early[1] != full[1] and early[0] == PASS[hook]):
            differ.append(f"{what}: early {early[0]} {early[2]}, full {full[0]} {full[2]}")
    assert not differ, "\n".join(differ)
