"""The agent's object store: Kubernetes objects in, service model changes out.

A source feeds objects; the store works out which services they touch, translates those,
and publishes only services whose model actually changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Callable, Protocol

from . import memory, translate
from .model import InvalidObject, NodeInfo, Service, ServiceKey
from .sources import ObjectRef

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def upsert(self, service: Service) -> None: ...
    def delete(self, key: ServiceKey) -> None: ...
    def sync_complete(self) -> None: ...


class ObjectStore:
    """Implements the sources' ObjectSink and publishes model changes."""

    def __init__(self, node: NodeInfo, publisher: Publisher, proxy_name: str = "", on_synced: Callable[[float], None] | None = None):
        self._lock = threading.RLock()
        self.node = node
        self._publisher = publisher
        self._proxy_name = proxy_name
        self._on_synced = on_synced
        self._objects: dict[ObjectRef, dict] = {}
        # service key -> refs of the objects that feed it (the Service, slices, Endpoints, Pod)
        self._members: dict[ServiceKey, set[ObjectRef]] = defaultdict(set)
        self.services: dict[ServiceKey, Service] = {}
        self.errors: dict[str, str] = {}
        self.is_synced = False
        self._started = time.monotonic()
        self.sync_duration: float | None = None
        self.translations = 0

    # --- ObjectSink ----------------------------------------------------------------------

    @memory.gc_paused
    def apply(self, upserts: list[dict], deletes: list[ObjectRef]) -> None:
        with self._lock:
            touched: set[ServiceKey] = set()
            for ref in deletes:
                obj = self._objects.pop(ref, None)
                if obj is not None:
                    key = translate.service_key_of(obj)
                    if key is not None:
                        self._members[key].discard(ref)
                        touched.add(key)
            for obj in upserts:
                memory.compact(obj)  # held for the agent's lifetime: repeated strings once
                ref = translate.object_ref(obj)
                old = self._objects.get(ref)
                if old is not None:
                    old_key = translate.service_key_of(old)
                    if old_key is not None:
                        self._members[old_key].discard(ref)
                        touched.add(old_key)
                self._objects[ref] = obj
                key = translate.service_key_of(obj)
                if key is not None:
                    self._members[key].add(ref)
                    touched.add(key)
            for key in sorted(touched):
                self._refresh(key)

    def synced(self) -> None:
        with self._lock:
            if self.is_synced:
                return
            self.is_synced = True
            self.sync_duration = time.monotonic() - self._started
            log.info("store.synced services=%d seconds=%.3f", len(self.services), self.sync_duration)
            self._publisher.sync_complete()
        if self._on_synced:
            self._on_synced(self.sync_duration)

    def report_error(self, origin: str, reason: str) -> None:
        with self._lock:
            if self.errors.get(origin) != reason:
                log.error("source.error origin=%s reason=%s", origin, reason)
            self.errors[origin] = reason

    def clear_error(self, origin: str) -> None:
        with self._lock:
            if self.errors.pop(origin, None) is not None:
                log.info("source.recovered origin=%s", origin)

    # --- model ---------------------------------------------------------------------------

    def set_node(self, node: NodeInfo) -> None:
        """New node facts: every service is translated again (NodePort frontends follow addresses)."""
        with self._lock:
            self.node = node
            for key in sorted(set(self._members) | set(self.services)):
                self._refresh(key)

    def snapshot(self) -> list[Service]:
        with self._lock:
            return list(self.services.values())

    def _refresh(self, key: ServiceKey) -> None:
        members = self._members.get(key) or set()
        objs = [self._objects[r] for r in members]
        origin = f"service {key}"
        try:
            service = self._translate(key, objs)
        except InvalidObject as e:
            # The last good state stays published; the problem shows in status.
            self.report_error(origin, str(e))
            return
        self.clear_error(origin)
        self.translations += 1
        if not members:
            self._members.pop(key, None)
        old = self.services.get(key)
        if service is None:
            if old is not None:
                del self.services[key]
                log.info("service.delete service=%s", key)
                self._publisher.delete(key)
            return
        if service != old:
            self.services[key] = service
            log.debug("service.upsert service=%s frontends=%d", key, len(service.frontends))
            self._publisher.upsert(service)

    def _translate(self, key: ServiceKey, objs: list[dict]) -> Service | None:
        svc = endpoints = pod = None
        slices = []
        for o in objs:
            kind = o.get("kind")
            if kind == "Service":
                svc = o
            elif kind == "EndpointSlice":
                slices.append(o)
            elif kind == "Endpoints":
                endpoints = o
            elif kind == "Pod":
                pod = o
        if pod is not None:
            return translate.translate_pod(pod, self.node)
        if svc is None:
            return None
        slices.sort(key=lambda s: s.get("metadata", {}).get("name", ""))
        return translate.translate_service(svc, slices, endpoints, self.node, self._proxy_name)

    def counts(self) -> tuple[int, int, int]:
        """(services, frontends, backends) currently published."""
        with self._lock:
            frontends = sum(len(s.frontends) for s in self.services.values())
            backends = sum(len(f.backends) for s in self.services.values() for f in s.frontends)
            return len(self.services), frontends, backends
