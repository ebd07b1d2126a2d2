"""What a Service asks of lb_ipam, read from the object as its source delivers it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPS_ANNOTATION = "lbipam.kpr.io/ips"
POOL_ANNOTATION = "lbipam.kpr.io/pool"
SHARING_ANNOTATION = "lbipam.kpr.io/sharing-key"
_FAMILIES = {"IPv4": 4, "IPv6": 6}
# Creation times are RFC 3339 in UTC ("2024-01-02T03:04:05Z") and sort as text; a service
# without one (a manifest) ranks after every dated one.
UNDATED = "~"


@dataclass(frozen=True)
class Request:
    key: str
    namespace: str
    labels: tuple[tuple[str, str], ...] = ()
    # (creationTimestamp, key): who wins a contested address, and the order of entries.
    prio: tuple[str, str] = (UNDATED, "")
    # Not ours: not a LoadBalancer, another class, or an address set by someone else.
    ignored: str = ""
    # Bad input; the service gets no address.
    problem: str = ""
    families: tuple[int, ...] = ()
    policy: str = ""
    explicit: tuple[str, ...] = ()
    pool: str = ""
    sharing: str = ""
    ports: frozenset[tuple[str, int]] = frozenset()
    local: bool = False
    selector: tuple[tuple[str, str], ...] = ()
    # status.loadBalancer.ingress IPs (the kubernetes source: the allocation so far).
    current: tuple[str, ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def shares_with(self, other: "Request") -> str:
        """Why this service cannot share an address with `other` ("" when it can)."""
        if not self.sharing or self.sharing != other.sharing:
            return f"service {other.key} holds it (no common {SHARING_ANNOTATION})"
        both = self.ports & other.ports
        if both:
            proto, port = sorted(both)[0]
            return f"service {other.key} shares it with the same key but also uses {port}/{proto}"
        if (self.local or other.local) and (not (self.local and other.local) or self.selector != other.selector):
            # As MetalLB: with externalTrafficPolicy Local the address must lead to the
            # same endpoints, which only the same selector guarantees.
            return f"service {other.key} shares it, but externalTrafficPolicy Local needs the same policy and selector on both"
        return ""


def _str_map(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def parse(obj: dict, lb_class: str, use_status: bool) -> Request:
    """The request of one Service object. `use_status`: status.loadBalancer.ingress is the
    allocation so far (kubernetes); otherwise an ingress there comes from a manifest and the
    service is left alone (files)."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    ns = str(meta.get("namespace") or "default")
    key = f"{ns}/{meta.get('name') or ''}"
    created = meta.get("creationTimestamp")
    base = dict(key=key, namespace=ns, labels=tuple(sorted(_str_map(meta.get("labels")).items())),
                prio=(str(created) if created else UNDATED, key))
    if spec.get("type") != "LoadBalancer":
        return Request(**base, ignored="not type LoadBalancer")
    cls = spec.get("loadBalancerClass")
    if cls and cls != lb_class:
        return Request(**base, ignored=f"loadBalancerClass {cls} is not {lb_class}")
    balancer = status.get("loadBalancer") if isinstance(status.get("loadBalancer"), dict) else {}
    ingress = balancer.get("ingress") if isinstance(balancer.get("ingress"), list) else []
    current = tuple(str(i["ip"]) for i in ingress if isinstance(i, dict) and isinstance(i.get("ip"), str))
    if current and not use_status:
        return Request(**base, ignored="status.loadBalancer.ingress is set in the manifest")
    ann = _str_map(meta.get("annotations"))

    def bad(reason: str) -> Request:
        return Request(**base, problem=reason)

    explicit: list[str] = []
    texts = [t.strip() for t in ann.get(IPS_ANNOTATION, "").split(",") if t.strip()]
    where = f"annotation {IPS_ANNOTATION}"
    lb_ip = spec.get("loadBalancerIP")
    if lb_ip and not texts:
        texts, where = [str(lb_ip)], "spec.loadBalancerIP"
    elif lb_ip and texts and str(lb_ip) not in texts:
        return bad(f"spec.loadBalancerIP {lb_ip} is not among the addresses of annotation {IPS_ANNOTATION}")
    for t in texts:
        try:
            explicit.append(str(ipaddress.ip_address(t)))
        except ValueError:
            return bad(f"{where}: not an IP address: {t!r}")
    fams_ex = [ipaddress.ip_address(i).version for i in explicit]
    if len(set(fams_ex)) != len(fams_ex):
        return bad(f"{where}: at most one address per family, got {', '.join(explicit)}")

    fams: list[int] = []
    for f in spec.get("ipFamilies") or []:
        if f not in _FAMILIES:
            return bad(f"spec.ipFamilies: unknown family {f!r}")
        fams.append(_FAMILIES[f])
    policy = str(spec.get("ipFamilyPolicy") or "SingleStack")
    if not fams:
        fams = list(dict.fromkeys(fams_ex))
    if policy == "SingleStack":
        fams = fams[:1]
    for f in fams_ex:
        if fams and f not in fams:
            return bad(f"{where}: {explicit[fams_ex.index(f)]} is IPv{f}, the service's ipFamilies are {spec.get('ipFamilies')}")

    ports = set()
    for p in spec.get("ports") or []:
        if isinstance(p, dict) and isinstance(p.get("port"), int):
            ports.add((str(p.get("protocol") or "TCP"), p["port"]))
    return Request(
        **base,
        families=tuple(fams),
        policy=policy,
        explicit=tuple(explicit),
        pool=ann.get(POOL_ANNOTATION, "").strip(),
        sharing=ann.get(SHARING_ANNOTATION, "").strip(),
        ports=frozenset(ports),
        local=spec.get("externalTrafficPolicy") == "Local",
        selector=tuple(sorted(_str_map(spec.get("selector")).items())),
        current=current,
    )
