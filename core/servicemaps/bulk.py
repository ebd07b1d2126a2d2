"""A full sync into empty maps at list speed: every service's entries rendered, checked
against the maps' capacity and written a whole list at a time, not service by service.

It covers the common service (one frontend, not a NodePort, not a wildcard address, every
backend active, no local traffic policy, no source ranges, the random algorithm) when the
maps hold no service yet (a node's first start, after `kpr cleanup`, the benchmark's full
sync of 50k services) and everything fits. In any other case it declines before changing
anything and the general path (ApplyMixin._plan / _apply, service by service) runs; the
result is the same either way: tests/kernel/test_servicemaps_bulk.py compares the maps and
the shadow both paths leave.
"""

from __future__ import annotations

import logging
import struct
from array import array
from collections import Counter
from functools import lru_cache, partial
from itertools import accumulate, chain, repeat
from operator import add, attrgetter, itemgetter
from socket import AF_INET, inet_pton
from typing import Any

from ..bpf import maps as M
from ..model import BackendState, FrontendType, Service
from .groups import _BACKEND_TAIL, _BYTE, _PROTO_BYTE, _SVC_TAIL, _TYPE_FLAGS, _V4_MAPPED, _WILD4, _WILD6, _Group
from .slots import size_class

log = logging.getLogger("kpr.servicemaps")

_FRONTENDS, _BACKENDS, _ANNOTATIONS = attrgetter("frontends"), attrgetter("backends"), attrgetter("annotations")
_TYPE, _ADDRESS, _PORT, _PROTOCOL = attrgetter("type"), attrgetter("address"), attrgetter("port"), attrgetter("protocol")
_STATE, _LOCAL, _AFFINITY = attrgetter("state"), attrgetter("local"), attrgetter("affinity_timeout")
_SOURCE_RANGES, _EXT_LOCAL, _INT_LOCAL = attrgetter("source_ranges"), attrgetter("external_local"), attrgetter("internal_local")
_KEY, _FIRST, _ADDR16 = attrgetter("key"), itemgetter(0), itemgetter(slice(0, 16))
_pton4 = partial(inet_pton, AF_INET)
_KEY4 = struct.Struct("=12s4s3s")  # an IPv4 key: ::ffff:0:0/96, the address, port and protocol
_SVC_KEY_TAIL = _BYTE[M.SCOPE_EXTERNAL] + _SVC_TAIL  # kpr_svc key after the frontend key
_REVNAT_TAIL = b"\x00"  # kpr_revnat value after the frontend key
_MAX_COUNT = 0xFFFF  # kpr_svc_val's count is a u16 (rendering._MAX_COUNT)
_ACTIVE_SLOT = array("I", (0, M.BACKEND_ACTIVE))  # kpr_slot words: id, state


@lru_cache(maxsize=4096)
def _tail(port: int, proto: Any) -> bytes:
    """A frontend or backend key's port (network order) and protocol bytes."""
    return port.to_bytes(2, "big") + (_PROTO_BYTE[proto] if type(proto) is not bytes else proto)


def _keys(addresses: list[str], tails: Any) -> list[bytes] | None:
    """Each address as stored (IPv4 behind ::ffff:0:0/96) followed by its tail (a list, one
    per address, or a repeat); None when one is not an address (the general path names it)."""
    try:
        # one pack per key (no intermediate 16-byte address made and freed)
        return list(map(_KEY4.pack, repeat(_V4_MAPPED), map(_pton4, addresses), tails))
    except (OSError, TypeError, struct.error):
        pass
    try:
        return list(map(add, map(M.addr_to_bytes, addresses), tails))
    except (ValueError, TypeError):
        return None


