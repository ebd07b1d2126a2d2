"""The fast exit's announced-address test on the packet's own words (lib/nodeport.h
KPR_NP_EARLY_RAW: the destination hashed from the IP header as read, IPv4 and IPv6, put on the
stack only for the exact kpr_np_vip lookup or a service's *pkt), on tc and XDP with
BPF_PROG_TEST_RUN.

Table-driven: each packet through the default build and a KPR_NP_EARLY_RAW=0 build (the
destination built on the stack first, as before), which must agree on verdict, counters and
untouched output, and each must land where it belongs: non-service packets pass untouched with
no counter, announced addresses with a port no frontend has drop, service packets and SNAT
replies take the full path, for IPv4 and IPv6, also where another address set the destination's
filter bit (the exact lookup then). A third build (KPR_NP_TEST_EARLY_FULL) returns a verdict of
its own for what the fast exit leaves to the full path, so each case also says whether the exit
decided it: a pass the full path would also give is not the exit's. The IPv6 addresses have no
zero word, so a hash of some of the words lands elsewhere."""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from kpr.testing.nodeport_bench import MAC_NODE2, NODE4, NODEPORT, VIP, ProgLab
from kpr.testing.nodeport_runs import filter_bit, filter_bit_set, run_counted
from kpr.testing.prog_run import TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS

pytestmark = pytest.mark.kernel

HOOKS = ("tc", "xdp")
PASS = {"tc": TC_ACT_UNSPEC & 0xFFFFFFFF, "xdp": XDP_PASS}
DROP = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}
# IPv6 destinations with no zero word (fd00::1, the lab node's, has two: a hash of its outer words
# alone would give its bit too)
VIP6 = "fd00:40:1:2:3:4:5:40"  # an announced IPv6 address with no frontend on the measured ports
HOST6 = "2001:db8:a1:b2:c3:d4:e5:f6"  # an IPv6 destination not announced (a node's, another host's)
VIP_OTHER = "198.51.100.7"  # an announced IPv4 address with no frontend at all
CLIENT4, CLIENT6 = "192.0.2.50", "2001:db8:c::50"
EARLY_FULL = 126  # KPR_NP_TEST_EARLY_FULL: the verdict of a packet the fast exit left to the full path


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2) as pl:
        for hook in HOOKS:
            pl.load(hook, hook)
            pl.load(hook, f"{hook}-stack", ["-DKPR_NP_EARLY_RAW=0"])
            pl.load(hook, f"{hook}-early", [f"-DKPR_NP_TEST_EARLY_FULL={EARLY_FULL}"])
        # the builds share the pinned maps: one writer is enough
        pl.builds["tc"].set_vips([VIP, VIP6, VIP_OTHER])
        yield pl


def eth(lab: ProgLab) -> Ether:
    return Ether(src="02:00:00:00:00:02", dst=lab.mac)


