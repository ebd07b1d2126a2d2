"""Claims waiting for frontends another service holds: the writer's `conflicts`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from ..model import ServiceKey


class Claims(Mapping[bytes, tuple[ServiceKey, ...]]):
    """Per frontend key, the services waiting for it in the order they first claimed it: when
    it is freed the first is tried first (first come, first served; a third claimant must not
    push out the second). Per service, the frontends it waits for, so its claims are replaced
    or dropped in O(its claims), never by a scan of everyone's. As a mapping: frontend key ->
    the services waiting; its length is the frontends waited for (what status counts)."""

    def __init__(self) -> None:
        self._by_fk: dict[bytes, dict[ServiceKey, int]] = {}  # -> waiting service: its claim's number
        self._by_key: dict[ServiceKey, set[bytes]] = {}
        self._seq = 0

    def __getitem__(self, fk: bytes) -> tuple[ServiceKey, ...]:
        return tuple(self._by_fk[fk])

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._by_fk)

    def __len__(self) -> int:
        return len(self._by_fk)

    def wait(self, fk: bytes, key: ServiceKey) -> None:
        """`key` waits for `fk`; a service already waiting keeps its place."""
        waiting = self._by_fk.setdefault(fk, {})
        if key not in waiting:
            self._seq += 1
            waiting[key] = self._seq
            self._by_key.setdefault(key, set()).add(fk)

    def set(self, key: ServiceKey, fks: Iterable[bytes]) -> None:
        """`key` now waits for exactly `fks`: its claims on others (frontends it got, or no
        longer wants) go. O(its claims before and after)."""
        fks = set(fks)
        for fk in self._by_key.get(key, set()) - fks:
            self._drop(fk, key)
        for fk in fks:
            self.wait(fk, key)

    def drop(self, key: ServiceKey) -> None:
        """All of `key`'s claims (the service is gone)."""
        for fk in list(self._by_key.get(key, ())):
            self._drop(fk, key)

    def waits(self, fk: bytes, key: ServiceKey) -> bool:
        return key in self._by_fk.get(fk, ())

    def queue(self, fks: Iterable[bytes]) -> list[tuple[bytes, ServiceKey]]:
        """The claims waiting on `fks`, (frontend, service), in the order they were made."""
        rows = [(seq, fk, key) for fk in set(fks) for key, seq in self._by_fk.get(fk, {}).items()]
        rows.sort(key=lambda r: r[0])
        return [(fk, key) for _, fk, key in rows]

    def _drop(self, fk: bytes, key: ServiceKey) -> None:
        waiting = self._by_fk.get(fk)
        if waiting is not None and waiting.pop(key, None) is not None and not waiting:
            del self._by_fk[fk]
        mine = self._by_key.get(key)
        if mine is not None:
            mine.discard(fk)
            if not mine:
                del self._by_key[key]