class BulkMixin:
    """ServiceMapWriter's full sync into empty maps (state: see ServiceMapWriter._reset_shadow)."""

    def _bulk_sync(self, services: list[Service]) -> bool:
        """Write `services` (in key order) into maps that hold no service, a list at a time;
        False, with nothing changed, when they are not all the common kind or do not all fit
        (ApplyMixin._full_sync then runs the general path)."""
        if (
            not self.batch
            or self._groups
            or len(self._backend_vals)
            or self._legacy
            or any(self._stray.values())
            or self.algorithm != "random"
            or not services
            or len(self._services) != len(services)  # a key twice: the general path's conflicts
        ):
            return False
        n = len(services)
        fel = list(map(_FRONTENDS, services))
        if set(map(len, fel)) != {1}:
            return False
        if any(map(_ANNOTATIONS, services)) and any(
            self._algorithm_for(s) != "random" for s in services if s.annotations
        ):
            return False
        fes = list(map(_FIRST, fel))
        types = list(map(_TYPE, fes))
        if (
            FrontendType.NODE_PORT in types  # (its wildcard entry: a second group)
            or any(map(_SOURCE_RANGES, fes))
            or any(map(_EXT_LOCAL, fes))
            or any(map(_INT_LOCAL, fes))
        ):
            return False
        affs = list(map(_AFFINITY, fes))
        if min(affs) < 0 or max(affs) > 0xFFFFFFFF:
            return False
        try:
            flags = list(map(_TYPE_FLAGS.__getitem__, types))
            tails = list(map(_tail, map(_PORT, fes), map(_PROTOCOL, fes)))
        except (KeyError, OverflowError, TypeError, AttributeError):
            return False
        fks = _keys(list(map(_ADDRESS, fes)), tails)
        if fks is None or any(map((_WILD4, _WILD6).__contains__, map(_ADDR16, fks))):
            return False
        if len(set(fks)) != n:
            return False  # a frontend claimed twice: the general path's conflicts

        # backends, all services' in one list
        bel = list(map(_BACKENDS, fes))
        counts = list(map(len, bel))
        flat = list(chain.from_iterable(bel))
        if BackendState.TERMINATING in map(_STATE, flat):
            return False
        protos = list(map(_PROTOCOL, fes))
        ports = list(map(_PORT, flat))
        try:
            if len(set(ports)) == 1 and len(set(protos)) == 1:
                btails: Any = repeat(_tail(ports[0], protos[0]))
            else:
                btails = list(map(_tail, ports, chain.from_iterable(map(repeat, protos, counts))))
            keys = _keys(list(map(_ADDRESS, flat)), btails)
            if keys is None:
                return False
            bkeys = keys
        except (OverflowError, TypeError, KeyError):
            return False
        # kpr_backend values (None: each its key and the same zero tail, joined at once below)
        locals_ = list(map(_LOCAL, flat))
        vals: list[bytes] | None = None
        if any(locals_):
            vals = list(map(add, bkeys, map(_BACKEND_TAIL.__getitem__, map(bool, locals_))))

        # ids: new ones from the counter in order of first appearance, as rendering service
        # by service in key order hands them out
        total = len(bkeys)
        nxt = self._next_backend
        run = list(range(nxt, nxt + total))  # (one int object per id, shared by what follows)
        ids = dict(zip(bkeys, run))
        u = len(ids)
        if nxt < 1 or nxt + u - 1 > self.limits["kpr_backend"]:
            return False  # (ids from the queue of freed ones: the general path)
        if u == total:
            # every backend listed once: ids ascending in list order, each frontend's sorted
            orders = run
            ns = counts
        else:
            ids = dict(zip(dict.fromkeys(bkeys), range(nxt, nxt + u)))
            # (a value listed twice: the last one, as rendering keeps)
            vals = list(dict(zip(bkeys, vals or map(add, bkeys, repeat(_BACKEND_TAIL[0])))).values())
            bids = list(map(ids.__getitem__, bkeys))
            per = [sorted(set(bids[o : o + c])) for o, c in zip(accumulate(counts, initial=0), counts)]
            ns = list(map(len, per))
            orders = list(chain.from_iterable(per))
        if ns and max(ns) > _MAX_COUNT:
            return False
        spans = list(map(size_class, ns))
        have = self._counts()
        need = {"kpr_svc": n, "kpr_slots": sum(spans), "kpr_backend": u, "kpr_revnat": n}
        if any(have[name] + k > self.limits[name] for name, k in need.items()):
            return False
        nr = self._next_revnat
        revnats = range(nr, nr + n)
        if nr < 1 or nr + n > 0xFFFFFFFF or not self._revnat_used.isdisjoint(revnats):
            return False
        bases = self._slots.alloc_run(spans)
        if bases is None:
            return False

        # accepted: the ids, rev-NAT indexes and ranges are taken (as rendering takes them)
        if self._backend_ids:
            self._backend_ids.update(ids)
        else:
            self._backend_ids = ids  # (a copy of 500k entries saved)
        self._next_backend = nxt + u
        self._revnat_ids.update(zip(fks, revnats))
        self._revnat_used.update(revnats)
        self._next_revnat = nr + n
        if any(affs):
            flags = [f | M.SVC_F_AFFINITY if a > 0 else f for f, a in zip(flags, affs)]
        svc_keys = list(map(add, fks, repeat(_SVC_KEY_TAIL)))
        svc_vals = list(map(M.SVC_VAL.pack, bases, ns, repeat(0), revnats, flags, affs))
        revnat_vals = list(map(add, fks, repeat(_REVNAT_TAIL)))
        kids = self._kernel_ids(orders)
        words = _ACTIVE_SLOT * len(orders)
        words[0::2] = array("I", kids)
        blob = words.tobytes()
        offs = list(accumulate(ns, initial=0))
        slot_vals = list(map(blob.__getitem__, map(slice, map((8).__mul__, offs), map((8).__mul__, offs[1:]))))
        if self._backend_gen is not None:
            vals = vals or list(map(add, bkeys, repeat(_BACKEND_TAIL[0])))
            vals = self._with_gens(run[:u] if u == total else list(range(nxt, nxt + u)), vals)
        # (without vals: the keys joined by the zero tail, which the last one takes too)
        be_blob = b"".join(vals) if vals is not None else _BACKEND_TAIL[0].join(bkeys) + _BACKEND_TAIL[0]
        owners = list(map(_KEY, services))
        groups = list(map(
            _Group.fresh, revnats, owners, revnat_vals, svc_keys, svc_vals, _split(tuple(orders), ns), bases, spans,
            slot_vals,
        ))

        mp = self.maps
        try:
            # what service entries point at first: backends, slots, rev-NAT entries
            mp["kpr_backend"].store_ranges(((nxt, be_blob),))
            ranges = _slot_ranges(bases, spans, ns, slot_vals, blob)
            mp["kpr_slots"].store_ranges(ranges)
            # (counted as the slots written: a run's gaps between ranges are not)
            mp["kpr_slots"].ops["update"] -= sum(len(v) for _b, v in ranges) // 8 - len(orders)
            mp["kpr_revnat"].update_blob(array("I", revnats).tobytes(), b"".join(revnat_vals), n)
            mp["kpr_svc"].update_blob(b"".join(svc_keys), b"".join(svc_vals), n)
        except Exception:
            # what the general path would have pending, for the rollback to forget
            self._pending_vals = dict(zip(range(nxt, nxt + u), _pieces(be_blob, M.BACKEND.size)))
            self._fresh_revnat = fks
            self._fresh_slots = [(fk, b, s) for fk, b, s in zip(fks, bases, spans) if s]
            self._roll_back(n)
            raise

        # the shadow follows the maps
        self._groups.update(zip(fks, groups))
        self._by_service.update(zip(owners, zip(fks)))
        count = self._count
        count["kpr_svc"] += n
        count["kpr_slots"] += need["kpr_slots"]
        count["kpr_revnat"] += n
        refs = self._backend_refs
        if u == total:
            added = refs.add_run(nxt, array("q", (1,)) * u)  # one frontend each
        else:
            # frontends per id (ids come first in the frontends' slot order in ascending order)
            per_id = Counter(orders)
            added = list(per_id) == list(range(nxt, nxt + u)) and refs.add_run(nxt, array("q", per_id.values()))
        if not added:
            refs.add_many(Counter(orders))
        if not self._backend_vals.store_run(nxt, be_blob):
            self._backend_vals.update(zip(range(nxt, nxt + u), _pieces(be_blob, M.BACKEND.size)))
        self._begin()
        log.debug("event=servicemaps_bulk_sync frontends=%d backends=%d", n, u)
        return True


