"""The SNAT port table (lib/nat.h KPR_SNAT_PORT_TABLE): the reply side of a new NodePort SNAT
flow is a kpr_snat_ports slot indexed by its SNAT port, found by a per-CPU cursor walking the
CPU's own share of the range; a slot is free once its flow's conntrack entry is gone or
expired. Table-driven (Katran-style fixtures) with BPF_PROG_TEST_RUN on the XDP and tc builds,
in a lab whose range is four ports, so the CPU running the test owns two of them: a new flow
and its reply translated back, the share filling up (refused, drop_snat_no_port), a port taken
again only after its flow expired, and replies to a port whose slot belongs to another flow.
The same table on a build without the table fails (a random free port, no refusal). A build
without the table keeps the table's flows (their replies, their ports), and a run of
long-lived flows is passed by a new flow's far try (a wider lab range)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from kpr.bpf import maps as M
from kpr.nodeport import datapath as ND
from kpr.nodeport import gc as G
from kpr.testing.netns import in_netns
from kpr.testing.nodeport_bench import FILLER_BASE, MAC_NODE2, MAC_OUT, NODE4, ProgLab, ip4
from kpr.testing.prog_run import (
    TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_REDIRECT, Case, run_cases,
)

pytestmark = pytest.mark.kernel

FIRST, LAST = 62000, 62003  # the lab's SNAT range: four ports
FE = ip4(FILLER_BASE)  # a LoadBalancer frontend (port 80) of the lab with one remote backend
BACKEND = ip4(0x0AF50000 + 1)  # 10.245.0.1:8080 (ProgLab's first filler backend)
REDIRECT = {"xdp": XDP_REDIRECT, "tc": TC_ACT_REDIRECT}
DROP = {"xdp": XDP_DROP, "tc": TC_ACT_SHOT}
PASS = {"xdp": XDP_PASS, "tc": TC_ACT_UNSPEC & 0xFFFFFFFF}


def _share() -> list[int]:
    """The SNAT ports of the range the CPU this test runs on allocates from (lib/nat.h: CPU c
    takes offsets c, c + KPR_SNAT_CPUS, ...)."""
    cpus = ND.possible_cpus()
    me = os.sched_getaffinity(0)
    cpu = min(me) if len(me) == 1 else None
    assert cpu is not None, "pinned to one CPU by the fixture"
    return [FIRST + off for off in range(LAST - FIRST + 1) if off % min(cpus, LAST - FIRST + 1) == cpu % cpus]


# the table is a build switch, off by default (lib/nat.h says why): these builds turn it on
ON = ["-DKPR_SNAT_PORT_TABLE=1"]

@pytest.fixture(scope="module")
def lab() -> Iterator[ProgLab]:
    from kpr.testing import kernel_skip_reason

    if reason := kernel_skip_reason():
        pytest.skip(reason)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})  # test runs execute on the calling CPU: one share throughout
    try:
        with ProgLab(4) as pl:
            for hook in ("xdp", "tc"):
                for name, flags in ((hook, ON), (f"{hook}-off", ["-DKPR_SNAT_PORT_TABLE=0"])):
                    _load(pl, hook, name, flags)
            yield pl
    finally:
        os.sched_setaffinity(0, old)


def _load(pl: ProgLab, hook: str, name: str, flags: list[str], ports: tuple[int, int] = (FIRST, LAST)) -> None:
    """ProgLab.load with the lab's SNAT range (four ports unless told)."""
    from kpr.plugins.tc_nodeport import datapath as TD
    from kpr.plugins.xdp_nodeport import datapath as XD

    cls = XD.Datapath if hook == "xdp" else TD.Datapath
    dp = cls(pl.pin, mode="snat", snat_ports=ports, extra_cflags=flags).load()
    pl.builds[name] = dp
    dp.set_devices({pl.ifindex: (NODE4, None)}, (NODE4, None))
    dp.set_device_kinds(pl.kinds)
    dp.set_node_addresses([NODE4])
    dp.set_vips([FE])
    dp.set_frontend_ports([(80, 6)])
    dp.invalidate_next_hops()


def _reset(lab: ProgLab) -> None:
    """No flows, free slots, and every build's cursors at the start of their shares."""
    lab.flush_flows()
    for name, dp in lab.builds.items():
        if not name.endswith("-off"):
            dp.bpf[b"kpr_snat_cursor"].clear()
    with M.BpfMap.open_pinned(lab.pin / ND.SNAT_PORTS_MAP) as m:
        for port in range(FIRST, LAST + 1):
            m.update(M.U32.pack(ND.snat_port_slot(6, M.addr_to_bytes(BACKEND), port)), bytes(ND.SNAT_PORT.size))


def syn(lab: ProgLab, client: str, sport: int) -> Ether:
    return Ether(src=MAC_OUT, dst=lab.mac) / IP(src=client, dst=FE) / TCP(sport=sport, dport=80, flags="S") / Raw(b"kpr")


