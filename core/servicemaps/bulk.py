"""A full sync into empty maps at list speed: the common services' entries rendered, checked
against the maps' capacity and written a whole list at a time, not service by service.

It covers the common service (one frontend, not a NodePort, not a wildcard address, every
backend active, no local traffic policy, no source ranges, the random algorithm) when the
maps hold no service yet (a node's first start, after `kpr cleanup`, the benchmark's full
sync of 50k services). The others in the same sync (a NodePort, a terminating backend, a
frontend two services claim, ...) are left to the general path (ApplyMixin._plan / _apply,
service by service, in key order), which plans and writes them right after, beside the
common ones: a few of them no longer send 50k services the slow way. When the common ones
and at most what the others take do not all fit, or the writer's state rules it out, it
declines before changing anything and the general path takes every service. The ids differ
(the common services are numbered first); what the maps serve and the shadow mean are the
same: tests/kernel/test_servicemaps_bulk.py compares both paths.
"""

from __future__ import annotations

import logging
import struct
from array import array
from bisect import bisect_right
from collections import Counter
from functools import lru_cache, partial
from itertools import accumulate, chain, compress, repeat
from operator import add, attrgetter, itemgetter, mul
from socket import AF_INET, inet_pton
from typing import Any, NamedTuple

from ..bpf import maps as M
from ..model import BACKEND_LOCAL, BACKEND_TERMINATING, Backend, BackendState, FrontendType, Service
from .applying import _in_key_order
from .groups import (
    _BACKEND_TAIL, _EXT_KEY_TAIL, _PROTO_BYTE, _TYPE_FLAGS, _V4_MAPPED, _WILD4, _WILD6, _Group, group_entries,
)
from .rendering import _ACTIVE_SLOT, _MAX_COUNT
from .slots import size_class

log = logging.getLogger("kpr.servicemaps")

_FRONTENDS, _BACKENDS, _ANNOTATIONS = attrgetter("frontends"), attrgetter("backends"), attrgetter("annotations")
_TYPE, _ADDRESS, _PORT, _PROTOCOL = attrgetter("type"), attrgetter("address"), attrgetter("port"), attrgetter("protocol")
_STATE, _LOCAL, _AFFINITY = attrgetter("state"), attrgetter("local"), attrgetter("affinity_timeout")
_SOURCE_RANGES, _EXT_LOCAL, _INT_LOCAL = attrgetter("source_ranges"), attrgetter("external_local"), attrgetter("internal_local")
_KEY, _FIRST, _ADDR16 = attrgetter("key"), itemgetter(0), itemgetter(slice(0, 16))
_pton4 = partial(inet_pton, AF_INET)
_KEY4 = struct.Struct("=12s4s3s")  # an IPv4 key: ::ffff:0:0/96, the address, port and protocol
# A Backend in its compact IPv4 form (kpr.model: flags, port and place, then the address's 4
# bytes) is 9 bytes long; IPv6 is 21 and the general form (marshal's tuple) at least 11.
_COMPACT4_LEN = 9
_RAW4 = itemgetter(slice(5, 9))
_REVNAT_TAIL = b"\x00"  # kpr_revnat value after the frontend key
_NODE_PORT = FrontendType.NODE_PORT


@lru_cache(maxsize=4096)
def _tail(port: int, proto: Any) -> bytes:
    """A frontend or backend key's port (network order) and protocol bytes (KeyError: no
    Protocol, as rendering's)."""
    return port.to_bytes(2, "big") + _PROTO_BYTE[proto]


def _keys(addresses: list[str], tails: Any) -> list[bytes] | None:
    """Each address as stored (IPv4 behind ::ffff:0:0/96) followed by its tail (a list, one
    per address, or a repeat); None when one is not an address (the general path names it)."""
    try:
        # one pack per key (no intermediate 16-byte address made and freed)
        return list(map(_KEY4.pack, repeat(_V4_MAPPED), map(_pton4, addresses), tails))
    except (OSError, ValueError, TypeError, struct.error):  # (ValueError: a NUL or surrogate in it)
        pass
    try:
        return list(map(add, map(M.addr_to_bytes, addresses), tails))
    except (ValueError, TypeError):
        return None


