"""kpr_fe: the frontends' one-line copy of kpr_svc (lib/maps.h, issue 14 item 6).

A program finds a frontend's service entry in kpr_fe first (lib/lb.h kpr_lb_fe_get: one cache
line, indexed by its own hash of the key, probed linearly), and in kpr_svc, the truth, when the
key is not there or its line is being written. So every kpr_fe line either holds what kpr_svc
holds for its key or is being changed to it, which this module keeps by mirroring every kpr_svc
write of the writer (`Mirrored` wraps the map object: the bulk path, the general path,
`check()` repairs and rollbacks all go through it):

- a write of kpr_svc, then of the key's line; a write that failed drops the keys' lines;
- a line also holds the backend ids of its entry's first slots (`ids`: lib/lb.h picks those
  without reading kpr_slots), read from kpr_slots as the line is written: the writer stores a
  new slot range before the kpr_svc write that points at it, and a range rewritten in place
  (a repair) is followed by `slots_rewritten`, which rewrites its keys' lines with what the
  range holds now; the periodic check compares the ids too;
- a deletion drops the line first (a tombstone: probe runs stay whole), then the kpr_svc entry;
- a line is written under its sequence word (odd while written; the word only grows, so a
  reader never takes a rewritten line for the one it started reading);
- `open_fe` rebuilds the table from kpr_svc (a restart, an upgrade from a kpr without it).

A key with no free line within KPR_FE_PROBES lines is left out: the programs find it in kpr_svc.

Only the NodePort programs (lib/nodeport.h's new-flow lookup) read kpr_fe, so the agent keeps
the copy only when a plugin requires the NodePort facility (kpr.pluginmanager): otherwise every
kpr_svc write would pay for a copy nobody reads. The sequence word relies on x86's store and
load order (no barrier instruction is available to the programs on this toolchain), so other
CPUs keep no copy either. Without a copy a pinned table left by an earlier run is emptied
(`clear_pinned`): a program still attached from that run then asks kpr_svc.
"""

from __future__ import annotations

import logging
import platform
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

from kpr.bpf import abi
from kpr.bpf import maps as M

log = logging.getLogger(__name__)

FE_MAP = "kpr_fe"
LINES = abi.value("KPR_FE_LINES")
PROBES = abi.value("KPR_FE_PROBES")
TOMB = abi.value("KPR_FE_TOMB")
_LINE = abi.struct_of("kpr_fe_line")
LINE = _LINE.size
_F = {f.name: f for f in _LINE.fields}
_SEQ, _KEY, _VAL, _IDS = _F["seq"].offset, _F["key"].offset, _F["val"].offset, _F["ids"].offset
KEY_SIZE, VAL_SIZE = _VAL - _KEY, M.SVC_VAL.size
IDS = abi.value("KPR_FE_IDS")
IDS_SIZE = 4 * IDS
NO_IDS = bytes(IDS_SIZE)
_SLOT = abi.struct_of("kpr_slot").size  # kpr_slots value (backend id first), 8 bytes apart in its memory
_BASE_COUNT = struct.Struct("=IH")  # kpr_svc_val's slot_base and count
# n slots' backend ids read from kpr_slots' memory / written as a line's ids, zero-padded
_SLOTS_IN = [struct.Struct("=" + "I4x" * n) for n in range(IDS + 1)]
_IDS_OUT = [struct.Struct(f"={n}I{4 * (IDS - n)}x") for n in range(IDS + 1)]
SPEC = M.MapSpec(FE_MAP, M.BPF_MAP_TYPE_ARRAY, 4, LINE, LINES, "", M.BPF_F_MMAPABLE)
_U32 = struct.Struct("=I")
_WORDS = struct.Struct("=6I")
_SLOT_AT = M.SvcKey.slot.offset  # key.slot: 0 for a service entry, TOMB in a deleted entry's line
_PORT_AT = M.SvcKey.port.offset
_EMPTY_KEY = bytes(KEY_SIZE)


# CPUs whose memory order the sequence word relies on (see above).
ORDERED_CPUS = frozenset({"x86_64", "AMD64", "i686", "i386"})


def supported() -> bool:
    """Whether this CPU may keep the copy (its stores and loads stay in program order)."""
    return platform.machine() in ORDERED_CPUS


def fe_hash(key: bytes) -> int:
    """lib/lb.h kpr_fe_hash: the key's six 32-bit words (as the CPU reads them) mixed."""
    m = 0xFFFFFFFF
    h = 0
    for w in _WORDS.unpack(key):
        h = ((h ^ w) * 0x9E3779B1) & m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def _empty(key: bytes) -> bool:
    return key[_PORT_AT : _PORT_AT + 2] == b"\0\0" and key[_SLOT_AT : _SLOT_AT + 2] == b"\0\0"


