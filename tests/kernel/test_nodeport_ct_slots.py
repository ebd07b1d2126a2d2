"""NodePort's conntrack entries in slots (lib/nodeport.h KPR_NP_CT_SLOTS=1), on tc and XDP with
BPF_PROG_TEST_RUN and real packets: a new flow's entry lands in its slot of kpr_np_ct_slots (not in
kpr_ct), its later packets and its replies find it (IPv4 and IPv6, TCP and UDP, a local backend
and a source-NATed one); a flow whose probes are all held goes into kpr_ct, opens the gate and is
still found; the collector frees expired slots and marks the gate clean only when kpr_ct holds no
NodePort entry; a NodePort entry an older build left in a pinned kpr_ct keeps its flow. With both
slot tables on XDP, a SYN balanced before its conntrack slots are read (KPR_NP_SYN_FIRST) is
still its flow's packet when the flow exists: a resent SYN, a SYN on a closed flow's tuple, a
flow in kpr_ct; each against the same build with the switch off."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from kpr.bpf import maps as M
from kpr.bpf.slots import SlotTable, slot_hash
from kpr.nodeport import datapath as D
from kpr.nodeport.gc import Collector, ct_timeout, now_ns
from kpr.testing.netns import in_netns
from kpr.testing.nodeport_bench import NODE4, NODE6, NODEPORT, POD4, POD6, VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted
from kpr.testing.prog_run import test_run

pytestmark = pytest.mark.kernel

HOOKS = ("tc", "xdp")
SLOTS = ("-DKPR_NP_CT_SLOTS=1",)
# an older build (conntrack in kpr_ct only), whatever the header's default; not
# kpr.nodeport.datapath.NO_SLOTS (both slot tables off, config flowSlots: false)
NO_CT_SLOTS = ("-DKPR_NP_CT_SLOTS=0",)
UDP_LOCAL, TCP_REMOTE, UDP_REMOTE = 30081, 30082, 30083
REMOTE4, REMOTE6 = "10.244.2.5", "fd00:244:2::5"
CLIENT4, CLIENT6 = "192.0.2.70", "2001:db8:c::70"
TCP_P, UDP_P = 6, 17


@dataclass(frozen=True)
class Case:
    name: str
    dst: str
    dport: int
    proto: int
    backend: str  # address the flow is sent to (8080)

    @property
    def v6(self) -> bool:
        return ":" in self.dst

    @property
    def local(self) -> bool:
        return self.backend in (POD4, POD6)


CASES = [
    Case("tcp-local-4", NODE4, NODEPORT, TCP_P, POD4),
    Case("udp-local-4", NODE4, UDP_LOCAL, UDP_P, POD4),
    Case("tcp-snat-4", VIP, 80, TCP_P, "10.244.2.0/24"),  # (one of the LoadBalancer's 100 backends)
    Case("udp-snat-4", NODE4, UDP_REMOTE, UDP_P, REMOTE4),
    Case("tcp-local-6", NODE6, NODEPORT, TCP_P, POD6),
    Case("tcp-snat-6", NODE6, TCP_REMOTE, TCP_P, REMOTE6),
    Case("udp-snat-6", NODE6, UDP_REMOTE, UDP_P, REMOTE6),
]


def _services(lab: ProgLab, remote4: str = REMOTE4) -> list:
    from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey

    tcp, udp = Protocol.TCP, Protocol.UDP
    np = FrontendType.NODE_PORT

    def svc(name: str, addr: str, port: int, proto: Protocol, be: str, local: bool) -> Service:
        return Service(ServiceKey("ctslots", name), (Frontend(np, addr, port, proto, (
            Backend(be, 8080, node_name="lb" if local else "node2", local=local),)),))

    return lab._services() + [
        svc("udp-local-4", NODE4, UDP_LOCAL, udp, POD4, True),
        svc("udp-remote-4", NODE4, UDP_REMOTE, udp, remote4, False),
        svc("tcp-local-6", NODE6, NODEPORT, tcp, POD6, True),
        svc("tcp-remote-6", NODE6, TCP_REMOTE, tcp, REMOTE6, False),
        svc("udp-remote-6", NODE6, UDP_REMOTE, udp, REMOTE6, False),
    ]


PORTS = [(80, TCP_P), (NODEPORT, TCP_P), (TCP_REMOTE, TCP_P), (UDP_LOCAL, UDP_P), (UDP_REMOTE, UDP_P)]


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2, v6=True) as pl:
        pl.writer.full_sync(_services(pl))
        for hook in HOOKS:
            pl.load(hook, hook, SLOTS)
            pl.builds[hook].set_frontend_ports(PORTS)
        yield pl


@pytest.fixture(autouse=True)
def _flushed(lab: ProgLab) -> None:
    lab.flush_flows()  # (gate clean: kpr_ct holds no NodePort entry)


def frame(lab: ProgLab, src: str, dst: str, sport: int, dport: int, proto: int, flags: str = "S") -> bytes:
    eth = Ether(src="02:00:00:00:00:02", dst=lab.mac)
    ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
    l4 = TCP(sport=sport, dport=dport, flags=flags) if proto == TCP_P else UDP(sport=sport, dport=dport)
    return bytes(eth / ip / l4 / b"kpr")


def ct_key(src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    return D.CT_KEY.pack(M.addr_to_bytes(src), M.addr_to_bytes(dst), M.htons(sport), M.htons(dport), proto,
                         D.CT_DIR_ORIGINAL, 0)


def slot_entry(lab: ProgLab, key: bytes) -> tuple | None:
    """The slot's kpr_ct_entry fields of `key`, or None."""
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        idx = t.find(key, D.CT_PROBES)
        return None if idx is None else D.CT_ENTRY.unpack(t.read(idx)[2])


