"""Tables keyed by small integer ids, in flat arrays instead of dicts.

The service map writer keeps, per backend id, the backend's map value and how many frontends
refer to it: hundreds of thousands of entries at 20k services. Ids are allocated from 1 up,
so they are dense, and a flat array costs a few bytes per id where a dict costs about a
hundred (its slot, an int and a bytes object). Ids far beyond the dense range (adopted from
maps edited by hand) go to a dict, so any id works; only memory differs.

Both tables implement the part of the mapping API the writer uses (get, in, [], []=, pop,
items, update, len; iteration: the dense ids in order, then the others).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from itertools import compress
from operator import not_, sub
from typing import Any

# An id is kept in the arrays when it is below this many slots beyond their current end.
_SLACK = 1 << 16


class _Dense:
    __slots__ = ("_has", "_far", "_n")

    def __init__(self) -> None:
        self._has = bytearray()  # 1 where the id is present
        self._far: dict[int, Any] = {}
        self._n = 0  # ids present in the arrays

    def _slot(self, i: int) -> bool:
        """Whether id i belongs in the arrays (growing them to hold it)."""
        has = self._has
        if 0 <= i < len(has):
            return True
        if i < 0 or i >= 2 * len(has) + _SLACK:
            return False
        self._grow(i + 1 + len(has) // 2)
        return True

    def _grow(self, n: int) -> None:
        self._has.extend(bytes(n - len(self._has)))

    def reserve(self, top: int) -> None:
        """Keep ids below `top` in the arrays (grown now). The arrays take ids only within
        _SLACK of their end: a table about to take many ids far above it (a restart adopting
        backends whose low ids were freed long ago) would hold them all in the dict, about a
        hundred bytes each more than the arrays' few per id up to the highest."""
        if top > len(self._has):
            self._grow(top)

    def _run_slots(self, lo: int, n: int) -> bool:
        """Whether ids lo..lo+n-1 belong in the arrays (growing them): a run starting within
        reach of the dense ids stays dense however long it is."""
        if not self._slot(lo):
            return False
        if lo + n > len(self._has):
            self._grow(lo + n + len(self._has) // 2)
        return True

    def __len__(self) -> int:
        return self._n + len(self._far)

    def __contains__(self, i: object) -> bool:
        if type(i) is int and 0 <= i < len(self._has) and self._has[i]:
            return True
        return i in self._far

    def __iter__(self) -> Iterator[int]:
        has = self._has
        yield from (i for i in range(len(has)) if has[i])
        yield from sorted(self._far)

    def keys(self) -> Iterator[int]:
        return iter(self)

    def __getitem__(self, i: int) -> Any:
        if type(i) is int and 0 <= i < len(self._has) and self._has[i]:
            return self._read(i)
        return self._far[i]

    def get(self, i: int, default: Any = None) -> Any:
        has = self._has
        if type(i) is int and 0 <= i < len(has) and has[i]:
            return self._read(i)
        return self._far.get(i, default) if self._far else default

    def __setitem__(self, i: int, value: Any) -> None:
        if self._fits(value) and self._slot(i):
            if self._far:
                self._far.pop(i, None)
            if not self._has[i]:
                self._has[i] = 1
                self._n += 1
            self._write(i, value)
        else:
            self.pop(i, None)
            self._far[i] = value

    def pop(self, i: int, default: Any = None) -> Any:
        has = self._has
        if type(i) is int and 0 <= i < len(has) and has[i]:
            value = self._read(i)
            has[i] = 0
            self._n -= 1
            self._write(i, self._empty())
            return value
        return self._far.pop(i, default)

    def items(self) -> Iterator[tuple[int, Any]]:
        has, read = self._has, self._read
        yield from ((i, read(i)) for i in range(len(has)) if has[i])
        yield from sorted(self._far.items())

    def update(self, other: Mapping[int, Any] | Iterable[tuple[int, Any]]) -> None:
        for i, value in other.items() if isinstance(other, Mapping) else other:
            self[i] = value

    def missing(self, ids: Iterable[int]) -> list[int]:
        """The ids not in the table, in the order given (one call for many: a full sync asks
        about hundreds of thousands)."""
        if not self._n and not self._far:
            return list(ids)  # an empty table (a full sync into empty maps)
        has, far = self._has, self._far
        top = len(has)
        return [i for i in ids if not (type(i) is int and 0 <= i < top and has[i]) and i not in far]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (_Dense, dict)):
            return len(self) == len(other) and all(other.get(i) == v for i, v in self.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"

    # per kind of value
    def _fits(self, value: Any) -> bool:
        raise NotImplementedError

    def _read(self, i: int) -> Any:
        raise NotImplementedError

    def _write(self, i: int, value: Any) -> None:
        raise NotImplementedError

    def _empty(self) -> Any:
        raise NotImplementedError


class IdBytes(_Dense):
    """id -> bytes of one size (`size`); values of another size are kept too (in the dict)."""

    __slots__ = ("size", "_buf")

    def __init__(self, size: int, items: Mapping[int, bytes] | None = None) -> None:
        super().__init__()
        self.size = size
        self._buf = bytearray()
        if items:
            self.update(items)

    def _grow(self, n: int) -> None:
        super()._grow(n)
        self._buf.extend(bytes(n * self.size - len(self._buf)))

    def _fits(self, value: Any) -> bool:
        return type(value) is bytes and len(value) == self.size

    def _read(self, i: int) -> bytes:
        s = self.size
        return bytes(self._buf[i * s : i * s + s])

    def _write(self, i: int, value: bytes) -> None:
        s = self.size
        self._buf[i * s : i * s + s] = value

    def update(self, other: Mapping[int, Any] | Iterable[tuple[int, Any]]) -> None:
        # The loop of __setitem__ inlined: the writer stores hundreds of thousands at once.
        if isinstance(other, Mapping) and self._fill_run(other):
            return
        s, has, buf, far = self.size, self._has, self._buf, self._far
        added = 0
        for i, value in other.items() if isinstance(other, Mapping) else other:
            # _slot grows _has and _buf in place: the local names stay valid
            if type(value) is bytes and len(value) == s and type(i) is int and (0 <= i < len(has) or self._slot(i)):
                if far:
                    far.pop(i, None)
                if not has[i]:
                    has[i] = 1
                    added += 1
                buf[i * s : i * s + s] = value
            else:
                self._n += added
                added = 0
                self[i] = value
        self._n += added

    def _fill_run(self, other: Mapping[int, Any]) -> bool:
        """Store `other` with two slice copies when its ids are one ascending run none of
        which is present (new ids, as a full sync allocates them); False: not that case."""
        n = len(other)
        if n < 64:
            return False
        lo = next(iter(other))
        values = list(other.values())
        if type(lo) is not int or list(other) != list(range(lo, lo + n)) or set(map(type, values)) != {bytes}:
            return False
        if set(map(len, values)) != {self.size}:
            return False
        return self.store_run(lo, b"".join(values))

    def same(self, other: "IdBytes") -> bool:
        """Whether both hold the same ids with the same values, compared at C speed (False
        may also mean: not known to be, as with values of another size)."""
        if self.size != other.size or self._n != other._n or self._far != other._far:
            return False
        a, b = self._has, other._has
        n = min(len(a), len(b))
        end = n * self.size
        if len(self._buf) < end or len(other._buf) < end or a[:n] != b[:n] or any(a[n:]) or any(b[n:]):
            return False
        # (only present ids' values count: an absent id's bytes may be left from before)
        mine, theirs = memoryview(self._buf)[:end], memoryview(other._buf)[:end]
        if mine == theirs:
            return True
        s = self.size
        return all(mine[i * s : i * s + s] == theirs[i * s : i * s + s] for i in range(n) if a[i])

    def store_run(self, lo: int, blob: bytes) -> bool:
        """Store the values for ids lo, lo+1, ... given concatenated (`size` bytes each) when
        none of those ids is present (new ids, as a full sync allocates them): two slice
        copies. False, nothing stored: not that case."""
        s = self.size
        n = len(blob) // s
        if n * s != len(blob) or lo < 0:
            return False
        has = self._has
        if lo >= len(has) and not self._far and lo < 2 * len(has) + _SLACK:
            # past the end (a full sync into an empty table): appended, nothing zeroed first
            has.extend(bytes(lo - len(has)))
            has.extend(b"\x01" * n)
            self._buf.extend(bytes(lo * s - len(self._buf)))
            self._buf += blob
            self._n += n
            return True
        if (
            not self._run_slots(lo, n)
            or any(self._has[lo : lo + n])
            or (self._far and not self._far.keys().isdisjoint(range(lo, lo + n)))
        ):
            return False
        self._has[lo : lo + n] = b"\x01" * n
        self._buf[lo * s : (lo + n) * s] = blob
        self._n += n
        return True

    def pop_many(self, ids: Iterable[int]) -> list[bytes | None]:
        """Remove the ids; their values in order (None where absent)."""
        s, has, buf, far = self.size, self._has, self._buf, self._far
        top, empty = len(has), bytes(s)
        out: list[bytes | None] = []
        gone = 0
        for i in ids:
            if type(i) is int and 0 <= i < top and has[i]:
                out.append(bytes(buf[i * s : i * s + s]))
                has[i] = 0
                buf[i * s : i * s + s] = empty
                gone += 1
            else:
                out.append(far.pop(i, None))
        self._n -= gone
        return out

    def holds(self, ids: list[int], blob: bytes) -> bool:
        """Whether the table holds exactly these values (`blob`: concatenated, `size` bytes
        each, in the order of `ids`): a slice comparison per run of consecutive ids when they
        come mostly in runs (a full sync's after a restart), else id by id (an id listed
        twice: both values)."""
        s = self.size
        n = len(ids)
        if len(blob) != n * s:
            return False
        if not n:
            return True
        has, buf = self._has, self._buf
        if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < len(has):
            # where a run ends: the next id is not one more
            breaks = [j for j, d in enumerate(map(sub, ids[1:], ids), 1) if d != 1]
            if len(breaks) < n // 4:
                for a, b in zip((0, *breaks), (*breaks, n)):
                    lo, k = ids[a], b - a
                    if has.count(1, lo, lo + k) != k or buf[lo * s : (lo + k) * s] != blob[a * s : b * s]:
                        return False
                return True
        get = self.get
        return all(get(i) == blob[k * s : k * s + s] for k, i in enumerate(ids))

    def changed(self, values: Mapping[int, bytes]) -> list[int]:
        """The ids of `values` the table lacks or holds another value for."""
        if not self._n and not self._far:
            return list(values)  # an empty table: every one is new
        s, has, buf, far = self.size, self._has, self._buf, self._far
        top = len(has)
        out = []
        for i, v in values.items():
            if type(i) is int and 0 <= i < top and has[i]:
                if buf[i * s : i * s + s] != v:
                    out.append(i)
            elif far.get(i) != v:
                out.append(i)
        return out

    def _empty(self) -> bytes:
        return bytes(self.size)


# IdCounts's arrays hold signed 32-bit counts (the writer's are references to a backend: a
# few per backend); any other int is kept in the dict, as ids far above the dense ones.
_CMIN, _CMAX = -(1 << 31), (1 << 31) - 1


class IdCounts(_Dense):
    """id -> a count (any int: 4 bytes per id up to the highest where it fits in 32 bits,
    half of a 64-bit array's, 0.85 MB at the 200k backends of 20k services)."""

    __slots__ = ("_counts",)

    def __init__(self, items: Mapping[int, int] | None = None) -> None:
        super().__init__()
        self._counts = array("i")
        if items:
            self.update(items)

    def _grow(self, n: int) -> None:
        super()._grow(n)
        self._counts.frombytes(bytes(4 * (n - len(self._counts))))

    def _fits(self, value: Any) -> bool:
        return type(value) is int and _CMIN <= value <= _CMAX

    def _read(self, i: int) -> int:
        return self._counts[i]

    def _write(self, i: int, value: int) -> None:
        self._counts[i] = value

    def get_many(self, ids: Iterable[int], default: int = 0) -> list[int]:
        """The counts of the ids in order (`default` where absent)."""
        has, counts, far = self._has, self._counts, self._far
        top = len(has)
        return [counts[i] if type(i) is int and 0 <= i < top and has[i] else far.get(i, default) for i in ids]

    def pop_many(self, ids: Iterable[int]) -> None:
        """Remove the ids (absent ones are no error)."""
        has, counts, far = self._has, self._counts, self._far
        top = len(has)
        gone = 0
        for i in ids:
            if type(i) is int and 0 <= i < top and has[i]:
                has[i] = 0
                counts[i] = 0
                gone += 1
            elif far:
                far.pop(i, None)
        self._n -= gone

    def add_many(self, deltas: Mapping[int, int]) -> None:
        """self[i] = self.get(i, 0) + d for every (i, d): ids not present are added."""
        n = len(deltas)
        if n >= 64:
            # one ascending run of new ids (a full sync's): one slice copy
            lo = next(iter(deltas))
            if (
                type(lo) is int
                and lo >= 0
                and self._run_slots(lo, n)
                and list(deltas) == list(range(lo, lo + n))
                and not any(self._has[lo : lo + n])
                and (not self._far or self._far.keys().isdisjoint(deltas))
            ):
                try:
                    run = array("i", deltas.values())
                except (OverflowError, TypeError):
                    pass
                else:
                    self._store_run(lo, run)
                    return
        has, counts, far = self._has, self._counts, self._far
        added = 0
        for i, d in deltas.items():
            # _slot grows _has and _counts in place: the local names stay valid
            if type(i) is int and (0 <= i < len(has) or self._slot(i)):
                if has[i]:
                    v = counts[i] + d
                    if _CMIN <= v <= _CMAX:
                        counts[i] = v
                        continue
                else:
                    v = d + (far.pop(i, 0) if far else 0)
                    if _CMIN <= v <= _CMAX:
                        has[i] = 1
                        added += 1
                        counts[i] = v
                        continue
                # (out of the array's range: to the dict, below)
            else:
                v = self.get(i, 0) + d
            self._n += added
            added = 0
            self[i] = v
        self._n += added

    def zero_ids(self) -> list[int]:
        """The ids present whose count is 0, ascending (at C speed: a full sync asks about
        every id)."""
        has, counts = self._has, self._counts
        zero = list(compress(range(len(counts)), map(not_, counts)))
        out = list(compress(zero, map(has.__getitem__, zero)))
        if self._far:
            out += sorted(i for i, n in self._far.items() if n == 0)
        return out

    def add_run(self, lo: int, counts: array) -> bool:
        """Add ids lo, lo+1, ... with these counts (an array of ints) when none of them is
        present: slice copies. False, nothing added: not that case."""
        n = len(counts)
        if counts.typecode != "i":
            try:
                counts = array("i", counts)
            except OverflowError:
                return False
        if (
            lo < 0
            or not self._run_slots(lo, n)
            or any(self._has[lo : lo + n])
            or (self._far and not self._far.keys().isdisjoint(range(lo, lo + n)))
        ):
            return False
        self._store_run(lo, counts)
        return True

    def _store_run(self, lo: int, counts: array) -> None:
        n = len(counts)
        self._has[lo : lo + n] = b"\x01" * n
        self._counts[lo : lo + n] = counts
        self._n += n

    def _empty(self) -> int:
        return 0


class IdSet(_Dense):
    """A set of small integer ids (rev-NAT indexes): one byte per id up to the highest, where
    a set of ints takes about a hundred (its slot and the int). Ids far beyond the dense range
    go to the dict (value True), so any int works. The part of the set API the writer uses:
    add, discard, update, in, isdisjoint, len, iteration (ascending, the dense ones first)."""

    __slots__ = ()

    def __init__(self, ids: Iterable[int] = ()) -> None:
        super().__init__()
        self.update(ids)

    def _fits(self, value: Any) -> bool:
        return True

    def _read(self, i: int) -> bool:
        return True

    def _write(self, i: int, value: Any) -> None:
        pass

    def _empty(self) -> bool:
        return True

    def add(self, i: int) -> None:
        has = self._has
        if type(i) is int and 0 <= i < len(has):
            if not has[i]:
                has[i] = 1
                self._n += 1
        else:
            self[i] = True

    def discard(self, i: int) -> None:
        self.pop(i, None)

    def update(self, *others: Any) -> None:  # type: ignore[override]
        for ids in others:
            if isinstance(ids, range) and ids.step == 1 and len(ids) and self._run_slots(ids.start, len(ids)):
                # a run of new indexes (a full sync's): counted and set with one slice each
                lo, hi = ids.start, ids.stop
                self._n += (hi - lo) - self._has.count(1, lo, hi)
                self._has[lo:hi] = b"\x01" * (hi - lo)
                if self._far:
                    for i in ids:
                        self._far.pop(i, None)
                continue
            add = self.add
            for i in ids:
                add(i)

    def isdisjoint(self, ids: Iterable[int]) -> bool:
        has, far = self._has, self._far
        if isinstance(ids, range) and ids.step == 1:
            lo, hi = max(ids.start, 0), min(ids.stop, len(has))
            if lo < hi and 1 in has[lo:hi]:
                return False
            return not far or far.keys().isdisjoint(ids)
        return not any(i in self for i in ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (set, frozenset, IdSet)):
            return len(self) == len(other) and all(i in other for i in self)
        return NotImplemented

    def __repr__(self) -> str:
        return f"IdSet({sorted(self)!r})"


# KeyIds's table entries: 0 an empty slot, _DEAD a deleted one (probes go on past it), else
# the key's hash's low 32 bits (which also place it) << 32 | the id.
_DEAD = 0xFFFFFFFF
_LOW = 0xFFFFFFFF


class KeyIds:
    """key -> id for the keys `vals` (an IdBytes) holds at the front of each id's value: the
    writer's backend identity (address, port, protocol: 19 bytes) -> backend id.

    A dict of 19-byte keys takes about a hundred bytes per entry (its slot, the key object,
    the int); here most entries take one or two 8-byte slots of an open-addressing table
    (the key's hash's low half and the id), probed by the key's hash and checked against the
    key at the front of the id's value in `vals` (so the keys are not stored twice). Entries
    go into a dict first (`_over`: new ones, and any whose value is not in `vals` yet) and
    move into the table at `compact()`, which the writer runs off its operations' path
    (values `vals` keeps in its dict, ids far above the dense ones, are checked there).
    Look-ups in the dict are at C speed; in the table, a few array reads and one slice
    comparison.

    What the writer uses: get and len; get_many, add_new, take and discard_many for many keys
    at once; pending, compact and rebind (an adopted restart's shadow). The rest of the
    mapping API ([], []=, del, pop, in, iteration (keys), items, update) is the dict's it
    replaced, for tests and read-outs. A table entry is valid only while `vals` holds its id
    with the same key: the writer removes the entry before it frees or reuses the id, as it
    did with the dict.
    """

    __slots__ = ("_over", "_table", "_live", "_used", "_vals", "_klen")

    def __init__(self, vals: IdBytes, klen: int, items: Mapping[bytes, int] | Iterable[tuple[bytes, int]] = ()) -> None:
        self._vals = vals
        self._klen = klen
        self._over: dict[bytes, int] = dict(items)
        self._table = array("Q")  # size a power of two (or 0), at most half full (live + dead)
        self._live = 0  # ids in the table
        self._used = 0  # slots not empty (live and dead)

    # ------------------------------------------------------------------ the table

    def _find(self, key: bytes) -> int:
        """The table slot holding `key`, -1 when it has none."""
        if not self._live:
            return -1
        table, vals = self._table, self._vals
        has, buf, s, k = vals._has, vals._buf, vals.size, self._klen
        top = len(has)
        mask = len(table) - 1
        tag = hash(key) & _LOW
        i = tag & mask
        while True:
            e = table[i]
            if not e:
                return -1
            if e >> 32 == tag and e != _DEAD:
                bid = e & _LOW
                if buf[bid * s : bid * s + k] == key if bid < top and has[bid] else self._far_holds(bid, key):
                    return i
            i = (i + 1) & mask

    def _far_holds(self, bid: int, key: bytes) -> bool:
        """Whether `vals` keeps id `bid` in its dict with `key` at the front of its value: ids
        far above the dense ones (a restart adopting backends whose low ids were freed before)
        are checked there, so their identities move into the table too."""
        val = self._vals._far.get(bid)
        return val is not None and val[: self._klen] == key

    def _resize(self, n: int) -> None:
        """A new table for `n` entries (at most half full then), the live ones moved (each
        placed by the hash bits it keeps: no key is read)."""
        size = 8
        while size < 2 * n:
            size <<= 1
        old = self._table
        self._table = table = array("Q", bytes(8 * size))
        mask = size - 1
        for e in old:
            if e and e != _DEAD:
                i = (e >> 32) & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = e
        self._used = self._live

    def compact(self, limit: int | None = None) -> int:
        """Move up to `limit` (None: all) of the dict's entries into the table (those whose id
        `vals` holds with the same key); returns how many moved. The writer calls
        it in chunks, under its lock, off its operations' path."""
        over = self._over
        if not over:
            return 0
        if 2 * (self._used + len(over)) > len(self._table):
            self._resize(self._live + len(over))
        vals = self._vals
        has, buf, s, k = vals._has, vals._buf, vals.size, self._klen
        top = len(has)
        table = self._table
        mask = len(table) - 1
        held: list[tuple[bytes, int]] = []
        moved = 0
        popitem = over.popitem
        for _ in range(len(over) if limit is None else min(limit, len(over))):
            key, bid = popitem()
            if (
                type(bid) is int
                and 0 < bid < _DEAD
                and (buf[bid * s : bid * s + k] == key if bid < top and has[bid] else self._far_holds(bid, key))
            ):
                # (the key is in no slot: __setitem__ keeps the dict's keys out of the table)
                tag = hash(key) & _LOW
                i = tag & mask
                while True:
                    got = table[i]
                    if not got:
                        self._used += 1
                        break
                    if got == _DEAD:
                        break
                    i = (i + 1) & mask
                table[i] = tag << 32 | bid
                moved += 1
            else:
                held.append((key, bid))
        over.update(held)
        self._live += moved
        if len(over) < 1024:
            # a dict never gives back its table as it empties: a fresh one of the rest
            self._over = dict(over)
        return moved

    def rebind(self, vals: IdBytes) -> None:
        """Check the keys against `vals` from now on: the same ids and values as the ones it
        had (IdBytes.same), held by another object (the writer's check re-reads them)."""
        self._vals = vals

    def pending(self) -> int:
        """Entries in the dict, not yet moved into the table by compact()."""
        return len(self._over)

    # ------------------------------------------------------------------ mapping API

    def get(self, key: bytes, default: Any = None) -> Any:
        bid = self._over.get(key)
        if bid is not None:
            return bid
        i = self._find(key) if self._live else -1
        return default if i < 0 else self._table[i] & _LOW

    def get_many(self, keys: Iterable[bytes]) -> list[Any]:
        """The ids of the keys in order (None where absent): the dict at C speed, the table
        only for the keys the dict lacks."""
        keys = keys if isinstance(keys, list) else list(keys)
        got = list(map(self._over.get, keys))
        if not self._live or None not in got:
            return got
        # _find inlined (new backends miss the dict and probe the table: a change's every one)
        table, vals = self._table, self._vals
        has, buf, s, k = vals._has, vals._buf, vals.size, self._klen
        top = len(has)
        mask = len(table) - 1
        for j in [j for j, bid in enumerate(got) if bid is None]:
            key = keys[j]
            tag = hash(key) & _LOW
            i = tag & mask
            while e := table[i]:
                if e >> 32 == tag and e != _DEAD:
                    bid = e & _LOW
                    if buf[bid * s : bid * s + k] == key if bid < top and has[bid] else self._far_holds(bid, key):
                        got[j] = bid
                        break
                i = (i + 1) & mask
        return got

    def __getitem__(self, key: bytes) -> int:
        bid = self.get(key)
        if bid is None:
            raise KeyError(key)
        return bid

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __setitem__(self, key: bytes, bid: int) -> None:
        if self._live:
            i = self._find(key)
            if i >= 0:
                self._table[i] = _DEAD
                self._live -= 1
        self._over[key] = bid

    def pop(self, key: bytes, *default: Any) -> Any:
        bid = self._over.pop(key, None)
        if bid is not None:
            return bid
        i = self._find(key) if self._live else -1
        if i >= 0:
            bid = self._table[i] & _LOW
            self._table[i] = _DEAD
            self._live -= 1
            return bid
        if default:
            return default[0]
        raise KeyError(key)

    def __delitem__(self, key: bytes) -> None:
        self.pop(key)

    def update(self, other: Mapping[bytes, int] | Iterable[tuple[bytes, int]]) -> None:
        if not self._live:
            self._over.update(other)  # (at C speed: a full sync's 500k new backends)
            return
        for key, bid in other.items() if isinstance(other, Mapping) else other:
            self[key] = bid

    def add_new(self, pairs: Mapping[bytes, int] | Iterable[tuple[bytes, int]]) -> None:
        """Add keys the caller just found absent (get/get_many said None): no look-up in the
        table first, at C speed."""
        self._over.update(pairs)

    def take(self, new: dict[bytes, int]) -> None:
        """Add the entries of `new`, a dict of keys absent here that the caller hands over and
        no longer touches: kept as it is when this holds nothing (no copy of 500k entries)."""
        if not self._over and not self._live:
            self._over = new
        else:
            self.add_new(new)

    def discard_many(self, pairs: Iterable[tuple[bytes, int]]) -> None:
        """Remove each key that maps to the id given with it (the backends a change freed)."""
        over = self._over
        get = over.get
        for key, bid in pairs:
            if get(key) == bid:
                del over[key]
            elif self._live:
                i = self._find(key)
                if i >= 0 and self._table[i] & _LOW == bid:
                    self._table[i] = _DEAD
                    self._live -= 1

    def __len__(self) -> int:
        return len(self._over) + self._live

    def __bool__(self) -> bool:
        return bool(self._over) or self._live > 0

    def items(self) -> Iterator[tuple[bytes, int]]:
        yield from list(self._over.items())
        vals = self._vals
        has, buf, s, k = vals._has, vals._buf, vals.size, self._klen
        top = len(has)
        for e in self._table:
            if e and e != _DEAD:
                bid = e & _LOW
                key = bytes(buf[bid * s : bid * s + k]) if bid < top and has[bid] else vals._far.get(bid, b"")[:k]
                yield key, bid

    def __iter__(self) -> Iterator[bytes]:
        return (key for key, _ in self.items())

    def keys(self) -> Iterator[bytes]:
        return iter(self)

    def values(self) -> Iterator[int]:
        return (bid for _, bid in self.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (KeyIds, dict)):
            return len(self) == len(other) and all(other.get(key) == bid for key, bid in self.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"KeyIds({dict(self.items())!r})"
