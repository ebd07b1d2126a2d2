"""Handles on a real BPF map for tests that must see the order of writes to it or make one
fail: the kernel map and its syscalls stay real, only the handle the code under test holds
is swapped (and swapped back by the test)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kpr.bpf import maps as M


def broken(real: M.BpfMap) -> M.BpfMap:
    """A handle on no map (fd -1): every syscall through it fails (EBADF), as a real one can."""
    return M.BpfMap(-1, real.name, real.key_size, real.value_size, real.type)


class Borrowed(M.BpfMap):
    """The real handle's map by its fd; closing this leaves the fd to its owner."""

    def __init__(self, real: M.BpfMap) -> None:
        super().__init__(real.fd, real.name, real.key_size, real.value_size, real.type)

    def close(self) -> None:
        pass


class Watched(Borrowed):
    """Each write is logged as (map name, op) before it is made, and `after` called once it is
    done (a check of an invariant between maps, say)."""

    def __init__(self, real: M.BpfMap, log: list[tuple[str, str]], after: Callable[[str, str], None] = lambda n, o: None) -> None:
        super().__init__(real)
        self.log, self.after = log, after
        self._inside = False  # a batch falling back to single writes is one write

    def _write(self, op: str, fn: Callable[[], object]) -> object:
        if self._inside:
            return fn()
        self.log.append((self.name, op))
        self._inside = True
        try:
            return fn()
        finally:
            self._inside = False
            self.after(self.name, op)

    def update(self, key: bytes, value: bytes, flags: int = M.BPF_ANY) -> None:
        self._write("update", lambda: super(Watched, self).update(key, value, flags))

    def delete(self, key: bytes) -> bool:
        return bool(self._write("delete", lambda: super(Watched, self).delete(key)))

    def update_many(self, keys: Sequence[bytes], values: Sequence[bytes], *, batch: bool = True) -> None:
        self._write("update", lambda: super(Watched, self).update_many(keys, values, batch=batch))

    def delete_many(self, keys: Sequence[bytes], *, batch: bool = True) -> None:
        self._write("delete", lambda: super(Watched, self).delete_many(keys, batch=batch))


class StopsPartWay(Borrowed):
    """A batch write that makes its first `n` elements and then fails, as a batch stopped by
    the kernel part way does: the rest go through a broken handle (a real EBADF)."""

    def __init__(self, real: M.BpfMap, n: int) -> None:
        super().__init__(real)
        self.n = n

    def update_many(self, keys: Sequence[bytes], values: Sequence[bytes], *, batch: bool = True) -> None:
        super().update_many(keys[: self.n], values[: self.n], batch=batch)
        broken(self).update_many(keys[self.n :], values[self.n :], batch=batch)