def lru_entry(lab: ProgLab, key: bytes) -> bytes | None:
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
        return m.lookup(key)


def gate(lab: ProgLab) -> tuple[int, int]:
    with M.BpfMap.open_pinned(lab.pin / D.CT_GATE_MAP) as g:
        mem = g.mmap()
        try:
            return D.CT_GATE.unpack_from(mem)
        finally:
            mem.release()


def egress(lab: ProgLab, pkt: bytes) -> dict[str, int]:
    """The tc build's egress program on a packet leaving eth0: the counters it moved."""
    from kpr.plugins.tc_nodeport import datapath as TD

    dp = lab.builds["tc"]
    before = dp.stats()
    with in_netns(lab.topo["lb"].path):
        test_run(dp.fd(TD.EGRESS), pkt, ctx=lab.ctx("tc"))
    after = dp.stats()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


NEW = {"new_local", "new_snat", "new_dsr"}


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_new_flow_lands_in_its_slot_and_its_packets_and_replies_find_it(lab: ProgLab, hook: str, case: Case) -> None:
    client = CLIENT6 if case.v6 else CLIENT4
    sport = 41000 + CASES.index(case) * 2 + HOOKS.index(hook)
    key = ct_key(client, case.dst, sport, case.dport, case.proto)
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, client, case.dst, sport, case.dport, case.proto))
    assert d.get("new_local" if case.local else "new_snat") == 1, d
    e = slot_entry(lab, key)
    assert e is not None, ("no slot holds the new flow", d)
    assert lru_entry(lab, key) is None, "a slot build's new flow wrote kpr_ct"
    _last, bid, _rev_nat, flags, _tf, _p, nat_port, _p2, nat_addr = e
    assert flags & D.CT_F_NODE_PORT and flags & (D.CT_F_LOCAL if case.local else D.CT_F_SNAT), flags
    if not case.local:
        assert nat_port, "the SNAT stage wrote its mapping into the flow's slot"
    # its next packet: established, the same entry
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, client, case.dst, sport, case.dport, case.proto, "A"))
    assert d.get("established") == 1 and not NEW & set(d), d
    assert d.get("ct_slot_full", 0) == 0 and d.get("drop_ct_claim", 0) == 0, d
    assert slot_entry(lab, key)[1] == bid
    # its reply
    if case.local:
        if hook == "xdp":
            return  # (a local backend's replies leave through tc's egress program)
        reply = frame(lab, case.backend, client, 8080, sport, case.proto, "SA")
        d = egress(lab, reply)
        # a SYN-ACK is checked against the flow's conntrack entry (kpr_np_rev_live): found in its slot
        assert d.get("reply_revnat") == 1 and d.get("reverse_entry_stale", 0) == 0, d
    else:
        with M.BpfMap.open_pinned(lab.pin / "kpr_backend") as m:
            be_addr = M.bytes_to_addr(M.BACKEND.unpack(m.lookup(M.U32.pack(bid & 0xFFFFFF)))[0])
        nat = M.bytes_to_addr(nat_addr)
        reply = frame(lab, be_addr, nat, 8080, M.ntohs(nat_port), case.proto, "SA")
        _v, _out, d = run_counted(lab, hook, hook, reply)
        assert d.get("reply_snat") == 1, d


@pytest.mark.parametrize("hook", HOOKS)
def test_a_flow_whose_backend_went_away_is_balanced_again_in_its_own_slot(lab: ProgLab, hook: str) -> None:
    """kpr_np_ct_claim's in-place re-pick: the next packet of a flow whose backend left the
    service finds the flow's live slot (stale_backend), writes the new pick and a cleared SNAT
    mapping into that slot (seen by a build that stops before the stage), and the stage maps it
    afresh: one slot still holds the key, none of kpr_ct, and the packet goes to the new backend."""
    moved = "10.244.2.6"  # (routed like REMOTE4: via node2)
    stop = f"{hook}-stop3"
    if stop not in lab.builds:
        lab.load(hook, stop, [*SLOTS, "-DKPR_NP_BENCH_STOP=3", "-DKPR_NP_EST_INLINE=0"])
        lab.builds[stop].set_frontend_ports(PORTS)  # (a load arms the lab's own ports only)
    sport = 43100 + HOOKS.index(hook)
    key = ct_key(CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P)
    pkt = frame(lab, CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P)
    _v, _out, d = run_counted(lab, hook, hook, pkt)
    assert d.get("new_snat") == 1, d
    _last, old_bid, *_ = slot_entry(lab, key)
    try:
        lab.writer.full_sync(_services(lab, remote4=moved))
        _v, _out, d = run_counted(lab, hook, stop, pkt)
        assert d.get("stale_backend") == 1 and d.get("new_snat") == 1, d
        assert d.get("ct_slot_full", 0) == 0 and d.get("drop_ct_claim", 0) == 0, d
        _last, bid, _rev_nat, flags, _tf, _p, nat_port, _p2, _nat_addr = slot_entry(lab, key)
        assert bid != old_bid and flags & D.CT_F_SNAT, (bid, old_bid, flags)
        assert nat_port == 0, "the re-pick kept the old backend's SNAT mapping"
        _v, out, d = run_counted(lab, hook, hook, pkt)
        assert d.get("established") == 1 and not NEW & set(d), d
        _last, bid2, _rev_nat, _flags, _tf, _p, nat_port, _p2, _nat_addr = slot_entry(lab, key)
        assert bid2 == bid and nat_port, "the stage mapped the re-picked flow into its slot"
        with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            holding = [i for i in t.probes(key, D.CT_PROBES) if t.claim(i) and t.read(i)[1] == key]
        assert len(holding) == 1, holding
        assert lru_entry(lab, key) is None
        assert IP(out[14:]).dst == moved, IP(out[14:]).summary()
    finally:
        lab.writer.full_sync(_services(lab))