def reply(lab: ProgLab, port: int, bport: int = 8080) -> Ether:
    return Ether(src=MAC_NODE2, dst=lab.mac) / IP(src=BACKEND, dst=NODE4) / TCP(sport=bport, dport=port, flags="SA") / Raw(b"ok")


def snat_to(port: int) -> Any:
    def check(out: Ether) -> None:
        assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (NODE4, port, BACKEND, 8080), out.summary()
    return check


def back_to(client: str, cport: int) -> Any:
    def check(out: Ether) -> None:
        assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (FE, 80, client, cport), out.summary()
    return check


def run(lab: ProgLab, hook: str, build: str, cases: list[Case]) -> dict[str, int]:
    """The cases in order on one build; the counters that moved."""
    dp = lab.builds[build]
    before = dp.stats()
    for c in cases:  # xdp_md: data_end is the frame's length
        c.ctx = lab.ctx(hook) if hook == "tc" else struct.pack("=6I", 0, len(bytes(c.packet)), 0, lab.ifindex, 0, 0)
    with in_netns(lab.lb_path):
        run_cases(lab.entry(hook, build), cases, kind=hook)
    after = dp.stats()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _expire(lab: ProgLab, client: str, sport: int) -> None:
    """Age a flow's conntrack entry past its timeout (a SYN never answered: 60 s)."""
    key = ND.CT_KEY.pack(M.addr_to_bytes(client), M.addr_to_bytes(FE), M.htons(sport), M.htons(80), 6, ND.CT_DIR_ORIGINAL, 0)
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as ct:
        v = list(ND.CT_ENTRY.unpack(ct.lookup(key)))
        v[0] = G.now_ns() - 2 * G.TCP_SYN_TIMEOUT_NS
        ct.update(key, ND.CT_ENTRY.pack(*v))


def table(lab: ProgLab, hook: str, build: str) -> dict[str, int]:
    a, b = _share()[:2]
    r, d, p = REDIRECT[hook], DROP[hook], PASS[hook]
    moved = run(lab, hook, build, [
        Case("new flow A: the first port of the CPU's share", syn(lab, "192.0.2.1", 1001), r, snat_to(a)),
        Case("A's reply: back to A's client, from the frontend", reply(lab, a), r, back_to("192.0.2.1", 1001)),
        Case("new flow B: the next port of the share", syn(lab, "192.0.2.2", 1002), r, snat_to(b)),
        Case("new flow C: the share is full (A and B live), refused", syn(lab, "192.0.2.3", 1003), d, None),
        Case("a reply to A's port from another backend port: another flow's slot, not ours", reply(lab, a, 8081),
             p, reply(lab, a, 8081)),
    ])
    _expire(lab, "192.0.2.1", 1001)
    moved2 = run(lab, hook, build, [
        Case("new flow D after A expired: A's port again", syn(lab, "192.0.2.4", 1004), r, snat_to(a)),
        Case("a reply to that port now goes to D's client", reply(lab, a), r, back_to("192.0.2.4", 1004)),
        Case("B's reply still goes to B", reply(lab, b), r, back_to("192.0.2.2", 1002)),
    ])
    return {k: moved.get(k, 0) + moved2.get(k, 0) for k in {*moved, *moved2}}


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_ports_come_from_the_cpus_share_and_free_only_when_their_flow_is_gone(lab: ProgLab, hook: str) -> None:
    _reset(lab)
    moved = table(lab, hook, hook)
    assert moved["new_snat"] == 4 and moved["drop_snat_no_port"] == 1 and moved["reply_snat"] == 3, moved
    # the reply sides are slots, not kpr_snat entries
    with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as sn:
        assert list(sn.keys()) == []
    a = _share()[0]
    with M.BpfMap.open_pinned(lab.pin / ND.SNAT_PORTS_MAP) as m:
        slot = ND.SNAT_PORT.unpack(m.lookup(M.U32.pack(ND.snat_port_slot(6, M.addr_to_bytes(BACKEND), a))))
    stamp, client, cport, fport, bport, proto, _pad, fe, be, nat = slot
    assert stamp and (client, cport, fport, bport, proto) == (M.addr_to_bytes("192.0.2.4"), M.htons(1004), M.htons(80),
                                                              M.htons(8080), 6)
    assert (fe, be, nat) == (M.addr_to_bytes(FE), M.addr_to_bytes(BACKEND), M.addr_to_bytes(NODE4))


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_the_table_fails_on_a_build_without_the_port_table(lab: ProgLab, hook: str) -> None:
    """kpr_snat's random ports: not the share's order, and no refusal while ports are free."""
    _reset(lab)
    with pytest.raises(AssertionError):
        table(lab, hook, f"{hook}-off")


