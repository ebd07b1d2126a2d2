"""The kubernetes source: Services, EndpointSlices, this node's Node and the Pods on this
node, listed and watched from the API server.

Objects reach the sink with the same meaning as from the files source; the API server has
already allocated ClusterIPs and nodePorts. kube-proxy's server-side label selectors apply
(services handed to another proxy, and headless ones, never reach this node), so does a
field selector for this node's Node and Pods. Every Pod of this node is kept (HostPorts, and
the pod addresses plugins that route to pods learn from: kpr_pods_changed).

Guarantees, the same as the files source's:
- nothing reaches the sink until every kind has finished its initial list; then the whole
  state goes in one batch (the Node first, so the first translation already has this
  node's addresses and zone), then `synced()`;
- a relist (after 410 Gone) is reconciled against what the sink holds: an object whose
  resourceVersion did not change is not sent again, so an unchanged service produces no
  bus event, and only objects gone from the list are deleted;
- while the API server is unreachable nothing is deleted: the last good state stays in
  force, and the problem shows in status under the watched kind;
- an object the API server sends that kpr cannot use is reported under its name and its
  last good version stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..kube.client import Connection, RateLimiter, connect, json_call, raw_lister
from ..kube.election import LeaseElector
from ..kube.lease import micro_time
from ..kube.informer import Informer, JitterBackoff, Watched
from ..model import InvalidObject
from . import LeaseSpec, ObjectRef, ObjectSink, ServiceHandler

log = logging.getLogger(__name__)

HEADLESS_LABEL = "service.kubernetes.io/headless"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
KINDS = ("Node", "Service", "EndpointSlice", "Pod")
# The condition lb_ipam's writes set on a Service, as Cilium's LB IPAM sets its own.
LB_CONDITION = "lbipam.kpr.io/request-satisfied"


def service_selector(proxy_name: str) -> str:
    """kube-proxy's label selector for Services and EndpointSlices."""
    if proxy_name:
        return f"{PROXY_NAME_LABEL}={proxy_name},!{HEADLESS_LABEL}"
    return f"!{PROXY_NAME_LABEL},!{HEADLESS_LABEL}"


def has_host_port(pod: dict) -> bool:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return False
    for group in ("containers", "initContainers"):
        for c in spec.get(group) or ():
            if isinstance(c, dict):
                for p in c.get("ports") or ():
                    if isinstance(p, dict) and p.get("hostPort"):
                        return True
    return False


def _slim(obj: dict) -> dict:
    # managedFields and kubectl's last-applied copy are often most of an object's size and
    # nothing in kpr reads them; 10k services are held for the agent's lifetime.
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        ann = meta.get("annotations")
        if isinstance(ann, dict) and LAST_APPLIED in ann:
            ann = dict(ann)
            del ann[LAST_APPLIED]
            meta["annotations"] = ann
    return obj


def _rv(obj: dict | None) -> str | None:
    meta = obj.get("metadata") if obj else None
    return meta.get("resourceVersion") if isinstance(meta, dict) else None


def _name(obj: dict) -> object:
    meta = obj.get("metadata")
    return meta.get("name") if isinstance(meta, dict) else None


def _label(ref: ObjectRef) -> str:
    return f"{ref[0]} {ref[1]}/{ref[2]}"


