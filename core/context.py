"""What the core hands each plugin at configure time."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .model import NodeInfo

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from .config import KprConfig
    from .kube.client import Connection
    from .sources import StatusWriter


class KubeAccess:
    """One connection to the API server for every plugin that asks, made on first use from
    the `source` section (apiServer, kubeconfig or in-cluster), whatever the source kind."""

    def __init__(self, config: "KprConfig"):
        self._config = config
        self._lock = threading.Lock()
        self._conn: "Connection | None" = None

    def client(self) -> "ApiClient":
        with self._lock:
            if self._conn is None:
                from .kube.client import connect

                self._conn = connect(self._config.source, user_agent="kpr-plugin")
            return self._conn.client

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass
class PluginContext:
    # The plugin's name: its entry point's name and its config section under `plugins`.
    name: str
    # Node facts as detected or configured; updated before kpr_node_changed.
    node: NodeInfo
    # A logger named kpr.plugins.<name>.
    log: logging.Logger
    # The whole validated agent config, read-only by convention (plugins read their own
    # section from kpr_configure and core keys such as bpf.pinPath from here).
    config: "KprConfig"
    # A directory this plugin may keep state in across restarts.
    state_dir: Path
    # The core's shared API-server connection; use kube_client().
    kube: KubeAccess | None = field(default=None, repr=False)
    # The agent's source (files or kubernetes); use status_writer().
    source: object | None = field(default=None, repr=False)

    def kube_client(self) -> "ApiClient":
        """A `kubernetes` ApiClient for the cluster the `source` section points at (TLS
        verified, token rotation followed). Raises kpr.kube.client.KubeConfigError, whose
        message names the key to set, when there is no way to reach an API server."""
        if self.kube is None:
            self.kube = KubeAccess(self.config)
        return self.kube.client()

    def status_writer(self) -> "StatusWriter":
        """The source's write-back of Service status.loadBalancer (kpr.sources.StatusWriter):
        how an address allocator hands its results to every plugin. Raises RuntimeError,
        naming the source, when the source cannot take writes."""
        from .sources import StatusWriter

        if not isinstance(self.source, StatusWriter):
            kind = getattr(getattr(self.config, "source", None), "kind", "?")
            raise RuntimeError(f"source.kind {kind!r} cannot take status writes (files and kubernetes can)")
        return self.source
