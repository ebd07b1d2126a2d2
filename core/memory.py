"""Keeping the agent's memory in proportion to the services it serves.

What the agent holds for its lifetime is mostly the sources' objects (parsed manifests or API
objects, shared by the source and the store) and the model translated from them; with tens of
thousands of services these are millions of small dicts, lists and strings. None of what
follows changes what any object means:

- `compact` interns the strings of an object in place, keys too: a name, a node name, a
  protocol or a key repeated across 20k objects is kept once, not once per object (json makes
  a new string for every value, yaml for every key and value), and the flag-only dicts of
  endpoint conditions are shared;
- `gc_paused` keeps the cyclic garbage collector out of a big batch: the objects of an initial
  sync are long-lived and freed by reference counting, yet each collection of the oldest
  generation would walk all of them (40% of a 20k-service initial sync), and so would the
  first collections after it, so what such a batch leaves behind is frozen out of the
  collector's reach (`gc.freeze`);
- `pack` keeps an object the agent must hold but seldom reads (the store's and the files
  source's copy of each manifest, the same bytes in both) as one bytes object (marshal,
  compressed against a dictionary of typical objects: zstd from a Service's size up, or
  deflate for a large one such as an EndpointSlice without the zstandard package), a fifth
  of its dicts, lists and strings (a thirtieth for a compressed EndpointSlice); `unpack`
  gives back an equal object when it is read (translation). Packed early, a full sync never holds every object's dicts at once:
  memory freed between long-lived objects is what keeps RSS up after a sync;
- `one_heap`, for the agent's process, has every thread allocate from glibc's main heap: a
  thread of its own (the files source, the bus's workers) otherwise gets an arena of its own,
  and each keeps its freed memory apart (about 9 MB at 20k services);
- `settle`, once the initial state has reached every plugin, freezes what else survives and
  gives the C heap's free pages back to the system (`malloc_trim`): bcc/LLVM's compile
  buffers and the initial sync's garbage.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import marshal
import sys
import threading
import zlib
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
_METADATA = sys.intern("metadata")
_pause_lock = threading.Lock()
_pauses = 0
_was_enabled = False
_freeze = False  # whether a pause under way asked to freeze at its end (paused(freeze=True))
# New objects a paused batch may leave behind before they are frozen (see gc_paused).
FREEZE_AFTER = 100_000

F = TypeVar("F", bound=Callable[..., Any])


def compact(obj: Any) -> Any:
    """Intern every string in a JSON-like object (dicts, lists, scalars), keys too, in place,
    and share dicts of flags only; returns obj. Equality and key order are unchanged: only
    which objects hold the values is. The object must be read-only from then on.

    An object compacted before (by its source; the store compacts again what reaches it) is
    left as it is: its "metadata" key is then the interned string, which a parser never makes
    (json and yaml make their own; kpr's code interned the name at import)."""
    if type(obj) is dict:
        for k in obj:
            if k == "metadata":
                if k is _METADATA:
                    return obj
                break
    try:
        if type(obj) is dict:
            _compact_dict(obj)
        elif type(obj) is list:
            _compact_list(obj)
    except RecursionError:
        pass  # nested deeper than any real object: left as it is below that depth, still equal
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
                    continue
                if len(_flags) < _FLAGS_MAX:
                    _flags[flags] = v
            _compact_dict(v)
        elif type(v) is list:
            _compact_list(v)
    # Keys: yaml makes a new string for each one. A key is swapped only by inserting it again,
    # so the dict is rebuilt, in the same order; one key tells whether its producer interned.
    first = next(iter(d), None)
    if type(first) is str and _intern(first) is not first:
        items = [(_intern(k) if type(k) is str else k, v) for k, v in d.items()]
        d.clear()
        d.update(items)


def _compact_list(items: list) -> None:
    for i, v in enumerate(items):
        if type(v) is str:
            items[i] = _intern(v)
        elif type(v) is dict:
            _compact_dict(v)
        elif type(v) is list:
            _compact_list(v)


# Without zstd (see ZSTD_FROM), packed objects of at least this many bytes (an EndpointSlice
# of a few endpoints) are compressed too: marshal writes every key and address in full, deflate against a preset
# dictionary of typical objects takes an EndpointSlice of 10 endpoints from 770 to about 130
# bytes, in 7 us (its marshal.dumps takes 3.5 us). Smaller objects (most Services, 200 bytes)
# would gain less per microsecond. A compressed object starts with a NUL byte, which no
# marshal output does (marshal's first byte is a type code).
COMPRESS_FROM = 400
_ZIPPED = b"\x00"
# A 4 KiB window (wbits 12) holds the dictionary and any object worth compressing; memLevel
# 4 keeps the state copied per object small (copying the primed state is what makes a small
# object cheap: priming a new one with the dictionary costs more than compressing).
_WBITS = -12


def _dictionary() -> bytes:
    """Typical objects, marshalled: what compressed objects refer back to. Built the same way
    in every process; packed bytes never leave the process that made them."""
    endpoints = [
        {"addresses": [f"10.244.{i}.{i + 10}"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": f"node-{i}", "zone": "zone-a", "targetRef": {"kind": "Pod", "namespace": "default", "name": f"web-{i}"}}
        for i in range(4)
    ]
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abcde", "namespace": "default", "labels": {"kubernetes.io/service-name": "web",
                     "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints,
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"type": "ClusterIP", "selector": {"app": "web"}, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]},
    }
    return marshal.dumps(service) + marshal.dumps(slice_)


