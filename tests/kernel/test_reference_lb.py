"""The Katran-shaped reference load balancer (kpr.testing.reference_lb) that issue 14's XDP benchmark
measures beside kpr's program: what it does to packets, table-driven as Katran's own fixtures are
(description, input packet, expected verdict, expected output), its connection table and its
counters; and its benchmark rows (the restoring wrapper moves an encapsulated frame's head back)."""

from __future__ import annotations

import io
import math
import socket
import time
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from kpr.testing.prog_run import XDP_DROP, XDP_PASS, XDP_TX, Case, one_cpu, run_cases, test_run
from kpr.testing.reference_lb import GATEWAY_MAC, ReferenceLB, flow_hash

pytestmark = pytest.mark.kernel

VIP = "203.0.113.40"
REALS = [f"10.244.2.{i}" for i in range(1, 101)]
ANY_PORT_VIP, ANY_PORT_REAL = "203.0.113.42", "10.244.3.1"  # a VIP of every port (port 0)
UDP_VIP, UDP_REAL = "203.0.113.43", "10.244.4.1"
LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:09"


@pytest.fixture(scope="module", autouse=True)
def on_one_cpu() -> Iterator[None]:
    # the connection tables are per CPU, as Katran's (its NIC queues keep a flow on one CPU): a
    # flow's packets must run on the CPU its first one did
    with one_cpu():
        yield


def vips(r: ReferenceLB) -> None:
    r.set_vips([(VIP, 80, REALS), (ANY_PORT_VIP, 0, [ANY_PORT_REAL]), (UDP_VIP, 53, [UDP_REAL], socket.IPPROTO_UDP)])


@pytest.fixture(scope="module")
def ref(require_kernel: None) -> Iterator[ReferenceLB]:
    r = ReferenceLB("main")
    try:
        vips(r)
        yield r
    finally:
        r.close()


def frame(src: str = "192.0.2.50", dst: str = VIP, sport: int = 40000, dport: int = 80, flags: str = "S",
          payload: bytes = b"k" * 10, **ip: object) -> Ether:
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags) / (
        payload)


def udp_frame(src: str = "192.0.2.50", dst: str = UDP_VIP, sport: int = 40000, dport: int = 53) -> Ether:
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"q" * 12)


def picked(ref: ReferenceLB, src: str, sport: int, dport: int = 80) -> tuple[int, str]:
    """The ring slot the flow hashes to and the real it names now."""
    slot = flow_hash(src, sport, dport) % ref.ring
    return slot, ref.real_addr(ref.slot_real(0, slot))


def encapsulated(inner: Ether, real: str) -> Ether:
    """What the program sends for `inner`: IPIP to `real`, to the gateway's MAC from the VIP's,
    the outer source 172.16.x.y from the client's address and port, the inner packet as it came."""
    ip = inner[IP]
    # (the port host-order into the address's network-order word, as Katran's encapsulation does)
    suffix = bytes(a ^ b for a, b in zip(socket.inet_aton(ip.src)[2:], struct.pack("<H", ip.payload.sport)))
    outer_src = socket.inet_ntoa(b"\xac\x10" + suffix)
    return Ether(dst=GATEWAY_MAC, src=inner.dst) / IP(src=outer_src, dst=real, proto=4, ttl=64, id=0, tos=ip.tos) / bytes(
        inner[IP])


