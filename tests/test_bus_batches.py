"""An initial sync's changes travel as one batch: the store hands the bus its refreshes' upserts
and deletes at once (EventBus.changes), each queue takes a batch without a barrier at C speed
(KeyedQueue.put_many) with put()'s meaning, and the agent looks at readiness as soon as every
plugin has the initial state (EventBus's on_synced), not at its next poll."""

from __future__ import annotations

import random
import threading

import pytest

from kpr import daemon, hookimpl, memory
from kpr.bus import Backoff, Event, EventBus, KeyedQueue
from kpr.daemon import Agent
from kpr.model import NodeInfo, ServiceKey
from kpr.store import ObjectStore
from kpr.testing.agent import AgentConfig, run_agent_until
from kpr.testing.bus import Recorder, make_bus, svc
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for


def test_put_many_queues_as_put_does() -> None:
    rnd = random.Random(3)
    for _ in range(300):
        one, many = KeyedQueue(), KeyedQueue()
        for _ in range(rnd.randrange(1, 5)):
            batch = []
            for _ in range(rnd.randrange(0, 12)):
                kind = rnd.choice(("upsert", "upsert", "delete", "node"))
                key = ("__node__",) if kind == "node" else rnd.choice("abcdef")
                batch.append(Event(key, kind, rnd.random()))
            for ev in batch:
                one.put(ev)
            many.put_many(batch)
            assert [(k, many.waiting(k)) for k in "abcdef"] == [(k, one.waiting(k)) for k in "abcdef"]
            assert len(many) == len(one)
        assert many.drain() == one.drain()


class Publisher:
    """Records what the store publishes, and how: one call per change, or batches."""

    def __init__(self, batches: bool):
        self.calls: list[tuple[str, object]] = []
        self.batches: list[int] = []
        if batches:
            self.changes = self._changes

    def upsert(self, service) -> None:
        self.calls.append(("upsert", service))

    def delete(self, key) -> None:
        self.calls.append(("delete", key))

    def sync_complete(self) -> None:
        pass

    def _changes(self, changes) -> None:
        self.batches.append(len(changes))
        self.calls.extend(("delete", c) if isinstance(c, ServiceKey) else ("upsert", c) for c in changes)


def _store_run(publisher: Publisher) -> list:
    from kpr.testing.manifests import endpoint_slice as es, service as sv

    store = ObjectStore(NodeInfo(name="node1"), publisher)
    objs = [o for i in range(30) for o in (sv(f"s{i}", cluster_ip=f"10.96.0.{i + 1}"), es(f"s{i}", [f"10.244.0.{i + 1}"]))]
    store.apply(objs, [])
    store.apply(objs[:10], [("Service", "default", "s20"), ("EndpointSlice", "default", "s21-abc")])
    store.apply([sv("s3", cluster_ip="10.96.0.4", port=81)], [("Service", "default", "s5")])
    return publisher.calls


def test_the_store_hands_a_batch_taker_its_changes_at_once_in_the_same_order() -> None:
    one, batched = Publisher(False), Publisher(True)
    assert _store_run(batched) == _store_run(one)
    # one batch per apply that changed anything: 30 services, then a delete, then a change and a delete
    assert batched.batches == [30, 1, 2]
    assert [c for c, _ in one.calls].count("delete") == 2


def test_the_bus_takes_a_batch_as_it_takes_each_change() -> None:
    rec_one, rec_batch = Recorder(), Recorder()
    for bus, rec, batched in ((EventBus(synchronous=True), rec_one, False), (EventBus(synchronous=True), rec_batch, True)):
        bus.add_plugin("p", rec)
        bus.start()
        changes = [svc("a"), svc("b"), svc("a").key, svc("c", 81)]
        if batched:
            bus.changes(changes)
        else:
            for c in changes:
                bus.delete(c) if isinstance(c, ServiceKey) else bus.upsert(c)
        bus.sync_complete()
    assert rec_batch.calls == rec_one.calls
    assert [h for h, _ in rec_one.calls] == ["kpr_service_upsert"] * 2 + ["kpr_service_delete", "kpr_service_upsert", "kpr_sync_complete"]


