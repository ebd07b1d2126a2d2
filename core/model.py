"""The service model: what every plugin receives, independent of where services come from.

A `Service` is the whole desired state of one Kubernetes Service (or one Pod's HostPorts):
its frontends, each with the backends that may serve it. Objects are frozen so the bus can
compare old and new states and hand the same object to every plugin without copies.
"""

from __future__ import annotations

import ipaddress
import marshal
import socket
import struct
import sys
import threading
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, Iterable, NamedTuple, TypeVar

_T = TypeVar("_T")


def _quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass made with init=False the __init__ dataclass would
    make, setting each slot through its descriptor directly: the generated one goes through
    object.__setattr__ per field (a frozen class must), which made Backend() cost 1.9 us
    instead of 1.0 us, for each of the 200k backends of a 20k-service sync. Same signature,
    defaults and frozenness (assignment after construction still raises)."""
    params, body, env = [], [], {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.default_factory is not MISSING:  # type: ignore[misc]
            raise TypeError(f"{cls.__name__}.{f.name}: _quick_init takes no default_factory")
        if f.default is MISSING:
            params.append(f.name)
        else:
            env[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        env[f"_s_{f.name}"] = cls.__dict__[f.name].__set__
        body.append(f"    _s_{f.name}(self, {f.name})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body) + "\n"
    namespace: dict[str, Any] = {}
    exec(source, env, namespace)  # noqa: S102 - built from the class's own field names
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = {**{f.name: f.type for f in fields(cls)}, "return": None}  # type: ignore[arg-type]
    cls.__init__ = init  # type: ignore[misc]
    return cls


class InvalidObject(ValueError):
    """A Kubernetes object that cannot be turned into the model; the message names the reason."""


class FrontendType(str, Enum):
    """How a frontend is reached; the values are the names `kpr service list` prints."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_IP = "ExternalIP"
    HOST_PORT = "HostPort"

    @property
    def external(self) -> bool:
        """True for frontends reached from outside the cluster (externalTrafficPolicy applies)."""
        return self is not FrontendType.CLUSTER_IP


class Protocol(str, Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]


class BackendState(str, Enum):
    # Ready endpoints; new connections may pick them.
    ACTIVE = "active"
    # Serving but terminating (KEP-1669): existing flows keep them; new connections pick
    # them only when no active backend remains in the caller's scope.
    TERMINATING = "terminating"