class KubernetesSource:
    """See the module docstring. `on_node` receives this node's Node object (None while it
    does not exist), on the source's threads, before any service it affects."""

    def __init__(
        self,
        section: Any,
        node_name: str,
        proxy_name: str = "",
        *,
        on_node: Callable[[dict | None], None] | None = None,
        backoff: JitterBackoff | None = None,
        idle_timeout: float = 120.0,
        watch_timeout: tuple[int, int] = (240, 480),
    ):
        self.section = section
        self.node_name = node_name
        self.proxy_name = proxy_name
        self.on_node = on_node
        self._backoff = backoff
        self._idle_timeout = idle_timeout
        self._watch_timeout = watch_timeout
        self._lock = threading.RLock()
        self._sink: ObjectSink | None = None
        self.connection: Connection | None = None
        self.informers: dict[str, Informer] = {}
        self._cache: dict[str, dict[ObjectRef, dict]] = {k: {} for k in KINDS if k != "Node"}
        self._node: dict | None = None
        self._listed: set[str] = set()
        self._synced = False
        self._failing: dict[str, tuple[str, float]] = {}
        # origin -> reason of objects (or the Node) that could not be used
        self._invalid: dict[str, str] = {}
        self._last_error: tuple[str, float] | None = None
        self._last_event: float | None = None
        self.applied = 0  # batches handed to the sink, for tests and status
        # StatusWriter: who hears of Service changes, the Lease election, writes made.
        self._service_handlers: list[ServiceHandler] = []
        self._elector: LeaseElector | None = None
        self._core_api: Any = None
        self.status_writes = 0

    # --- Source --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Connect and start listing now: settings that cannot work fail here, naming the key,
        and the initial lists run while the plugins start (compiling BPF takes a while).
        Nothing reaches a sink before start()."""
        if self.connection is not None:
            return
        self.connection = connect(self.section)
        client = self.connection.client
        selector = service_selector(self.proxy_name)
        watched = [
            Watched("Node", "v1", raw_lister(client, "/api/v1/nodes"), field_selector=f"metadata.name={self.node_name}"),
            Watched("Service", "v1", raw_lister(client, "/api/v1/services"), label_selector=selector),
            Watched("EndpointSlice", "discovery.k8s.io/v1", raw_lister(client, "/apis/discovery.k8s.io/v1/endpointslices"), label_selector=selector),
            Watched("Pod", "v1", raw_lister(client, "/api/v1/pods"), field_selector=f"spec.nodeName={self.node_name}"),
        ]
        limiter = RateLimiter(self.section.qps, self.section.burst)
        for w in watched:
            self.informers[w.kind] = Informer(
                w, self, limiter, page_size=self.section.page_size, backoff=self._backoff,
                idle_timeout=self._idle_timeout, watch_timeout=self._watch_timeout,
            )
        for inf in self.informers.values():
            inf.start()
        log.info("kube.start server=%s how=%s node=%s selector=%s", self.connection.server, self.connection.how, self.node_name, selector)

    def start(self, sink: ObjectSink) -> None:
        self.prepare()
        with self._lock:
            self._sink = sink
            # What went wrong before the sink was there.
            for kind, (reason, _) in sorted(self._failing.items()):
                self._report_failing(kind, reason)
            for origin, reason in sorted(self._invalid.items()):
                sink.report_error(origin, reason)
            if self._listed.issuperset(KINDS):
                self._initial_sync()

    def stop(self) -> None:
        self.resign()
        for inf in self.informers.values():
            inf.stop()
        deadline = time.monotonic() + 0.9
        for inf in self.informers.values():
            if not inf.join(max(0.01, deadline - time.monotonic())):
                log.warning("kube.stop kind=%s thread still busy; leaving it (daemon)", inf.kind)
        if self.connection is not None:
            self.connection.close()
        log.info("kube.stop")

    # --- informer handler ----------------------------------------------------------------

    def listed(self, kind: str, items: list[dict], resource_version: str) -> None:
        with self._lock:
            self._last_event = time.monotonic()
            if kind == "Node":
                node = next((o for o in items if _name(o) == self.node_name), None)
                self._set_node(node)
            else:
                cache = self._cache[kind]
                fresh: dict[ObjectRef, dict] = {}
                upserts: list[dict] = []
                for obj in items:
                    ref, usable = self._admit(kind, obj, cache)
                    if ref is None or usable is None:
                        continue
                    fresh[ref] = usable
                    if usable is not cache.get(ref):
                        upserts.append(usable)
                deletes = [ref for ref in cache if ref not in fresh]
                for ref in deletes:
                    self._clear_invalid(ref)
                self._cache[kind] = fresh
                if self._synced and (upserts or deletes):
                    log.info("kube.reconciled kind=%s upserts=%d deletes=%d", kind, len(upserts), len(deletes))
                    self._apply(upserts, deletes)
            first = kind not in self._listed
            self._listed.add(kind)
            if first:
                log.info("kube.listed kind=%s objects=%d resource_version=%s", kind, len(items), resource_version)
            if not self._synced and self._sink is not None and self._listed.issuperset(KINDS):
                self._initial_sync()

    def event(self, kind: str, type_: str, obj: dict) -> None:
        with self._lock:
            self._last_event = time.monotonic()
            if kind == "Node":
                if _name(obj) == self.node_name:
                    self._set_node(None if type_ == "DELETED" else obj)
                return
            cache = self._cache[kind]
            if type_ == "DELETED":
                ref = self._ref(obj)
                if ref is not None:
                    self._clear_invalid(ref)
                    if cache.pop(ref, None) is not None and self._synced:
                        self._apply([], [ref])
                return
            ref, usable = self._admit(kind, obj, cache)
            if ref is None:
                return
            if usable is None:
                # An invalid first version.
                if cache.pop(ref, None) is not None and self._synced:
                    self._apply([], [ref])
                return
            if usable is cache.get(ref):
                return
            cache[ref] = usable
            if self._synced:
                self._apply([usable], [])

    def failed(self, kind: str, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._failing[kind] = (reason, now)
            self._last_error = (reason, now)
            self._report_failing(kind, reason)

    def _report_failing(self, kind: str, reason: str) -> None:
        if self._sink is not None:
            self._sink.report_error(kind, f"{reason}; the last good state stays in force")

    def recovered(self, kind: str) -> None:
        with self._lock:
            self._failing.pop(kind, None)
            if self._sink is not None:
                self._sink.clear_error(kind)

    # --- internals -----------------------------------------------------------------------

    @staticmethod
    def _ref(obj: dict) -> ObjectRef | None:
        from .. import translate

        try:
            return translate.object_ref(obj)
        except (InvalidObject, ValueError, TypeError, KeyError, AttributeError):
            return None

    def _admit(self, kind: str, obj: dict, cache: dict[ObjectRef, dict]) -> tuple[ObjectRef | None, dict | None]:
        """(ref, the object to hold): the cached object itself when unchanged, the new one
        when usable, the last good one (or None) when invalid."""
        from .. import translate

        ref = self._ref(obj)
        if ref is None:
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            origin = f"{kind} {meta.get('namespace') or ''}/{meta.get('name') or '(no name)'}"
            self._report_invalid(origin, f"{origin}: no usable metadata; skipped")
            return None, None
        old = cache.get(ref)
        if old is not None and _rv(old) is not None and _rv(old) == _rv(obj):
            return ref, old
        try:
            translate.validate_object(obj)
        except (InvalidObject, ValueError, TypeError, KeyError, AttributeError) as e:
            kept = "; keeping its last good version" if old is not None else "; skipped"
            self._report_invalid(_label(ref), f"{e}{kept}")
            return ref, old
        self._clear_invalid(ref)
        return ref, _slim(obj)

    def _report_invalid(self, origin: str, reason: str) -> None:
        self._invalid[origin] = reason
        if self._sink is not None:
            self._sink.report_error(origin, reason)

    def _clear_invalid(self, ref: ObjectRef | str) -> None:
        origin = ref if isinstance(ref, str) else _label(ref)
        if self._invalid.pop(origin, None) is not None and self._sink is not None:
            self._sink.clear_error(origin)

    def _set_node(self, node: dict | None) -> None:
        changed = _rv(node) != _rv(self._node) or (node is None) != (self._node is None)
        self._node = node
        origin = f"Node {self.node_name}"
        if node is None:
            self._report_invalid(origin, f"{origin} not found in the API server: node addresses come from node.devices, zone unknown")
        else:
            self._clear_invalid(origin)
        if self._synced and changed and self.on_node is not None:
            self.on_node(node)

    def _apply(self, upserts: list[dict], deletes: list[ObjectRef]) -> None:
        assert self._sink is not None
        self.applied += 1
        self._sink.apply(upserts, deletes)
        if self._service_handlers:
            services = [o for o in upserts if o.get("kind") == "Service"]
            gone = [f"{r[1]}/{r[2]}" for r in deletes if r[0] == "Service"]
            if services or gone:
                for handler in self._service_handlers:
                    handler(services, gone)

    def _initial_sync(self) -> None:
        if self.on_node is not None:
            self.on_node(self._node)
        objects = [o for kind in ("Service", "EndpointSlice", "Pod") for o in self._cache[kind].values()]
        if objects:
            self._apply(objects, [])
        self._synced = True
        assert self._sink is not None
        self._sink.synced()
        log.info("kube.synced objects=%d", len(objects))

    # --- StatusWriter (kpr.sources): status.loadBalancer through the status subresource ---

    independent = False

    def watch_services(self, handler: ServiceHandler) -> None:
        with self._lock:
            self._service_handlers.append(handler)
            # Before the initial sync the services arrive with it, through _apply.
            if self._synced and self._cache["Service"]:
                handler(list(self._cache["Service"].values()), [])

    def elect(self, lease: LeaseSpec, on_change: Callable[[bool], None]) -> None:
        self.prepare()
        assert self.connection is not None
        if self._elector is not None:
            raise RuntimeError("elect was already called")
        self._elector = LeaseElector(
            self.connection.client, lease.namespace, lease.name, self.node_name,
            duration=lease.duration, retry_period=lease.retry_period, on_change=on_change,
        )
        self._elector.start()

    def resign(self) -> None:
        elector, self._elector = self._elector, None
        if elector is not None:
            elector.stop(release=True)

    def write_load_balancer(self, key: str, ips: Sequence[str], problem: str = "") -> bool:
        elector = self._elector
        if elector is None or not elector.elected or self.connection is None:
            return False
        ns, _, name = key.partition("/")
        with self._lock:
            svc = self._cache["Service"].get(("Service", ns, name))
        if svc is None:
            return True  # gone: nothing to write
        status = svc.get("status") if isinstance(svc.get("status"), dict) else {}
        balancer = status.get("loadBalancer") if isinstance(status.get("loadBalancer"), dict) else {}
        shown = [i.get("ip") for i in balancer.get("ingress") or [] if isinstance(i, dict)]
        old = next((c for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type") == LB_CONDITION), None)
        if not ips and not problem and old is None:
            return True  # a release, but nothing here is ours (another controller's status)
        ok = "False" if problem else "True"
        message = problem or f"allocated {', '.join(ips)}"
        if shown == list(ips) and (
            (old is None and not ips and not problem)
            or (old is not None and old.get("status") == ok and old.get("message") == message)
        ):
            return True
        patch: dict[str, Any] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}
        if ips or problem:
            changed = old is None or old.get("status") != ok
            patch["conditions"] = [{
                "type": LB_CONDITION, "status": ok,
                "reason": "AddressAllocationFailed" if problem else "AddressAllocated",
                "message": message,
                "lastTransitionTime": micro_time()[:19] + "Z" if changed else old.get("lastTransitionTime"),
                "observedGeneration": (svc.get("metadata") or {}).get("generation") or 1,
            }]
        elif old is not None:
            patch["conditions"] = [{"type": LB_CONDITION, "$patch": "delete"}]
        if self._core_api is None:
            from kubernetes.client import CoreV1Api  # builds the client's models: only for writers

            self._core_api = CoreV1Api(self.connection.client)
        # A dict body goes as a strategic merge patch: conditions merge by type.
        code, _ = json_call(self._core_api.patch_namespaced_service_status, name, ns, {"status": patch})
        if code == 404:
            return True
        if not 200 <= code <= 299:
            raise RuntimeError(f"patching the status of service {key} answered {code}")
        self.status_writes += 1
        log.info("kube.status_written service=%s ingress=%s problem=%s", key, ",".join(ips), problem)
        return True

    # --- observation ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            kinds = {}
            for kind, inf in self.informers.items():
                st = inf.stats
                kinds[kind] = {
                    "state": st.state,
                    "resourceVersion": st.resource_version,
                    "objects": (1 if self._node else 0) if kind == "Node" else len(self._cache[kind]),
                    "events": dict(st.events),
                    "relists": st.relists,
                    "watchRestarts": st.watch_restarts,
                    "errors": st.errors,
                }
            if not self._synced:
                state = "syncing"
            elif self._failing:
                state = "disconnected"
            else:
                state = "watching"
            return {
                "state": state,
                "server": self.connection.server if self.connection else "",
                "connection": self.connection.how if self.connection else "",
                "lastError": self._last_error[0] if self._last_error else "",
                "lastErrorAgeSeconds": round(now - self._last_error[1], 1) if self._last_error else None,
                "secondsSinceLastEvent": round(now - self._last_event, 1) if self._last_event else None,
                "tokenRotations": self.connection.tokens.rotations if self.connection and self.connection.tokens else 0,
                "kinds": kinds,
            }