def test_on_synced_is_called_once_every_worker_has_the_initial_state() -> None:
    calls: list[bool] = []
    bus = EventBus(on_synced=lambda: calls.append(bus.synced()))
    slow = Recorder()
    bus.add_plugin("fast", Recorder())
    bus.add_plugin("slow", slow)
    slow.gate.clear()
    bus.start()
    try:
        bus.upsert(svc("a"))
        bus.sync_complete()
        wait_for(lambda: bus.workers["fast"].stats.synced, what="the fast worker synced")
        assert calls == []  # the slow one has not delivered it yet
        slow.gate.set()
        wait_for(lambda: calls, what="on_synced")
        bus.sync_complete()  # a later sync is no initial state
        wait_for(lambda: bus.wait_idle(), what="the bus idle")
        assert calls == [True]
    finally:
        slow.gate.set()
        bus.stop()


def test_on_synced_failing_is_not_the_plugins_and_the_heap_still_settles(monkeypatch) -> None:
    settled: list[bool] = []
    monkeypatch.setattr(memory, "settle", lambda: (settled.append(True), 0)[1])  # (the test's heap left unfrozen)

    def on_synced() -> None:  # the agent's look at readiness, failing
        raise ConnectionRefusedError("notify socket gone")

    bus = EventBus(on_synced=on_synced, settle_memory=True)
    bus.add_plugin("p", Recorder())
    bus.start()
    try:
        bus.sync_complete()
        wait_for(lambda: settled, what="the bus's settle")
        stats, _ = bus.stats_of("p")
        assert stats.errors == 0 and stats.synced, stats.last_error
    finally:
        bus.stop()


class Plugin:
    @hookimpl
    def kpr_sync_complete(self):
        pass


def test_the_agent_is_ready_without_waiting_for_its_poll(tmp_path, monkeypatch) -> None:
    """READY=1 as soon as every plugin has the initial state: with the agent's poll an hour
    apart, only the bus's on_synced can make it look."""
    monkeypatch.setattr(daemon, "READY_POLL", 3600.0)
    sent: list[str] = []
    monkeypatch.setattr(daemon.sdnotify, "notify", sent.append)
    cfg = AgentConfig(tmp_path, None)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    agent = Agent(cfg.parse(), internal_plugins={"p": Plugin()}, source_first=False)
    run_agent_until(agent, lambda: any(m.startswith("READY=1") for m in sent), "ready")


def held_worker(on_event=None):
    """A started bus with one plugin, "a", held inside its first delivery (so what comes next
    waits as one batch), its metrics counted into the list returned (or by on_event)."""
    counted: list[tuple] = []
    bus, recs = make_bus("a", on_event=on_event or (lambda *a: counted.append(a)))
    rec = recs["a"]
    rec.gate.clear()
    bus.start()
    bus.upsert(svc("first"))
    assert rec.entered.wait(10)
    return bus, rec, counted


def test_a_worker_delivers_what_waits_as_one_batch_in_order_counted_per_kind() -> None:
    """What waits in a worker's queue is taken at once (one hold of the lock, not one per
    event: the metrics count each batch once per kind, so 49 upserts in one count), delivered
    in order."""
    bus, rec, counted = held_worker()
    for i in range(50):
        bus.upsert(svc(f"s{i}"))
    bus.delete(svc("s3").key)
    # (the delete takes the waiting upsert's place: 50 keys wait)
    wait_for(lambda: bus.stats_of("a")[1] == 50, what="the burst queued")  # type: ignore[index]
    rec.gate.set()
    assert bus.wait_idle(5)
    assert rec.order() == ["kpr_service_upsert:first@80"] + [
        "kpr_service_delete:default/s3" if i == 3 else f"kpr_service_upsert:s{i}@80" for i in range(50)
    ]
    assert ("a", "upsert", True, 49) in counted and ("a", "delete", True, 1) in counted  # the burst in one batch
    bus.stop()


