"""Where Kubernetes objects come from: a directory of manifests (files) or an API server.

A source keeps the sink told of the objects it holds. Objects are plain dicts as kubectl
would read them (apiVersion, kind, metadata, spec, status), already defaulted by the source
where the API server would default them (ClusterIP, nodePort allocation for files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# (kind, namespace, name): an object's identity within a source.
ObjectRef = tuple[str, str, str]

# Kinds a source passes on; anything else in a manifest is reported and skipped.
SUPPORTED_KINDS = ("Service", "EndpointSlice", "Endpoints", "Pod")


class ObjectSink(Protocol):
    """What a source feeds: the agent's object store."""

    def apply(self, upserts: list[dict | bytes], deletes: list[ObjectRef]) -> None:
        """Objects added or changed (whole objects) and objects gone, in one batch. An object
        may come packed (kpr.memory.pack; the files source sends them so): a sink reads each
        with kpr.memory.unpack."""

    def synced(self) -> None:
        """The source has passed on everything it held at start-up."""

    def report_error(self, origin: str, reason: str) -> None:
        """Something in `origin` (a file name, an object ref) could not be used, and why."""

    def clear_error(self, origin: str) -> None:
        """`origin` is good again."""


class Source(Protocol):
    def start(self, sink: ObjectSink) -> None:
        """Begin feeding the sink; the first batch should hold the whole initial state."""

    def stop(self) -> None:
        """Stop feeding; returns within a second."""


# --- write-back of Service status (issue 15) ------------------------------------------------


@dataclass(frozen=True)
class LeaseSpec:
    """The coordination.k8s.io/v1 Lease that elects the one writer of a cluster."""

    namespace: str
    name: str
    # Seconds a holder that stops renewing keeps it; seconds between renewals.
    duration: float = 15.0
    retry_period: float = 2.0


# (changed Service objects, keys "namespace/name" of deleted ones), in the order they happened.
ServiceHandler = Callable[[list[dict], list[str]], None]


@runtime_checkable
class StatusWriter(Protocol):
    """A source that takes a Service's status.loadBalancer back, so an address allocator
    (lb_ipam) reaches every plugin through the source, as an ordinary service change.

    Plugins get it from ``PluginContext.status_writer()``. Two kinds:

    - ``independent`` True (files): there is no shared store, so every node decides and
      writes alone; what it writes must depend only on the objects, never on the order
      they were seen, or nodes would disagree. The source keeps what is written in its
      allocation state (beside ClusterIPs and nodePorts, across restarts) and delivers the
      service again with the addresses in status.loadBalancer.ingress.
    - ``independent`` False (kubernetes): the write goes to the API server's status
      subresource, and only from the node holding the Lease given to ``elect``; every
      node sees the result through its watch.
    """

    independent: bool

    def watch_services(self, handler: ServiceHandler) -> None:
        """Call `handler` with every Service the source holds (at once, for those it already
        holds) and then with each change, on the source's thread: it must return quickly
        and must not call back into the source (queue the work)."""

    def elect(self, lease: LeaseSpec, on_change: Callable[[bool], None]) -> None:
        """Compete for the right to write; `on_change(True/False)` when it is won or lost.
        An independent source grants it at once."""

    def write_load_balancer(self, key: str, ips: Sequence[str], problem: str = "") -> bool:
        """Make `key`'s status.loadBalancer.ingress exactly `ips` and record `problem` (as a
        service condition where the source has conditions). Empty `ips` and no problem is a
        release: it drops only what this writer wrote (a status another controller wrote
        stays). Returns False when this node may not write now. Writing what the service
        already shows costs nothing. Raises RuntimeError when the write was refused for this
        service, anything else when the source cannot be reached."""

    def resign(self) -> None:
        """Stop competing; a held Lease is released so another node takes over at once."""