def _hold_probes(lab: ProgLab, key: bytes, skip: tuple[int, ...] = ()) -> list[int]:
    """Every probe of `key`'s hash (but the indexes in `skip`) held by another flow's entry (as a
    full neighbourhood)."""
    held = []
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        h = slot_hash(key)
        for i in range(D.CT_PROBES):
            idx = (h + i) & (t.slots - 1)
            if idx in skip:
                continue
            other = key[:32] + struct.pack("=HHBBH", 1, 1, 17, 0, 0)  # another key: a UDP flow from port 1
            e = D.CT_ENTRY.pack(now_ns(), 1, 1, D.CT_F_NODE_PORT, 0, 0, 0, 0, bytes(16))
            t.put(idx, now_ns() | 1, other, e)
            held.append(idx)
    return held


@pytest.mark.parametrize("hook", HOOKS)
def test_a_held_neighbourhood_overflows_into_kpr_ct_and_the_flow_is_still_found(lab: ProgLab, hook: str) -> None:
    sport = 42000 + HOOKS.index(hook)
    key = ct_key(CLIENT4, NODE4, sport, NODEPORT, TCP_P)
    _hold_probes(lab, key)
    overflows, clean = gate(lab)
    assert clean == overflows + 1, "flushed: clean"
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, CLIENT4, NODE4, sport, NODEPORT, TCP_P))
    assert d.get("new_local") == 1 and d.get("ct_slot_full") == 1, d
    assert slot_entry(lab, key) is None and lru_entry(lab, key) is not None
    o2, c2 = gate(lab)
    assert o2 == overflows + 2 and c2 != o2 + 1, "marked before and after its kpr_ct write: open"
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, CLIENT4, NODE4, sport, NODEPORT, TCP_P, "A"))
    assert d.get("established") == 1 and not NEW & set(d), d


def _clean_gate(lab: ProgLab) -> None:
    """kpr_np_ct_gate marked clean, as a collector's sweep that found no NodePort entry does."""
    with M.BpfMap.open_pinned(lab.pin / D.CT_GATE_MAP) as g:
        D.ct_gate_clean(g, D.ct_gate_overflows(g))
    o, c = gate(lab)
    assert c == o + 1


def _collector(lab: ProgLab, snat_addrs: frozenset[bytes] = frozenset(), ct_slots: bool = True) -> Collector:
    maps = dict(lab.builds["tc"].maps)
    return Collector(maps, lambda a, p, pr: None, lambda: set(snat_addrs), 60.0, pin=lab.pin, ct_slots=ct_slots)


def test_the_collector_frees_expired_slots_and_cleans_the_gate_only_without_nodeport_entries_in_kpr_ct(
        lab: ProgLab) -> None:
    live_key = ct_key(CLIENT4, NODE4, 43000, NODEPORT, TCP_P)
    dead_key = ct_key(CLIENT4, NODE4, 43001, NODEPORT, TCP_P)
    run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, 43000, NODEPORT, TCP_P))
    run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, 43001, NODEPORT, TCP_P))
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        idx = t.find(dead_key, D.CT_PROBES)
        _stamp, k, v = t.read(idx)
        f = list(D.CT_ENTRY.unpack(v))
        f[0] = now_ns() - ct_timeout(f[3], TCP_P) - 10**9  # idle past its timeout
        t.put(idx, 1, k, D.CT_ENTRY.pack(*f))  # (claimed long ago)
    # a NodePort entry in kpr_ct (an overflow, or a flow an older build began)
    lru_key = ct_key(CLIENT4, NODE4, 43002, NODEPORT, TCP_P)
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
        m.update(lru_key, D.CT_ENTRY.pack(now_ns(), 1, 1, D.CT_F_NODE_PORT, 0, 0, 0, 0, bytes(16)))
    with M.BpfMap.open_pinned(lab.pin / D.CT_GATE_MAP) as g:
        mem = g.mmap()
        mem[:16] = bytes(16)  # as a new pin: not clean
        mem.release()
    col = _collector(lab)
    try:
        res = col.run()
        assert res.ct_expired == 1, res
        assert slot_entry(lab, dead_key) is None and slot_entry(lab, live_key) is not None
        assert col.totals.ct_entries == 2  # the live slot and kpr_ct's entry
        o, c = gate(lab)
        assert c != o + 1, "kpr_ct still holds a NodePort entry: the gate stays open"
        with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
            m.delete(lru_key)
        col.run()
        o, c = gate(lab)
        assert c == o + 1, "no NodePort entry left in kpr_ct: clean"
    finally:
        col.stop()


