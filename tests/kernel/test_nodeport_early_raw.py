"""The fast exit's announced-address test on the packet's own words (lib/nodeport.h
KPR_NP_EARLY_RAW: the destination hashed from the IP header as read, put on the stack only for
the exact kpr_np_vip lookup or a service's *pkt), on tc and XDP with BPF_PROG_TEST_RUN.

Table-driven: each packet through the default build and a KPR_NP_EARLY_RAW=0 build (the
destination built on the stack first, as before), which must agree on verdict, counters and
untouched output, and each must land where it belongs: non-service packets pass untouched with
no counter, announced addresses with a port no frontend has drop, service packets and SNAT
replies take the full path, for IPv4 and IPv6, also where another address set the destination's
filter bit (the exact lookup then)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from kpr.testing.nodeport_bench import MAC_NODE2, NODE4, NODE6, NODEPORT, VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted
from kpr.testing.prog_run import TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS

pytestmark = pytest.mark.kernel

HOOKS = ("tc", "xdp")
PASS = {"tc": TC_ACT_UNSPEC & 0xFFFFFFFF, "xdp": XDP_PASS}
DROP = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}
VIP6 = "fd00:40::40"  # an announced IPv6 address with no frontend on the measured ports
VIP_OTHER = "198.51.100.7"  # an announced IPv4 address with no frontend at all
CLIENT4, CLIENT6 = "192.0.2.50", "2001:db8:c::50"


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2) as pl:
        for hook in HOOKS:
            pl.load(hook, hook)
            pl.load(hook, f"{hook}-stack", ["-DKPR_NP_EARLY_RAW=0"])
        # the builds share the pinned maps: one writer is enough
        pl.builds["tc"].set_vips([VIP, VIP6, VIP_OTHER])
        yield pl


@contextlib.contextmanager
def filter_bit_set(lab: ProgLab, address: str) -> Iterator[None]:
    """`address`'s announced-address filter bit set, as another announced address of the same
    hash sets it: the fast exit must then look the address up exactly."""
    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    h = ND.vip_hash(M.addr_to_bytes(address))
    key = M.U32.pack(ND.VIP_BITS + (h >> 6))
    with M.BpfMap.open_pinned(lab.pin / ND.PORTS_MAP) as ports:
        old = ports.lookup(key)
        assert not struct.unpack("=Q", old)[0] >> (h & 63) & 1, f"{address}'s bit is set already: pick another"
        ports.update(key, struct.pack("=Q", struct.unpack("=Q", old)[0] | 1 << (h & 63)))
        try:
            yield
        finally:
            ports.update(key, old)


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


# (what, packet maker, the address whose filter bit another sets or None, where it belongs)
CASES = [
    ("TCP to a node address, port 22", lambda lab: tcp4(lab, NODE4, 22, 47000), None, "pass"),
    ("UDP to a node address, port 53", lambda lab: udp4(lab, NODE4, 53, 47001), None, "pass"),
    ("TCP to an address of no frontend", lambda lab: tcp4(lab, "10.0.0.77", 443, 47002), None, "pass"),
    ("IPv6 TCP to a node address, port 22", lambda lab: tcp6(lab, NODE6, 22, 47003), None, "pass"),
    ("IPv6 UDP to a node address, port 53", lambda lab: udp6(lab, NODE6, 53, 47004), None, "pass"),
    ("TCP to a node address whose filter bit another set", lambda lab: tcp4(lab, NODE4, 22, 47005), NODE4, "pass"),
    ("IPv6 TCP to a node address whose filter bit another set", lambda lab: tcp6(lab, NODE6, 22, 47006), NODE6,
     "pass"),
    ("TCP to the announced address, port 443", lambda lab: tcp4(lab, VIP, 443, 47007), None, "drop"),
    ("UDP to the announced address, port 53", lambda lab: udp4(lab, VIP, 53, 47008), None, "drop"),
    ("TCP to an announced address of no frontend, port 80", lambda lab: tcp4(lab, VIP_OTHER, 80, 47009), None,
     "drop"),
    ("IPv6 TCP to the announced IPv6 address, port 443", lambda lab: tcp6(lab, VIP6, 443, 47010), None, "drop"),
    ("IPv6 UDP to the announced IPv6 address, port 53", lambda lab: udp6(lab, VIP6, 53, 47011), None, "drop"),
    ("TCP to the frontend (new SNAT flow)", lambda lab: tcp4(lab, VIP, 80, 47012), None, "new_snat"),
    ("TCP to the NodePort (new local flow)", lambda lab: tcp4(lab, NODE4, NODEPORT, 47013), None, "new_local"),
    ("IPv6 TCP to the announced IPv6 address, port 80 (no IPv6 service)", lambda lab: tcp6(lab, VIP6, 80, 47014),
     None, "drop"),
    ("the backend's reply to a SNAT flow", None, None, "reply_snat"),
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
@pytest.mark.parametrize(("what", "make", "bit", "where"), CASES, ids=[c[0] for c in CASES])
def test_the_fast_exit_on_the_packets_words(lab: ProgLab, hook: str, what: str, make, bit: str | None,
                                            where: str) -> None:
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
