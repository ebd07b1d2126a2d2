"""kpr.idtables.KeyIds: the writer's backend identity -> id table behaves as the dict it
replaces, before and after its entries move into the compact table, whatever the order of
sets, deletes and compactions (ids and values kept in an IdBytes as the writer keeps them)."""

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kpr.idtables import IdBytes, KeyIds


def _key(rng: random.Random) -> bytes:
    return bytes(18) + bytes((rng.randrange(0, 40),)) if rng.random() < 0.5 else rng.randbytes(19)


def test_key_ids_behave_as_a_dict_through_compactions():
    rng = random.Random(5)
    vals = IdBytes(24)
    ids = KeyIds(vals, 19)
    model: dict[bytes, int] = {}
    free = list(range(1, 3000))
    rng.shuffle(free)
    for step in range(20000):
        op = rng.random()
        if op < 0.35 and free:
            key = _key(rng)
            if key in model:
                continue
            bid = free.pop()
            ids[key] = model[key] = bid  # allocated (in the dict), its value written after
            if rng.random() < 0.9:
                vals[bid] = key + rng.randbytes(5)
        elif op < 0.55 and model:
            key = rng.choice(list(model)) if rng.random() < 0.9 else _key(rng)
            bid = model.pop(key, None)
            if rng.random() < 0.5:
                assert ids.pop(key, None) == bid
            else:
                ids.discard_many([(key, bid if bid is not None else 1 << 31)])
            if bid is not None:
                vals.pop(bid, None)
                free.insert(0, bid)
        elif op < 0.6:
            ids.compact(rng.choice([None, 1, 7, 100]))
        else:
            keys = [rng.choice(list(model)) if model and rng.random() < 0.7 else _key(rng) for _ in range(5)]
            assert ids.get_many(keys) == [model.get(k) for k in keys]
            assert [ids.get(k) for k in keys] == [model.get(k) for k in keys]
            assert [k in ids for k in keys] == [k in model for k in keys]
        assert len(ids) == len(model) and bool(ids) == bool(model)
        if step % 1000 == 0:
            assert dict(ids.items()) == model and ids == model
    ids.compact()
    assert dict(ids.items()) == model and sorted(ids) == sorted(model)
    moved_all = all(vals.get(b, b"")[:19] == k for k, b in model.items())
    assert ids.pending() == 0 or not moved_all


def test_key_ids_keep_in_the_dict_what_vals_does_not_confirm():
    vals = IdBytes(24)
    ids = KeyIds(vals, 19)
    a, b, c = b"a" * 19, b"b" * 19, b"c" * 19
    vals[1] = a + bytes(5)
    vals[2] = c + bytes(5)  # another key at b's id: not b's entry
    ids.update({a: 1, b: 2, c: 7})  # c: no value at 7
    assert ids.compact() == 1 and ids.pending() == 2
    assert ids[a] == 1 and ids[b] == 2 and ids[c] == 7 and len(ids) == 3
    ids[a] = 5  # set again: the table's entry goes, the dict's wins
    assert ids[a] == 5 and len(ids) == 3
    del ids[a]
    assert a not in ids and ids.get(a) is None
    with pytest.raises(KeyError):
        ids[a]
    with pytest.raises(KeyError):
        del ids[a]