def test_a_key_failed_before_a_node_change_is_not_retried_once_its_newer_state_is_delivered() -> None:
    """Behind a node change a key waits twice in one batch; its older state failing must not be
    retried after the newer one was delivered."""
    bus = EventBus(backoff=Backoff(initial=0.05, maximum=0.05))
    rec = Recorder()
    bus.add_plugin("p", rec)
    rec.gate.clear()
    bus.start()
    bus.upsert(svc("first"))
    assert rec.entered.wait(10)
    bus.upsert(svc("web", 1))
    bus.node_changed(NodeInfo("n1", ("10.0.0.2",)))
    bus.upsert(svc("web", 2))
    rec.fail_times["default/web"] = 1  # web@1 fails once
    rec.gate.set()
    assert bus.wait_idle(5)
    assert bus.workers["p"].stats.errors == 1
    # (its newer state followed in the batch: no retry was even scheduled, nor logged)
    assert bus.workers["p"].stats.retries == 0
    assert rec.order() == ["kpr_service_upsert:first@80", "kpr_node_changed:10.0.0.2", "kpr_service_upsert:web@2"]
    bus.stop()


def test_a_failed_sync_in_a_batch_is_counted_as_an_error_only() -> None:
    """A plugin whose kpr_sync_complete raises has the initial state all the same (no retry),
    and the metrics count that delivery once, as failed."""
    bus, rec, counted = held_worker()
    bus.upsert(svc("second"))
    bus.sync_complete()
    rec.fail_times[""] = 1  # the sync (it names no object)
    rec.gate.set()
    assert bus.wait_idle(5)
    stats, waiting = bus.stats_of("a")  # type: ignore[misc]
    assert bus.synced() and stats.errors == 1 and stats.retries == 0 and waiting == 0
    assert [c for c in counted if c[1] == "sync"] == [("a", "sync", False)]
    bus.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the escape, on purpose)
def test_what_escapes_a_batch_leaves_the_worker_not_busy_and_its_deliveries_counted() -> None:
    """Should anything escape the batch loop (here the metrics' counter of a failure), the
    deliveries before it are counted and the worker is not left busy for ever."""
    counted: list[tuple] = []

    def on_event(*a: object) -> None:
        if a[2] is False:
            raise RuntimeError("counter broke")
        counted.append(a)

    bus, rec, _ = held_worker(on_event)
    for name in ("a1", "a2", "bad", "a3"):
        bus.upsert(svc(name))
    rec.fail_times["default/bad"] = 1
    rec.gate.set()
    wait_for(lambda: bus.join("a", 0), what="the worker's loop ended by the escape")
    # not busy, nothing counted as waiting (the rest of the batch is dropped with the loop)
    assert bus.busy_hook("a") is None and bus.stats_of("a")[1] == 0 and bus.wait_idle(0)  # type: ignore[index]
    assert ("a", "upsert", True, 2) in counted
    bus.stop()


def test_a_settle_waiting_for_ready_holds_no_plugin_s_worker(monkeypatch) -> None:
    """The settle waits for READY=1 (settle_after) off the plugins' workers: the plugin whose
    worker handed over the last of the initial state gets its next events meanwhile (before,
    that worker waited up to settle_wait, its plugin's changes held back). The settle still
    comes after the gate, once. (That a stop lets it finish first: tests/test_bus_settle_join.py.)"""
    settled: list[bool] = []
    gate = threading.Event()
    monkeypatch.setattr(memory, "settle", lambda: (settled.append(gate.is_set()), 0)[1])
    bus = EventBus(settle_memory=True, settle_after=gate, settle_wait=600.0)
    rec = Recorder()
    bus.add_plugin("p", rec)
    bus.start()
    try:
        bus.sync_complete()
        wait_for(bus.synced, what="the initial state handed over")
        bus.upsert(svc("web"))
        wait_for(lambda: "kpr_service_upsert:web@80" in rec.order(), timeout=5, what="the upsert while the settle waits")
        assert settled == []
        gate.set()
        wait_for(lambda: settled, what="the settle after the gate")
        assert settled == [True]
    finally:
        gate.set()
        bus.stop()
    assert settled == [True]
