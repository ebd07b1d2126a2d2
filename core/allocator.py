"""ClusterIP and nodePort allocation for the files source, as the API server would do it.

Manifests on a node without a cluster usually leave spec.clusterIP and ports[].nodePort out;
the allocator fills them in so the services look as they would in a cluster. Values must not
move when kpr restarts (clients keep talking to them), so allocations are persisted in a small
JSON file and each service prefers a value derived from a hash of its key, which also gives a
deleted and re-added service its old values back when they are still free.

Rules:
- Values written in a manifest are honoured. Two services writing the same value conflict:
  the one holding it keeps it and the other is refused with AllocationError. A written value
  held by another service's *automatic* allocation is taken over and that service is moved
  (listed in ``Allocation.displaced``), so a manifest's explicit values never depend on what
  the allocator happened to pick before.
- Allocations loaded from the state file (explicit marks included, so the holder of a
  contested value stays the same across restarts) are kept until the source, having read
  every manifest, calls ``retain`` with the services that still exist.
- As with kube-apiserver (KEP-3070, KEP-3668), automatic values prefer the upper part of a
  range and leave a small lower band to explicit values, making takeovers rare.
- LoadBalancer addresses are not allocated here (lb_ipam decides them); they are only kept,
  per service, as written through the files source (``set_load_balancer``), so a restarted
  agent serves them from its first pass. They go with the service's other allocations.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from . import translate as _translate
from .config import PortRange
from .memory import gc_paused

log = logging.getLogger(__name__)

STATE_VERSION = 1

_PROTOCOLS = ("TCP", "UDP", "SCTP")
_FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
_FAMILIES = {"IPv4": 4, "IPv6": 6}
_SLOTS = {4: "4", 6: "6"}  # a family's key in Allocator._used_in_range
_IPV4_ONLY = ["IPv4"]
_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")

# What an allocated value is: ("ip", "10.96.0.10") or ("port", ("TCP", 30080)).
Claim = tuple[str, Any]


class AllocationError(Exception):
    """The service asks for something that cannot be given; the message says what and why."""


# Shared empties a record holds until it has values of that kind (most services have no
# nodePort and no LoadBalancer address: an empty dict and list per record took 2.4 MB at 20k).
# Read-only, so no record can fill in another's.
_NO_PORTS: Mapping[str, int] = MappingProxyType({})


@dataclass(slots=True)
class _Record:
    """One service's allocations (slots: one per service, 20k and more). Kept records hold
    tuples and the shared empties (`_compact`); ``allocate`` fills a fresh one's
    ``node_ports`` dict."""

    # The ClusterIPs (see cluster_ips): one is kept as its string, not in a tuple of one (48
    # bytes per service, 1 MB at 20k).
    ips: str | tuple[str, ...] = ()
    # "portName/protocol/port" -> nodePort
    node_ports: Mapping[str, int] = field(default_factory=lambda: _NO_PORTS)
    health_check_node_port: int = 0
    # Which of claims() were written in the service's manifest (bit i: the i-th claim); the
    # others are automatic and may be taken over by another service's explicit value. A mask
    # (a small int, shared): a tuple of claim tuples took 112 bytes per service with an
    # explicit ClusterIP (2.2 MB at 20k), a set of one claim 216. Set through `explicit`
    # once the record's values are final (the bits are positions among them).
    explicit_mask: int = 0
    # status.loadBalancer.ingress addresses written back (lb_ipam); not claims of a range.
    load_balancer_ips: tuple[str, ...] = ()

    @property
    def cluster_ips(self) -> tuple[str, ...]:
        ips = self.ips
        return (ips,) if type(ips) is str else ips

    @cluster_ips.setter
    def cluster_ips(self, ips: Iterable[str]) -> None:
        t = tuple(ips)
        self.ips = t[0] if len(t) == 1 else t

    @property
    def explicit(self) -> tuple[Claim, ...]:
        """The claims written in the service's manifest."""
        mask = self.explicit_mask
        if not mask:
            return ()
        return tuple(c for i, c in enumerate(self.claims()) if mask >> i & 1)

    @explicit.setter
    def explicit(self, claims: Iterable[Claim]) -> None:
        """Mark these of the record's claims explicit (claims it does not hold are ignored)."""
        self.explicit_mask = _mask(self.claims(), set(claims))

    def compact(self) -> "_Record":
        """This record as kept: tuples, and the shared empty mapping for no nodePorts."""
        self.cluster_ips = self.cluster_ips  # (the setter keeps one as its string)
        self.node_ports = self.node_ports or _NO_PORTS
        self.load_balancer_ips = tuple(self.load_balancer_ips)
        return self

    def claims(self) -> list[Claim]:
        out: list[Claim] = [("ip", ip) for ip in self.cluster_ips]
        for pkey, np in self.node_ports.items():
            out.append(("port", (pkey.split("/")[1], np)))
        if self.health_check_node_port:
            out.append(("port", ("TCP", self.health_check_node_port)))
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.cluster_ips:
            out["clusterIPs"] = list(self.cluster_ips)
        if self.node_ports:
            out["nodePorts"] = dict(sorted(self.node_ports.items()))
        if self.health_check_node_port:
            out["healthCheckNodePort"] = self.health_check_node_port
        if self.explicit:
            out["explicit"] = sorted(_show(c) for c in self.explicit)
        if self.load_balancer_ips:
            out["loadBalancerIPs"] = list(self.load_balancer_ips)
        return out


