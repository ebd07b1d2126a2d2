"""Kubernetes objects (plain dicts, as the API serves them) -> the service model.

Sources hand raw Service, EndpointSlice, Endpoints and Pod objects here; plugins only ever
see the `kpr.model.Service` this module builds. The rules follow kube-proxy (and Cilium
where kube-proxy has no opinion, e.g. HostPort): see `translate_service` and
`translate_pod`.

Parsing and validation are one pass: each `_parse_*` function checks the fields it reads
and returns what translation needs, so `validate_object` costs no more than the reading
translation has to do anyway.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from array import array
from sys import intern
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from kpr.memory import PACKED, is_packed, unpack
from kpr.model import (
    BACKEND_LOCAL,
    BACKEND_TERMINATING,
    Backend,
    BackendState,
    Frontend,
    FrontendType,
    InvalidObject,
    NodeInfo,
    Protocol,
    Service,
    ServiceKey,
    backend_v4,
    backends_v4,
    place_id,
    place_ids,
    places,
)

log = logging.getLogger(__name__)
_ntoa = socket.inet_ntoa

# A Kubernetes object as the API serves it (JSON decoded); only checked fields are trusted.
KubeObject = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
# KEP-2433 topology-aware routing; the older name counts only when the newer one is absent.
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
# The pseudo-service a Pod's HostPorts live in is keyed "pod:<name>" so it can never
# collide with a real Service of the same name.
POD_KEY_PREFIX = "pod:"

_API_VERSIONS = {
    "Service": "v1",
    "Endpoints": "v1",
    "Pod": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
}
_PROTOCOLS = {p.value: p for p in Protocol}
_SERVICE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})
_NODE_PORT_TYPES = frozenset({"NodePort", "LoadBalancer"})
# "Global" is the pre-1.14 spelling of Cluster; old objects still carry it.
_EXTERNAL_POLICIES = {"Cluster": False, "Global": False, "Local": True}
_INTERNAL_POLICIES = {"Cluster": False, "Local": True}
_AFFINITIES = frozenset({"None", "ClientIP"})
_FAMILY_POLICIES = frozenset({"SingleStack", "PreferDualStack", "RequireDualStack"})
_IP_FAMILIES = {"IPv4": 4, "IPv6": 6}
_IP_MODES = frozenset({"VIP", "Proxy"})
# 0 marks FQDN slices, which carry no addresses a datapath can use.
_ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6, "FQDN": 0}
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
# Annotation values that leave zone hints off. kube-proxy takes any other value as on, not
# only "Auto": hints may come from another controller's heuristic (KEP-2433).
_TOPOLOGY_OFF = frozenset({"", "disabled", "Disabled"})
_TYPE_RANK = {t: i for i, t in enumerate(FrontendType)}

# (canonical text, family 4|6, integer value): the integer gives a numeric sort order.
_IP = tuple[str, int, int]
_NO_IP: _IP = ("", 0, 0)  # the "address" of an FQDN endpoint, which is never used


# --- addresses -------------------------------------------------------------------------


def _parse_ip_text(text: str) -> _IP | None:
    # Not cached: an address is parsed once per object read (parsing canonical IPv4 costs
    # about what a cache lookup did), and a cache of every endpoint address held 200k
    # entries, about 20 MB, through a 20k-service initial sync.
    # Most addresses are canonical IPv4, which libc parses 2x faster than ipaddress does;
    # the round trip through inet_ntop admits only text that is already canonical.
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        pass
    else:
        if socket.inet_ntop(socket.AF_INET, packed) == text:
            return text, 4, int.from_bytes(packed, "big")
    # Zone ids ("fe80::1%eth0") are accepted by ipaddress but never valid in the API.
    if "%" in text:
        return None
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        sloppy = _parse_sloppy_ipv4(text)
        if sloppy is None:
            return None
        ip = sloppy
    return ip.compressed, ip.version, int(ip)


def _parse_sloppy_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """Dotted quads with leading zeros, read as decimal.

    Objects created before Kubernetes 1.30 may hold such addresses; the API server and
    kube-proxy (netutils.ParseIPSloppy) accept them, so rejecting them here would drop
    services kube-proxy serves.
    """
    parts = text.split(".")
    if len(parts) != 4:
        return None
    octets = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3:
            return None
        octets.append(int(part))
    if max(octets) > 255:
        return None
    return ipaddress.IPv4Address(bytes(octets))


def _ip(value: object) -> _IP | None:
    """Parse an IP address field; None when it is not a string holding one."""
    if not isinstance(value, str):
        return None
    return _parse_ip_text(value)


@functools.lru_cache(maxsize=4096)
def _parse_cidr_text(text: str) -> tuple[str, int, int, int] | None:
    """(normalised CIDR, family, network as int, prefix length) or None."""
    text = text.strip()  # the API's validation lets whitespace padding through
    # A bare address is not a CIDR for the API either (Go's ParseCIDR wants the prefix).
    if "/" not in text or "%" in text:
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return str(net), net.version, int(net.network_address), net.prefixlen


@functools.lru_cache(maxsize=16)
def _node_addresses(addresses: tuple[str, ...]) -> dict[int, tuple[_IP, ...]]:
    """The node's addresses by family, parsed once per distinct NodeInfo.addresses."""
    by_family: dict[int, list[_IP]] = {4: [], 6: []}
    for text in addresses:
        parsed = _ip(text)
        if parsed is None:
            log.warning("ignoring node address %r: not an IP address", text)
        elif parsed not in by_family[parsed[1]]:
            by_family[parsed[1]].append(parsed)
    return {family: tuple(ips) for family, ips in by_family.items()}


_LOOPBACK: dict[int, _IP] = {4: _parse_ip_text("127.0.0.1"), 6: _parse_ip_text("::1")}  # type: ignore[dict-item]


