"""Rendering: a `Service` in, the frontend groups (map entries) it wants out.

Pure apart from the id tables it allocates from (backend ids, rev-NAT indexes, kpr_slots
ranges) and the previous groups it keeps slot order from; no syscalls, so it is unit-tested
without root.
"""

from __future__ import annotations

import ipaddress
import socket
from array import array
from collections import deque
from functools import lru_cache
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING

from ..bpf import maps as M
from ..model import Backend, BackendState, Frontend, FrontendType, Service, ServiceKey
from .groups import (
    _ACTIVE_SLOT, _BACKEND_TAIL, _BYTE, _PROTO_BYTE, _SVC_TAIL, _TYPE_FLAGS, _V4_MAPPED, _WILD4, _WILD6,
    _Group, _backend_name, _fk_label,
)
from .slots import SlotAllocator, size_class

if TYPE_CHECKING:
    from ..idtables import IdBytes, IdCounts, IdSet, KeyIds

# Per-service override of the writer's selection algorithm: "random" or "maglev".
ALGORITHM_ANNOTATION = "service.kpr.io/lb-algorithm"

_pton, _AF_INET = socket.inet_pton, socket.AF_INET
_V4_PREFIX = _V4_MAPPED  # ::ffff:0:0/96, what a v4 address is stored behind
_ADDRESS, _PORT_OF = attrgetter("address"), attrgetter("port")
_STATE_OF, _LOCAL_OF = attrgetter("state"), attrgetter("local")


@lru_cache(maxsize=1024)
def _port_bytes(port: int) -> bytes:
    """A port's two bytes in network order (backends share few ports)."""
    return port.to_bytes(2, "big")


