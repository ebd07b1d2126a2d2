"""kpr_fe, kpr_svc's one-line copy (issue 14 item 6): lib/lb.h finds frontends there first and in
kpr_svc otherwise; kpr.servicemaps.fetable keeps every line what kpr_svc holds for its key."""

from __future__ import annotations

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

// [0] where the entry came from: 0 none, 1 kpr_fe, 2 kpr_svc; [1] its rev-NAT index; [2] the
// backend kpr_lb_pick_ids() picked (0: none)
BPF_ARRAY(test_out, __u32, 3);

int fe_test(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_fe_buf buf;
	__u32 zero = 0, one = 1, two = 2, from = 0, rev_nat = 0, bid = 0;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return XDP_PASS;
	svc = kpr_lb_lookup_into(&key, &pkt.t, 0, &buf);
	if (svc) {
		from = svc == &buf.val ? 1 : 2;
		rev_nat = svc->rev_nat;
		kpr_lb_pick_ids(&key, svc, &pkt.t, (void *)0, &bid, buf.ids);
	}
	test_out.update(&zero, &from);
	test_out.update(&one, &rev_nat);
	test_out.update(&two, &bid);
	return XDP_PASS;
}
"""

FROM_NONE, FROM_FE, FROM_SVC = 0, 1, 2


class FeProgram:
    def __init__(self, pin: Path, cflags: tuple[str, ...] = ()) -> None:
        self.b = compile_and_load(inline_includes(PROGRAM), cflags=M.cflags(pin) + list(cflags))
        self.fn = load_prog(self.b, "fe_test", "XDP")

    def lookup(self, vip: str, port: int) -> tuple[int, int]:
        pkt = Ether() / IP(src="198.51.100.1", dst=vip) / UDP(sport=40000, dport=port)
        test_run(self.fn.fd, bytes(pkt))
        t = self.b[b"test_out"]
        return t[t.Key(0)].value, t[t.Key(1)].value

    def picked(self) -> int:
        """The backend id the last lookup's pick took (0: none)."""
        t = self.b[b"test_out"]
        return t[t.Key(2)].value


def svc(name: str, vip: str, port: int, backend: str = "10.1.0.1") -> Service:
    fe = Frontend(FrontendType.CLUSTER_IP, vip, port, Protocol.UDP, (Backend(backend, 53),))
    return Service(ServiceKey("default", name), (fe,))


def svc_key(vip: str, port: int) -> bytes:
    return M.SVC_KEY.pack(M.addr_to_bytes(vip), M.htons(port), 17, M.SCOPE_EXTERNAL, 0, 0)


def fe_line(pin: Path, key: bytes) -> tuple[int, bytes] | None:
    """(the line's index, its value) of `key` in the pinned kpr_fe, read as the programs probe."""
    m = M.BpfMap.open_pinned(pin / F.FE_MAP)
    try:
        h = F.fe_hash(key)
        for i in range(F.PROBES):
            idx = (h + i) & (F.LINES - 1)
            line = m.lookup(struct.pack("=I", idx))
            assert line is not None
            if line[F._KEY : F._VAL] == key:
                return idx, line[F._VAL : F._VAL + F.VAL_SIZE]
            if F._empty(line[F._KEY : F._VAL]):
                return None
        return None
    finally:
        m.close()


@pytest.fixture
def setup(kernel_headers: Path, pin_dir: Path) -> Iterator[tuple[FeProgram, ServiceMapWriter, Path]]:
    w = ServiceMapWriter(pin_dir).open()
    prog = FeProgram(pin_dir)
    try:
        yield prog, w, pin_dir
    finally:
        prog.b.cleanup()
        w.close()


def kpr_svc_items(pin: Path) -> dict[bytes, bytes]:
    m = M.BpfMap.open_pinned(pin / "kpr_svc")
    try:
        return dict(m.items())
    finally:
        m.close()