def tcp4(lab: ProgLab, dst: str, dport: int, sport: int, flags: str = "S") -> bytes:
    return bytes(eth(lab) / IP(src=CLIENT4, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / (b"k" * 10))


def tcp6(lab: ProgLab, dst: str, dport: int, sport: int, flags: str = "S") -> bytes:
    return bytes(eth(lab) / IPv6(src=CLIENT6, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / (b"k" * 10))


def udp4(lab: ProgLab, dst: str, dport: int, sport: int) -> bytes:
    return bytes(eth(lab) / IP(src=CLIENT4, dst=dst) / UDP(sport=sport, dport=dport) / b"kpr")


def udp6(lab: ProgLab, dst: str, dport: int, sport: int) -> bytes:
    return bytes(eth(lab) / IPv6(src=CLIENT6, dst=dst) / UDP(sport=sport, dport=dport) / b"kpr")


# (what, packet maker, the address whose filter bit another sets or None, where it belongs, what the
# fast exit does with it: "pass" it itself, leave it to the "full" path, or hand a service port's
# *pkt to the service path, "lb")
CASES = [
    ("TCP to a node address, port 22", lambda lab: tcp4(lab, NODE4, 22, 47000), None, "pass", "pass"),
    ("UDP to a node address, port 53", lambda lab: udp4(lab, NODE4, 53, 47001), None, "pass", "pass"),
    ("TCP to an address of no frontend", lambda lab: tcp4(lab, "10.0.0.77", 443, 47002), None, "pass", "pass"),
    ("IPv6 TCP to a not announced address, port 22", lambda lab: tcp6(lab, HOST6, 22, 47003), None, "pass", "pass"),
    ("IPv6 UDP to a not announced address, port 53", lambda lab: udp6(lab, HOST6, 53, 47004), None, "pass", "pass"),
    ("TCP to a node address whose filter bit another set", lambda lab: tcp4(lab, NODE4, 22, 47005), NODE4, "pass",
     "pass"),
    ("IPv6 TCP to a not announced address whose filter bit another set", lambda lab: tcp6(lab, HOST6, 22, 47006), HOST6,
     "pass", "pass"),
    ("TCP to the announced address, port 443", lambda lab: tcp4(lab, VIP, 443, 47007), None, "drop", "full"),
    ("UDP to the announced address, port 53", lambda lab: udp4(lab, VIP, 53, 47008), None, "drop", "full"),
    ("TCP to an announced address of no frontend, port 80", lambda lab: tcp4(lab, VIP_OTHER, 80, 47009), None,
     "drop", "lb"),
    ("IPv6 TCP to the announced IPv6 address, port 443", lambda lab: tcp6(lab, VIP6, 443, 47010), None, "drop", "full"),
    ("IPv6 UDP to the announced IPv6 address, port 53", lambda lab: udp6(lab, VIP6, 53, 47011), None, "drop", "full"),
    ("TCP to the frontend (new SNAT flow)", lambda lab: tcp4(lab, VIP, 80, 47012), None, "new_snat", "lb"),
    ("TCP to the NodePort (new local flow)", lambda lab: tcp4(lab, NODE4, NODEPORT, 47013), None, "new_local", "lb"),
    ("IPv6 TCP to the announced IPv6 address, port 80 (no IPv6 service)", lambda lab: tcp6(lab, VIP6, 80, 47014),
     None, "drop", "lb"),
    ("the backend's reply to a SNAT flow", None, None, "reply_snat", "full"),
]


def outcome(lab: ProgLab, hook: str, build: str, make, bit: str | None, where: str) -> tuple[int, bytes, dict[str, int], bytes]:
    lab.flush_flows()
    lab.builds[build].invalidate_next_hops()
    if where == "reply_snat":
        # the flow first (its SNAT port is drawn at random), then the reply to what left
        _v, out, moved = run_counted(lab, hook, build, tcp4(lab, VIP, 80, 47015))
        assert moved.get("new_snat") == 1, moved
        s = Ether(out)
        pkt = bytes(Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=s[IP].dst, dst=NODE4)
                    / TCP(sport=s[TCP].dport, dport=s[TCP].sport, flags="SA") / (b"k" * 10))
    else:
        pkt = make(lab)
    with filter_bit_set(lab, bit) if bit else contextlib.nullcontext():
        verdict, out, moved = run_counted(lab, hook, build, pkt)
    return verdict, out, moved, pkt


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(("what", "make", "bit", "where", "early"), CASES, ids=[c[0] for c in CASES])
def test_the_fast_exit_on_the_packets_words(lab: ProgLab, hook: str, what: str, make, bit: str | None,
                                            where: str, early: str) -> None:
    got = {}
    for build in (hook, f"{hook}-stack"):
        verdict, out, moved, pkt = outcome(lab, hook, build, make, bit, where)
        if where == "pass":
            assert (verdict, moved, out) == (PASS[hook], {}, pkt), f"{build}: {verdict} {moved}"
        elif where == "drop":
            assert (verdict, moved) == (DROP[hook], {"drop_vip_unserved": 1}), f"{build}: {verdict} {moved}"
        else:
            assert moved.get(where) == 1, f"{build}: {verdict} {moved}"
        got[build] = (verdict, moved)
    assert got[hook] == got[f"{hook}-stack"]
    # who decided: the fast exit passes a non-service packet itself (also after the exact lookup)
    build = f"{hook}-early"
    verdict, out, moved, pkt = outcome(lab, hook, build, make, bit, where)
    if early == "pass":
        assert (verdict, moved, out) == (PASS[hook], {}, pkt), f"{build}: {verdict} {moved}"
    elif early == "full":
        assert (verdict, moved) == (EARLY_FULL, {}), f"{build}: {verdict} {moved}"
    else:  # the service path's verdict and counters, as the default build's
        assert (verdict, moved) == got[hook], f"{build}: {verdict} {moved}"


def test_the_ipv6_addresses_tell_the_words_apart(lab: ProgLab) -> None:
    """The IPv6 cases can fail a hash of some of the destination's words: the addresses have no
    zero word, the announced and the not announced one have different filter bits, and a hash
    of any proper subset of the announced address's words gives a bit no announced address set
    (so its packets would pass, not drop)."""
    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    for address in (VIP6, HOST6):
        assert all(struct.unpack("=4I", M.addr_to_bytes(address))), address
    assert filter_bit(VIP6) != filter_bit(HOST6)
    announced = {filter_bit(a) for a in (VIP, VIP6, VIP_OTHER)}
    words = struct.unpack("=4I", M.addr_to_bytes(VIP6))
    for n in (1, 2, 3):
        for subset in itertools.combinations(words, n):
            x = 0
            for w in subset:
                x ^= w
            h = (x ^ (x >> 16)) & ND.VIP_HASH_MASK
            assert (ND.VIP_BITS + (h >> 6), h & 63) not in announced, subset
