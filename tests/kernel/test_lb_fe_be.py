"""kpr_fe_be, the backends of kpr_fe's lines (issue 14 item 6): lib/lb.h kpr_lb_pick_fe takes a
new flow's backend from its frontend line's record, not from kpr_backend, when the record copies
the id picked; kpr.servicemaps.fetable keeps every record what kpr_backend holds for its id."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from kpr.bpf import maps as M
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter
from kpr.servicemaps import fetable as F
from kpr.testing.prog_run import test_run

PROGRAM = r"""
#include "ctx/xdp.h"
#include "lib/parse.h"
#include "lib/lb.h"

// [0] the backend id picked (0: none), [1] its address's last word, [2] its port, [3] its
// flags, [4] 1: taken from the line's kpr_fe_be record, 0: from kpr_backend
BPF_ARRAY(test_out, __u32, 5);

int fe_be_test(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_fe_buf buf;
	struct kpr_backend out, *be = (void *)0;
	__u32 k0 = 0, k1 = 1, k2 = 2, k3 = 3, k4 = 4, bid = 0, addr = 0, port = 0, flags = 0, rec = 0;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return XDP_PASS;
	svc = kpr_lb_lookup_into(&key, &pkt.t, 0, &buf);
	if (svc)
		be = kpr_lb_pick_fe(&key, svc, &pkt.t, (void *)0, &bid, &buf, &out);
	if (be) {
		addr = be->addr.w[3];
		port = be->port;
		flags = be->flags;
		rec = be == &out;
	}
	test_out.update(&k0, &bid);
	test_out.update(&k1, &addr);
	test_out.update(&k2, &port);
	test_out.update(&k3, &flags);
	test_out.update(&k4, &rec);
	return XDP_PASS;
}
"""

VIP = "10.96.20.1"


@dataclass
class Picked:
    bid: int
    addr: str
    port: int
    flags: int
    from_record: bool


ON = ("-DKPR_LB_FE_BE=1",)  # (off by default: lib/maps.h)


class Program:
    def __init__(self, pin: Path, cflags: tuple[str, ...] = ON) -> None:
        self.b = compile_and_load(inline_includes(PROGRAM), cflags=M.cflags(pin) + list(cflags))
        self.fn = load_prog(self.b, "fe_be_test", "XDP")

    def pick(self, vip: str = VIP, port: int = 53) -> Picked:
        pkt = Ether() / IP(src="198.51.100.1", dst=vip) / UDP(sport=40000, dport=port)
        test_run(self.fn.fd, bytes(pkt))
        t = self.b[b"test_out"]
        v = [t[t.Key(i)].value for i in range(5)]
        return Picked(v[0], socket.inet_ntoa(struct.pack("=I", v[1])), socket.ntohs(v[2]), v[3], bool(v[4]))


def svc(backend: Backend, name: str = "a", vip: str = VIP) -> Service:
    return Service(ServiceKey("default", name), (Frontend(FrontendType.CLUSTER_IP, vip, 53, Protocol.UDP, (backend,)),))


def remote(addr: str = "10.1.0.1", port: int = 5353) -> Backend:
    return Backend(addr, port, node_name="other")


def local(addr: str = "10.1.0.1", port: int = 5353) -> Backend:
    return Backend(addr, port, node_name="this", local=True)


@pytest.fixture(autouse=True)
def records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent keeps kpr_fe_be, as it does when the header's default is on."""
    monkeypatch.setattr(F, "RECORDS", True)


@pytest.fixture
def lab(kernel_headers: Path, pin_dir: Path) -> Iterator[tuple[Program, ServiceMapWriter, Path]]:
    w = ServiceMapWriter(pin_dir).open()
    prog = Program(pin_dir)
    try:
        yield prog, w, pin_dir
    finally:
        prog.b.cleanup()
        w.close()


def poke_backend(pin: Path, bid: int, *, port: int | None = None, flags: int | None = None) -> None:
    """kpr_backend's entry of `bid` changed by hand (behind the writer's back)."""
    m = M.BpfMap.open_pinned(pin / "kpr_backend")
    try:
        k = struct.pack("=I", bid & 0xFFFFFF)
        v = bytearray(m.lookup(k) or b"")
        if port is not None:
            struct.pack_into("!H", v, 16, port)
        if flags is not None:
            v[20] = flags
        m.update(k, bytes(v))
    finally:
        m.close()


def fe(w: ServiceMapWriter) -> F.FeTable:
    return w.maps["kpr_svc"].fe  # type: ignore[attr-defined]


# (name, the backend written, what is changed by hand in kpr_backend, what the pick then reports:
# the record's copy, not kpr_backend's entry)
CASES = [
    ("port", remote(port=5353), {"port": 9999}, (5353, 0)),
    ("local flag", local(port=5353), {"flags": 0}, (5353, M.BACKEND_F_LOCAL)),
    ("remote flag", remote(port=5354), {"flags": M.BACKEND_F_LOCAL}, (5354, 0)),
]


@pytest.mark.parametrize("name,backend,poke,want", CASES, ids=[c[0] for c in CASES])
def test_the_pick_takes_the_lines_record_not_kpr_backend(
    lab: tuple[Program, ServiceMapWriter, Path], name: str, backend: Backend, poke: dict, want: tuple[int, int]
) -> None:
    p, w, pin = lab
    w.upsert(svc(backend))
    got = p.pick()
    assert got.bid and got.from_record and got.addr == "10.1.0.1" and (got.port, got.flags) == want
    poke_backend(pin, got.bid, **poke)
    again = p.pick()
    assert (again.bid, again.from_record, again.port, again.flags) == (got.bid, True) + want
    # the check puts the writer's value back into kpr_backend; the record agreed with it all along
    assert w.check() >= 1
    after = p.pick()
    assert (after.from_record, after.port, after.flags) == (True,) + want