class ServiceKey(NamedTuple):
    """A service's (namespace, name). A tuple, so hashing, equality and ordering run in C:
    as a frozen dataclass each __hash__ and __eq__ was a Python call (0.085 and 0.09 us
    against 0.025 and 0.018 on a quiet machine, three times that under load), 254k and 80k
    of them from the store to the writer's initial sync at 20k services (the store's, the
    bus's and the writer's dicts and sets), more in plugins keyed by it. Built in 0.15 us
    against the dataclass's 0.14 (namedtuple's __new__; 40k keys on that way).
    Ordered by (namespace, name) as before. Being a tuple it also equals the plain tuple
    (namespace, name); no container holds both (ObjectRefs are 3-tuples, the bus's own keys
    1-tuples). marshal refuses it, as it did the dataclass: kpr.memory.pack keeps it as is."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> "ServiceKey":
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name:
            raise ValueError(f"service key must be namespace/name, got {text!r}")
        return cls(namespace, name)


# Backend's packed form (see there): a flags byte, then in the compact form the port and
# the place id (u16 each, network order) and the address (4 or 16 bytes); in the general
# form the fields as marshal writes them.
_TERMINATING = 1
_LOCAL = 2
_V6 = 4
_GENERAL = 8
_HEAD = struct.Struct("!BHH")
_HEAD4 = struct.Struct("!BHHI")
_STATE_OF_BIT = (BackendState.ACTIVE, BackendState.TERMINATING)
_ntoa = socket.inet_ntoa
_AF_INET6 = socket.AF_INET6

# (node name, zone) pairs backends name, kept once each: a backend holds the pair's index.
# Node names come and go with the cluster's nodes, so the table is bounded; past it a
# backend keeps its own names (the general form).
PLACES_MAX = 1 << 16
# Nor are names longer than Kubernetes allows indexed (a node name is a DNS subdomain, a
# zone a label value): a manifest's are unchecked, and an entry is never given back.
NODE_NAME_MAX, ZONE_MAX = 253, 63
places: list[tuple[str, str]] = [("", "")]
place_ids: dict[tuple[str, str], int] = {("", ""): 0}  # read-only outside place_id
_places_lock = threading.Lock()
# Port numbers backends have handed out, each one int object (see Backend.port).
_port_ints: dict[int, int] = {}


def place_id(node_name: object, zone: object) -> int | None:
    """The index of (node_name, zone) in the table, added when new; None when either is not
    a string or longer than Kubernetes allows, or the table is full."""
    if type(node_name) is not str or type(zone) is not str:
        return None
    pair = (node_name, zone)
    found = place_ids.get(pair)
    if found is not None:
        return found
    if len(node_name) > NODE_NAME_MAX or len(zone) > ZONE_MAX:
        return None
    with _places_lock:
        found = place_ids.get(pair)
        if found is None:
            if len(places) >= PLACES_MAX:
                return None
            found = len(places)
            pair = (sys.intern(node_name), sys.intern(zone))
            places.append(pair)
            place_ids[pair] = found
    return found


def _raw_address(address: object) -> tuple[int, bytes] | None:
    """(the v6 flag, the address's bytes) when the text is what those bytes print as (the
    canonical form: anything else would not read back the same); None otherwise."""
    if type(address) is not str:
        return None
    try:
        raw = socket.inet_pton(socket.AF_INET, address)
        if _ntoa(raw) == address:
            return 0, raw
    except (OSError, ValueError):  # ValueError: a NUL in the text
        try:
            raw = socket.inet_pton(_AF_INET6, address)
        except (OSError, ValueError):
            return None
        if socket.inet_ntop(_AF_INET6, raw) == address:
            return _V6, raw
    return None


class Backend(bytes):
    """One endpoint a frontend may send to: address, port, state, the node it runs on,
    whether that is this node, its zone. Immutable, equal and hashed by value.

    A frontend's backends are most of the model's objects (200k at 20k services of ten
    endpoints), so each is one bytes object of about 10 bytes instead of a slotted dataclass
    and an address string (144 bytes with the string): the flags (state, local, family), the
    port, the index of its (node name, zone) pair in a table kept once, the address's 4 or
    16 bytes. The attributes are worked out when read (`address` prints the address again:
    0.2 us). What that form cannot hold (an address not in canonical text, a port that is
    not an int of 0..65535, names that are not strings or longer than Kubernetes allows, a
    full table of places) is kept as marshal writes it (the general form): any value a
    dataclass took is read back as given, as before, except that equal values of other
    types (a port of True or 80.0) no longer compare equal to an int's. Being bytes, a
    Backend also equals a bytes object of the same content; no code compares the two."""

    __slots__ = ()
    __match_args__ = ("address", "port", "state", "node_name", "local", "zone")

    def __new__(
        cls,
        address: str,
        port: int,
        state: BackendState = BackendState.ACTIVE,
        node_name: str = "",
        local: bool = False,
        zone: str = "",
    ) -> "Backend":
        if state is not BackendState.ACTIVE and state is not BackendState.TERMINATING:
            state = BackendState(state)  # a member by its value; anything else is refused
        flags = (_TERMINATING if state is BackendState.TERMINATING else 0) | (_LOCAL if local else 0)
        raw = _raw_address(address)
        if raw is not None and type(port) is int and 0 <= port <= 0xFFFF:
            place = place_id(node_name, zone)
            if place is not None:
                return bytes.__new__(cls, _HEAD.pack(flags | raw[0], port, place) + raw[1])
        # marshal's version 2: later ones write an interned string with another type code and
        # a string met twice as a reference, so equal fields would give unequal bytes.
        general = marshal.dumps((address, port, node_name, zone), 2)
        return bytes.__new__(cls, bytes((flags | _GENERAL,)) + general)

    def _general(self) -> tuple:
        return marshal.loads(self[1:])  # type: ignore[no-any-return]

    @property
    def address(self) -> str:
        flags = self[0]
        if flags & _GENERAL:
            return self._general()[0]  # type: ignore[no-any-return]
        if flags & _V6:
            return socket.inet_ntop(_AF_INET6, self[5:])
        return _ntoa(self[5:])

    @property
    def port(self) -> int:
        if self[0] & _GENERAL:
            return self._general()[1]  # type: ignore[no-any-return]
        # One int object per port number: a reader keeping every backend's port (the
        # writer's full sync lists 200k) holds a few ints, not one each (32 bytes, freed
        # later in holes between what it keeps).
        port = self[1] << 8 | self[2]
        return _port_ints.setdefault(port, port)

    @property
    def state(self) -> BackendState:
        return _STATE_OF_BIT[self[0] & _TERMINATING]

    @property
    def local(self) -> bool:
        """True when node_name is this node: the scope for traffic policy Local."""
        return self[0] & _LOCAL != 0

    @property
    def node_name(self) -> str:
        """The node the endpoint runs on; "" when unknown."""
        if self[0] & _GENERAL:
            return self._general()[2]  # type: ignore[no-any-return]
        return places[self[3] << 8 | self[4]][0]

    @property
    def zone(self) -> str:
        if self[0] & _GENERAL:
            return self._general()[3]  # type: ignore[no-any-return]
        return places[self[3] << 8 | self[4]][1]

    @property
    def family(self) -> int:
        flags = self[0]
        if flags & _GENERAL:
            return ipaddress.ip_address(self.address).version
        return 6 if flags & _V6 else 4

    def __repr__(self) -> str:
        return (
            f"Backend(address={self.address!r}, port={self.port!r}, state={self.state!r}, "
            f"node_name={self.node_name!r}, local={self.local!r}, zone={self.zone!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> tuple:
        return (Backend, (self.address, self.port, self.state, self.node_name, self.local, self.zone))

    def __copy__(self) -> "Backend":
        return self

    def __deepcopy__(self, memo: object) -> "Backend":
        return self


# The compact IPv4 form's flag bits, for backends_v4's callers.
BACKEND_TERMINATING = _TERMINATING
BACKEND_LOCAL = _LOCAL


def backends_v4(port: int, endpoints: Iterable[tuple[int, int, int]]) -> tuple[Backend, ...]:
    """The Backends of one port, in the compact form backend_v4 makes, from each endpoint's
    (flags, place, address): flags BACKEND_TERMINATING and/or BACKEND_LOCAL, `place` an index
    into `places`, `address` the IPv4 address as an int. For callers that have these checked
    (translation: a port of 0..65535, places from place_id): nothing is checked here, as a
    call of backend_v4 per backend cost about a third of making a slice's backends."""
    pack, new = _HEAD4.pack, bytes.__new__
    return tuple([new(Backend, pack(flags, port, place, address)) for flags, place, address in endpoints])