class BulkMixin:
    """ServiceMapWriter's full sync into empty maps (state: see ServiceMapWriter._reset_shadow)."""

    def _common(self, services: list[Service]) -> tuple | None:
        """The common services among `services` (key order) and their parts: (services, their
        frontends, type flags, affinity timeouts, frontend keys, backend counts, backends
        in one list, their keys, the others in key order); a frontend claimed twice, or also
        by one of the others, leaves its claimants to the others (key order decides it). None:
        no common one, or bad input that stops the list at a time (the general path)."""
        rest: list[Service] = []  # the others, whole, for the general path
        fel = list(map(_FRONTENDS, services))
        bad = [i for i, k in enumerate(map(len, fel)) if k != 1]
        if any(map(_ANNOTATIONS, services)):
            bad += [i for i, s in enumerate(services) if s.annotations and self._algorithm_for(s) != "random"]
        services, fel = _drop(bad, rest, services, fel)
        fes = list(map(_FIRST, fel))
        types = list(map(_TYPE, fes))
        bad = [i for i, t in enumerate(types) if t is _NODE_PORT] if _NODE_PORT in types else []  # (its wildcard: a second group)
        for get in (_SOURCE_RANGES, _EXT_LOCAL, _INT_LOCAL):
            got = list(map(get, fes))
            if any(got):
                bad += [i for i, v in enumerate(got) if v]
        affs = list(map(_AFFINITY, fes))
        bad += [i for i, a in enumerate(affs) if type(a) is not int or not 0 <= a <= 0xFFFFFFFF]
        services, fes, types, affs = _drop(bad, rest, services, fes, types, affs)
        try:
            flags = list(map(_TYPE_FLAGS.__getitem__, types))
            tails = list(map(_tail, map(_PORT, fes), map(_PROTOCOL, fes)))
        except (KeyError, OverflowError, TypeError, AttributeError):
            services, fes, types, affs = _drop(
                [i for i, fe in enumerate(fes) if _frontend_tail(fe) is None], rest, services, fes, types, affs
            )
            flags = list(map(_TYPE_FLAGS.__getitem__, types))
            tails = list(map(_tail, map(_PORT, fes), map(_PROTOCOL, fes)))
        addrs = list(map(_ADDRESS, fes))
        fks = _keys(addrs, tails)
        if fks is None:  # not an address: the general path names it
            keep = [_keys([a], [t]) for a, t in zip(addrs, tails)]
            services, fes, flags, affs, keep = _drop(
                [i for i, k in enumerate(keep) if k is None], rest, services, fes, flags, affs, keep
            )
            fks = [k[0] for k in keep]  # type: ignore[index]
        bad = [i for i, k in enumerate(map(_ADDR16, fks)) if k in (_WILD4, _WILD6)]
        # a frontend claimed twice, or also by one of the others: the general path's conflicts,
        # decided in key order
        taken = {k for k, c in Counter(fks).items() if c > 1} if len(set(fks)) != len(fks) else set()
        taken |= _frontend_keys(rest)
        if taken:
            bad += [i for i, k in enumerate(fks) if k in taken]
        services, fes, flags, affs, fks = _drop(bad, rest, services, fes, flags, affs, fks)

        # backends, all services' in one list
        bel = list(map(_BACKENDS, fes))
        counts = list(map(len, bel))
        flat = list(chain.from_iterable(bel))
        # Compact IPv4 Backends (nearly always): their flags, ports and addresses read from
        # their bytes joined, not through three properties of 200k backends each.
        joined = _compact4(flat)
        bad = [i for i, c in enumerate(counts) if c > _MAX_COUNT] if counts and max(counts) > _MAX_COUNT else []
        if joined is not None:
            terminating = _flag_bits(joined, _TERMINATING_BITS)
            at = [j for j, t in enumerate(terminating) if t] if 1 in terminating else []
        else:
            states = list(map(_STATE, flat))
            at = [j for j, st in enumerate(states) if st is BackendState.TERMINATING] if BackendState.TERMINATING in states else []
        if at:
            ends = list(accumulate(counts))
            bad += sorted({bisect_right(ends, j) for j in at})
        if bad:
            services, fes, flags, affs, fks, bel = _drop(bad, rest, services, fes, flags, affs, fks, bel)
            counts = list(map(len, bel))
            flat = list(chain.from_iterable(bel))
            joined = _compact4(flat)
        protos = list(map(_PROTOCOL, fes))
        try:
            bkeys = _keys4(joined, protos, counts) if joined is not None else _backend_keys(flat, list(map(_PORT, flat)), protos, counts)
            if bkeys is None:  # not an address: the general path names it
                bad = [i for i, fe in enumerate(fes) if _backend_keys(fe.backends, list(map(_PORT, fe.backends)),
                                                                     [fe.protocol], [len(fe.backends)]) is None]
                services, fes, flags, affs, fks, bel = _drop(bad, rest, services, fes, flags, affs, fks, bel)
                counts = list(map(len, bel))
                flat = list(chain.from_iterable(bel))
                protos = list(map(_PROTOCOL, fes))
                bkeys = _backend_keys(flat, list(map(_PORT, flat)), protos, counts)
                joined = _compact4(flat)
        except (OverflowError, TypeError, KeyError):
            return None
        if not services or bkeys is None:
            return None
        bad = _local_disagreements(bkeys, flat, counts, services, rest) if rest else []
        if bad:
            # (a backend listed node-local and not, by one of the others too: see there)
            services, fes, flags, affs, fks, bel = _drop(bad, rest, services, fes, flags, affs, fks, bel)
            counts = list(map(len, bel))
            flat = list(chain.from_iterable(bel))
            bkeys = _backend_keys(flat, list(map(_PORT, flat)), list(map(_PROTOCOL, fes)), counts)
            if not services or bkeys is None:
                return None
            joined = _compact4(flat)
        return services, fes, flags, affs, fks, counts, flat, bkeys, _in_key_order(rest) if rest else rest, joined

    def _sync_adopted(self, services: list[Service]) -> bool:
        """A full sync over maps that hold services (the shadow just read from them): every
        common service whose adopted group already is what rendering it would make (same
        backends, slot order, service entry, rev-NAT entry, backend values) is claimed as it
        is, compared a list at a time; only the others are planned and written service by
        service (ApplyMixin._plan / _apply), beside them, and what nobody claims goes. A
        restart of 50k unchanged services renders none of them. False, nothing changed: not
        that case (the general path plans every service)."""
        if not self._groups or len(self._services) != len(services) or self.algorithm != "random":
            return False
        common = self._common(services)
        if common is None:
            return False
        services, fes, flags, affs, fks, counts, flat, bkeys, rest, joined = common
        groups = self._groups
        # The backends' values as rendering makes them (node-local flag; generations below).
        locals_ = _locals(flat, joined)
        tails: Any = map(_BACKEND_TAIL.__getitem__, locals_) if locals_ is not None else repeat(_BACKEND_TAIL[0])
        vals = list(map(add, bkeys, tails))
        # Their ids: after a restart usually one run in list order (each backend once, as a
        # full sync numbered them), which the table's values at that run confirm at once
        # (its keys are distinct: as many as the key -> id dict holds); else looked up, and
        # a service with a backend that is new or whose value changed is not kept.
        vbids, by_key = self._backend_vals, self._backend_ids
        gens = self._with_gens if self._backend_gen is not None else None
        lo = by_key.get(bkeys[0]) if bkeys else None
        ids: list[Any] = list(range(lo, lo + len(bkeys))) if lo else []
        once = bool(ids) and len(by_key) == len(vbids) and vbids.holds(ids, b"".join(gens(ids, vals) if gens else vals))
        stale: set[Any] = set()
        if not once:
            ids = by_key.get_many(bkeys)
            if None in ids or not vbids.holds(ids, b"".join(gens(ids, vals) if gens else vals)):
                known = [j for j, i in enumerate(ids) if i is not None]
                kids_, kvals = [ids[j] for j in known], [vals[j] for j in known]
                want = dict(zip(kids_, gens(kids_, kvals) if gens else kvals))  # (the last: as rendering)
                stale = {None, *vbids.changed(want)}
        ext = M.SCOPE_EXTERNAL
        same: list[int] = []  # indexes of common services whose group stays as it is
        orders: list[tuple[int, ...]] = []
        offs = list(accumulate(counts, initial=0))
        for i, (fk, g, o, c) in enumerate(zip(fks, map(groups.get, fks), offs, counts)):
            if g is None or g.srcrange or g.maglev or g.n_svc != 1 or g.revnat != fk + _REVNAT_TAIL:
                continue
            prev = g.order_of(ext) or ()
            mine = set(ids[o : o + c])
            # rendering keeps the previous slot order when the ids are the same set
            if len(prev) != len(mine) or not mine.issuperset(prev) or (stale and not stale.isdisjoint(mine)):
                continue
            same.append(i)
            orders.append(prev)
        if not same:
            return False
        # the slots as rendering would write them (kernel ids, generations included), at once
        order_ids = list(chain.from_iterable(orders))
        words = _ACTIVE_SLOT * len(order_ids)
        words[0::2] = array("I", self._kernel_ids(order_ids))
        blob = words.tobytes()
        pack, key_tail = M.SVC_VAL.pack, _EXT_KEY_TAIL
        keep: list[int] = []
        at = 0
        for i, prev in zip(same, orders):
            g = groups[fks[i]]
            k = len(prev)
            sv = blob[at : at + 8 * k]
            at += 8 * k
            a = affs[i]
            f = flags[i] | M.SVC_F_AFFINITY if a > 0 else flags[i]
            if g.slot_vals == sv and (g.base or not k) and g.packed_svc() == (
                fks[i] + key_tail, pack(g.base, k, 0, g.rev_nat, f, a)
            ):
                keep.append(i)
        # whatever the others take fits beside the kept ones: planning them refuses none of
        # them for these maps (key order's refusals otherwise: the general path)
        kept = {fks[i]: groups[fks[i]] for i in keep}
        others = rest + [services[i] for i in sorted(set(range(len(services))) - set(keep))] if len(keep) < len(services) else rest
        used: dict[str, int] = {}
        if others:
            used = group_entries(kept.values())
            # the backends the kept groups use (each listed once: their counts' sum)
            used["kpr_backend"] = (
                sum(map(counts.__getitem__, keep)) if once
                else len(set(chain.from_iterable(map(_BACKENDS, kept.values()))))
            )
            most = _most_entries(others)
            if any(used[name] + most[name] > self.limits[name] for name in most):
                return False
        owners = list(map(_KEY, map(services.__getitem__, keep)))
        for g, key in zip(kept.values(), owners):
            g.owner = key
        self._by_service.update(zip(owners, map(_one, kept)))
        old = {fk: g for fk, g in groups.items() if fk not in kept}
        others = _in_key_order(others) if others else others
        desired = self._plan(others, old, used) if others else {}
        self._apply(old, desired, strays=True)
        log.debug("event=servicemaps_adopted_sync kept=%d others=%d", len(kept), len(others))
        return True

    def _bulk_sync(self, services: list[Service]) -> list[Service] | None:
        """Write the common services among `services` (in key order) into maps that hold no
        service, a list at a time; returns the others, in key order, for the general path
        (ApplyMixin._full_sync plans and writes them next, in the same sync). None, with
        nothing changed, when the writer's state rules the bulk path out, no service is the
        common kind, or the common ones and an upper bound of the others' entries do not all
        fit (the general path then plans every service in key order, refusing by name)."""
        plan = self._bulk_plan(services)
        if plan is None:
            return None
        self._bulk_write(plan)
        self._bulk_take(plan)
        log.debug("event=servicemaps_bulk_sync frontends=%d backends=%d others=%d", plan.n, plan.u, len(plan.rest))
        return plan.rest

    def _bulk_plan(self, services: list[Service]) -> "_Plan | None":
        """What _bulk_sync writes for `services` into maps that hold no service (None: not
        that case, see there). Takes the ids, rev-NAT indexes and kpr_slots ranges it plans
        (as rendering takes them): a caller that then writes nothing forgets them by reading
        the maps again (_reload resets the shadow)."""
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
            return None
        common = self._common(services)
        if common is None:
            return None
        services, fes, flags, affs, fks, counts, flat, bkeys, rest, joined = common
        n = len(services)
        # kpr_backend values (None: each its key and the same zero tail, joined at once below)
        locals_ = _locals(flat, joined)
        vals: list[bytes] | None = None
        # (compact IPv4 backends: their node-local bits, one byte each, set in the joined
        # values' flags column below, not 200k values made and joined)
        local_bits = locals_ if type(locals_) is bytes else None
        if locals_ is not None and local_bits is None:
            vals = list(map(add, bkeys, map(_BACKEND_TAIL.__getitem__, locals_)))

        # ids: new ones from the counter in order of first appearance, as rendering service
        # by service in key order hands them out
        total = len(bkeys)
        nxt = self._next_backend
        run = list(range(nxt, nxt + total))  # (one int object per id, shared by what follows)
        ids = dict(zip(bkeys, run))
        u = len(ids)
        # what the others may take at most: the common ones and they all fit, so planning
        # the others after them refuses none of them for these maps (key order's refusals)
        most = _most_entries(rest)
        if nxt < 1 or nxt + u - 1 + most["kpr_backend"] > self.limits["kpr_backend"]:
            return None  # (ids from the queue of freed ones: the general path)
        if u == total:
            # every backend listed once: ids ascending in list order, each frontend's sorted
            orders = run
            ns = counts
        else:
            ids = dict(zip(dict.fromkeys(bkeys), range(nxt, nxt + u)))
            # (a value listed twice: the last one, as rendering keeps)
            vals = list(dict(zip(bkeys, vals or _values(bkeys, local_bits))).values())
            bids = list(map(ids.__getitem__, bkeys))
            per = [sorted(set(bids[o : o + c])) for o, c in zip(accumulate(counts, initial=0), counts)]
            ns = list(map(len, per))
            orders = list(chain.from_iterable(per))
        spans = list(map(size_class, ns))
        have = self._counts()
        need = {"kpr_svc": n, "kpr_slots": sum(spans), "kpr_backend": u, "kpr_revnat": n}
        if any(have[name] + k + most[name] > self.limits[name] for name, k in need.items()):
            return None
        nr = self._next_revnat
        revnats = range(nr, nr + n)
        if nr < 1 or nr + n + most["kpr_revnat"] > 0xFFFFFFFF or not self._revnat_used.isdisjoint(revnats):
            return None
        bases = self._slots.alloc_run(spans)
        if bases is None:
            return None

        # accepted: the ids, rev-NAT indexes and ranges are taken (as rendering takes them)
        self._backend_ids.take(ids)  # (kept as it is in an empty table: a copy of 500k entries saved)
        self._next_backend = nxt + u
        self._revnat_ids.update(zip(fks, revnats))
        self._revnat_used.update(revnats)
        self._next_revnat = nr + n
        if any(affs):
            flags = [f | M.SVC_F_AFFINITY if a > 0 else f for f, a in zip(flags, affs)]
        svc_keys = list(map(add, fks, repeat(_EXT_KEY_TAIL)))
        svc_vals = list(map(M.SVC_VAL.pack, bases, ns, repeat(0), revnats, flags, affs))
        revnat_vals = list(map(add, fks, repeat(_REVNAT_TAIL)))
        kids = self._kernel_ids(orders)
        words = _ACTIVE_SLOT * len(orders)
        words[0::2] = array("I", kids)
        blob = words.tobytes()
        offs = list(accumulate(ns, initial=0))
        # each group's slot values: not kept where they are the usual ones (generation 0: the
        # kernel ids are the ids; see _Group.slot_vals), else cut from the blob
        slot_vals: Any = (
            repeat(None) if kids is orders
            else list(map(blob.__getitem__, map(slice, map((8).__mul__, offs), map((8).__mul__, offs[1:]))))
        )
        if self._backend_gen is not None:
            vals = vals or _values(bkeys, local_bits)
            vals = self._with_gens(run[:u] if u == total else list(range(nxt, nxt + u)), vals)
        if vals is not None:
            be_blob = b"".join(vals)
        else:
            # the keys joined by the zero tail, which the last one takes too; the flags of
            # node-local ones set in their column
            be_blob = _BACKEND_TAIL[0].join(bkeys) + _BACKEND_TAIL[0]
            if local_bits is not None:
                col = bytearray(be_blob)
                col[_FLAGS_AT :: M.BACKEND.size] = local_bits.translate(_LOCAL_FLAG)
                be_blob = bytes(col)
        owners = list(map(_KEY, services))
        groups = list(map(
            _Group.fresh, revnats, owners, revnat_vals, fks, svc_vals, _split(array("I", orders), ns), bases, spans,
            slot_vals,
        ))
        return _Plan(
            n, u, total, nxt, rest, fks, owners, groups, orders, need["kpr_slots"], be_blob, revnats, revnat_vals,
            svc_keys, svc_vals, _slot_ranges(bases, spans, ns, offs, blob), bases, spans,
        )

    def _bulk_write(self, p: "_Plan") -> None:
        """Write a plan's entries into the maps (rolled back, and raised, when a write fails)."""
        n, u, nxt, be_blob = p.n, p.u, p.nxt, p.be_blob
        mp = self.maps
        try:
            # what service entries point at first: backends, slots, rev-NAT entries
            mp["kpr_backend"].store_ranges(((nxt, be_blob),))
            mp["kpr_slots"].store_ranges(p.slot_ranges)
            # (counted as the slots written: a run's gaps between ranges are not)
            mp["kpr_slots"].ops["update"] -= sum(len(v) for _b, v in p.slot_ranges) // 8 - len(p.orders)
            mp["kpr_revnat"].update_blob(array("I", p.revnats).tobytes(), b"".join(p.revnat_vals), n)
            mp["kpr_svc"].update_blob(b"".join(p.svc_keys), b"".join(p.svc_vals), n)
        except Exception:
            # what the general path would have pending, for the rollback to forget
            self._pending_vals = dict(zip(range(nxt, nxt + u), _pieces(be_blob, M.BACKEND.size)))
            self._fresh_revnat = p.fks
            self._fresh_slots = [(fk, b, s) for fk, b, s in zip(p.fks, p.bases, p.spans) if s]
            self._roll_back(n)
            raise

    def _bulk_take(self, p: "_Plan") -> None:
        """The shadow of a plan the maps hold (written, or found there by a restart)."""
        n, u, total, nxt, orders, be_blob = p.n, p.u, p.total, p.nxt, p.orders, p.be_blob
        fks, owners = p.fks, p.owners
        self._groups.update(zip(fks, p.groups))
        self._by_service.update(zip(owners, zip(fks)))
        count = self._count
        count["kpr_svc"] += n
        count["kpr_slots"] += p.slots_used
        count["kpr_revnat"] += n
        refs = self._backend_refs
        if u == total:
            added = refs.add_run(nxt, array("i", (1,)) * u)  # one frontend each
        else:
            # frontends per id (ids come first in the frontends' slot order in ascending order)
            per_id = Counter(orders)
            added = list(per_id) == list(range(nxt, nxt + u)) and refs.add_run(nxt, array("i", per_id.values()))
        if not added:
            refs.add_many(Counter(orders))
        if not self._backend_vals.store_run(nxt, be_blob):
            self._backend_vals.update(zip(range(nxt, nxt + u), _pieces(be_blob, M.BACKEND.size)))
        self._begin()