@pytest.mark.parametrize("how", ["new-gate", "loader"])
@pytest.mark.parametrize("hook", HOOKS)
def test_an_upgrade_keeps_the_flows_an_older_build_left_in_kpr_ct(lab: ProgLab, hook: str, how: str) -> None:
    """A build without slots begins a flow (kpr_ct); a slot build finds it there, its gate open
    either as a new pin leaves it ("new-gate") or, the gate marked clean by a collector while
    the older build wrote kpr_ct unmarked, by the slot build's loader, which found the NodePort
    entry in kpr_ct ("loader"); a collector's pass while the flow lives keeps it open."""
    old = f"{hook}-lru"
    lab.load(hook, old, NO_CT_SLOTS)  # (the same pins: kpr_ct, kpr_np_ct_slots and kpr_np_ct_gate shared)
    try:
        lab.builds[old].set_frontend_ports(PORTS)
        sport = 44000 + HOOKS.index(hook) * 2 + (how == "loader")
        key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
        _v, _out, d = run_counted(lab, hook, old, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
        assert d.get("new_snat") == 1 and lru_entry(lab, key) is not None, d
        bid = D.CT_ENTRY.unpack(lru_entry(lab, key))[1]
    finally:
        lab.builds.pop(old).close()
    build = hook
    if how == "new-gate":
        with M.BpfMap.open_pinned(lab.pin / D.CT_GATE_MAP) as g:
            mem = g.mmap()
            mem[:16] = bytes(16)  # the gate as a new pin (an upgrade makes it with the first slot build)
            mem.release()
        col = _collector(lab)
        try:
            col.run()  # a pass while the old flow lives: the gate stays open
        finally:
            col.stop()
    else:
        _clean_gate(lab)  # (as a collector that swept before the older build's write left it)
        build = f"{hook}-again"
        lab.load(hook, build, SLOTS)  # the upgrade's load: finds the older build's entry in kpr_ct
        lab.builds[build].set_frontend_ports(PORTS)
    try:
        _v, _out, d = run_counted(lab, hook, build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P, "A"))
        assert d.get("established") == 1 and not NEW & set(d), d
        assert slot_entry(lab, key) is None and D.CT_ENTRY.unpack(lru_entry(lab, key))[1] == bid
    finally:
        if build != hook:
            lab.builds.pop(build).close()


def _age_slot(lab: ProgLab, key: bytes, proto: int) -> None:
    """`key`'s slot idle past its timeout and claimed long ago (the collector's to free)."""
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        idx = t.find(key, D.CT_PROBES)
        _stamp, k, v = t.read(idx)
        f = list(D.CT_ENTRY.unpack(v))
        f[0] = now_ns() - ct_timeout(f[3], proto) - 10**9
        t.put(idx, 1, k, D.CT_ENTRY.pack(*f))


@pytest.mark.parametrize("where", ["kpr_ct", "slot"])
@pytest.mark.parametrize("hook", HOOKS)
def test_a_reused_source_port_keeps_its_snat_mapping_when_the_collector_frees_its_expired_slot(
        lab: ProgLab, hook: str, where: str) -> None:
    """Review R4 item 1: a client reusing a source port after its flow's slot expired finds the
    slot still held by that expired entry, and its new flow goes into kpr_ct ("kpr_ct": the
    other probes held too) or another probe's slot ("slot": the same key in two slots, one
    expired) with another NAT port. The collector's pass frees the expired slot and that entry's
    own SNAT mapping only: the live flow's reply is still translated (it lost its mapping when
    partners were freed by flow key)."""
    sport = 45000 + HOOKS.index(hook) * 2 + (where == "slot")
    pkt = frame(lab, CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P)
    key = ct_key(CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P)
    _v, _out, d = run_counted(lab, hook, hook, pkt)
    assert d.get("new_snat") == 1, d
    old_port = slot_entry(lab, key)[6]
    _age_slot(lab, key, UDP_P)
    if where == "kpr_ct":
        with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            aged = t.find(key, D.CT_PROBES)
        _hold_probes(lab, key, skip=(aged,))
    elif D.CT_PROBES < 2:
        pytest.skip("one probe a key: the reused port's flow always goes to kpr_ct")
    _v, _out, d = run_counted(lab, hook, hook, pkt)
    assert d.get("new_snat") == 1 and (d.get("ct_slot_full") == 1) == (where == "kpr_ct"), d
    if where == "slot":
        with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            mine = [D.CT_ENTRY.unpack(t.read(i)[2]) for i in t.probes(key, D.CT_PROBES)
                    if t.claim(i) and t.read(i)[1] == key]
        assert lru_entry(lab, key) is None and len(mine) == 2, "the key in two slots, one expired"
        _l, bid, _r, _f, _t, _p, new_port, _p2, nat_addr = max(mine)  # (the live one: last seen now)
        from kpr.readback import DatapathMaps

        with DatapathMaps(lab.pin) as dm:  # readback (kpr explain) shows the live one, as the programs take it
            got = dm.conntrack(M.addr_to_bytes(CLIENT4), M.addr_to_bytes(NODE4), sport, UDP_REMOTE, UDP_P)
        assert got is not None and got["map"] == D.CT_SLOTS_MAP and got["nat_port"] == M.ntohs(new_port), got
    else:
        _l, bid, _r, _f, _t, _p, new_port, _p2, nat_addr = D.CT_ENTRY.unpack(lru_entry(lab, key))
    assert new_port and new_port != old_port
    col = _collector(lab, frozenset({nat_addr}))
    try:
        res = col.run()
    finally:
        col.stop()
    assert res.ct_expired == 1 and res.snat_freed == 1, res  # the expired slot's mapping, not the live one's
    assert (lru_entry(lab, key) if where == "kpr_ct" else slot_entry(lab, key)) is not None
    reply = frame(lab, REMOTE4, M.bytes_to_addr(nat_addr), 8080, M.ntohs(new_port), UDP_P)
    _v, _out, d = run_counted(lab, hook, hook, reply)
    assert d.get("reply_snat") == 1, d


