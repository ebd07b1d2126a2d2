"""The event bus: coalescing, isolation between plugins, retries, and sync ordering."""

import threading
import time

from kpr.bus import Backoff, EventBus
from kpr.model import Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey


def svc(name: str, port: int = 80) -> Service:
    return Service(ServiceKey("default", name), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", port, Protocol.TCP),))


class Recorder:
    """Stands in for a plugin's hook invoker: records calls, can block or fail on demand."""

    def __init__(self):
        self.calls = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_times = {}

    def __call__(self, hook, **kw):
        self.gate.wait(5)
        arg = kw.get("service") or kw.get("key") or kw.get("node")
        label = str(arg.key) if isinstance(arg, Service) else str(arg) if arg is not None else ""
        if self.fail_times.get(label, 0) > 0:
            self.fail_times[label] -= 1
            raise RuntimeError(f"boom {label}")
        self.calls.append((hook, arg))


def make_bus(*names):
    bus = EventBus(backoff=Backoff(initial=0.01, maximum=0.05))
    recs = {n: Recorder() for n in names}
    for n, r in recs.items():
        bus.add_plugin(n, r)
    return bus, recs


def test_burst_of_one_service_collapses_to_latest_state():
    bus, recs = make_bus("a")
    recs["a"].gate.clear()  # hold the worker so the burst queues up
    bus.start()
    bus.upsert(svc("first"))
    time.sleep(0.05)  # the worker is now blocked inside the first delivery
    for port in range(1, 51):
        bus.upsert(svc("web", port))
    recs["a"].gate.set()
    assert bus.wait_idle(5)
    web = [c[1] for c in recs["a"].calls if c[1].key.name == "web"]
    assert len(web) == 1, "fifty queued upserts of one service must coalesce into one delivery"
    assert web[0].frontends[0].port == 50, "the latest state wins"
    bus.stop()


def test_a_failing_plugin_does_not_block_others_and_is_retried():
    bus, recs = make_bus("bad", "good")
    recs["bad"].fail_times["default/web"] = 3
    bus.start()
    bus.upsert(svc("web"))
    bus.upsert(svc("other"))
    assert bus.wait_idle(5)
    assert [c[1].key.name for c in recs["good"].calls] == ["web", "other"]
    bad = bus.workers["bad"].stats
    assert bad.errors == 3 and bad.retries == 3
    assert {c[1].key.name for c in recs["bad"].calls} == {"web", "other"}, "retried until it succeeded"
    assert bad.failing == {}, "success clears the failing entry"
    bus.stop()


def test_a_newer_state_replaces_a_pending_retry():
    bus = EventBus(backoff=Backoff(initial=0.5, maximum=0.5))
    rec = Recorder()
    rec.fail_times["default/web"] = 1
    bus.add_plugin("p", rec)
    bus.start()
    bus.upsert(svc("web", 1))
    time.sleep(0.1)  # first attempt failed, retry is 0.5 s away
    bus.upsert(svc("web", 2))
    assert bus.wait_idle(2)
    ports = [c[1].frontends[0].port for c in rec.calls]
    assert ports == [2], "the stale state must not be retried once a newer one arrived"
    bus.stop()


def test_sync_complete_follows_the_initial_state():
    bus, recs = make_bus("a", "b")
    for i in range(20):
        bus.upsert(svc(f"s{i}"))
    bus.sync_complete()
    bus.upsert(svc("late"))
    bus.start()
    assert bus.wait_idle(5)
    for r in recs.values():
        hooks = [c[0] for c in r.calls]
        sync_at = hooks.index("kpr_sync_complete")
        assert sync_at == 20, "every initial service precedes sync complete"
        assert r.calls[21][1].key.name == "late"
    assert bus.synced()
    bus.stop()


def test_sync_complete_comes_even_when_a_service_keeps_failing():
    bus, recs = make_bus("a")
    recs["a"].fail_times["default/broken"] = 10_000
    bus.upsert(svc("broken"))
    bus.sync_complete()
    bus.start()
    deadline = time.time() + 3
    while not bus.synced() and time.time() < deadline:
        time.sleep(0.01)
    assert bus.synced(), "a failing service is given up for retry, it does not hold back sync"
    assert bus.workers["a"].stats.failing
    bus.stop()


def test_delete_and_node_events_reach_every_plugin():
    bus, recs = make_bus("a", "b")
    bus.start()
    bus.delete(ServiceKey("default", "gone"))
    bus.node_changed(NodeInfo("n1", ("10.0.0.1",)))
    assert bus.wait_idle(5)
    for r in recs.values():
        assert [c[0] for c in r.calls] == ["kpr_service_delete", "kpr_node_changed"]
    bus.stop()


def test_stop_is_bounded_when_a_plugin_hangs():
    bus, recs = make_bus("hang", "fine")
    recs["hang"].gate.clear()
    bus.start()
    bus.upsert(svc("web"))
    time.sleep(0.05)
    t0 = time.monotonic()
    stuck = bus.stop(timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    assert stuck == ["hang"]
    recs["hang"].gate.set()


def test_backoff_grows_and_caps():
    b = Backoff(initial=0.1, maximum=1.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
