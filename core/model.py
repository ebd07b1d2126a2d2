"""The service model: what every plugin receives, independent of where services come from.

A `Service` is the whole desired state of one Kubernetes Service (or one Pod's HostPorts):
its frontends, each with the backends that may serve it. Objects are frozen so the bus can
compare old and new states and hand the same object to every plugin without copies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum


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


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
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


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int
    state: BackendState = BackendState.ACTIVE
    # The node the endpoint runs on; "" when unknown.
    node_name: str = ""
    # True when node_name is this node: the scope for traffic policy Local.
    local: bool = False
    zone: str = ""

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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