def test_a_change_clears_a_young_slots_udp_flow_of_a_removed_backend_not_one_newer_than_the_backends_read(
        lab: ProgLab) -> None:
    """A service change's purge (stale_only) judges a slot claimed within the grace period as
    kpr_ct's entry would be judged: a UDP flow of a backend the frontend no longer has is cleared
    at once (it was left up to the grace period and a pass, its packets still sent to the
    removed backend). Only a young slot whose backend id the pass's read of kpr_backend lacks
    (a backend added after that read) is kept."""
    key = ct_key(CLIENT4, NODE4, 43300, UDP_REMOTE, UDP_P)
    _v, _out, d = run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, 43300, UDP_REMOTE, UDP_P))
    assert d.get("new_snat") == 1, d
    newer = ct_key(CLIENT4, NODE4, 43301, UDP_REMOTE, UDP_P)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        t.put(t.first_free(newer, D.CT_PROBES), now_ns() | 1, newer,
              D.CT_ENTRY.pack(now_ns(), 0xABCDEF, 1, D.CT_F_NODE_PORT | D.CT_F_SNAT, 0, 0, 0, 0, bytes(16)))
    maps = dict(lab.builds["tc"].maps)
    col = Collector(maps, lambda a, p, pr: set(), lambda: set(), 60.0, pin=lab.pin, ct_slots=True)
    try:
        res = col.run(stale_only=True)
    finally:
        col.stop()
    assert res.stale == 1, res
    assert slot_entry(lab, key) is None, "the removed backend's young flow kept its slot"
    assert slot_entry(lab, newer) is not None, "a flow of a backend newer than the pass's read was cleared"


def test_a_collector_of_builds_without_slots_never_marks_the_gate_clean(lab: ProgLab) -> None:
    """Review R4 item 3: a build without slots writes kpr_ct unmarked, so its collector (the
    header's KPR_NP_CT_SLOTS off) must never say kpr_ct holds no NodePort entry."""
    with M.BpfMap.open_pinned(lab.pin / D.CT_GATE_MAP) as g:
        D.ct_gate_open(g)
    o, c = gate(lab)
    assert c != o + 1
    col = _collector(lab, ct_slots=False)
    try:
        col.run()  # kpr_ct holds no NodePort entry (flushed)
    finally:
        col.stop()
    o, c = gate(lab)
    assert c != o + 1, "a no-slots collector marked the gate clean"


@pytest.mark.parametrize("hook", HOOKS)
def test_a_slot_build_loaded_before_an_older_build_writes_kpr_ct_finds_its_flow(lab: ProgLab, hook: str) -> None:
    """Review R4 item 3: the gate clean, the slot build loaded (kpr_ct held no NodePort entry
    then), the build it replaces still runs and begins a flow in kpr_ct, unmarked: the slot
    build's loader opened the gate whatever kpr_ct held, so the flow's next packet is found."""
    old = f"{hook}-lru-first"
    lab.load(hook, old, NO_CT_SLOTS)
    new = f"{hook}-slots-after"
    try:
        lab.builds[old].set_frontend_ports(PORTS)
        _clean_gate(lab)  # (a collector's sweep found no NodePort entry in kpr_ct)
        lab.load(hook, new, SLOTS)  # loaded before the older build's flow exists
        lab.builds[new].set_frontend_ports(PORTS)
        sport = 46000 + HOOKS.index(hook)
        key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
        _v, _out, d = run_counted(lab, hook, old, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
        assert d.get("new_snat") == 1 and lru_entry(lab, key) is not None, d
        _v, _out, d = run_counted(lab, hook, new, frame(lab, CLIENT4, VIP, sport, 80, TCP_P, "A"))
        assert d.get("established") == 1 and not NEW & set(d), d
    finally:
        for b in (old, new):
            if b in lab.builds:
                lab.builds.pop(b).close()


@pytest.mark.parametrize("hook", HOOKS)
def test_a_slot_claimed_but_keyless_drops_the_first_packet_rather_than_writing_kpr_ct(
        lab: ProgLab, hook: str) -> None:
    """Review R4 item 2: another CPU has claimed the flow's slot and not written its key yet.
    The packet is dropped (drop_ct_claim; the client resends), not written to kpr_ct with its
    own backend pick and SNAT mapping beside the other CPU's entry."""
    sport = 47000 + HOOKS.index(hook)
    key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        idx = slot_hash(key) & (t.slots - 1)
        t.put(idx, now_ns() | 1, bytes(len(key)), bytes(D.CT_ENTRY.size))
    _hold_probes(lab, key, skip=(idx,))  # (its other probes held by other flows)
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    assert d.get("drop_ct_claim") == 1 and not NEW & set(d) and d.get("ct_slot_full", 0) == 0, d
    assert lru_entry(lab, key) is None


def test_readback_skips_an_expired_slot_for_the_live_kpr_ct_entry(lab: ProgLab) -> None:
    """Review R4 item 6: readback (and kpr explain) showed an expired slot's entry (a dead NAT
    port) rather than the flow's live kpr_ct entry the programs use."""
    from kpr.readback import DatapathMaps

    sport = 48000
    key = ct_key(CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P)
    run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P))
    _age_slot(lab, key, UDP_P)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        aged = t.find(key, D.CT_PROBES)
    _hold_probes(lab, key, skip=(aged,))  # (the flow's other probes held: it goes to kpr_ct)
    _v, _out, d = run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, sport, UDP_REMOTE, UDP_P))
    assert d.get("ct_slot_full") == 1, d
    live_port = D.CT_ENTRY.unpack(lru_entry(lab, key))[6]
    with DatapathMaps(lab.pin) as dm:
        got = dm.conntrack(M.addr_to_bytes(CLIENT4), M.addr_to_bytes(NODE4), sport, UDP_REMOTE, UDP_P)
    assert got is not None and got["map"] == "kpr_ct" and got["nat_port"] == M.ntohs(live_port), got


