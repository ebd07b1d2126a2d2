"""The `plugins.host_routing` config section."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from kpr.config import Section

_IFNAME = re.compile(r"^[^/\s:]{1,15}$")


class HostRoutingConfig(Section):
    # External devices whose ingress carries traffic to local pods; empty: node.devices.
    devices: list[str] = []
    # Deliver into pods on veth/netkit with bpf_redirect_peer (straight into the pod's
    # namespace). false, or a kernel without the helper: bpf_redirect out of the host-side device.
    redirect_peer: bool = True
    # Send pods' traffic out of the node with bpf_redirect_neigh (the kernel resolves the next
    # hop). false, or a kernel without the helper: the host's stack routes it.
    redirect_neigh: bool = True
    # Per-packet load balancing at pods' host-side devices for services (ClusterIP, ExternalIP,
    # LoadBalancer) dialled by pods the socket hooks do not cover (socklb hostNamespaceOnly,
    # pods outside socklb's cgroup). false: such pods cannot reach services.
    cluster_ip: bool = Field(True, alias="clusterIP")
    # Leave the programs attached when the agent stops (packets keep flowing; `kpr cleanup`
    # removes them).
    keep_attached_on_stop: bool = True
    # Seconds between full rescans of links and routes (events drive updates; this is the net).
    resync_interval: float = Field(30.0, ge=1, le=3600)
    # Local pod addresses the program can hold (both families).
    max_pods: int = Field(16384, ge=16, le=1 << 20)

    @field_validator("devices")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _IFNAME.match(name):
                raise ValueError(f"{name!r} is not a network device name (1-15 characters, no '/', ':' or spaces)")
        return v