class _Plan(NamedTuple):
    """A bulk sync's entries and the shadow it leaves (BulkMixin._bulk_plan)."""

    n: int  # frontends (one per service)
    u: int  # distinct backends, ids nxt..nxt+u-1
    total: int  # backends listed
    nxt: int
    rest: list[Service]  # the others, for the general path
    fks: list[bytes]
    owners: list[Any]
    groups: list[_Group]
    orders: list[int]  # every group's slot order, joined
    slots_used: int
    be_blob: bytes  # kpr_backend's values from nxt on
    revnats: range
    revnat_vals: list[bytes]
    svc_keys: list[bytes]
    svc_vals: list[bytes]
    slot_ranges: list[tuple[int, bytes]]  # (base, kpr_slots values)
    bases: list[int]
    spans: list[int]


def _one(x: Any) -> tuple:
    return (x,)


def _drop(bad: list[int], rest: list[Service], services: list[Service], *lists: list) -> tuple[list, ...]:
    """`services` and the lists beside them without the entries at the indexes `bad`; those
    services appended to `rest`."""
    if not bad:
        return (services, *lists)
    gone = set(bad)
    keep = [i not in gone for i in range(len(services))]
    rest.extend(services[i] for i in sorted(gone))
    return tuple(list(compress(x, keep)) for x in (services, *lists))


