"""A minimal third-party kpr plugin.

Enable it with

    plugins:
      servicelog:
        enabled: true
        path: /var/log/kpr-services.jsonl

and every service change the agent sees is appended to that file as one JSON line.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pydantic

from kpr import hookimpl
from kpr.config import Section
from kpr.model import PluginStatus


class ServiceLogConfig(Section):
    # File the events are appended to.
    path: Path = Path("/var/log/kpr-services.jsonl")
    # Also write each frontend's backends.
    with_backends: bool = True


class ServiceLog:
    """Instantiated once per agent by kpr's plugin manager (the entry point names the class)."""

    def __init__(self) -> None:
        self.cfg: ServiceLogConfig | None = None
        self.events = 0
        self.synced = False
        self._lock = threading.Lock()

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return ServiceLogConfig

    @hookimpl
    def kpr_configure(self, config: ServiceLogConfig, context) -> None:
        self.cfg = config
        self.log = context.log

    @hookimpl
    def kpr_start(self, context) -> None:
        self.cfg.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"event": "start", "node": context.node.name})

    @hookimpl
    def kpr_service_upsert(self, service) -> None:
        frontends = []
        for f in service.frontends:
            row = {"type": f.type.value, "address": f.address, "port": f.port, "protocol": f.protocol.value}
            if self.cfg.with_backends:
                row["backends"] = [f"{b.address}:{b.port}" for b in f.backends]
            frontends.append(row)
        self._write({"event": "upsert", "service": str(service.key), "frontends": frontends})

    @hookimpl
    def kpr_service_delete(self, key) -> None:
        self._write({"event": "delete", "service": str(key)})

    @hookimpl
    def kpr_sync_complete(self) -> None:
        self.synced = True
        self._write({"event": "synced"})

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        return PluginStatus(healthy=True, message=f"writing to {self.cfg.path}", counters={"events": self.events})

    @hookimpl
    def kpr_stop(self, context) -> None:
        self._write({"event": "stop"})

    def _write(self, record: dict) -> None:
        with self._lock:
            with self.cfg.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            self.events += 1