def _mask(claims: list[Claim], marked: set[Claim]) -> int:
    """The bits of `claims` that are in `marked` (a record's explicit_mask)."""
    return sum(1 << i for i, c in enumerate(claims) if c in marked) if marked else 0


@dataclass
class Allocation:
    """The result of ``Allocator.allocate``."""

    # A copy of the service with the allocated values filled in.
    obj: dict
    # Keys (namespace/name) of other services whose automatic values this one took over;
    # allocate them again so they get new ones.
    displaced: set[str] = field(default_factory=set)


@dataclass
class _Range:
    """A contiguous range of values as integers, with the band automatic values prefer."""

    first: int
    size: int
    # Automatic picks start in [first + static, first + size); the lower band comes last.
    static: int

    def __contains__(self, value: int) -> bool:
        return self.first <= value < self.first + self.size

    def probe(self, seed: int) -> Iterable[int]:
        dynamic = self.size - self.static
        start = seed % dynamic
        for i in range(dynamic):
            yield self.first + self.static + (start + i) % dynamic
        for i in range(self.static):
            yield self.first + i


def _address(text: Any) -> tuple[str, int, int]:
    """(canonical text, family, value) of an IP address; ValueError when `text` is none."""
    # Canonical IPv4, the common case, through libc: ipaddress takes 5x longer, and every
    # service of a full sync and every record of the state file comes here.
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError, TypeError):
        pass
    else:
        if socket.inet_ntop(socket.AF_INET, packed) == text:
            return text, 4, int.from_bytes(packed, "big")
    ip = ipaddress.ip_address(text)
    return str(ip), ip.version, int(ip)


def _text(value: int, family: int) -> str:
    """The canonical text of an address given as an integer."""
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return str(ipaddress.IPv6Address(value))


def _static_band(size: int, divisor: int, cap: int) -> int:
    band = min(max(16, size // divisor), cap)
    return band if band < size else 0


def _seed(*parts: str) -> int:
    # Not hash(): that is salted per process and would not be stable across restarts.
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:16], "big")


def service_key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