class RenderMixin:
    """ServiceMapWriter's id allocation and rendering (state: see ServiceMapWriter._reset_shadow)."""

    _groups: dict[bytes, _Group]
    _backend_ids: "KeyIds"
    _backend_vals: "IdBytes"
    _backend_refs: "IdCounts"
    _revnat_ids: dict[bytes, int]
    _revnat_used: "IdSet"
    _next_backend: int
    _free_ids: "deque[int] | None"
    _backend_gen: "array | None"
    _freed: dict[int, None]
    _ids_over: bool
    _next_revnat: int
    _pending_vals: dict[int, bytes]
    _fresh_revnat: list[bytes]
    _slots: SlotAllocator
    _fresh_slots: list[tuple[bytes, int, int]]
    algorithm: str

    # ------------------------------------------------------------------ allocation

    def _backend_id(self, bkey: bytes) -> int:
        """The backend's id, a new one when it has none: kpr_backend is an array, so ids stay
        below its size (1..max_entries-1). From a counter until it reaches the end; then the
        id freed longest ago (not the lowest: an id freed a moment ago, which established flows
        in conntrack may still name, is taken again last). O(1) either way."""
        bid = self._backend_ids.get(bkey)
        if bid is None:
            top = self.limits["kpr_backend"] + 1
            bid = self._next_backend
            if 0 < bid < top:
                self._next_backend = bid + 1
            else:
                bid = self._freed_id(top)
            self._backend_ids.add_new(((bkey, bid),))
        return bid

    # ------------------------------------------------------------------ generations
    # Internal ids are kpr_backend indexes; programs and maps carry M.backend_id(index, gen):
    # an index given to another backend takes the next generation, so ids conntrack and
    # affinity still hold for the backend freed before no longer match (lib/lb.h).

    def _gen(self, bid: int) -> int:
        gens = self._backend_gen
        return gens[bid] if gens is not None and bid < len(gens) else 0

    def _kernel_id(self, bid: int) -> int:
        """The id programs see for index `bid`."""
        return M.backend_id(bid, self._gen(bid))

    def _gens_of(self, bids: list[int]) -> list[int] | None:
        """The indexes' generations, None when all are 0 (the common case: at C speed)."""
        gens = self._backend_gen
        if gens is None:
            return None
        try:
            got = list(map(gens.__getitem__, bids))
        except IndexError:  # an id past the array (refused by ApplyMixin._place, never written)
            got = [gens[b] if b < len(gens) else 0 for b in bids]
        return got if any(got) else None

    def _kernel_ids(self, bids: list[int]) -> list[int]:
        got = self._gens_of(bids)
        if got is None:
            return bids
        bits = M.BACKEND_INDEX_BITS
        return [g << bits | b for g, b in zip(got, bids)]

    def _indexes(self, ids: list[int]) -> list[int]:
        """Indexes of ids read from the maps (M.backend_index without the generation)."""
        mask = M.BACKEND_INDEX_MASK
        return ids if not ids or max(ids) <= mask else [i & mask for i in ids]

    def _next_gens(self, bids: list[int]) -> list[int]:
        """The generation each index takes after its backend is freed (wraps to 0), list at a
        time (a shrink frees hundreds of thousands)."""
        got = self._gens_of(bids)
        if got is None:
            return [1 % M.BACKEND_GENS] * len(bids)
        gens = M.BACKEND_GENS
        return [(g + 1) % gens for g in got]

    def _set_gens(self, gens: dict[int, int]) -> None:
        size = self.limits["kpr_backend"] + 1
        arr = self._backend_gen
        if arr is None:
            if not any(gens.values()):
                return
            arr = self._backend_gen = array("I", bytes(4 * size))
        for bid, gen in gens.items():
            if bid < size:
                arr[bid] = gen % M.BACKEND_GENS  # (a hand-edited entry's may be larger)

    def _with_gens(self, bids: list[int], vals: list[bytes]) -> list[bytes]:
        """Backend values with their index's generation stored (kpr_backend.gen)."""
        got = self._gens_of(bids)
        if got is None:
            return vals
        return [M.with_backend_gen(v, g) if g else v for g, v in zip(got, vals)]

    def _freed_id(self, top: int) -> int:
        """An id from the queue of freed ones (built from the table when first needed); when
        none is free, an id past the array, which ApplyMixin._place refuses (never written)."""
        vals, pending, freed = self._backend_vals, self._pending_vals, self._freed
        free = self._free_ids
        if free is None:
            # ids free since before this process first (their age unknown: the oldest), then
            # the ones it freed, in the order it freed them (not ascending: the lowest id may
            # have been freed a moment ago)
            free = self._free_ids = deque(
                chain((i for i in range(1, top) if i not in vals and i not in freed), (i for i in freed if i < top))
            )
        while free:
            bid = free.popleft()
            if bid not in vals and bid not in pending:
                freed.pop(bid, None)
                return bid
        self._ids_over = True
        return max(top, max(pending, default=0) + 1, self._next_backend)

    def _revnat_id(self, fk: bytes) -> int:
        idx = self._revnat_ids.get(fk)
        if idx is None:
            idx = self._next_revnat
            while idx in self._revnat_used or idx == 0:
                idx = (idx + 1) & 0xFFFFFFFF
            self._next_revnat = (idx + 1) & 0xFFFFFFFF or 1
            self._revnat_ids[fk] = idx
            self._revnat_used.add(idx)
            self._fresh_revnat.append(fk)
        return idx

    @staticmethod
    def _slot_range(g: _Group, prev: _Group | None, vals: bytes) -> int:
        """Set g's kpr_slots values (packed kpr_slot, `vals`) and range: the previous group's
        when it holds the same values (nothing to write), else none yet (span set, base 0:
        ApplyMixin._place allocates it once the service is accepted, and the new range is
        written before the kpr_svc entry that points at it). Returns the base (0: not placed)."""
        g.slot_vals = vals
        if prev is not None and prev.base and prev.slot_vals == vals:
            g.base, g.span = prev.base, prev.span
        else:
            g.base, g.span = 0, size_class(len(vals) >> 3)
        return g.base

    def _forget_revnat(self, fk: bytes) -> None:
        idx = self._revnat_ids.pop(fk, None)
        if idx is not None:
            self._revnat_used.discard(idx)

    # ------------------------------------------------------------------ rendering

    def _algorithm_for(self, service: Service) -> str:
        if not service.annotations:
            return self.algorithm
        algo = service.annotation_map.get(ALGORITHM_ANNOTATION, self.algorithm)
        return algo if algo in ("random", "maglev") else self.algorithm

    def _render(self, service: Service) -> dict[bytes, _Group]:
        """The groups a service wants, keyed by frontend key."""
        out: dict[bytes, _Group] = {}
        maglev = self._algorithm_for(service) == "maglev"
        # Frontends of one service usually share their backends: convert each backend once
        # (None: a single frontend, nothing to share).
        seen: dict[tuple, tuple[int, bytes]] | None = {} if len(service.frontends) > 1 else None
        for fe in service.frontends:
            addr = M.addr_to_bytes(fe.address)
            tail = _port_bytes(fe.port) + _PROTO_BYTE[fe.protocol]
            flags = _TYPE_FLAGS[fe.type]
            wild = _WILD4 if addr[:12] == _V4_MAPPED else _WILD6
            if addr == wild:
                flags |= M.SVC_F_WILDCARD
            self._render_group(out, service.key, fe, addr + tail, flags, maglev, seen)
            if fe.type is FrontendType.NODE_PORT and addr != wild:
                # Any node address (and socket LB's loopback) finds the service through address 0.
                self._render_group(out, service.key, fe, wild + tail, M.SVC_F_NODE_PORT | M.SVC_F_WILDCARD, maglev, seen)
        return out

    def _render_group(
        self,
        out: dict[bytes, _Group],
        owner: ServiceKey,
        fe: Frontend,
        fk: bytes,
        flags: int,
        maglev: bool,
        seen: dict[tuple, tuple[int, bytes]] | None,
    ) -> None:
        if fk in out:  # the wildcard entry of a NodePort served on several node addresses
            return
        prev = self._groups.get(fk)
        rev_nat = prev.rev_nat if prev is not None else self._revnat_id(fk)
        proto_b = fk[18:19]
        g = _Group(rev_nat, owner, revnat=fk + b"\x00")

        if seen is None:
            # One frontend (nothing to share with another): list at a time
            bids, all_active = self._backend_ids_of(fe.backends, proto_b)
            # (no local traffic policy set: neither scope is local, whatever the type)
            if all_active and not fe.external_local and not fe.internal_local:
                self._render_simple(out, g, prev, fe, fk, flags, maglev, bids)
                return
            # Backend ids by object identity (selectable() hands back the same objects;
            # hashing the dataclasses would cost more than the rest of the render).
            self._render_scopes(out, g, prev, fe, fk, flags, maglev, dict(zip(map(id, fe.backends), bids)), all_active)
            return
        pending_vals = self._pending_vals
        backend_ids = self._backend_ids
        to_bytes = M.addr_to_bytes
        all_active = True
        terminating = BackendState.TERMINATING
        ids: dict[int, int] = {}
        for b in fe.backends:
            term = b.state is terminating
            if seen is not None:
                ident = (b.address, b.port, proto_b, b.local)
                hit = seen.get(ident)
                if hit is not None:
                    ids[id(b)] = hit[0]
                    all_active = all_active and not term
                    continue
            bkey = to_bytes(b.address) + b.port.to_bytes(2, "big") + proto_b
            bid = backend_ids.get(bkey) or self._backend_id(bkey)
            val = bkey + _BACKEND_TAIL[b.local]
            if self._backend_gen is not None:
                val = self._with_gens([bid], [val])[0]
            pending_vals[bid] = val
            if seen is not None:
                seen[ident] = (bid, val)
            if term:
                all_active = False
            ids[id(b)] = bid
        self._render_scopes(out, g, prev, fe, fk, flags, maglev, ids, all_active)

    def _backend_ids_of(self, backends: tuple[Backend, ...], proto_b: bytes) -> tuple[list[int], bool]:
        """The backends' ids in order (allocated where new, their values put in _pending_vals)
        and whether all are active. List at a time, not backend at a time: a full sync runs
        this for 500k backends at 50k services. Addresses are converted directly: a full
        sync's are mostly new, where addr_to_bytes's cache only adds its bookkeeping."""
        n = len(backends)
        addrs = list(map(_ADDRESS, backends))
        ports = list(map(_PORT_OF, backends))
        if n and ports.count(ports[0]) == n:
            tail = _port_bytes(ports[0]) + proto_b
            try:
                bkeys = [_V4_PREFIX + _pton(_AF_INET, a) + tail for a in addrs]
            except OSError:  # IPv6 (or a bad address: addr_to_bytes names it)
                bkeys = [a + tail for a in map(M.addr_to_bytes, addrs)]
        else:
            bkeys = [M.addr_to_bytes(a) + _port_bytes(p) + proto_b for a, p in zip(addrs, ports)]
        if any(map(_LOCAL_OF, backends)):
            vals = [bk + _BACKEND_TAIL[loc] for bk, loc in zip(bkeys, map(_LOCAL_OF, backends))]
        else:
            t0 = _BACKEND_TAIL[0]
            vals = [bk + t0 for bk in bkeys]
        backend_ids = self._backend_ids
        bids = backend_ids.get_many(bkeys)
        if None in bids:
            nxt = self._next_backend
            if 0 < nxt and nxt + n <= self.limits["kpr_backend"]:
                # straight from the counter: below it every id is taken, above it none
                if bids.count(None) == n and len(set(bkeys)) == n:
                    # all new (as in a full sync into empty maps): at once
                    bids = list(range(nxt, nxt + n))
                    backend_ids.add_new(zip(bkeys, bids))
                    nxt += n
                else:
                    for i, bid in enumerate(bids):
                        if bid is None:
                            bkey = bkeys[i]
                            bid = backend_ids.get(bkey)  # listed twice in this frontend
                            if bid is None:
                                bid = nxt
                                backend_ids.add_new(((bkey, bid),))
                                nxt += 1
                            bids[i] = bid
                self._next_backend = nxt
            else:
                # One id at a time, each pending before the next is taken: _freed_id skips
                # pending ids, and the counter's last ids are not in the table yet (two new
                # backends got one id when the counter ran out between them).
                pending = self._pending_vals
                for i, bid in enumerate(bids):
                    if bid is None:
                        bid = bids[i] = self._backend_id(bkeys[i])
                        pending[bid] = vals[i]
        self._pending_vals.update(zip(bids, self._with_gens(bids, vals)))
        return bids, BackendState.TERMINATING not in map(_STATE_OF, backends)

    def _render_simple(
        self, out: dict[bytes, _Group], g: _Group, prev: _Group | None, fe: Frontend, fk: bytes, flags: int,
        maglev: bool, bids: list[int],
    ) -> None:
        """The common frontend, packed directly: one scope (no local traffic policy), every
        backend active. Equal to what _render_scopes makes of it (tests/test_servicemaps_render.py)."""
        rev_nat = g.rev_nat
        f = self._frontend_flags(g, fe, flags, maglev) if fe.affinity_timeout or fe.source_ranges or maglev else flags
        sel = bids if len(set(bids)) == len(bids) else list(dict.fromkeys(bids))
        prev_order = prev.order_of(M.SCOPE_EXTERNAL) if prev is not None else None
        order = sorted(sel) if not prev_order else _stable_order(prev_order, sel)
        n = len(order)
        if n > _MAX_COUNT:
            _too_many(fk, n)
        # slot values as u32 words (kpr_slot: id, flags = the backend's state): the ids dropped
        # into a repeated template
        words = _ACTIVE_SLOT * n
        kids = self._kernel_ids(order)
        words[0::2] = array("I", kids)
        base = self._slot_range(g, prev, words.tobytes())
        g.set_head(fk, M.SVC_VAL.pack(base, n, 0, rev_nat, f, fe.affinity_timeout))
        order_t = tuple(order)
        g.set_order(M.SCOPE_EXTERNAL, order_t)
        if kids is order:
            g.derive_slots()  # (generation 0 everywhere: the slots are the order's ids, active)
        if maglev and order:
            # names from the packed address, as adoption derives them: same table after a restart
            pending_vals = self._pending_vals
            g.set_maglev(M.SCOPE_EXTERNAL, tuple(sorted((_backend_name(pending_vals[b]), k) for b, k in zip(order, kids))))
        # Usually the slot order itself (sorted when new): kept once.
        g.backends = order_t if not prev_order else tuple(sorted(order_t))
        out[fk] = g

    def _frontend_flags(self, g: _Group, fe: Frontend, flags: int, maglev: bool) -> int:
        """Slot 0's flags: the type's plus affinity, source ranges (their keys put in g) and Maglev."""
        if fe.affinity_timeout > 0:
            flags |= M.SVC_F_AFFINITY
        if fe.source_ranges:
            flags |= M.SVC_F_SOURCE_RANGES
            g.srcrange = frozenset(self._srcrange_keys(fe, g.rev_nat))
        if maglev:
            flags |= M.SVC_F_MAGLEV
        return flags

    def _render_scopes(
        self, out: dict[bytes, _Group], g: _Group, prev: _Group | None, fe: Frontend, fk: bytes, flags: int,
        maglev: bool, ids: dict[int, int], all_active: bool,
    ) -> None:
        """Any frontend: both scopes, terminating backends, local traffic policies."""
        rev_nat = g.rev_nat
        pending_vals = self._pending_vals
        terminating = BackendState.TERMINATING
        common = self._frontend_flags(g, fe, flags, maglev)

        scopes = [(M.SCOPE_EXTERNAL, fe.external_scope_local)]
        ext_local, int_local = fe.external_scope_local, fe.internal_scope_local
        if all_active and not ext_local:
            # the common case, without selectable()'s filtering: every backend, no terminating
            ext: tuple[list[int], list[int]] = (list(dict.fromkeys(ids.values())), [])
        else:
            ext = self._scope_backends(fe, ext_local, ids, all_active)
        if int_local == ext_local:
            intl, two = ext, False
        else:
            intl = self._scope_backends(fe, int_local, ids, all_active)
            two = (set(ext[0]), set(ext[1])) != (set(intl[0]), set(intl[1]))
        if two:
            scopes.append((M.SCOPE_INTERNAL, fe.internal_scope_local))

        # kpr_slot values: id, flags (the backend's state in this service: terminating ones fill
        # slots after count, or all of 1..count in the KEP-1669 fallback); the external scope's
        # slots first, the internal scope's after them, in one range (see _Group.place)
        pack_slot = M.SLOT.pack
        active_ids = None if all_active else {ids[id(b)] for b in fe.backends if b.state is not terminating}
        referenced: set[int] = set()
        # slot 0 entries first, the internal scope's before the external one's (as written)
        head_keys: list[bytes] = []
        heads: list[tuple[int, int, int, int]] = []  # offset in the range, count, terminating, flags
        slot_vals: list[bytes] = []
        for scope, local in scopes:
            sel, term = ext if scope == M.SCOPE_EXTERNAL else intl
            prev_order = prev.order_of(scope) if prev is not None else None
            order = _stable_order(prev_order, sel)
            if len(order) > _MAX_COUNT or len(term) > _MAX_COUNT:
                _too_many(fk, max(len(order), len(term)))
            g.set_order(scope, order)
            f = common
            if local:
                f |= M.SVC_F_LOCAL_SCOPE
            if two and scope == M.SCOPE_EXTERNAL:
                f |= M.SVC_F_TWO_SCOPES
            head_keys.insert(0, fk + _BYTE[scope] + _SVC_TAIL)
            heads.insert(0, (len(slot_vals), len(order), len(term), f))
            slotted = order + term if term else order
            kids = self._kernel_ids(slotted)
            if active_ids is None:
                slot_vals += [pack_slot(k, M.BACKEND_ACTIVE) for k in kids]
            else:
                slot_vals += [
                    pack_slot(k, M.BACKEND_ACTIVE if bid in active_ids else M.BACKEND_TERMINATING)
                    for bid, k in zip(slotted, kids)
                ]
            referenced.update(slotted)
            if maglev and order:
                # names from the packed address, as adoption derives them: same table after a restart
                g.set_maglev(scope, tuple(sorted((_backend_name(pending_vals[b]), k) for b, k in zip(order, kids))))
        base = self._slot_range(g, prev, b"".join(slot_vals))
        aff = fe.affinity_timeout
        head_vals = [
            M.SVC_VAL.pack(base + off if base and (n or t) else 0, n, t, rev_nat, f, aff) for off, n, t, f in heads
        ]
        g.set_svc(head_keys, head_vals)
        backends = tuple(sorted(referenced))
        # Usually the one scope's slot order itself (every backend active, sorted): kept once.
        first = g.order_of(M.SCOPE_EXTERNAL)
        g.backends = first if first == backends else backends
        out[fk] = g

    @staticmethod
    def _scope_backends(
        fe: Frontend, local_only: bool, ids: dict[int, int], all_active: bool
    ) -> tuple[list[int], list[int]]:
        """(selectable ids, terminating ids kept for existing flows) of one scope."""
        sel = list(dict.fromkeys([ids[id(b)] for b in fe.selectable(local_only)]))
        if all_active:
            return sel, []
        chosen = set(sel)
        term = sorted(
            {ids[id(b)] for b in fe.backends if b.state is BackendState.TERMINATING and (b.local or not local_only)}
            - chosen
        )
        return sel, term

    @staticmethod
    def _srcrange_keys(fe: Frontend, rev_nat: int) -> list[bytes]:
        keys = []
        for cidr in fe.source_ranges:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version != fe.family:
                continue  # a range of the other family can never match this frontend's clients
            plen = net.prefixlen + (96 if net.version == 4 else 0)
            keys.append(M.SRCRANGE_KEY.pack(32 + plen, rev_nat, M.addr_to_bytes(str(net.network_address))))
        return keys