def backend_v4(address: int, port: int, state: BackendState, node_name: str, local: bool, zone: str) -> Backend:
    """Backend(the IPv4 address `address` as text, ...), from the address as an int, for
    callers that have it parsed and checked (translation: a port of 1..65535, a state, a
    node name and zone that are strings): no text made and parsed again."""
    place = place_id(node_name, zone)
    flags = (_TERMINATING if state is BackendState.TERMINATING else 0) | (_LOCAL if local else 0)
    if place is None:
        return Backend(_ntoa(address.to_bytes(4, "big")), port, state, node_name, local, zone)
    return bytes.__new__(Backend, _HEAD4.pack(flags, port, place, address))


@_quick_init
@dataclass(frozen=True, slots=True, init=False)
class Frontend:
    type: FrontendType
    address: str
    port: int
    protocol: Protocol
    backends: tuple[Backend, ...] = ()
    # The Service port's name, used to match EndpointSlice ports.
    port_name: str = ""
    # externalTrafficPolicy=Local (external frontends only): external clients reach
    # only node-local backends, keeping their source address.
    external_local: bool = False
    # internalTrafficPolicy=Local (ClusterIP only): in-cluster clients reach only
    # node-local backends.
    internal_local: bool = False
    # sessionAffinity ClientIP timeout in seconds; 0 means no affinity.
    affinity_timeout: int = 0
    # loadBalancerSourceRanges as normalised CIDRs; empty allows everyone.
    source_ranges: tuple[str, ...] = ()
    # healthCheckNodePort of an externalTrafficPolicy=Local LoadBalancer service; 0 when none.
    health_check_node_port: int = 0

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version

    def selectable(self, local_only: bool) -> tuple[Backend, ...]:
        """Backends a new connection may pick in one scope (KEP-1669 fallback).

        Active backends in scope; when none, the terminating ones in scope, so rolling
        updates of externalTrafficPolicy=Local services do not drop traffic.
        """
        scoped = [b for b in self.backends if b.local or not local_only]
        active = tuple(b for b in scoped if b.state is BackendState.ACTIVE)
        if active:
            return active
        return tuple(b for b in scoped if b.state is BackendState.TERMINATING)

    @property
    def external_scope_local(self) -> bool:
        """Whether traffic from outside the node is limited to node-local backends."""
        return self.external_local if self.type.external else False

    @property
    def internal_scope_local(self) -> bool:
        """Whether traffic from inside the cluster is limited to node-local backends."""
        return self.internal_local if self.type is FrontendType.CLUSTER_IP else False


@_quick_init
@dataclass(frozen=True, slots=True, init=False)
class Service:
    key: ServiceKey
    frontends: tuple[Frontend, ...]
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    # "Service" for Kubernetes Services, "Pod" for a Pod's HostPort frontends.
    source_kind: str = "Service"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def annotation_map(self) -> dict[str, str]:
        return dict(self.annotations)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Facts about the node kpr runs on, given to plugins at configure time and on change."""

    name: str
    addresses: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    # The Node's topology.kubernetes.io/zone label; "" when unknown, which turns off
    # topology-aware routing (an unknown zone can never match an endpoint's zone hints).
    zone: str = ""

    def addresses_of(self, family: int) -> tuple[str, ...]:
        return tuple(a for a in self.addresses if ipaddress.ip_address(a).version == family)


@dataclass(slots=True)
class PluginStatus:
    """What a plugin reports from `kpr_status`: health, a one-line message and counters."""

    healthy: bool = True
    message: str = ""
    counters: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