def test_the_program_reads_the_writers_line_first(setup: tuple[FeProgram, ServiceMapWriter, Path]) -> None:
    p, w, pin = setup
    w.upsert(svc("a", "10.96.0.10", 53))
    key = svc_key("10.96.0.10", 53)
    rev_nat = M.SVC_VAL.unpack(kpr_svc_items(pin)[key])[3]
    assert p.lookup("10.96.0.10", 53) == (FROM_FE, rev_nat)
    # Gone from kpr_svc behind the writer's back: the line still answers (it is read first) ...
    raw = M.BpfMap.open_pinned(pin / "kpr_svc")
    try:
        raw.delete(key)
        assert p.lookup("10.96.0.10", 53) == (FROM_FE, rev_nat)
        # ... and a line being written (odd sequence word) is left for kpr_svc.
        idx, _ = fe_line(pin, key) or (None, b"")
        assert idx is not None
        fe = w.maps["kpr_svc"].fe  # type: ignore[attr-defined]
        seq = struct.unpack_from("=I", fe.mem, idx * F.LINE)[0]
        struct.pack_into("=I", fe.mem, idx * F.LINE, seq + 1)
        assert p.lookup("10.96.0.10", 53) == (FROM_NONE, 0)
        struct.pack_into("=I", fe.mem, idx * F.LINE, seq + 2)
        assert p.lookup("10.96.0.10", 53) == (FROM_FE, rev_nat)
    finally:
        raw.close()
    # The writer's deletion takes the line away first.
    w.delete(ServiceKey("default", "a"))
    assert fe_line(pin, key) is None
    assert p.lookup("10.96.0.10", 53) == (FROM_NONE, 0)


def test_every_line_holds_what_kpr_svc_holds_through_updates(
    setup: tuple[FeProgram, ServiceMapWriter, Path],
) -> None:
    p, w, pin = setup
    for i in range(40):
        w.upsert(svc(f"s{i}", f"10.96.1.{i}", 53))
    for i in range(0, 40, 3):
        w.upsert(svc(f"s{i}", f"10.96.1.{i}", 53, backend="10.1.0.9"))  # a new backend: a new slot range
    for i in range(1, 40, 4):
        w.delete(ServiceKey("default", f"s{i}"))
    items = kpr_svc_items(pin)
    assert len(items) == 30
    for k, v in items.items():
        got = fe_line(pin, k)
        assert got is not None and got[1] == v
    for i in range(40):
        want = items.get(svc_key(f"10.96.1.{i}", 53))
        assert p.lookup(f"10.96.1.{i}", 53) == ((FROM_FE, M.SVC_VAL.unpack(want)[3]) if want else (FROM_NONE, 0))


def test_a_deleted_line_keeps_the_probe_run_whole(setup: tuple[FeProgram, ServiceMapWriter, Path]) -> None:
    p, w, pin = setup
    # two frontends whose keys hash to the same line: the second takes the next one
    first = svc_key("10.96.2.1", 53)
    h = F.fe_hash(first) & (F.LINES - 1)
    port = next(x for x in range(1, 65536) if F.fe_hash(svc_key("10.96.2.2", x)) & (F.LINES - 1) == h)
    w.upsert(svc("first", "10.96.2.1", 53))
    w.upsert(svc("second", "10.96.2.2", port))
    second = svc_key("10.96.2.2", port)
    assert (fe_line(pin, first) or (None,))[0] == h
    assert (fe_line(pin, second) or (None,))[0] == (h + 1) & (F.LINES - 1)
    w.delete(ServiceKey("default", "first"))
    assert p.lookup("10.96.2.1", 53) == (FROM_NONE, 0)
    assert p.lookup("10.96.2.2", port)[0] == FROM_FE  # found past the deleted line, not in kpr_svc


