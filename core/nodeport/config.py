"""Config keys the NodePort plugins share (plugins.tc_nodeport, plugins.xdp_nodeport)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kpr.bpf.maglev import is_prime
from kpr.config import Section

Mode = Literal["snat", "dsr", "hybrid"]


class NodePortSection(Section):
    """The keys both NodePort plugins understand; each adds `mode` and its own."""

    mode: str = "snat"
    # Default backend selection: random or maglev (per service: service.kpr.io/lb-algorithm).
    # The core's service map writer applies it (and the next two) to the shared maps; enabled
    # plugins that set it must agree. Status shows what the maps really hold.
    algorithm: Literal["random", "maglev"] = "random"
    # Maglev table size (prime), for the writer's tables.
    maglev_table_size: int = Field(16381, ge=7, le=1_000_003)
    # Tracked flows: the shared conntrack and SNAT maps (created by the writer) and this
    # plugin's reverse-translation map.
    conntrack_size: int = Field(524288, ge=1024, le=64 * 1024 * 1024)
    # Source ports SNAT allocates, "first-last". Each (node address, backend address:port) pair
    # has this many concurrent flows at most; keep it clear of net.ipv4.ip_local_port_range
    # (default 32768-60999) so the node's own connections never collide with a mapping.
    snat_port_range: str = "61000-65535"
    # Serve healthCheckNodePort for externalTrafficPolicy=Local services (HTTP 200/503).
    health_check: bool = True
    # Address the health check listeners bind to ("" = every address of the node, both families).
    health_check_address: str = ""
    # Seconds between conntrack garbage collections (expired flows, their SNAT ports and
    # reverse entries; UDP flows whose backend is gone).
    gc_interval: float = Field(10.0, ge=0.5, le=3600)
    # Answer a frontend without backends with ICMP port unreachable (kube-proxy's REJECT); false drops.
    icmp_unreachable: bool = True
    # NodePort's flows in the slot tables (kpr_np_ct_slots for conntrack, kpr_snat_slots for a new
    # SNAT flow's reply side: one claimed line each, no LRU insert; kpr_ct and kpr_snat only for
    # the overflow). false: kpr_ct and kpr_snat alone, as kpr did before (32 MiB less kernel
    # memory; a new SNAT flow costs about 1.7 times as much). Both NodePort plugins must agree.
    flow_slots: bool = True
    # Leave the programs attached when the agent stops (pinned BPF links, or the fallback
    # attachments), so NodePorts keep working until the next agent adopts them; `kpr cleanup`
    # removes them. false: detach on stop.
    keep_attached_on_stop: bool = True

    @field_validator("maglev_table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        if not is_prime(v):
            raise ValueError(f"must be a prime number, got {v}")
        return v

    @field_validator("snat_port_range")
    @classmethod
    def _ports(cls, v: str) -> str:
        parts = v.split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"must look like 61000-65535, got {v!r}")
        first, last = (int(p) for p in parts)
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"must be an ascending range within 1024-65535, got {v!r}")
        return f"{first}-{last}"

    @property
    def snat_ports(self) -> tuple[int, int]:
        first, last = (int(p) for p in self.snat_port_range.split("-"))
        return first, last

    @field_validator("health_check_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v:
            import ipaddress

            try:
                return str(ipaddress.ip_address(v))
            except ValueError:
                raise ValueError(f"not an IP address: {v!r}") from None
        return v
