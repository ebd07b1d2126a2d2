"""What the NodePort maps need to know of each service, and the node-wide bookkeeping built
from it: pure logic (no maps, no root), kept by the NodePort facility.

Every node-wide set (frontend ports, announced addresses, per-frontend modes, the frontends a
flow may be judged against) is reference-counted by service, so one service's change yields
only its own differences (`Change`): its cost does not grow with the number of services known.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from kpr.bpf import maps as M
from kpr.model import BackendState, FrontendType, Protocol, Service, ServiceKey

from . import datapath as D
from .gc import BackendSet

# Per-service override of the NodePort plugins' mode: snat, dsr or hybrid.
MODE_ANNOTATION = "service.kpr.io/lb-mode"
# The writer's per-service algorithm annotation (kpr.servicemaps.ALGORITHM_ANNOTATION); read
# here only to tell annotated services apart when checking the writer's default.
ALGORITHM_ANNOTATION = "service.kpr.io/lb-algorithm"

EXTERNAL_TYPES = (FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP, FrontendType.HOST_PORT)
ANNOUNCED_TYPES = (FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP)

FeKey = tuple[bytes, int, int]  # (address16, port in network order, protocol number)
PortKey = tuple[int, int]  # (port in host order, protocol number)
ModeKey = tuple[str, int, int]  # (address, port in host order, protocol number)


@dataclass(frozen=True)
class SvcState:
    # External frontends -> every backend their flows may use (terminating ones keep flows).
    frontends: dict[FeKey, BackendSet]
    # NodePort (port, protocol) -> backends: flows to any node address match by port.
    nodeports: dict[tuple[int, int], BackendSet]
    # Announced addresses (LoadBalancer, ExternalIP).
    vips: frozenset[str]
    # Frontends whose service names its mode: (address, port, protocol number) -> mode. Every
    # hook's build falls back to its own default for the others (XDP: always snat).
    modes: dict[ModeKey, str]
    # healthCheckNodePort (0: none) and the local ready endpoints it reports.
    hc_port: int
    local_endpoints: int
    # Whether the service names its algorithm (the writer's default does not apply to it).
    algorithm_annotated: bool

    @property
    def ports(self) -> frozenset[PortKey]:
        return frozenset((M.htons(port_n), proto) for _a, port_n, proto in self.frontends)


def service_state(service: Service) -> tuple[SvcState, str]:
    """The service's state and, when its mode annotation is invalid, why."""
    ann = service.annotation_map
    mode_ann = ann.get(MODE_ANNOTATION, "")
    problem = ""
    mode = ""
    if mode_ann:
        if mode_ann in D.MODES:
            mode = mode_ann
        else:
            problem = f"{service.key}: {MODE_ANNOTATION}={mode_ann!r} is not one of snat, dsr, hybrid; using the plugin's mode"
    frontends: dict[FeKey, set[tuple[bytes, int]]] = {}
    nodeports: dict[tuple[int, int], set[tuple[bytes, int]]] = {}
    vips: set[str] = set()
    modes: dict[ModeKey, str] = {}
    hc_port = 0
    local: set[tuple[str, int]] = set()
    for fe in service.frontends:
        if fe.type not in EXTERNAL_TYPES or fe.protocol not in (Protocol.TCP, Protocol.UDP):
            continue
        proto = fe.protocol.number
        port_n = M.htons(fe.port)
        bes = {(M.addr_to_bytes(b.address), M.htons(b.port)) for b in fe.backends}
        frontends.setdefault((M.addr_to_bytes(fe.address), port_n, proto), set()).update(bes)
        if fe.type is FrontendType.NODE_PORT:
            nodeports.setdefault((port_n, proto), set()).update(bes)
        if fe.type in ANNOUNCED_TYPES:
            vips.add(fe.address)
        if mode:
            modes[(fe.address, fe.port, proto)] = mode
            if fe.type is FrontendType.NODE_PORT:
                modes[("0.0.0.0" if fe.family == 4 else "::", fe.port, proto)] = mode
        if fe.health_check_node_port:
            hc_port = fe.health_check_node_port
            local.update((b.address, b.port) for b in fe.backends if b.local and b.state is BackendState.ACTIVE)
    state = SvcState(
        frontends={k: frozenset(v) for k, v in frontends.items()},
        nodeports={k: frozenset(v) for k, v in nodeports.items()},
        vips=frozenset(vips),
        modes=modes,
        hc_port=hc_port,
        local_endpoints=len({a for a, _p in local}),
        algorithm_annotated=ALGORITHM_ANNOTATION in ann,
    )
    return state, problem