def _frontend_tail(fe: Any) -> bytes | None:
    try:
        _TYPE_FLAGS[fe.type]
        return _tail(fe.port, fe.protocol)
    except (KeyError, OverflowError, TypeError, AttributeError):
        return None


def _backend_keys(flat: list[Any], ports: list[int], protos: list[Any], counts: list[int]) -> list[bytes] | None:
    """The kpr_backend keys of the backends `flat` (the frontends' in turn, `counts` each,
    of the frontends' protocols `protos`); None when one is not an address."""
    if len(set(ports)) == 1 and len(set(protos)) == 1:
        btails: Any = repeat(_tail(ports[0], protos[0]))
    else:
        btails = list(map(_tail, ports, chain.from_iterable(map(repeat, protos, counts))))
    if not flat:
        return []
    if set(map(type, flat)) == {Backend} and set(map(len, flat)) == {_COMPACT4_LEN}:
        # Every address read from its Backend's bytes: printing each as text for _keys to
        # parse back made 200k strings at 20k services, alive at once until the keys were made.
        return list(map(_KEY4.pack, repeat(_V4_MAPPED), map(_RAW4, flat), btails))
    return _keys(list(map(_ADDRESS, flat)), btails)


# Backends per piece of a _compact4 join: the sync's transients stay small (one join of 200k
# backends and its keys' columns took about 10 MB more of peak RSS at 20k services).
_CHUNK = 4096


