"""Keeping the agent's memory in proportion to the services it serves.

What the agent holds for its lifetime is mostly the sources' objects (parsed manifests or API
objects, shared by the source and the store) and the model translated from them; with tens of
thousands of services these are millions of small dicts, lists and strings. Three things keep
that down, none of which changes what any object means:

- `compact` interns the strings of an object in place: a name, a node name, a protocol or a
  key repeated across 20k objects is kept once, not once per object (json and yaml make a
  new string for every occurrence of a value);
- `gc_paused` keeps the cyclic garbage collector out of a big batch: the objects of an initial
  sync are all long-lived and freed by reference counting, yet each collection of the oldest
  generation would walk every one of them (40% of a 20k-service initial sync);
- `settle`, once the initial state has reached every plugin, collects what is left, moves the
  survivors out of the collector's reach for good (`gc.freeze`) and gives the heap's free
  pages back to the system (`malloc_trim`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_intern = sys.intern
# Dicts of flags only (an endpoint's conditions: ready, serving, terminating), one of each.
# Their keys come from a handful of API fields, so this stays small.
_flags: dict[tuple, dict] = {}
_FLAGS_MAX = 256
_pause_lock = threading.Lock()
_pauses = 0
_was_enabled = False

F = TypeVar("F", bound=Callable[..., Any])


def compact(obj: Any) -> Any:
    """Intern every string in a JSON-like object (dicts, lists, scalars), keys too, in place;
    returns obj. Equality is unchanged: only which string objects hold the text is."""
    if type(obj) is dict:
        _compact_dict(obj)
    elif type(obj) is list:
        _compact_list(obj)
    return obj


def _compact_dict(d: dict) -> None:
    for k, v in d.items():  # replacing values keeps the size, so iterating on is safe
        if type(v) is str:
            d[k] = _intern(v)
        elif type(v) is dict:
            if 0 < len(v) <= 4 and all(type(x) is bool for x in v.values()):
                flags = tuple(v.items())
                shared = _flags.get(flags)
                if shared is not None:
                    d[k] = shared
                elif len(_flags) < _FLAGS_MAX:
                    _flags[flags] = v
            else:
                _compact_dict(v)
        elif type(v) is list:
            _compact_list(v)


def _compact_list(items: list) -> None:
    for i, v in enumerate(items):
        if type(v) is str:
            items[i] = _intern(v)
        elif type(v) is dict:
            _compact_dict(v)
        elif type(v) is list:
            _compact_list(v)


@contextmanager
def _paused() -> Iterator[None]:
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def gc_paused(fn: F) -> F:
    """Run fn with the cyclic garbage collector off (re-entrant, across threads: it stays off
    while any paused call runs), as it was afterwards."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _paused():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def rss_bytes() -> int:
    """This process's resident set (VmRSS), 0 when /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def settle() -> int:
    """After the initial sync: collect garbage, freeze the survivors out of later collections,
    give free heap pages back to the system. Returns the bytes of RSS given back."""
    before = rss_bytes()
    gc.collect()
    gc.freeze()
    trim()
    freed = max(0, before - rss_bytes())
    log.info("memory.settled rss_mb=%.0f freed_mb=%.0f frozen_objects=%d", rss_bytes() / 2**20, freed / 2**20, gc.get_freeze_count())
    return freed
