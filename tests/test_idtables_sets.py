"""kpr.idtables.IdSet: behaves as the set of ints it replaces (the writer's rev-NAT indexes
in use), for dense, far and negative ids, and runs added at once."""

import random

from kpr.idtables import IdSet


def test_id_set_behaves_as_a_set_for_dense_far_and_negative_ids():
    table, model = IdSet(), set()
    rng = random.Random(11)
    for _ in range(5000):
        i = rng.choice([rng.randrange(0, 400), rng.randrange(1 << 20, 1 << 32), -rng.randrange(1, 5)])
        op = rng.random()
        if op < 0.45:
            table.add(i)
            model.add(i)
        elif op < 0.6:
            lo = rng.randrange(-3, 500)
            ids = range(lo, lo + rng.randrange(0, 70))
            assert table.isdisjoint(ids) == model.isdisjoint(ids)
            if rng.random() < 0.5:
                table.update(ids)
                model.update(ids)
        elif op < 0.85:
            table.discard(i)
            model.discard(i)
        else:
            assert (i in table) == (i in model)
            assert table.isdisjoint([i, i + 1]) == model.isdisjoint([i, i + 1])
        assert len(table) == len(model)
    assert set(table) == model and table == model and sorted(table) == sorted(model)


def test_id_set_update_takes_several_iterables_and_a_run_past_its_end():
    s = IdSet([5])
    s.update(range(1, 4), [9, 1 << 40])
    assert sorted(s) == [1, 2, 3, 5, 9, 1 << 40] and len(s) == 6
    s.update(range(100_000, 200_000))  # a full sync's run of new indexes, far past the end
    assert len(s) == 100_006 and 150_000 in s and 99_999 not in s
    assert not s.isdisjoint(range(199_999, 300_000)) and s.isdisjoint(range(200_000, 300_000))
    s.discard(1 << 40)
    s.discard(12345678)  # absent: no error
    assert 1 << 40 not in s and len(s) == 100_005