def test_the_collector_frees_the_slots_of_flows_that_ended(lab: ProgLab) -> None:
    """gc.py clears a slot whose conntrack flow expired (its replies are no longer translated)
    and keeps the slots of live flows; counted as freed SNAT ports."""
    _reset(lab)
    a, b = _share()[:2]
    run(lab, "xdp", "xdp", [
        Case("flow A", syn(lab, "192.0.2.1", 1001), XDP_REDIRECT, snat_to(a)),
        Case("flow B", syn(lab, "192.0.2.2", 1002), XDP_REDIRECT, snat_to(b)),
    ])
    _expire(lab, "192.0.2.1", 1001)
    dp = lab.builds["xdp"]
    maps = {n: M.BpfMap.open_pinned(lab.pin / n) for n in ("kpr_ct", "kpr_snat", "kpr_backend", ND.REV_MAP, ND.SNAT_PORTS_MAP)}
    try:
        col = G.Collector(maps, lambda *_a: None, lambda: {M.addr_to_bytes(NODE4)}, 60)
        res = col.run()
    finally:
        for m in maps.values():
            m.close()
    assert res.ct_expired == 1 and res.snat_freed == 1, res
    assert col.totals.snat_entries == 1
    moved = run(lab, "xdp", "xdp", [
        Case("A's reply after collection: not ours", reply(lab, a), XDP_PASS, reply(lab, a)),
        Case("B's reply: still translated", reply(lab, b), XDP_REDIRECT, back_to("192.0.2.2", 1002)),
    ])
    assert moved.get("reply_snat") == 1, moved
    assert dp is lab.builds["xdp"]


def test_explain_names_the_flows_snat_port_and_its_reply_slot(lab: ProgLab) -> None:
    """`kpr explain` on a tracked SNAT flow: the SNAT address and port from its conntrack entry,
    and where its replies are found (its kpr_snat_ports slot; none once the slot went to
    another flow)."""
    from kpr.explain import explain, parse_target

    _reset(lab)
    a = _share()[0]
    run(lab, "xdp", "xdp", [Case("flow A", syn(lab, "192.0.2.1", 1001), XDP_REDIRECT, snat_to(a))])

    def snat() -> Any:
        out = explain(lab.pin, parse_target(f"{FE}:80/tcp"), source="192.0.2.1", sport=1001, via="device", device="eth0")
        assert out["by"] == "conntrack", out
        return out["snat"], out["steps"][-1]

    got, step = snat()
    assert got == {"address": NODE4, "port": a, "replies": "kpr_snat_ports"} and "kpr_snat_ports" in step
    with M.BpfMap.open_pinned(lab.pin / ND.SNAT_PORTS_MAP) as m:  # the slot taken by another backend port's flow
        key = M.U32.pack(ND.snat_port_slot(6, M.addr_to_bytes(BACKEND), a))
        v = list(ND.SNAT_PORT.unpack(m.lookup(key)))
        v[4] = M.htons(8081)
        m.update(key, ND.SNAT_PORT.pack(*v))
    assert snat()[0]["replies"] is None


