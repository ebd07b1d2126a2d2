"""Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4), in pure Python.

Each backend gets a permutation of the table's slots from two hashes of a stable name
("address:port"): offset = h1 mod M, skip = h2 mod (M-1) + 1, slot j = (offset + j*skip)
mod M. Backends take turns claiming their next preferred free slot until all M are
taken. With the same names every node (and every restart) builds the same table, and
removing one of N backends moves little more than its own 1/N of the slots.

Speed without numpy: the plain algorithm probes about M*ln(M) times, mostly at the end
when almost every slot is taken. Once only ~M/(2N) slots are free we switch to an exact
shortcut: a backend's next claim is the free slot of lowest rank in its permutation
(rank = (slot - offset) * skip^-1 mod M; every lower-ranked slot is already taken), so
each backend sorts the few remaining free slots by rank once and walks that list.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Iterable

log = logging.getLogger(__name__)

DEFAULT_SIZE = 16381  # Cilium's default M: prime, ~100x a typical backend count

__all__ = ["DEFAULT_SIZE", "build_table", "is_prime", "permutation_params"]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's permutation; stable across processes and machines."""
    # blake2b, not hash(): Python's str hash is randomised per process.
    d = hashlib.blake2b(name.encode(), digest_size=16, person=b"kpr-maglev").digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def _fill(offsets: list[int], skips: list[int], size: int) -> list[int]:
    """Owner index (into offsets/skips) of every slot."""
    n = len(offsets)
    m = size
    taken = bytearray(m)
    owner = [0] * m
    pos = list(offsets)  # each backend's current candidate slot
    # Phase 1: probe permutations directly while free slots are plentiful. Stop after a whole
    # round so phase 2 resumes with backend 0, as the plain algorithm would.
    tail = max(m // (2 * n), 1)
    rounds = (m - tail) // n
    backends = range(n)
    for _ in range(rounds):
        for i in backends:
            c = pos[i]
            if taken[c]:
                s = skips[i]
                c += s
                if c >= m:
                    c -= m
                while taken[c]:
                    c += s
                    if c >= m:
                        c -= m
            taken[c] = 1
            owner[c] = i
            pos[i] = c
    filled = rounds * n
    if filled == m:
        return owner
    # Phase 2: each backend's remaining free slots in permutation order, by rank.
    free = [p for p in range(m) if not taken[p]]
    ranked: list[list[int]] = []
    for i in backends:
        off, inv = offsets[i], pow(skips[i], -1, m)
        ranks = [((p - off) * inv) % m for p in free]
        ranks.sort()
        ranked.append(ranks)
    ptr = [0] * n
    while True:
        for i in backends:
            ranks, k, off, s = ranked[i], ptr[i], offsets[i], skips[i]
            c = (off + ranks[k] * s) % m
            while taken[c]:
                k += 1
                c = (off + ranks[k] * s) % m
            taken[c] = 1
            owner[c] = i
            ptr[i] = k + 1
            filled += 1
            if filled == m:
                return owner


def build_table(backends: Iterable[tuple[int, str]], size: int = DEFAULT_SIZE) -> array:
    """Maglev table of `size` backend ids for (backend id, stable name) pairs.

    The order of `backends` does not matter (they are sorted by name). Names must be unique;
    an empty input gives a table of zeros (id 0 is "no backend" in the maps).
    """
    if not is_prime(size):
        raise ValueError(f"Maglev table size must be prime, got {size}")
    items = sorted(backends, key=lambda b: b[1])
    if not items:
        return array("I", bytes(4 * size))
    names = [name for _, name in items]
    if len(set(names)) != len(names):
        raise ValueError("Maglev backend names must be unique")
    if len(items) > size:
        raise ValueError(f"{len(items)} backends do not fit a Maglev table of {size} slots")
    ids = [bid for bid, _ in items]
    if len(items) == 1:
        return array("I", ids) * size
    params = [permutation_params(name, size) for name in names]
    owner = _fill([o for o, _ in params], [s for _, s in params], size)
    return array("I", map(ids.__getitem__, owner))
