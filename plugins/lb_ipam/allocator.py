"""Which LoadBalancer address each service gets: pools, requests, sharing, conflicts.

Rules (the README's lb_ipam section says the same for users):
- A service is served when it is type LoadBalancer with no loadBalancerClass or the
  configured one. It gets one address per family it lists in spec.ipFamilies (the first only
  with SingleStack); with PreferDualStack a family no pool offers is left out.
- Requested addresses (annotation lbipam.kpr.io/ips, or spec.loadBalancerIP) are pinned: they
  must lie in a pool that serves the service (namespaces, serviceSelector, the pool
  annotation; autoAssign does not matter). Of services requesting one address the oldest
  (creationTimestamp, then namespace/name) gets it, and others with the same
  lbipam.kpr.io/sharing-key share it when their ports differ (and, with
  externalTrafficPolicy Local, policy and selector are the same); the rest are refused.
- Other families come from the first pool, in configured order, that serves the service and
  auto-assigns (or the one the pool annotation names). A service with a sharing key joins an
  address its key already has there (requested, or held; the lowest when several), else the
  services with that key share one automatic address per pool and family; always under the
  same compatibility rule.
- Automatic addresses come from a history-independent table per pool family (table.py):
  with the files source, where every node decides alone, the result depends only on the
  services, not on the order they were seen. With the kubernetes source (`use_status`) the
  address a service already holds in status.loadBalancer.ingress is kept like a request of
  lower rank, so nothing moves when a new node is elected.
- Any problem leaves the service without an address and says why; nothing another service
  holds changes because of it. (With the files source the ranking still decides who holds
  what: in an exhausted pool, or in a sharing group, a service that ranks first takes its
  place whenever it arrives; the README lists when addresses move.)
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from kpr.selectors import Selector

from .config import PoolConfig
from .pools import AddressSpace
from .requests import Request, parse
from .table import SlotTable

log = logging.getLogger(__name__)

# Ranks of a pinned claim: requested by the service, held from before (status), or joined
# (a service with a sharing key on an address its key already has in that pool family).
REQUESTED, HELD, JOINED = 0, 1, 2


@dataclass(frozen=True)
class Result:
    ips: tuple[str, ...] = ()
    problem: str = ""
    # Why the service is not lb_ipam's business ("" when it is).
    ignored: str = ""


@dataclass(frozen=True)
class _Claim:
    key: str
    rank: int
    req: Request


# ("pin", pool, family, slot, rank) or ("auto", pool, family, entry id)
_Step = tuple


class LbAllocator:
    def __init__(self, pools: list[PoolConfig], lb_class: str, use_status: bool = False):
        self.pools = list(pools)
        self.lb_class = lb_class
        self.use_status = use_status
        self._by_name = {p.name: p for p in self.pools}
        # Compiled once: every service is matched against every pool on each pass.
        self._selectors: dict[str, Selector] = {p.name: p.service_selector.selector() for p in self.pools}
        self.spaces: dict[tuple[str, int], AddressSpace] = {}
        self.tables: dict[tuple[str, int], SlotTable] = {}
        for p in self.pools:
            for fam, space in p.spaces().items():
                self.spaces[(p.name, fam)] = space
                self.tables[(p.name, fam)] = SlotTable(space, f"{p.name}/{fam}")
        self.requests: dict[str, Request] = {}
        self.results: dict[str, Result] = {}
        self._plans: dict[str, list[_Step]] = {}
        self._problems: dict[str, str] = {}
        self._claims: dict[tuple[str, int, int], list[_Claim]] = {}
        self._groups: dict[tuple[str, int, str], dict[str, Request]] = {}
        # (pool, family, sharing key) -> slots requested or held with that key (-> claims),
        # and the services of that key that follow them (joined, or in the automatic group).
        self._anchors: dict[tuple[str, int, str], dict[int, int]] = {}
        self._floating: dict[tuple[str, int, str], set[str]] = {}
        self._affected: set[str] = set()
        self._redo: set[str] = set()
        # Per update: refusals within a group sharing one address, worked out once.
        self._refused: dict[tuple, dict[str, str]] = {}

    # --- public --------------------------------------------------------------------------

    def update(self, upserts: Iterable[dict], deletes: Iterable[str] = ()) -> dict[str, Result]:
        """Apply changed Service objects and deleted keys; returns the services whose result
        changed (a deleted service maps to an empty Result)."""
        for key in deletes:
            if key in self.requests:
                self._withdraw(key)
                del self.requests[key]
                self._affected.add(key)
        self._refused.clear()
        for obj in upserts:
            try:
                req = parse(obj, self.lb_class, self.use_status)
            except Exception:
                # A bug in reading one object must cost that object, not the batch.
                log.exception("lb_ipam.parse_failed object=%r", (obj.get("metadata") or {}).get("name"))
                continue
            if self.requests.get(req.key) == req:
                continue
            self._withdraw(req.key)
            self.requests[req.key] = req
            self._submit(req)
            self._affected.add(req.key)
        while self._redo:
            key = self._redo.pop()
            if key in self.requests:
                self._withdraw(key)
                self._submit(self.requests[key])
                self._affected.add(key)
        for (pool, fam), table in self.tables.items():
            for eid in table.moved:
                self._affected.update(self._members(pool, fam, eid))
            table.moved.clear()
        changed: dict[str, Result] = {}
        for key in self._affected:
            res = self._result(key) if key in self.requests else Result()
            if self.results.get(key, Result()) != res:
                changed[key] = res
            if key in self.requests:
                self.results[key] = res
            else:
                self.results.pop(key, None)
        self._affected.clear()
        return changed

    def usage(self) -> dict[str, dict[str, int]]:
        """Per pool: addresses used, free, and services waiting for one."""
        out: dict[str, dict[str, int]] = {}
        for (pool, _), t in self.tables.items():
            u = out.setdefault(pool, {"used": 0, "free": 0, "waiting": 0})
            u["used"] += t.used()
            u["free"] += t.free()
            u["waiting"] += t.waiting()
        return out

    # --- submitting and withdrawing ------------------------------------------------------

    def _serving(self, req: Request) -> tuple[list[PoolConfig], set[str], str]:
        """(pools to auto-assign from in order, pools a requested address may be in, problem)."""
        labels = req.label_map
        matching = [
            p for p in self.pools
            if (not p.namespaces or req.namespace in p.namespaces) and self._selectors[p.name].matches(labels)
        ]
        if req.pool:
            named = self._by_name.get(req.pool)
            if named is None:
                return [], set(), f"annotation lbipam.kpr.io/pool names no configured pool: {req.pool!r}"
            if named not in matching:
                return [], set(), f"pool {req.pool} does not serve this service (its namespaces or serviceSelector)"
            return [named], {named.name}, ""
        return [p for p in matching if p.auto_assign], {p.name for p in matching}, ""

    def _locate(self, ip: str) -> tuple[str, int, int] | None:
        addr = ipaddress.ip_address(ip)
        for (pool, fam), space in self.spaces.items():
            if fam == addr.version:
                slot = space.slot(int(addr))
                if slot is not None:
                    return pool, fam, slot
        return None

    def _submit(self, req: Request) -> None:
        key = req.key
        self._plans[key] = []
        self._problems[key] = ""
        if req.ignored:
            return
        if req.problem:
            self._problems[key] = req.problem
            return
        auto_pools, allowed, problem = self._serving(req)
        if problem:
            self._problems[key] = problem
            return
        plan: list[_Step] = []
        by_family: dict[int, tuple[str, int, int]] = {}
        for ip in req.explicit:
            where = self._locate(ip)
            if where is None:
                self._problems[key] = f"requested address {ip} is in no pool"
                return
            if where[0] not in allowed:
                self._problems[key] = f"requested address {ip} is in pool {where[0]}, which does not serve this service"
                return
            by_family[where[1]] = where
        fams = list(req.families)
        if not fams:
            fams = list(by_family) or [next((f for p in auto_pools for f in (4, 6) if (p.name, f) in self.tables), 4)]
        for i, fam in enumerate(fams):
            if fam in by_family:
                plan.append(("pin", *by_family[fam], REQUESTED))
                continue
            held = self._held(req, fam, allowed)
            if held is not None:
                plan.append(("pin", *held, HELD))
                continue
            pool = next((p.name for p in auto_pools if (p.name, fam) in self.tables), None)
            if pool is None:
                if req.policy == "PreferDualStack" and i > 0:
                    continue
                why = f"pool {req.pool}" if req.pool else "auto-assigning pool serving this service"
                self._problems[key] = f"no {why} has IPv{fam} addresses"
                return
            if req.sharing:
                anchors = self._anchors.get((pool, fam, req.sharing))
                if anchors:
                    plan.append(("pin", pool, fam, min(anchors), JOINED))
                    continue
            eid = f"share:{req.sharing}" if req.sharing else f"svc:{key}"
            plan.append(("auto", pool, fam, eid))
        for step in plan:
            if (step[0] == "auto" or step[4] == JOINED) and req.sharing:
                self._floating.setdefault((step[1], step[2], req.sharing), set()).add(key)
            if step[0] == "pin":
                self._pin(step[1], step[2], step[3], _Claim(key, step[4], req))
            else:
                self._enter(step[1], step[2], step[3], req)
        self._plans[key] = plan

    def _held(self, req: Request, fam: int, allowed: set[str]) -> tuple[str, int, int] | None:
        """The address of this family the service holds from before, if it may keep it."""
        for ip in req.current:
            try:
                if ipaddress.ip_address(ip).version != fam:
                    continue
            except ValueError:
                continue
            where = self._locate(ip)
            if where is None or where[0] not in allowed or self.spaces[where[:2]].buggy(where[2]):
                return None
            if any(c.key != req.key and not (req.sharing and c.req.sharing == req.sharing)
                   for c in self._claims.get(where, ())):
                return None  # someone requested it, or held it first (and shares no key)
            return where
        return None

    def _pin(self, pool: str, fam: int, slot: int, claim: _Claim) -> None:
        where = (pool, fam, slot)
        claims = self._claims.setdefault(where, [])
        if claim.rank == REQUESTED:
            # A request beats an address held from before: that holder is placed anew.
            for c in claims:
                if c.rank == HELD and c.key != claim.key:
                    self._redo.add(c.key)
        claims.append(claim)
        self._affected.update(c.key for c in claims)
        if len(claims) == 1:
            self.tables[(pool, fam)].pin(slot)
        if claim.rank != JOINED and claim.req.sharing:
            gkey = (pool, fam, claim.req.sharing)
            anchors = self._anchors.setdefault(gkey, {})
            anchors[slot] = anchors.get(slot, 0) + 1
            # Services of the key may now join it (or a lower one).
            self._redo.update(self._floating.get(gkey, set()) - {claim.key})

    def _enter(self, pool: str, fam: int, eid: str, req: Request) -> None:
        table = self.tables[(pool, fam)]
        if not req.sharing:
            table.add(eid, req.prio)
            return
        members = self._groups.setdefault((pool, fam, req.sharing), {})
        before = min((m.prio for m in members.values()), default=None)
        members[req.key] = req
        self._affected.update(members)
        prio = min(m.prio for m in members.values())
        if prio != before:
            table.remove(eid)
            table.add(eid, prio)

    def _withdraw(self, key: str) -> None:
        self._problems.pop(key, None)
        for step in self._plans.pop(key, []):
            if step[0] == "pin":
                where = step[1:4]
                mine = next((c for c in self._claims.get(where, []) if c.key == key), None)
                if mine is not None and mine.req.sharing:
                    gkey = (where[0], where[1], mine.req.sharing)
                    if mine.rank == JOINED:
                        self._unfloat(gkey, key)
                    else:
                        anchors = self._anchors[gkey]
                        anchors[where[2]] -= 1
                        if not anchors[where[2]]:
                            del anchors[where[2]]
                            if not anchors:
                                del self._anchors[gkey]
                            self._redo.update(self._floating.get(gkey, set()) - {key})
                claims = [c for c in self._claims.get(where, []) if c.key != key]
                self._affected.update(c.key for c in claims)
                if claims:
                    self._claims[where] = claims
                else:
                    self._claims.pop(where, None)
                    self.tables[where[:2]].unpin(where[2])
                continue
            _, pool, fam, eid = step
            table = self.tables[(pool, fam)]
            if not eid.startswith("share:"):
                table.remove(eid)
                continue
            gkey = (pool, fam, eid[len("share:"):])
            self._unfloat(gkey, key)
            members = self._groups[gkey]
            before = min(m.prio for m in members.values())
            del members[key]
            self._affected.update(members)
            if not members:
                del self._groups[gkey]
                table.remove(eid)
            elif min(m.prio for m in members.values()) != before:
                table.remove(eid)
                table.add(eid, min(m.prio for m in members.values()))

    def _unfloat(self, gkey: tuple[str, int, str], key: str) -> None:
        floating = self._floating.get(gkey)
        if floating is not None:
            floating.discard(key)
            if not floating:
                del self._floating[gkey]

    # --- results -------------------------------------------------------------------------

    def _members(self, pool: str, fam: int, eid: str) -> Iterable[str]:
        if eid.startswith("share:"):
            return list(self._groups.get((pool, fam, eid[len("share:"):]), {}))
        return [eid[len("svc:"):]]

    @staticmethod
    def _refusals(candidates: list[tuple[tuple, Request]]) -> dict[str, str]:
        """Key -> why it may not share the address with the candidates before it (in rank
        order), for those that may not; one pass over the group."""
        winners: list[Request] = []
        out: dict[str, str] = {}
        for _, r in sorted(candidates, key=lambda c: c[0]):
            why = next((w for w in (r.shares_with(w) for w in winners) if w), "")
            if why:
                out[r.key] = why
            else:
                winners.append(r)
        return out

    def _result(self, key: str) -> Result:
        req = self.requests[key]
        if req.ignored:
            return Result(ignored=req.ignored)
        if self._problems.get(key):
            return Result(problem=self._problems[key])
        ips: list[str] = []
        for step in self._plans.get(key, []):
            if step[0] == "pin":
                _, pool, fam, slot, _rank = step
                ip = str(ipaddress.ip_address(self.spaces[(pool, fam)].address(slot)))
                where = (pool, fam, slot)
                if where not in self._refused:
                    self._refused[where] = self._refusals([((c.rank, c.req.prio), c.req) for c in self._claims[where]])
                why = self._refused[where].get(key)
                if why:
                    return Result(problem=f"requested address {ip} is taken: {why}")
                ips.append(ip)
                continue
            _, pool, fam, eid = step
            table = self.tables[(pool, fam)]
            slot = table.slot_of(eid)
            if slot is None:
                return Result(problem=f"pool {pool} has no free IPv{fam} address ({table.waiting()} services waiting)")
            ip = str(ipaddress.ip_address(self.spaces[(pool, fam)].address(slot)))
            if eid.startswith("share:"):
                gkey = (pool, fam, eid[len("share:"):])
                if gkey not in self._refused:
                    self._refused[gkey] = self._refusals([(m.prio, m) for m in self._groups[gkey].values()])
                why = self._refused[gkey].get(key)
                if why:
                    return Result(problem=f"cannot share {ip}: {why}")
            ips.append(ip)
        return Result(ips=tuple(ips))