_ZDICT = _dictionary()
_primed = zlib.compressobj(1, zlib.DEFLATED, _WBITS, 4, zlib.Z_DEFAULT_STRATEGY, _ZDICT)
# Compressor copies are made from _primed by any thread (the files source's, the bus's).
_primed_lock = threading.Lock()

# Zstandard against the same dictionary, where the zstandard package is installed: an
# EndpointSlice of 10 endpoints in about a third of deflate's time (4-5 us against 12-18 us:
# deflate's copy of its primed state alone took 5), and read back in half, for about 7% more
# bytes (201 against 188). Its objects start with _ZSTD, which neither marshal (a type code)
# nor deflate (_ZIPPED) begins with; `unpack` reads all three.
_ZSTD = b"\x01"
# Level -1: zstd's fast mode; level 1 was as slow as deflate here and only 3% smaller.
_ZSTD_LEVEL = -1
# With zstd, packed objects of at least this many bytes are compressed (a Service too: 201
# -> 110 bytes in 1.6 us, read back in 0.3 us more; at 20k Services 1.6 MB for 0.04 s).
ZSTD_FROM = 128
try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - a dependency; deflate gives the same objects back
    _zstd = None
_zstd_pair_lock = threading.Lock()  # neither half is thread-safe; any thread packs and unpacks
_zstd_made: Any = None


def _zstd_pair() -> Any:
    """(compressor, decompressor), made at first use: 170 KB of zstd's state."""
    global _zstd_made
    if _zstd_made is None:
        zdict = _zstd.ZstdCompressionDict(_ZDICT, dict_type=_zstd.DICT_TYPE_RAWCONTENT)
        _zstd_made = (
            _zstd.ZstdCompressor(level=_ZSTD_LEVEL, dict_data=zdict, write_checksum=False,
                                 write_content_size=True, write_dict_id=False),
            _zstd.ZstdDecompressor(dict_data=zdict),
        )
    return _zstd_made


class Over:
    """An object kept as the changes to another's spec (`pack_over`): the other's packed
    bytes (shared with whoever keeps them), the keys of the spec fields that differ, and
    their values packed. Read-only; `unpack` gives back the object, key order included."""

    __slots__ = ("base", "keys", "values")

    def __init__(self, base: bytes, keys: tuple[str, ...], values: bytes) -> None:
        self.base, self.keys, self.values = base, keys, values


# The types of what `pack` and `pack_over` make (`is_packed`): hot paths test
# `x.__class__ in PACKED` inline (kpr.translate, 60k-120k tests a sync: a call costs twice the test).
PACKED = (bytes, Over)


# The spec keys patches name, one tuple per distinct set (a handful: what allocation fills in).
_over_keys: dict[tuple[str, ...], tuple[str, ...]] = {}


def pack_over(base: Any, before: Any, obj: Any) -> Any:
    """`obj` packed, as the changes to its spec over `before`, which `base` holds packed (the
    Service a source read, and the same Service once allocation filled in its ClusterIPs and
    nodePorts): the source keeps `base` anyway, so the allocated version costs a few dozen
    bytes (an `Over`), not a second full copy (about 300 bytes a Service). Anything else
    than new or changed spec fields at the end of the spec or in place (a field removed, a
    top-level field changed, fields in another order) is packed whole, as `pack` does."""
    if type(base) is not bytes or type(before) is not dict or type(obj) is not dict or len(before) != len(obj):
        return pack(obj)
    spec, old = obj.get("spec"), before.get("spec")
    if type(spec) is not dict or type(old) is not dict or len(spec) < len(old):
        return pack(obj)
    for key, value in obj.items():
        if key != "spec" and before.get(key, before) is not value:
            return pack(obj)
    names = list(spec)
    if names[: len(old)] != list(old):
        return pack(obj)
    # (lists, not generators: once per allocated Service of a full sync)
    keys = tuple([k for k in names if k not in old or old[k] != spec[k]])
    made = over(base, keys, tuple([spec[k] for k in keys])) if keys else None
    return pack(obj) if made is None else made


def over(base: bytes, keys: tuple[str, ...], values: tuple[Any, ...]) -> Over | None:
    """The Over of `base` (packed bytes of an object with a dict "spec") whose spec's `keys`
    (new ones at the end, in this order) have `values`: what pack_over makes of such a change
    (a source that knows the change makes it without the two dicts). None when it cannot
    (too many sets of keys, a value marshal cannot hold): pack the whole object then."""
    if len(_over_keys) >= 64 and keys not in _over_keys:
        return None
    try:
        packed = marshal.dumps(values)
    except ValueError:
        return None
    return Over(base, _over_keys.setdefault(keys, keys), packed)