def _tomb(key: bytes) -> bytes:
    return key[:_SLOT_AT] + struct.pack("=H", TOMB) + key[_SLOT_AT + 2 :]


class FeTable:
    """The pinned kpr_fe array, written as memory."""

    def __init__(self, m: M.BpfMap, *, fresh: bool = False, slots: M.BpfMap | None = None) -> None:
        self.map = m
        self.mem = m.mmap()
        # kpr_slots' memory, where a line's backend ids come from (None: lines hold none)
        self.slots = slots.mmap() if slots is not None else None
        self._nslots = len(self.slots) // _SLOT if self.slots is not None else 0
        self.unplaced = 0  # keys written that found no line (served from kpr_svc)
        # Created by us just now, so all zero: rebuild() need not read (and so map in) every line.
        self.fresh = fresh
        self.scans = 0  # reads of the whole table (a repair's check and rebuild share one)

    def close(self) -> None:
        self.mem.release()
        if self.slots is not None:
            self.slots.release()
        self.map.close()

    def ids(self, val: bytes) -> bytes:
        """The backend ids of the entry `val`'s slots 1..min(count, IDS) as kpr_slots holds them
        now, zero-padded (lib/maps.h kpr_fe_line.ids)."""
        if self.slots is None or len(val) < VAL_SIZE:
            return NO_IDS
        base, count = _BASE_COUNT.unpack_from(val)
        n = min(count, IDS)
        if not base or not n or base + n > self._nslots:
            return NO_IDS
        return _IDS_OUT[n].pack(*_SLOTS_IN[n].unpack_from(self.slots, base * _SLOT))

    def _scan(self) -> bytes:
        """Every line as the table holds it now."""
        self.scans += 1
        return bytes(self.mem[: LINES * LINE])

    def _key_at(self, idx: int) -> bytes:
        at = idx * LINE + _KEY
        return bytes(self.mem[at : at + KEY_SIZE])

    def _find(self, key: bytes) -> tuple[int | None, int | None]:
        """(the line holding key, the first line free for it), each None when there is none."""
        h = fe_hash(key)
        free = None
        for i in range(PROBES):
            idx = (h + i) & (LINES - 1)
            k = self._key_at(idx)
            if k == key:
                return idx, free
            if _empty(k):
                return None, idx if free is None else free
            if free is None and k[_SLOT_AT : _SLOT_AT + 2] == b"\xff\xff":
                free = idx
        return None, free

    def _write(self, idx: int, key: bytes, val: bytes, ids: bytes | None = None) -> None:
        """One line under its sequence word: odd while the key, value and ids change (ids:
        read from kpr_slots for `val` when not given)."""
        if ids is None:
            ids = self.ids(val)
        at = idx * LINE
        odd = (_U32.unpack_from(self.mem, at + _SEQ)[0] + 1) | 1  # (odd already: a writer died mid-line)
        _U32.pack_into(self.mem, at + _SEQ, odd & 0xFFFFFFFF)
        self.mem[at + _KEY : at + _KEY + KEY_SIZE] = key
        self.mem[at + _VAL : at + _VAL + VAL_SIZE] = val
        self.mem[at + _IDS : at + _IDS + IDS_SIZE] = ids
        _U32.pack_into(self.mem, at + _SEQ, (odd + 1) & 0xFFFFFFFF)

    def put(self, key: bytes, val: bytes) -> None:
        if key[_SLOT_AT : _SLOT_AT + 2] != b"\0\0":
            return  # an older kpr's per-slot entry: programs never look it up
        idx, free = self._find(key)
        if idx is None:
            idx = free
        if idx is None:
            self.unplaced += 1
            log.debug("event=fe_unplaced probes=%d", PROBES)
            return
        self._write(idx, key, val)

    def drop(self, key: bytes) -> None:
        idx, _ = self._find(key)
        if idx is not None:
            self._write(idx, _tomb(key), bytes(VAL_SIZE), NO_IDS)

    def refresh(self, keys: Iterable[bytes]) -> int:
        """Rewrite the lines of `keys` with their value and the ids their slots hold now (after
        a kpr_slots range was rewritten in place); returns the lines rewritten."""
        n = 0
        for key in keys:
            idx, _ = self._find(key)
            if idx is None:
                continue
            at = idx * LINE
            val = bytes(self.mem[at + _VAL : at + _VAL + VAL_SIZE])
            if bytes(self.mem[at + _IDS : at + _IDS + IDS_SIZE]) != self.ids(val):
                self._write(idx, key, val)
                n += 1
        return n

    def rebuild(self, items: Iterable[tuple[bytes, bytes]], have: bytes | None = None) -> None:
        """Make the table kpr_svc's `items`, laid out afresh (no tombstones), rewriting only
        the lines that change (meanwhile a key may be found at its old line, with its value,
        or not at all: the programs then ask kpr_svc). `have`: the table as `verify` just read
        it (only this writer writes it, under the writer's lock: it still holds that)."""
        want: dict[int, bytes] = {}
        self.unplaced = 0
        for k, v in items:
            if k[_SLOT_AT : _SLOT_AT + 2] != b"\0\0":
                continue
            h = fe_hash(k)
            for i in range(PROBES):
                idx = (h + i) & (LINES - 1)
                if idx not in want:
                    want[idx] = k + v
                    break
            else:
                self.unplaced += 1
        empty = _EMPTY_KEY + bytes(VAL_SIZE) + NO_IDS
        ids = self.ids
        want = {idx: kv + ids(kv[KEY_SIZE:]) for idx, kv in want.items()}
        _V = KEY_SIZE + VAL_SIZE
        changed = 0
        if self.fresh:
            # every line is empty: write the wanted ones only (in line order, as below)
            for idx in sorted(want):
                new = want[idx]
                self._write(idx, new[:KEY_SIZE], new[KEY_SIZE:_V], new[_V:])
            changed, self.fresh = len(want), False
        else:
            if have is None:
                have = self._scan()
            # (a table nothing ever wrote, which a program's load created, emptied on a restart:
            # nothing to compare line by line)
            lines = range(LINES) if want or have != bytes(len(have)) else ()
            for idx in lines:
                at = idx * LINE
                cur = have[at + _KEY : at + _IDS + IDS_SIZE]
                new = want.get(idx, empty)
                if cur != new or _U32.unpack_from(have, at + _SEQ)[0] & 1:  # (odd: a writer died mid-line)
                    self._write(idx, new[:KEY_SIZE], new[KEY_SIZE:_V], new[_V:])
                    changed += 1
        log.info("event=fe_rebuilt entries=%d lines_written=%d unplaced=%d", len(want), changed, self.unplaced)

    def disagreements(self, want: dict[bytes, bytes], have: bytes) -> tuple[list[str], int]:
        """What verify() finds wrong in `have` (a reading of the table) against kpr_svc's placed
        entries `want`: one line of text per wrong line or missing key, and the tombstones
        counted. Reads nothing else and writes nothing (tests read the table through it too)."""
        found: list[str] = []
        tombs = 0
        lined: set[bytes] = set()  # keys kpr_svc has that have a line, right or wrong
        for idx in range(LINES):
            at = idx * LINE
            k = have[at + _KEY : at + _VAL]
            if _empty(k):
                continue
            if k[_SLOT_AT : _SLOT_AT + 2] == b"\xff\xff":
                tombs += 1
                continue
            v = want.get(k)
            if v is None:
                found.append(f"line {idx}: a key kpr_svc does not hold")
                continue
            lined.add(k)
            ids = have[at + _IDS : at + _IDS + IDS_SIZE]
            if _U32.unpack_from(have, at + _SEQ)[0] & 1:
                found.append(f"line {idx}: left odd (a writer died mid-line)")
            elif v != have[at + _VAL : at + _VAL + VAL_SIZE]:
                found.append(f"line {idx}: value differs from kpr_svc's")
            elif self.ids(v) != ids:
                found.append(f"line {idx}: backend ids {ids.hex()}, kpr_slots holds {self.ids(v).hex()}")
        # a key with no line is missing when put() would have placed it (a free line in reach)
        found += [f"kpr_svc key {k.hex()} has no line" for k in want.keys() - lined if self._find(k)[1] is not None]
        return found, tombs

    def verify(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Compare the table with kpr_svc's `items` (the writer's periodic check): a line whose
        value is not kpr_svc's or whose ids are not what kpr_slots holds for it, a line of a
        key kpr_svc lacks, a line left odd (a writer that
        died mid-line), or a placed key with no line make the table rebuilt, as do tombstones
        past an eighth of the lines (churn lengthens probe runs). Returns the lines that
        disagreed."""
        want = {k: v for k, v in items if k[_SLOT_AT : _SLOT_AT + 2] == b"\0\0"}
        have = self._scan()
        found, tombs = self.disagreements(want, have)
        wrong = len(found)
        if wrong or tombs > LINES // 8:
            self.rebuild(want.items(), have)
        return wrong


def _ours(m: M.BpfMap) -> bool:
    """Whether a pinned map has kpr_fe's shape (else it is another layout's)."""
    info = m.info()
    return (info.type, info.value_size, info.max_entries, info.map_flags & M.BPF_F_MMAPABLE) == (
        SPEC.type, SPEC.value_size, SPEC.max_entries, M.BPF_F_MMAPABLE
    )


def open_fe(pin_path: Path, slots: M.BpfMap | None = None) -> FeTable:
    """Adopt the pinned kpr_fe (a program may have created it empty) or create and pin it; a
    pin of another shape is replaced (its programs are replaced with the agent's). `slots`:
    kpr_slots, where the lines' backend ids come from."""
    path = Path(pin_path) / FE_MAP
    if path.exists():
        m = M.BpfMap.open_pinned(path)
        if _ours(m):
            return FeTable(m, slots=slots)
        m.close()
        path.unlink()
    m = M.BpfMap.create(SPEC)
    m.pin(path)
    return FeTable(m, fresh=True, slots=slots)


def clear_pinned(pin_path: Path) -> None:
    """Empty a pinned kpr_fe an earlier run kept (line by line under the sequence words), for
    an agent that keeps no copy: the programs then find every frontend in kpr_svc."""
    path = Path(pin_path) / FE_MAP
    if not path.exists():
        return
    m = M.BpfMap.open_pinned(path)
    if not _ours(m):
        m.close()
        return  # not our layout: no program of this kpr reads it
    fe = FeTable(m)
    try:
        fe.rebuild(())
    finally:
        fe.close()
    # unpinned once empty: the next start without a copy reads nothing (a program still
    # attached keeps the empty map, and asks kpr_svc)
    path.unlink()


class Mirrored:
    """kpr_svc's map object, every write mirrored into kpr_fe (reads go to kpr_svc)."""

    def __init__(self, svc: M.BpfMap, fe: FeTable) -> None:
        self._svc = svc
        self.fe = fe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._svc, name)

    def _drop_all(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self.fe.drop(k)

    def update(self, key: bytes, value: bytes, flags: int = M.BPF_ANY) -> None:
        try:
            self._svc.update(key, value, flags)
        except BaseException:
            self.fe.drop(key)
            raise
        self.fe.put(key, value)

    def update_many(self, keys: Sequence[bytes], values: Sequence[bytes], *, batch: bool = True) -> None:
        try:
            self._svc.update_many(keys, values, batch=batch)
        except BaseException:
            self._drop_all(keys)
            raise
        for k, v in zip(keys, values):
            self.fe.put(k, v)

    def update_blob(self, keys: bytes, values: bytes, count: int) -> None:
        ks, vs = self._svc.key_size, self._svc.value_size
        pairs = [(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]) for i in range(count)]
        try:
            self._svc.update_blob(keys, values, count)
        except BaseException:
            self._drop_all(k for k, _ in pairs)
            raise
        for k, v in pairs:
            self.fe.put(k, v)

    def delete(self, key: bytes) -> bool:
        self.fe.drop(key)
        return self._svc.delete(key)

    def delete_many(self, keys: Sequence[bytes], *, batch: bool = True) -> None:
        self._drop_all(keys)
        self._svc.delete_many(keys, batch=batch)

    def close(self) -> None:
        self.fe.close()
        self._svc.close()


def slots_rewritten(svc: Any, keys: Iterable[bytes]) -> None:
    """kpr_slots ranges the service entries `keys` point at were rewritten in place (a repair;
    a change takes a new range, and its kpr_svc write rewrites the line): their lines take the
    ids the ranges hold now. `svc`: the writer's kpr_svc map object (no copy: nothing to do)."""
    fe = getattr(svc, "fe", None)
    if fe is not None:
        n = fe.refresh(keys)
        if n:
            log.info("event=fe_ids_refreshed lines=%d", n)


def mirrored(svc: M.BpfMap, pin_path: Path, slots: M.BpfMap | None = None) -> Mirrored:
    """kpr_svc's map object with its kpr_fe copy opened and rebuilt from it (and from kpr_slots,
    `slots`, the lines' backend ids)."""
    fe = open_fe(pin_path, slots)
    try:
        fe.rebuild(svc.items())
    except BaseException:
        fe.close()
        raise
    return Mirrored(svc, fe)