# Why an address can be no service or endpoint address. Such an address in a manifest
# would redirect traffic the node never meant to hand a service: a ClusterIP 127.0.0.1
# captures every pod's own loopback port, 0.0.0.0 is the local host to connect(), and
# link-local, multicast and broadcast addresses belong to the segment, not to a service.
# IPv4-mapped IPv6 addresses share the maps' encoding of IPv4 (::ffff:a.b.c.d), so one
# would shadow the IPv4 address it maps. 240.0.0.0/4 stays allowed: some clusters (GKE's
# class E pod ranges) use it as private space.
_SPECIAL_NETWORKS = [
    ("127.0.0.0/8", "a loopback address"),
    ("0.0.0.0/8", "an unspecified address (0.0.0.0/8)"),
    ("169.254.0.0/16", "a link-local address (169.254.0.0/16)"),
    ("255.255.255.255/32", "the broadcast address"),
    ("224.0.0.0/4", "a multicast address (224.0.0.0/4)"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address (fe80::/10)"),
    ("ff00::/8", "a multicast address (ff00::/8)"),
    ("::ffff:0:0/96", "an IPv4-mapped IPv6 address (use the IPv4 address)"),
]

# (family, bits below the prefix, the prefix as int, what the network is)
def _special_table() -> tuple[tuple[int, int, int, str], ...]:
    out = []
    for text, what in _SPECIAL_NETWORKS:
        net = ipaddress.ip_network(text)
        shift = net.max_prefixlen - net.prefixlen
        out.append((net.version, shift, int(net.network_address) >> shift, what))
    return tuple(out)


_SPECIAL = _special_table()


def _special(ip: _IP) -> str:
    """Why `ip` cannot be a ClusterIP, external, LoadBalancer or endpoint address ("" if it can)."""
    family, value = ip[1], ip[2]
    for net_family, shift, prefix, what in _SPECIAL:
        if net_family == family and value >> shift == prefix:
            return what
    return ""


# IPv4 first octets under which _special may object: the endpoint loop tests this table
# and calls _special only on a hit, as nearly every address passes.
_SUSPECT_V4 = tuple(
    any(f == 4 and (p << s) >> 24 <= top <= ((p + 1 << s) - 1) >> 24 for f, s, p, _ in _SPECIAL)
    for top in range(256)
)


class AddressRules:
    """What validation checks addresses against beyond the object itself.

    `cluster_cidrs` is `service.clusterCIDR`, at most one network per family: a ClusterIP of
    a family with a network must lie in it, and be neither its network address nor (IPv4)
    its broadcast address, which no allocator hands out. A family without one is not
    range-checked (`checks_family` says which; the store warns). The default instance,
    NO_RULES, checks no range.
    """

    __slots__ = ("cluster_cidrs", "_ranges")

    def __init__(self, cluster_cidrs: tuple[str, ...] | list[str] = ()):
        # family -> (first address, last address, the network as text)
        ranges: dict[int, tuple[int, int, str]] = {}
        for text in cluster_cidrs:
            net = ipaddress.ip_network(text, strict=False)
            if net.version in ranges:
                raise ValueError(f"two IPv{net.version} networks in service.clusterCIDR")
            ranges[net.version] = (int(net.network_address), int(net.broadcast_address), str(net))
        self.cluster_cidrs = tuple(r[2] for r in ranges.values())
        self._ranges = ranges

    def checks_family(self, family: int) -> bool:
        return family in self._ranges

    def in_network(self, text: str) -> bool:
        """Whether `text` lies in the configured service.clusterCIDR of its family (False
        for a family without one, or for what is not an address)."""
        ip = _ip(text)
        limits = self._ranges.get(ip[1]) if ip is not None else None
        return limits is not None and limits[0] <= ip[2] <= limits[1]

    def limits(self, family: int) -> tuple[int, int] | None:
        """(first, last) address of the family's network as ints; None without one."""
        limits = self._ranges.get(family)
        return None if limits is None else (limits[0], limits[1])

    def may_claim(self, ip: _IP) -> bool:
        """Whether a ClusterIP could be `ip`: within the family's network, or no network."""
        limits = self._ranges.get(ip[1])
        return limits is None or limits[0] <= ip[2] <= limits[1]

    def cluster_ip_problem(self, ip: _IP) -> str:
        """Why `ip` cannot be a ClusterIP under these rules ("" if it can)."""
        if ip[1] == 6 or _SUSPECT_V4[ip[2] >> 24]:
            reason = _special(ip)
            if reason:
                return f"is {reason}"
        limits = self._ranges.get(ip[1])
        if limits is None:
            return ""
        first, last, text = limits
        if not first <= ip[2] <= last:
            return f"is not in service.clusterCIDR {text}"
        if ip[2] == first and last - first > 1:
            return f"is the network address of service.clusterCIDR {text}"
        if ip[1] == 4 and ip[2] == last and last - first > 1:
            return f"is the broadcast address of service.clusterCIDR {text}"
        return ""

    def __repr__(self) -> str:
        return f"AddressRules({list(self.cluster_cidrs)!r})"


NO_RULES = AddressRules()


@functools.lru_cache(maxsize=8)
def address_rules(cluster_cidrs: tuple[str, ...]) -> AddressRules:
    """The AddressRules of service.clusterCIDR, made once per distinct value."""
    return AddressRules(cluster_cidrs)


def clear_caches() -> None:
    """Forget parsed CIDRs and node addresses (benchmarks use this to measure a cold start)."""
    _parse_cidr_text.cache_clear()
    _node_addresses.cache_clear()


# --- object identity -------------------------------------------------------------------


def object_ref(obj: KubeObject) -> tuple[str, str, str]:
    """(kind, namespace, name) of any object; never raises, so it can name broken ones."""
    # `type() is dict` first: an ABC check costs ten times more, for every object of a sync.
    if type(obj) is not dict and not isinstance(obj, Mapping):
        return "", "default", ""
    meta = obj.get("metadata")
    if type(meta) is not dict and not isinstance(meta, Mapping):
        meta = {}
    kind = obj.get("kind")
    namespace = meta.get("namespace")
    name = meta.get("name")
    # Interned: refs are kept as keys by the source and the store, each from its own copy
    # of the object (packed objects unpack with strings of their own).
    # (_interned inline: 40k refs in a full sync of 20k services)
    return (
        (intern(kind) if kind.__class__ is str else kind) if isinstance(kind, str) else "",
        (intern(namespace) if namespace.__class__ is str else namespace) if isinstance(namespace, str) and namespace else "default",
        (intern(name) if name.__class__ is str else name) if isinstance(name, str) else "",
    )


def _interned(text: str) -> str:
    return intern(text) if type(text) is str else text


def service_key_of(obj: KubeObject, ref: tuple[str, str, str] | None = None) -> ServiceKey | None:
    """The ServiceKey an object contributes to, or None when it belongs to no service.
    `ref` is the object's object_ref when the caller has it already."""
    kind, namespace, name = ref if ref is not None else object_ref(obj)
    if not name:
        return None
    if kind in ("Service", "Endpoints"):
        return ServiceKey(namespace, name)
    if kind == "Pod":
        return ServiceKey(namespace, POD_KEY_PREFIX + name)
    if kind == "EndpointSlice":
        labels = obj["metadata"].get("labels")
        service = labels.get(SERVICE_NAME_LABEL) if type(labels) is dict or isinstance(labels, Mapping) else None
        if isinstance(service, str) and service:
            return ServiceKey(namespace, service)
    return None


def canonical_ip(text: object) -> str:
    """The canonical text of an IP address ("" when `text` is none), as the model writes it."""
    parsed = _ip(text)
    return parsed[0] if parsed is not None else ""


def _cluster_ip_texts(obj: KubeObject) -> tuple[str, list[Any]]:
    """(the field the manifest wrote, its values) for a Service's ClusterIPs; never raises."""
    spec = obj.get("spec") if type(obj) is dict or isinstance(obj, Mapping) else None
    if type(spec) is not dict and not isinstance(spec, Mapping):
        return "", []
    texts = spec.get("clusterIPs")
    if isinstance(texts, list) and texts:
        return "spec.clusterIPs", texts
    return "spec.clusterIP", [spec.get("clusterIP")]


def cluster_ips_of(obj: KubeObject) -> list[tuple[str, str]]:
    """(field, canonical address) of each ClusterIP a Service object claims; never raises.

    For the store's checks across objects, which need the claims of every service (also
    of ones translation would refuse); what is not an address is left out.
    """
    field, texts = _cluster_ip_texts(obj)
    out = []
    for i, text in enumerate(texts):
        parsed = _ip(text)
        if parsed is not None:
            out.append((f"{field}[{i}]" if field == "spec.clusterIPs" else field, parsed[0]))
    return out


def claimed_cluster_ips(obj: KubeObject) -> tuple[str, ...]:
    """The canonical addresses of cluster_ips_of without their fields: the store's index
    of claims, kept for every Service of a full sync. `obj` may be packed (kpr.memory.pack)
    when validation's reading of it is kept (`checked`); else it is a dict."""
    found = checked(obj)
    if found is not None and found.__class__ is _CheckedService:
        return found.claimed  # type: ignore[union-attr]
    obj = unpack(obj)
    return tuple(ip[0] for ip in map(_ip, _cluster_ip_texts(obj)[1]) if ip is not None)


def _list_or_empty(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def endpoint_addresses_of(obj: KubeObject, rules: AddressRules = NO_RULES) -> set[str]:
    """The canonical addresses an EndpointSlice, Endpoints or Pod lists as endpoints (a
    Pod: its pod IPs) that a ClusterIP could be under `rules`: with service.clusterCIDR
    set, only those inside it, so pod networks apart from it cost the store no index.
    Empty for other kinds. Never raises; what is not an address is left out. `obj` may be
    packed (kpr.memory.pack): a slice validation read is not read again."""
    found = checked(obj)
    if found is not None and found.__class__ is _Slice:  # a Service's reading is kept too
        # Checked: every endpoint has one address, of the slice's family.
        limits = rules.limits(found.family)
        if limits is not None:
            # e[1] is the address << 2 | its state: compared as it is, no tuple per endpoint.
            low, high = limits[0] << _ADDRESS_SHIFT, (limits[1] + 1) << _ADDRESS_SHIFT
            codes = found.codes
            if not codes or max(codes) < low or min(codes) >= high:
                return set()  # (the usual slice: its pods outside the service network)
            return {found.address(i) for i, code in enumerate(codes) if low <= code < high}
        return {found.address(i) for i in range(len(found.codes))}
    obj = unpack(obj)
    texts: list[Any] = []
    if not isinstance(obj, Mapping):
        return set()
    kind = obj.get("kind")
    # The raw texts first, then one pass that parses them: this runs for every endpoint
    # of a full sync (the store's index).
    if kind == "EndpointSlice":
        for endpoint in _list_or_empty(obj.get("endpoints")):
            addresses = endpoint.get("addresses") if isinstance(endpoint, dict) else None
            if isinstance(addresses, list):
                texts += addresses
    elif kind == "Endpoints":
        for subset in _list_or_empty(obj.get("subsets")):
            if isinstance(subset, dict):
                for field in ("addresses", "notReadyAddresses"):
                    for address in _list_or_empty(subset.get(field)):
                        if isinstance(address, dict):
                            texts.append(address.get("ip"))
    elif kind == "Pod":
        status = obj.get("status")
        if isinstance(status, dict):
            for entry in _list_or_empty(status.get("podIPs")):
                if isinstance(entry, dict):
                    texts.append(entry.get("ip"))
            texts.append(status.get("podIP"))
    parse = _parse_ip_text
    parsed = (parse(text) for text in texts if text.__class__ is str)
    if rules.cluster_cidrs:
        may_claim = rules.may_claim
        return {ip[0] for ip in parsed if ip is not None and may_claim(ip)}
    return {ip[0] for ip in parsed if ip is not None}


# --- validation helpers ----------------------------------------------------------------


def _fail(obj: Mapping[str, Any], reason: str) -> NoReturn:
    kind, namespace, name = object_ref(obj)  # type: ignore[arg-type]
    raise InvalidObject(f"{kind or 'object'} {namespace}/{name}: {reason}")


def _dict(obj: KubeObject, value: object, path: str) -> KubeObject:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(obj, f"{path}: must be an object, got {type(value).__name__}")
    return value


def _list(obj: KubeObject, value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(obj, f"{path}: must be a list, got {type(value).__name__}")
    return value


def _str(obj: KubeObject, value: object, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        _fail(obj, f"{path}: must be a string, got {type(value).__name__}")
    return value


def _bool(obj: KubeObject, value: object, path: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        _fail(obj, f"{path}: must be true or false, got {value!r}")
    return value


def _enum(
    obj: KubeObject, value: object, allowed: Mapping[str, Any] | frozenset[str], path: str
) -> str:
    """A string from `allowed`; absent or empty gives ""."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or value not in allowed:
        _fail(obj, f"{path}: {value!r} is not one of {', '.join(sorted(allowed))}")
    return value


def _port(obj: KubeObject, value: object, path: str, optional: bool = False) -> int:
    """A port number 1-65535; with optional, absent or 0 gives 0."""
    if optional and (value is None or (type(value) is int and value == 0)):
        return 0
    # bool is an int subclass; `true` is no port.
    if type(value) is not int or not 0 < value <= 65535:
        _fail(obj, f"{path}: {value!r} is not a port number (1-65535)")
    return value


def _protocol(obj: KubeObject, value: object, path: str) -> Protocol:
    if value is None or value == "":
        return Protocol.TCP
    proto = _PROTOCOLS.get(value) if isinstance(value, str) else None
    if proto is None:
        _fail(obj, f"{path}: unknown protocol {value!r} (TCP, UDP or SCTP)")
    return proto


def _address(obj: KubeObject, value: object, path: str) -> _IP:
    parsed = _ip(value)
    if parsed is None:
        _fail(obj, f"{path}: {value!r} is not an IP address")
    return parsed


def _service_address(obj: KubeObject, value: object, path: str) -> _IP:
    """An address traffic is sent to or delivered at: no loopback, unspecified, link-local,
    multicast or broadcast address (see _special)."""
    parsed = _address(obj, value, path)
    reason = _special(parsed)
    if reason:
        _fail(obj, f"{path}: {value} is {reason}")
    return parsed


def _string_map(obj: KubeObject, value: object, path: str) -> dict[str, str]:
    mapping = _dict(obj, value, path)
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            _fail(obj, f"{path}: {k!r}: keys and values must be strings")
    return mapping


def _check_common(obj: object) -> str:
    """Check apiVersion, kind and metadata; return the kind."""
    if not isinstance(obj, dict):
        raise InvalidObject(f"object is not a mapping: {type(obj).__name__}")
    kind = obj.get("kind")
    if not kind:
        _fail(obj, "kind missing")
    if not isinstance(kind, str) or kind not in _API_VERSIONS:
        raise InvalidObject(f"unsupported kind {kind}")
    api_version = obj.get("apiVersion")
    if not api_version:
        _fail(obj, "apiVersion missing")
    if api_version != _API_VERSIONS[kind]:
        _fail(obj, f"apiVersion: {api_version!r} is not {_API_VERSIONS[kind]} for {kind}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        _fail(obj, "metadata missing")
    name = meta.get("name")
    if not name or not isinstance(name, str):
        _fail(obj, "metadata.name missing")
    # (each checked by its call only when there: 40k objects in a full sync of 20k services)
    value = meta.get("namespace")
    if value is not None and value.__class__ is not str:
        _str(obj, value, "metadata.namespace")
    value = meta.get("labels")
    if value is not None:
        _string_map(obj, value, "metadata.labels")
    value = meta.get("annotations")
    if value is not None:
        _string_map(obj, value, "metadata.annotations")
    return kind


# --- Service ---------------------------------------------------------------------------


@dataclass(slots=True)
class _ServicePort:
    name: str
    protocol: Protocol
    port: int
    node_port: int


@dataclass(slots=True)
class _ServiceSpec:
    """What translation needs from a Service, already checked."""

    type: str
    cluster_ips: tuple[_IP, ...]  # empty for headless or not (yet) allocated
    families: tuple[int, ...]
    ports: tuple[_ServicePort, ...]
    external_ips: tuple[_IP, ...]
    lb_ips: tuple[_IP, ...]  # VIP-mode ingress IPs and spec.loadBalancerIP
    source_ranges: tuple[str, ...]
    external_local: bool
    internal_local: bool
    affinity_timeout: int
    health_check_node_port: int
    publish_not_ready: bool
    # The service asks for zone hints to be honoured (trafficDistribution or annotation).
    topology: bool


# The spec fields _parse_service reads after the ClusterIPs, families and ports: a spec with
# none of them (and no status or annotations) reads as their absence.
_RARE_SPEC_FIELDS = frozenset({
    "externalIPs", "loadBalancerIP", "loadBalancerSourceRanges", "sessionAffinity", "sessionAffinityConfig",
    "externalTrafficPolicy", "internalTrafficPolicy", "healthCheckNodePort", "allocateLoadBalancerNodePorts",
    "publishNotReadyAddresses", "externalName", "trafficDistribution",
})


def _check_family_policy(obj: KubeObject, get: Callable[[str], Any]) -> None:
    if get("ipFamilyPolicy") is not None:
        _enum(obj, get("ipFamilyPolicy"), _FAMILY_POLICIES, "spec.ipFamilyPolicy")


def _health_check_port(obj: KubeObject, get: Callable[[str], Any]) -> int:
    return _port(obj, get("healthCheckNodePort"), "spec.healthCheckNodePort", optional=True)


def _parse_service(obj: KubeObject, rules: AddressRules = NO_RULES) -> _ServiceSpec:
    # The fields allocation fills in (_ALLOCATED_FIELDS) are read again by _allocated_spec
    # for a reading brought up to date: a rule for them belongs in the helpers both call.
    spec = _dict(obj, obj.get("spec"), "spec")
    get = spec.get
    stype = _enum(obj, get("type"), _SERVICE_TYPES, "spec.type") or "ClusterIP"
    cluster_ips = _parse_cluster_ips(obj, spec, rules)
    families = _parse_families(obj, spec, cluster_ips)
    ports = tuple(
        _parse_service_port(obj, p, i) for i, p in enumerate(_list(obj, get("ports"), "spec.ports"))
    )
    annotations = obj["metadata"].get("annotations")
    if not annotations and _RARE_SPEC_FIELDS.isdisjoint(spec) and obj.get("status") is None:
        # None of the fields below (most manifests): what each gives when absent, without a
        # look-up of each (a sixth of this function's time).
        _check_family_policy(obj, get)
        return _ServiceSpec(stype, cluster_ips, families, ports, (), (), (), False, False, 0, 0, False, False)
    # Most services set few of the fields below; absent ones are skipped without calls,
    # which matters when a full sync parses every service of a large cluster.
    external_ips: tuple[_IP, ...] = ()
    if get("externalIPs") is not None:
        external_ips = tuple(
            _service_address(obj, text, f"spec.externalIPs[{i}]")
            for i, text in enumerate(_list(obj, get("externalIPs"), "spec.externalIPs"))
        )
    lb_ips: tuple[_IP, ...] = ()
    if get("loadBalancerIP") is not None or obj.get("status") is not None:
        lb_ips = _parse_lb_ips(obj, spec, stype)
    source_ranges: tuple[str, ...] = ()
    if get("loadBalancerSourceRanges") is not None or SOURCE_RANGES_ANNOTATION in (annotations or ()):
        source_ranges = _parse_source_ranges(obj, spec)
    affinity_timeout = 0
    if get("sessionAffinity") is not None or get("sessionAffinityConfig") is not None:
        affinity_timeout = _parse_affinity(obj, spec)
    external_policy = internal_policy = ""
    if get("externalTrafficPolicy") is not None:
        external_policy = _enum(
            obj, get("externalTrafficPolicy"), _EXTERNAL_POLICIES, "spec.externalTrafficPolicy"
        )
    if get("internalTrafficPolicy") is not None:
        internal_policy = _enum(
            obj, get("internalTrafficPolicy"), _INTERNAL_POLICIES, "spec.internalTrafficPolicy"
        )
    _check_family_policy(obj, get)
    health_check = 0
    if get("healthCheckNodePort") is not None:
        health_check = _health_check_port(obj, get)
    if get("allocateLoadBalancerNodePorts") is not None:
        _bool(obj, get("allocateLoadBalancerNodePorts"), "spec.allocateLoadBalancerNodePorts")
    publish = get("publishNotReadyAddresses")
    if publish is not None:
        _bool(obj, publish, "spec.publishNotReadyAddresses")
    if get("externalName") is not None:
        _str(obj, get("externalName"), "spec.externalName")
    # KEP-4444: any trafficDistribution (PreferClose, PreferSameZone, PreferSameNode) has the
    # EndpointSlice controller write zone hints, and unknown future values are not refused
    # here (the API server vets them); without it, the KEP-2433 annotation decides.
    topology = False
    if get("trafficDistribution") is not None:
        topology = bool(_str(obj, get("trafficDistribution"), "spec.trafficDistribution"))
    if annotations and not topology:
        mode = annotations.get(TOPOLOGY_MODE_ANNOTATION)
        if mode is None:
            mode = annotations.get(TOPOLOGY_HINTS_ANNOTATION, "")
        topology = mode not in _TOPOLOGY_OFF

    return _ServiceSpec(
        type=stype,
        cluster_ips=cluster_ips,
        families=families,
        ports=ports,
        external_ips=external_ips,
        lb_ips=lb_ips,
        source_ranges=source_ranges,
        external_local=_EXTERNAL_POLICIES.get(external_policy, False),
        internal_local=_INTERNAL_POLICIES.get(internal_policy, False),
        affinity_timeout=affinity_timeout,
        health_check_node_port=health_check,
        publish_not_ready=publish is True,
        topology=topology,
    )


def _parse_cluster_ips(obj: KubeObject, spec: KubeObject, rules: AddressRules) -> tuple[_IP, ...]:
    # Every Service of a full sync comes here twice (its manifest, then its allocated copy):
    # the two usual shapes, none written and one ClusterIP in both fields, are read inline;
    # anything else, or an address refused, goes the checking way, which names the field.
    cluster_ip, texts = spec.get("clusterIP"), spec.get("clusterIPs")
    if texts is None:
        if cluster_ip is None:
            return ()
        if cluster_ip.__class__ is str:
            # One written in clusterIP alone (manifests from a cluster's older exports)
            ip = _parse_ip_text(cluster_ip)  # (None for "None" and "" too)
            if ip is not None and not rules.cluster_ip_problem(ip):
                return (ip,)
    if cluster_ip.__class__ is str and texts.__class__ is list and len(texts) == 1 and texts[0] == cluster_ip:
        ip = _parse_ip_text(cluster_ip)  # (None for "None" too)
        if ip is not None and not rules.cluster_ip_problem(ip):
            return (ip,)
    return _checked_cluster_ips(obj, spec, rules)


def _checked_cluster_ips(obj: KubeObject, spec: KubeObject, rules: AddressRules) -> tuple[_IP, ...]:
    cluster_ip = _str(obj, spec.get("clusterIP"), "spec.clusterIP")
    first = None
    if cluster_ip not in ("", "None"):
        first = _address(obj, cluster_ip, "spec.clusterIP")
    texts = _list(obj, spec.get("clusterIPs"), "spec.clusterIPs")
    # Errors name the field the manifest wrote: clusterIP when it left clusterIPs out.
    field = "spec.clusterIPs"
    if not texts:
        texts = [cluster_ip] if cluster_ip else []
        field = "spec.clusterIP"
    elif cluster_ip and texts[0] != cluster_ip:
        _fail(obj, f"spec.clusterIP: {cluster_ip!r} differs from spec.clusterIPs[0] {texts[0]!r}")
    if texts == ["None"]:
        return ()
    ips: list[_IP] = []
    for i, text in enumerate(texts):
        if text == "None":
            _fail(obj, f"spec.clusterIPs[{i}]: 'None' must be the only entry")
        # clusterIPs[0] is clusterIP when both are set (checked above): parsed once.
        ip = first if i == 0 and first is not None and text == cluster_ip else _ip(text)
        problem = rules.cluster_ip_problem(ip) if ip is not None else ""
        if ip is None or problem:
            # The field path is made only for the message.
            path = f"spec.clusterIPs[{i}]" if field == "spec.clusterIPs" else field
            if ip is None:
                _fail(obj, f"{path}: {text!r} is not an IP address")
            _fail(obj, f"{path}: {text} {problem}")
        ips.append(ip)
    if len(ips) > 2 or (len(ips) == 2 and ips[0][1] == ips[1][1]):
        _fail(obj, "spec.clusterIPs: at most one address per IP family")
    return tuple(ips)


def _parse_families(
    obj: KubeObject, spec: KubeObject, cluster_ips: tuple[_IP, ...]
) -> tuple[int, ...]:
    # As for the ClusterIPs: none written, or one family that every ClusterIP is of, inline.
    names = spec.get("ipFamilies")
    if names is None:
        return tuple([ip[1] for ip in cluster_ips])
    if names.__class__ is list and len(names) == 1 and names[0].__class__ is str:
        family = _IP_FAMILIES.get(names[0])
        if family is not None and (not cluster_ips or len(cluster_ips) == 1 and cluster_ips[0][1] == family):
            return (family,)
    return _checked_families(obj, spec, cluster_ips)


def _checked_families(obj: KubeObject, spec: KubeObject, cluster_ips: tuple[_IP, ...]) -> tuple[int, ...]:
    families: list[int] = []
    for i, name in enumerate(_list(obj, spec.get("ipFamilies"), "spec.ipFamilies")):
        family = _IP_FAMILIES.get(name) if isinstance(name, str) else None
        if family is None:
            _fail(obj, f"spec.ipFamilies[{i}]: {name!r} is not IPv4 or IPv6")
        if family in families:
            _fail(obj, f"spec.ipFamilies[{i}]: {name} listed twice")
        families.append(family)
    if not families:
        return tuple(ip[1] for ip in cluster_ips)
    for i, ip in enumerate(cluster_ips):
        if ip[1] not in families:
            _fail(obj, f"spec.clusterIPs[{i}]: {ip[0]} is not of a family in spec.ipFamilies")
    return tuple(families)


def _parse_service_port(obj: KubeObject, port: object, i: int) -> _ServicePort:
    # Every port of every service of a full sync: a well-formed one is checked inline,
    # without a field path made per check; any doubt goes the checking way, which names it.
    if port.__class__ is dict:
        get = port.get  # type: ignore[attr-defined]
        name, protocol, number, node_port, target = get("name"), get("protocol"), get("port"), get("nodePort"), get("targetPort")
        if (
            (name is None or name.__class__ is str)
            and (protocol is None or protocol == "" or (protocol.__class__ is str and protocol in _PROTOCOLS))
            and number.__class__ is int and 0 < number <= 65535
            and (node_port is None or (node_port.__class__ is int and 0 <= node_port <= 65535))
            and (target is None or (target.__class__ is str and target != "") or (target.__class__ is int and 0 < target <= 65535))
        ):
            return _ServicePort(
                name=_interned(name) if name else "",
                protocol=_PROTOCOLS[protocol] if protocol else Protocol.TCP,
                port=number,
                node_port=node_port or 0,
            )
    return _checked_service_port(obj, port, i)


def _checked_service_port(obj: KubeObject, port: object, i: int) -> _ServicePort:
    path = f"spec.ports[{i}]"
    port = _dict(obj, port, path)
    target = port.get("targetPort")
    if isinstance(target, str):
        if not target:
            _fail(obj, f"{path}.targetPort: empty port name")
    elif target is not None:
        _port(obj, target, f"{path}.targetPort")
    return _ServicePort(
        name=_interned(_str(obj, port.get("name"), f"{path}.name")),  # kept by the model's frontends
        protocol=_protocol(obj, port.get("protocol"), f"{path}.protocol"),
        port=_port(obj, port.get("port"), f"{path}.port"),
        node_port=_port(obj, port.get("nodePort"), f"{path}.nodePort", optional=True),
    )


def _parse_lb_ips(obj: KubeObject, spec: KubeObject, stype: str) -> tuple[_IP, ...]:
    ips: list[_IP] = []
    status = _dict(obj, obj.get("status"), "status")
    balancer = _dict(obj, status.get("loadBalancer"), "status.loadBalancer")
    for i, ingress in enumerate(_list(obj, balancer.get("ingress"), "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        ingress = _dict(obj, ingress, path)
        _str(obj, ingress.get("hostname"), f"{path}.hostname")
        mode = _enum(obj, ingress.get("ipMode"), _IP_MODES, f"{path}.ipMode")
        text = _str(obj, ingress.get("ip"), f"{path}.ip")
        if not text:
            continue  # hostname-only: the balancer proxies, nothing for the node to do
        ip = _service_address(obj, text, f"{path}.ip")
        # KEP-1860: a Proxy-mode balancer rewrites the destination itself, so its IP must
        # not be captured on the node (that would bypass the balancer's own features).
        if mode != "Proxy":
            ips.append(ip)
    requested = _str(obj, spec.get("loadBalancerIP"), "spec.loadBalancerIP")
    if requested:
        ips.append(_service_address(obj, requested, "spec.loadBalancerIP"))
    # A stale status after a type change must not keep a VIP alive.
    return tuple(ips) if stype == "LoadBalancer" else ()


def _parse_source_ranges(obj: KubeObject, spec: KubeObject) -> tuple[str, ...]:
    ranges = _list(obj, spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    paths = [f"spec.loadBalancerSourceRanges[{i}]" for i in range(len(ranges))]
    annotations = obj["metadata"].get("annotations") or {}
    annotation = annotations.get(SOURCE_RANGES_ANNOTATION)
    # As in the API (service.GetLoadBalancerSourceRanges), the field wins over the annotation.
    if not ranges and annotation:
        ranges = [part for part in annotation.split(",") if part.strip()]
        paths = [f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"] * len(ranges)
    parsed = set()
    for text, path in zip(ranges, paths, strict=True):
        cidr = _parse_cidr_text(text) if isinstance(text, str) else None
        if cidr is None:
            _fail(obj, f"{path}: {text!r} is not a CIDR")
        parsed.add(cidr)
    return tuple(c[0] for c in sorted(parsed, key=lambda c: c[1:]))


def _parse_affinity(obj: KubeObject, spec: KubeObject) -> int:
    affinity = _enum(obj, spec.get("sessionAffinity"), _AFFINITIES, "spec.sessionAffinity")
    config = _dict(obj, spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _dict(obj, config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is not None and (
        type(timeout) is not int or not 0 < timeout <= MAX_AFFINITY_TIMEOUT
    ):
        path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        _fail(obj, f"{path}: {timeout!r} is not 1-{MAX_AFFINITY_TIMEOUT}")
    if affinity != "ClientIP":
        return 0
    return timeout or DEFAULT_AFFINITY_TIMEOUT


# --- EndpointSlice and Endpoints -------------------------------------------------------

# (port name, protocol, port number or 0 when the slice does not restrict ports)
_EndpointPort = tuple[str, Protocol, int]
# Endpoint conditions before the service's publishNotReadyAddresses is applied:
# (canonical address, the address as int << 2 | _READY | _DRAINING | _UNUSABLE, node name,
# zone, hints.forZones names); the family is the slice's. What _Slice.endpoints makes
# from the parse's columns.
_SliceEndpoint = tuple[str, int, str, str, tuple[str, ...]]
# A slice endpoint's code (see _Slice): the address above its place (16 bits) and state.
_ADDRESS_SHIFT = 18
_READY = 2  # ready: active
_DRAINING = 1  # not ready, serving and terminating: picked only when no ready one remains
_UNUSABLE = 0
# An endpoint's conditions as most are written: ready, nothing else said.
_READY_ONLY = {"ready": True}


@dataclass(slots=True)
class _Slice:
    """A slice's parse, its endpoints in columns: parsed slices are kept for a whole pass
    (translate.checked), 20k of them at once in a full sync of 20k services. An endpoint
    as a tuple, its address as json's string and its code as an int took 176 bytes, 35 MB
    at 200k endpoints, freed only after translation, in holes the model's objects (of
    other sizes) did not fill; in columns it takes 8 bytes (IPv4), and the address string
    dies with the file's dicts."""

    family: int  # 0 for FQDN
    ports: tuple[_EndpointPort, ...]
    # Per endpoint: the address << _ADDRESS_SHIFT | the index of its (node name, zone) in
    # the model's table of places << 2 | its state (an array of u64 for IPv4): by address
    # when sorted.
    codes: Sequence[int]
    # Per endpoint (node name, zone), only when some pair is not in the model's table (full,
    # or names longer than Kubernetes allows: model.place_id); their place in codes is 0.
    pairs: tuple[tuple[str, str], ...] | None
    # Per endpoint: the canonical address; None for IPv4, printed from the code when asked.
    texts: tuple[str, ...] | None
    # Per endpoint: hints.forZones names; None when no endpoint has any.
    hints: tuple[tuple[str, ...], ...] | None
    # Some endpoint lists more than one address (only the first is kept).
    multi: bool = False
    # Set when validation keeps the parse (translate.checked): the slice's ref and the key
    # of its service.
    ref: tuple[str, str, str] | None = None
    key: ServiceKey | None = None

    def address(self, i: int) -> str:
        """The canonical address of endpoint i."""
        texts = self.texts
        if texts is not None:
            return texts[i]
        return _ntoa((self.codes[i] >> _ADDRESS_SHIFT).to_bytes(4, "big"))

    def place(self, i: int) -> tuple[str, str]:
        """(node name, zone) of endpoint i."""
        pairs = self.pairs
        return pairs[i] if pairs is not None else places[self.codes[i] >> 2 & 0xFFFF]

    @property
    def endpoints(self) -> tuple[_SliceEndpoint, ...]:
        """The endpoints as (address, address << 2 | state, node name, zone, hints) tuples."""
        codes, hints = self.codes, self.hints
        return tuple(
            (self.address(i), codes[i] >> _ADDRESS_SHIFT << 2 | codes[i] & 3, *self.place(i),
             hints[i] if hints is not None else ())
            for i in range(len(codes))
        )


def _parse_slice(obj: KubeObject) -> _Slice:
    address_type = obj.get("addressType")
    family = _ADDRESS_TYPES.get(address_type) if isinstance(address_type, str) else None
    if family is None:
        _fail(obj, f"addressType: {address_type!r} is not one of IPv4, IPv6, FQDN")
    ports: list[_EndpointPort] = []
    for i, port in enumerate(_list(obj, obj.get("ports"), "ports")):
        # Every slice of a full sync: a well-formed port is checked inline, without the field
        # paths made for each check; any doubt goes the checking way, which names the field.
        if port.__class__ is dict:
            name, protocol, number = port.get("name"), port.get("protocol"), port.get("port")
            if (
                (name is None or name.__class__ is str)
                and (protocol is None or protocol == "" or (protocol.__class__ is str and protocol in _PROTOCOLS))
                and (number is None or (number.__class__ is int and 0 <= number <= 65535))
            ):
                ports.append((name or "", _PROTOCOLS[protocol] if protocol else Protocol.TCP, number or 0))
                continue
        ports.append(_checked_slice_port(obj, port, i))
    return _Slice(family, tuple(ports), *_parse_slice_endpoints(obj, family))


def _checked_slice_port(obj: KubeObject, port: object, i: int) -> _EndpointPort:
    port = _dict(obj, port, f"ports[{i}]")
    return (
        _str(obj, port.get("name"), f"ports[{i}].name"),
        _protocol(obj, port.get("protocol"), f"ports[{i}].protocol"),
        _port(obj, port.get("port"), f"ports[{i}].port", optional=True),
    )


def _parse_slice_endpoints(
    obj: KubeObject, family: int
) -> tuple[Sequence[int], tuple[tuple[str, str], ...] | None, tuple[str, ...] | None, tuple[tuple[str, ...], ...] | None, bool]:
    """The endpoints' columns (see _Slice: codes, pairs, texts, hints), and whether any
    endpoint lists more than one address."""
    # The hot loop of a full sync (every endpoint of every slice): checks are inline and
    # cheap; on any doubt _endpoint_error re-examines the endpoint and names the field.
    raw = _list(obj, obj.get("endpoints"), "endpoints")
    codes: list[int] = []
    # Endpoints whose (node name, zone) is not in the table yet, with that pair: added once
    # the whole slice is read (below).
    new_places: list[tuple[int, tuple[str, str]]] = []
    known_place = place_ids.get
    texts: list[str] | None = None if family == 4 else []
    all_hints: list[tuple[str, ...]] | None = None  # made at the first endpoint with hints
    multi = False
    parse_ip = _parse_ip_text
    suspect = _SUSPECT_V4
    pton, ntop, from_bytes, af_inet = socket.inet_pton, socket.inet_ntop, int.from_bytes, socket.AF_INET
    shift = _ADDRESS_SHIFT
    for i, endpoint in enumerate(raw):
        if not isinstance(endpoint, dict):
            _endpoint_error(obj, endpoint, i, family)
        addresses = endpoint.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            _endpoint_error(obj, endpoint, i, family)
        text = addresses[0]
        if family == 4:
            # Canonical IPv4 inline (nearly every endpoint): libc's parse, and its print
            # equal to the text; anything else goes through _parse_ip_text.
            try:
                packed = pton(af_inet, text)
                value = from_bytes(packed, "big") if ntop(af_inet, packed) == text else -1
            except (OSError, ValueError, TypeError):
                value = -1
            if value < 0:
                first = parse_ip(text) if isinstance(text, str) else None
                if first is None or first[1] != 4:
                    _endpoint_error(obj, endpoint, i, family)
                value = first[2]
            if suspect[value >> 24] and _special((text, 4, value)):
                _endpoint_error(obj, endpoint, i, family)
            if len(addresses) > 1:
                _check_addresses(obj, addresses, i, family)
                multi = True
        elif family:
            first = parse_ip(text) if isinstance(text, str) else None
            if first is None or first[1] != family:
                _endpoint_error(obj, endpoint, i, family)
            if _special(first):
                _endpoint_error(obj, endpoint, i, family)
            if len(addresses) > 1:
                _check_addresses(obj, addresses, i, family)
                multi = True
            value = first[2]
            texts.append(first[0])  # type: ignore[union-attr]
        else:
            value = 0
            texts.append("")  # type: ignore[union-attr]
        conditions = endpoint.get("conditions")
        if conditions == _READY_ONLY and conditions["ready"] is True:  # (1 == True: a bool only)
            usable = _READY  # (most endpoints: the three reads below for one answer)
        elif conditions:
            if conditions.__class__ is not dict:
                _endpoint_error(obj, endpoint, i, family)
            r = conditions.get("ready")
            s = conditions.get("serving")
            t = conditions.get("terminating")
            if (
                (r is not None and r.__class__ is not bool)
                or (s is not None and s.__class__ is not bool)
                or (t is not None and t.__class__ is not bool)
            ):
                _endpoint_error(obj, endpoint, i, family)
            # nil ready means ready; nil serving defers to ready; nil terminating means not.
            if r is not False:
                usable = _READY
            else:
                usable = _DRAINING if s is True and t is True else _UNUSABLE
        elif conditions is None or conditions == {}:
            usable = _READY
        else:
            _endpoint_error(obj, endpoint, i, family)
        node_name = endpoint.get("nodeName") or ""
        zone = endpoint.get("zone") or ""
        if node_name.__class__ is not str or zone.__class__ is not str:
            _endpoint_error(obj, endpoint, i, family)
        hints = endpoint.get("hints")
        if hints is not None:
            zone_hints = _zone_hints(obj, hints, i)
            if zone_hints:
                if all_hints is None:
                    all_hints = [()] * i
                all_hints.append(zone_hints)
            elif all_hints is not None:
                all_hints.append(())
        elif all_hints is not None:
            all_hints.append(())
        place = known_place((node_name, zone))
        if place is None:
            # Kept by the model's backends: one string per node and zone, not one per
            # endpoint (objects are parsed from packed bytes, each with strings of its own).
            new_places.append((i, (intern(node_name), intern(zone))))
            place = 0
        codes.append(value << shift | place << 2 | usable)
    # New places only for a slice read to its end: the model's table never gives an entry
    # back, so a slice refused at a later endpoint (read again every pass) must add none.
    unplaced: list[tuple[int, tuple[str, str]]] = []
    for i, pair in new_places:
        place = place_id(*pair)
        if place is None:
            unplaced.append((i, pair))
        else:
            codes[i] |= place << 2
    pairs: tuple[tuple[str, str], ...] | None = None
    if unplaced:
        # Every endpoint's pair, as some are not in the table.
        table = places
        listed = [table[c >> 2 & 0xFFFF] for c in codes]
        for i, pair in unplaced:
            listed[i] = pair
        pairs = tuple(listed)
    return (
        array("Q", codes) if family == 4 else tuple(codes),
        pairs,
        None if texts is None else tuple(texts),
        tuple(all_hints) if all_hints is not None else None,
        multi,
    )


def _zone_hints(obj: KubeObject, hints: object, i: int) -> tuple[str, ...]:
    """The zone names of one endpoint's hints.forZones; () when it names none."""
    # Every endpoint of a service with trafficDistribution has hints, so this is part of the
    # hot loop too: checks are inline and _zone_hints_error names the field on any doubt.
    if hints.__class__ is dict:
        entries = hints.get("forZones")  # type: ignore[attr-defined]
        if entries.__class__ is list:
            names = []
            for entry in entries:
                name = entry.get("name") if entry.__class__ is dict else None
                # The API requires a name; an empty one would read as a hint for an
                # unknown zone.
                if name.__class__ is not str or not name:
                    break
                names.append(name)
            else:
                return tuple(names)
        elif entries is None:
            return ()
    _zone_hints_error(obj, hints, i)


def _zone_hints_error(obj: KubeObject, hints: object, i: int) -> NoReturn:
    """Raise the precise error for hints the fast path found wrong."""
    path = f"endpoints[{i}].hints"
    hints = _dict(obj, hints, path)
    for j, entry in enumerate(_list(obj, hints.get("forZones"), f"{path}.forZones")):
        entry_path = f"{path}.forZones[{j}]"
        if not _str(obj, _dict(obj, entry, entry_path).get("name"), f"{entry_path}.name"):
            _fail(obj, f"{entry_path}.name: must not be empty")
    _fail(obj, f"{path}: invalid")  # unreachable unless the fast path and this disagree


def _check_addresses(obj: KubeObject, addresses: list[Any], i: int, family: int) -> None:
    for j, text in enumerate(addresses):
        parsed = _ip(text)
        if parsed is None or parsed[1] != family:
            _fail(obj, f"endpoints[{i}].addresses[{j}]: {text!r} is not an IPv{family} address")
        reason = _special(parsed)
        if reason:
            _fail(obj, f"endpoints[{i}].addresses[{j}]: {text} is {reason}")


def _endpoint_error(obj: KubeObject, endpoint: object, i: int, family: int) -> NoReturn:
    """Raise the precise error for an endpoint the fast path found wrong."""
    path = f"endpoints[{i}]"
    if not isinstance(endpoint, dict):
        _fail(obj, f"{path}: must be an object")
    addresses = endpoint.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        _fail(obj, f"{path}.addresses: must be a non-empty list")
    if family:
        _check_addresses(obj, addresses, i, family)
    conditions = _dict(obj, endpoint.get("conditions"), f"{path}.conditions")
    for name in ("ready", "serving", "terminating"):
        _bool(obj, conditions.get(name), f"{path}.conditions.{name}")
    _str(obj, endpoint.get("nodeName"), f"{path}.nodeName")
    _str(obj, endpoint.get("zone"), f"{path}.zone")
    _fail(obj, f"{path}: invalid")  # unreachable unless the fast path and this disagree


@dataclass(slots=True)
class _Subset:
    ready: list[tuple[_IP, str]]  # (address, node name)
    not_ready: list[tuple[_IP, str]]
    ports: list[_EndpointPort]


def _parse_endpoints(obj: KubeObject) -> list[_Subset]:
    subsets = []
    for i, subset in enumerate(_list(obj, obj.get("subsets"), "subsets")):
        path = f"subsets[{i}]"
        subset = _dict(obj, subset, path)
        ports: list[_EndpointPort] = []
        for j, port in enumerate(_list(obj, subset.get("ports"), f"{path}.ports")):
            port = _dict(obj, port, f"{path}.ports[{j}]")
            ports.append(
                (
                    _str(obj, port.get("name"), f"{path}.ports[{j}].name"),
                    _protocol(obj, port.get("protocol"), f"{path}.ports[{j}].protocol"),
                    _port(obj, port.get("port"), f"{path}.ports[{j}].port"),
                )
            )
        subsets.append(
            _Subset(
                ready=_parse_endpoint_addresses(obj, subset, "addresses", path),
                not_ready=_parse_endpoint_addresses(obj, subset, "notReadyAddresses", path),
                ports=ports,
            )
        )
    return subsets


def _parse_endpoint_addresses(
    obj: KubeObject, subset: KubeObject, field: str, path: str
) -> list[tuple[_IP, str]]:
    out = []
    for i, address in enumerate(_list(obj, subset.get(field), f"{path}.{field}")):
        address = _dict(obj, address, f"{path}.{field}[{i}]")
        ip = _service_address(obj, address.get("ip"), f"{path}.{field}[{i}].ip")
        out.append((ip, _str(obj, address.get("nodeName"), f"{path}.{field}[{i}].nodeName")))
    return out


# --- Pod -------------------------------------------------------------------------------


@dataclass(slots=True)
class _HostPort:
    name: str
    protocol: Protocol
    container_port: int
    host_port: int
    host_ip: _IP | None  # None binds every node address


@dataclass(slots=True)
class _Pod:
    node_name: str
    host_network: bool
    phase: str
    pod_ips: dict[int, _IP]  # the first pod IP of each family
    host_ports: list[_HostPort]


def _parse_pod(obj: KubeObject) -> _Pod:
    spec = _dict(obj, obj.get("spec"), "spec")
    status = _dict(obj, obj.get("status"), "status")
    host_ports = _container_host_ports(obj, spec, "containers", sidecars_only=False)
    host_ports += _container_host_ports(obj, spec, "initContainers", sidecars_only=True)

    pod_ips: dict[int, _IP] = {}
    for i, entry in enumerate(_list(obj, status.get("podIPs"), "status.podIPs")):
        ip = _service_address(
            obj, _dict(obj, entry, f"status.podIPs[{i}]").get("ip"), f"status.podIPs[{i}].ip"
        )
        pod_ips.setdefault(ip[1], ip)
    primary = _str(obj, status.get("podIP"), "status.podIP")
    if primary:
        ip = _service_address(obj, primary, "status.podIP")
        pod_ips.setdefault(ip[1], ip)
    host_ip = _str(obj, status.get("hostIP"), "status.hostIP")
    if host_ip:
        _address(obj, host_ip, "status.hostIP")

    return _Pod(
        node_name=_str(obj, spec.get("nodeName"), "spec.nodeName"),
        host_network=bool(_bool(obj, spec.get("hostNetwork"), "spec.hostNetwork")),
        phase=_str(obj, status.get("phase"), "status.phase"),
        pod_ips=pod_ips,
        host_ports=host_ports,
    )


def _container_host_ports(
    obj: KubeObject, spec: KubeObject, field: str, sidecars_only: bool
) -> list[_HostPort]:
    out = []
    for i, container in enumerate(_list(obj, spec.get(field), f"spec.{field}")):
        path = f"spec.{field}[{i}]"
        container = _dict(obj, container, path)
        # Of init containers only sidecars (restartPolicy Always) keep running and serving.
        serving = not sidecars_only or container.get("restartPolicy") == "Always"
        for j, port in enumerate(_list(obj, container.get("ports"), f"{path}.ports")):
            parsed = _parse_container_port(obj, port, f"{path}.ports[{j}]")
            if parsed is not None and serving:
                out.append(parsed)
    return out


def _parse_container_port(obj: KubeObject, port: object, path: str) -> _HostPort | None:
    port = _dict(obj, port, path)
    container_port = _port(obj, port.get("containerPort"), f"{path}.containerPort")
    host_port = _port(obj, port.get("hostPort"), f"{path}.hostPort", optional=True)
    protocol = _protocol(obj, port.get("protocol"), f"{path}.protocol")
    name = _str(obj, port.get("name"), f"{path}.name")
    host_ip_text = _str(obj, port.get("hostIP"), f"{path}.hostIP")
    host_ip = _address(obj, host_ip_text, f"{path}.hostIP") if host_ip_text else None
    if not host_port:
        return None
    if host_ip is not None and host_ip[2] == 0:  # 0.0.0.0 or ::, i.e. unset
        host_ip = None
    return _HostPort(name, protocol, container_port, host_port, host_ip)


# --- validation entry point ------------------------------------------------------------

_PARSERS = {
    "Service": _parse_service,
    "EndpointSlice": _parse_slice,
    "Endpoints": _parse_endpoints,
    "Pod": _parse_pod,
}


def validate_object(
    obj: KubeObject, rules: AddressRules = NO_RULES, ref: tuple[str, str, str] | None = None
) -> Checked | None:
    """Raise InvalidObject("<kind> <ns>/<name>: <field>: <reason>") for an unusable object.

    `rules` adds the checks that depend on configuration (ClusterIPs in service.clusterCIDR).
    Returns what was read of a Service or an EndpointSlice (None for other kinds), for
    `remember_checked`; `ref`, the object's object_ref when the caller made it already, is
    kept in it.
    """
    kind = _check_common(obj)
    if kind == "Service":
        spec = _parse_service(obj, rules)
        ref = ref if ref is not None else object_ref(obj)
        meta = obj["metadata"]
        return _CheckedService(spec, ref, service_key_of(obj, ref), rules, meta.get("labels"), meta.get("annotations"),
                               _written_allocation(obj, spec))
    if kind == "EndpointSlice":
        parsed = _parse_slice(obj)
        # Every FQDN slice and any endpoint with more than one address take the long way:
        # the store's index reads every address, the parse keeps the first only.
        if not parsed.family or parsed.multi:
            return None
        parsed.ref = ref = ref if ref is not None else object_ref(obj)
        parsed.key = service_key_of(obj, ref)
        return parsed
    _PARSERS[kind](obj)
    return None


# --- parse once ------------------------------------------------------------------------


@dataclass(slots=True)
class _CheckedService:
    """A Service as validation read it: what translation and the store's index need."""

    spec: _ServiceSpec
    ref: tuple[str, str, str] | None
    key: ServiceKey | None
    # The rules it was checked under: translation under other rules reads it again.
    rules: AddressRules
    labels: Mapping[str, str] | None
    annotations: Mapping[str, str] | None
    # The spec keys allocation fills into a Service that writes its one IPv4 ClusterIP
    # (_written_allocation); None for any other.
    written: tuple[str, ...] | None = None

    @property
    def claimed(self) -> tuple[str, ...]:
        """claimed_cluster_ips of the object (valid: each text is the address it parses to)."""
        return tuple([ip[0] for ip in self.spec.cluster_ips])


def written_spec(ip: str) -> dict[str, Any]:
    """The spec fields allocation gives a ClusterIP Service whose manifest writes `ip`, one
    canonical IPv4 ClusterIP, with families and policy left out or single-stack IPv4 (the
    shape _written_allocation reads), in the allocated Service's order: the one definition of
    what kpr.allocator's written way fills in and of what written_allocation hands to
    kpr.memory.over (a source's short way), which must give the same object."""
    return {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}


# The keys written_spec fills in besides clusterIP (the written one), in its order.
_WRITTEN_KEYS = tuple([k for k in written_spec("") if k != "clusterIP"])


def _written_allocation(obj: KubeObject, parsed: _ServiceSpec) -> tuple[str, ...] | None:
    """For a ClusterIP Service (validated, read as `parsed`) whose manifest writes one IPv4
    ClusterIP, in clusterIP alone or in both fields, with families and policy left out or
    single-stack IPv4 (manifests exported from a cluster): the spec keys allocation changes,
    in spec order, as kpr.allocator's written way fills them in (clusterIPs, ipFamilies,
    ipFamilyPolicy; clusterIP is the written one) and as kpr.memory.pack_over would find
    them. The reading stands for the allocated Service (checked_after_allocation returns it):
    a source allocates such a Service without unpacking it (`written_allocation`). None for
    anything else. (Kept until the store translates the Service: nothing made per Service
    for the usual manifest, which leaves all three out.)"""
    cluster_ips = parsed.cluster_ips
    if parsed.type != "ClusterIP" or len(cluster_ips) != 1 or cluster_ips[0][1] != 4:
        return None
    get = obj["spec"].get
    ip = cluster_ips[0][0]
    listed, names, policy = get("clusterIPs"), get("ipFamilies"), get("ipFamilyPolicy")
    if listed is None and names is None and policy is None:
        return _WRITTEN_KEYS if get("clusterIP") == ip else None
    if (
        get("clusterIP") != ip
        or not (listed is None or listed == [ip])
        or not (names is None or names == ["IPv4"])
        or not (policy is None or policy == "SingleStack")
    ):
        return None
    # (the keys written already keep their places: only those absent are appended)
    keys = tuple([k for k, v in zip(_WRITTEN_KEYS, (listed, names, policy)) if v is None])
    return _WRITTEN_KEYS if keys == _WRITTEN_KEYS else keys or None


def written_allocation(packed: object) -> tuple[str, tuple[str, ...], tuple[Any, ...]] | None:
    """For a Service validation read as `packed` (packed bytes) and found of the shape
    _written_allocation describes: (its ClusterIP, the spec keys allocation changes, their new
    values), what kpr.memory.over takes; None for any other object, an Over among them
    (memory.over builds on packed bytes only). The one test of `packed`'s type: callers pass
    what they hold (kpr.sources.files, once per Service of a pass)."""
    found = _checked.get(packed) if packed.__class__ is bytes else None  # type: ignore[call-overload]
    keys = found.written if found.__class__ is _CheckedService else None  # type: ignore[union-attr]
    if keys is None:
        return None
    ip = found.spec.cluster_ips[0][0]  # type: ignore[union-attr]
    filled = written_spec(ip)
    return ip, keys, tuple([filled[k] for k in keys])


# The spec fields an allocation fills in (kpr.allocator): the rest of an allocated Service is
# the manifest's, object for object.
_ALLOCATED_FIELDS = frozenset({"clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "healthCheckNodePort", "ports"})


def checked_after_allocation(before: object, read: KubeObject, allocated: KubeObject) -> Checked | None:
    """What validation read of a Service packed as `before` (`read`, unpacked), brought up to
    date for `allocated`, the same Service with the values allocation filled in; None when
    allocation changed anything else, or when the values it filled in do not read cleanly:
    translation then reads the allocated object itself (and names what is wrong).

    Allocation copies what it changes and nothing else: everything but the allocated spec
    fields (ClusterIPs, families, policy, health check port, the ports' nodePorts) must be the
    same object as in `read`. Those fields are read again as _parse_service reads them (the
    ClusterIPs against the rules validation used), the rest of the reading is kept: reading a
    whole Service again was a tenth of an initial sync whose ClusterIPs are picked."""
    found = checked(before)
    if found is None or found.__class__ is not _CheckedService:
        return None
    if len(allocated) != len(read):
        return None
    get = read.get
    for k, v in allocated.items():
        if v is not get(k) and k != "spec":
            return None
    after, spec = allocated.get("spec"), get("spec")
    if after.__class__ is not dict or spec.__class__ is not dict or not spec.keys() <= after.keys():
        return None
    get = spec.get
    changed = False
    for k, v in after.items():
        if v is not get(k):
            if k not in _ALLOCATED_FIELDS:
                return None
            changed = True
    if not changed:
        return found
    try:
        parsed = _allocated_spec(allocated, after, spec, found.spec, found.rules)  # type: ignore[union-attr]
    except InvalidObject:
        return None
    if parsed is None:
        return None
    if parsed is found.spec:  # type: ignore[union-attr]
        return found
    return _CheckedService(parsed, found.ref, found.key, found.rules, found.labels, found.annotations)  # type: ignore[union-attr]


def _allocated_spec(
    obj: KubeObject, after: KubeObject, before: KubeObject, parsed: _ServiceSpec, rules: AddressRules
) -> _ServiceSpec | None:
    """`parsed`, the reading of a Service's spec `before`, for `after`, the same spec with
    allocation's fields (_ALLOCATED_FIELDS) changed: those read as _parse_service reads them
    (raising InvalidObject as it would), the rest kept. None when the ports changed other
    than one by one in place."""
    get = after.get
    cluster_ips, read_ips = parsed.cluster_ips, None
    if len(cluster_ips) == 1:
        # A ClusterIP written in the manifest, filled into the other field: read already
        # (under these rules), not parsed again.
        text, listed = get("clusterIP"), get("clusterIPs")
        if text == cluster_ips[0][0] and listed.__class__ is list and len(listed) == 1 and listed[0] == text:
            read_ips = cluster_ips
    cluster_ips = read_ips or _parse_cluster_ips(obj, after, rules)
    families = _parse_families(obj, after, cluster_ips)
    _check_family_policy(obj, get)
    health_check = parsed.health_check_node_port
    if get("healthCheckNodePort") is not before.get("healthCheckNodePort"):
        health_check = _health_check_port(obj, get)
    ports = parsed.ports
    new_ports, old_ports = get("ports"), before.get("ports")
    if new_ports is not old_ports:
        if new_ports.__class__ is not list or old_ports.__class__ is not list or len(new_ports) != len(old_ports):
            return None
        ports = tuple(
            ports[i] if port is old_ports[i] else _parse_service_port(obj, port, i) for i, port in enumerate(new_ports)
        )
    p = parsed
    if ports is p.ports and health_check == p.health_check_node_port and cluster_ips == p.cluster_ips and families == p.families:
        # What allocation filled in reads as the manifest did (a written ClusterIP, its
        # clusterIPs, families and policy added): the reading stands, its strings the model's.
        return p
    # (positional: _ServiceSpec's field order)
    return _ServiceSpec(p.type, cluster_ips, families, ports, p.external_ips, p.lb_ips, p.source_ranges, p.external_local,
                        p.internal_local, p.affinity_timeout, health_check, p.publish_not_ready, p.topology)


def share_cluster_ip_texts(packed: object, obj: KubeObject) -> None:
    """Put the ClusterIP strings validation read of the Service packed as `packed` (those the
    model's frontends keep) into `obj`, a copy unpacked from it, in place of its own equal
    ones: what keeps obj's (the allocator's records) then shares them (20k strings, 1.1 MB, at
    20k services with written ClusterIPs). Only equal strings are swapped."""
    found = _checked.get(packed) if is_packed(packed) else None  # type: ignore[call-overload]
    # (none read: a manifest that leaves its ClusterIP to allocation, the usual one)
    spec = obj.get("spec") if found.__class__ is _CheckedService and found.spec.cluster_ips else None  # type: ignore[union-attr]
    if spec.__class__ is not dict:
        return
    texts = {ip[0]: ip[0] for ip in found.spec.cluster_ips}  # type: ignore[union-attr]
    text = spec.get("clusterIP")  # type: ignore[union-attr]
    if text.__class__ is str and text in texts:
        spec["clusterIP"] = texts[text]  # type: ignore[index]
    listed = spec.get("clusterIPs")  # type: ignore[union-attr]
    if listed.__class__ is list:
        for i, text in enumerate(listed):
            if text.__class__ is str and text in texts:
                listed[i] = texts[text]


# Services and EndpointSlices as validation read them, by the packed bytes (kpr.memory.pack) a source
# keeps and hands to the store: the store translates the same bytes moments later (a full
# sync), and reading every slice twice (and unpacking it twice more) was about a quarter of
# a full sync. Filled by a source's pass and emptied at its end (`forget_checked`), so the
# entries live no longer than one pass; the store takes each one when it translates it.
_checked: dict[object, _Slice | _CheckedService] = {}
# What validate_object returns for remember_checked: a Service or an EndpointSlice as read,
# with its ref and its service's key.
Checked = _Slice | _CheckedService


def remember_checked(packed: object, checked: Checked | None, ref: tuple[str, str, str] | None = None) -> None:
    """Keep what validate_object read of the object packed as `packed`, until the store
    translates those bytes or the source's pass ends. `ref`, the object's object_ref as the
    source keeps it, is then the store's too (one tuple, not one per holder)."""
    cls = packed.__class__
    if checked is not None and cls in PACKED:  # is_packed, inline: 60k calls a sync
        if ref is not None and ref == checked.ref:
            checked.ref = ref
        _checked[packed] = checked


def checked(item: object) -> Checked | None:
    """What validation read of a packed object (not taken: see `take_checked`), or None."""
    # is_packed inline: 120k calls in a full sync of 20k services
    cls = item.__class__
    return _checked.get(item) if cls in PACKED else None  # type: ignore[call-overload]


def take_checked(item: object) -> Checked | None:
    """Like `checked`, and forgotten: translated once, an object's parse is not needed again."""
    cls = item.__class__
    return _checked.pop(item, None) if cls in PACKED else None  # type: ignore[call-overload]


def forget_checked() -> None:
    """Drop whatever was not translated (objects unchanged since the source last sent them)."""
    _checked.clear()


# --- translation -----------------------------------------------------------------------


def _served_by(labels: Mapping[str, str], proxy_name: str) -> bool:
    # kube-proxy's selector: no proxy name -> services without the label; else label == name.
    if proxy_name:
        return labels.get(SERVICE_PROXY_NAME_LABEL) == proxy_name
    return SERVICE_PROXY_NAME_LABEL not in labels


def _sorted_items(mapping: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(mapping.items())) if mapping else ()


# A backend with the zones its endpoint is hinted for; hints only decide which backends
# a frontend gets, so they stay out of the model.
_Candidate = tuple[Backend, tuple[str, ...]]
# Backends being collected for one (port name, protocol, family), keyed by (address as
# int, port) so duplicates across slices collapse.
_BackendGroup = dict[tuple[int, int], _Candidate]
_GroupKey = tuple[str, Protocol, int]
# The backends of one group for frontends whose traffic policy is Cluster, and for those
# whose policy is Local: these also need every local backend, which zone hints may leave out.
_Choice = tuple[tuple[Backend, ...], tuple[Backend, ...]]
_NO_CHOICE: _Choice = ((), ())


def _offer(group: _BackendGroup, candidate: _Candidate, ip: _IP) -> None:
    """Add a backend, keeping the better of duplicates so slice order does not matter."""
    key = (ip[2], candidate[0].port)
    current = group.get(key)
    if current is None or _better(candidate, current):
        group[key] = candidate


def _better(new_candidate: _Candidate, old_candidate: _Candidate) -> bool:
    # Ready beats terminating, local beats remote (as kube-proxy); then a fixed tie-break.
    new, old = new_candidate[0], old_candidate[0]
    new_rank = (new.state is BackendState.ACTIVE, new.local)
    old_rank = (old.state is BackendState.ACTIVE, old.local)
    if new_rank != old_rank:
        return new_rank > old_rank
    new_tie = (new.node_name, new.zone, new_candidate[1])
    return new_tie < (old.node_name, old.zone, old_candidate[1])


def _slice_backends(
    groups: dict[_GroupKey, _BackendGroup], parsed: _Slice, publish: bool, node_name: str
) -> None:
    # (endpoints is a property that builds the tuples: once per slice, not once per port)
    endpoints = parsed.endpoints
    # IPv4 backends from the parsed int (the address text is its canonical form)
    v4 = parsed.family == 4
    for name, protocol, number in parsed.ports:
        if not number:
            continue  # a port-less slice port means "all ports": unusable for a service port
        group = groups.setdefault((name, protocol, parsed.family), {})
        for address, code, ep_node, zone, hints in endpoints:
            usable = code & 3
            if usable == _READY or publish:
                state = BackendState.ACTIVE
            elif usable == _DRAINING:
                state = BackendState.TERMINATING
            else:
                continue
            local = ep_node == node_name and ep_node != ""
            if v4:
                backend = backend_v4(code >> 2, number, state, ep_node, local, zone)
            else:
                backend = Backend(address, number, state, ep_node, local, zone)
            candidate = (backend, hints)
            # _offer inlined: this runs for every endpoint of a full sync.
            key = (code >> 2, number)
            current = group.get(key)
            if current is None or _better(candidate, current):
                group[key] = candidate


def _single_slice_backends(parsed: _Slice, publish: bool, node_name: str) -> dict[_GroupKey, _Choice] | None:
    """What _collect_backends makes of one slice without zone hints to honour, the common
    case, without its per-endpoint bookkeeping (a candidate, a key and a dict entry per
    endpoint, then a sort of them per port): the same backends in the same order. None
    when the general path must decide: an address listed twice (the better endpoint wins)
    or a port name and protocol listed with two numbers (one group of both)."""
    codes, texts, pairs = parsed.codes, parsed.texts, parsed.pairs
    if pairs is not None:  # (some pair not in the model's table of places: seldom)
        return None
    if texts is None:
        return _single_slice_backends_v4(parsed, publish, node_name)
    order = sorted(range(len(codes)), key=codes.__getitem__)
    previous = -1
    for i in order:
        address = codes[i] >> _ADDRESS_SHIFT
        if address == previous:
            return None
        previous = address
    groups = _single_port_groups(parsed)
    if groups is None:
        return None
    out: dict[_GroupKey, _Choice] = {}
    active, terminating = BackendState.ACTIVE, BackendState.TERMINATING
    table = places
    for group_key, number in groups:
        backends = []
        append = backends.append
        for i in order:
            code = codes[i]
            usable = code & 3
            if usable == _READY or publish:
                state = active
            elif usable == _DRAINING:
                state = terminating
            else:
                continue
            ep_node, zone = table[code >> 2 & 0xFFFF]
            local = ep_node == node_name and ep_node != ""
            append(Backend(texts[i], number, state, ep_node, local, zone))
        everything = tuple(backends)
        out[group_key] = (everything, everything)
    return out


def _single_slice_backends_v4(parsed: _Slice, publish: bool, node_name: str) -> dict[_GroupKey, _Choice] | None:
    """_single_slice_backends of an IPv4 slice whose places are all in the table: each
    Backend made in the compact form backend_v4 makes, straight from the endpoint's code
    (a call of backend_v4 per backend was about a third of this; 200k at 20k services)."""
    # Sorted codes are the endpoints by address (a code is address << 18 | place << 2 |
    # state); equal addresses are next to each other.
    # Each endpoint's (flags, place, address) once for the slice's ports (the hot loop of a
    # full sync); model.backends_v4 makes them Backends.
    endpoints = []
    append = endpoints.append
    table = places
    previous = -1
    for code in sorted(parsed.codes):
        address = code >> _ADDRESS_SHIFT
        if address == previous:
            return None
        previous = address
        usable = code & 3
        if usable == _READY or publish:
            flags = 0
        elif usable == _DRAINING:
            flags = BACKEND_TERMINATING
        else:
            continue
        place = code >> 2 & 0xFFFF
        ep_node = table[place][0]
        if ep_node == node_name and ep_node != "":
            flags |= BACKEND_LOCAL
        append((flags, place, address))
    groups = _single_port_groups(parsed)
    if groups is None:
        return None
    out: dict[_GroupKey, _Choice] = {}
    for group_key, number in groups:
        everything = backends_v4(number, endpoints)
        out[group_key] = (everything, everything)
    return out


def _single_port_groups(parsed: _Slice) -> list[tuple[_GroupKey, int]] | None:
    """A slice's usable ports by group, for the single-slice paths; None when a port name
    and protocol come with two numbers (the general path makes one group of both)."""
    groups: dict[_GroupKey, int] = {}
    for name, protocol, number in parsed.ports:
        if not number:
            continue  # as _slice_backends: no usable port
        group_key = (name, protocol, parsed.family)
        if group_key in groups:
            return None
        groups[group_key] = number
    return list(groups.items())


def _endpoints_backends(
    groups: dict[_GroupKey, _BackendGroup], subsets: list[_Subset], publish: bool, node_name: str
) -> None:
    for subset in subsets:
        addresses = subset.ready + subset.not_ready if publish else subset.ready
        for name, protocol, number in subset.ports:
            for ip, ep_node in addresses:
                group = groups.setdefault((name, protocol, ip[1]), {})
                local = ep_node == node_name and ep_node != ""
                backend = Backend(ip[0], number, BackendState.ACTIVE, ep_node, local)
                _offer(group, (backend, ()), ip)


def _belongs(obj: KubeObject, key: ServiceKey) -> bool:
    """Whether a checked EndpointSlice or Endpoints object is the given service's."""
    meta = obj["metadata"]
    if (meta.get("namespace") or "default") != key.namespace:
        return False
    if obj["kind"] == "Endpoints":
        return bool(meta["name"] == key.name)
    return bool((meta.get("labels") or {}).get(SERVICE_NAME_LABEL) == key.name)


def _collect_backends(
    key: ServiceKey,
    spec: _ServiceSpec,
    slices: list[KubeObject],
    endpoints: KubeObject | None,
    node: NodeInfo,
) -> dict[_GroupKey, _Choice]:
    groups: dict[_GroupKey, _BackendGroup] = {}
    have_slices = False
    with_addresses: list[_Slice] = []
    for obj in slices:
        found = take_checked(obj)
        if found is not None and found.__class__ is _Slice:  # a Service's reading is kept too
            # Validated by the source moments ago: read once.
            parsed = found
            if found.key != key:
                log.debug("ignoring EndpointSlice %s/%s: not of service %s", *found.ref[1:], key)
                continue
        else:
            obj = unpack(obj)
            if _check_common(obj) != "EndpointSlice":
                _fail(obj, "expected an EndpointSlice")
            parsed = _parse_slice(obj)
            if not _belongs(obj, key):
                log.debug("ignoring EndpointSlice %s/%s: not of service %s", *object_ref(obj)[1:], key)
                continue
        have_slices = True
        if parsed.family:
            with_addresses.append(parsed)
    # Legacy Endpoints have no hints: a service served from them never filters by zone.
    zone = node.zone if spec.topology else ""
    if len(with_addresses) == 1 and not zone:
        single = _single_slice_backends(with_addresses[0], spec.publish_not_ready, node.name)
        if single is not None:
            return single
    for parsed in with_addresses:
        _slice_backends(groups, parsed, spec.publish_not_ready, node.name)
    # Legacy Endpoints only for clusters (or mirrors) without EndpointSlices for this service.
    if not have_slices and endpoints is not None:
        if _check_common(endpoints) != "Endpoints":
            _fail(endpoints, "expected an Endpoints object")
        subsets = _parse_endpoints(endpoints)
        if _belongs(endpoints, key):
            _endpoints_backends(groups, subsets, spec.publish_not_ready, node.name)
    out: dict[_GroupKey, _Choice] = {}
    for gk, group in groups.items():
        choice = _prefer_zone([c for _, c in sorted(group.items())], zone) if zone else None
        # Sorting again when hints do not apply keeps an extra list off the common path.
        if choice is None:
            everything = tuple([c[0] for _, c in sorted(group.items())])
            choice = (everything, everything)
        out[gk] = choice
    return out


def _prefer_zone(candidates: list[_Candidate], zone: str) -> _Choice | None:
    """(Cluster-policy, Local-policy) backends under zone hints (KEP-2433), or None.

    Hints apply only when every ready endpoint has some and at least one names this zone:
    one endpoint without them (a controller midway, or a custom slice) or none for this
    zone would otherwise strand the zone's traffic, so then every endpoint serves. Only
    ready endpoints are filtered: terminating ones are picked only when no ready one is
    in scope (never the case here, one is in this zone) and stay listed so flows to them
    can drain. Traffic policy Local is not subject to hints, as in kube-proxy: local
    backends the hints send elsewhere remain for the Local scope.
    """
    in_zone = False
    for backend, hints in candidates:
        if backend.state is BackendState.ACTIVE:
            if not hints:
                return None
            in_zone = in_zone or zone in hints
    if not in_zone:
        return None
    active = BackendState.ACTIVE
    cluster: list[Backend] = []
    with_local: list[Backend] = []
    for backend, hints in candidates:
        if backend.state is not active or zone in hints:
            cluster.append(backend)
            with_local.append(backend)
        elif backend.local:
            with_local.append(backend)
    kept = tuple(cluster)
    # One tuple for both when no local backend was left out: frontends then share it.
    return kept, kept if len(with_local) == len(kept) else tuple(with_local)


class _FrontendSet:
    """Frontends of one service, deduplicated on (type, address, port, protocol)."""

    __slots__ = ("affinity", "items")

    def __init__(self, affinity: int) -> None:
        self.items: dict[tuple[int, int, int, int, str], Frontend] = {}
        self.affinity = affinity

    def add(
        self,
        ftype: FrontendType,
        ip: _IP,
        port: int,
        protocol: Protocol,
        port_name: str,
        backends: tuple[Backend, ...],
        **options: Any,
    ) -> None:
        # (_value_: the member's value as an attribute; .value is a property, 0.14 us)
        key = (_TYPE_RANK[ftype], ip[1], ip[2], port, protocol._value_)
        if key in self.items:
            return
        self.items[key] = Frontend(
            type=ftype,
            address=ip[0],
            port=port,
            protocol=protocol,
            backends=backends,
            port_name=port_name,
            affinity_timeout=self.affinity,
            **options,
        )

    def sorted(self) -> tuple[Frontend, ...]:
        items = self.items
        if len(items) == 1:  # most services: one port, one ClusterIP
            return tuple(items.values())
        return tuple([f for _, f in sorted(items.items())])


def _service_frontends(
    spec: _ServiceSpec, backends: dict[_GroupKey, _Choice], node: NodeInfo
) -> tuple[Frontend, ...]:
    ports, cluster_ips = spec.ports, spec.cluster_ips
    if (
        len(ports) == 1 and len(cluster_ips) == 1 and not spec.lb_ips and not spec.external_ips
        and (not ports[0].node_port or spec.type not in _NODE_PORT_TYPES)
    ):
        # One port on one ClusterIP, nothing else (most services): the one frontend the loop
        # below would make, without its per-service sets and option dicts.
        sp, ip = ports[0], cluster_ips[0]
        choice = backends.get((sp.name, sp.protocol, ip[1]), _NO_CHOICE)
        return (
            Frontend(
                type=FrontendType.CLUSTER_IP,
                address=ip[0],
                port=sp.port,
                protocol=sp.protocol,
                backends=choice[1 if spec.internal_local else 0],
                port_name=sp.name,
                affinity_timeout=spec.affinity_timeout,
                internal_local=spec.internal_local,
            ),
        )
    return _all_frontends(spec, backends, node)


def _all_frontends(spec: _ServiceSpec, backends: dict[_GroupKey, _Choice], node: NodeInfo) -> tuple[Frontend, ...]:
    """_service_frontends of any service: every port on every address, deduplicated, sorted."""
    out = _FrontendSet(spec.affinity_timeout)
    families = spec.families
    node_addresses = _node_addresses(tuple(node.addresses))
    # kube-proxy runs one proxier per family and each only takes the service's addresses of
    # its own family, so addresses of a family the service lacks are dropped.
    external_ips = [ip for ip in spec.external_ips if ip[1] in families]
    lb_ips = [ip for ip in spec.lb_ips if ip[1] in families]
    external = {"external_local": spec.external_local}
    # The health check port only means something when external traffic stays local.
    checked = {
        **external,
        "health_check_node_port": spec.health_check_node_port if spec.external_local else 0,
    }
    # All ranges go on every LB frontend (not only those of its family): a v6 VIP of a
    # service that lists only v4 ranges then admits no v6 client instead of all of them.
    balanced = {**checked, "source_ranges": spec.source_ranges}
    # Which of a group's backend lists (_Choice) a frontend takes, by its traffic policy.
    internal_pick = 1 if spec.internal_local else 0
    external_pick = 1 if spec.external_local else 0
    get = backends.get
    for sp in spec.ports:
        name, protocol, port = sp.name, sp.protocol, sp.port
        by_family = {4: get((name, protocol, 4), _NO_CHOICE), 6: get((name, protocol, 6), _NO_CHOICE)}
        for ip in spec.cluster_ips:
            out.add(
                FrontendType.CLUSTER_IP,
                ip,
                port,
                protocol,
                name,
                by_family[ip[1]][internal_pick],
                internal_local=spec.internal_local,
            )
        if sp.node_port and spec.type in _NODE_PORT_TYPES:
            for family in families:
                for ip in (*node_addresses[family], _LOOPBACK[family]):
                    out.add(
                        FrontendType.NODE_PORT,
                        ip,
                        sp.node_port,
                        protocol,
                        name,
                        by_family[family][external_pick],
                        **checked,
                    )
        for ip in lb_ips:
            out.add(
                FrontendType.LOAD_BALANCER,
                ip,
                port,
                protocol,
                name,
                by_family[ip[1]][external_pick],
                **balanced,
            )
        for ip in external_ips:
            out.add(
                FrontendType.EXTERNAL_IP,
                ip,
                port,
                protocol,
                name,
                by_family[ip[1]][external_pick],
                **external,
            )
    return out.sorted()


def translate_service(
    svc: KubeObject,
    slices: list[KubeObject],
    endpoints: KubeObject | None,
    node: NodeInfo,
    proxy_name: str = "",
    rules: AddressRules = NO_RULES,
    key: ServiceKey | None = None,
) -> Service | None:
    """The model of one Service on `node`, or None when it gets no data path here.

    None for: a service-proxy-name label that is not ours, ExternalName, headless
    (clusterIP None) or not yet allocated (clusterIP "") services - kube-proxy skips those
    entirely, external addresses included - and services that end up with no frontend.
    `svc` and `slices` (the service's EndpointSlices; others are ignored) are dicts or packed
    (kpr.memory.pack: an object validate_object read is then not read again, see `checked`);
    `endpoints` its legacy Endpoints, used only when no slice is given. Raises InvalidObject for invalid input,
    a ClusterIP outside `rules` included. `key`, the service's key as the caller keeps it
    (the store), becomes the model's: not one more ServiceKey per service.
    """
    found = take_checked(svc)
    if found is not None and found.__class__ is _CheckedService and found.rules is rules:
        # Validated by the source moments ago, under the same rules: read once.
        spec = found.spec
        labels = found.labels or {}
        annotations = found.annotations
        _kind, namespace, name = found.ref
    else:
        svc = unpack(svc)
        if _check_common(svc) != "Service":
            _fail(svc, "expected a Service")
        spec = _parse_service(svc, rules)
        meta = svc["metadata"]
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations")
        namespace, name = meta.get("namespace") or "default", meta["name"]
    if not _served_by(labels, proxy_name):
        return None
    if spec.type == "ExternalName" or not spec.cluster_ips:
        return None
    if key is None or key.name != name or key.namespace != namespace:
        key = ServiceKey(_interned(namespace), _interned(name))
    backends = _collect_backends(key, spec, slices, endpoints, node)
    frontends = _service_frontends(spec, backends, node)
    if not frontends:
        return None
    return Service(
        key=key,
        frontends=frontends,
        labels=_sorted_items(labels),
        annotations=_sorted_items(annotations),
        source_kind="Service",
    )


def local_pod_ips(pod: KubeObject, node: NodeInfo) -> tuple[str, ...]:
    """The pod IPs (one per family) of a Pod running on `node` in its own network namespace;
    () for a pod elsewhere, on the host network, finished, without an address yet, or not
    readable. What plugins that route to pods (host_routing) learn pods from."""
    try:
        parsed = _parse_pod(pod)
    except (InvalidObject, ValueError, TypeError, KeyError, AttributeError):
        return ()
    if parsed.node_name != node.name or parsed.phase in _FINISHED_PHASES or parsed.host_network:
        return ()
    return tuple(ip[0] for _family, ip in sorted(parsed.pod_ips.items()))


def translate_pod(pod: KubeObject, node: NodeInfo) -> Service | None:
    """The HostPort pseudo-service of a Pod running on `node`, or None when it has none.

    Each container port with a hostPort is reachable on its hostIP when that is a node
    address, or when unset on every node address of each pod IP's family, and goes to
    podIP:containerPort.
    Host-network pods are skipped: their hostPort is the process's own socket on the node.
    """
    if _check_common(pod) != "Pod":
        _fail(pod, "expected a Pod")
    parsed = _parse_pod(pod)
    if parsed.node_name and parsed.node_name != node.name:
        return None
    if parsed.phase in _FINISHED_PHASES or parsed.host_network or not parsed.pod_ips:
        return None
    out = _FrontendSet(0)
    node_addresses = _node_addresses(tuple(node.addresses))
    for hp in parsed.host_ports:
        if hp.host_ip is not None:
            # Another address is not this node's to serve: a pod would take every client's
            # traffic to it (as CVE-2020-8554 with ExternalIPs).
            if hp.host_ip not in node_addresses[hp.host_ip[1]]:
                continue
            targets = [(hp.host_ip, parsed.pod_ips.get(hp.host_ip[1]))]
        else:
            targets = [
                (ip, pod_ip)
                for family, pod_ip in parsed.pod_ips.items()
                for ip in node_addresses[family]
            ]
        for ip, pod_ip in targets:
            if pod_ip is None:
                continue  # a hostIP of a family the pod has no address in
            backend = Backend(pod_ip[0], hp.container_port, BackendState.ACTIVE, node.name, True)
            out.add(FrontendType.HOST_PORT, ip, hp.host_port, hp.protocol, hp.name, (backend,))
    frontends = out.sorted()
    if not frontends:
        return None
    meta = pod["metadata"]
    return Service(
        key=ServiceKey(meta.get("namespace") or "default", POD_KEY_PREFIX + meta["name"]),
        frontends=frontends,
        labels=_sorted_items(meta.get("labels")),
        annotations=_sorted_items(meta.get("annotations")),
        source_kind="Pod",
    )
