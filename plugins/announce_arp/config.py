"""The `plugins.announce_arp` config section.

Two memberships decide which nodes are alive: `heartbeat` (UDP heartbeats between `members`,
keys members, heartbeatPort, heartbeatInterval, deadInterval, keyFile, maxClockSkew) and
`kubernetes` (one coordination.k8s.io Lease per node, keys leaseNamespace, leaseDuration,
renewInterval, leasePrefix). A key of the other membership is an error naming the key rather
than silently ignored: a `members` list left in place after switching to Leases would
otherwise look authoritative while nothing reads it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kpr.config import Section

# Linux interface names: at most 15 characters, no slash, colon or whitespace; quotes and
# backslashes are legal in Linux but cannot be written in an nftables set, so refused too.
_IFNAME = re.compile(r'^[^/\s:"\\]{1,15}$')
_NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
# A Kubernetes namespace (DNS label) and an object name prefix (DNS subdomain characters).
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9][-a-z0-9.]{0,200}$")

# Keys of each membership; the other membership refuses them by name.
HEARTBEAT_KEYS = {
    "members": "members",
    "heartbeat_port": "heartbeatPort",
    "heartbeat_interval": "heartbeatInterval",
    "dead_interval": "deadInterval",
    "key_file": "keyFile",
    "max_clock_skew": "maxClockSkew",
}
LEASE_KEYS = {
    "lease_namespace": "leaseNamespace",
    "lease_duration": "leaseDuration",
    "renew_interval": "renewInterval",
    "lease_prefix": "leasePrefix",
}

# Datapath plugins that take (DNAT or drop) every packet to a VIP before routing; with one of
# them enabled the explicit drop table is not needed (dropUnserved: auto).
DATAPATH_PLUGINS = ("tc_nodeport", "xdp_nodeport")


@dataclass(frozen=True)
class Member:
    name: str
    address: str

    def __str__(self) -> str:
        return f"{self.name}={self.address}"


def parse_member(text: str) -> Member:
    name, sep, addr = str(text).partition("=")
    name, addr = name.strip(), addr.strip()
    if not sep or not name or not addr:
        raise ValueError(f"must be name=address, got {text!r}")
    if not _NODE_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid node name")
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        raise ValueError(f"{addr!r} is not an IP address (in {text!r})") from None
    if ip.is_multicast or ip.is_unspecified:
        raise ValueError(f"{addr!r} cannot be a heartbeat endpoint (in {text!r})")
    return Member(name, str(ip))


class AnnounceARPConfig(Section):
    # Interfaces ARP requests and neighbour solicitations are answered on, and gratuitous
    # announcements sent from; checked to exist when the plugin starts.
    interfaces: list[str] = Field(min_length=1)
    # How nodes learn who is alive and what each may announce: heartbeat (UDP between
    # `members`) or kubernetes (a coordination.k8s.io Lease per node, through the API server
    # the `source` section points at).
    membership: Literal["heartbeat", "kubernetes"] = "heartbeat"
    # Every node that may announce, as name=address of its heartbeat endpoint; this node's
    # name (node.name) must be one of them. Empty: this node alone announces every address.
    members: list[str] = []
    # UDP port heartbeats are sent to and received on, on every member.
    heartbeat_port: int = Field(7946, ge=1, le=65535)
    # Seconds between heartbeats.
    heartbeat_interval: float = Field(0.2, gt=0, le=60)
    # Seconds of silence after which a member counts as dead and loses its addresses.
    dead_interval: float = Field(1.0, gt=0, le=600)
    # Shared secret (at least 16 bytes) heartbeats are authenticated with (HMAC-SHA256).
    # Required when members has more than one entry.
    key_file: Path | None = None
    # Gratuitous ARP / unsolicited NA sent this many times when this node takes an address.
    garp_repeat: int = Field(3, ge=1, le=100)
    # Seconds between those repeats.
    garp_spacing: float = Field(0.5, gt=0, le=60)
    # Seconds between periodic re-announcements of every owned address; 0 disables.
    garp_interval: float = Field(0.0, ge=0, le=3600)
    # Drop forwarded traffic arriving on `interfaces` for announced addresses (nftables table
    # inet kpr_announce_arp), so a node never routes VIP traffic back onto the segment.
    # auto: only when no datapath plugin (tc_nodeport, xdp_nodeport) is enabled.
    drop_unserved: Literal["auto", "true", "false"] = "auto"
    # Seconds a node that has just started holds back its claims while live peers have not
    # finished their initial sync (when every node starts at once, none claims addresses
    # that a peer still loading its services will rank first for). 0 disables.
    peer_sync_timeout: float = Field(5.0, ge=0, le=600)
    # Heartbeats whose timestamp is further than this from the local clock are refused
    # (replay protection across restarts); nodes' clocks must agree within it.
    max_clock_skew: float = Field(30.0, gt=0, le=3600)
    # --- membership: kubernetes ---
    # Namespace of the Leases (it exists in every cluster, as Cilium's L2 leases use it).
    lease_namespace: str = "kube-system"
    # leaseDurationSeconds of this node's Lease: a node that stops renewing (killed, or cut
    # off from the API server) drops out this long after its last renewal. Whole seconds, as
    # in the Lease API.
    lease_duration: int = Field(3, ge=1, le=3600)
    # Seconds between renewals; at most half leaseDuration, or one slow write moves addresses.
    renew_interval: float = Field(1.0, ge=0.1, le=1800)
    # Each node's Lease is <leasePrefix><node name>.
    lease_prefix: str = "kpr-arp-"
    # Who answers ARP requests and neighbour solicitations: auto (a tc BPF program on each
    # interface, through a pinned tcx link; Python where it cannot attach) or python (a
    # packet socket per interface, as before the program existed).
    responder: Literal["auto", "python"] = "auto"
    # Frontend types whose addresses are announced.
    frontend_types: list[Literal["LoadBalancer", "ExternalIP"]] = ["LoadBalancer", "ExternalIP"]
    # Announce only services whose labels include all of these (empty: every service).
    service_selector: dict[str, str] = {}

    @field_validator("drop_unserved", mode="before")
    @classmethod
    def _bool_text(cls, v: object) -> object:
        # YAML turns a bare true/false into a bool; accept it as the same setting.
        if isinstance(v, bool):
            return "true" if v else "false"
        return v

    @field_validator("interfaces")
    @classmethod
    def _ifnames(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _IFNAME.match(name):
                raise ValueError(f"{name!r} is not a valid interface name")
        if len(set(v)) != len(v):
            raise ValueError("an interface is listed twice")
        return v

    @field_validator("members")
    @classmethod
    def _members(cls, v: list[str]) -> list[str]:
        parsed = [parse_member(m) for m in v]
        names = [m.name for m in parsed]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"member name listed twice: {', '.join(dup)}")
        addrs = [m.address for m in parsed]
        dup = sorted({a for a in addrs if addrs.count(a) > 1})
        if dup:
            raise ValueError(f"member address listed twice: {', '.join(dup)}")
        families = {ipaddress.ip_address(a).version for a in addrs}
        if len(families) > 1:
            raise ValueError("member addresses must all be IPv4 or all IPv6")
        return [str(m) for m in parsed]

    @model_validator(mode="before")
    @classmethod
    def _explicit_defaults(cls, data: object) -> object:
        # The cross-checks below are field validators so an error carries its key; a key
        # left out is filled in here under its camelCase name, or pydantic would report a
        # default's error under the Python name (key_file instead of keyFile).
        # Only the chosen membership's keys are filled: a key of the other one is refused
        # when given, so it must stay absent when it was not.
        if isinstance(data, dict):
            data = dict(data)
            if data.get("membership") == "kubernetes":
                fill = (("renewInterval", "renew_interval"),)
            else:
                fill = (("deadInterval", "dead_interval"), ("keyFile", "key_file"))
            for alias, name in fill:
                if alias not in data and name not in data:
                    data[alias] = cls.model_fields[name].default
        return data

    # Declared before the checks below so they run first for a key of the wrong membership.
    @field_validator(*HEARTBEAT_KEYS, mode="before")
    @classmethod
    def _heartbeat_only(cls, v: object, info: ValidationInfo) -> object:
        if info.data.get("membership") == "kubernetes":
            key = HEARTBEAT_KEYS[info.field_name or ""]
            raise ValueError(
                f"only for membership: heartbeat; with membership: kubernetes the nodes are the "
                f"holders of the Leases in leaseNamespace and need no {key} (remove it)"
            )
        return v

    @field_validator(*LEASE_KEYS, mode="before")
    @classmethod
    def _lease_only(cls, v: object, info: ValidationInfo) -> object:
        if info.data.get("membership") != "kubernetes":
            raise ValueError("only for membership: kubernetes (set membership: kubernetes, or remove it)")
        return v

    @field_validator("lease_namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _NAMESPACE.match(v):
            raise ValueError(f"{v!r} is not a valid namespace name")
        return v

    @field_validator("lease_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.match(v):
            raise ValueError(f"{v!r} cannot start a Lease name (lower-case letters, digits, '-' and '.')")
        return v

    @field_validator("renew_interval")
    @classmethod
    def _renew_within_lease(cls, v: float, info: ValidationInfo) -> float:
        duration = info.data.get("lease_duration")
        if duration is not None and v > duration / 2:
            raise ValueError(f"must be at most half leaseDuration ({duration}), or one slow renewal moves addresses, got {v}")
        return v

    # Field validators (not a model validator) so an error carries the key it is about;
    # fields validate in declaration order, so the ones compared with are in info.data.
    @field_validator("dead_interval")
    @classmethod
    def _dead_after_heartbeats(cls, v: float, info: ValidationInfo) -> float:
        hb = info.data.get("heartbeat_interval")
        if hb is not None and v < 2 * hb:
            raise ValueError(f"must be at least twice heartbeatInterval ({hb}), or one lost heartbeat moves addresses, got {v}")
        return v

    @field_validator("key_file")
    @classmethod
    def _key_needed(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None and len(info.data.get("members") or []) > 1:
            raise ValueError("required when members lists more than one node")
        if v is not None and not v.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(v)!r}")
        return v

    def lease_name(self, node: str) -> str:
        return f"{self.lease_prefix}{node}"

    @property
    def member_list(self) -> list[Member]:
        return [parse_member(m) for m in self.members]

    def drop_enabled(self, enabled_plugins: list[str]) -> bool:
        if self.drop_unserved == "auto":
            return not any(p in enabled_plugins for p in DATAPATH_PLUGINS)
        return self.drop_unserved == "true"