def test_a_restart_rebuilds_the_table_from_kpr_svc(kernel_headers: Path, pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(svc("a", "10.96.3.1", 53))
        w.upsert(svc("b", "10.96.3.2", 53))
    # kpr_svc changed while no writer ran (the lines are stale now)
    raw = M.BpfMap.open_pinned(pin_dir / "kpr_svc")
    try:
        raw.delete(svc_key("10.96.3.1", 53))
        k2 = svc_key("10.96.3.2", 53)
        v2 = bytearray(raw.lookup(k2) or b"")
        struct.pack_into("=I", v2, 8, 4242)  # rev_nat
        raw.update(k2, bytes(v2))
    finally:
        raw.close()
    prog = FeProgram(pin_dir)
    try:
        assert prog.lookup("10.96.3.1", 53)[0] == FROM_FE  # stale, before the writer runs again
        with ServiceMapWriter(pin_dir):
            assert fe_line(pin_dir, svc_key("10.96.3.1", 53)) is None
            assert prog.lookup("10.96.3.1", 53) == (FROM_NONE, 0)
            assert prog.lookup("10.96.3.2", 53) == (FROM_FE, 4242)
    finally:
        prog.b.cleanup()


def test_a_writer_that_keeps_no_copy_empties_the_one_left_pinned(kernel_headers: Path, pin_dir: Path) -> None:
    # an agent that ran with a NodePort plugin, then one without (kpr.pluginmanager): a program
    # still attached from the first run must not read the first run's lines
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(svc("a", "10.96.4.1", 53))
    prog = FeProgram(pin_dir)
    try:
        assert prog.lookup("10.96.4.1", 53)[0] == FROM_FE
        with ServiceMapWriter(pin_dir, frontend_table=False) as w:
            assert "fe" not in vars(w.maps["kpr_svc"])  # the map itself, unwrapped
            assert not (pin_dir / F.FE_MAP).exists()  # emptied, then unpinned
            assert prog.lookup("10.96.4.1", 53)[0] == FROM_SVC  # (the program's map is empty)
            w.upsert(svc("b", "10.96.4.2", 53))
            assert prog.lookup("10.96.4.2", 53)[0] == FROM_SVC
    finally:
        prog.b.cleanup()


def test_a_table_created_beside_a_full_kpr_svc_gets_every_line(kernel_headers: Path, pin_dir: Path) -> None:
    # kpr_svc written with no copy (an older kpr, or no NodePort plugin), then a writer that
    # keeps one: the new table is written from kpr_svc without reading its empty lines
    with ServiceMapWriter(pin_dir, frontend_table=False) as w:
        for i in range(40):
            w.upsert(svc(f"s{i}", f"10.96.5.{i}", 53))
    assert not (pin_dir / F.FE_MAP).exists()
    with ServiceMapWriter(pin_dir) as w:
        fe = w.maps["kpr_svc"].fe  # type: ignore[attr-defined]
        assert not fe.fresh  # (rebuilt)
        first = bytes(fe.mem[: F.LINES * F.LINE])
        items = kpr_svc_items(pin_dir)
        assert len(items) == 40
        for k, v in items.items():
            got = fe_line(pin_dir, k)
            assert got is not None and got[1] == v
    with ServiceMapWriter(pin_dir) as w:  # adopted: a full comparison changes nothing
        assert bytes(w.maps["kpr_svc"].fe.mem[: F.LINES * F.LINE]) == first  # type: ignore[attr-defined]


def test_a_cpu_without_x86s_memory_order_keeps_no_copy(kernel_headers: Path, pin_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the sequence word relies on stores and loads staying in program order (fetable's docstring)
    monkeypatch.setattr(F.platform, "machine", lambda: "aarch64")
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(svc("a", "10.96.6.1", 53))
        assert "fe" not in vars(w.maps["kpr_svc"])
    assert not (pin_dir / F.FE_MAP).exists()


def check_scanned(w: ServiceMapWriter) -> int:
    """w.check()'s repairs, after asserting that it read kpr_fe whole once (a repair's rebuild
    compares against the check's reading: only the writer writes the table)."""
    fe = w.maps["kpr_svc"].fe  # type: ignore[attr-defined]
    before = fe.scans
    n = w.check()
    assert fe.scans - before == 1
    return n


def test_the_periodic_check_repairs_a_line_that_disagrees_with_kpr_svc(
    setup: tuple[FeProgram, ServiceMapWriter, Path],
) -> None:
    p, w, pin = setup
    w.upsert(svc("a", "10.96.7.1", 53))
    w.upsert(svc("b", "10.96.7.2", 53))
    ka, kb = svc_key("10.96.7.1", 53), svc_key("10.96.7.2", 53)
    items = kpr_svc_items(pin)
    rev_a = M.SVC_VAL.unpack(items[ka])[3]
    assert w.check() == 0
    fe = w.maps["kpr_svc"].fe  # type: ignore[attr-defined]
    ia, _ = fe_line(pin, ka) or (None, b"")
    ib, _ = fe_line(pin, kb) or (None, b"")
    assert ia is not None and ib is not None
    # by hand: a's line gets another value (a whole, even line), b's line is left odd
    stale = bytearray(items[ka])
    struct.pack_into("=I", stale, 8, 4343)  # rev_nat
    fe._write(ia, ka, bytes(stale))
    seq = struct.unpack_from("=I", fe.mem, ib * F.LINE)[0]
    struct.pack_into("=I", fe.mem, ib * F.LINE, seq + 1)
    assert p.lookup("10.96.7.1", 53) == (FROM_FE, 4343)
    assert check_scanned(w) == 2
    assert p.lookup("10.96.7.1", 53) == (FROM_FE, rev_a)
    assert p.lookup("10.96.7.2", 53)[0] == FROM_FE
    assert check_scanned(w) == 0
    fe.drop(ka)  # a's line gone by hand: found in kpr_svc until the check puts it back
    assert p.lookup("10.96.7.1", 53) == (FROM_SVC, rev_a)
    assert check_scanned(w) == 1
    assert p.lookup("10.96.7.1", 53) == (FROM_FE, rev_a)


# ---------------------------------------------------------------------- the slots' backend ids


def line_ids(pin: Path, key: bytes) -> tuple[int, ...]:
    """The backend ids `key`'s kpr_fe line holds (lib/maps.h kpr_fe_line.ids)."""
    got = fe_line(pin, key)
    assert got is not None
    m = M.BpfMap.open_pinned(pin / F.FE_MAP)
    try:
        line = m.lookup(struct.pack("=I", got[0])) or b""
    finally:
        m.close()
    return struct.unpack_from(f"={F.IDS}I", line, F._IDS)


def slot_ids(pin: Path, key: bytes, n: int) -> tuple[int, ...]:
    """kpr_slots' backend ids of `key`'s first n slots."""
    base = M.SVC_VAL.unpack(kpr_svc_items(pin)[key])[0]
    m = M.BpfMap.open_pinned(pin / "kpr_slots")
    try:
        return tuple(struct.unpack("=I", (m.lookup(struct.pack("=I", base + i)) or b"")[:4])[0] for i in range(n))
    finally:
        m.close()


def set_slot(pin: Path, key: bytes, bid: int) -> None:
    """kpr_slots' slot 1 of `key` names backend `bid`, written behind the writer's back."""
    base = M.SVC_VAL.unpack(kpr_svc_items(pin)[key])[0]
    m = M.BpfMap.open_pinned(pin / "kpr_slots")
    try:
        m.update(struct.pack("=I", base), struct.pack("=II", bid, 0))
    finally:
        m.close()


def many(name: str, vip: str, n: int) -> Service:
    bes = tuple(Backend(f"10.1.1.{i}", 53) for i in range(1, n + 1))
    return Service(ServiceKey("default", name), (Frontend(FrontendType.CLUSTER_IP, vip, 53, Protocol.UDP, bes),))


@dataclass
class Two:
    """Services a (backend 10.1.0.1) at A_VIP and b (10.1.0.2) at B_VIP, written, with the
    program: their keys and backend ids."""

    p: FeProgram
    w: ServiceMapWriter
    pin: Path
    ka: bytes
    kb: bytes
    id_a: int
    id_b: int

    @property
    def fe(self) -> F.FeTable:
        return self.w.maps["kpr_svc"].fe  # type: ignore[attr-defined]

    def a_repaired_in_place(self) -> None:
        """The repair (a rollback's, or the first half of check()) rewrites a's range where it
        lies, a's kpr_svc entry unchanged: its line follows at once, not only at the next line
        comparison, and the program picks a's backend through it."""
        base = M.SVC_VAL.unpack(kpr_svc_items(self.pin)[self.ka])[0]
        assert self.w._repair() >= 1
        assert M.SVC_VAL.unpack(kpr_svc_items(self.pin)[self.ka])[0] == base
        assert slot_ids(self.pin, self.ka, 1) == (self.id_a,)
        assert line_ids(self.pin, self.ka)[0] == self.id_a
        assert self.p.lookup(A_VIP, 53)[0] == FROM_FE
        assert self.p.picked() == self.id_a


A_VIP, B_VIP = "10.96.9.1", "10.96.9.2"


@pytest.fixture
def two(setup: tuple[FeProgram, ServiceMapWriter, Path]) -> Two:
    p, w, pin = setup
    w.upsert(svc("a", A_VIP, 53, backend="10.1.0.1"))
    w.upsert(svc("b", B_VIP, 53, backend="10.1.0.2"))
    ka, kb = svc_key(A_VIP, 53), svc_key(B_VIP, 53)
    return Two(p, w, pin, ka, kb, slot_ids(pin, ka, 1)[0], slot_ids(pin, kb, 1)[0])


def test_a_line_holds_its_first_slots_backend_ids(setup: tuple[FeProgram, ServiceMapWriter, Path]) -> None:
    _p, w, pin = setup
    w.upsert(svc("one", "10.96.8.1", 53))
    w.upsert(many("six", "10.96.8.6", 6))
    one, six = svc_key("10.96.8.1", 53), svc_key("10.96.8.6", 53)
    assert line_ids(pin, one) == slot_ids(pin, one, 1) + (0,) * (F.IDS - 1)
    assert 0 not in slot_ids(pin, six, 6)
    assert line_ids(pin, six) == slot_ids(pin, six, F.IDS)  # slots 5.. from kpr_slots


def test_the_pick_takes_the_lines_backend_id_and_kpr_slots_without_a_line(two: Two) -> None:
    p, pin, ka, id_a, id_b = two.p, two.pin, two.ka, two.id_a, two.id_b
    p.lookup(A_VIP, 53)
    assert p.picked() == id_a
    # kpr_slots changed by hand: the line's id is what the pick takes (no kpr_slots read) ...
    set_slot(pin, ka, id_b)
    assert p.lookup(A_VIP, 53)[0] == FROM_FE
    assert p.picked() == id_a
    # ... and an entry found in kpr_svc (its line being written) reads kpr_slots
    idx, _ = fe_line(pin, ka) or (None, b"")
    assert idx is not None
    seq = struct.unpack_from("=I", two.fe.mem, idx * F.LINE)[0]
    struct.pack_into("=I", two.fe.mem, idx * F.LINE, seq + 1)
    assert p.lookup(A_VIP, 53)[0] == FROM_SVC
    assert p.picked() == id_b
    struct.pack_into("=I", two.fe.mem, idx * F.LINE, seq + 2)
    # the check repairs the range in place, and the line keeps (or gets) the repaired id
    assert two.w.check() >= 1
    assert slot_ids(pin, ka, 1) == (id_a,)
    p.lookup(A_VIP, 53)
    assert p.picked() == id_a


def test_a_range_repaired_in_place_rewrites_the_ids_of_its_lines(two: Two) -> None:
    # a's range changed by hand, and its line with it (as a restart's rebuild takes what the
    # maps hold): the line agrees with kpr_slots, both wrong
    set_slot(two.pin, two.ka, two.id_b)
    two.fe.refresh([two.ka])
    assert line_ids(two.pin, two.ka)[0] == two.id_b
    two.a_repaired_in_place()


def test_the_periodic_check_repairs_a_line_whose_ids_disagree_with_kpr_slots(two: Two) -> None:
    p, w, pin, ka = two.p, two.w, two.pin, two.ka
    assert w.check() == 0
    idx, val = fe_line(pin, ka) or (None, b"")
    assert idx is not None
    two.fe._write(idx, ka, val, struct.pack(f"={F.IDS}I", two.id_b, *[0] * (F.IDS - 1)))  # by hand
    p.lookup(A_VIP, 53)
    assert p.picked() == two.id_b
    assert check_scanned(w) == 1
    assert line_ids(pin, ka)[0] == two.id_a
    p.lookup(A_VIP, 53)
    assert p.picked() == two.id_a


def test_a_repair_of_overlapping_ranges_rewrites_the_lines_of_a_range_rewritten_where_it_lies(two: Two) -> None:
    pin, ka, kb = two.pin, two.ka, two.kb
    # by hand: b's entry points at a's range, which names b's backend; then a restart's
    # rebuild takes what the maps hold (both lines: b's id)
    a_base = M.SVC_VAL.unpack(kpr_svc_items(pin)[ka])[0]
    m = M.BpfMap.open_pinned(pin / "kpr_svc")
    try:
        m.update(kb, M.SVC_VAL.pack(a_base, *M.SVC_VAL.unpack(kpr_svc_items(pin)[kb])[1:]))
    finally:
        m.close()
    set_slot(pin, ka, two.id_b)
    two.fe.rebuild(kpr_svc_items(pin).items())
    assert line_ids(pin, ka)[0] == two.id_b
    # the repair finds the ranges overlapping and rewrites a's where it lies
    two.a_repaired_in_place()
    two.p.lookup(B_VIP, 53)
    assert two.p.picked() == two.id_b


def test_the_pick_follows_a_frontends_backends_through_its_line(setup: tuple[FeProgram, ServiceMapWriter, Path]) -> None:
    # ordinary changes (another backend, more of them, none left): the line's ids follow
    # every one, as the programs read them
    p, w, pin = setup
    key = svc_key("10.96.13.1", 53)
    for backend in ("10.1.0.1", "10.1.0.2"):
        w.upsert(svc("a", "10.96.13.1", 53, backend=backend))
        assert p.lookup("10.96.13.1", 53)[0] == FROM_FE
        assert p.picked() == slot_ids(pin, key, 1)[0]
        assert line_ids(pin, key)[0] == slot_ids(pin, key, 1)[0]
    w.upsert(many("a", "10.96.13.1", 3))
    assert line_ids(pin, key)[:3] == slot_ids(pin, key, 3)
    picks = set()
    for _ in range(64):
        assert p.lookup("10.96.13.1", 53)[0] == FROM_FE
        picks.add(p.picked())
    assert picks <= set(slot_ids(pin, key, 3)) and len(picks) > 1