def _compact4(flat: list[Any]) -> list[bytes] | None:
    """The backends `flat` joined, _CHUNK at a time, when every one is a Backend in the
    compact IPv4 form (kpr.model: flags, port and place, the address; 9 bytes each), else
    None. Their columns are then read at C speed (_flag_bits, _keys4): three properties read
    per backend took about 0.1 s of a 20k-service initial sync (200k backends)."""
    if flat and set(map(type, flat)) == {Backend} and set(map(len, flat)) == {_COMPACT4_LEN}:
        return [b"".join(flat[i : i + _CHUNK]) for i in range(0, len(flat), _CHUNK)]
    return None


# A compact Backend's flags byte -> 1 where the flag is set, else 0.
_TERMINATING_BITS = bytes(int(bool(b & BACKEND_TERMINATING)) for b in range(256))
_LOCAL_BITS = bytes(int(bool(b & BACKEND_LOCAL)) for b in range(256))


def _flag_bits(joined: list[bytes], table: bytes) -> bytes:
    """One byte per backend of a _compact4 join: 1 where the flag `table` picks is set."""
    return b"".join(blob[0::_COMPACT4_LEN].translate(table) for blob in joined)


# A kpr_backend value's flags byte (after the 19-byte key: the tail's second byte), and a
# node-local bit (0/1) -> that byte as _BACKEND_TAIL has it.
_FLAGS_AT = _KEY4.size + 1
_LOCAL_FLAG = bytes(_BACKEND_TAIL[min(b, 1)][1] for b in range(256))
assert _BACKEND_TAIL[0] == bytes(5) and _BACKEND_TAIL[1] == bytes((0, _BACKEND_TAIL[1][1], 0, 0, 0))


