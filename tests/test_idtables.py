"""kpr.idtables: flat tables behave as the dicts they replace, for any id and value."""

import random

import pytest

from kpr.idtables import IdBytes, IdCounts


def test_id_bytes_behaves_as_a_dict_for_dense_far_and_odd_entries():
    table, model = IdBytes(4), {}
    rng = random.Random(7)
    for _ in range(5000):
        i = rng.choice([rng.randrange(1, 300), rng.randrange(1 << 20, 1 << 32), 0])
        op = rng.random()
        if op < 0.6:
            value = rng.randbytes(4) if rng.random() < 0.95 else rng.randbytes(rng.randrange(0, 9))
            table[i] = model[i] = value
        elif op < 0.9:
            assert table.pop(i, None) == model.pop(i, None)
        else:
            assert table.get(i) == model.get(i) and (i in table) == (i in model)
        assert len(table) == len(model)
    assert dict(table.items()) == model and sorted(table) == sorted(model) and table == model
    for i in model:
        assert table[i] == model[i]
    with pytest.raises(KeyError):
        table[12345]


def test_id_counts_keep_present_zeros_apart_from_absent_ids():
    counts = IdCounts()
    counts[3] = 0
    counts[3] += 2
    counts[1 << 31] = -1
    counts.update({7: 5})
    assert dict(counts.items()) == {3: 2, 7: 5, 1 << 31: -1}
    assert counts.get(4, 0) == 0 and 4 not in counts and 3 in counts
    counts[7] = 0
    assert 7 in counts and counts.pop(7) == 0 and 7 not in counts and len(counts) == 2
    counts[5] = 1 << 70  # beyond 64 bits: kept all the same
    assert counts[5] == 1 << 70


def test_zero_ids_are_the_present_ids_counting_zero_and_runs_store_at_once():
    c = IdCounts({1: 0, 2: 3, 5: 0, 7: -1, 1 << 40: 0, (1 << 40) + 1: 2})
    c.pop(5)
    c[9] = 0
    assert c.zero_ids() == [1, 9, 1 << 40]  # 5 is gone; absent ids are not zeros
    from array import array
    assert c.add_run(20, array("q", [4, 0, 6])) and c.zero_ids() == [1, 9, 21, 1 << 40]
    assert not c.add_run(21, array("q", [1]))  # present: not a run of new ids
    assert [c.get(i) for i in (20, 21, 22)] == [4, 0, 6]
    b = IdBytes(2)
    assert b.store_run(3, b"aabbcc") and dict(b.items()) == {3: b"aa", 4: b"bb", 5: b"cc"}
    assert not b.store_run(5, b"dd") and not b.store_run(8, b"odd")  # present; not whole values
    assert b.store_run(6, b"dd") and b[6] == b"dd" and len(b) == 4


def test_holds_compares_runs_and_scattered_ids_as_the_dict_would():
    """IdBytes.holds: True exactly when every id is present with its value (runs compared as
    slices, scattered ids one by one; an id listed twice: both values)."""
    rnd = random.Random(3)
    t = IdBytes(4)
    t.store_run(1, b"".join(i.to_bytes(4, "big") for i in range(1, 301)))
    t[1000] = (1000).to_bytes(4, "big")
    t.pop(150)
    ref = dict(t.items())
    for _ in range(300):
        lo = rnd.randrange(1, 300)
        ids = list(range(lo, min(lo + rnd.randrange(1, 120), 301)))
        if rnd.random() < 0.3:
            ids += [1000]
        if rnd.random() < 0.3:
            rnd.shuffle(ids)
        if rnd.random() < 0.2:
            ids += ids[:3]
        vals = [i.to_bytes(4, "big") for i in ids]
        if rnd.random() < 0.3:
            k = rnd.randrange(len(vals))
            vals[k] = b"\xff" * 4
        want = all(ref.get(i) == v for i, v in zip(ids, vals))
        assert t.holds(ids, b"".join(vals)) is want
    assert t.holds([], b"") and not t.holds([1], b"")


def test_reserve_keeps_ids_far_above_the_end_in_the_arrays():
    vals, refs = IdBytes(4), IdCounts()
    for t in (vals, refs):
        t.reserve(100_001)
    vals.update((i, i.to_bytes(4, "big")) for i in range(70_000, 100_001, 3))
    assert vals.store_run(90_002, b"abcd" * 2)  # (90_002, 90_003: not among them)
    refs.update({i: 1 for i in range(70_000, 100_001, 3)})
    assert not vals._far and not refs._far
    assert vals[70_003] == (70_003).to_bytes(4, "big") and vals[90_002] == b"abcd" and len(vals) == 10_003
    assert refs[70_003] == 1 and 70_001 not in refs and len(refs) == 10_001
    vals[500_000] = b"wxyz"  # (beyond the reserve and the slack: the dict, as before)
    assert vals._far == {500_000: b"wxyz"}


def test_id_counts_beyond_32_bits_go_to_the_dict_and_back() -> None:
    from array import array

    c = IdCounts({1: (1 << 31) - 1, 2: -(1 << 31), 3: 5})
    assert c._far == {}
    c.add_many({1: 1, 2: -1, 3: 1 << 40, 4: 1 << 33})  # each out of the array's range
    assert dict(c.items()) == {1: 1 << 31, 2: -(1 << 31) - 1, 3: 5 + (1 << 40), 4: 1 << 33}
    assert set(c._far) == {1, 2, 3, 4} and len(c) == 4
    c.add_many({1: -1, 3: -(1 << 40)})  # back in range: back in the array
    assert c[1] == (1 << 31) - 1 and c[3] == 5 and set(c._far) == {2, 4} and len(c) == 4
    c.add_many({i: 1 << 32 if i == 150 else 1 for i in range(100, 200)})  # a run that does not fit
    assert c[150] == 1 << 32 and c[199] == 1 and len(c) == 104
    assert not c.add_run(300, array("q", [1, 1 << 40])) and 300 not in c
    assert c.add_run(300, array("q", [1, 2])) and c[301] == 2
    assert c.zero_ids() == []
