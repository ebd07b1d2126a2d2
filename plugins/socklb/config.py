"""The `plugins.socklb` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from kpr.config import Section


class SockLBConfig(Section):
    # cgroup v2 directory the hooks attach to; every socket created below it is load
    # balanced. Default (unset): the root of the mounted cgroup v2 hierarchy (kpr mounts one
    # at /run/kpr/cgroupv2 when none is mounted).
    cgroup_path: Path | None = None
    # Translate only sockets of the host network namespace; pods' traffic is left to the
    # per-packet datapath (service meshes that redirect pod traffic need to see the ClusterIP).
    host_namespace_only: bool = False
    # Refuse bind() (EADDRINUSE) by host sockets to a NodePort on a node address, wildcard or
    # loopback, and to ExternalIP/LoadBalancer frontends, so no process steals their traffic.
    bind_protection: bool = True
    # When a backend leaves a service, destroy sockets still connected to it through the
    # service (sock_diag SOCK_DESTROY, as `ss -K`): TCP peers see ECONNABORTED, connected UDP
    # sockets stop sending into the void.
    terminate_connections: bool = False
    # Default backend selection. Maglev tables are built by the core's service map writer per
    # service (annotation service.kpr.io/lb-algorithm); the hooks honour each entry's flag.
    algorithm: Literal["random", "maglev"] = "random"
    # Entries of the per-socket reverse-NAT map (socket, backend) -> dialled service; LRU.
    reverse_nat_map_size: int = Field(262144, ge=1024, le=16 * 1024 * 1024)
    # Leave the hooks attached when the agent stops (pinned BPF links under bpf.pinPath), so
    # pods' connections to services keep working until the next agent adopts them; `kpr
    # cleanup` removes them. false: detach on stop (new connections to ClusterIPs fail while
    # no agent runs).
    keep_attached_on_stop: bool = True

    @field_validator("cgroup_path")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(v)!r}")
        return v