class Allocator:
    """Allocates ClusterIPs from ``cluster_cidrs`` (one per family, the first is the primary
    family) and nodePorts from ``node_port_range``; persists them to ``state_path``."""

    def __init__(self, state_path: Path, cluster_cidrs: list[str], node_port_range: PortRange):
        self.state_path = Path(state_path)
        self.node_port_range = node_port_range
        self._nets: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
        self._ip_ranges: dict[int, _Range] = {}
        for cidr in cluster_cidrs:
            net = ipaddress.ip_network(cidr, strict=True)
            if net.version in self._nets:
                raise ValueError(f"two CIDRs of IPv{net.version}: {self._nets[net.version]} and {net}")
            self._nets[net.version] = net
            # Skip the network address and its first host (kube gives that to the
            # `kubernetes` service) and the last address (IPv4 broadcast).
            size = max(net.num_addresses - 3, 0)
            self._ip_ranges[net.version] = _Range(int(net.network_address) + 2, size, _static_band(size, 16, 256))
        # Families in configured order: the first is what a service without ipFamilies gets.
        self.families = [ipaddress.ip_network(c).version for c in cluster_cidrs]
        # The networks as configured, for validation of explicit ClusterIPs.
        self.cluster_cidrs = tuple(str(n) for n in self._nets.values())
        n = node_port_range.last - node_port_range.first + 1
        self._port_range = _Range(node_port_range.first, n, _static_band(n, 32, 128))

        self._records: dict[str, _Record] = {}
        self._ips: dict[str, str] = {}  # ip -> service key
        self._ports: dict[tuple[str, int], str] = {}  # (protocol, port) -> service key
        self._port_numbers: dict[int, int] = {}  # port -> claims on it, any protocol
        self._used_in_range: dict[str, int] = {"4": 0, "6": 0, "port": 0}
        self._dirty = False
        self._load()

    # --- public --------------------------------------------------------------------------

    def allocate(self, svc: dict) -> Allocation:
        """Fill in the service's ClusterIPs and nodePorts; raise AllocationError when it asks
        for something taken or impossible, leaving its previous allocations as they were."""
        key = service_key(svc)
        spec = svc.get("spec")
        if not isinstance(spec, dict):
            spec = {}
        stype = spec.get("type") or "ClusterIP"
        old = self._records.get(key)
        if stype == "ExternalName":
            self.release(key)
            return Allocation(svc)
        if stype == "ClusterIP":
            written = spec.get("clusterIP")
            fams, policy = spec.get("ipFamilies"), spec.get("ipFamilyPolicy")
            if not written:
                if not (fams or policy or spec.get("clusterIPs")) and self.families:
                    return self._allocate_plain(svc, key, old)
            elif (not fams or fams == _IPV4_ONLY) and (not policy or policy == "SingleStack"):
                # Families and policy left out, or those allocation gives a written IPv4
                # ClusterIP (what `kubectl get -o yaml` exports of a single-stack IPv4
                # Service); a written IPv6 one leaves the short way.
                done = self._allocate_written(svc, key, old, spec, written)
                if done is not None:
                    return done

        new = _Record(node_ports={})
        if old is not None and stype == "LoadBalancer":
            new.load_balancer_ips = old.load_balancer_ips
        # Values taken in this call, so two ports of one service never get the same one.
        staged: set[Claim] = set()
        marked: set[Claim] = set()  # the explicit ones among them
        displaced: set[str] = set()

        def claim_explicit(c: Claim, what: str) -> None:
            if c in staged:
                raise AllocationError(f"{what} is given twice")
            owner = self._owner(c)
            if owner is not None and owner != key:
                rec = self._records.get(owner)
                if rec is not None and c in rec.explicit:
                    raise AllocationError(f"{what} is already allocated to service {owner}")
                displaced.add(owner)
            staged.add(c)
            marked.add(c)

        def free_for_me(c: Claim) -> bool:
            if c in staged:
                return False
            owner = self._owner(c)
            return owner is None or owner == key

        new_spec: dict[str, Any] = {}
        self._cluster_ips(key, spec, old, new, staged, claim_explicit, free_for_me, new_spec)
        new_ports = self._node_ports(key, spec, stype, old, new, staged, claim_explicit, free_for_me, new_spec)

        # Commit: everything below succeeds. The record's claims made once (a list each
        # time: four times per service in an initial sync).
        claims = new.claims()
        new.explicit_mask = _mask(claims, marked)
        if old is not None:
            for c in old.claims():
                if self._owner(c) == key:
                    self._drop(c)
        for owner in displaced:
            victim = self._records.get(owner)
            if victim is None:
                continue
            for c in staged:
                if self._owner(c) == owner:
                    self._drop(c)
                    self._forget(victim, c)
                    self._dirty = True
                    log.warning("allocator.takeover service=%s value=%s from=%s", key, _show(c), owner)
        for c in claims:
            self._take(c, key)
        # A first allocation changes the state whenever it keeps anything (to_json is not
        # made for it: a sixth of allocate's time in an initial sync); another one when its
        # record differs (records equal field by field persist alike; to_json decides only
        # for the rest, e.g. the same nodePorts in another order: a restart's first pass
        # re-allocates every service, and two to_json each took a third of that). The mask's
        # bits follow node_ports' order, which dict equality ignores: with marks, an order
        # that differs goes to to_json too (a mark moved to another port keeps the mask).
        if (claims or new.load_balancer_ips) if old is None else (
            old != new or (old.explicit_mask and list(old.node_ports) != list(new.node_ports))
        ) and old.to_json() != new.to_json():
            self._dirty = True
        if claims or new.load_balancer_ips:
            self._records[key] = new.compact()
        else:
            self._records.pop(key, None)  # headless, or no clusterCIDR: nothing to keep
        return Allocation(self._inject(svc, new_spec, new_ports), displaced - {key})

    def _allocate_plain(self, svc: dict, key: str, old: _Record | None) -> Allocation:
        """allocate() of a ClusterIP service that leaves its ClusterIP, families and policy to
        allocation (most manifests), with the same outcome: one address of the primary family,
        SingleStack. (The general way's checks and bookkeeping for explicit values, staged
        claims and nodePorts took half of its 10 us a service: 0.1 s at 20k services.)"""
        family = self.families[0]
        records, ips = self._records, self._ips
        ip = self._pick_ip(key, family, old, lambda c: ips.get(c[1]) in (None, key))
        new = _Record(ips=ip)
        if old is not None and old.ips == ip and not old.node_ports and not old.health_check_node_port and ips.get(ip) == key:
            # Its one claim again, held already (a restart's first pass): dropped and taken
            # again by the general way, which changes nothing.
            pass
        else:
            if old is not None:
                for c in old.claims():
                    if self._owner(c) == key:
                        self._drop(c)
            # _take, knowing the address is in the family's range (_pick_ip's values are)
            ips[ip] = key
            self._used_in_range[_SLOTS[family]] += 1
        if old is None or old != new and old.to_json() != new.to_json():
            self._dirty = True
        records[key] = new
        spec = {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": [_FAMILY_NAMES[family]], "ipFamilyPolicy": "SingleStack"}
        return Allocation(self._inject(svc, spec, {}), set())

    def _allocate_written(self, svc: dict, key: str, old: _Record | None, spec: dict, ip: Any) -> Allocation | None:
        """allocate() of a ClusterIP service whose manifest writes one canonical IPv4 ClusterIP
        (clusterIPs left out or the same one) nobody else holds, families and policy left out
        or single-stack IPv4 (what manifests exported from a cluster have), with the same
        outcome; None for anything else, which takes the general way (its staged claims,
        closures and checks took about 7 us a service: 0.15 s of a 20k-service first pass)."""
        if ip.__class__ is not str:
            return None
        given = spec.get("clusterIPs")
        if given and (given.__class__ is not list or len(given) != 1 or given[0] != ip):
            return None
        if not self.take_written(key, ip, old):
            return None
        return Allocation(self._inject(svc, _translate.written_spec(ip), {}), set())

    def take_written(self, key: str, ip: str, old: _Record | None | bool = False) -> bool:
        """Record `ip`, one canonical IPv4 ClusterIP a ClusterIP Service's manifest writes
        (families and policy left out or single-stack IPv4, clusterIPs left out or the same
        one), as service `key`'s only allocation, when nobody else holds it: what allocate()
        does for such a Service, whose allocated version then has kpr.translate.written_spec's
        fields. False (nothing changed) for an
        address not canonical IPv4 or held by another service: allocate() then decides (it
        refuses or displaces). A source that knows the Service is of that shape calls this
        instead of allocate(), without the Service's dict (kpr.sources.files)."""
        if old is False:
            old = self._records.get(key)
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except (OSError, ValueError, TypeError):
            return False
        if socket.inet_ntop(socket.AF_INET, packed) != ip:
            return False
        ips = self._ips
        holder = ips.get(ip)
        if holder is not None and holder != key:
            return False  # taken: the general way refuses or displaces
        new = _Record(ips=ip, explicit_mask=1)
        if not (old is not None and holder == key and old.ips == ip and old.explicit_mask == 1 and not old.node_ports
                and not old.health_check_node_port):
            # (else its one written claim again, held already: a restart's first pass)
            if old is not None:
                for c in old.claims():
                    if self._owner(c) == key:
                        self._drop(c)
            # _take, with the address's value at hand
            ips[ip] = key
            rng = self._ip_ranges.get(4)
            if rng is not None and rng.first <= int.from_bytes(packed, "big") < rng.first + rng.size:
                self._used_in_range["4"] += 1
        if old is None or old != new and old.to_json() != new.to_json():
            self._dirty = True
        self._records[key] = new
        return True

    def release(self, key: str) -> None:
        """Forget a service's allocations (it was deleted)."""
        rec = self._records.pop(key, None)
        if rec is None:
            return
        for c in rec.claims():
            if self._owner(c) == key:
                self._drop(c)
        self._dirty = True
        log.info("allocator.release service=%s", key)

    def retain(self, keys: Iterable[str]) -> int:
        """Release the allocations of every service not in ``keys``; returns how many."""
        keep = set(keys)
        gone = [k for k in self._records if k not in keep]
        for k in gone:
            self.release(k)
        return len(gone)

    def set_load_balancer(self, key: str, ips: list[str]) -> bool:
        """Keep `ips` as the service's LoadBalancer addresses; returns whether they changed."""
        rec = self._records.get(key)
        if (rec.load_balancer_ips if rec is not None else ()) == tuple(ips):
            return False
        if rec is None:
            rec = self._records[key] = _Record()
        rec.load_balancer_ips = tuple(ips)
        if not rec.claims() and not rec.load_balancer_ips:
            del self._records[key]
        self._dirty = True
        log.info("allocator.load_balancer service=%s ips=%s", key, ",".join(ips))
        return True

    def load_balancer(self, key: str) -> list[str]:
        rec = self._records.get(key)
        return list(rec.load_balancer_ips) if rec is not None else []

    def get(self, key: str) -> dict[str, Any] | None:
        """A service's allocations as persisted (for status and tests)."""
        rec = self._records.get(key)
        return rec.to_json() if rec is not None else None

    def keys(self) -> list[str]:
        return sorted(self._records)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def save(self, force: bool = False) -> None:
        """Write the state file if anything changed: a temp file renamed over the old one, so
        a crash leaves either the old or the new state, never half of one."""
        if not self._dirty and not force:
            return
        # A service a line, each by json's C encoder (json.dump with indent runs in Python:
        # a third of a second at 20k services, on every pass that allocates).
        dumps, line = json.dumps, _plain_line
        services = ",\n".join(line(k, r) or f"  {dumps(k)}: {dumps(r.to_json())}" for k, r in sorted(self._records.items()))
        body = f"{{\n{services}\n }}" if services else "{}"
        text = f'{{\n "version": {STATE_VERSION},\n "services": {body}\n}}\n'
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.state_path.name}.", dir=self.state_path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._dirty = False
        log.debug("allocator.save path=%s services=%d", self.state_path, len(self._records))

    # --- ClusterIPs ----------------------------------------------------------------------

    def _cluster_ips(
        self,
        key: str,
        spec: dict,
        old: _Record | None,
        new: _Record,
        staged: set[Claim],
        claim_explicit: Callable[[Claim, str], None],
        free_for_me: Callable[[Claim], bool],
        new_spec: dict[str, Any],
    ) -> None:
        cluster_ip = spec.get("clusterIP") or ""
        given = spec.get("clusterIPs") or []
        # (the generators only for what is there: most manifests leave these fields to allocation)
        if not isinstance(given, list) or given and not all(isinstance(i, str) for i in given):
            raise AllocationError(f"spec.clusterIPs must be a list of addresses, got {given!r}")
        if not isinstance(cluster_ip, str):
            raise AllocationError(f"spec.clusterIP must be an address, got {cluster_ip!r}")
        if cluster_ip == "None" or (given and given[0] == "None"):
            return  # headless: no ClusterIP, as in a cluster
        if cluster_ip and given and given[0] != cluster_ip:
            raise AllocationError(f"spec.clusterIP {cluster_ip} is not spec.clusterIPs[0] {given[0]}")
        field = "spec.clusterIPs"
        if cluster_ip and not given:
            given = [cluster_ip]
            field = "spec.clusterIP"  # the one the manifest wrote, named in errors
        explicit: list[str] = []
        ip_fams: list[int] = []
        for text in given:
            try:
                canonical, family, _ = _address(text)
            except ValueError:
                raise AllocationError(f"{field}: not an IP address: {text!r}") from None
            explicit.append(canonical)
            ip_fams.append(family)
        fams_given = spec.get("ipFamilies") or []
        if not isinstance(fams_given, list) or fams_given and any(f not in _FAMILIES for f in fams_given):
            raise AllocationError(f"spec.ipFamilies must list IPv4 and/or IPv6, got {fams_given!r}")
        policy = spec.get("ipFamilyPolicy") or ""
        if policy and policy not in _POLICIES:
            raise AllocationError(f"spec.ipFamilyPolicy must be one of {', '.join(_POLICIES)}, got {policy!r}")
        fams = [_FAMILIES[f] for f in fams_given]
        if not policy:
            # kube-apiserver would refuse two families without a policy; a manifest that
            # names two clearly means both.
            policy = "RequireDualStack" if max(len(fams), len(ip_fams)) == 2 else "SingleStack"
        if len(set(fams)) != len(fams) or len(set(ip_fams)) != len(ip_fams) or len(fams) > 2 or len(ip_fams) > 2:
            raise AllocationError("a service has at most one ClusterIP per family")
        if fams and ip_fams and fams[: len(ip_fams)] != ip_fams:
            raise AllocationError(
                f"spec.clusterIPs {explicit} do not match spec.ipFamilies {fams_given} (same order)"
            )
        fams = fams or ip_fams
        if policy == "SingleStack" and len(fams) > 1:
            raise AllocationError("ipFamilyPolicy SingleStack allows one family")
        if not explicit and not self.families:
            # No clusterCIDR: the service has no ClusterIP, as the config documents.
            return
        if not fams:
            fams = [self.families[0]]
        if policy != "SingleStack" and len(fams) == 1:
            other = 6 if fams[0] == 4 else 4
            if other in self._nets:
                fams.append(other)
            elif policy == "RequireDualStack" and self.families:
                raise AllocationError(
                    f"ipFamilyPolicy RequireDualStack needs an IPv{other} service.clusterCIDR, none is configured"
                )

        for ip in explicit:
            claim_explicit(("ip", ip), f"clusterIP {ip}")
        ips = list(explicit)
        for i, fam in enumerate(fams):
            if i < len(explicit):
                continue
            if fam not in self._nets:
                if i > 0 and policy == "PreferDualStack":
                    fams = fams[:i]
                    break
                raise AllocationError(f"no IPv{fam} service.clusterCIDR is configured to allocate a ClusterIP from")
            ip = self._pick_ip(key, fam, old, free_for_me)
            staged.add(("ip", ip))
            ips.append(ip)
        new.cluster_ips = ips
        new_spec["clusterIP"] = ips[0]
        new_spec["clusterIPs"] = ips
        new_spec["ipFamilies"] = [_FAMILY_NAMES[f] for f in fams[: len(ips)]]
        new_spec["ipFamilyPolicy"] = policy

    def _pick_ip(self, key: str, fam: int, old: _Record | None, free_for_me: Callable[[Claim], bool]) -> str:
        rng = self._ip_ranges[fam]
        if old is not None:
            for ip in old.cluster_ips:
                _, version, value = _address(ip)
                if version == fam and value in rng and free_for_me(("ip", ip)):
                    return ip
        if self._used_in_range[str(fam)] >= rng.size:
            raise AllocationError(f"no free ClusterIP left in {self._nets[fam]}")
        for value in rng.probe(_seed(key, f"ipv{fam}")):
            ip = _text(value, fam)
            if free_for_me(("ip", ip)):
                return ip
        raise AllocationError(f"no free ClusterIP left in {self._nets[fam]}")

    # --- nodePorts -----------------------------------------------------------------------

    def _node_ports(
        self,
        key: str,
        spec: dict,
        stype: str,
        old: _Record | None,
        new: _Record,
        staged: set[Claim],
        claim_explicit: Callable[[Claim, str], None],
        free_for_me: Callable[[Claim], bool],
        new_spec: dict[str, Any],
    ) -> dict[int, int]:
        """Returns index in spec.ports -> nodePort to fill in."""
        if stype not in ("NodePort", "LoadBalancer"):
            # kube drops nodePorts from other types; kpr leaves them unreserved and unused.
            return {}
        auto = stype == "NodePort" or spec.get("allocateLoadBalancerNodePorts") is not False
        ports = spec.get("ports") or []
        if not isinstance(ports, list):
            raise AllocationError("spec.ports must be a list")
        fill: dict[int, int] = {}
        wanted: list[tuple[int, str, str, int]] = []  # (index, pkey, protocol, service port)
        for i, p in enumerate(ports):
            if not isinstance(p, dict):
                raise AllocationError(f"spec.ports[{i}] must be a mapping")
            proto = p.get("protocol") or "TCP"
            if proto not in _PROTOCOLS:
                raise AllocationError(f"spec.ports[{i}].protocol must be TCP, UDP or SCTP, got {proto!r}")
            pkey = f"{p.get('name') or ''}/{proto}/{p.get('port')}"
            np = p.get("nodePort")
            if np:
                if not isinstance(np, int) or isinstance(np, bool):
                    raise AllocationError(f"spec.ports[{i}].nodePort must be a number, got {np!r}")
                if np not in self.node_port_range:
                    raise AllocationError(
                        f"spec.ports[{i}].nodePort {np} is outside service.nodePortRange {self.node_port_range}"
                    )
                claim_explicit(("port", (proto, np)), f"nodePort {np}/{proto}")
                new.node_ports[pkey] = np
            elif auto:
                wanted.append((i, pkey, proto, p.get("port")))

        hc_wanted = False
        if stype == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            hc = spec.get("healthCheckNodePort")
            if hc:
                if not isinstance(hc, int) or isinstance(hc, bool):
                    raise AllocationError(f"spec.healthCheckNodePort must be a number, got {hc!r}")
                if hc not in self.node_port_range:
                    raise AllocationError(
                        f"spec.healthCheckNodePort {hc} is outside service.nodePortRange {self.node_port_range}"
                    )
                claim_explicit(("port", ("TCP", hc)), f"healthCheckNodePort {hc}")
                new.health_check_node_port = hc
            else:
                hc_wanted = True

        by_port: dict[Any, int] = {}  # service port -> nodePort picked in this call
        for i, pkey, proto, sport in wanted:
            np = self._pick_port(key, pkey, proto, old.node_ports.get(pkey) if old else None, by_port.get(sport), free_for_me, staged)
            staged.add(("port", (proto, np)))
            new.node_ports[pkey] = np
            by_port.setdefault(sport, np)
            fill[i] = np
        if hc_wanted:
            prev = old.health_check_node_port if old else None
            hc = self._pick_port(key, "healthCheck", "TCP", prev or None, None, free_for_me, staged)
            staged.add(("port", ("TCP", hc)))
            new.health_check_node_port = hc
            new_spec["healthCheckNodePort"] = hc
        return fill

    def _pick_port(
        self,
        key: str,
        pkey: str,
        proto: str,
        previous: int | None,
        sibling: int | None,
        free_for_me: Callable[[Claim], bool],
        staged: set[Claim],
    ) -> int:
        rng = self._port_range
        if previous is not None and previous in rng and free_for_me(("port", (proto, previous))):
            return previous
        # TCP and UDP ports with one port number share a nodePort, as kube-apiserver does.
        if sibling is not None and free_for_me(("port", (proto, sibling))):
            return sibling
        if self._used_in_range["port"] >= rng.size:
            raise AllocationError(f"no free nodePort left in service.nodePortRange {self.node_port_range}")
        staged_numbers = {c[1][1] for c in staged if c[0] == "port"}
        for value in rng.probe(_seed(key, pkey)):
            # A fresh value is free in every protocol, so a sibling can share it later.
            if value in staged_numbers:
                continue
            if all(free_for_me(("port", (p, value))) for p in _PROTOCOLS):
                return value
        raise AllocationError(f"no free nodePort left in service.nodePortRange {self.node_port_range}")

    # --- bookkeeping ---------------------------------------------------------------------

    def _inject(self, svc: dict, new_spec: dict[str, Any], fill: dict[int, int]) -> dict:
        if not new_spec and not fill:
            return svc
        # Copy only what changes: the source keeps the manifest's version to compare against.
        out = dict(svc)
        spec = dict(svc.get("spec") or {})
        spec.update(new_spec)
        if fill:
            ports = list(spec.get("ports") or [])
            for i, np in fill.items():
                ports[i] = {**ports[i], "nodePort": np}
            spec["ports"] = ports
        out["spec"] = spec
        return out

    def _owner(self, c: Claim) -> str | None:
        if c[0] == "ip":
            return self._ips.get(c[1])
        return self._ports.get(c[1])

    def _range_slot(self, c: Claim) -> str | None:
        if c[0] == "ip":
            _, version, value = _address(c[1])
            rng = self._ip_ranges.get(version)
            return str(version) if rng is not None and value in rng else None
        return "port" if c[1][1] in self._port_range else None

    def _take(self, c: Claim, key: str) -> None:
        if c[0] == "ip":
            self._ips[c[1]] = key
            slot = self._range_slot(c)
        else:
            self._ports[c[1]] = key
            n = c[1][1]
            self._port_numbers[n] = self._port_numbers.get(n, 0) + 1
            # The exhaustion count is by port number; a number used by several protocols
            # counts once.
            slot = self._range_slot(c) if self._port_numbers[n] == 1 else None
        if slot:
            self._used_in_range[slot] += 1

    def _drop(self, c: Claim) -> None:
        if c[0] == "ip":
            del self._ips[c[1]]
            slot = self._range_slot(c)
        else:
            del self._ports[c[1]]
            n = c[1][1]
            self._port_numbers[n] -= 1
            slot = None
            if self._port_numbers[n] == 0:
                del self._port_numbers[n]
                slot = self._range_slot(c)
        if slot:
            self._used_in_range[slot] -= 1

    @staticmethod
    def _forget(rec: _Record, c: Claim) -> None:
        # (the mask's bits are positions among the claims: read before they change)
        explicit = [x for x in rec.explicit if x != c]
        if c[0] == "ip":
            rec.cluster_ips = tuple(ip for ip in rec.cluster_ips if ip != c[1])
        else:
            proto, n = c[1]
            rec.node_ports = {k: v for k, v in rec.node_ports.items() if not (v == n and k.split("/")[1] == proto)} or _NO_PORTS
            if proto == "TCP" and rec.health_check_node_port == n:
                rec.health_check_node_port = 0
        rec.explicit = explicit

    @gc_paused  # (20k records made at once, kept for the agent's life)
    def _load(self) -> None:
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("allocator.load_failed path=%s error=%s; starting empty", self.state_path, e)
            return
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
                raise ValueError("no services mapping")
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
        except ValueError as e:
            log.warning("allocator.state_corrupt path=%s error=%s; starting empty", self.state_path, e)
            return
        plain = self._load_plain
        for key, entry in sorted(data["services"].items()):
            if plain(key, entry):
                continue
            try:
                rec = self._parse_record(entry)
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("allocator.state_entry_ignored service=%s error=%s", key, e)
                continue
            kept = _Record()
            marked = rec.explicit

            def keep(c: Claim) -> bool:
                # A value that no longer fits the config, or that two entries share, is
                # dropped; its service gets a fresh one. A ClusterIP its manifest wrote is
                # kept outside the automatic range too, as allocate() accepted it (say the
                # network's first host): dropped, its service took it again at every start
                # and the whole state file was written again.
                fits = self._range_slot(c) is not None or (c[0] == "ip" and c in marked)
                if not fits or self._owner(c) is not None:
                    log.info("allocator.state_value_dropped service=%s value=%s", key, _show(c))
                    return False
                self._take(c, key)
                return True

            kept.cluster_ips = [ip for ip in rec.cluster_ips if keep(("ip", ip))]
            kept.node_ports = {k: np for k, np in rec.node_ports.items() if keep(("port", (k.split("/")[1], np)))}
            hc = rec.health_check_node_port
            kept.health_check_node_port = hc if hc and keep(("port", ("TCP", hc))) else 0
            claims = kept.claims()
            kept.explicit = tuple(c for c in rec.explicit if c in claims)
            kept.load_balancer_ips = rec.load_balancer_ips
            kept.compact()
            if kept.claims() or kept.load_balancer_ips:
                self._records[key] = kept
        log.info("allocator.load path=%s services=%d", self.state_path, len(self._records))

    def _load_plain(self, key: str, entry: Any) -> bool:
        """Keep a state entry of the usual shape, one canonical IPv4 ClusterIP (marked explicit
        or not) that is free and in range, as the general path would; False, having done
        nothing, for any other entry. (That path took 15 us an entry: a third of a second at
        20k services, on the way to a restarted agent's first pass.)"""
        if type(entry) is not dict or not 1 <= len(entry) <= 2:
            return False
        ips = entry.get("clusterIPs")
        if type(ips) is not list or len(ips) != 1:
            return False
        explicit = entry.get("explicit")
        if len(entry) == 2 and explicit != ips:
            return False  # (another field, or explicit values that are not the ClusterIP)
        ip = ips[0]
        if type(ip) is not str or ip in self._ips:
            return False
        try:
            text, family, value = _address(ip)
        except ValueError:
            return False
        rng = self._ip_ranges.get(4)
        if family != 4 or text != ip or rng is None or value not in rng:
            return False
        self._ips[ip] = key
        self._used_in_range["4"] += 1
        self._records[key] = _Record(ips=ip, explicit_mask=1 if explicit else 0)
        return True

    @staticmethod
    def _parse_record(entry: Any) -> _Record:
        if not isinstance(entry, dict):
            raise ValueError("not a mapping")
        ips = [_address(i)[0] for i in entry.get("clusterIPs") or []]
        nps = {}
        for pkey, np in (entry.get("nodePorts") or {}).items():
            if not isinstance(pkey, str) or len(pkey.split("/")) != 3 or pkey.split("/")[1] not in _PROTOCOLS:
                raise ValueError(f"bad nodePort key {pkey!r}")
            if not isinstance(np, int) or isinstance(np, bool):
                raise ValueError(f"bad nodePort {np!r}")
            nps[pkey] = np
        hc = entry.get("healthCheckNodePort") or 0
        if not isinstance(hc, int) or isinstance(hc, bool):
            raise ValueError(f"bad healthCheckNodePort {hc!r}")
        explicit: set[Claim] = set()
        for text in entry.get("explicit") or []:
            number, sep, proto = str(text).partition("/")
            if sep:
                explicit.add(("port", (proto, int(number))))
            else:
                explicit.add(("ip", _address(text)[0]))
        lb = [_address(i)[0] for i in entry.get("loadBalancerIPs") or []]
        rec = _Record(ips=tuple(ips), node_ports=nps, health_check_node_port=hc, load_balancer_ips=tuple(lb))
        rec.explicit = explicit
        return rec


_quoted = json.encoder.encode_basestring_ascii  # (json.dumps of a str, without its call's overhead)


def _plain_line(key: str, rec: _Record) -> str:
    """The state file's line of a record of the usual shape (one ClusterIP, written in the
    manifest or not, and nothing else) as save's general way writes it; "" for any other.
    (to_json and two json.dumps a record took two thirds of save: 0.06 s of CPU at 20k
    services, in the pass that ends in the first sync.)"""
    ip = rec.ips
    if type(ip) is not str or rec.node_ports or rec.health_check_node_port or rec.load_balancer_ips or rec.explicit_mask > 1:
        return ""
    ip = _quoted(ip)
    if rec.explicit_mask:
        return f'  {_quoted(key)}: {{"clusterIPs": [{ip}], "explicit": [{ip}]}}'
    return f'  {_quoted(key)}: {{"clusterIPs": [{ip}]}}'


def _show(c: Claim) -> str:
    if c[0] == "ip":
        return str(c[1])
    return f"{c[1][1]}/{c[1][0]}"
