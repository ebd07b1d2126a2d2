"""Which routes this node should announce, to which peer, with which attributes: pure logic.

A service contributes a host route (/32 or /128) for each address of a selected frontend
type, as MetalLB's BGP mode does:

- externalTrafficPolicy Local (and internalTrafficPolicy Local for an announced ClusterIP):
  only while this node has a ready (active) endpoint of the service, so routers send traffic
  only to nodes that can serve it without another hop;
- otherwise: while the service has a ready endpoint anywhere, since a router's traffic to a
  service without endpoints would only be dropped.

Routes are keyed by (peer address, prefix). Several advertisements (or services sharing an
address) selecting the same route merge: communities are unioned, the highest local
preference and the lowest MED win.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kpr.model import BackendState, Frontend, FrontendType, Service, ServiceKey
from kpr.selectors import EVERYTHING, Selector

NEXT_HOP_SELF = "self"

# (peer address, prefix)
RouteKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One entry of `advertisements`, as the route computation needs it."""

    types: frozenset[FrontendType] = frozenset({FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP})
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    local_preference: int | None = None
    med: int | None = None
    selector: Selector = EVERYTHING
    namespaces: frozenset[str] = frozenset()
    # Peer addresses; empty: every peer.
    peers: frozenset[str] = frozenset()

    def selects(self, service: Service) -> bool:
        if self.namespaces and service.key.namespace not in self.namespaces:
            return False
        return self.selector.matches(service.label_map)


@dataclass(frozen=True, slots=True)
class Peer:
    address: str
    # Address families (4, 6) the session carries.
    families: tuple[int, ...] = ()

    @property
    def session_family(self) -> int:
        return ipaddress.ip_address(self.address).version

    @property
    def carries(self) -> tuple[int, ...]:
        return self.families or (self.session_family,)


@dataclass(frozen=True, slots=True)
class Attrs:
    next_hop: str = NEXT_HOP_SELF
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    local_preference: int | None = None
    med: int | None = None


def prefix_of(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


def family_of_prefix(prefix: str) -> int:
    return ipaddress.ip_network(prefix).version


def frontend_wanted(fe: Frontend) -> bool:
    """Whether this node should attract traffic for the frontend's address."""
    local_only = fe.external_scope_local or fe.internal_scope_local
    return any(b.state is BackendState.ACTIVE and (b.local or not local_only) for b in fe.backends)


def announced_addresses(service: Service, adv: Advertisement) -> set[str]:
    """Addresses of `service` that `adv` announces from this node (normalised text form)."""
    if service.source_kind != "Service" or not adv.selects(service):
        return set()
    out: set[str] = set()
    for fe in service.frontends:
        if fe.type in adv.types and frontend_wanted(fe):
            out.add(str(ipaddress.ip_address(fe.address)))
    return out


def merge(attrs: Iterable[Attrs]) -> Attrs:
    items = list(attrs)
    if len(items) == 1:
        return items[0]
    prefs = [a.local_preference for a in items if a.local_preference is not None]
    meds = [a.med for a in items if a.med is not None]
    return Attrs(
        next_hop=items[0].next_hop,
        communities=tuple(sorted({c for a in items for c in a.communities}, key=_community_order)),
        large_communities=tuple(sorted({c for a in items for c in a.large_communities}, key=_community_order)),
        local_preference=max(prefs) if prefs else None,
        med=min(meds) if meds else None,
    )


def _community_order(text: str) -> tuple:
    # Numeric communities in numeric order, names after them.
    parts = text.split(":")
    if all(p.isdigit() for p in parts):
        return (0, tuple(int(p) for p in parts), "")
    return (1, (), text)


def next_hop(prefix: str, peer: Peer, node_addresses: Iterable[str]) -> str | None:
    """`self` (the session's local address) for a route of the session's family; otherwise
    the node's first address of the route's family, or None when it has none."""
    family = family_of_prefix(prefix)
    if family == peer.session_family:
        return NEXT_HOP_SELF
    for a in node_addresses:
        if ipaddress.ip_address(a).version == family:
            return a
    return None


def service_routes(
    service: Service,
    advertisements: Iterable[Advertisement],
    peers: Iterable[Peer],
    node_addresses: Iterable[str] = (),
) -> tuple[dict[RouteKey, Attrs], list[str]]:
    """The routes one service asks for, and problems (routes that cannot be announced)."""
    peers = list(peers)
    node_addresses = tuple(node_addresses)
    wanted: dict[RouteKey, list[Attrs]] = {}
    problems: list[str] = []
    for adv in advertisements:
        addresses = announced_addresses(service, adv)
        if not addresses:
            continue
        for peer in peers:
            if adv.peers and peer.address not in adv.peers:
                continue
            for address in sorted(addresses):
                prefix = prefix_of(address)
                if family_of_prefix(prefix) not in peer.carries:
                    continue
                hop = next_hop(prefix, peer, node_addresses)
                if hop is None:
                    problems.append(
                        f"{prefix} to peer {peer.address}: no IPv{family_of_prefix(prefix)} node address for the next hop"
                    )
                    continue
                attrs = Attrs(
                    next_hop=hop,
                    communities=tuple(adv.communities),
                    large_communities=tuple(adv.large_communities),
                    local_preference=adv.local_preference,
                    med=adv.med,
                )
                wanted.setdefault((peer.address, prefix), []).append(attrs)
    return {k: merge(v) for k, v in wanted.items()}, problems


class RouteTable:
    """Desired routes of every service, merged per (peer, prefix), updated one service at a time."""

    def __init__(self) -> None:
        self._by_service: dict[ServiceKey, dict[RouteKey, Attrs]] = {}
        self._contrib: dict[RouteKey, dict[ServiceKey, Attrs]] = {}
        self.routes: dict[RouteKey, Attrs] = {}

    def set(self, key: ServiceKey, routes: Mapping[RouteKey, Attrs]) -> set[RouteKey]:
        """Replace one service's routes; returns the route keys whose merged state changed."""
        old = self._by_service.get(key, {})
        if old == routes:
            return set()
        touched = set(old) | set(routes)
        for rk in old:
            self._contrib[rk].pop(key, None)
        for rk, attrs in routes.items():
            self._contrib.setdefault(rk, {})[key] = attrs
        if routes:
            self._by_service[key] = dict(routes)
        else:
            self._by_service.pop(key, None)
        return self._remerge(touched)

    def remove(self, key: ServiceKey) -> set[RouteKey]:
        return self.set(key, {})

    def services(self) -> list[ServiceKey]:
        return list(self._by_service)

    def owners(self, rk: RouteKey) -> list[ServiceKey]:
        return sorted(self._contrib.get(rk, {}))

    def _remerge(self, touched: set[RouteKey]) -> set[RouteKey]:
        changed: set[RouteKey] = set()
        for rk in touched:
            contrib = self._contrib.get(rk)
            before = self.routes.get(rk)
            if not contrib:
                self._contrib.pop(rk, None)
                self.routes.pop(rk, None)
                after = None
            else:
                after = merge(contrib[k] for k in sorted(contrib))
                self.routes[rk] = after
            if after != before:
                changed.add(rk)
        return changed