# --- the home slots' gates (struct kpr_np_ct_slot lru_adds, lru_clean) -------------------------

def home_gate(lab: ProgLab, key: bytes) -> tuple[int, int]:
    """(lru_adds, lru_clean) of `key`'s home slot."""
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        i = D.ct_home(t, key)
        return D.ct_homes_adds(t)[i], t.column(D.CT_HOME_CLEAN)[i]


def home_shut(g: tuple[int, int]) -> bool:
    return g[1] == g[0] + 1


def _plant_lru(key: bytes) -> bytes:
    """A NodePort entry for `key` as kpr_ct would hold it (backend 1), written unmarked."""
    return D.CT_ENTRY.pack(now_ns(), 1, 1, D.CT_F_NODE_PORT | D.CT_F_LOCAL, 0, 0, 0, 0, bytes(16))


@pytest.mark.parametrize("hook", HOOKS)
def test_an_overflow_opens_kpr_ct_for_the_keys_of_its_home_slot_only(lab: ProgLab, hook: str) -> None:
    """The table's gate opens at any overflow; the home slot's gate only for the keys homed
    there: another key's slot miss (its home shut) does not look in kpr_ct, even with the
    table's gate open, so an entry put there unmarked is not found; the overflowed flow is."""
    sport = 48000 + HOOKS.index(hook) * 2
    key = ct_key(CLIENT4, NODE4, sport, NODEPORT, TCP_P)
    other = ct_key(CLIENT4, NODE4, sport + 1, NODEPORT, TCP_P)
    _hold_probes(lab, key)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        assert D.ct_home(t, key) != D.ct_home(t, other)
    assert home_shut(home_gate(lab, key)) and home_shut(home_gate(lab, other)), "flushed: every home shut"
    adds = home_gate(lab, key)[0]
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, CLIENT4, NODE4, sport, NODEPORT, TCP_P))
    assert d.get("new_local") == 1 and d.get("ct_slot_full") == 1 and lru_entry(lab, key) is not None, d
    g = home_gate(lab, key)
    assert g[0] == adds + 2 and not home_shut(g), "its home marked before and after the kpr_ct write: open"
    o, c = gate(lab)
    assert c != o + 1, "the table's gate open too"
    assert home_shut(home_gate(lab, other)), "another key's home untouched"
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, CLIENT4, NODE4, sport, NODEPORT, TCP_P, "A"))
    assert d.get("established") == 1 and not NEW & set(d), ("the overflowed flow is found in kpr_ct", d)
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
        m.update(other, _plant_lru(other))
    _v, _out, d = run_counted(lab, hook, hook, frame(lab, CLIENT4, NODE4, sport + 1, NODEPORT, TCP_P, "A"))
    assert d.get("new_local") == 1 and not d.get("established"), ("a shut home: kpr_ct not read", d)


def test_the_collector_opens_the_homes_of_the_keys_kpr_ct_keeps_and_shuts_the_others(lab: ProgLab) -> None:
    kept = ct_key(CLIENT4, NODE4, 49000, NODEPORT, TCP_P)
    gone = ct_key(CLIENT4, NODE4, 49001, NODEPORT, TCP_P)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        assert D.ct_home(t, kept) != D.ct_home(t, gone)
        D.ct_homes_open(t)  # (as a load leaves them: every home open)
    assert not home_shut(home_gate(lab, kept)) and not home_shut(home_gate(lab, gone))
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
        m.update(kept, _plant_lru(kept))
    col = _collector(lab)
    try:
        col.run()
        assert not home_shut(home_gate(lab, kept)), "kpr_ct keeps a NodePort entry of a key homed there"
        assert home_shut(home_gate(lab, gone)), "no entry of its keys in kpr_ct: shut"
        with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
            m.delete(kept)
        col.run()
        assert home_shut(home_gate(lab, kept)) and home_shut(home_gate(lab, gone))
    finally:
        col.stop()


def test_a_pass_that_began_before_a_write_leaves_its_home_open(lab: ProgLab) -> None:
    """A program's marks after the collector read the counts (a write its sweep may miss) keep
    the home open: clean is written with the count read before."""
    key = ct_key(CLIENT4, NODE4, 49010, NODEPORT, TCP_P)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        adds = D.ct_homes_adds(t)  # the pass's read, before its sweep
    _hold_probes(lab, key)
    _v, _out, d = run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, 49010, NODEPORT, TCP_P))
    assert d.get("ct_slot_full") == 1, d
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        D.ct_homes_clean(t, adds, set())  # the sweep (before the write) found no entry
    assert not home_shut(home_gate(lab, key)), "the write's marks came after the read: open"


def test_a_collector_of_builds_without_slots_never_shuts_a_home(lab: ProgLab) -> None:
    key = ct_key(CLIENT4, NODE4, 49020, NODEPORT, TCP_P)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        D.ct_homes_open(t)
    col = _collector(lab, ct_slots=False)
    try:
        col.run()
    finally:
        col.stop()
    assert not home_shut(home_gate(lab, key)), "a no-slots collector shut a home"


