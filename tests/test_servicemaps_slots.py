"""The kpr_slots range allocator (kpr.servicemaps.slots), root-free: ranges handed out never
overlap a live or held range, never pass the map's end, never use index 0; freed ranges are
reused only after release(); a full sync into empty maps lays ranges out one after the other."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpr.servicemaps.slots import SlotAllocator, SlotsFull, size_class


def test_size_classes_waste_at_most_half():
    assert [size_class(n) for n in range(0, 13)] == [0, 1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
    for n in range(1, 5000):
        c = size_class(n)
        assert n <= c < max(2 * n, 2) and c * 2 // 3 < n or c <= 3


def test_a_full_sync_into_empty_maps_is_contiguous():
    a = SlotAllocator(1000)
    got = [a.alloc(10) for _ in range(5)]
    assert got == [(1 + 12 * i, 12) for i in range(5)]
    assert a.top == 61 and a.used == 60


def test_freed_ranges_wait_for_release_and_are_reused_by_their_class():
    a = SlotAllocator(100)
    r1, r2 = a.alloc(5), a.alloc(5)  # (1, 6), (7, 6)
    a.free(*r1)
    assert a.alloc(6) == (13, 6), "held: not reused before release()"
    a.release()
    assert a.alloc(5) == (1, 6) and a.used == 18
    a.free(*r2)
    a.free(13, 6)
    a.release()  # (13, 6) was the last range: back to the bump pointer
    assert a.top == 13 and a.alloc(6) in ((7, 6), (13, 6))


def test_full_maps_refuse_and_a_larger_free_range_is_split():
    a = SlotAllocator(13)  # indexes 1..12
    big = a.alloc(12)
    assert big == (1, 12)
    with pytest.raises(SlotsFull, match="kpr_slots full: a range of 1 slots wanted, 0 of 12 free"):
        a.alloc(1)
    a.free(*big)
    a.release()
    assert a.alloc(3) == (1, 3) and a.alloc(8) == (4, 8)
    with pytest.raises(SlotsFull):
        a.alloc(2)


def test_small_ranges_freed_side_by_side_make_room_for_a_large_one():
    """Free ranges are kept per size class; without merging neighbours an array emptied of
    one-slot ranges refused a range of 12 with every index free."""
    a = SlotAllocator(101)  # indexes 1..100
    ones = [a.alloc(1) for _ in range(100)]
    for r in ones:
        a.free(*r)
    a.release()
    assert a.used == 0
    assert a.alloc(10) == (1, 12)
    with pytest.raises(SlotsFull, match="a range of 96 slots wanted, 88 of 100 free"):
        a.alloc(70)
    assert a.alloc(60) == (13, 64)


def test_adopt_rebuilds_free_space_and_refuses_overlaps():
    a, bad = SlotAllocator.adopt(100, [(1, 6), (20, 12), (25, 3), (95, 12)], held=[(7, 6)])
    assert bad == [25, 95]
    assert a.live == {1: 6, 20: 12} and a.top == 32
    assert a.alloc(8) == (32, 8)  # the only gap (13..19) is too small: the bump pointer
    a.release()  # the held (7, 6) becomes free
    assert a.alloc(6) == (7, 6)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 40)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
        st.tuples(st.just("release"), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(2, 300), ops=OPS)
def test_random_sequences_never_overlap_or_exceed_the_map(limit, ops):
    a = SlotAllocator(limit)
    live: dict[int, int] = {}
    held: dict[int, int] = {}
    for op, arg in ops:
        if op == "alloc":
            try:
                base, span = a.alloc(arg)
            except SlotsFull:
                # refused only when no run of free indexes is long enough
                taken = [False] * limit
                for b, s in list(live.items()) + list(held.items()):
                    taken[b : b + s] = [True] * s
                run = longest = 0
                for i in range(1, limit):
                    run = 0 if taken[i] else run + 1
                    longest = max(longest, run)
                assert longest < size_class(arg), ("refused with room", arg, longest)
                continue
            assert span == size_class(arg) and 1 <= base and base + span <= limit
            for b, s in list(live.items()) + list(held.items()):
                assert base + span <= b or b + s <= base, ("overlap", (base, span), (b, s))
            live[base] = span
        elif op == "free" and live:
            base = sorted(live)[arg % len(live)]
            a.free(base, live[base])
            held[base] = live.pop(base)
        elif op == "release":
            a.release()
            held.clear()
        assert a.live == live
        assert a.used == sum(live.values()) + sum(held.values())
