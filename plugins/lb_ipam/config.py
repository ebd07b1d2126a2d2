"""The `plugins.lb_ipam` config section: address pools and how a service picks one."""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator, model_validator

from kpr.config import Section
from kpr.selectors import LabelSelectorConfig

from .pools import AddressSpace, parse_addresses

DEFAULT_CLASS = "lbipam.kpr.io/lb-ipam"
_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


class PoolConfig(Section):
    # Names the pool in the lbipam.kpr.io/pool annotation, in status and in metrics.
    name: str
    # CIDRs (203.0.113.0/28) and inclusive ranges (203.0.113.100-203.0.113.120), either
    # family; the order matters: addresses appended at the end move few services.
    addresses: list[str] = Field(min_length=1)
    # Only services whose labels match; empty: every service.
    service_selector: LabelSelectorConfig = LabelSelectorConfig()
    # Only services in these namespaces; empty: every namespace.
    namespaces: list[str] = []
    # false: only services that name this pool (annotation) or one of its addresses.
    auto_assign: bool = True
    # Never hand out IPv4 addresses ending in .0 or .255 (some clients drop them).
    avoid_buggy_ips: bool = Field(False, alias="avoidBuggyIPs")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _POOL_NAME.match(v):
            raise ValueError(f"pool name must be a DNS label (lowercase letters, digits, '-', '.'), got {v!r}")
        return v

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        parse_addresses(v)  # raises naming the bad entry
        return v

    def spaces(self) -> dict[int, AddressSpace]:
        ranges = parse_addresses(self.addresses)
        out: dict[int, AddressSpace] = {}
        for fam in (4, 6):
            mine = [(a, b) for f, a, b in ranges if f == fam]
            if mine:
                out[fam] = AddressSpace(fam, mine, avoid_buggy=self.avoid_buggy_ips)
        return out


class LeaseConfig(Section):
    # coordination.k8s.io/v1 Lease electing the one node that writes allocations (the
    # kubernetes source only; the files source needs no election).
    name: str = "kpr-lb-ipam"
    namespace: str = "kube-system"
    # Seconds a holder that stops renewing keeps the Lease before another node takes over.
    duration: float = Field(15.0, ge=1.0, le=3600.0)
    # Seconds between renewals (and attempts to acquire).
    retry_period: float = Field(2.0, gt=0.0, le=600.0)

    @model_validator(mode="after")
    def _periods(self) -> "LeaseConfig":
        if self.retry_period >= self.duration:
            raise ValueError(f"retryPeriod ({self.retry_period:g}) must be shorter than duration ({self.duration:g})")
        return self


class LbIpamConfig(Section):
    pools: list[PoolConfig] = []
    # Services with this spec.loadBalancerClass, or none, get addresses; others belong to
    # another implementation and are left alone.
    load_balancer_class: str = DEFAULT_CLASS
    lease: LeaseConfig = LeaseConfig()

    @model_validator(mode="after")
    def _distinct(self) -> "LbIpamConfig":
        seen: dict[str, int] = {}
        for i, p in enumerate(self.pools):
            if p.name in seen:
                raise ValueError(f"pools[{i}].name: {p.name!r} is also pools[{seen[p.name]}].name")
            seen[p.name] = i
        # Overlapping pools would let one address go to two services: refused here, naming
        # both, rather than guessed at run time.
        spans: list[tuple[int, int, int, str]] = []
        for p in self.pools:
            for fam, a, b in parse_addresses(p.addresses):
                spans.append((fam, a, b, p.name))
        spans.sort()
        for (f1, a1, b1, n1), (f2, a2, b2, n2) in zip(spans, spans[1:]):
            if f1 == f2 and a2 <= b1:
                make = ipaddress.IPv4Address if f1 == 4 else ipaddress.IPv6Address
                where = f"pool {n1!r}" if n1 == n2 else f"pools {n1!r} and {n2!r}"
                raise ValueError(f"{where} overlap at {make(a2)}-{make(min(b1, b2))}")
        return self
