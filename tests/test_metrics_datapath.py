"""The dashboard metrics: kpr_drops_total{hook,reason}, per-service frontends and backends,
and map occupancy (root: real maps in a scratch pin dir), scraped through the registry as
Prometheus would; and the Grafana dashboard in packaging/ only uses metrics kpr exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import generate_latest

from kpr.config import KprConfig
from kpr.metrics import Metrics
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey

DASHBOARD = Path(__file__).resolve().parents[1] / "packaging" / "grafana" / "kpr-datapath.json"


def _agent(pin: Path, services: list[Service], statuses: dict) -> SimpleNamespace:
    config = KprConfig.model_validate({"bpf": {"pinPath": str(pin)}})
    store = SimpleNamespace(snapshot=lambda: services)
    return SimpleNamespace(config=config, store=store, plugin_statuses=lambda: statuses, source=None)


def _scrape(agent: SimpleNamespace) -> str:
    m = Metrics()
    m.attach_agent(agent)
    return generate_latest(m.registry).decode()


SERVICES = [
    Service(
        ServiceKey("default", "web"),
        (
            Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", 80, Protocol.TCP,
                     (Backend("10.244.1.5", 8080), Backend("10.244.1.6", 8080, state=BackendState.TERMINATING))),
            Frontend(FrontendType.NODE_PORT, "192.168.0.1", 30080, Protocol.TCP, (Backend("10.244.1.5", 8080),)),
        ),
    )
]
STATUSES = {
    "tc_nodeport": {"counters": {"drop_source_range": 4.0, "drop_no_backend": 0.0, "new_snat": 7.0, "fwd_drop_short": 1.0}},
    "socklb": {"counters": {"no_backend": 2.0, "connect": 10.0}},
    "servicemaps": {"counters": {"errors": 0.0}},
}


def test_drops_by_hook_and_reason_and_per_service_gauges(tmp_path: Path) -> None:
    text = _scrape(_agent(tmp_path / "nothing-pinned", SERVICES, STATUSES))
    assert 'kpr_drops_total{hook="tc",reason="source_range"} 4.0' in text
    assert 'kpr_drops_total{hook="tc",reason="no_backend"} 0.0' in text
    assert 'kpr_drops_total{hook="tc",reason="short_frame"} 1.0' in text
    assert 'kpr_drops_total{hook="socket",reason="no_backend"} 2.0' in text
    assert "new_snat" not in text.split("kpr_drops_total")[1].split("\n# ")[0]
    assert 'kpr_service_frontends{service="default/web"} 2.0' in text
    assert 'kpr_service_backends{service="default/web",state="active"} 1.0' in text
    assert 'kpr_service_backends{service="default/web",state="terminating"} 1.0' in text
    # No maps pinned: no occupancy samples, and the scrape still works.
    assert "kpr_map_entries{" not in text


def test_map_occupancy_counts_the_kernel_maps(pin_dir) -> None:
    from kpr.servicemaps import ServiceMapWriter

    pin = pin_dir
    with ServiceMapWriter(pin).open() as w:
        w.upsert(SERVICES[0])
        text = _scrape(_agent(pin, SERVICES, {}))
        counts = w.kernel_counts()
        assert counts["kpr_backend"] == 2 and counts["kpr_svc"] > 2
        for name, n in counts.items():
            assert f'kpr_map_entries{{map="{name}"}} {float(n)}' in text
        assert 'kpr_map_max_entries{map="kpr_svc"} 262144.0' in text


def test_dashboard_uses_only_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs and board["title"] and board["uid"]
    exported = {
        "kpr_drops_total", "kpr_map_entries", "kpr_map_max_entries", "kpr_service_frontends", "kpr_service_backends",
        "kpr_services", "kpr_frontends", "kpr_backends", "kpr_plugin_healthy", "kpr_plugin_counter",
        "kpr_plugin_errors_total", "kpr_events_handled_total",
    }
    used = {m for e in exprs for m in re.findall(r"\b(kpr_[a-z_]+)", re.sub(r'"[^"]*"', '""', e))}
    assert used <= exported, used - exported
    assert {"kpr_drops_total", "kpr_map_entries", "kpr_service_backends"} <= used
    for p in board["panels"]:
        assert p.get("datasource", {}).get("uid") == "${datasource}", p["title"]