@dataclass
class Change:
    """What one service's change does to the node-wide sets (first reference in, last out)."""

    ports_added: set[PortKey] = field(default_factory=set)
    ports_removed: set[PortKey] = field(default_factory=set)
    vips_added: set[str] = field(default_factory=set)
    vips_removed: set[str] = field(default_factory=set)
    modes_set: dict[ModeKey, str] = field(default_factory=dict)
    modes_removed: set[ModeKey] = field(default_factory=set)
    # Frontend -> backends it no longer offers (their flows are cleared).
    backends_removed: dict[FeKey, BackendSet] = field(default_factory=dict)


class ServiceBook:
    """Every service's SvcState and the node-wide sets counted from them."""

    def __init__(self) -> None:
        self.services: dict[ServiceKey, SvcState] = {}
        self._fe_index: dict[FeKey, dict[ServiceKey, BackendSet]] = {}
        self._np_index: dict[tuple[int, int], dict[ServiceKey, BackendSet]] = {}
        self._ports: Counter[PortKey] = Counter()
        self._vips: Counter[str] = Counter()
        # frontend -> the services naming its mode (the latest claim wins)
        self._modes: dict[ModeKey, dict[ServiceKey, str]] = {}
        # The two frontend indexes are read by the collector's thread (allowed) while the
        # facility's thread updates them: an update removes a service's entries before it adds
        # its new ones, and a frontend read in between had no owner left (its backends read as
        # none: every flow of it judged stale and cleared) or fell back to a NodePort on its port.
        self._index_lock = threading.Lock()

    def ports(self) -> set[PortKey]:
        return set(self._ports)

    def vips(self) -> set[str]:
        return set(self._vips)

    def modes(self) -> dict[ModeKey, str]:
        return {k: next(reversed(owners.values())) for k, owners in self._modes.items()}

    def put(self, key: ServiceKey, new: SvcState | None) -> Change | None:
        """Record `key`'s new state (None: deleted); None when nothing changed."""
        old = self.services.get(key)
        if old == new:
            return None
        if new is None:
            del self.services[key]
        else:
            self.services[key] = new
        ch = Change()
        self._index(key, old, new)
        old_ports, new_ports = old.ports if old else frozenset(), new.ports if new else frozenset()
        _count(self._ports, old_ports - new_ports, new_ports - old_ports, ch.ports_removed, ch.ports_added)
        old_vips, new_vips = old.vips if old else frozenset(), new.vips if new else frozenset()
        _count(self._vips, old_vips - new_vips, new_vips - old_vips, ch.vips_removed, ch.vips_added)
        old_modes, new_modes = old.modes if old else {}, new.modes if new else {}
        for mk in set(old_modes) | set(new_modes):
            if old_modes.get(mk) == new_modes.get(mk):
                continue
            before = next(reversed(self._modes[mk].values())) if mk in self._modes else None
            owners = self._modes.setdefault(mk, {})
            owners.pop(key, None)
            if mk in new_modes:
                owners[key] = new_modes[mk]
            if not owners:
                del self._modes[mk]
                ch.modes_removed.add(mk)
            elif next(reversed(owners.values())) != before:
                ch.modes_set[mk] = next(reversed(owners.values()))
        if old is not None:
            new_fes = new.frontends if new else {}
            removed = {k: bes - new_fes.get(k, frozenset()) for k, bes in old.frontends.items()}
            ch.backends_removed = {k: v for k, v in removed.items() if v}
        return ch

    def _index(self, key: ServiceKey, old: SvcState | None, new: SvcState | None) -> None:
        with self._index_lock:
            self._index_locked(key, old, new)

    def _index_locked(self, key: ServiceKey, old: SvcState | None, new: SvcState | None) -> None:
        for index, attr in ((self._fe_index, "frontends"), (self._np_index, "nodeports")):
            for k in getattr(old, attr) if old else {}:
                owners = index.get(k)
                if owners is not None:
                    owners.pop(key, None)
                    if not owners:
                        del index[k]
            for k, bes in (getattr(new, attr) if new else {}).items():
                index.setdefault(k, {})[key] = bes

    def allowed(self, daddr: bytes, dport: int, proto: int) -> BackendSet | None:
        """Backends flows to this frontend may use now (None: not a frontend known here). Called
        from the collector's thread: reads the indexes as one update left them, never halfway."""
        with self._index_lock:
            owners = self._fe_index.get((daddr, dport, proto))
            if owners is None:
                owners = self._np_index.get((dport, proto))  # a NodePort dialled at any node address
            if owners is None:
                return None
            return frozenset().union(*owners.values())


def _count(counter: Counter, gone: frozenset, came: frozenset, removed: set, added: set) -> None:
    for k in came:
        counter[k] += 1
        if counter[k] == 1:
            added.add(k)
    for k in gone:
        counter[k] -= 1
        if counter[k] <= 0:
            del counter[k]
            removed.add(k)
