"""The collector's marking of kpr_snat_gate (lib/nat.h: while the gate is shut a slot claim also
looks in kpr_snat; marked clean, it does not). The gate may be marked clean only when kpr_snat
holds no reverse entry: README issue 14, H1's SNAT slots reviewed (R3 item 4)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.bpf import ctclock
from kpr.bpf import maps as M
from kpr.nodeport import datapath as D
from kpr.nodeport import tables as T
from kpr.nodeport.gc import GRACE_NS, Collector

pytestmark = pytest.mark.kernel

NODE, CLIENT, BACKEND = "10.0.0.1", "192.0.2.10", "10.244.1.5"


@pytest.fixture
def maps(require_kernel: None) -> Iterator[dict[str, M.BpfMap]]:
    """The collector's maps, fresh and unpinned (small: nothing else writes them)."""
    specs = M.specs_with({"kpr_ct": 1024, "kpr_snat": 1024, "kpr_backend": 1024})
    own = {s.name: s for s in T.specs(1024)}
    out: dict[str, M.BpfMap] = {}
    try:
        for name in ("kpr_ct", "kpr_snat", "kpr_backend"):
            out[name] = M.BpfMap.create(specs[name])
        for name in (D.REV_MAP, D.SNAT_GATE_MAP):
            out[name] = M.BpfMap.create(own[name])
        yield out
    finally:
        for m in out.values():
            m.close()


def _clean(gate: M.BpfMap) -> bool:
    mem = gate.mmap()
    try:
        overflows, clean = D.SNAT_GATE.unpack_from(mem)
    finally:
        mem.release()
    return clean == overflows + 1


def _collector(maps: dict[str, M.BpfMap]) -> Collector:
    return Collector(maps, lambda *a: None, lambda: {M.addr_to_bytes(NODE)}, 60)


def _forward(maps: dict[str, M.BpfMap], cport: int, nat_port: int, created: int) -> None:
    """A SNAT forward entry (a KPR_NP_SNAT_IN_CT=0 build's) whose reverse half is absent."""
    k = D.CT_KEY.pack(M.addr_to_bytes(CLIENT), M.addr_to_bytes(BACKEND), M.htons(cport), M.htons(8080), 17,
                      D.CT_DIR_ORIGINAL, 0)
    maps["kpr_snat"].update(k, D.NAT_ENTRY.pack(M.addr_to_bytes(NODE), M.htons(nat_port), 0, 0, created, bytes(16)))


def _reverse(maps: dict[str, M.BpfMap], cport: int, nat_port: int, created: int) -> bytes:
    k = D.CT_KEY.pack(M.addr_to_bytes(BACKEND), M.addr_to_bytes(NODE), M.htons(8080), M.htons(nat_port), 17,
                      D.CT_DIR_REPLY, 0)
    maps["kpr_snat"].update(k, D.NAT_ENTRY.pack(M.addr_to_bytes(CLIENT), M.htons(cport), M.htons(80), 0, created,
                                                M.addr_to_bytes("203.0.113.1")))
    return k


def test_the_gate_is_marked_clean_when_kpr_snat_holds_no_reverse_entry(maps: dict[str, M.BpfMap]) -> None:
    """A dead forward entry only (its reverse half absent): the collector deletes it, finds no
    reverse entry, marks the gate clean (the case the next test must tell apart). Failed before
    the mend too: the absent reply key counted as deleted, `left` was -1, never clean."""
    _forward(maps, 40001, 61001, ctclock.now_ns() - 10 * GRACE_NS)
    _collector(maps).run()
    assert len(list(maps["kpr_snat"].items())) == 0
    assert _clean(maps[D.SNAT_GATE_MAP])


def test_the_gate_stays_shut_while_a_reverse_entry_stays(maps: dict[str, M.BpfMap]) -> None:
    """A dead forward entry whose reverse half is absent, and a young reverse entry of an even
    port (kept: its conntrack entry may be being written): kpr_snat still holds a reverse entry,
    so a claim must still look there. Failed before the mend: `left` subtracted the dead forward
    entry's reply key, never in the dump, from the one reply seen, and marked the gate clean."""
    _forward(maps, 40001, 61001, ctclock.now_ns() - 10 * GRACE_NS)
    young = _reverse(maps, 40002, 61002, ctclock.now_ns())
    _collector(maps).run()
    assert maps["kpr_snat"].lookup(young) is not None, "the young reverse entry is kept"
    assert not _clean(maps[D.SNAT_GATE_MAP]), "the gate marked clean with a reverse entry in kpr_snat"


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_a_load_shuts_a_clean_gate(require_kernel: None, hook: str) -> None:
    """Upgrade (R3 item 5): pins reused, the gate marked clean by a collector while an older
    build's programs wrote even ports into kpr_snat uncounted: the new build's loader shuts it
    before its programs run. Failed before the mend (nothing reset the gate: still clean)."""
    from kpr.testing.nodeport_bench import ProgLab

    with ProgLab(2) as pl:
        pl.load(hook, f"{hook}: old")  # the pins, as a running kpr left them
        pl.builds.pop(f"{hook}: old").close()
        with M.BpfMap.open_pinned(pl.pin / D.SNAT_GATE_MAP) as g:
            D.snat_gate_clean(g, D.snat_gate_overflows(g))
            assert _clean(g)
            pl.load(hook, f"{hook}: new")
            assert not _clean(g), "the loader left the gate clean"


def test_an_odd_ports_reverse_entry_leaves_the_gate_clean(maps: dict[str, M.BpfMap]) -> None:
    """R3 item 6: only even ports are slots', so only their reverse entries in kpr_snat can meet
    a claim; a young odd port's (an overflow, an outgoing flow) lets the collector mark the gate
    clean. Failed before the mend (every reverse entry kept the gate shut)."""
    young = _reverse(maps, 40003, 61003, ctclock.now_ns())
    _collector(maps).run()
    assert maps["kpr_snat"].lookup(young) is not None
    assert _clean(maps[D.SNAT_GATE_MAP])