def _values(bkeys: list[bytes], local_bits: bytes | None) -> list[bytes]:
    """The kpr_backend values of these keys: each its key and tail (node-local per `local_bits`)."""
    if local_bits is None:
        return list(map(add, bkeys, repeat(_BACKEND_TAIL[0])))
    return list(map(add, bkeys, map(_BACKEND_TAIL.__getitem__, local_bits)))


def _locals(flat: list[Any], joined: list[bytes] | None) -> Any:
    """Whether each backend is node-local (0/1 or bools), or None when none is."""
    if joined is not None:
        bits = _flag_bits(joined, _LOCAL_BITS)
        return bits if 1 in bits else None
    locals_ = list(map(bool, map(_LOCAL, flat)))
    return locals_ if any(locals_) else None


def _keys4(joined: list[bytes], protos: list[Any], counts: list[int]) -> list[bytes]:
    """The kpr_backend keys (as _KEY4 packs them: ::ffff:0:0/96, the address, the port in
    network order, the protocol) of a _compact4 join's backends, the frontends' in turn
    (`counts` each, of the frontends' protocols `protos`), made column by column. KeyError:
    a protocol with no map value (as _tail raises)."""
    size = _KEY4.size
    pbytes = [_PROTO_BYTE[p] for p in protos]
    column = None if len(set(pbytes)) <= 1 else b"".join(map(mul, pbytes, counts))
    keys: list[bytes] = []
    at = 0
    for blob in joined:
        n = len(blob) // _COMPACT4_LEN
        out = bytearray(size * n)  # the prefix's zero bytes are there already
        for c, byte in enumerate(_V4_MAPPED):
            if byte:
                out[c::size] = bytes((byte,)) * n
        for c in range(4):
            out[12 + c :: size] = blob[5 + c :: _COMPACT4_LEN]
        out[16::size] = blob[1::_COMPACT4_LEN]
        out[17::size] = blob[2::_COMPACT4_LEN]
        out[18::size] = pbytes[0] * n if column is None else column[at : at + n]
        keys += _pieces(bytes(out), size)
        at += n
    return keys


