"""The agent's object store: Kubernetes objects in, service model changes out.

A source feeds objects; the store works out which services they touch, translates those,
and publishes only services whose model actually changed.

The store also refuses what no single object shows to be wrong: a ClusterIP equal to one of
this node's addresses, or to an address that an EndpointSlice, Endpoints or Pod lists as an
endpoint (either would take the traffic meant for that host or pod). The service claiming
the address is refused; the endpoint's own service is not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Callable, Protocol

from . import memory, translate
from .model import FrontendType, InvalidObject, NodeInfo, Service, ServiceKey
from .sources import ObjectRef

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def upsert(self, service: Service) -> None: ...
    def delete(self, key: ServiceKey) -> None: ...
    def sync_complete(self) -> None: ...
    # Optional: the pods on this node changed ("namespace/name" -> pod IPs, the whole set).
    # def pods_changed(self, pods: dict[str, tuple[str, ...]]) -> None: ...
    # Optional: upserts (a Service) and deletes (its ServiceKey) in order, taken at once
    # (kpr.bus.EventBus.changes); without it each goes to upsert() or delete().
    # def changes(self, changes: list[Service | ServiceKey]) -> None: ...


class _Collected:
    """A publisher's upsert and delete calls, kept in order (handed on by `changes`): the
    Service upserted or the ServiceKey deleted (no pair per change: 20k of them were made
    between the model's objects in an initial sync)."""

    def __init__(self) -> None:
        self.items: list[Service | ServiceKey] = []

    def upsert(self, service: Service) -> None:
        self.items.append(service)

    def delete(self, key: ServiceKey) -> None:
        self.items.append(key)


class ObjectStore:
    """Implements the sources' ObjectSink and publishes model changes."""

    def __init__(
        self,
        node: NodeInfo,
        publisher: Publisher,
        proxy_name: str = "",
        on_synced: Callable[[float], None] | None = None,
        cluster_cidrs: Iterable[str] = (),
        origin_of: Callable[[ObjectRef], str | None] | None = None,
    ):
        """`cluster_cidrs` is service.clusterCIDR, which ClusterIPs must lie in; `origin_of`
        names where an object came from (the files source's file) for error messages."""
        self._lock = threading.RLock()
        self.node = node
        self._rules = translate.address_rules(tuple(cluster_cidrs))
        self._origin_of = origin_of
        self._node_ips = self._canonical_node_ips(node)
        # Families without a clusterCIDR that no warning has named yet.
        self._unwarned = {f for f in (4, 6) if not self._rules.checks_family(f)}
        self._publisher = publisher
        self._proxy_name = proxy_name
        self._on_synced = on_synced
        # ref -> the object, packed (memory.pack): unpacked when its service is translated.
        self._objects: dict[ObjectRef, bytes | dict] = {}
        # service key -> refs of the objects that feed it other than its own Service, whose ref
        # follows from the key ("Service", namespace, name) and which feeds it while the store
        # holds it (see _member_refs): the one other ref itself (most services have one slice:
        # a tuple of two refs took 64 bytes a service, 1.3 MB at 20k), a tuple of a few, or a
        # set beyond (a set takes four times a tuple's memory); () for a Service alone.
        self._members: dict[ServiceKey, ObjectRef | tuple[ObjectRef, ...] | set[ObjectRef]] = {}
        self.services: dict[ServiceKey, Service] = {}
        # (frontends, backends) of `services`, kept up to date: the agent reads them for its
        # metrics every 0.2 s, and counting 20k services each time took 5 ms and the lock.
        self._frontends = self._backends = 0
        self.errors: dict[str, str] = {}
        # Things accepted but worth knowing (a ClusterIP family without service.clusterCIDR).
        self.warnings: dict[str, str] = {}
        # Endpoint address -> the ref of the object listing it, or a list of them when
        # several do: what a ClusterIP must not be. One reference per address, no set;
        # with service.clusterCIDR set, only addresses inside it (see _index).
        self._endpoint_ips: dict[str, ObjectRef | list[ObjectRef]] = {}
        # ClusterIP -> the service whose Service object claims it, or a list of them when
        # several do (a list per address took 1.5 MB at 20k services).
        self._claims: dict[str, ServiceKey | list[ServiceKey]] = {}
        # Pods running on this node in their own namespace: "namespace/name" -> pod IPs.
        self.local_pods: dict[str, tuple[str, ...]] = {}
        self.is_synced = False
        self._started = time.monotonic()
        self.sync_duration: float | None = None
        self.translations = 0

    # --- ObjectSink ----------------------------------------------------------------------

    @memory.gc_paused
    def apply(self, upserts: list[dict | bytes], deletes: list[ObjectRef]) -> None:
        with self._lock:
            touched: set[ServiceKey] = set()
            pods: list[dict] = []
            for ref in deletes:
                obj = memory.unpack(self._objects.pop(ref, None))
                if obj is not None:
                    self._index(ref, obj, None, touched)
                    key = translate.service_key_of(obj)
                    if key is not None:
                        self._drop_member(key, ref)
                        touched.add(key)
            # (names held for the loop: it runs once per object of a full sync)
            objects, checked, unpack, is_packed = self._objects, translate.checked, memory.unpack, memory.is_packed
            for item in upserts:
                found = checked(item)
                if found is not None:
                    # A slice the source validated: what the store needs of it was read then.
                    obj, ref, key = item, found.ref, found.key
                else:
                    # Sources may hand objects packed (memory.pack); the dict lives for this step only.
                    obj = unpack(item)
                    if obj.get("kind") == "Pod":
                        pods.append(obj)
                    ref = translate.object_ref(obj)
                    key = translate.service_key_of(obj, ref)
                old = objects.get(ref)
                if old is not None:
                    old = unpack(old)
                self._index(ref, old, obj, touched, key)
                if old is not None:
                    old_key = translate.service_key_of(old)
                    if old_key is not None:
                        self._drop_member(old_key, ref)
                        touched.add(old_key)
                # Kept packed, read again when its service is translated.
                objects[ref] = item if is_packed(item) else memory.pack(obj)
                if key is not None:
                    self._add_member(key, ref)
                    touched.add(key)
            # ServiceKey's (namespace, name) order: a tuple's, compared in C.
            # What the refreshes publish goes out at once where the publisher takes a batch
            # (the bus: one hold of its queue's lock for an initial sync's 20k services).
            publisher, batch = self._publisher, getattr(self._publisher, "changes", None)
            if batch is not None:
                self._publisher = collected = _Collected()
            try:
                for key in sorted(touched):
                    self._refresh(key)
            finally:
                if batch is not None:
                    self._publisher = publisher
                    if collected.items:
                        batch(collected.items)
            self._pods(pods, deletes)

    def _pods(self, upserts: list[dict], deletes: list[ObjectRef]) -> None:
        """Follow the pods on this node; publish the whole set when it changed."""
        pods = dict(self.local_pods)
        for ref in deletes:
            if ref[0] == "Pod":
                pods.pop(f"{ref[1]}/{ref[2]}", None)
        for obj in upserts:
            ref = translate.object_ref(obj)
            ips = translate.local_pod_ips(obj, self.node)
            if ips:
                pods[f"{ref[1]}/{ref[2]}"] = ips
            else:
                pods.pop(f"{ref[1]}/{ref[2]}", None)
        if pods == self.local_pods:
            return
        self.local_pods = pods
        publish = getattr(self._publisher, "pods_changed", None)
        if publish is not None:
            publish(dict(pods))

    def object(self, ref: ObjectRef) -> dict | None:
        """The object the store holds under `ref` (a copy: the store keeps it packed)."""
        with self._lock:
            return memory.unpack(self._objects.get(ref))

    def _add_member(self, key: ServiceKey, ref: ObjectRef) -> None:
        members = self._members.get(key)
        if ref[0] == "Service" and ref[1] == key.namespace and ref[2] == key.name:
            if members is None:
                self._members[key] = ()  # implied by the key (see _members)
            return
        if not members:
            self._members[key] = ref
        elif type(members) is set:
            members.add(ref)
        elif type(members[0]) is str:  # one ref
            if members != ref:
                self._members[key] = (members, ref)
        elif ref not in members:  # a set beyond a few (a service of many slices)
            self._members[key] = members + (ref,) if len(members) < 8 else {*members, ref}  # type: ignore[operator]

    def _drop_member(self, key: ServiceKey, ref: ObjectRef) -> None:
        members = self._members.get(key)
        if not members:
            return  # its Service's ref, implied by the key, goes with the object
        if type(members) is set:
            members.discard(ref)
        elif type(members[0]) is str:  # one ref
            if members == ref:
                self._members[key] = ()
        elif ref in members:
            rest = tuple(r for r in members if r != ref)  # type: ignore[union-attr]
            self._members[key] = rest[0] if len(rest) == 1 else rest

    def _member_refs(self, key: ServiceKey) -> list[ObjectRef]:
        """The refs of every object that feeds `key`'s service, its Service first."""
        members = self._members.get(key) or ()
        own: ObjectRef = ("Service", key.namespace, key.name)
        refs = [own] if own in self._objects else []
        if type(members) is tuple and members and type(members[0]) is str:
            refs.append(members)  # type: ignore[arg-type]
        else:
            refs.extend(members)  # type: ignore[arg-type]
        return refs

    def synced(self) -> None:
        with self._lock:
            if self.is_synced:
                return
            self.is_synced = True
            # The initial state is translated: parsed addresses (an entry per endpoint) were
            # worth keeping for its passes only; later changes refill what they use.
            translate.clear_caches()
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

    # --- addresses claimed across objects ------------------------------------------------

    def _index(
        self,
        ref: ObjectRef,
        old: dict | None,
        new: dict | bytes | None,
        touched: set[ServiceKey],
        key: ServiceKey | None = None,
    ) -> None:
        """Follow the ClusterIPs and endpoint addresses an object change adds and removes;
        services whose ClusterIP became or stopped being an endpoint address are touched.
        `new` is packed only for a slice validation read (translate.checked). `key` is the
        object's service key when the caller has it: claims keep that object (the one the
        store's members and the model hold), not one of their own (20k more at 20k services)."""
        kind = ref[0]
        if kind == "Service":
            claimed = translate.claimed_cluster_ips
            before = claimed(old) if old is not None else ()
            after = claimed(new) if new is not None else ()
            if before == after:
                return
            if key is None:
                key = translate.service_key_of(new or old or {}, ref)
            if key is None:
                return
            claims = self._claims
            for ip in before:
                owners = claims.get(ip)
                if ip in after or owners is None:
                    continue
                if type(owners) is list:
                    if key in owners:
                        owners.remove(key)
                    if len(owners) == 1:
                        claims[ip] = owners[0]
                    elif not owners:
                        del claims[ip]
                elif owners == key:
                    del claims[ip]
            for ip in after:
                if ip in before:
                    continue
                owners = claims.get(ip)
                if owners is None:
                    claims[ip] = key
                elif type(owners) is list:
                    if key not in owners:
                        owners.append(key)
                elif owners != key:
                    claims[ip] = [owners, key]
            return
        if kind not in ("EndpointSlice", "Endpoints", "Pod"):
            return
        # A ClusterIP outside service.clusterCIDR is refused anyway: only addresses inside
        # it can conflict, which keeps the index empty where pod and service networks differ.
        rules = self._rules
        before = translate.endpoint_addresses_of(old, rules) if old is not None else set()
        after = translate.endpoint_addresses_of(new, rules) if new is not None else set()
        if before:  # else all of after is new (a full sync), without a set difference
            before, after = before - after, after - before
        listed = self._endpoint_ips
        for ip in before:
            holders = listed.get(ip)
            if isinstance(holders, list):
                if ref in holders:
                    holders.remove(ref)
                if len(holders) == 1:
                    listed[ip] = holders[0]
                touched.update(self._claimers(ip))  # its error names another lister now
            elif holders == ref:
                del listed[ip]
                touched.update(self._claimers(ip))
        claims = self._claims
        for ip in after:
            holders = listed.setdefault(ip, ref)
            if holders is ref:
                if ip in claims:
                    touched.update(self._claimers(ip))
            elif isinstance(holders, list):
                holders.append(ref)
            elif holders != ref:
                listed[ip] = [holders, ref]

    def _claimers(self, ip: str) -> list[ServiceKey] | tuple[ServiceKey, ...]:
        owners = self._claims.get(ip)
        if owners is None:
            return ()
        return owners if type(owners) is list else (owners,)  # type: ignore[return-value]

    @staticmethod
    def _canonical_node_ips(node: NodeInfo) -> frozenset[str]:
        return frozenset(ip for ip in (translate.canonical_ip(a) for a in node.addresses) if ip)

    def _conflicts(self, svc: dict | bytes, service: Service) -> list[str]:
        """Why a Service's ClusterIPs would take traffic meant for the node or a pod.

        An endpoint address counts against a ClusterIP only outside service.clusterCIDR:
        no pod lives in the service network, so a slice listing one of its addresses is the
        odd one out and must not refuse the service (else anyone able to write an
        EndpointSlice could take any service down, the API server's own `kubernetes`
        service included). Without a network for the family nothing tells the two apart,
        and the address a pod is known by wins."""
        node_ips, listed = self._node_ips, self._endpoint_ips
        # The common case, no conflict, costs a look at the translated frontends only.
        cluster_ip = FrontendType.CLUSTER_IP
        for f in service.frontends:  # (a loop, not any() of a generator: once per service)
            if f.type is cluster_ip and (f.address in node_ips or f.address in listed):
                break
        else:
            return []
        problems = []
        for field, ip in translate.cluster_ips_of(memory.unpack(svc)):
            if ip in node_ips:
                problems.append(f"{field}: {ip} is an address of this node ({self.node.name or 'node'})")
                continue
            holders = self._endpoint_ips.get(ip)
            if holders is not None and not self._rules.in_network(ip):
                holder = holders[0] if isinstance(holders, list) else holders
                where = self._where(holder)
                problems.append(f"{field}: {ip} is an endpoint address of {holder[0]} {holder[1]}/{holder[2]}{where}")
        return problems

    def _service_where(self, svc: dict | bytes | None) -> str:
        return self._where(translate.object_ref(memory.unpack(svc))) if svc is not None else ""

    def _where(self, ref: ObjectRef) -> str:
        """" (in <file>)" when the source can say where an object came from."""
        if self._origin_of is None:
            return ""
        try:
            origin = self._origin_of(ref)
        except Exception:  # naming the file is a courtesy; never fail a refresh over it
            return ""
        return f" (in {origin})" if origin else ""

    def _warn_unchecked(self, service: Service) -> None:
        """Warn once per family that ClusterIPs go unchecked without service.clusterCIDR."""
        if not self._unwarned:
            return
        for f in service.frontends:
            if f.type is not FrontendType.CLUSTER_IP:
                continue
            family = 6 if ":" in f.address else 4
            if family not in self._unwarned:
                continue
            self._unwarned.discard(family)
            origin = f"service.clusterCIDR IPv{family}"
            self.warnings[origin] = (
                f"no IPv{family} network configured: IPv{family} ClusterIPs are not range-checked "
                f"(first seen: {service.key} {f.address})"
            )
            log.warning("store.warning origin=%s reason=%s", origin, self.warnings[origin])

    # --- model ---------------------------------------------------------------------------

    def set_node(self, node: NodeInfo) -> None:
        """New node facts: every service is translated again (NodePort frontends follow addresses)."""
        with self._lock:
            self.node = node
            self._node_ips = self._canonical_node_ips(node)
            for key in sorted(set(self._members) | set(self.services)):
                self._refresh(key)

    def snapshot(self) -> list[Service]:
        with self._lock:
            return list(self.services.values())

    def _refresh(self, key: ServiceKey) -> None:
        members = self._member_refs(key)
        unpack, checked = memory.unpack, translate.checked
        # EndpointSlices, and Services the source validated moments ago, go to translation as
        # kept (packed): they are not read again (translate.take_checked).
        objs = []
        objects = self._objects
        svc = None
        for r in members:
            o = objects[r]
            if r[0] != "EndpointSlice" and checked(o) is None:
                o = unpack(o)
            objs.append((r, o))
            if svc is None and r[0] == "Service":
                svc = o
        try:
            service = self._translate(key, objs)
        except InvalidObject as e:
            # The last good state stays published; the problem shows in status.
            self.report_error(f"service {key}", f"{e}{self._service_where(svc)}")
            return
        conflicts = self._conflicts(svc, service) if service is not None and svc is not None else []
        if conflicts:
            where = self._service_where(svc)
            self.report_error(f"service {key}", f"Service {key}{where}: {'; '.join(conflicts)}; not served")
            self._withdraw_conflicting(key)
            return
        if self.errors:  # the origin's text only when some error could be cleared
            self.clear_error(f"service {key}")
        self.translations += 1
        if not members:
            self._members.pop(key, None)
        old = self.services.get(key)
        if service is None:
            if old is not None:
                self._recount(old, None)
                del self.services[key]
                log.info("service.delete service=%s", key)
                self._publisher.delete(key)
            return
        if old is None or service != old:
            if self._unwarned:
                self._warn_unchecked(service)
            self._recount(old, service)
            self.services[key] = service
            log.debug("service.upsert service=%s frontends=%d", key, len(service.frontends))
            self._publisher.upsert(service)

    def _withdraw_conflicting(self, key: ServiceKey) -> None:
        """A refused service's last good state stays published unless it serves an address
        now found to be the node's or a pod's: then it goes, as it would hijack."""
        old = self.services.get(key)
        if old is None:
            return
        for f in old.frontends:
            if f.type is FrontendType.CLUSTER_IP and (
                f.address in self._node_ips or (f.address in self._endpoint_ips and not self._rules.in_network(f.address))
            ):
                self._recount(old, None)
                del self.services[key]
                log.warning("service.withdrawn service=%s address=%s", key, f.address)
                self._publisher.delete(key)
                return

    def _translate(self, key: ServiceKey, objs: list[tuple[ObjectRef, dict | bytes]]) -> Service | None:
        svc = endpoints = pod = None
        slices = []
        for ref, o in objs:
            kind = ref[0]
            if kind == "Service":
                svc = o
            elif kind == "EndpointSlice":
                slices.append((ref[2], o))
            elif kind == "Endpoints":
                endpoints = o
            elif kind == "Pod":
                pod = o
        if pod is not None:
            return translate.translate_pod(pod, self.node)
        if svc is None:
            return None
        if len(slices) > 1:
            slices.sort(key=lambda s: s[0])  # by name
        return translate.translate_service(
            svc, [o for _, o in slices], endpoints, self.node, self._proxy_name, self._rules, key
        )

    def counts(self) -> tuple[int, int, int]:
        """(services, frontends, backends) currently published."""
        # No lock: three reads of values _recount keeps (a full sync holds the lock for
        # seconds, and the agent asks every 0.2 s); a count may lag a refresh in progress.
        return len(self.services), self._frontends, self._backends

    def _recount(self, old: Service | None, new: Service | None) -> None:
        for service, sign in ((old, -1), (new, 1)):
            if service is not None:
                frontends = service.frontends
                self._frontends += sign * len(frontends)
                if len(frontends) == 1:  # most services (no generator for them)
                    self._backends += sign * len(frontends[0].backends)
                else:
                    self._backends += sign * sum([len(f.backends) for f in frontends])