def test_freeing_a_slot_keeps_its_home_gate(lab: ProgLab) -> None:
    key = ct_key(CLIENT4, NODE4, 49030, NODEPORT, TCP_P)
    run_counted(lab, "tc", "tc", frame(lab, CLIENT4, NODE4, 49030, NODEPORT, TCP_P))
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        idx = t.find(key, D.CT_PROBES)
        assert idx is not None
        D.ct_homes_open(t)
        before = home_gate(lab, key)
        t.free(idx)
        assert t.claim(idx) == 0 and t.read(idx)[1:] == (bytes(t.key_size), bytes(t.val_size))
    assert home_gate(lab, key) == before, "the index's gate words went with the flow"


def test_the_benchmarks_fill_holds_slots_at_random_places(lab: ProgLab) -> None:
    """kpr.testing.flow_maps.fill_flow_maps holds F of the slots at random places, so two adjacent
    probes (KPR_NP_CT_PROBES=2) are both held at about F squared, as on a node that full (an even
    spread held every other slot: two probes never both held, a best case no node has)."""
    from kpr.testing.flow_maps import fill_flow_maps

    try:
        fill_flow_maps(lab.pin, 0.5)
        with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            held = [False] * t.slots
            for idx, _stamp, _k, _v in t.held():
                held[idx] = True
        assert sum(held) == len(held) // 2
        both = sum(1 for i in range(len(held)) if held[i] and held[(i + 1) % len(held)]) / len(held)
        assert 0.2 < both < 0.3, both
    finally:
        lab.flush_flows()


# --- a SYN balanced before its conntrack slots are read (KPR_NP_SYN_FIRST, XDP with both slot tables)

BOTH = (*SLOTS, "-DKPR_NP_SNAT_SLOTS=1")  # (XDP's default with both: KPR_NP_SYN_FIRST=1)
SYN_BUILDS = {"xdp-syn": BOTH, "xdp-syn0": (*BOTH, "-DKPR_NP_SYN_FIRST=0")}


def _syn_build(lab: ProgLab, name: str) -> str:
    if name not in lab.builds:
        lab.load("xdp", name, SYN_BUILDS[name])
        lab.builds[name].set_frontend_ports(PORTS)  # (a load arms the lab's own ports only)
    return name


@pytest.mark.parametrize("build", sorted(SYN_BUILDS))
def test_a_resent_syn_follows_its_flow_to_the_same_backend_and_snat_port(lab: ProgLab, build: str) -> None:
    """A SYN sent again (its SYN-ACK lost) is the flow's packet, not a new flow: with
    KPR_NP_SYN_FIRST its conntrack slots are first read by the claim, which finds the flow's
    entry and follows it; the same packet out as the first SYN's, one slot holding the key."""
    _syn_build(lab, build)
    sport = 49100 + sorted(SYN_BUILDS).index(build)
    key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
    pkt = frame(lab, CLIENT4, VIP, sport, 80, TCP_P)
    with in_netns(lab.lb_path):  # every backend's next hop cached, as the benchmarks do (the claim stage's path)
        lab.run_wrapped("xdp", lab.entry("xdp", build), lab.packet(VIP, 80, flags="S"), 1000, vary=True)
    lab.flush_flows()
    _v, first, d = run_counted(lab, "xdp", build, pkt)
    assert d.get("new_snat") == 1 and d.get("fwd_nh_cached") == 1, ("the claim stage's path", d)
    port = TCP(first[34:]).sport
    assert port % 2 == 0 and D.SNAT_PORT_MIN <= port <= D.SNAT_PORT_MAX, port
    _v, again, d = run_counted(lab, "xdp", build, pkt)
    assert d.get("established") == 1 and not NEW & set(d), d
    assert d.get("ct_slot_full", 0) == 0 and d.get("drop_ct_claim", 0) == 0, d
    assert again == first, (IP(first[14:]).summary(), IP(again[14:]).summary())
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        assert [i for i in t.probes(key, D.CT_PROBES) if t.claim(i) and t.read(i)[1] == key] == [t.find(key, D.CT_PROBES)]
    assert lru_entry(lab, key) is None


@pytest.mark.parametrize("build", sorted(SYN_BUILDS))
def test_a_syn_on_the_tuple_of_a_closed_flow_restarts_it(lab: ProgLab, build: str) -> None:
    """A new connection on the tuple of one that sent its FIN: the same backend, the entry's
    closing and reply marks cleared (the conntrack hit's restart; with KPR_NP_SYN_FIRST the
    claim's follow does it)."""
    _syn_build(lab, build)
    sport = 49110 + sorted(SYN_BUILDS).index(build)
    key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
    _v, first, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    assert d.get("new_snat") == 1, d
    for flags in ("A", "FA"):
        run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P, flags))
    _last, bid, _rev, flags_before, *_ = slot_entry(lab, key)
    assert flags_before & D.CT_F_CLOSING, hex(flags_before)
    _v, out, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    assert d.get("established") == 1 and not NEW & set(d), d
    _last, bid2, _rev, flags_after, *_ = slot_entry(lab, key)
    assert bid2 == bid and not flags_after & (D.CT_F_CLOSING | D.CT_F_SEEN_REPLY), hex(flags_after)
    assert IP(out[14:]).dst == IP(first[14:]).dst