def _local_disagreements(
    bkeys: list[bytes], flat: list[Any], counts: list[int], services: list[Service], rest: list[Service]
) -> list[int]:
    """The common services (indexes into `services`; `bkeys`, `flat`: their backends' keys and
    backends, `counts` each) that list a backend the others (`rest`) list too, node-local by
    one lister and not by another: EndpointSlices that disagree about a pod's node (a
    hand-made slice without nodeName beside the controller's, or one not yet updated after
    the address moved node). kpr_backend holds one value, the last lister's in key order,
    which only the general path decides once it renders every lister: they go there too
    (and whoever then disagrees with them). Among the common ones alone the bulk path keeps
    the last one's itself. Cheap when the others list none of these backends (one look-up
    per backend at C speed)."""
    theirs: dict[bytes, set[bool]] = {}
    _add_local_flags(theirs, rest)
    if theirs.keys().isdisjoint(bkeys):
        return []  # (the usual case, at C speed)
    ends = list(accumulate(counts))
    moved: set[int] = set()
    while True:
        mine: dict[bytes, set[bool]] = {}
        at = [j for j in compress(range(len(bkeys)), map(theirs.__contains__, bkeys)) if bisect_right(ends, j) not in moved]
        for j in at:
            mine.setdefault(bkeys[j], set()).add(bool(flat[j].local))
        mixed = {k for k, f in mine.items() if len(f | theirs[k]) > 1}
        new = {bisect_right(ends, j) for j in at if bkeys[j] in mixed}
        if not new:
            return sorted(moved)
        moved |= new
        _add_local_flags(theirs, [services[i] for i in new])