def test_packets_are_balanced_as_katran_does(ref: ReferenceLB) -> None:
    ref.flush_own_flows()
    new = frame(sport=40001)
    _slot, real = picked(ref, "192.0.2.50", 40001)
    other_client = frame(src="198.51.100.7", sport=51000, tos=0x10)
    _slot2, real2 = picked(ref, "198.51.100.7", 51000)
    any_port, udp = frame(dst=ANY_PORT_VIP, dport=8443), udp_frame()
    # 1514 bytes on the wire is Katran's largest frame; one byte more is dropped
    oversize = frame(flags="A", payload=b"k" * (1514 - len(frame(payload=b""))) + b"k")
    cases = [
        # XDP_TX, the outer IPv4 checksum checked by run_cases (every case's output)
        Case("a new TCP flow to the VIP: IPIP to the real its ring slot names", new, XDP_TX,
             encapsulated(new, real)),
        Case("another client's new flow: its own slot, its tos kept outside", other_client, XDP_TX,
             encapsulated(other_client, real2)),
        Case("a port the all-ports VIP does not name: that VIP (the port-0 fallback), its real", any_port, XDP_TX,
             encapsulated(any_port, ANY_PORT_REAL)),
        Case("UDP to the UDP VIP: IPIP to its real", udp, XDP_TX, encapsulated(udp, UDP_REAL)),
        Case("TCP to the UDP VIP's port passes", frame(dst=UDP_VIP, dport=53), XDP_PASS),
        Case("a 1514-byte frame is balanced", frame(flags="A", payload=b"k" * (1514 - len(frame(payload=b"")))),
             XDP_TX),
        Case("a frame over 1514 bytes to the VIP is dropped (Katran's MAX_PCKT_SIZE)", oversize, XDP_DROP),
        Case("a packet to no VIP's address passes", frame(dst="203.0.113.41"), XDP_PASS, frame(dst="203.0.113.41")),
        Case("a packet to the VIP's address on another port passes", frame(dport=81), XDP_PASS, frame(dport=81)),
        Case("UDP to the TCP VIP passes", Ether(dst=LB_MAC) / IP(src="192.0.2.50", dst=VIP) / UDP(sport=1, dport=80),
             XDP_PASS),
        Case("ICMP to the VIP passes (neither TCP nor UDP)", Ether(dst=LB_MAC) / IP(src="192.0.2.50", dst=VIP) / ICMP(),
             XDP_PASS),
        Case("IPv6 passes (this reference balances IPv4 only)",
             Ether(dst=LB_MAC) / IPv6(src="fd00::9", dst="fd00::40") / TCP(dport=80), XDP_PASS),
        Case("a fragment to the VIP is dropped (as Katran drops fragments)", frame(flags="A", frag=10), XDP_DROP,
             check_checksums=False),
        Case("an IPv4 header with options is dropped (as Katran does)",
             frame(options=b"\x01\x01\x01\x00"), XDP_DROP),
    ]
    run_cases(ref.fd(), cases, kind="xdp")


def test_an_established_flow_keeps_its_real_when_the_ring_changes(ref: ReferenceLB) -> None:
    ref.flush_own_flows()
    src, sport = "192.0.2.60", 42000
    slot, first = picked(ref, src, sport)
    syn, ack = frame(src=src, sport=sport), frame(src=src, sport=sport, flags="A")
    run_cases(ref.fd(), [Case("the SYN: the ring's real", syn, XDP_TX, encapsulated(syn, first))], kind="xdp")
    assert ref.flow_count() == 1  # one LRU insert per new flow
    was = ref.slot_real(0, slot)
    ref.set_slot(0, slot, was % len(REALS) + 1)  # reals are numbered from 1
    try:
        _slot, now = picked(ref, src, sport)
        assert now != first
        run_cases(ref.fd(), [
            Case("its next packet: the LRU entry's real, not the changed ring's", ack, XDP_TX, encapsulated(ack, first)),
            # Katran does not look a SYN up: a new flow on the same tuple takes the ring's pick
            Case("a SYN on the same tuple: the ring's real now", syn, XDP_TX, encapsulated(syn, now)),
            Case("which the LRU keeps for the packets after it", ack, XDP_TX, encapsulated(ack, now)),
        ], kind="xdp")
        ref.flush_own_flows()
        before = ref.stats()
        run_cases(ref.fd(), [Case("without its entry the flow follows the ring", ack, XDP_TX, encapsulated(ack, now))],
                  kind="xdp")
        after = ref.stats()
        assert after.get("tcp_nonsyn_miss", 0) - before.get("tcp_nonsyn_miss", 0) == 1
    finally:
        ref.set_slot(0, slot, was)


