"""Applying: the public upsert/delete/full_sync, capacity planning, and writing a diff of
frontend groups to the maps in a safe order with batch syscalls."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from operator import attrgetter
from typing import Any

from .. import memory
from ..bpf import maps as M
from ..bpf.maglev import build_table
from ..model import Service, ServiceKey
from . import fetable
from .claims import Claims
from .groups import _ONE, _Group, _add_counts, _disown, _fk_label, _own, group_entries
from .params import Refusal, first_overflow
from .slots import SlotsFull

log = logging.getLogger("kpr.servicemaps")  # one logger for the whole writer, as before the split


class ApplyMixin:
    """ServiceMapWriter's writing side (state: see ServiceMapWriter._reset_shadow)."""

    # ------------------------------------------------------------------ public API

    @contextmanager
    def _op(self, *, read: bool = True) -> Iterator[None]:
        """One public operation under the lock. The outermost one (an apply_batch is one) first
        makes the kpr_slots ranges freed by earlier operations reusable (kpr.servicemaps.slots).
        Maps open() left unread are read first, unless `read` is false (a full sync, and a
        batch whose changes are operations of their own, read when they need to)."""
        with self._lock:
            if read and self._unread:
                self._ensure_read()
            if self._depth == 0:
                self._slots.release()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if not self._depth:
                    self._ids_added()

    def upsert(self, service: Service) -> None:
        """Make the maps hold exactly this service's desired state (touching only what changed)."""
        with self._op():
            self._require_open()
            key = service.key
            if key in self.refused and self._services.get(key) == service:
                return  # still refused; tried again when entries are freed
            self._services[key] = service
            self._begin()
            try:
                desired = self._render(service)
            except Exception:
                self._forget_render()  # the ids and rev-NAT index it took are nobody's
                raise
            # A frontend another service holds: this one's claim waits. One nobody holds (its
            # first waiter refused, or its retry failed) this one takes ahead of those waiting
            # (first come, first served only while held; their claims stay, behind it).
            waits: list[bytes] = []
            for fk in list(desired):
                owner = self._holder(fk)
                if owner is not None and owner != key:
                    log.warning("event=frontend_conflict frontend=%s service=%s owner=%s", _fk_label(fk), key, owner)
                    waits.append(fk)
                    del desired[fk]
            old_fks = set(self._by_service.get(key, ())) | {fk for fk in desired if fk in self._groups}
            old = {fk: self._groups.get(fk) for fk in old_fks}
            refusal = self._refusal(old, desired)
            if refusal is None:
                hit = self._place(desired)
                refusal = Refusal(*hit, self.limits[hit[0]], (hit[:2],)) if hit is not None else None
            if refusal is not None:
                self._refuse(key, refusal)
                self._forget_render()
                # (claims it made on frontends it still wants keep their place: it is refused
                # for room, and tried again with the refused)
                self.conflicts.set(key, waits + [fk for fk in desired if self.conflicts.waits(fk, key)])
                return
            if self.refused.pop(key, None) is not None:
                log.info("event=service_accepted service=%s", key)
            # Claims waiting on a frontend this service lets go (it moves to another ClusterIP
            # or nodePort) are retried once the change is written, as after a deletion. Only
            # while someone waits: the common update (nobody does) pays nothing for it.
            released = [fk for fk in old if fk not in desired] if self.conflicts else ()
            self._apply(old, desired)
            # (after the write: a failed one leaves the claims as they were, the retried one's too)
            self.conflicts.set(key, waits)
            if released:
                self._retry_conflicts(released)
            if self.refused:
                self._retry_refused()  # the change may have freed entries

    def delete(self, key: ServiceKey) -> None:
        """Remove everything the service wrote; a service never seen is not an error."""
        with self._op():
            self._require_open()
            self._services.pop(key, None)
            self.refused.pop(key, None)
            self._begin()
            fks = set(self._by_service.get(key, ()))
            self._apply({fk: self._groups.get(fk) for fk in fks}, {})
            self.conflicts.drop(key)
            self._retry_conflicts(fks)
            self._retry_refused()

    def full_sync(self, services: Iterable[Service], *, keyed: dict[ServiceKey, Service] | None = None) -> None:
        """Make the maps hold exactly these services: everything else is removed. `keyed`:
        the same services by their keys (the writer's initial state), taken as they are."""
        # A full sync allocates a few objects per map entry and creates no reference cycles;
        # the collector's passes over the growing heap cost ~25% of a 20k-service sync. Paused
        # through kpr.memory, not gc.disable(): another thread's pause (the files source's
        # pass) that ended meanwhile turned the collector back on in the middle of the agent's
        # initial sync (0.05-0.1 s of collections at 20k services). Nothing is frozen for the
        # sync's sake: a freeze takes the whole process's heap, the garbage cycles of whoever
        # calls (a failed attempt's, a test's) with it; the agent's settle once it is ready
        # freezes what survives (kpr.memory.settle).
        with memory.paused():
            self._full_sync(services, keyed)

    def _full_sync(self, services: Iterable[Service], keyed: dict[ServiceKey, Service] | None = None) -> None:
        with self._op(read=False):
            self._require_open()
            services = _in_key_order(list(services))
            unread = self._unread
            if not unread and not self._as_read:
                # diff against what the maps really hold (right after open(), no change since,
                # the shadow is what it read: a hand edit since is check()'s, as any other time)
                self._reload()
            for g in self._groups.values():
                g.owner = None  # ownership is decided afresh, in key order
            self._by_service = {}
            # (a dict's copy keeps its keys' hashes: ServiceKey's is a Python call)
            self._services = keyed.copy() if keyed is not None else dict(zip(map(_KEY, services), services))
            self.conflicts = Claims()
            self.refused = {}
            self._begin()
            try:
                if unread:
                    # a restart's maps, not read yet: holding exactly these services, they are
                    # taken as they are (kpr.servicemaps.adopt); else read now, as open() would
                    if self._adopt_unchanged(services):
                        self._unread = False
                        return
                    self._unread = False
                    self._reload()
                    self._begin()
                rest = self._bulk_sync(services)  # empty maps: the common services (kpr.servicemaps.bulk)
                if rest:
                    self._sync_rest(rest)
                if rest is not None or self._sync_adopted(services):
                    return
                old = dict(self._groups)
                desired = self._plan(services, old)
                self._apply(old, desired, strays=True)
            except BaseException:
                # The plan's claims and refusals were never written (the maps were rolled
                # back: nobody holds its frontends): kept, check() would serve a waiter where
                # the sync's retry puts the first in key order, traffic moved twice.
                self.conflicts = Claims()
                self.refused = {}
                raise

    def _sync_rest(self, rest: list[Service]) -> None:
        """The services the bulk path left, planned and written service by service beside the
        common ones it wrote (their frontends are none of these'). The sync is one change: a
        failed write takes the common ones out again too."""
        bulk = dict(self._groups)
        used = group_entries(bulk.values())
        used["kpr_backend"] = len(self._backend_vals)
        try:
            self._apply({}, self._plan(rest, {}, used), strays=True)
        except Exception:
            try:
                self._begin()
                self._apply(bulk, {}, strays=True)
            except Exception:  # noqa: BLE001 - the first error is the one to report; check() repairs later
                log.exception("event=servicemaps_rollback_failed")
            raise

    def _plan(
        self, services: list[Service], old: dict[bytes, _Group], used: dict[str, int] | None = None
    ) -> dict[bytes, _Group]:
        """The groups a full sync writes: services in key order, each whole or refused
        (`used`: entries taken before them, by the bulk path's groups).

        A service claims its frontends (a frontend already claimed is a conflict) if all of
        them fit beside what earlier services took; otherwise it is refused and keeps the
        groups the maps hold for frontends it claims (its last good state), if those fit.
        """
        desired: dict[bytes, _Group] = {}
        used = dict(used) if used else group_entries(())
        used_bids: set[int] = set()
        limits = self.limits
        for s in services:
            mine: dict[bytes, _Group] = {}
            try:
                rendered = self._render(s)
            except Exception:  # noqa: BLE001 - one service's bad input must not hold up the rest
                self.errors += 1
                log.exception("event=service_render_failed service=%s", s.key)
                continue
            for fk, g in rendered.items():
                if fk in desired:
                    log.warning(
                        "event=frontend_conflict frontend=%s service=%s owner=%s", _fk_label(fk), s.key, desired[fk].owner
                    )
                    self.conflicts.wait(fk, s.key)
                    continue
                mine[fk] = g
            if len(mine) == 1:
                # the common case, without _needs's dicts and sets (a full sync asks 50k times)
                (g,) = mine.values()
                bids = g.backends
                nb = len(bids) - len(used_bids.intersection(bids)) if used_bids else len(bids)
                if (
                    used["kpr_svc"] + g.n_svc <= limits["kpr_svc"]
                    and used["kpr_slots"] + g.span <= limits["kpr_slots"]
                    and used["kpr_backend"] + nb <= limits["kpr_backend"]
                    and used["kpr_revnat"] + 1 <= limits["kpr_revnat"]
                    and not g.srcrange
                    and not g.maglev
                    and g.revnat
                    and (g.base or not g.span or self._place_one(g))
                ):
                    desired.update(mine)
                    used["kpr_svc"] += g.n_svc
                    used["kpr_slots"] += g.span
                    used["kpr_backend"] += nb
                    used["kpr_revnat"] += 1
                    used_bids.update(bids)
                    continue
            need = self._needs(mine.values(), used_bids)
            hit = first_overflow(used, need, limits)
            if hit is None:
                # the counts fit; no free range (fragmented kpr_slots) or id may
                hit = self._place(mine)
            if hit is not None:
                wanted = need
                mine = {fk: old[fk] for fk in mine if fk in old}
                need = self._needs(mine.values(), used_bids)
                kept = bool(mine) and first_overflow(used, need, self.limits) is None
                growth = {name: wanted[name] - (need[name] if kept else 0) for name in wanted}
                self._refuse(s.key, Refusal(*hit, self.limits[hit[0]], tuple(growth.items())))
                if not kept:
                    continue
                for g in mine.values():
                    g.owner = s.key
            desired.update(mine)
            for name, n in need.items():
                used[name] += n
            for g in mine.values():
                used_bids.update(g.backends)
        return desired
    # ------------------------------------------------------------------ capacity

    def _place_one(self, g: _Group) -> bool:
        """_place for a full sync's common frontend (one group, a range to take): False when
        it does not fit (the general path then says why)."""
        if self._ids_over:
            return False
        try:
            base = self._slots.alloc(g.n_slots)[0]
        except SlotsFull:
            return False
        g.place(base)
        self._fresh_slots.append((g.revnat[:19], base, g.span))
        return True

    def _place(self, groups: dict[bytes, _Group]) -> tuple[str, int, int] | None:
        """Allocate a kpr_slots range for every group that needs one (rendered with new slot
        values); all or none. Returns (map, needed, free) when they do not fit: no free range
        (kpr_slots), or a backend id past the kpr_backend array (every id was taken)."""
        top = self.limits["kpr_backend"]
        if self._ids_over:
            over = {bid for g in groups.values() for bid in g.backends if bid > top}
            if over:
                return "kpr_backend", len(over), max(0, top - len(self._backend_vals))
        taken: list[tuple[bytes, _Group]] = []
        alloc = self._slots.alloc
        try:
            for fk, g in groups.items():
                if g.span and not g.base:
                    base, _span = alloc(g.n_slots)
                    g.place(base)
                    taken.append((fk, g))
        except SlotsFull as e:
            for _fk, g in taken:
                self._slots.free(g.base, g.span, hold=False)
                g.base = 0
            return "kpr_slots", e.need, e.free
        self._fresh_slots += [(fk, g.base, g.span) for fk, g in taken]
        return None

    @staticmethod
    def _needs(groups: Iterable[_Group], known_backends: set[int]) -> dict[str, int]:
        """Entries `groups` add to a state that already holds `known_backends`."""
        groups = list(groups)
        need = group_entries(groups)
        new_bids: set[int] = set()
        for g in groups:
            new_bids.update(g.backends)
        need["kpr_backend"] = len(new_bids - known_backends)
        return need

    def _counts(self) -> dict[str, int]:
        """Entries per map the shadow accounts for, strays included (cheap: no syscalls)."""
        c = dict(self._count)
        c["kpr_backend"] = len(self._backend_vals)
        c["kpr_svc"] += len(self._legacy)  # an older kpr's slot entries, until swept
        c["kpr_slots"] = self._slots.used  # ranges freed but held count until released
        for name, keys in self._stray.items():
            c[name] += len(keys)
        return c

    def _refusal(self, old: dict[bytes, _Group | None], new: dict[bytes, _Group]) -> Refusal | None:
        """Whether replacing `old` by `new` would overflow a map (the service's own delta)."""
        before = group_entries(g for g in old.values() if g is not None)
        after = group_entries(new.values())
        delta = {name: after[name] - before[name] for name in after}
        refs: dict[int, int] = {}
        for g in old.values():
            if g is not None:
                for bid in g.backends:
                    refs[bid] = refs.get(bid, 0) - 1
        for g in new.values():
            for bid in g.backends:
                refs[bid] = refs.get(bid, 0) + 1
        vals, have = self._backend_vals, self._backend_refs
        added = sum(1 for bid, d in refs.items() if d > 0 and bid not in vals)
        freed = sum(1 for bid, d in refs.items() if d < 0 and bid in vals and have.get(bid, 0) + d <= 0)
        delta["kpr_backend"] = added - freed
        hit = first_overflow(self._counts(), delta, self.limits)
        if hit is None:
            return None
        return Refusal(*hit, self.limits[hit[0]], tuple(delta.items()))

    def _forget_render(self, written: Iterable[int] = ()) -> None:
        """Forget the ids the last render allocated that were not written (`written`: ids
        known to be in the table now, not asked about again)."""
        pending = self._pending_vals
        if written:
            pending = {bid: val for bid, val in pending.items() if bid not in written}
        free = self._free_ids
        unwritten = self._backend_vals.missing(pending)
        for bid in unwritten:
            self._backend_refs.pop(bid, None)
            if free is not None and bid < self._next_backend:
                free.appendleft(bid)  # taken from the queue and never written: first again
        self._backend_ids.discard_many([(pending[bid][:19], bid) for bid in unwritten])
        for fk in self._fresh_revnat:
            if fk not in self._groups:
                self._forget_revnat(fk)
        groups = self._groups
        for fk, base, span in self._fresh_slots:
            g = groups.get(fk)
            if g is None or g.base != base:
                self._slots.free(base, span, hold=False)  # never written: no reader knows it
        self._begin()

    def _refuse(self, key: ServiceKey, refusal: Refusal) -> None:
        self.refused[key] = refusal
        self.refusals += 1
        log.error("event=service_refused service=%s map=%s reason=%r", key, refusal.map, refusal.text())

    def _retry_refused(self) -> None:
        """Try refused services again whose growth now fits (in key order)."""
        for key in sorted(self.refused):
            r = self.refused.get(key)
            svc = self._services.get(key)
            if r is None or svc is None:
                self.refused.pop(key, None)
                continue
            if first_overflow(self._counts(), dict(r.delta), self.limits) is None:
                log.info("event=service_refused_retry service=%s", key)
                del self.refused[key]
                try:
                    self.upsert(svc)
                except Exception:  # noqa: BLE001 - rolled back and logged; tried again later
                    log.exception("event=service_refused_retry_failed service=%s", key)

    # ------------------------------------------------------------------ applying a diff

    def _begin(self) -> None:
        # (every change starts here: from now on the shadow is no longer only what open() read)
        self._as_read = False
        self._ids_over = False  # an id past the kpr_backend array was handed out (see _place)
        self._pending_vals = {}
        self._fresh_revnat = []
        self._fresh_slots = []

    def _require_open(self) -> None:
        if not self.maps:
            raise RuntimeError("ServiceMapWriter is not open")

    def _apply(self, old: dict[bytes, _Group | None], new: dict[bytes, _Group], *, strays: bool = False) -> None:
        try:
            self._apply_diff(old, new, strays)
        except Exception:
            self._roll_back(len(new))
            raise

    def _roll_back(self, frontends: int) -> None:
        """After a write failed: the maps may hold part of the change, roll them back to the
        state before it (the shadow's)."""
        self.errors += 1
        log.exception("event=servicemaps_apply_failed frontends=%d", frontends)
        # what the change took (the repair starts an operation of its own, which clears them)
        taken = self._pending_vals, self._fresh_revnat, self._fresh_slots
        try:
            n = self._repair()
            self.rollbacks += 1
            log.warning("event=servicemaps_rolled_back entries=%d", n)
        except Exception:  # noqa: BLE001 - the first error is the one to report; check() repairs later
            log.exception("event=servicemaps_rollback_failed")
        # ids, rev-NAT indexes and kpr_slots ranges of the change that did not happen (its
        # ranges stayed taken in the allocator the repair keeps)
        self._pending_vals, self._fresh_revnat, self._fresh_slots = taken
        self._forget_render()

    def _apply_diff(self, old: dict[bytes, _Group | None], new: dict[bytes, _Group], strays: bool) -> None:
        # Diff group by group: a service-map key belongs to exactly one group (its prefix is
        # the frontend key), so unchanged groups cost one dict comparison.
        head_up: dict[bytes, bytes] = {}  # service entries, written after what they point at
        svc_del: list[bytes] = []  # service entries of scopes that go from frontends that stay
        gone_del: list[bytes] = []  # every entry of frontends that go
        slot_up: list[_Group] = []  # groups whose kpr_slots range is to be written
        slot_inplace: list[bytes] = []  # kpr_svc keys whose range is rewritten where it is (a repair)
        slot_free: list[tuple[int, int]] = []  # ranges nothing points at once this change is written
        rn_up: dict[int, bytes] = {}
        rn_del: list[int] = []
        sr_up: set[bytes] = set()
        sr_del: set[bytes] = set()
        mg_up: dict[bytes, Any] = {}
        mg_del: list[bytes] = []
        ref_delta: dict[int, int] = {}
        pack_mg = M.MAGLEV_KEY.pack
        svc_new = 0  # kpr_svc keys written that the map does not hold yet
        b = self.batch
        # New frontends, written from their packed entries (a full sync makes no object per entry).
        fresh: list[_Group] = []
        # Backends referenced by new frontends, counted at once below (C speed: a full sync
        # adds hundreds of thousands of references).
        added: list[tuple[int, ...] | frozenset[int]] = []
        removed: list[tuple[int, ...] | frozenset[int]] = []  # of frontends that go

        for fk, g in new.items():
            og = old.get(fk)
            if og is None:
                # the whole group is new: nothing to compare, everything to write
                svc_new += g.n_svc
                rn_up[g.rev_nat] = g.revnat
                if g.srcrange:
                    sr_up |= g.srcrange
                if g.maglev:
                    mg_up.update((pack_mg(g.rev_nat, sc), i) for sc, i in g.maglev.items() if i is not None)
                added.append(g.backends)
                if g.base:
                    slot_up.append(g)
                if b:
                    fresh.append(g)
                    continue
                head_up.update(g.svc)
            else:
                if g.base and (og.base != g.base or not og.same_slots(g)):
                    slot_up.append(g)  # a new range (or, repairing, the kernel's differs)
                    # kpr_fe lines holding its ids, where no kpr_svc write rewrites them: a
                    # range rewritten where it lies, also one a repair found overlapping
                    # another (_reload then says base 0 while the entry keeps pointing there)
                    if og.base == g.base or og.same_svc(g):
                        slot_inplace.extend(chain(og.svc, g.svc))
                if og.base and og.base != g.base:
                    slot_free.append((og.base, og.span))
                if not og.same_svc(g):
                    osvc, gsvc = og.svc, g.svc
                    # internal scope first (dicts keep order; rendering packs it first)
                    head_up.update((k, v) for k, v in gsvc.items() if osvc.get(k) != v)
                    svc_del.extend(k for k in osvc if k not in gsvc)
                    svc_new += sum(1 for k in gsvc if k not in osvc)
            if og is None or og.revnat != g.revnat or og.rev_nat != g.rev_nat:
                rn_up[g.rev_nat] = g.revnat
            if og is not None and og.rev_nat != g.rev_nat and og.revnat:
                rn_del.append(og.rev_nat)
            if og is None:
                sr_up |= g.srcrange
            elif og.srcrange != g.srcrange:
                sr_up |= g.srcrange - og.srcrange
                sr_del |= og.srcrange - g.srcrange
            if g.maglev or (og is not None and og.maglev):
                omg = {pack_mg(og.rev_nat, sc): i for sc, i in og.maglev.items()} if og is not None else {}
                nmg = {pack_mg(g.rev_nat, sc): i for sc, i in g.maglev.items()}
                mg_up.update((k, i) for k, i in nmg.items() if i is not None and omg.get(k) != i)
                mg_del.extend(k for k in omg if k not in nmg)
            if og is None:
                continue
            if og.backends != g.backends:
                gb, ob = frozenset(g.backends), frozenset(og.backends)
                for bid in gb - ob:
                    ref_delta[bid] = ref_delta.get(bid, 0) + 1
                for bid in ob - gb:
                    ref_delta[bid] = ref_delta.get(bid, 0) - 1
        for fk, og in old.items():
            if og is None or fk in new:
                continue
            # external scope first, so lookups stop before the rest goes
            head_k, _hv = og.packed_svc()
            if head_k:
                ks = len(head_k) // og.n_svc
                hs = [head_k[i : i + ks] for i in range(0, len(head_k), ks)]
                if len(hs) > 1:
                    hs.sort(key=_svc_delete_order)
                gone_del += hs
            if og.base:
                slot_free.append((og.base, og.span))
            if og.revnat:
                rn_del.append(og.rev_nat)
            if og.srcrange:
                sr_del |= og.srcrange
            if og.maglev:
                mg_del.extend(pack_mg(og.rev_nat, sc) for sc in og.maglev)
            removed.append(og.backends)

        refs = self._backend_refs
        vals = self._backend_vals
        if removed:
            for bid, n in Counter(chain.from_iterable(removed)).items():
                ref_delta[bid] = ref_delta.get(bid, 0) - n
        ref_add: Counter[int] = Counter()
        ref_add.update(chain.from_iterable(added))
        dropped = list(ref_delta)  # only these can have lost references
        if ref_delta:
            # net change per id: one table for the bookkeeping below
            for bid, d in ref_delta.items():
                ref_add[bid] += d
        ref_delta = ref_add
        be_up = {}
        pending = self._pending_vals
        changed = vals.changed(pending) if pending else ()
        if changed:
            if len(changed) == len(pending) and not dropped and ref_delta.keys() >= pending.keys():
                be_up = pending  # all new or changed, all referenced by groups this change adds
            else:
                dget, rget = ref_delta.get, refs.get
                be_up = {bid: pending[bid] for bid in changed if dget(bid, 0) > 0 or rget(bid, 0) + dget(bid, 0) > 0}
        be_del = [bid for bid in dropped if ref_delta[bid] < 0]
        if be_del:
            be_del = [bid for bid, n in zip(be_del, refs.get_many(be_del)) if n + ref_delta[bid] <= 0]
            absent = vals.missing(be_del)
            if absent:
                absent_set = set(absent)
                be_del = [bid for bid in be_del if bid not in absent_set]
        if strays and len(refs):
            be_del.extend(bid for bid in refs.zero_ids() if bid in vals and bid not in ref_delta)
        # An entry a new group still wants is never deleted (rev-NAT indexes read back from
        # hand-edited maps may collide).
        if rn_del:
            live_rn = {g.rev_nat for g in new.values() if g.revnat}
            rn_del = [i for i in rn_del if i not in live_rn]
        if mg_del:
            live_mg = {pack_mg(g.rev_nat, sc) for g in new.values() for sc in g.maglev}
            mg_del = [k for k in mg_del if k not in live_mg]
        if sr_del:
            for g in new.values():
                if g.srcrange:
                    sr_del -= g.srcrange
        if strays:
            # Nor a stray: a hand-edited slot 0 can give its frontend another rev-NAT index at
            # reload, leaving the frontend's own kpr_revnat entry looking like nobody's.
            if self._stray["kpr_revnat"]:
                self._stray["kpr_revnat"] -= {M.U32.pack(g.rev_nat) for g in new.values() if g.revnat}
            if self._stray["kpr_maglev"]:
                self._stray["kpr_maglev"] -= {pack_mg(g.rev_nat, sc) for g in new.values() for sc in g.maglev}
            if self._stray["kpr_srcrange"]:
                self._stray["kpr_srcrange"] -= {k for g in new.values() for k in g.srcrange}

        mp = self.maps
        # Where the change would not fit beside what it replaces, everything that goes is
        # deleted first (readers may miss an entry for a moment instead of the write failing).
        have = self._counts()
        peak = {
            "kpr_svc": have["kpr_svc"] - len(gone_del) + svc_new,
            "kpr_backend": have["kpr_backend"] + len(vals.missing(be_up)),
            "kpr_revnat": have["kpr_revnat"] + len(rn_up),
            "kpr_srcrange": have["kpr_srcrange"] + len(sr_up),
            "kpr_maglev": have["kpr_maglev"] + len(mg_up),
        }
        tight = any(peak[name] > self.limits[name] for name in peak)
        freed = be_del  # the shadow forgets these, whichever phase deletes them
        # 0. frontends that go: first, so a nearly full map has room for what comes
        if gone_del:
            mp["kpr_svc"].delete_many(gone_del, batch=b)
        if tight:
            log.info("event=servicemaps_tight peak=%s", ",".join(f"{k}:{v}" for k, v in peak.items()))
            self._delete_phase(svc_del, mg_del, sr_del, rn_del, strays, be_del)
            svc_del, mg_del, sr_del, rn_del, be_del = [], [], set(), [], []
        # 1. what service entries will point at: backends, their slots, rev-NAT entries, ...
        if slot_up:
            self._write_slots(slot_up)
            if slot_inplace:
                fetable.slots_rewritten(mp["kpr_svc"], slot_inplace)
        if be_up:
            # an array: stored into its memory, runs of consecutive ids (a full sync's) at once
            mp["kpr_backend"].store(be_up)
        if rn_up:
            mp["kpr_revnat"].update_many([M.U32.pack(i) for i in rn_up], list(rn_up.values()), batch=b)
        if sr_up:
            keys = sorted(sr_up)
            mp["kpr_srcrange"].update_many(keys, [_ONE] * len(keys), batch=b)
        for k, inp in mg_up.items():
            self._write_maglev(k, inp)
        # 2. service entries (internal scope before external): one hash update each, so a
        # program sees the old range or the new one, never half of either
        if fresh:
            packed = [g.packed_svc() for g in fresh]
            heads = sum(g.n_svc for g in fresh)
            if heads or head_up:
                mp["kpr_svc"].update_blob(
                    b"".join([p[0] for p in packed] + list(head_up)),
                    b"".join([p[1] for p in packed] + list(head_up.values())),
                    heads + len(head_up),
                )
        elif head_up:
            mp["kpr_svc"].update_many(list(head_up), list(head_up.values()), batch=b)
        # 3. deletions, the external scope first so lookups stop first
        self._delete_phase(svc_del, mg_del, sr_del, rn_del, strays, be_del)
        # 4. ranges nothing points at any more: reusable from the next operation on
        live = {g.base for g in slot_up}
        for base, span in slot_free:
            if base not in live:
                self._slots.free(base, span)

        # Shadow follows the maps.
        count = self._count
        for fk, g in old.items():
            if g is not None and fk not in new:
                gone = self._groups.pop(fk, None)
                if gone is not None:
                    _add_counts(count, gone, -1)
                self._forget_revnat(fk)
                if g.owner is not None and g.owner in self._by_service:
                    _disown(self._by_service, g.owner, fk, drop_empty=True)
        groups, by_service = self._groups, self._by_service
        for fk, g in new.items():
            prev = groups.get(fk)
            if prev is not None:
                if prev.owner is not None and prev.owner != g.owner:
                    _disown(by_service, prev.owner, fk, drop_empty=False)
                _add_counts(count, prev, -1)
            groups[fk] = g
            _own(by_service, g.owner, fk)
        for name, n in group_entries(new.values()).items():
            count[name] += n
        refs.add_many(ref_delta)
        self._backend_vals.update(be_up)
        if freed:
            be_del = freed
            # (identities first: the table checks its entries against the values)
            gone = [(v[:19], bid) for bid, v in zip(be_del, map(self._backend_vals.get, be_del)) if v is not None]
            self._backend_ids.discard_many(gone)
            self._backend_vals.pop_many(be_del)
            # the next backend at a freed index takes the next generation (written in _delete_phase)
            self._set_gens(bumped := dict(zip(be_del, self._next_gens(be_del))))
            if self._gens_bumped is not None:  # a _repair: it restores the desired generations after
                self._gens_bumped.update(bumped)
            if self._free_ids is not None:
                self._free_ids.extend(be_del)
            self._freed.update(dict.fromkeys(be_del))  # (at C speed: a shrink frees 500k)
            refs.pop_many(be_del)
        # ids allocated while rendering but never written (conflicting frontends) are forgotten
        self._forget_render(be_up)
        log.debug(
            "event=servicemaps_applied svc_up=%d slots_up=%d svc_del=%d backend_up=%d backend_del=%d revnat_up=%d "
            "revnat_del=%d srcrange_up=%d srcrange_del=%d maglev_up=%d maglev_del=%d",
            len(head_up), len(slot_up), len(svc_del) + len(gone_del), len(be_up), len(be_del), len(rn_up), len(rn_del),
            len(sr_up), len(sr_del), len(mg_up), len(mg_del),
        )

    def _delete_phase(
        self, svc_del: list[bytes], mg_del: list[bytes], sr_del: set[bytes], rn_del: list[int], strays: bool, be_del: list[int]
    ) -> None:
        b = self.batch
        mp = self.maps
        if svc_del:
            svc_del.sort(key=_svc_delete_order)
            mp["kpr_svc"].delete_many(svc_del, batch=b)
        if mg_del:
            mp["kpr_maglev"].delete_many(mg_del, batch=False)
        if sr_del:
            mp["kpr_srcrange"].delete_many(sorted(sr_del), batch=b)
        if rn_del:
            mp["kpr_revnat"].delete_many([M.U32.pack(i) for i in rn_del], batch=b)
        if strays:
            for name, keys in self._stray.items():
                if keys:
                    mp[name].delete_many(sorted(keys), batch=b and name != "kpr_maglev")
                    keys.clear()
        if be_del:
            # an array: a zero entry is no backend (kpr_lb_backend); it keeps the generation
            # the index's next backend takes, for a writer that adopts the maps after a restart
            ids = sorted(be_del)
            gens = self._next_gens(ids)
            zero = {gen: M.with_backend_gen(_NO_BACKEND, gen) for gen in set(gens)}
            mp["kpr_backend"].store(dict(zip(ids, map(zero.__getitem__, gens))))
            mp["kpr_backend"].ops["delete"] += len(be_del)
            mp["kpr_backend"].ops["update"] -= len(be_del)

    def _write_slots(self, groups: list[_Group]) -> None:
        """Store the groups' kpr_slots ranges straight into the mmapped array: no syscall and no
        per-entry copy in the kernel. The kpr_svc updates that follow are syscalls, so a
        program that finds an entry pointing at a range finds the range written."""
        self.maps["kpr_slots"].store_ranges([(g.base, g.slot_vals) for g in groups])

    def _write_maglev(self, key: bytes, inp: tuple[tuple[str, int], ...]) -> None:
        """Build the table and swap it in with one outer-map update (readers never see half a table)."""
        table = self._maglev_cache.get(inp)
        if table is None:
            table = build_table(((bid, name) for name, bid in inp), self.maglev_size)
            self._maglev_cache[inp] = table
            if len(self._maglev_cache) > 256:
                self._maglev_cache.popitem(last=False)
        else:
            self._maglev_cache.move_to_end(inp)
        t, k, v, n = self.specs["kpr_maglev"].inner
        with M.BpfMap.create(M.MapSpec("kpr_maglev_in", t, k, v, n)) as inner:
            inner.update_blob(self._maglev_keys, table.tobytes(), n)
            self.maps["kpr_maglev"].update(key, M.U32.pack(inner.fd))

    def _holder(self, fk: bytes) -> ServiceKey | None:
        g = self._groups.get(fk)
        return g.owner if g is not None else None

    def _retry_conflicts(self, freed: Iterable[bytes]) -> None:
        """Retry the claims waiting on frontends just freed, in the order they were made: the
        first takes a frontend, those after it find it held and keep waiting. O(the claims on
        `freed`). A retry that fails is logged and keeps its claim (the next release or check()
        tries it again): it is not the error of the change that freed the frontend."""
        tried = set(self.refused)  # (tried again by _retry_refused, once their growth fits)
        for fk, key in self.conflicts.queue(freed):
            if key in tried or not self.conflicts.waits(fk, key) or self._holder(fk) is not None:
                continue
            tried.add(key)
            svc = self._services.get(key)
            if svc is None:
                self.conflicts.drop(key)
                continue
            log.info("event=frontend_conflict_retry frontend=%s service=%s", _fk_label(fk), key)
            try:
                self.upsert(svc)
            except Exception:  # noqa: BLE001 - rolled back and logged; the claim stays
                log.exception("event=frontend_conflict_retry_failed frontend=%s service=%s", _fk_label(fk), key)

    def _retry_unheld_claims(self) -> None:
        """check()'s: claims on frontends nobody holds (a retry that failed), O(claims)."""
        unheld = [fk for fk in self.conflicts if self._holder(fk) is None]
        if unheld:
            self._retry_conflicts(unheld)


_NO_BACKEND = bytes(M.BACKEND.size)
_KEY_PARTS = attrgetter("key.namespace", "key.name")
_KEY = attrgetter("key")


def _in_key_order(services: list[Service]) -> list[Service]:
    """The services sorted by (namespace, name), a full sync's order: by one string per key,
    namespace NUL name (the same order, names hold no NUL; string comparisons instead of
    tuple ones: a shuffled 50k in 47 ms instead of 75)."""
    keys = list(map("\0".join, map(_KEY_PARTS, services)))
    return list(map(services.__getitem__, sorted(range(len(services)), key=keys.__getitem__)))


def _svc_delete_order(k: bytes) -> tuple[bool, bool]:
    slot0 = k[20] == 0 and k[21] == 0
    return (not slot0, k[19] != M.SCOPE_EXTERNAL)
