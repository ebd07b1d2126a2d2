"""The bulk operations of kpr.idtables the service map writer uses (update, changed, missing,
add_many) agree with the one-id-at-a-time API and a plain dict, dense and far ids alike."""

import random

import pytest

from kpr.idtables import IdBytes, IdCounts

# dense ids, ids far beyond the arrays (kept in the dict), a negative one
IDS = [1, 2, 3, 500, 70_000, 10**9, -5]


def _val(i: int, tag: int = 0) -> bytes:
    return (i % 256).to_bytes(1, "big") * 3 + bytes((tag,))


def test_bytes_update_matches_setitem():
    bulk, single = IdBytes(4), IdBytes(4)
    items = {i: _val(i) for i in IDS} | {7: b"odd size"}  # a value of another size goes to the dict
    bulk.update(items)
    for i, v in items.items():
        single[i] = v
    assert bulk == single
    assert dict(bulk.items()) == items
    assert len(bulk) == len(items)


def test_bytes_update_overwrites_without_counting_twice():
    t = IdBytes(4, {i: _val(i) for i in IDS})
    t.update({i: _val(i, 1) for i in IDS})
    assert len(t) == len(IDS)
    assert all(t[i] == _val(i, 1) for i in IDS)


def test_changed_lists_new_and_different_values():
    t = IdBytes(4, {i: _val(i) for i in IDS})
    want = {1: _val(1), 2: _val(2, 9), 500: _val(500), 10**9: _val(10**9, 9), 8: _val(8), 10**10: _val(1)}
    assert sorted(t.changed(want)) == sorted([2, 10**9, 8, 10**10])


def test_missing():
    t = IdCounts({i: 1 for i in IDS})
    t.pop(3)
    assert t.missing([1, 3, 4, 70_000, 10**9, 10**9 + 1, -5, -6]) == [3, 4, 10**9 + 1, -6]


@pytest.mark.parametrize("seed", range(3))
def test_add_many_matches_a_dict(seed):
    rnd = random.Random(seed)
    t, ref = IdCounts(), {}
    for _ in range(20):
        deltas = {rnd.choice(IDS + [rnd.randrange(1, 200_000)]): rnd.randrange(-3, 4) for _ in range(30)}
        t.add_many(deltas)
        for i, d in deltas.items():
            ref[i] = ref.get(i, 0) + d
        assert dict(t.items()) == ref
        assert len(t) == len(ref)


@pytest.mark.parametrize("present", [(), (150,), (10**9,)])
def test_runs_of_new_ids_match_one_at_a_time(present):
    """Ascending runs of new ids (a full sync's) take a slice copy; an id already present,
    here or among the far ids, takes the general path: the result is the same."""
    run = range(100, 300)
    bulk_b, single_b = IdBytes(4), IdBytes(4)
    bulk_c, single_c = IdCounts(), IdCounts()
    for i in present:
        for t in (bulk_b, single_b):
            t[i] = _val(i, 7)
        for t in (bulk_c, single_c):
            t[i] = 5
    values = {i: _val(i) for i in run} | {i: _val(i) for i in present if i not in run}
    bulk_b.update(values)
    for i, v in values.items():
        single_b[i] = v
    assert bulk_b == single_b and len(bulk_b) == len(single_b)
    deltas = {i: i % 3 + 1 for i in run} | {i: 1 for i in present if i not in run}
    bulk_c.add_many(deltas)
    for i, d in deltas.items():
        single_c[i] = single_c.get(i, 0) + d
    assert dict(bulk_c.items()) == dict(single_c.items()) and len(bulk_c) == len(single_c)


def test_pop_many_and_get_many():
    vals, refs = IdBytes(4, {i: _val(i) for i in IDS}), IdCounts({i: i % 7 for i in IDS})
    assert refs.get_many([1, 4, 10**9, -5, -6], default=-1) == [1, -1, 10**9 % 7, -5 % 7, -1]
    assert vals.pop_many([1, 4, 10**9]) == [_val(1), None, _val(10**9)]
    refs.pop_many([1, 4, 10**9])
    assert 1 not in vals and 10**9 not in vals and len(vals) == len(IDS) - 2
    assert dict(refs.items()) == {i: i % 7 for i in IDS if i not in (1, 10**9)} and len(refs) == len(IDS) - 2