def test_the_counters_count_packets_misses_vips_and_reals(ref: ReferenceLB) -> None:
    ref.flush_own_flows()
    src, sport = "192.0.2.70", 43000
    slot, real = picked(ref, src, sport)
    real_index = ref.slot_real(0, slot)
    before, vip_before, real_before = ref.stats(), ref.stat(0), ref.stat(-real_index - 1)
    syn, ack = frame(src=src, sport=sport), frame(src=src, sport=sport, flags="A")
    for p in (syn, ack, ack, frame(dst="203.0.113.41")):  # the last: no VIP, counted nowhere
        test_run(ref.fd(), bytes(p))
    after = ref.stats()
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("lru_total", "lru_miss", "lru_hit", "tcp_syn_miss",
                                                             "tcp_nonsyn_miss")}
    assert grew == {"lru_total": 3, "lru_miss": 1, "lru_hit": 2, "tcp_syn_miss": 1, "tcp_nonsyn_miss": 0}, grew
    size = len(syn[IP])
    assert [a - b for a, b in zip(ref.stat(0), vip_before)] == [3, 3 * size]  # the VIP: packets, bytes
    assert [a - b for a, b in zip(ref.stat(-real_index - 1), real_before)] == [3, 3 * size]  # its real


def test_the_flood_guard_stops_lru_inserts_past_the_rate(require_kernel: None) -> None:
    # a build whose limit is 1 new connection a second per CPU: past it new flows are still balanced
    # (by the ring) but leave no connection table entry, as Katran's under a SYN flood
    r = ReferenceLB("main", max_conn_rate=1)
    try:
        vips(r)
        r.flush_own_flows()
        syns = [frame(src="192.0.2.80", sport=44000 + i) for i in range(10)]
        t0 = time.monotonic()
        verdicts = [test_run(r.fd(), bytes(p)).retval for p in syns]
        seconds = time.monotonic() - t0
        assert verdicts == [XDP_TX] * len(syns)
        # one insert per started second of the guard's window (the ten normally within one)
        assert 1 <= r.flow_count() <= 1 + math.ceil(seconds), (r.flow_count(), seconds)
    finally:
        r.close()


def test_the_benchmarks_reference_rows_run_the_reference_path(require_kernel: None) -> None:
    # the rows the XDP benchmark prints, a few runs each: every wrapped run of the encapsulating
    # program is an XDP_TX on its path (the wrapper moves the grown frame's head back each run),
    # and the summary lines are there in the form the goals are read from
    from kpr.testing.nodeport_bench import ProgLab, bare, cases, load_default
    from kpr.testing.reference_lb import main_rows

    out = io.StringIO()
    with ProgLab(10) as lab:
        load_default(lab, "xdp", 1)
        b = bare(lab, "xdp", 400, 2)
        kc = cases(lab, "xdp")
        summary, spreads = main_rows(lab, "xdp", "default", {"established": kc[0], "new flow": kc[1]}, b, runs=400,
                                    rounds=2, single_rounds=2, pr=lambda *a: print(*a, file=out))
    text = out.getvalue()
    assert "PATH NOT PROVEN" not in text, text
    rows = [ln for ln in text.splitlines() if ln.strip().startswith(("reference (Katran-shaped):", "reference: "))]
    assert len(rows) == 4 and all("[XDP_TX;" in ln and " xdp_tx+" in ln for ln in rows), text
    assert sorted(spreads) == ["257", "65537"] and all(m.verdicts == {XDP_TX} for m in spreads.values())
    assert summary["reference new flow"].startswith("xdp reference (Katran-shaped) new flow: ")
    assert " ns above bare (wrapper), " in summary["reference established"]
    assert summary["vs reference new flow"].startswith("xdp new flow vs reference: ")