def _slot_ranges(
    bases: list[int], spans: list[int], ns: list[int], slot_vals: list[bytes], blob: bytes
) -> list[tuple[int, bytes]]:
    """The groups' kpr_slots ranges to store, (base, values): one run from the first base
    when every group takes the same span for the same count (laid out one after the other:
    `blob`'s slots spread over rows of the span, strided copies), else one per group."""
    if len(set(spans)) == 1 and len(set(ns)) == 1 and bases and bases[0]:
        span, n, rows = spans[0], ns[0], len(spans)
        region = array("Q", bytes(8 * span * rows))
        slots = array("Q", blob)
        for j in range(n):
            region[j::span] = slots[j::n]
        return [(bases[0], region.tobytes())]
    return [(b, v) for b, v in zip(bases, slot_vals) if b]


def _pieces(blob: bytes, size: int) -> list[bytes]:
    """`blob` cut into pieces of `size` bytes."""
    return list(map(blob.__getitem__, map(slice, range(0, len(blob), size), range(size, len(blob) + 1, size))))


def _split(flat: tuple[int, ...], sizes: list[int]) -> list[tuple[int, ...]]:
    """`flat` cut into consecutive pieces of these sizes."""
    ends = list(accumulate(sizes))
    return list(map(flat.__getitem__, map(slice, chain((0,), ends), ends)))

