"""The `plugins.announce_bgp` config section.

Every value that ends up in ExaBGP's config file is checked here, so a mistake is reported
by `kpr check-config` with its key, and nothing a user writes can change the structure of the
generated file (passwords reach ExaBGP base64-encoded).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from kpr.config import IPAddress, Section
from kpr.selectors import LabelSelectorConfig

ASN_MAX = 2**32 - 1
# RFC 6793's AS_TRANS stands in for a 4-byte ASN towards old speakers; it is never an AS.
AS_TRANS = 23456
U32_MAX = 2**32 - 1
# The Linux TCP MD5 key limit (TCP_MD5SIG_MAXKEYLEN).
MD5_MAX = 80

WELL_KNOWN_COMMUNITIES = {
    "no-export": "no-export",
    "no_export": "no-export",
    "no-advertise": "no-advertise",
    "no_advertise": "no-advertise",
    "no-export-subconfed": "no-export-subconfed",
    "nopeer": "nopeer",
    "no-peer": "nopeer",
    "blackhole": "blackhole",
}

_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
# Characters that could not be passed through ExaBGP's `run` line as one token.
_UNSAFE_PATH = re.compile(r"[\s;\"'{}\[\]#]")


def _asn(value: Any) -> Any:
    # bool is an int to Python; `asn: yes` is a mistake, not AS 1.
    if isinstance(value, bool):
        raise ValueError(f"must be an AS number 1-{ASN_MAX}, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        high, dot, low = text.partition(".")
        if dot and high.isdigit() and low.isdigit():  # asdot, RFC 5396
            if int(high) > 65535 or int(low) > 65535:
                raise ValueError(f"must be an AS number 1-{ASN_MAX}, got {value!r}")
            return int(high) * 65536 + int(low)
        if text.isdigit():
            return int(text)
        raise ValueError(f"must be an AS number 1-{ASN_MAX}, got {value!r}")
    if not isinstance(value, int):
        raise ValueError(f"must be an AS number 1-{ASN_MAX}, got {value!r}")
    return value


def _asn_range(value: int) -> int:
    if not 1 <= value <= ASN_MAX:
        raise ValueError(f"must be an AS number 1-{ASN_MAX}, got {value}")
    if value == AS_TRANS:
        raise ValueError(f"{AS_TRANS} is AS_TRANS (RFC 6793), not a usable AS number")
    return value


ASN = Annotated[int, BeforeValidator(_asn), AfterValidator(_asn_range)]


def _u32(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number 0-{U32_MAX}, got {value!r}")
    return value


U32 = Annotated[int, BeforeValidator(_u32), Field(ge=0, le=U32_MAX)]


def community(value: str) -> str:
    """A standard community (RFC 1997) as ExaBGP writes it: "asn:value" or a well-known name."""
    text = str(value).strip()
    named = WELL_KNOWN_COMMUNITIES.get(text.lower())
    if named:
        return named
    parts = text.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts) and all(int(p) <= 65535 for p in parts):
        return f"{int(parts[0])}:{int(parts[1])}"
    raise ValueError(
        f"not a BGP community: {value!r} (want ASN:VALUE with both 0-65535, or one of "
        f"{', '.join(sorted(set(WELL_KNOWN_COMMUNITIES.values())))})"
    )


def large_community(value: str) -> str:
    """A large community (RFC 8092): "global:local1:local2", each 0-4294967295."""
    parts = str(value).strip().split(":")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and all(int(p) <= U32_MAX for p in parts):
        return ":".join(str(int(p)) for p in parts)
    raise ValueError(f"not a BGP large community: {value!r} (want GLOBAL:LOCAL1:LOCAL2, each 0-{U32_MAX})")


Community = Annotated[str, BeforeValidator(lambda v: community(v) if isinstance(v, str) else v)]
LargeCommunity = Annotated[str, BeforeValidator(lambda v: large_community(v) if isinstance(v, str) else v)]


def _family_of(address: str) -> str:
    return "ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6"


class PeerConfig(Section):
    # The router's address: the session goes to it.
    address: IPAddress
    asn: ASN
    port: int = Field(179, ge=1, le=65535)
    # Seconds; 0 (no keepalives) or at least 3, as RFC 4271 allows.
    hold_time: int = Field(90, ge=0, le=65535)
    # TCP MD5 signature (RFC 2385) shared with the router.
    password: str | None = None
    # TTL of the session's packets, for a router more than one hop away; null leaves the
    # system default (ExaBGP does not limit eBGP sessions to one hop on its own).
    multihop: int | None = Field(None, ge=1, le=255)
    # Local address the session is opened from; default: chosen by the kernel's routing.
    source_address: IPAddress | None = None
    # Address families carried over the session; default: the family of `address`. Routes
    # of the other family need a next hop of their own family (a node address).
    families: list[Literal["ipv4", "ipv6"]] = []

    @field_validator("hold_time")
    @classmethod
    def _hold(cls, v: int) -> int:
        if v in (1, 2):
            raise ValueError(f"must be 0 or at least 3 seconds (RFC 4271), got {v}")
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        if v is None:
            return v
        raw = v.encode()
        if not 1 <= len(raw) <= MD5_MAX:
            raise ValueError(f"must be 1-{MD5_MAX} bytes long (the kernel's TCP MD5 key limit)")
        if any(c < 0x20 or c == 0x7F for c in raw):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("multihop", mode="before")
    @classmethod
    def _multihop(cls, v: Any) -> Any:
        # `multihop: true` is how MetalLB-style configs say "any distance".
        if v is True:
            return 255
        if v is False:
            return None
        return v

    @field_validator("families")
    @classmethod
    def _unique_families(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a family twice: {v}")
        return v

    @model_validator(mode="after")
    def _source_family(self) -> "PeerConfig":
        if self.source_address is not None and _family_of(self.source_address) != _family_of(self.address):
            raise ValueError(
                f"sourceAddress {self.source_address} and address {self.address} must be of the same family"
            )
        return self

    @property
    def session_family(self) -> str:
        return _family_of(self.address)

    @property
    def address_families(self) -> tuple[str, ...]:
        return tuple(self.families) if self.families else (self.session_family,)


class AdvertisementConfig(Section):
    # Which frontends' addresses are announced.
    addresses: list[Literal["LoadBalancer", "ExternalIP", "ClusterIP"]] = ["LoadBalancer", "ExternalIP"]
    communities: list[Community] = []
    large_communities: list[LargeCommunity] = []
    # Only meaningful towards iBGP peers; eBGP routers ignore it.
    local_preference: U32 | None = None
    med: U32 | None = None
    # Services whose labels match; empty: every service.
    service_selector: LabelSelectorConfig = LabelSelectorConfig()
    # Services in these namespaces; empty: every namespace.
    namespaces: list[str] = []
    # Peers (their addresses) that get these routes; empty: every peer.
    peers: list[IPAddress] = []

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one of LoadBalancer, ExternalIP, ClusterIP")
        return list(dict.fromkeys(v))

    @field_validator("communities", "large_communities")
    @classmethod
    def _dedup(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class AnnounceBGPConfig(Section):
    local_asn: ASN = Field(alias="localASN")
    # BGP identifier; default: the node's first IPv4 address (followed when it changes).
    router_id: IPAddress | None = Field(None, alias="routerID")
    peers: list[PeerConfig] = []
    advertisements: list[AdvertisementConfig] = [AdvertisementConfig()]
    # Seconds a router keeps our routes while ExaBGP or the agent restarts (RFC 4724
    # graceful restart); 0 disables it.
    graceful_restart_time: int = Field(120, ge=0, le=4095)
    # Run ExaBGP inside this named network namespace (`ip netns exec`), e.g. a VRF or
    # management namespace; "" runs it in the agent's own.
    netns: str = ""
    # The exabgp program; "" looks next to the agent's Python, then on PATH.
    exabgp: str = ""

    @field_validator("router_id")
    @classmethod
    def _router_id(cls, v: str | None) -> str | None:
        if v is not None and ipaddress.ip_address(v).version != 4:
            raise ValueError(f"must be an IPv4 address (a BGP identifier is 32 bits), got {v!r}")
        return v

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, v: list[PeerConfig]) -> list[PeerConfig]:
        seen: dict[str, int] = {}
        for i, p in enumerate(v):
            if p.address in seen:
                raise ValueError(f"peers.{seen[p.address]} and peers.{i} both have address {p.address}")
            seen[p.address] = i
        return v

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: str) -> str:
        if v and (not _NETNS_RE.match(v) or v in (".", "..")):
            raise ValueError(f"not a network namespace name: {v!r}")
        return v

    @field_validator("exabgp")
    @classmethod
    def _exabgp(cls, v: str) -> str:
        if v and _UNSAFE_PATH.search(v):
            raise ValueError(f"must be a plain path without spaces or quotes, got {v!r}")
        return v

    @model_validator(mode="after")
    def _advertised_peers(self) -> "AnnounceBGPConfig":
        known = {p.address for p in self.peers}
        for i, adv in enumerate(self.advertisements):
            for address in adv.peers:
                if address not in known:
                    raise ValueError(f"advertisements.{i}.peers: {address} is not one of the configured peers")
        return self
