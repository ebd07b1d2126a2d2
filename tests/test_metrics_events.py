"""kpr.metrics.Metrics.on_event: every delivered event counted under its own labels (the
labelled children are cached per (plugin, event, result))."""

from __future__ import annotations

from kpr.metrics import Metrics


def _value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_events_are_counted_per_plugin_event_and_result() -> None:
    m = Metrics()
    calls = [("a", "upsert", True)] * 3 + [("a", "upsert", False)] * 2 + [("b", "upsert", True), ("a", "delete", True)]
    for plugin, event, ok in calls + calls:  # the second round goes through the cached children
        m.on_event(plugin, event, ok)
    total = "kpr_events_handled_total"
    assert _value(m, total, plugin="a", event="upsert", result="ok") == 6
    assert _value(m, total, plugin="a", event="upsert", result="error") == 4
    assert _value(m, total, plugin="b", event="upsert", result="ok") == 2
    assert _value(m, total, plugin="a", event="delete", result="ok") == 2
    assert _value(m, total, plugin="b", event="upsert", result="error") is None
    assert _value(m, "kpr_plugin_errors_total", plugin="a") == 4
    assert _value(m, "kpr_plugin_errors_total", plugin="b") is None
    # Another agent's metrics (its own registry) start from nothing.
    assert _value(Metrics(), total, plugin="a", event="upsert", result="ok") is None


def test_a_batch_is_counted_at_once() -> None:
    m = Metrics()
    m.on_event("servicemaps", "upsert", True, 20000)
    m.on_event("servicemaps", "upsert", True)
    m.on_event("a", "upsert", False, 3)
    total = "kpr_events_handled_total"
    assert _value(m, total, plugin="servicemaps", event="upsert", result="ok") == 20001
    assert _value(m, total, plugin="a", event="upsert", result="error") == 3
    assert _value(m, "kpr_plugin_errors_total", plugin="a") == 3
