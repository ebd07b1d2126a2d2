"""Prometheus metrics on metrics.address, with a registry of the agent's own."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        self._event_children: dict[tuple[str, str, bool], Any] = {}
        self.plugin_errors = Counter("kpr_plugin_errors_total", "Plugin hook calls that raised", ["plugin"], registry=r)
        self.sync_duration = Gauge("kpr_sync_duration_seconds", "Seconds from start to the initial state delivered", registry=r)
        self.source_errors = Gauge("kpr_source_errors", "Files or objects the source could not use", registry=r)
        self._server = None

    def on_event(self, plugin: str, event: str, ok: bool, n: int = 1) -> None:
        """`n` events of one kind handled (the writer stage counts a batch it hands on at once)."""
        # Called for every event every plugin handles (40k in an initial sync of 20k
        # services): the labelled child is looked up once (labels() costs about 3 us).
        child = self._event_children.get((plugin, event, ok))
        if child is None:
            child = self._event_children[(plugin, event, ok)] = self.events.labels(plugin, event, "ok" if ok else "error")
        child.inc(n)
        if not ok:
            self.plugin_errors.labels(plugin).inc(n)

    def attach_agent(self, agent: "Agent") -> None:
        self.registry.register(_PluginCollector(agent))
        self.registry.register(_SourceCollector(agent))
        self.registry.register(_DropCollector(agent))
        self.registry.register(_MapCollector(agent))
        self.registry.register(_ServiceCollector(agent))

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


class _SourceCollector:
    """The kubernetes source's per-kind counters (events, relists, watch restarts, errors),
    read from its status at scrape time; nothing for a source that has none."""

    def __init__(self, agent: "Agent"):
        self._agent = agent

    def describe(self):
        return []

    def collect(self):
        events = CounterMetricFamily("kpr_source_events", "Watch events received, by kind and type", labels=["kind", "type"])
        relists = CounterMetricFamily("kpr_source_relists", "Lists after the first, by kind (410 Gone, expired resourceVersion)", labels=["kind"])
        restarts = CounterMetricFamily("kpr_source_watch_restarts", "Watches ended by the server and started again, by kind", labels=["kind"])
        errors = CounterMetricFamily("kpr_source_request_errors", "Failed list and watch requests, by kind", labels=["kind"])
        status = getattr(self._agent.source, "status", None)
        kinds = (status() if callable(status) else {}).get("kinds") or {}
        for kind, st in kinds.items():
            for type_, n in (st.get("events") or {}).items():
                events.add_metric([kind, type_], n)
            relists.add_metric([kind], st.get("relists", 0))
            restarts.add_metric([kind], st.get("watchRestarts", 0))
            errors.add_metric([kind], st.get("errors", 0))
        yield events
        yield relists
        yield restarts
        yield errors


class _DropCollector:
    """kpr_drops_total{hook,reason}: the programs' drop and refusal counters by reason (the
    names of kpr.drops, the ones `kpr explain` gives), read from plugin status at scrape time."""

    def __init__(self, agent: "Agent"):
        self._agent = agent

    def describe(self):
        return []

    def collect(self):
        from .drops import drops, hook_of

        fam = CounterMetricFamily("kpr_drops", "Packets dropped and calls refused by the data path, by hook and reason", labels=["hook", "reason"])
        for plugin, st in self._agent.plugin_statuses().items():
            for reason, n in sorted(drops(plugin, st.get("counters") or {}).items()):
                fam.add_metric([hook_of(plugin), reason], n)
        yield fam


class _MapCollector:
    """Occupancy of the pinned maps (conntrack, NAT, affinity and the service maps): entries
    and max_entries per map, counted in the kernel at scrape time (batch lookups)."""

    def __init__(self, agent: "Agent"):
        self._agent = agent

    def describe(self):
        return []

    def collect(self):
        from .readback import DatapathMaps

        entries = GaugeMetricFamily("kpr_map_entries", "Entries in a pinned BPF map", labels=["map"])
        limit = GaugeMetricFamily("kpr_map_max_entries", "Capacity (max_entries) of a pinned BPF map", labels=["map"])
        try:
            with DatapathMaps(self._agent.config.bpf.pin_path) as dm:
                for name, (n, cap) in sorted(dm.occupancy().items()):
                    entries.add_metric([name], n)
                    limit.add_metric([name], cap)
        except OSError as e:  # no maps (no plugin uses them) or not readable: no samples
            log.debug("metrics.maps_unreadable error=%s", e)
        yield entries
        yield limit


class _ServiceCollector:
    """Per service: frontends, and backends by state, from the desired state."""

    def __init__(self, agent: "Agent"):
        self._agent = agent

    def describe(self):
        return []

    def collect(self):
        fes = GaugeMetricFamily("kpr_service_frontends", "Frontends (address, port, protocol) of a service", labels=["service"])
        bes = GaugeMetricFamily("kpr_service_backends", "Distinct backends of a service, by state", labels=["service", "state"])
        store = self._agent.store
        for svc in store.snapshot() if store is not None else ():
            key = str(svc.key)
            fes.add_metric([key], len(svc.frontends))
            by_state: dict[str, set] = {}
            for f in svc.frontends:
                for b in f.backends:
                    by_state.setdefault(b.state.value, set()).add((b.address, b.port))
            for state, members in sorted(by_state.items()):
                bes.add_metric([key, state], len(members))
        yield fes
        yield bes
