"""Read-back and garbage collection: adopting pinned maps (rebuilding the shadow from them),
check()/repair against the desired state, gc() of entries nobody re-delivered, and decoding
the maps for tests and status."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from itertools import chain, groupby
from typing import Any

from ..bpf import maps as M
from .groups import _SCOPE_NAMES, _Group, _backend_name, _fk_label, _own, group_entries

log = logging.getLogger("kpr.servicemaps")  # one logger for the whole writer, as before the split


class ReconcileMixin:
    """ServiceMapWriter's reading side (state: see ServiceMapWriter._reset_shadow)."""

    # ------------------------------------------------------------------ adoption

    def _reload(self) -> None:
        """Rebuild the shadow from the maps' contents, keeping known owners."""
        owners = {fk: g.owner for fk, g in self._groups.items() if g.owner is not None}
        services, delivered = self._services, self._delivered
        self._reset_shadow()
        self._services, self._delivered = services, delivered

        # Whole maps at a time (a restart adopts, and every full sync re-reads, 1M entries at
        # 50k services): values unpacked by struct over the joined entries, not one by one.
        be_items = self.maps["kpr_backend"].items()
        vals = self._backend_vals
        if be_items:
            bids = [t[0] for t in M.U32.iter_unpack(b"".join([k for k, _ in be_items]))]
            bvals = [v for _, v in be_items]
            vals.update(zip(bids, bvals))
            self._backend_ids = dict(zip([v[:19] for v in bvals], bids))
            self._backend_refs.add_many(dict.fromkeys(bids, 0))
            self._next_backend = max(self._next_backend, max(bids) + 1)

        by_revnat: dict[int, _Group] = {}
        svc_items = self.maps["kpr_svc"].items()
        # Sorted by key, a frontend's entries are one run: scope by scope, slot 0 first
        # (slots above 255 sort out of order: their runs take the general path).
        svc_items.sort()
        keys = [k for k, _ in svc_items]
        values = [v for _, v in svc_items]
        del svc_items
        scopes, slots, bids, counts, revnats = _svc_columns(keys, values)
        groups = self._groups
        referenced: list[tuple[bytes, set[int]]] = []
        fks = [k[:19] for k in keys]
        for fk, run in groupby(range(len(keys)), fks.__getitem__):
            at = list(run)
            a, b = at[0], at[-1] + 1
            rev_nat = revnats[a]
            g = groups[fk] = _Group(rev_nat, owners.get(fk))
            by_revnat[rev_nat] = g
            g.set_svc(keys[a:b], values[a:b])
            m = b - a - 1
            if slots[a] == 0 and scopes.count(scopes[a], a, b) == b - a and slots[a + 1 : b] == list(range(1, m + 1)):
                # one scope, slot 0 and slots 1..m (the common run)
                count = counts[a]
                g.set_order(scopes[a], bids[a + 1 : a + 1 + min(count, m)])
                if m:
                    referenced.append((fk, set(bids[a + 1 : b])))
                continue
            heads: dict[int, int] = {}
            by_scope: dict[int, dict[int, int]] = {}
            for i in at:
                if slots[i] == 0:
                    heads[scopes[i]] = counts[i]
                else:
                    by_scope.setdefault(scopes[i], {})[slots[i]] = bids[i]
            for scope, count in heads.items():
                got = by_scope.get(scope, {})
                g.set_order(scope, [got[j] for j in range(1, count + 1) if j in got])
            if by_scope:
                ids: set[int] = set()
                for got in by_scope.values():
                    ids.update(got.values())
                referenced.append((fk, ids))
        if referenced:
            gone = set(vals.missing({i for _, ids in referenced for i in ids}))
            for fk, ids in referenced:
                g = groups[fk]
                g.backends = tuple(sorted(ids - gone if gone else ids))
            self._backend_refs.add_many(Counter(chain.from_iterable(groups[fk].backends for fk, _ in referenced)))

        for k, v in self.maps["kpr_revnat"].items():
            idx = M.U32.unpack(k)[0]
            fk = v[:19]
            g = by_revnat.get(idx)
            if g is None:
                self._stray["kpr_revnat"].add(k)
            else:
                g.revnat = v
            self._revnat_used.add(idx)
            self._next_revnat = max(self._next_revnat, idx + 1)
        for fk, g in self._groups.items():
            self._revnat_ids[fk] = g.rev_nat
            self._revnat_used.add(g.rev_nat)
            self._next_revnat = max(self._next_revnat, g.rev_nat + 1)

        for k, _v in self.maps["kpr_srcrange"].items():
            g = by_revnat.get(M.SRCRANGE_KEY.unpack(k)[1])
            if g is None:
                self._stray["kpr_srcrange"].add(k)
            else:
                g.srcrange = g.srcrange | {k}
        for k in list(self.maps["kpr_maglev"].keys()):
            rev_nat, scope = M.MAGLEV_KEY.unpack(k)
            g = by_revnat.get(rev_nat)
            if g is None:
                self._stray["kpr_maglev"].add(k)
                continue
            # The table was built from the selectable slots; take that as its input so an
            # unchanged re-delivery after a restart does not rebuild every table.
            g.set_maglev(scope, self._maglev_input(g.order_of(scope) or ()))
        self._by_service = {}
        for fk, g in self._groups.items():
            if g.owner is not None:
                _own(self._by_service, g.owner, fk)
        self._count = group_entries(self._groups.values())

    def _maglev_input(self, ids: Iterable[int]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((_backend_name(self._backend_vals[i]), i) for i in ids if i in self._backend_vals))
    def gc(self) -> int:
        """Remove adopted entries no service re-delivered since open; returns frontends removed."""
        with self._lock:
            self._require_open()
            orphans = {fk: g for fk, g in self._groups.items() if g.owner is None}
            self._begin()
            self._apply(orphans, {}, strays=True)
            if orphans:
                log.info("event=servicemaps_gc frontends=%d", len(orphans))
            return len(orphans)

    def read_back(self) -> dict[str, Any]:
        """Decode the maps (not the shadow) into plain data: for tests. The decoding is
        kpr.readback's, which `kpr service list --datapath` and `kpr explain` use too."""
        from ..readback import decode_maps

        with self._lock:
            self._require_open()
            d = decode_maps(self.maps)
            frontends = {}
            for (fk, scope), slots in sorted(d.slots.items()):
                head = slots.get(0)
                label = f"{_fk_label(fk)} {_SCOPE_NAMES.get(scope, scope)}"
                if head is None:
                    frontends[label] = {"error": "slots without a service entry", "slots": sorted(slots)}
                    continue
                _, count, term, rev_nat, flags, aff = head
                ids = [slots.get(i, (0,))[0] for i in range(1, count + term + 1)]
                names = [_backend_label(d.backends.get(i)) for i in ids]
                table = d.maglev.get((rev_nat, scope))
                frontends[label] = {
                    "rev_nat": rev_nat,
                    "flags": sorted(n for bit, n in M.SVC_FLAG_NAMES.items() if flags & bit),
                    "affinity_timeout": aff,
                    "backends": sorted(names[:count]),
                    "terminating": sorted(names[count:]),
                    "backend_ids": ids[:count],
                    "source_ranges": sorted(d.ranges.get(rev_nat, [])) if flags & M.SVC_F_SOURCE_RANGES else [],
                    "maglev": _table_shares(table, d.backends) if table is not None else None,
                    "stray_slots": sorted(s for s in slots if s > count + term),
                }
            return {
                "frontends": frontends,
                "backends": d.backends,
                "revnat": d.revnat,
                "maglev_tables": sorted(d.maglev),
            }

    def entry_counts(self) -> dict[str, int]:
        """Entries per map according to the shadow, strays found at the last read-back included
        (cheap: no syscalls)."""
        with self._lock:
            c = self._counts()
            return {name: c[name] for name in M.SERVICE_MAPS}

    def kernel_counts(self) -> dict[str, int]:
        """Entries per map as the kernel holds them (read back)."""
        with self._lock:
            self._require_open()
            return {name: self.maps[name].count() for name in M.SERVICE_MAPS}

    def ops(self) -> dict[str, dict[str, int]]:
        """Elements written/deleted and syscalls made, per map, since open."""
        return {name: dict(m.ops) for name, m in self.maps.items()}

    def ids(self) -> dict[str, int]:
        """Kernel map ids by name (unchanged across an adopting restart)."""
        return {name: m.id for name, m in self.maps.items()}

    def backend_ids(self) -> dict[str, int]:
        """Backend "addr:port/proto" -> id, from the shadow."""
        with self._lock:
            return {_backend_label_raw(v): bid for bid, v in self._backend_vals.items()}

    def _op_total(self) -> int:
        return sum(m.ops["update"] + m.ops["delete"] for m in self.maps.values())

    def _repair(self) -> int:
        """Make the maps equal the shadow (the accepted desired state): read them back, then
        write what differs and delete what nobody wants. Returns entries written or deleted."""
        groups, vals = self._groups, self._backend_vals
        saved = {a: getattr(self, a) for a in _SHADOW}
        before = self._op_total()
        try:
            self._reload()  # the shadow now describes the kernel
            self._begin()
            self._pending_vals = {bid: vals[bid] for g in groups.values() for bid in g.backends if bid in vals}
            self._apply_diff(dict(self._groups), groups, True)
        except BaseException:
            # The shadow stays the desired state (the kernel differs until a later repair).
            for a, v in saved.items():
                setattr(self, a, v)
            self._begin()
            raise
        for fk, g in groups.items():
            self._revnat_ids[fk] = g.rev_nat
            self._revnat_used.add(g.rev_nat)
            self._next_revnat = max(self._next_revnat, g.rev_nat + 1)
        # identities as the maps now hold them (a hand-edited value must not keep its id)
        self._backend_ids = {val[:19]: bid for bid, val in self._backend_vals.items()}
        # The desired state's ids were written back too: the counter stays above them (new
        # ids are taken from it without a look-up, see RenderMixin._backend_id).
        self._next_backend = max(self._next_backend, saved["_next_backend"])
        self._ids_wrapped = self._ids_wrapped or saved["_ids_wrapped"]
        return self._op_total() - before

    def check(self) -> int:
        """Compare the maps with the desired state and repair any difference (one made by hand
        included); returns the entries repaired. Before the initial sync the desired state is
        the adopted one: only entries nothing accounts for go."""
        with self._lock:
            self._require_open()
            self.checks += 1
            n = self._repair()
            if n:
                self.repairs += n
                log.warning("event=servicemaps_repaired entries=%d", n)
            self._retry_refused()
            return n