def test_key_ids_take_a_full_syncs_dict_and_add_new_keys():
    vals = IdBytes(24)
    keys = [bytes((i % 256, i // 256)) * 9 + b"\x06" for i in range(5000)]
    vals.store_run(1, b"".join(k + bytes(5) for k in keys))
    ids = KeyIds(vals, 19)
    bulk = dict(zip(keys, range(1, 5001)))
    ids.take(bulk)
    assert ids.compact(1000) == 1000 and ids.pending() == 4000
    assert ids.compact() == 4000 and ids.pending() == 0
    assert ids.get_many(keys[::-1] + [b"x" * 19]) == list(range(5000, 0, -1)) + [None]
    ids.add_new([(b"x" * 19, 9000)])
    assert ids[b"x" * 19] == 9000 and len(ids) == 5001


def test_key_ids_compact_ids_the_values_keep_far_from_the_dense_ones():
    """A restart adopts backends whose ids all lie far above 0 (the low ids freed before):
    IdBytes keeps such values in its dict, not its arrays. Their identities still move into
    the table (they stayed in KeyIds's dict for good before, and kept every operation
    scheduling a compaction that moved none of them)."""
    vals = IdBytes(24)
    far = {200_000 + 3 * i: bytes((i % 251, i // 251)) + bytes(17) + bytes(5) for i in range(3000)}
    vals.update(far)
    assert vals._far, "the case needs ids IdBytes keeps in its dict"
    model = {v[:19]: bid for bid, v in far.items()}
    ids = KeyIds(vals, 19, model)
    assert ids.compact() == len(model)
    assert ids.pending() == 0
    assert ids == model and dict(ids.items()) == model
    assert ids.get_many(list(model)) == list(model.values())
    # a far id freed (its identity dropped first, as the writer does) and given to another
    key, bid = next(iter(model.items()))
    ids.discard_many([(key, bid)])
    del model[key]
    vals.pop(bid)
    assert ids.get(key) is None and len(ids) == len(model)
    vals[bid] = bytes(range(1, 20)) + bytes(5)
    ids.add_new([(bytes(range(1, 20)), bid)])
    model[bytes(range(1, 20))] = bid
    assert ids.compact() == 1 and ids == model and len(ids) == len(model)


def _same_tag_pair() -> tuple[bytes, bytes]:
    """Two 19-byte keys whose hashes share the low 32 bits (the part KeyIds keeps in a slot):
    found by brute force in this process (bytes hashes are salted per process)."""
    seen: dict[int, bytes] = {}
    rng = random.Random(11)
    while True:
        key = rng.randbytes(19)
        tag = hash(key) & 0xFFFFFFFF
        other = seen.setdefault(tag, key)
        if other != key:
            return other, key


def test_key_ids_tell_apart_keys_whose_slots_keep_the_same_hash_part():
    a, b = _same_tag_pair()
    vals = IdBytes(24)
    ids = KeyIds(vals, 19)
    vals[3], vals[9] = a + bytes(5), b + bytes(5)
    ids.add_new([(a, 3), (b, 9)])
    assert ids.compact() == 2 and ids.pending() == 0
    assert ids.get_many([a, b]) == [3, 9] and ids[a] == 3 and ids[b] == 9
    ids.discard_many([(b, 3)])  # b is not at 3: nothing goes
    assert len(ids) == 2
    ids.discard_many([(a, 3)])
    vals.pop(3)
    assert a not in ids and ids[b] == 9  # (b's slot after a's tombstone still found)
    vals[3] = b"z" * 19 + bytes(5)  # 3 reused by another key: a stays absent
    assert a not in ids and ids.get_many([a, b]) == [None, 9]


# Writer-like use (kpr.servicemaps): a key absent is added with add_new, its value written
# (or the id forgotten unwritten, as _forget_render does); a freed id's identity is dropped
# before its value goes; ids come back (to the same key or another); compactions of any size
# come between. Ids both dense in IdBytes and far above them (kept in its dict).
_PAIR = _same_tag_pair()
_KEYS = [bytes((i,)) * 19 for i in range(1, 13)] + list(_PAIR)
_IDS = list(range(1, 16)) + list(range(300_000, 300_008))


class KeyIdsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vals = IdBytes(24)
        self.ids = KeyIds(self.vals, 19)
        self.model: dict[bytes, int] = {}
        self.free = list(_IDS)

    @rule(
        key=st.sampled_from(_KEYS),
        pick=st.integers(0, 100),
        written=st.booleans(),
        tail=st.binary(min_size=5, max_size=5),
    )
    def add(self, key: bytes, pick: int, written: bool, tail: bytes) -> None:
        if key in self.model or not self.free:
            return
        assert self.ids.get(key) is None
        bid = self.free.pop(pick % len(self.free))
        self.ids.add_new([(key, bid)])
        if written:
            self.vals[bid] = key + tail
            self.model[key] = bid
        else:
            self.ids.discard_many([(key, bid)])
            self.free.append(bid)

    @rule(key=st.sampled_from(_KEYS), by_pop=st.booleans())
    def free_one(self, key: bytes, by_pop: bool) -> None:
        bid = self.model.pop(key, None)
        if bid is None:
            return
        if by_pop:
            assert self.ids.pop(key) == bid
        else:
            self.ids.discard_many([(key, bid)])
        self.vals.pop(bid)
        self.free.insert(0, bid)

    @rule(key=st.sampled_from(_KEYS), tail=st.binary(min_size=5, max_size=5))
    def new_tail(self, key: bytes, tail: bytes) -> None:
        bid = self.model.get(key)
        if bid is not None:
            self.vals[bid] = key + tail  # (the identity stays: flags change)

    @rule(limit=st.sampled_from([None, 1, 2, 5]))
    def compact(self, limit: int | None) -> None:
        self.ids.compact(limit)

    @invariant()
    def same_as_the_dict(self) -> None:
        ids, model = self.ids, self.model
        assert ids.get_many(_KEYS) == [model.get(k) for k in _KEYS]
        assert [k in ids for k in _KEYS] == [k in model for k in _KEYS]
        assert len(ids) == len(model) and dict(ids.items()) == model


TestKeyIdsMachine = KeyIdsMachine.TestCase
TestKeyIdsMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_same_compares_present_ids_and_values_only() -> None:
    a = IdBytes(4, {1: b"aaaa", 2: b"bbbb", 9000: b"far!"})
    b = IdBytes(4, {2: b"bbbb", 1: b"aaaa", 9000: b"far!"})
    assert a.same(b) and b.same(a)
    b[3] = b"cccc"
    assert not a.same(b)
    b.pop(3)  # (its bytes may stay in the buffer: absent ids do not count)
    assert a.same(b)
    b[2] = b"bbbX"
    assert not a.same(b)
    b[2] = b"bbbb"
    b[9000] = b"far?"
    assert not a.same(b)
    assert not a.same(IdBytes(5, {1: b"aaaaa", 2: b"bbbbb", 9000: b"far!!"}))


def test_rebind_checks_the_keys_against_the_other_values() -> None:
    vals = IdBytes(4, {1: b"ab-1", 2: b"cd-2"})
    ids = KeyIds(vals, 2, {b"ab": 1, b"cd": 2})
    assert ids.compact() == 2
    again = IdBytes(4, {1: b"ab-1", 2: b"cd-2"})
    assert vals.same(again)
    ids.rebind(again)
    vals[1] = b"zz-1"  # the old values no longer matter
    assert ids.get(b"ab") == 1 and ids.get(b"cd") == 2 and ids.get(b"zz") is None
    again[2] = b"xy-2"  # the new ones do: the entry of id 2 no longer holds
    assert ids.get(b"cd") is None
