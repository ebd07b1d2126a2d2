"""kpr_np_nomode (lib/nodeport.h KPR_NP_NOMODE): a bit per port that no kpr_np_fe key has, so
the tc program takes the default mode for a new flow to a remote backend there without the
kpr_np_fe lookup (a cold hash bucket per frontend when new flows spread over many); a clear bit
(as created) looks it up. The program follows the bit (BPF_PROG_TEST_RUN, scapy packets), and
the writers (kpr.nodeport.tables for the agent, Datapath.set_modes for labs) keep it right on
every add, change and delete of a mode, at start and on a restart over an earlier run's pins,
in that order (a bit cleared before a key of its port is written, set after the last is deleted:
seen write by write through watched handles), and after a write that failed (a real EBADF)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from kpr.testing.nodeport_bench import VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted

pytestmark = pytest.mark.kernel

FULL = (1 << 64) - 1
TCP80 = (80 >> 6, 1 << (80 & 63))  # (word, bit) of TCP port 80: word 1, bit 16
UDP80 = (1024 | 80 >> 6, 1 << (80 & 63))
TCP81 = (81 >> 6, 1 << (81 & 63))


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2) as pl:
        pl.load("tc", "tc")
        yield pl


def word(m, i: int) -> int:
    from kpr.bpf import maps as M

    return struct.unpack("=Q", m.lookup(M.U32.pack(i)))[0]


def set_word(m, i: int, w: int) -> None:
    from kpr.bpf import maps as M

    m.update(M.U32.pack(i), struct.pack("=Q", w))


class Case(NamedTuple):
    what: str
    mode: str | None  # kpr_np_fe's entry for VIP:80/TCP (None: no entry)
    words: dict[int, int]  # kpr_np_nomode words written by hand (the rest all set)
    path: str  # the counter a new flow to VIP:80 moves


CASES = [
    Case("no entry, port's bit clear: looked up, default mode", None, {TCP80[0]: FULL & ~TCP80[1]}, "new_snat"),
    Case("DSR entry, port's bit clear: looked up, DSR", "dsr", {TCP80[0]: FULL & ~TCP80[1]}, "new_dsr"),
    Case("DSR entry, all words zero (as created): looked up, DSR", "dsr", {i: 0 for i in range(2048)}, "new_dsr"),
    # the bit is trusted: set by hand over an entry here, the lookup is skipped (default mode)
    Case("DSR entry, port's bit set: not looked up, default mode", "dsr", {}, "new_snat"),
    Case("DSR entry, only the neighbouring port 81's bit set: looked up", "dsr",
         {TCP80[0]: TCP81[1]}, "new_dsr"),
    Case("DSR entry, only UDP port 80's bit set: looked up", "dsr",
         {TCP80[0]: 0, UDP80[0]: UDP80[1]}, "new_dsr"),
]


def test_the_program_follows_the_port_bit(lab: ProgLab) -> None:
    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    dp = lab.builds["tc"]
    fe = dp.maps[ND.FE_MAP]
    key = ND.NP_FE_KEY.pack(M.addr_to_bytes(VIP), M.htons(80), 6)
    got = []
    with M.BpfMap.open_pinned(lab.pin / ND.NOMODE_MAP) as nomode:
        try:
            for n, c in enumerate(CASES):
                lab.flush_flows()
                for i in range(ND.NOMODE_WORDS):
                    set_word(nomode, i, c.words.get(i, FULL))
                if c.mode is None:
                    if fe.lookup(key) is not None:
                        fe.delete_many([key])
                else:
                    fe.update(key, ND.NP_FE.pack(ND.MODES[c.mode]))
                _v, _out, moved = run_counted(lab, "tc", "tc", lab.packet(VIP, 80, sport=46000 + n, flags="S"))
                path = next((k for k in ("new_snat", "new_dsr", "new_local") if moved.get(k)), "none")
                if path != c.path:
                    got.append(f"{c.what}: {path}, want {c.path} ({moved})")
        finally:
            dp.set_modes({})
    assert not got, "\n".join(got)


def test_the_lab_writer_keeps_the_bits(lab: ProgLab) -> None:
    """Datapath.set_modes (tests, benchmarks) as the agent's tables do: the ports of frontends with
    a mode clear, every other bit set; a new flow takes the mode written."""
    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    dp = lab.builds["tc"]
    with M.BpfMap.open_pinned(lab.pin / ND.NOMODE_MAP) as nomode:
        try:
            udp81 = FULL & ~(1 << (81 & 63))  # UDP port 81: the word of UDP port 80, bit 17
            for n, (modes, w_tcp, w_udp, path) in enumerate([
                ({(VIP, 80, 6): "dsr"}, FULL & ~TCP80[1], FULL, "new_dsr"),
                ({(VIP, 80, 6): "dsr", ("0.0.0.0", 81, 17): "snat"}, FULL & ~TCP80[1], udp81, "new_dsr"),
                ({("0.0.0.0", 81, 17): "snat"}, FULL, udp81, "new_snat"),
                ({}, FULL, FULL, "new_snat"),
            ]):
                dp.set_modes(modes)
                assert (word(nomode, TCP80[0]), word(nomode, UDP80[0])) == (w_tcp, w_udp), modes
                lab.flush_flows()
                _v, _out, moved = run_counted(lab, "tc", "tc", lab.packet(VIP, 80, sport=46100 + n, flags="S"))
                assert moved.get(path) == 1, (modes, moved)
        finally:
            dp.set_modes({})


def _change(**kw):
    from kpr.nodeport.services import Change

    return Change(**kw)


def test_the_tables_keep_the_bits_through_adds_changes_deletes_and_restarts(require_kernel: None) -> None:
    """kpr.nodeport.tables: a port's bit clear while any kpr_np_fe key of its port and protocol
    is there (another address's, the wildcard NodePort's), set once the last is gone; a mode
    changed in place keeps it clear; set_modes (the sync's end) sets every other port's bit and
    drops an earlier run's keys; a restart over pins whose bit says the opposite of kpr_np_fe
    (a key written by hand, or by a kpr without the bits) clears it as the tables open; pins
    from a kpr without kpr_np_nomode get it written from kpr_np_fe's keys as they open."""
    from kpr.bpf import maps as M
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport import datapath as ND
    from kpr.nodeport.tables import NodePortTables

    a, b = ("203.0.113.1", 80, 6), ("0.0.0.0", 80, 6)
    u = ("203.0.113.1", 80, 17)
    with scratch_pin_dir("kpr-nomode-h") as pin:
        pin.mkdir()
        t = NodePortTables(pin, 1024)
        try:
            nm = t.maps[ND.NOMODE_MAP]
            assert all(word(nm, i) == FULL for i in (0, TCP80[0], UDP80[0], 2047))  # no key: every bit set
            steps = [
                ("set_modes({}) at the sync's end", lambda: t.set_modes({}), FULL, FULL),
                ("a DSR frontend on TCP 80", lambda: t.apply(_change(modes_set={a: "dsr"}), vip_filter=set(), keep_ports=False),
                 FULL & ~TCP80[1], FULL),
                ("the wildcard NodePort on TCP 80 too", lambda: t.apply(_change(modes_set={b: "hybrid"}), vip_filter=set(),
                                                                        keep_ports=False), FULL & ~TCP80[1], FULL),
                ("the first changed in place", lambda: t.apply(_change(modes_set={a: "snat"}), vip_filter=set(),
                                                               keep_ports=False), FULL & ~TCP80[1], FULL),
                ("one of the two removed", lambda: t.apply(_change(modes_removed={a}), vip_filter=set(), keep_ports=False),
                 FULL & ~TCP80[1], FULL),
                ("UDP 80 gets one", lambda: t.apply(_change(modes_set={u: "dsr"}), vip_filter=set(), keep_ports=False),
                 FULL & ~TCP80[1], FULL & ~UDP80[1]),
                ("the last TCP 80 one removed", lambda: t.apply(_change(modes_removed={b}), vip_filter=set(), keep_ports=False),
                 FULL, FULL & ~UDP80[1]),
                ("an SCTP frontend's mode: no bit to clear", lambda: t.apply(_change(modes_set={("203.0.113.1", 80, 132): "dsr"}),
                                                                           vip_filter=set(), keep_ports=False),
                 FULL, FULL & ~UDP80[1]),
            ]
            wrong = []
            for what, do, w_tcp, w_udp in steps:
                do()
                have = (word(nm, TCP80[0]), word(nm, UDP80[0]), word(nm, 5))
                if have != (w_tcp, w_udp, FULL):
                    wrong.append(f"{what}: {[hex(w) for w in have]}, want {[hex(w_tcp), hex(w_udp), hex(FULL)]}")
            assert not wrong, "\n".join(wrong)
            assert len(list(t.maps[ND.FE_MAP].keys())) == 2  # UDP 80's and SCTP's
        finally:
            t.close()
        # a restart: kpr_np_fe holds UDP 80's key, and a hand-set bit says there is none
        with M.BpfMap.open_pinned(pin / ND.NOMODE_MAP) as nm:
            set_word(nm, UDP80[0], FULL)
        t = NodePortTables(pin, 1024)
        try:
            nm = t.maps[ND.NOMODE_MAP]
            assert word(nm, UDP80[0]) == FULL & ~UDP80[1]  # cleared as the tables open
            # the earlier run's key stays known: removing another of the port keeps the bit clear
            t.apply(_change(modes_set={("203.0.113.2", 80, 17): "dsr"}), vip_filter=set(), keep_ports=False)
            t.apply(_change(modes_removed={("203.0.113.2", 80, 17)}), vip_filter=set(), keep_ports=False)
            assert word(nm, UDP80[0]) == FULL & ~UDP80[1]
            t.set_modes({a: "dsr"})  # the sync's end: the earlier run's keys go, their ports' bits set
            assert (word(nm, TCP80[0]), word(nm, UDP80[0])) == (FULL & ~TCP80[1], FULL)
            assert len(list(t.maps[ND.FE_MAP].keys())) == 1
        finally:
            t.close()
        # an upgrade from a kpr without the map: created, and written from kpr_np_fe's keys at once
        (pin / ND.NOMODE_MAP).unlink()
        t = NodePortTables(pin, 1024)
        try:
            nm = t.maps[ND.NOMODE_MAP]
            assert (word(nm, TCP80[0]), word(nm, UDP80[0]), word(nm, 5)) == (FULL & ~TCP80[1], FULL, FULL)
        finally:
            t.close()


def _apply(t, **kw) -> None:
    t.apply(_change(**kw), vip_filter=set(), keep_ports=False)


def _bit_set(nm, port: tuple[int, int]) -> bool:
    from kpr.nodeport import datapath as ND

    pb = ND.port_bit(*port)
    return pb is not None and bool(word(nm, pb[0]) & pb[1])


def test_a_failed_clear_is_made_by_the_next_write_of_the_key(require_kernel: None) -> None:
    """(review R2 of 8011c14) kpr_np_nomode's write fails as a key is added (a real syscall
    error: a handle with no fd), so kpr_np_fe is not written; the facility's book holds the key
    all the same and writes it again only on a mode change: that write clears the port's bit
    first, or the key lands with it set (new flows in the default mode, not the key's)."""
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport import datapath as ND
    from kpr.nodeport.tables import NodePortTables
    from kpr.testing.map_handles import broken

    a = ("203.0.113.1", 80, 6)
    with scratch_pin_dir("kpr-nomode-fail") as pin:
        pin.mkdir()
        t = NodePortTables(pin, 1024)
        try:
            t.set_modes({})
            nm = t.maps[ND.NOMODE_MAP]
            assert _bit_set(nm, (80, 6))
            t.maps[ND.NOMODE_MAP] = broken(nm)
            try:
                with pytest.raises(OSError):
                    _apply(t, modes_set={a: "dsr"})
            finally:
                t.maps[ND.NOMODE_MAP] = nm
            assert list(t.maps[ND.FE_MAP].keys()) == []  # stopped before kpr_np_fe
            _apply(t, modes_set={a: "hybrid"})
            assert len(list(t.maps[ND.FE_MAP].keys())) == 1
            assert not _bit_set(nm, (80, 6)), "kpr_np_fe has a TCP/80 key and its kpr_np_nomode bit is set"
        finally:
            t.close()


def test_a_batch_stopped_part_way_leaves_no_word_believed_written(require_kernel: None) -> None:
    """A kpr_np_nomode batch writes one word and fails on the next (the rest through a handle
    with no fd, a real EBADF): the word written is read back, so a later key of its port clears
    the bit again rather than taking the tables' copy (still clear) for the map."""
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport import datapath as ND
    from kpr.nodeport.tables import NodePortTables
    from kpr.testing.map_handles import StopsPartWay

    a, u = ("203.0.113.1", 80, 6), ("203.0.113.1", 80, 17)
    with scratch_pin_dir("kpr-nomode-part") as pin:
        pin.mkdir()
        t = NodePortTables(pin, 1024)
        try:
            t.set_modes({a: "dsr", u: "dsr"})
            nm = t.maps[ND.NOMODE_MAP]
            assert not _bit_set(nm, (80, 6)) and not _bit_set(nm, (80, 17))
            t.maps[ND.NOMODE_MAP] = StopsPartWay(nm, 1)  # both go: two words set, one written
            try:
                with pytest.raises(OSError):
                    _apply(t, modes_removed={a, u})
            finally:
                t.maps[ND.NOMODE_MAP] = nm
            assert _bit_set(nm, (80, 6)) != _bit_set(nm, (80, 17))  # one word written, one not
            _apply(t, modes_set={a: "dsr", u: "dsr"})
            assert len(list(t.maps[ND.FE_MAP].keys())) == 2
            assert (_bit_set(nm, (80, 6)), _bit_set(nm, (80, 17))) == (False, False)
        finally:
            t.close()


class _Order:
    """kpr_np_fe and kpr_np_nomode swapped for watched handles on the same maps: after each
    write, every key in kpr_np_fe must have its port's bit clear (so a bit is cleared before a
    key of its port is written, and set only after the last one is deleted)."""

    def __init__(self, maps: dict) -> None:
        from kpr.nodeport import datapath as ND
        from kpr.testing.map_handles import Watched

        self.maps, self.fe, self.nm = maps, maps[ND.FE_MAP], maps[ND.NOMODE_MAP]
        self.log: list[tuple[str, str]] = []
        self.wrong: list[str] = []
        maps[ND.FE_MAP] = Watched(self.fe, self.log, self.check)
        maps[ND.NOMODE_MAP] = Watched(self.nm, self.log, self.check)

    def check(self, name: str, op: str) -> None:
        from kpr.nodeport import datapath as ND

        for k in self.fe.keys():
            port = ND.mode_key_port(bytes(k))
            if _bit_set(self.nm, port):
                self.wrong.append(f"after {name} {op} (writes {self.log}): key of {port} with its bit set")

    def restore(self) -> None:
        from kpr.nodeport import datapath as ND

        self.maps[ND.FE_MAP], self.maps[ND.NOMODE_MAP] = self.fe, self.nm


def test_the_tables_clear_before_a_key_and_set_after_the_last(require_kernel: None) -> None:
    """The order of the writes, not only the states after each call: apply (add, change, remove)
    and set_modes (keys added and an earlier key dropped)."""
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport.tables import NodePortTables

    a, b, c = ("203.0.113.1", 80, 6), ("203.0.113.2", 81, 6), ("203.0.113.3", 82, 17)
    with scratch_pin_dir("kpr-nomode-order") as pin:
        pin.mkdir()
        t = NodePortTables(pin, 1024)
        try:
            t.set_modes({})
            o = _Order(t.maps)
            try:
                _apply(t, modes_set={a: "dsr"})
                _apply(t, modes_set={a: "hybrid", b: "dsr"})
                _apply(t, modes_removed={a})
                t.set_modes({c: "dsr"})  # b goes, c comes
                _apply(t, modes_removed={c})
            finally:
                o.restore()
            assert not o.wrong, "\n".join(o.wrong)
            assert ("kpr_np_fe", "delete") in o.log and ("kpr_np_nomode", "update") in o.log
            assert list(t.maps["kpr_np_fe"].keys()) == [] and _bit_set(o.nm, (82, 17))
        finally:
            t.close()


def test_the_lab_writer_clears_before_a_wildcard_key(lab: ProgLab) -> None:
    """The lab writer's order with a wildcard (0.0.0.0) key among the keys changed."""
    dp = lab.builds["tc"]
    o = _Order(dp.maps)
    try:
        dp.set_modes({(VIP, 80, 6): "dsr"})
        dp.set_modes({("0.0.0.0", 81, 17): "snat"})  # TCP 80's key goes, UDP 81's comes
        dp.set_modes({})
    finally:
        o.restore()
        dp.set_modes({})
    assert not o.wrong, "\n".join(o.wrong)
    assert ("kpr_np_fe", "delete") in o.log


def test_the_lab_writer_clears_before_a_key_and_sets_after_the_last(lab: ProgLab) -> None:
    """Datapath.set_modes writes in the tables' order (kpr.nodeport.datapath.sync_modes, one
    definition for both), write by write."""
    dp = lab.builds["tc"]
    a, b, c = ("203.0.113.1", 80, 6), ("203.0.113.2", 81, 6), ("203.0.113.3", 82, 17)
    o = _Order(dp.maps)
    try:
        dp.set_modes({a: "dsr"})
        dp.set_modes({a: "hybrid", b: "dsr"})
        dp.set_modes({c: "dsr"})  # a and b go, c comes
        dp.set_modes({})
    finally:
        o.restore()
        dp.set_modes({})
    assert not o.wrong, "\n".join(o.wrong)
    assert ("kpr_np_fe", "delete") in o.log and ("kpr_np_nomode", "update") in o.log