# What _reset_shadow sets: the writer's picture of the maps.
_SHADOW = (
    "_groups", "_by_service", "_backend_ids", "_backend_vals", "_backend_refs", "_revnat_ids", "_revnat_used",
    "_next_backend", "_ids_wrapped", "_next_revnat", "_stray", "_count",
)


def _backend_label(b: dict | None) -> str:
    if b is None:
        return "?"
    host = f"[{b['address']}]" if ":" in b["address"] else b["address"]
    return f"{host}:{b['port']}"


def _backend_label_raw(v: bytes) -> str:
    return _backend_name(v) + "/" + M.PROTO_NAMES.get(v[18], str(v[18]))


def _table_shares(table: list[int], backends: dict[int, dict]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for bid in table:
        counts[bid] = counts.get(bid, 0) + 1
    return {_backend_label(backends.get(bid)): n for bid, n in sorted(counts.items())}


# kpr_svc's layout as the fast column split below reads it (lib/maps.h: key addr16, port,
# proto, scope, slot, pad; value backend_id, count, terminating, rev_nat, flags, affinity).
_COLUMNS_OK = (M.SVC_KEY.format, M.SVC_VAL.format) == ("=16sHBBHH", "=IHHIII")


def _svc_columns(keys: list[bytes], values: list[bytes]) -> tuple[bytes, list[int], list[int], list[int], list[int]]:
    """(scope, slot) of every kpr_svc key and (backend id, count, rev_nat) of every value, as
    columns cut from the joined entries by memoryview casts (no object per entry)."""
    kb, vb = b"".join(keys), b"".join(values)
    if _COLUMNS_OK and len(kb) == 24 * len(keys) and len(vb) == 20 * len(values):
        k16, v16, v32 = memoryview(kb).cast("H"), memoryview(vb).cast("H"), memoryview(vb).cast("I")
        return kb[19::24], k16[10::12].tolist(), v32[0::5].tolist(), v16[2::10].tolist(), v32[2::5].tolist()
    kt, vt = list(M.SVC_KEY.iter_unpack(kb)), list(M.SVC_VAL.iter_unpack(vb))
    return (bytes(t[3] for t in kt), [t[4] for t in kt], [t[0] for t in vt], [t[1] for t in vt], [t[3] for t in vt])