def test_a_syn_while_kpr_ct_may_hold_nodeport_entries_finds_its_flow_there(lab: ProgLab) -> None:
    """A flow that overflowed into kpr_ct (its probes held) opens the gates, and its resent SYN
    finds it there (kpr_np_ct_lru_syn, before the claim); without that look the claim would meet
    a free probe and make the flow a second entry."""
    build = _syn_build(lab, "xdp-syn")
    sport = 49120
    key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
    pkt = frame(lab, CLIENT4, VIP, sport, 80, TCP_P)
    held = _hold_probes(lab, key)
    _v, first, d = run_counted(lab, "xdp", build, pkt)
    assert d.get("new_snat") == 1 and d.get("ct_slot_full") == 1 and lru_entry(lab, key) is not None, d
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        for idx in held:
            t.free(idx)
    _v, again, d = run_counted(lab, "xdp", build, pkt)
    assert d.get("established") == 1 and not NEW & set(d), d
    assert slot_entry(lab, key) is None, "the resent SYN claimed a slot beside its kpr_ct entry"
    assert again == first


def _syn_scratch(lab: ProgLab, build: str) -> list[int]:
    """Each CPU's kpr_np_syn scratch of `build`: the source port (network order) of the last flow
    whose SNAT slot its entry program touched."""
    table = lab.builds[build].bpf.get_table(b"kpr_np_syn")
    return [v.sport for v in table[table.Key(0)]]


def test_a_syn_is_balanced_first_while_another_flows_overflow_holds_the_gate_open(lab: ProgLab) -> None:
    """One overflow into kpr_ct opens the table's gate until the collector's sweep; a SYN of any
    other tuple (its home slot's gate shut) is still balanced before its conntrack slots are read:
    its SNAT slot touched (this CPU's kpr_np_syn names it), its entry in a slot, kpr_ct not
    written. With the table's gate read first (before this change) it took the conntrack
    lookup and no touch: the scratch still named the overflowed flow."""
    build = _syn_build(lab, "xdp-syn")
    with in_netns(lab.lb_path):  # every backend's next hop cached (the touch's path)
        lab.run_wrapped("xdp", lab.entry("xdp", build), lab.packet(VIP, 80, flags="S"), 200, vary=True)
    lab.flush_flows()
    over, other = 49130, 49131
    over_key, other_key = ct_key(CLIENT4, VIP, over, 80, TCP_P), ct_key(CLIENT4, VIP, other, 80, TCP_P)
    _hold_probes(lab, over_key)
    _v, _out, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, over, 80, TCP_P))
    assert d.get("ct_slot_full") == 1 and lru_entry(lab, over_key) is not None, d
    overflows, clean = gate(lab)
    assert clean != overflows + 1, "the table's gate open"
    assert M.htons(over) in _syn_scratch(lab, build), "the overflowed SYN was touched"
    _v, _out, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, other, 80, TCP_P))
    assert d.get("new_snat") == 1 and d.get("fwd_nh_cached") == 1 and not d.get("ct_slot_full"), d
    assert M.htons(other) in _syn_scratch(lab, build), "no touch: balanced after its lookup"
    assert slot_entry(lab, other_key) is not None and lru_entry(lab, other_key) is None


def test_a_syn_on_the_tuple_of_a_closed_flow_in_kpr_ct_restarts_it_there(lab: ProgLab) -> None:
    """The overflowed flow's new connection on its tuple (after its FIN): found in kpr_ct after the
    pick, the same backend, kpr_ct's own entry's closing and reply marks cleared, no slot taken."""
    build = _syn_build(lab, "xdp-syn")
    sport = 49140
    key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
    held = _hold_probes(lab, key)
    _v, first, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    assert d.get("ct_slot_full") == 1, d
    for flags in ("A", "FA"):
        run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P, flags))
    _last, bid, _rev, flags_before, *_ = D.CT_ENTRY.unpack(lru_entry(lab, key))
    assert flags_before & D.CT_F_CLOSING, hex(flags_before)
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        for idx in held:
            t.free(idx)
    _v, out, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    assert d.get("established") == 1 and not NEW & set(d), d
    _last, bid2, _rev, flags_after, *_ = D.CT_ENTRY.unpack(lru_entry(lab, key))
    assert bid2 == bid and not flags_after & (D.CT_F_CLOSING | D.CT_F_SEEN_REPLY), hex(flags_after)
    assert slot_entry(lab, key) is None
    assert IP(out[14:]).dst == IP(first[14:]).dst


def test_a_syn_whose_kpr_ct_flow_lost_its_backend_is_balanced_again_in_a_slot(lab: ProgLab) -> None:
    """The overflowed flow's kpr_ct entry names a backend since deleted (an id no backend holds):
    its next SYN is counted stale_backend and balanced as a new flow, in a slot (as the conntrack
    hit of a non-SYN packet does), not followed to the gone backend nor dropped."""
    build = _syn_build(lab, "xdp-syn")
    sport = 49150
    key = ct_key(CLIENT4, VIP, sport, 80, TCP_P)
    held = _hold_probes(lab, key)
    run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    entry = bytearray(lru_entry(lab, key))
    fields = list(D.CT_ENTRY.unpack(bytes(entry)))
    fields[1] = 0xFFFFFF  # backend id: an index no backend holds
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as m:
        m.update(key, D.CT_ENTRY.pack(*fields))
    with SlotTable.open(lab.pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        for idx in held:
            t.free(idx)
    _v, _out, d = run_counted(lab, "xdp", build, frame(lab, CLIENT4, VIP, sport, 80, TCP_P))
    assert d.get("stale_backend") == 1 and d.get("new_snat") == 1, d
    assert slot_entry(lab, key) is not None