def _add_local_flags(flags: dict[bytes, set[bool]], services: list[Service]) -> None:
    """Each backend key these services list: whether a lister names it node-local (True),
    not (False), or both."""
    for s in services:
        for fe in s.frontends:
            for b in getattr(fe, "backends", ()):
                try:
                    k = M.addr_to_bytes(b.address) + _tail(b.port, fe.protocol)
                except (ValueError, TypeError, KeyError, OverflowError, AttributeError):
                    continue  # (not an address: the general path names it)
                flags.setdefault(k, set()).add(bool(b.local))


def _frontend_keys(services: list[Service]) -> set[bytes]:
    """The frontend keys (address, port, protocol) these services' frontends name (a
    NodePort's wildcard one aside: never a common service's); what is no address is none."""
    out = set()
    for s in services:
        for fe in s.frontends:
            tail = _frontend_tail(fe)
            if tail is not None:
                try:
                    out.add(M.addr_to_bytes(fe.address) + tail)
                except (ValueError, TypeError):
                    pass
    return out


def _most_entries(services: list[Service]) -> dict[str, int]:
    """At most the entries these services' groups take in each map a common service uses:
    a NodePort frontend renders two groups (its wildcard one), a group two scopes, each
    scope's slots as many as the frontend lists."""
    most = dict.fromkeys(("kpr_svc", "kpr_slots", "kpr_backend", "kpr_revnat"), 0)
    for s in services:
        for fe in s.frontends:
            g = 2 if fe.type is _NODE_PORT else 1
            nb = len(fe.backends)
            most["kpr_svc"] += 2 * g
            most["kpr_revnat"] += g
            most["kpr_slots"] += g * size_class(2 * nb)
            most["kpr_backend"] += nb
    return most


def _slot_ranges(
    bases: list[int], spans: list[int], ns: list[int], offs: list[int], blob: bytes
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
    return [(b, blob[8 * o : 8 * (o + n)]) for b, o, n in zip(bases, offs, ns) if b]


def _pieces(blob: bytes, size: int) -> list[bytes]:
    """`blob` cut into pieces of `size` bytes."""
    return list(map(blob.__getitem__, map(slice, range(0, len(blob), size), range(size, len(blob) + 1, size))))


def _split(flat: Any, sizes: list[int]) -> list[Any]:
    """`flat` cut into consecutive pieces of these sizes."""
    ends = list(accumulate(sizes))
    return list(map(flat.__getitem__, map(slice, chain((0,), ends), ends)))

