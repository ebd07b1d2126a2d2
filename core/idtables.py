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


class IdCounts(_Dense):
    """id -> a count (a signed 64-bit integer)."""

    __slots__ = ("_counts",)

    def __init__(self, items: Mapping[int, int] | None = None) -> None:
        super().__init__()
        self._counts = array("q")
        if items:
            self.update(items)

    def _grow(self, n: int) -> None:
        super()._grow(n)
        self._counts.frombytes(bytes(8 * (n - len(self._counts))))

    def _fits(self, value: Any) -> bool:
        return type(value) is int and -(1 << 63) <= value < (1 << 63)

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
                    run = array("q", deltas.values())
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
                    counts[i] += d
                    continue
                v = d + (far.pop(i, 0) if far else 0)
                if -(1 << 63) <= v < (1 << 63):
                    has[i] = 1
                    added += 1
                    counts[i] = v
                    continue
            self._n += added
            added = 0
            self[i] = self.get(i, 0) + d
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
        """Add ids lo, lo+1, ... with these counts (an array("q")) when none of them is
        present: slice copies. False, nothing added: not that case."""
        n = len(counts)
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
