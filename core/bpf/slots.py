"""Slot tables (lib/slots.h) from Python: the one reader and clearer of them.

A slot table is a BPF_F_MMAPABLE array of KPR_SLOT_SIZE-byte slots: word 0 is the claim
(KPR_SLOT_FREE, 0: free; else the program's claim stamp on the conntrack clock), then the
key and the value of the slot struct named in the header (its layout from kpr.bpf.abi, the
one definition). Programs claim free slots by compare-and-swap and never free one; the
collector frees a slot whose flow is gone (`free`: value and key zeroed first, word 0 last,
so a program's claim can only ever see a whole free slot). Fields after the value belong to the
index, not to the flow in it (a home slot's gate words, lib/nodeport.h struct kpr_np_ct_slot):
`free` keeps them; `column`/`set_column` read and write one such 64-bit field of every slot. Reads go through the mapping
(no syscall per slot).

    with SlotTable.open(pin / "kpr_snat_slots", "kpr_snat_slot") as t:
        for idx, stamp, key, val in t.held():
            ...
        t.free(idx)
"""

from __future__ import annotations

import array
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

from kpr.bpf import abi
from kpr.bpf import maps as M

log = logging.getLogger(__name__)

__all__ = ["SlotTable", "SlotTableError", "slot_hash"]

_CLAIM = struct.Struct("=Q")
SLOT_SIZE = abi.value("KPR_SLOT_SIZE")  # bytes of a slot (lib/slots.h)


class SlotTableError(RuntimeError):
    """A pinned map is not the slot table its struct describes; the message names the problem."""


