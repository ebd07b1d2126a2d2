"""Where Kubernetes objects come from: a directory of manifests (files) or an API server.

A source keeps the sink told of the objects it holds. Objects are plain dicts as kubectl
would read them (apiVersion, kind, metadata, spec, status), already defaulted by the source
where the API server would default them (ClusterIP, nodePort allocation for files).
"""

from __future__ import annotations

from typing import Protocol

# (kind, namespace, name): an object's identity within a source.
ObjectRef = tuple[str, str, str]

# Kinds a source passes on; anything else in a manifest is reported and skipped.
SUPPORTED_KINDS = ("Service", "EndpointSlice", "Endpoints", "Pod")


class ObjectSink(Protocol):
    """What a source feeds: the agent's object store."""

    def apply(self, upserts: list[dict], deletes: list[ObjectRef]) -> None:
        """Objects added or changed (whole objects) and objects gone, in one batch."""

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