_MAX_COUNT = 0xFFFF  # kpr_svc_val's count and terminating are u16


def _too_many(fk: bytes, n: int) -> None:
    raise ValueError(
        f"frontend {_fk_label(fk)}: {n} backends in one scope, more than the {_MAX_COUNT} a service entry "
        "counts (lib/maps.h kpr_svc_val)"
    )


def _stable_order(prev: tuple[int, ...] | list[int] | None, want: list[int]) -> list[int]:
    """Slot order for `want` that moves as few ids as possible from `prev`.

    Survivors keep their slots; new ids fill the holes, then go at the end; leftover holes
    are closed with ids taken from the end. Without a previous order, ids are sorted.
    """
    if not prev:
        return sorted(want)
    want_set = set(want)
    prev_set = set(prev)
    out: list[int | None] = [x if x in want_set else None for x in prev]
    added = sorted(x for x in want_set if x not in prev_set)
    holes = [i for i, x in enumerate(out) if x is None]
    ai = 0
    for i in holes:
        if ai < len(added):
            out[i] = added[ai]
            ai += 1
    out.extend(added[ai:])
    # close remaining holes from the tail
    lo = 0
    while True:
        while out and out[-1] is None:
            out.pop()
        try:
            lo = out.index(None, lo)
        except ValueError:
            break
        out[lo] = out.pop()
    return out  # type: ignore[return-value]