def test_the_check_rewrites_a_record_that_disagrees_with_kpr_backend(lab: tuple[Program, ServiceMapWriter, Path]) -> None:
    p, w, _pin = lab
    w.upsert(svc(remote()))
    got = p.pick()
    assert w.check() == 0
    t = fe(w)
    assert t.rmem is not None
    line = next(iter(t._where[got.bid & 0xFFFFFF]))
    struct.pack_into("!H", t.rmem, line * F.RECS + 8, 7777)  # the record's port, by hand
    assert (p.pick().port, p.pick().from_record) == (7777, True)
    assert w.check() == 1
    assert (p.pick().port, p.pick().from_record) == (5353, True)
    assert w.check() == 0


def test_a_record_of_another_id_is_not_taken(lab: tuple[Program, ServiceMapWriter, Path]) -> None:
    p, w, pin = lab
    w.upsert(svc(remote()))
    got = p.pick()
    assert got.from_record
    t = fe(w)
    assert t.rmem is not None
    line = next(iter(t._where[got.bid & 0xFFFFFF]))
    at = line * F.RECS
    struct.pack_into("=I", t.rmem, at, got.bid + 1)  # the record names another id (being rewritten)
    other = p.pick()
    assert (other.bid, other.from_record, other.port) == (got.bid, False, 5353)  # kpr_backend's
    struct.pack_into("=I", t.rmem, at, 0)  # none
    assert not p.pick().from_record
    assert w.check() >= 1
    assert p.pick().from_record


def test_a_backend_changed_in_place_rewrites_its_records(lab: tuple[Program, ServiceMapWriter, Path]) -> None:
    # the same backend (address, port: the same id) moves node: its kpr_backend value changes in
    # place and every line listing it follows at once (backends_rewritten), not at the next check
    p, w, _pin = lab
    w.upsert(svc(remote(), "a", VIP))
    w.upsert(svc(remote(), "b", "10.96.20.2"))
    got = p.pick()
    assert got.from_record and got.flags == 0
    w.upsert(svc(local(), "a", VIP))
    w.upsert(svc(local(), "b", "10.96.20.2"))
    for vip in (VIP, "10.96.20.2"):
        now = p.pick(vip)
        assert (now.bid, now.from_record, now.flags) == (got.bid, True, M.BACKEND_F_LOCAL)


def test_an_ipv6_backend_has_no_record(lab: tuple[Program, ServiceMapWriter, Path]) -> None:
    p, w, _pin = lab
    w.upsert(svc(Backend("fd00::1", 5353, node_name="other")))
    got = p.pick()
    assert got.bid and not got.from_record


def test_the_switch_off_reads_kpr_backend(lab: tuple[Program, ServiceMapWriter, Path]) -> None:
    _p, w, pin = lab
    w.upsert(svc(remote()))
    off = Program(pin, ())  # (the default)
    try:
        got = off.pick()
        assert got.bid and not got.from_record
    finally:
        off.b.cleanup()


def test_pins_of_a_kpr_without_records_get_them(kernel_headers: Path, pin_dir: Path) -> None:
    # an upgrade: kpr_fe and kpr_backend pinned by a kpr that kept no kpr_fe_be
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(svc(remote()))
    (pin_dir / F.BE_MAP).unlink()
    prog = Program(pin_dir)  # (creates kpr_fe_be empty, as a program loaded first would)
    try:
        assert not prog.pick().from_record
        with ServiceMapWriter(pin_dir):
            got = prog.pick()
            assert got.from_record and got.port == 5353
    finally:
        prog.b.cleanup()


def test_a_writer_that_keeps_no_copy_empties_and_unpins_the_records(kernel_headers: Path, pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(svc(remote()))
    prog = Program(pin_dir)
    try:
        assert prog.pick().from_record
        with ServiceMapWriter(pin_dir, frontend_table=False):
            assert not (pin_dir / F.BE_MAP).exists()
            got = prog.pick()
            assert got.bid and not got.from_record
    finally:
        prog.b.cleanup()


def test_an_agent_that_keeps_no_records_empties_and_unpins_them(
    kernel_headers: Path, pin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # records kept by an earlier run, then an agent whose programs do not read them: a program
    # still attached from that run must not take a record nobody keeps current
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(svc(remote()))
    prog = Program(pin_dir)
    try:
        assert prog.pick().from_record
        monkeypatch.setattr(F, "RECORDS", False)
        with ServiceMapWriter(pin_dir) as w:
            assert fe(w).rmem is None
            assert not (pin_dir / F.BE_MAP).exists()
            got = prog.pick()
            assert got.bid and not got.from_record
    finally:
        prog.b.cleanup()


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_the_nodeport_programs_load_with_the_switch_on(require_kernel: None, hook: str) -> None:
    # (off by default, so not among the benchmarks' switch builds: the on build must still load)
    # new SNAT flows spread over the lab's filler frontends, each through its line's record
    from kpr.testing.nodeport_bench import ProgLab, cases, measure

    with ProgLab(10) as lab:
        lab.load(hook, "default")  # (measure() sets flows up with it)
        lab.load(hook, "fe_be", ON)
        spread = [c for c in cases(lab, hook) if c.spread][0]
        m = measure(lab, hook, "fe_be", spread, 16, 1, single=False)
        assert m.counted.get("new_snat", 0) == 16