def pack(obj: Any) -> Any:
    """An object the caller keeps but seldom reads, as bytes (`unpack` gives back an equal
    object, with its strings interned as they were); equal objects pack to equal bytes (most
    of the time: marshal's may differ, see `same`). What marshal cannot hold (a YAML
    timestamp) is returned as it is: callers keep either and `unpack` takes either."""
    if type(obj) in PACKED:
        return obj
    try:
        data = marshal.dumps(obj)
    except ValueError:
        return obj
    if _zstd is not None:
        if len(data) < ZSTD_FROM:
            return data
        with _zstd_pair_lock:
            small = _zstd_pair()[0].compress(data)
        # Kept only when smaller: a deterministic choice, so equal data still packs equal.
        return _ZSTD + small if len(small) < len(data) - 1 else data
    if len(data) < COMPRESS_FROM:
        return data
    with _primed_lock:
        z = _primed.copy()
    return _ZIPPED + z.compress(data) + z.flush()


def is_packed(kept: Any) -> bool:
    """Whether `kept` is what `pack` or `pack_over` made of an object (not the object)."""
    return type(kept) in PACKED


def unpack(kept: Any) -> Any:
    """The object `pack` kept: a new one for each call of packed bytes, read-only as the
    original was (dicts of flags may be shared inside it, as compact shares them)."""
    if type(kept) is not bytes:
        if type(kept) is Over:
            obj = unpack(kept.base)
            obj["spec"].update(zip(kept.keys, marshal.loads(kept.values)))
            return obj
        return kept
    head = kept[:1]
    if head == _ZSTD:
        with _zstd_pair_lock:
            kept = _zstd_pair()[1].decompress(kept[1:])
    elif head == _ZIPPED:
        kept = zlib.decompressobj(_WBITS, _ZDICT).decompress(kept[1:])
    return marshal.loads(kept)


def same(kept: Any, obj: Any) -> bool:
    """Whether what `pack` kept equals `obj` (packed or not): packed bytes are compared
    first, and unpacked only when they differ (marshal's bytes for equal objects may)."""
    if kept is obj:
        return True
    if kept is None or obj is None:
        return False
    if type(kept) is bytes and type(obj) is bytes and kept == obj:
        return True
    if type(kept) is Over and type(obj) is Over and kept.base == obj.base and kept.keys == obj.keys and kept.values == obj.values:
        return True
    return bool(unpack(kept) == unpack(obj))


@contextmanager
def paused(*, freeze: bool = False) -> Iterator[None]:
    """The cyclic garbage collector off while the block runs (see gc_paused). With `freeze`,
    what is tracked when the outermost pause ends is frozen however little the block made: for
    imports (kpr.cli, the agent's setup), whose modules, classes and functions live as long as
    the process (some 35k objects at the agent's start, walked twice each by the collections
    that would run while they are made and again after them). Freezing keeps the garbage
    cycles the block (and anything before it) made as well, for good: about 170 KB, once, at
    the agent's start."""
    global _pauses, _was_enabled, _freeze
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
        _freeze = _freeze or freeze
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0:
                # The youngest generation's count is allocations less deallocations, of any
                # generation: a batch that freed many older objects (the files source's
                # read-ahead, frozen when it ended) counts low while it leaves as many new
                # ones, so a low count is checked against the generation itself.
                if _freeze or gc.get_count()[0] > FREEZE_AFTER or len(gc.get_objects(0)) > FREEZE_AFTER:
                    # A batch that leaves this many new objects behind (an initial sync) made
                    # the agent's state: out of the collector's reach now, or its first
                    # collections would walk all of it.
                    gc.freeze()
                _freeze = False
                if _was_enabled:
                    gc.enable()


def gc_paused(fn: F) -> F:
    """Run fn with the cyclic garbage collector off (re-entrant, across threads: it stays off
    while any paused call runs), as it was afterwards. When the outermost call leaves more
    than FREEZE_AFTER new objects tracked, they are frozen (gc.freeze) on the way out."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with paused():
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


# mallopt parameter (glibc's malloc.h)
_M_ARENA_MAX = -8


def one_heap() -> bool:
    """Limit glibc to one malloc arena for the whole process (call before threads start);
    False where that cannot be done (not glibc). Every allocation holds the GIL anyway, so
    threads lose nothing by sharing the heap."""
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return bool(fn(_M_ARENA_MAX, 1))


def trim() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def settle() -> int:
    """After the initial sync: freeze what survives out of later collections (no collection
    first: a full one of a large state holds the GIL for a second), give the C heap's free
    pages back to the system. Returns the bytes of RSS given back."""
    before = rss_bytes()
    gc.freeze()
    trim()
    freed = max(0, before - rss_bytes())
    log.info("memory.settled rss_mb=%.0f freed_mb=%.0f frozen_objects=%d", rss_bytes() / 2**20, freed / 2**20, gc.get_freeze_count())
    return freed
