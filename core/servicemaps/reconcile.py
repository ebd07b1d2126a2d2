"""Read-back and garbage collection: adopting pinned maps (rebuilding the shadow from them),
check()/repair against the desired state, gc() of entries nobody re-delivered, and decoding
the maps for tests and status."""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from collections.abc import Iterable
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

from ..bpf import maps as M
from ..idtables import KeyIds
from .groups import _EXT_KEY_TAIL, _SCOPE_NAMES, _Group, _backend_name, _fk_label, _own, group_entries
from .slots import SlotAllocator, size_class

log = logging.getLogger("kpr.servicemaps")  # one logger for the whole writer, as before the split


class ReconcileMixin:
    """ServiceMapWriter's reading side (state: see ServiceMapWriter._reset_shadow)."""

    # ------------------------------------------------------------------ adoption

    def _reload(self) -> None:
        """Rebuild the shadow from the maps' contents, keeping known owners."""
        owners = {fk: g.owner for fk, g in self._groups.items() if g.owner is not None}
        services = self._services
        held = self._slots.held  # freed by an earlier operation: still not reusable
        self._reset_shadow()
        self._services = services

        # Whole maps at a time (a restart adopts, and every full sync re-reads, 1M entries at
        # 50k services): values unpacked by struct over the joined entries, not one by one.
        be_map = self.maps["kpr_backend"]
        # read once for both decodings below (an array's copy is 12 MB at 500k backends)
        be_raw = be_map.array_values() if getattr(be_map, "type", None) == M.BPF_MAP_TYPE_ARRAY else None
        # one run of ids lo..hi-1, all backends (as a full sync leaves them): values as one
        # slice, no (id, value) per entry
        dense = M.backend_run(be_map, be_raw)
        be_items = M.backend_items(be_map, be_raw) if dense is None else dense
        vals = self._backend_vals
        if be_items:
            if dense is not None:
                vs = be_map.value_size
                bids, blob = dense, be_raw[dense.start * vs : dense.stop * vs]
            else:
                vs = len(be_items[0][1])
                bids, blob = [i for i, _ in be_items], b"".join(v for _, v in be_items)
            offsets = range(0, len(blob), vs)
            lo = bids[0]
            run = dense is not None or bids == list(range(lo, lo + len(bids)))  # (ids 1..n: one copy, no loop)
            top = max(bids) + 1
            if 4 * len(bids) >= top:
                # ids far above 0 (the low ones freed before) but dense enough: in the id
                # tables' arrays (about 36 bytes per id up to the highest), not their dicts
                # (about 225 per id)
                vals.reserve(top)
                self._backend_refs.reserve(top)
            if not (run and vals.store_run(lo, blob)):
                vals.update(zip(bids, (blob[o : o + vs] for o in offsets)))
            self._backend_ids.take(dict(zip([blob[o : o + 19] for o in offsets], bids)))
            self._next_backend = max(self._next_backend, max(bids) + 1)
        # generations, the freed (zero) entries' too: never hand out an id flows may still hold
        gens = M.backend_entry_gens(be_map, be_raw)
        if not gens and be_items and len(bids) < max(bids):
            # none stored (a kpr without generations pinned it, or nothing was freed yet) and
            # holes below the highest id: a counter handed them out and they were freed, their
            # ids perhaps still in conntrack with generation 0; their next backends take 1
            gens = dict.fromkeys(vals.missing(range(1, max(bids))), 1)
        self._set_gens(gens)

        by_revnat: dict[int, _Group] = {}
        groups = self._groups
        referenced = self._reload_svc(owners, by_revnat, held)
        per_id: Counter[int] = Counter()
        if referenced:
            wanted = {i for _, ids in referenced for i in ids}
            if dense is not None and wanted and dense.start <= min(wanted) and max(wanted) < dense.stop:
                gone: set[int] = set()  # (every id of the run is a backend: none to look up)
            else:
                gone = set(vals.missing(wanted))
            for fk, ids in referenced:
                g = groups[fk]
                g.backends = tuple(sorted(ids - gone if gone else ids))
            per_id.update(chain.from_iterable(groups[fk].backends for fk, _ in referenced))
        if be_items:
            # every backend's count of referring frontends (0: nobody's), set at once
            counts = array("q", map(per_id.get, bids, repeat(0)))
            if not (run and self._backend_refs.add_run(lo, counts)):
                self._backend_refs.add_many(dict(zip(bids, counts)))

        rn_items = self.maps["kpr_revnat"].items()
        rn_idx = [M.U32.unpack(k)[0] for k, _v in rn_items]
        for (k, v), idx in zip(rn_items, rn_idx):
            g = by_revnat.get(idx)
            if g is None:
                self._stray["kpr_revnat"].add(k)
            else:
                g.revnat = v
        # (list at a time: 50k frontends at every full sync and check)
        group_rn = list(map(_REV_NAT, groups.values()))
        self._revnat_ids.update(zip(groups, group_rn))
        self._revnat_used.update(rn_idx, group_rn)
        self._next_revnat = max(self._next_revnat, max(rn_idx, default=0) + 1, max(group_rn, default=0) + 1)

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

    def _reload_svc(
        self, owners: dict[bytes, Any], by_revnat: dict[int, _Group], held: list[tuple[int, int]]
    ) -> list[tuple[bytes, set[int]]]:
        """Groups from kpr_svc's service entries and the kpr_slots ranges they point at; the
        allocator from those ranges; an older kpr's per-slot entries kept aside (_legacy).
        Returns (frontend key, backend ids its slots name) for the reference counts."""
        heads: list[tuple[bytes, bytes]] = []
        legacy: dict[tuple[bytes, int], dict[int, int]] = {}
        legacy_keys: list[bytes] = []
        for k, v in self.maps["kpr_svc"].items():
            if k[20] or k[21]:
                legacy_keys.append(k)
                legacy.setdefault((k[:19], k[19]), {})[k[20] | k[21] << 8] = M.U32.unpack_from(v)[0]
            else:
                heads.append((k, v))
        self._legacy = legacy_keys
        # internal scope's entry first within a frontend, as rendering packs them
        heads.sort(key=lambda kv: (kv[0][:19], -kv[0][19]))
        unpack = M.SVC_VAL.unpack
        decoded = [unpack(v) for _, v in heads]
        arr = memoryview(b"")
        if any(d[0] for d in decoded):
            arr = memoryview(self.maps["kpr_slots"].array_values())
        limit = len(arr) >> 3
        mask = M.BACKEND_INDEX_MASK
        groups = self._groups
        referenced: list[tuple[bytes, set[int]]] = []
        i, n = 0, len(heads)
        while i < n:
            k, v = heads[i]
            fk = k[:19]
            if i + 1 == n or heads[i + 1][0][:19] != fk:
                base, count, term, rev_nat = decoded[i][:4]
                c = count + term
                if c and base and base + c <= limit:
                    # the common frontend, one scope and its range: the general case below,
                    # unrolled (a full sync or check at 50k services reads 50k of them)
                    sv = bytes(arr[base * 8 : (base + c) * 8])
                    words = array("I", sv)
                    ids = words[0::2]
                    if not term and k[19:] == _EXT_KEY_TAIL and max(ids) <= mask:
                        # as rendering writes it (external scope, ids of generation 0, none
                        # terminating): made as bulk rendering makes it, each field once (the
                        # calls below took a third of a restart's adoption at 20k services)
                        g = groups[fk] = _Group.fresh(
                            rev_nat, owners.get(fk), b"", fk, v, ids, base, size_class(c),
                            None if words[1::2].count(M.BACKEND_ACTIVE) == c else sv,
                        )
                        by_revnat[rev_nat] = g
                        referenced.append((fk, set(ids)))
                        i += 1
                        continue
                    g = groups[fk] = _Group(rev_nat, owners.get(fk))
                    by_revnat[rev_nat] = g
                    if k[19:] == _EXT_KEY_TAIL:
                        g.set_head(fk, v)  # (fk: the key groups holds it by)
                    else:
                        g.set_packed(k, v, 1)
                    g.base, g.span = base, size_class(c)
                    slot_ids = self._indexes(ids.tolist())
                    g.set_order(k[19], slot_ids[:count])
                    g.keep_slots(sv)  # (the usual ones not kept, as a fresh group's)
                    referenced.append((fk, set(slot_ids)))
                    i += 1
                    continue
            j = i + 1
            while j < n and heads[j][0][:19] == fk:
                j += 1
            run = range(i, j)
            rev_nat = decoded[i][3]
            g = groups[fk] = _Group(rev_nat, owners.get(fk))
            by_revnat[rev_nat] = g
            g.set_svc([heads[x][0] for x in run], [heads[x][1] for x in run])
            spans = [(decoded[x][0], decoded[x][1] + decoded[x][2]) for x in run if decoded[x][1] + decoded[x][2]]
            lo = min((b for b, _ in spans), default=0)
            hi = max((b + c for b, c in spans), default=0)
            ids: set[int] = set()
            if spans and lo and all(b for b, _ in spans) and hi <= limit:
                g.base, g.span = lo, size_class(hi - lo)
                g.slot_vals = bytes(arr[lo * 8 : hi * 8])
                words = array("I", g.slot_vals)
                for x in run:
                    base, count, term = decoded[x][:3]
                    off = base - lo
                    g.set_order(heads[x][0][19], self._indexes(words[2 * off : 2 * (off + count) : 2].tolist()))
                ids.update(self._indexes(words[0::2].tolist()))
            else:
                # no range (an older kpr's entry: its slots are in kpr_svc) or a broken one
                for x in run:
                    scope, count = heads[x][0][19], decoded[x][1]
                    got = legacy.get((fk, scope), {})
                    g.set_order(scope, self._indexes([got[s] for s in range(1, count + 1) if s in got]))
                    ids.update(self._indexes(list(got.values())))
            if ids:
                referenced.append((fk, ids))
            i = j
        self._slots, bad = SlotAllocator.adopt(
            self.specs["kpr_slots"].max_entries, [(g.base, g.span) for g in groups.values() if g.base], held
        )
        if bad:
            bad_set = set(bad)
            for g in groups.values():
                if g.base in bad_set:
                    g.base = g.span = 0
                    g.slot_vals = b""
            log.warning("event=servicemaps_slots_overlap frontends=%d: given new ranges when next written", len(bad))
        return referenced

    def sweep_legacy(self) -> int:
        """Delete the per-slot kpr_svc entries an older kpr wrote (slot > 0). Call once every
        program reads kpr_slots (check() does, after the initial sync); returns entries deleted."""
        with self._lock:
            self._ensure_read()
            keys, self._legacy = self._legacy, []
            if keys:
                self.maps["kpr_svc"].delete_many(keys, batch=self.batch)
                log.info("event=servicemaps_legacy_swept entries=%d", len(keys))
            return len(keys)

    def _maglev_input(self, ids: Iterable[int]) -> tuple[tuple[str, int], ...]:
        vals = self._backend_vals
        return tuple(sorted((_backend_name(vals[i]), self._kernel_id(i)) for i in ids if i in vals))
    def gc(self) -> int:
        """Remove adopted entries no service re-delivered since open; returns frontends removed."""
        with self._op():
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
                    frontends[label] = {"error": "slots without a service entry", "slots": d.legacy.get((fk, scope), [])}
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
                    "stray_slots": d.legacy.get((fk, scope), []),
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
            self._ensure_read()
            c = self._counts()
            c["kpr_slots"] = self._count["kpr_slots"]  # the groups' ranges (held ones are free in the kernel's eyes)
            return {name: c[name] for name in M.SERVICE_MAPS}

    def kernel_counts(self) -> dict[str, int]:
        """Entries per map as the kernel holds them (read back). The arrays always hold
        max_entries: kpr_slots counts the slots the service entries point at, kpr_backend
        its non-zero entries."""
        return self._kernel_counts()[0]

    def _kernel_counts(self, frontends: bool = False) -> tuple[dict[str, int], int]:
        """kernel_counts(), and with `frontends` the frontends kpr_svc's entries name (what a
        read makes groups of; else 0)."""
        with self._lock:
            self._require_open()
            skip = ("kpr_svc", "kpr_slots", "kpr_backend")
            out = {name: self.maps[name].count() for name in M.SERVICE_MAPS if name not in skip}
            svc = self.maps["kpr_svc"].items()  # one dump for the counts and the frontends
            out["kpr_svc"] = len(svc)
            out["kpr_slots"] = slots_in_use(svc)
            out["kpr_backend"] = len(M.backend_items(self.maps["kpr_backend"]))
            n_fe = len({k[:19] for k, _v in svc if not (k[20] or k[21])}) if frontends else 0  # (an older kpr's slot entries: none)
            return {name: out[name] for name in M.SERVICE_MAPS}, n_fe

    def ops(self) -> dict[str, dict[str, int]]:
        """Elements written/deleted and syscalls made, per map, since open."""
        return {name: dict(m.ops) for name, m in self.maps.items()}

    def ids(self) -> dict[str, int]:
        """Kernel map ids by name (unchanged across an adopting restart)."""
        return {name: m.id for name, m in self.maps.items()}

    def backend_ids(self) -> dict[str, int]:
        """Backend "addr:port/proto" -> id, from the shadow."""
        with self._lock:
            self._ensure_read()
            return {_backend_label_raw(v): self._kernel_id(bid) for bid, v in self._backend_vals.items()}

    def _op_total(self) -> int:
        return sum(m.ops["update"] + m.ops["delete"] for m in self.maps.values())

    def _repair(self) -> int:
        """Make the maps equal the shadow (the accepted desired state): read them back, then
        write what differs and delete what nobody wants. Returns entries written or deleted."""
        groups, vals = self._groups, self._backend_vals
        saved = {a: getattr(self, a) for a in _SHADOW}
        before = self._op_total()
        self._gens_bumped = {}
        try:
            self._reload()  # the shadow now describes the kernel
            self._begin()
            self._pending_vals = {bid: vals[bid] for g in groups.values() for bid in g.backends if bid in vals}
            self._apply_diff(dict(self._groups), groups, True)
        except BaseException:
            self._gens_bumped = None
            # The shadow stays the desired state (the kernel differs until a later repair).
            for a, v in saved.items():
                setattr(self, a, v)
            self._begin()
            raise
        # the desired state's ranges (the kernel's, adopted by _reload, were only for the diff)
        self._slots = saved["_slots"]
        # the desired state's generations: its slots and values were written with them; but an
        # entry the repair deleted (nothing wanted it) keeps the next generation written into
        # it, as any delete's: programs may still hold its id
        self._backend_gen = saved["_backend_gen"]
        bumped, self._gens_bumped = self._gens_bumped or {}, None
        self._set_gens({i: g for i, g in bumped.items() if i not in vals})
        for fk, g in groups.items():
            self._revnat_ids[fk] = g.rev_nat
            self._revnat_used.add(g.rev_nat)
            self._next_revnat = max(self._next_revnat, g.rev_nat + 1)
        # identities as the maps now hold them (a hand-edited value must not keep its id):
        # when they hold what the shadow held (every check that repairs no backend) they are
        # the ones the writer kept, its compact table kept too (at 20k services, a dict of
        # 200k identities made and moved into the table again at every check, 20 MB a while)
        old_ids, vals = saved["_backend_ids"], self._backend_vals
        if len(old_ids) == len(vals) and saved["_backend_vals"].same(vals):
            old_ids.rebind(vals)
            self._backend_ids = old_ids
        else:
            self._backend_ids = KeyIds(vals, 19, {val[:19]: bid for bid, val in vals.items()})
        # The desired state's ids were written back too: the counter stays above them (new
        # ids are taken from it without a look-up, see RenderMixin._backend_id).
        self._next_backend = max(self._next_backend, saved["_next_backend"])
        return self._op_total() - before

    def check(self) -> int:
        """Compare the maps with the desired state and repair any difference (one made by hand
        included); returns the entries repaired. Before the initial sync the desired state is
        the adopted one: only entries nothing accounts for go."""
        with self._op():
            self._require_open()
            self.checks += 1
            n = self._repair()
            fe = getattr(self.maps["kpr_svc"], "fe", None)  # kpr_fe, when the writer keeps it (kpr.servicemaps.fetable)
            if fe is not None:
                n += fe.verify(self.maps["kpr_svc"].items())
            if self._legacy and self._initial is None:
                # the initial state has been written and a check period passed since: every
                # plugin runs programs that read kpr_slots (README: upgrading)
                n += self.sweep_legacy()
            if n:
                self.repairs += n
                log.warning("event=servicemaps_repaired entries=%d", n)
            if self._initial is None:
                # (before, claims and refusals are the initial sync's to decide, in key order)
                self._retry_unheld_claims()
                self._retry_refused()
            return n


_REV_NAT = attrgetter("rev_nat")

# What _reset_shadow sets: the writer's picture of the maps.
_SHADOW = (
    "_groups", "_by_service", "_backend_ids", "_backend_vals", "_backend_refs", "_revnat_ids", "_revnat_used",
    "_next_backend", "_free_ids", "_backend_gen", "_next_revnat", "_stray", "_count", "_slots", "_legacy",
)


def slots_in_use(svc: M.BpfMap | list[tuple[bytes, bytes]]) -> int:
    """kpr_slots entries the service entries in kpr_svc (the map, or its items already
    read) point at: per frontend, its scopes' slots rounded up to the size class of its
    range (what the writer's shadow counts)."""
    per_fk: dict[bytes, int] = {}
    for k, v in svc if isinstance(svc, list) else svc.items():
        if not (k[20] or k[21]):
            base, count, term = M.SVC_VAL.unpack_from(v)[:3]
            if base:
                per_fk[k[:19]] = per_fk.get(k[:19], 0) + count + term
    return sum(map(size_class, per_fk.values()))


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
