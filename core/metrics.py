"""Prometheus metrics on metrics.address, with a registry of the agent's own."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.services = Gauge("kpr_services", "Services with a data path", registry=r)
        self.frontends = Gauge("kpr_frontends", "Frontends (address, port, protocol) served", registry=r)
        self.backends = Gauge("kpr_backends", "Backends across all frontends", registry=r)
        self.events = Counter("kpr_events_handled_total", "Bus events delivered to plugins", ["plugin", "event", "result"], registry=r)
        self.plugin_errors = Counter("kpr_plugin_errors_total", "Plugin hook calls that raised", ["plugin"], registry=r)
        self.sync_duration = Gauge("kpr_sync_duration_seconds", "Seconds from start to the initial state delivered", registry=r)
        self.source_errors = Gauge("kpr_source_errors", "Files or objects the source could not use", registry=r)
        self._server = None

    def on_event(self, plugin: str, event: str, ok: bool) -> None:
        self.events.labels(plugin, event, "ok" if ok else "error").inc()
        if not ok:
            self.plugin_errors.labels(plugin).inc()

    def attach_agent(self, agent: "Agent") -> None:
        self.registry.register(_PluginCollector(agent))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        log.info("metrics.listen address=%s", address)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _PluginCollector:
    """Per-plugin health and counters, read from kpr_status at scrape time."""

    def __init__(self, agent: "Agent"):
        self._agent = agent

    def describe(self):
        return []

    def collect(self):
        healthy = GaugeMetricFamily("kpr_plugin_healthy", "1 when the plugin reports healthy", labels=["plugin"])
        counters = GaugeMetricFamily("kpr_plugin_counter", "Counters plugins report in their status", labels=["plugin", "counter"])
        for name, st in self._agent.plugin_statuses().items():
            healthy.add_metric([name], 1.0 if st.get("healthy") else 0.0)
            for cname, value in (st.get("counters") or {}).items():
                try:
                    counters.add_metric([name, cname], float(value))
                except (TypeError, ValueError):
                    continue
        yield healthy
        yield counters
