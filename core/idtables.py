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
        self._counts.extend([0] * (n - len(self._counts)))

    def _fits(self, value: Any) -> bool:
        return type(value) is int and -(1 << 63) <= value < (1 << 63)

    def _read(self, i: int) -> int:
        return self._counts[i]

    def _write(self, i: int, value: int) -> None:
        self._counts[i] = value

    def _empty(self) -> int:
        return 0
