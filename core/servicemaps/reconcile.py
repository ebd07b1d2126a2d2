"""Read-back and garbage collection: adopting pinned maps (rebuilding the shadow from them),
check()/repair against the desired state, gc() of entries nobody re-delivered, and decoding
the maps for tests and status."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..bpf import maps as M
from .groups import _PORT, _SCOPE_NAMES, _Group, _backend_name, _fk_label, _own, group_entries

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

        for k, v in self.maps["kpr_backend"].items():
            bid = M.U32.unpack(k)[0]
            self._backend_vals[bid] = v
            self._backend_ids[v[:19]] = bid
            self._backend_refs[bid] = 0
            self._next_backend = max(self._next_backend, bid + 1)

        by_revnat: dict[int, _Group] = {}
        counts: dict[tuple[bytes, int], int] = {}
        slots: dict[tuple[bytes, int], dict[int, int]] = {}
        entries: dict[bytes, tuple[list[bytes], list[bytes]]] = {}
        for k, v in self.maps["kpr_svc"].items():
            fk, scope, slot = k[:19], k[19], _PORT.unpack_from(k, 20)[0]
            bid, count, _term, rev_nat, _flags, _aff = M.SVC_VAL.unpack(v)
            g = self._groups.get(fk)
            if g is None:
                g = self._groups[fk] = _Group(rev_nat, owners.get(fk))
                by_revnat[rev_nat] = g
                entries[fk] = ([], [])
            kv = entries[fk]
            kv[0].append(k)
            kv[1].append(v)
            if slot == 0:
                counts[(fk, scope)] = count
            else:
                slots.setdefault((fk, scope), {})[slot] = bid
        for fk, (keys, values) in entries.items():
            self._groups[fk].set_svc(keys, values)
        for (fk, scope), count in counts.items():
            got = slots.get((fk, scope), {})
            self._groups[fk].set_order(scope, [got[i] for i in range(1, count + 1) if i in got])
        referenced: dict[bytes, set[int]] = {}
        for (fk, _scope), s in slots.items():
            referenced.setdefault(fk, set()).update(s.values())
        for fk, ids in referenced.items():
            g = self._groups[fk]
            g.backends = tuple(sorted(i for i in ids if i in self._backend_vals))
            for bid in g.backends:
                self._backend_refs[bid] += 1

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