def slot_hash(key: bytes) -> int:
    """lib/slots.h kpr_slots_hash of a key (its 64-bit words, host order)."""
    if len(key) % 8:
        raise ValueError(f"slot key of {len(key)} bytes is not a whole number of 64-bit words")
    h = 0xCBF29CE484222325
    for (w,) in struct.iter_unpack("=Q", key):
        h = ((h ^ w) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 32
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


class SlotTable:
    """One slot table by map: `slot` names its struct in the headers (word 0 `claim`, then the
    fields `key` and `val`)."""

    def __init__(self, m: M.BpfMap, slot: str | abi.CType, *, owned: bool = False) -> None:
        self.map = m
        self._owned = owned
        ct = abi.struct_of(slot) if isinstance(slot, str) else slot
        slot = ct.name
        names = [f.name for f in ct.fields]
        if names[:3] != ["claim", "key", "val"] or ct.fields[0].size != 8:
            raise SlotTableError(f"struct {slot} is not a slot struct (claim, key, val first; has {', '.join(names)})")
        size = SLOT_SIZE
        if ct.size != size:
            raise SlotTableError(f"struct {slot} is {ct.size} bytes, not KPR_SLOT_SIZE ({size})")
        info = m.info()
        if info.type != M.BPF_MAP_TYPE_ARRAY or not info.map_flags & M.BPF_F_MMAPABLE or info.value_size != size:
            raise SlotTableError(
                f"map {m.name} is not a slot table (type {info.type}, flags {info.map_flags:#x}, "
                f"value size {info.value_size}; want an mmapable array of {size}-byte slots)"
            )
        self.slots = info.max_entries
        self.size = size
        key, val = ct.fields[1], ct.fields[2]
        self.key_off, self.key_size = key.offset, key.size
        self.val_off, self.val_size = val.offset, val.size
        self._mem = m.mmap()
        self._words = self._mem.cast("Q")  # word 0 of slot i at i * size / 8

    @classmethod
    def open(cls, path: Path, slot: str | abi.CType) -> "SlotTable":
        """The table pinned at `path` (closed with close() or the with-block)."""
        m = M.BpfMap.open_pinned(path)
        try:
            return cls(m, slot, owned=True)
        except BaseException:
            m.close()
            raise

    def close(self) -> None:
        self._words.release()
        self._mem.release()
        if self._owned:
            self.map.close()

    def __enter__(self) -> "SlotTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    def claim(self, idx: int) -> int:
        """Word 0 of slot `idx`: 0 free, else its claim stamp."""
        return _CLAIM.unpack_from(self._mem, idx * self.size)[0]

    def read(self, idx: int) -> tuple[int, bytes, bytes]:
        """(claim stamp, key bytes, value bytes) of slot `idx`."""
        at = idx * self.size
        raw = bytes(self._mem[at : at + self.size])
        return (
            _CLAIM.unpack_from(raw)[0],
            raw[self.key_off : self.key_off + self.key_size],
            raw[self.val_off : self.val_off + self.val_size],
        )

    def held(self) -> Iterator[tuple[int, int, bytes, bytes]]:
        """(index, claim stamp, key, value) of every held slot, in index order. A slot is read
        once, word 0 first: a slot being filled as it is read shows an incomplete key (the
        collector's grace period keeps it)."""
        mem, size, step = self._mem, self.size, self.size // 8
        koff, ksz, voff, vsz = self.key_off, self.key_size, self.val_off, self.val_size
        claims = self._words[: self.slots * step : step]
        for idx in [i for i, w in enumerate(claims) if w]:
            raw = bytes(mem[idx * size : (idx + 1) * size])
            stamp = _CLAIM.unpack_from(raw)[0]
            if stamp:
                yield idx, stamp, raw[koff : koff + ksz], raw[voff : voff + vsz]

    def count(self) -> int:
        """Held slots."""
        step = self.size // 8
        return sum(1 for w in self._words[: self.slots * step : step] if w)

    def probes(self, key: bytes, probes: int) -> list[int]:
        """The slot indexes a program tries for `key`, in order (lib/slots.h kpr_slots_index)."""
        h = slot_hash(key)
        return [(h + i) & (self.slots - 1) for i in range(probes)]

    def find(self, key: bytes, probes: int) -> int | None:
        """The index of the held slot with `key` within `probes` of its hash (as the programs
        look), else None."""
        for idx in self.probes(key, probes):
            stamp, k, _ = self.read(idx)
            if stamp and k == key:
                return idx
        return None

    def first_free(self, key: bytes, probes: int) -> int | None:
        """The first free slot within `probes` of `key`'s hash (where a program's claim puts
        it), else None."""
        return next((idx for idx in self.probes(key, probes) if not self.claim(idx)), None)

    # -- writing

    def free(self, idx: int) -> None:
        """Free slot `idx`: value and key zeroed, then word 0 (a program claims only a slot whose
        word 0 is free: it never sees the old key or value in a slot it won). The fields after
        the value (the index's, not the flow's) are kept."""
        at = idx * self.size
        self._mem[at + self.val_off : at + self.val_off + self.val_size] = bytes(self.val_size)
        self._mem[at + self.key_off : at + self.key_off + self.key_size] = bytes(self.key_size)
        self._mem[at : at + 8] = bytes(8)

    def _column_at(self, offset: int) -> memoryview:
        if offset % 8 or not self.val_off + self.val_size <= offset <= self.size - 8:
            raise ValueError(f"slot column at byte {offset}: not a 64-bit field after the value (of {self.size} bytes)")
        step = self.size // 8
        return self._words[offset // 8 : self.slots * step : step]

    def column(self, offset: int) -> list[int]:
        """The 64-bit field at byte `offset` of every slot, in index order (one read each)."""
        col = self._column_at(offset)
        try:
            return col.tolist()
        finally:
            col.release()

    def set_column(self, offset: int, values: list[int]) -> None:
        """Store `values` (one per slot, in index order) into the 64-bit field at byte `offset`
        of every slot: each an aligned 8-byte store (a program reads a whole old or new value)."""
        if len(values) != self.slots:
            raise ValueError(f"slot column of {len(values)} values for {self.slots} slots")
        col = self._column_at(offset)
        try:
            col[:] = array.array("Q", values)
        finally:
            col.release()

    def clear(self) -> int:
        """Every slot freed (a benchmark's flush between rounds, a test's reset); returns how
        many were held."""
        n = self.count()
        self._mem[:] = bytes(len(self._mem))
        return n

    def put(self, idx: int, stamp: int, key: bytes, val: bytes) -> None:
        """Write a held slot (tests, and the benchmarks' fill): value and key, then word 0."""
        if len(key) != self.key_size or len(val) != self.val_size or not stamp:
            raise ValueError(
                f"slot of {self.map.name}: key {len(key)}/{self.key_size} bytes, value {len(val)}/{self.val_size}, "
                f"stamp {stamp} (non-zero)"
            )
        at = idx * self.size
        self._mem[at + self.val_off : at + self.val_off + self.val_size] = val
        self._mem[at + self.key_off : at + self.key_off + self.key_size] = key
        self._mem[at : at + 8] = _CLAIM.pack(stamp)
