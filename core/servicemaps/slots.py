"""Ranges of kpr_slots (an ARRAY): where each frontend's backend slots live.

A frontend group takes one range for all its scopes (external slots first, then internal),
its size rounded up to a size class (1, 2, 3, 4, 6, 8, 12, 16, 24, ...: at most 1.5x the
slots it needs), so a range freed by one frontend fits the next of the same class. Free
ranges wait in a list per class; beyond them a bump pointer hands out fresh space, so a full
sync into empty maps lays the ranges out one after the other (and writes them with one batch).

A freed range is held, not reused, until `release()`: the writer frees a frontend's old range
only after the kpr_svc entry pointing at the new one is written, and releases held ranges at
the start of its next operation, so a program that read the old entry just before still
finds the old slots (never another frontend's) while it picks.

Index 0 is never handed out: slot_base 0 means "no slots".
"""

from __future__ import annotations

import bisect
import logging
from itertools import accumulate

log = logging.getLogger("kpr.servicemaps")


class SlotsFull(Exception):
    """No free range of the size wanted (kpr_slots full, or too fragmented)."""

    def __init__(self, need: int, free: int, limit: int) -> None:
        super().__init__(f"kpr_slots full: a range of {need} slots wanted, {free} of {limit} free")
        self.need, self.free, self.limit = need, free, limit


def _classes(limit: int) -> list[int]:
    out = [1, 2, 3]
    while out[-1] < limit:
        out.append(out[-2] * 2)
    return out


_CLASSES = _classes(1 << 32)
_SMALL = [0] + [_CLASSES[bisect.bisect_left(_CLASSES, n)] for n in range(1, 4097)]


def size_class(n: int) -> int:
    """The range size `n` slots take (0 for none)."""
    if n < len(_SMALL):
        return _SMALL[n]
    return _CLASSES[bisect.bisect_left(_CLASSES, n)]


class SlotAllocator:
    """Ranges of indexes 1..limit-1 (see the module docstring)."""

    __slots__ = ("limit", "top", "used", "live", "_free", "_held")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # the map's max_entries
        self.top = 1  # bump pointer: nothing at or above it is handed out
        self.used = 0  # slots in live and held ranges
        self.live: dict[int, int] = {}  # base -> span of every range handed out and not freed
        self._free: dict[int, list[int]] = {}  # span -> bases of free ranges
        self._held: list[tuple[int, int]] = []  # freed, not yet reusable

    @property
    def free_slots(self) -> int:
        return self.limit - 1 - self.used

    def alloc(self, n: int, *, _merged: bool = False) -> tuple[int, int]:
        """A range for n slots: (base, span). (0, 0) for n == 0. Raises SlotsFull."""
        if n <= 0:
            return 0, 0
        span = size_class(n)
        bases = self._free.get(span)
        if bases:
            base = bases.pop()
        elif self.top + span <= self.limit:
            base = self.top
            self.top += span
        else:
            try:
                base = self._split(span)
            except SlotsFull:
                # Free ranges are never merged as they come back: small ones freed side by
                # side (a frontend that grew to another size class) would stay small, and a
                # nearly empty array refuse a large range. Merge neighbours, then try again.
                if _merged or not self._coalesce():
                    raise
                return self.alloc(n, _merged=True)
        self.live[base] = span
        self.used += span
        return base, span

    def alloc_run(self, spans: list[int]) -> list[int] | None:
        """Bases for ranges of these spans (size classes; 0: no range, base 0), one after the
        other from the bump pointer: what alloc() would hand out in turn when no free range
        waits (a full sync into empty maps). None, nothing taken, when one does or they do
        not fit."""
        if any(self._free.values()):
            return None
        total = sum(spans)
        if self.top + total > self.limit:
            return None
        starts = list(accumulate(spans, initial=self.top))
        starts.pop()
        if 0 in spans:
            starts = [b if s else 0 for b, s in zip(starts, spans)]
            self.live.update((b, s) for b, s in zip(starts, spans) if s)
        else:
            self.live.update(zip(starts, spans))
        self.top += total
        self.used += total
        return starts

    def _split(self, span: int) -> int:
        """A range of `span` cut from a larger free one (the rest goes back in class pieces)."""
        for cls in _CLASSES:
            if cls > span and self._free.get(cls):
                base = self._free[cls].pop()
                self._put_free(base + span, cls - span)
                return base
            if cls > self.limit:
                break
        raise SlotsFull(span, self.free_slots, self.limit - 1)

    def _coalesce(self) -> bool:
        """Merge adjacent free ranges (a run that ends at the bump pointer lowers it) and put
        them back as class-sized pieces, largest first. False when nothing merged."""
        pieces = sorted((base, cls) for cls, bases in self._free.items() for base in bases)
        runs: list[list[int]] = []
        for base, size in pieces:
            if runs and runs[-1][0] + runs[-1][1] == base:
                runs[-1][1] += size
            else:
                runs.append([base, size])
        if runs and runs[-1][0] + runs[-1][1] == self.top:
            self.top = runs.pop()[0]
        elif len(runs) == len(pieces):
            return False  # no two free ranges side by side
        self._free = {}
        for base, size in runs:
            self._put_free(base, size)
        return True

    def _put_free(self, base: int, size: int) -> None:
        """Free the indexes base..base+size-1 as class-sized ranges, largest first."""
        while size > 0:
            cls = _CLASSES[bisect.bisect_right(_CLASSES, size) - 1]
            self._free.setdefault(cls, []).append(base)
            base += cls
            size -= cls

    def free(self, base: int, span: int, *, hold: bool = True) -> None:
        """The range is no longer pointed at; reusable after the next release() (at once
        with hold=False: a range never written, that no reader can know)."""
        if not base:
            return
        if self.live.get(base) != span:
            log.warning("event=slots_free_unknown base=%d span=%d", base, span)
            return
        del self.live[base]
        if hold:
            self._held.append((base, span))
        else:
            self._return(base, span)

    def release(self) -> None:
        """Make held ranges reusable (start of a writer operation, see the module docstring)."""
        held = self._held
        if not held:
            return
        self._held = []
        for base, span in held:
            self._return(base, span)

    def _return(self, base: int, span: int) -> None:
        self.used -= span
        if base + span == self.top:
            self.top = base  # the last range: give it back to the bump pointer
        else:
            self._free.setdefault(span, []).append(base)

    @property
    def held(self) -> list[tuple[int, int]]:
        return list(self._held)

    @classmethod
    def adopt(
        cls, limit: int, ranges: list[tuple[int, int]], held: list[tuple[int, int]] = ()  # type: ignore[assignment]
    ) -> tuple["SlotAllocator", list[int]]:
        """An allocator for ranges (base, span) found in pinned maps, and `held` ranges still
        waiting for release(); the gaps become free ranges. Returns it and the bases it
        refused (overlapping another range or past the end: those frontends get a new range
        when next written)."""
        a = cls(limit)
        held_set = set(held)
        ranges = list(ranges) + list(held_set)
        bad: list[int] = []
        end = 1
        for base, span in sorted(ranges):
            if base < end or base + span > limit:
                bad.append(base)
                continue
            if base > end:
                a._put_free(end, base - end)
            a.live[base] = span
            a.used += span
            end = base + span
        a.top = end
        for base, span in held_set:
            if a.live.get(base) == span:
                del a.live[base]
                a._held.append((base, span))
        return a, bad