def test_a_flow_an_earlier_build_began_keeps_its_port(lab: ProgLab) -> None:
    """A flow a build without the port table began (conntrack entry with the SNAT port, a
    kpr_snat reverse entry with client and frontend; written here as that build writes them)
    is adopted into its slot (gc.adopt_reverse_entries, run by the datapath's load and each
    collector pass): a new flow to the same backend skips its port, and its replies still
    reach its client. Without the adoption the new flow took that port."""
    _reset(lab)
    a, b = _share()[:2]
    old_client, fe, be, node = (M.addr_to_bytes(x) for x in ("192.0.2.9", FE, BACKEND, NODE4))
    with M.BpfMap.open_pinned(lab.pin / "kpr_backend") as bm:
        bid = next(i for i, v in M.backend_ids(bm) if M.BACKEND.unpack(v)[:2] == (be, M.htons(8080)))
    with M.BpfMap.open_pinned(lab.pin / "kpr_svc") as sm:
        rev_nat = next(M.SVC_VAL.unpack(v)[3] for k, v in sm.items()
                       if M.SVC_KEY.unpack(k)[:3] == (fe, M.htons(80), 6) and M.SVC_KEY.unpack(k)[4] == 0)
    now = G.now_ns()
    with M.BpfMap.open_pinned(lab.pin / "kpr_ct") as ct:
        ct.update(ND.CT_KEY.pack(old_client, fe, M.htons(1009), M.htons(80), 6, ND.CT_DIR_ORIGINAL, 0),
                  ND.CT_ENTRY.pack(now, bid, rev_nat, ND.CT_F_NODE_PORT | ND.CT_F_SNAT, 0, 0, M.htons(a), 0, node))
    with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as sn, M.BpfMap.open_pinned(lab.pin / ND.SNAT_PORTS_MAP) as ports:
        sn.update(ND.CT_KEY.pack(be, node, M.htons(8080), M.htons(a), 6, ND.CT_DIR_REPLY, 0),
                  ND.NAT_ENTRY.pack(old_client, M.htons(1009), M.htons(80), 0, now, fe))
        assert G.adopt_reverse_entries(sn, ports) == 1
    run(lab, "xdp", "xdp", [
        Case("a new flow to the same backend: not the old flow's port", syn(lab, "192.0.2.1", 1001), XDP_REDIRECT,
             snat_to(b)),
        Case("the old flow's reply: still to its client", reply(lab, a), XDP_REDIRECT, back_to("192.0.2.9", 1009)),
    ])


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_a_build_without_the_table_keeps_the_tables_flows(lab: ProgLab, hook: str) -> None:
    """A build without the table (KPR_SNAT_PORT_TABLE=0, e.g. the switch turned off on a running
    node) still translates the replies of flows a build with it began, and gives none of their
    ports to a new flow to the same backend (a random kpr_snat port whose slot would take the
    new flow's replies refuses the flow: its client's next try draws again). Before: their
    replies were passed untranslated, and a new flow took their port half the time here."""
    _reset(lab)
    a, b = _share()[:2]
    r = REDIRECT[hook]
    run(lab, hook, hook, [
        Case("flow A on the build with the table", syn(lab, "192.0.2.1", 1001), r, snat_to(a)),
        Case("flow B on the build with the table", syn(lab, "192.0.2.2", 1002), r, snat_to(b)),
    ])
    off = f"{hook}-off"
    run(lab, hook, off, [
        Case("A's reply on the build without the table: to A's client", reply(lab, a), r, back_to("192.0.2.1", 1001)),
        Case("B's reply likewise", reply(lab, b), r, back_to("192.0.2.2", 1002)),
    ])
    free = set(range(FIRST, LAST + 1)) - {a, b}
    got: list[int] = []

    def port_of(out: Ether) -> None:
        if out[TCP].sport >= FIRST:  # (a refused flow: DNAT done, its source untouched)
            got.append(out[TCP].sport)

    dp, refused = lab.builds[off], 0
    for i in range(8):  # each new flow a random pick of the four ports
        before = dp.stats()["drop_snat_no_port"]
        try:
            run(lab, hook, off, [Case(f"new flow {i}", syn(lab, f"192.0.2.{10 + i}", 2000 + i), r, port_of)])
        except AssertionError:
            pass
        refused += dp.stats()["drop_snat_no_port"] - before
        with M.BpfMap.open_pinned(lab.pin / "kpr_snat") as sn:  # its port free again for the next try
            sn.delete_many(list(sn.keys()))
    assert len(got) + refused == 8 and set(got) <= free, (got, refused, free)


WIDE = (62000, 62063)  # a range of 64 ports: 32 a CPU with two CPUs


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_a_run_of_long_lived_flows_is_passed_not_refused(lab: ProgLab, hook: str) -> None:
    """Flows opened together hold consecutive slots of the share; when the cursor comes round to
    them, a new flow's last try (half the share ahead) takes a free slot there. Before, the four
    tries were the next four slots: every new flow was refused until the cursor had crept past
    the run (a run of 8: two refused each round)."""
    name = f"{hook}-wide"
    if name not in lab.builds:
        _load(lab, hook, name, ON, WIDE)
    _reset(lab)
    with M.BpfMap.open_pinned(lab.pin / ND.SNAT_PORTS_MAP) as m:
        for port in range(WIDE[0], WIDE[1] + 1):
            m.update(M.U32.pack(ND.snat_port_slot(6, M.addr_to_bytes(BACKEND), port)), bytes(ND.SNAT_PORT.size))
    cpu = min(os.sched_getaffinity(0))
    share = [p for p in range(WIDE[0], WIDE[1] + 1) if (p - WIDE[0]) % ND.possible_cpus() == cpu % ND.possible_cpus()]
    r = REDIRECT[hook]
    run(lab, hook, name, [Case(f"long-lived flow {i}", syn(lab, f"192.0.2.{1 + i}", 1000 + i), r, snat_to(share[i]))
                          for i in range(8)])
    lab.builds[name].bpf[b"kpr_snat_cursor"].clear()  # the cursor come round to the run
    run(lab, hook, name, [
        Case("a new flow at the run: half the share ahead, not refused", syn(lab, "192.0.2.50", 1050), r,
             snat_to(share[16])),
        Case("the next one: the cursor moved past the 3 near tries only", syn(lab, "192.0.2.51", 1051), r,
             snat_to(share[19])),
        Case("and the next: the first free slot after the run", syn(lab, "192.0.2.52", 1052), r, snat_to(share[8])),
    ])
