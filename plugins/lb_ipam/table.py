"""One pool family's slots, filled by ordered linear probing: history independent.

Each entry (a service, or a group of services sharing an address) has a home slot (a hash of
its id) and a priority (older first, then by id). The layout is always the one obtained by
placing pinned slots first, then the entries one by one in priority order, each in the first
free slot from its home on (wrapping): the *canonical* layout. It depends only on the set of
entries and pins, never on the order they came and went, which is what lets every node
reading the same manifests hand out the same addresses without talking to the others.

Kept canonical incrementally (Amble and Knuth's ordered hash tables, with Blelloch and
Golovin's deletion): an entry probing a slot held by a lower-priority entry takes it and the
displaced one probes on; removing an entry (or a pin) re-places the entries of the run of
occupied slots after it. Both cost the length of one run, which at a given fill is the same
at 10k entries as at 10: no step ever looks at every entry. When the table is full, the
lowest-priority entries wait (best first) for a slot to come free.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from .pools import AddressSpace

Priority = tuple[Any, ...]


@dataclass(slots=True)
class Entry:
    id: str
    prio: Priority
    home: int


class _Low:
    """Heap item ordering the lowest priority (the largest tuple) first."""

    __slots__ = ("prio", "id")

    def __init__(self, prio: Priority, id: str):
        self.prio, self.id = prio, id

    def __lt__(self, other: "_Low") -> bool:
        return (self.prio, self.id) > (other.prio, other.id)


class SlotTable:
    def __init__(self, space: AddressSpace, name: str):
        self.space = space
        self.name = name
        self.size = space.size
        self.slots: dict[int, Entry] = {}
        self.where: dict[str, int] = {}
        self.entries: dict[str, Entry] = {}
        # slot -> pins on it; pinned slots are never probed into.
        self.pins: dict[int, int] = {}
        self._pinned_usable = 0
        self._waiting: set[str] = set()
        self._waiting_heap: list[tuple[Priority, str]] = []
        # Placed entries, lowest priority first: built at the first overflow and kept while
        # the table stays at least half full, so a table with room pays nothing for it.
        self._placed_heap: list[_Low] | None = None
        # Ids whose slot changed (placed, moved, evicted) since the caller last cleared it.
        self.moved: set[str] = set()
        # Slots looked at, placing and re-placing: the work, for benchmarks and status.
        self.probes = 0

    # --- observation ---------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.size - self.space.buggy_count - self._pinned_usable

    def slot_of(self, id: str) -> int | None:
        return self.where.get(id)

    def used(self) -> int:
        """Addresses taken: by entries and by pins."""
        return len(self.slots) + self._pinned_usable

    def free(self) -> int:
        return self.capacity - len(self.slots)

    def waiting(self) -> int:
        return len(self._waiting)

    # --- changes -------------------------------------------------------------------------

    def add(self, id: str, prio: Priority) -> None:
        if id in self.entries:
            raise ValueError(f"{id} is already in table {self.name}")
        e = Entry(id, prio, self.space.home(f"{self.name}|{id}"))
        self.entries[id] = e
        self._insert(e)

    def remove(self, id: str) -> None:
        e = self.entries.pop(id, None)
        if e is None:
            return
        if id in self._waiting:
            self._waiting.discard(id)
            return
        s = self.where[id]
        self._take_out(s)
        self.moved.add(id)
        self._rebuild_after(s)
        self._fill_from_waiting()
        if self._placed_heap is not None and len(self.slots) < self.capacity // 2:
            self._placed_heap = None

    def pin(self, slot: int) -> None:
        n = self.pins.get(slot, 0)
        self.pins[slot] = n + 1
        if n:
            return
        if not self.space.buggy(slot):
            self._pinned_usable += 1
        occ = self.slots.get(slot)
        if occ is not None:
            # The slot stays occupied (by the pin), so nothing after it moves; only the
            # evicted entry probes on.
            self._take_out(slot)
            self._insert(occ)
        elif len(self.slots) > self.capacity:
            self._evict_lowest()

    def unpin(self, slot: int) -> None:
        n = self.pins.get(slot, 0)
        if n > 1:
            self.pins[slot] = n - 1
            return
        if not n:
            return
        del self.pins[slot]
        if not self.space.buggy(slot):
            self._pinned_usable -= 1
        self._rebuild_after(slot)
        self._fill_from_waiting()

    # --- internals -----------------------------------------------------------------------

    def _blocked(self, slot: int) -> bool:
        return slot in self.pins or self.space.buggy(slot)

    def _take_out(self, slot: int) -> Entry:
        e = self.slots.pop(slot)
        del self.where[e.id]
        return e

    def _insert(self, e: Entry) -> None:
        if len(self.slots) < self.capacity:
            self._place(e)
            return
        low = self._lowest_placed()
        if low is None or e.prio > low.prio or (e.prio == low.prio and e.id > low.id):
            self._wait(e)
            return
        self._evict(low)
        self._place(e)

    def _evict_lowest(self) -> None:
        low = self._lowest_placed()
        if low is not None:
            self._evict(low)

    def _evict(self, low: Entry) -> None:
        s = self.where[low.id]
        self._take_out(s)
        self._rebuild_after(s)
        self.moved.add(low.id)
        self._wait(low)

    def _wait(self, e: Entry) -> None:
        self._waiting.add(e.id)
        heapq.heappush(self._waiting_heap, (e.prio, e.id))
        if len(self._waiting_heap) > 2 * len(self._waiting) + 64:
            self._waiting_heap = [(self.entries[i].prio, i) for i in self._waiting]
            heapq.heapify(self._waiting_heap)

    def _place(self, e: Entry) -> None:
        """Ordered insertion from e's home; a free slot must exist."""
        carried = e
        i = carried.home
        while True:
            self.probes += 1
            if self._blocked(i):
                i = (i + 1) % self.size
                continue
            occ = self.slots.get(i)
            if occ is None or (carried.prio, carried.id) < (occ.prio, occ.id):
                self.slots[i] = carried
                self.where[carried.id] = i
                self.moved.add(carried.id)
                if self._placed_heap is not None:
                    heapq.heappush(self._placed_heap, _Low(carried.prio, carried.id))
                if occ is None:
                    break
                carried = occ
            i = (i + 1) % self.size
        if self._placed_heap is not None and len(self._placed_heap) > 2 * len(self.slots) + 64:
            self._placed_heap = None  # rebuilt without the stale items when next needed

    def _rebuild_after(self, slot: int) -> None:
        """Re-place the entries of the run after `slot`, which just came free: each may now
        belong nearer its home."""
        run: list[tuple[int, Entry]] = []
        i = (slot + 1) % self.size
        for _ in range(self.size - 1):
            self.probes += 1
            if not self._blocked(i):
                occ = self.slots.get(i)
                if occ is None:
                    break
                run.append((i, self._take_out(i)))
            i = (i + 1) % self.size
        moved_before = {e.id for _, e in run if e.id in self.moved}
        for _, e in run:
            self._place(e)
        # Entries that landed where they were did not move.
        for old, e in run:
            if self.where.get(e.id) == old and e.id not in moved_before:
                self.moved.discard(e.id)

    def _lowest_placed(self) -> Entry | None:
        if self._placed_heap is None:
            self._placed_heap = [_Low(e.prio, e.id) for e in self.slots.values()]
            heapq.heapify(self._placed_heap)
        while self._placed_heap:
            top = self._placed_heap[0]
            e = self.entries.get(top.id)
            if e is not None and e.prio == top.prio and top.id in self.where:
                return e
            heapq.heappop(self._placed_heap)
        return None

    def _fill_from_waiting(self) -> None:
        while self._waiting and len(self.slots) < self.capacity:
            prio, id = heapq.heappop(self._waiting_heap)
            e = self.entries.get(id)
            if id not in self._waiting or e is None or e.prio != prio:
                continue
            self._waiting.discard(id)
            self._place(e)
