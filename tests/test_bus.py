"""The event bus: coalescing, isolation between plugins, retries, sync ordering, node changes
as barriers, and stopping. The writer stage in front of it: tests/test_pipeline.py."""

import time

from kpr.bus import Backoff, EventBus
from kpr.model import FrontendType, NodeInfo, Service, ServiceKey
from kpr.store import ObjectStore
from kpr.testing.bus import Recorder, make_bus, svc
from kpr.testing.waiting import wait_for


def test_burst_of_one_service_collapses_to_latest_state():
    bus, recs = make_bus("a")
    recs["a"].gate.clear()  # hold the worker so the burst queues up
    bus.start()
    bus.upsert(svc("first"))
    assert recs["a"].entered.wait(10)  # the worker is now blocked inside the first delivery
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
    bus = EventBus(backoff=Backoff(initial=30, maximum=30))
    rec = Recorder()
    rec.fail_times["default/web"] = 1
    bus.add_plugin("p", rec)
    bus.start()
    bus.upsert(svc("web", 1))
    wait_for(lambda: bus.workers["p"].stats.retries == 1, what="the first attempt failed")  # retry 30 s away
    bus.upsert(svc("web", 2))
    # idle long before the retry was due: the newer state replaced it rather than queueing behind
    assert bus.wait_idle(10)
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
    assert recs["hang"].entered.wait(10)  # inside its hook, held at the gate for 5 s
    # An unbounded stop would have joined the worker once its 5 s at the gate were over and
    # named no one: naming it shows the stop gave up at its own timeout (no clock needed).
    stuck = bus.stop(timeout=0.3)
    assert stuck == ["hang"]
    recs["hang"].gate.set()


def test_backoff_grows_and_caps():
    b = Backoff(initial=0.1, maximum=1.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_service_hooks_get_generation_zero_without_a_writer_stage():
    bus, recs = make_bus("a")
    bus.start()
    bus.upsert(svc("web"))
    bus.delete(ServiceKey("default", "gone"))
    bus.sync_complete()
    assert bus.wait_idle(5)
    assert [c[0] for c in recs["a"].calls] == ["kpr_service_upsert", "kpr_service_delete", "kpr_sync_complete"]
    assert recs["a"].generations == [0, 0, 0]
    bus.stop()


def test_a_node_change_overtakes_no_service_queued_after_it():
    """A service already waiting, changed again after a node change, is delivered after the
    node change (its older state before): a waiting key keeps its place only until a node
    change is queued behind it."""
    bus, recs = make_bus("a")
    recs["a"].gate.clear()
    bus.start()
    bus.upsert(svc("first"))
    assert recs["a"].entered.wait(10)  # the worker is blocked inside the first delivery
    bus.upsert(svc("web", 1))
    bus.node_changed(NodeInfo("n1", ("10.0.0.2",)))
    bus.upsert(svc("web", 2))
    bus.upsert(svc("web", 3))  # coalesces with the state queued after the node change
    recs["a"].gate.set()
    assert bus.wait_idle(5)
    assert recs["a"].order() == [
        "kpr_service_upsert:first@80",
        "kpr_service_upsert:web@1",
        "kpr_node_changed:10.0.0.2",
        "kpr_service_upsert:web@3",
    ]
    bus.stop()


NODEPORT = [
    {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "np", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]},
    },
    {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "np-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "np"}},
        "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node1"}],
    },
]


def test_the_store_re_delivers_services_after_the_node_change_whatever_was_queued():
    """The agent's order (bus.node_changed, then store.set_node): each plugin gets the new node
    facts before the NodePort service rendered with them, although an older state of that
    service was still waiting in its queue."""
    bus, recs = make_bus("a", "b")
    recs["a"].gate.clear()
    node = NodeInfo("node1", ("192.168.50.10",))
    store = ObjectStore(node, bus, cluster_cidrs=["10.96.0.0/16"])
    bus.start()
    bus.upsert(svc("first"))
    assert recs["a"].entered.wait(10)  # plugin a is blocked inside its first delivery; b is not
    store.apply(NODEPORT, [])
    new = NodeInfo("node1", ("192.168.50.11",))
    bus.node_changed(new)
    store.set_node(new)
    recs["a"].gate.set()
    assert bus.wait_idle(5)
    def node_ports(service):
        return {f.address for f in service.frontends if f.type is FrontendType.NODE_PORT}

    for name, r in recs.items():
        seen = [a for h, a in r.calls if h == "kpr_node_changed" or (isinstance(a, Service) and a.key.name == "np")]
        labels = [",".join(a.addresses) if isinstance(a, NodeInfo) else sorted(node_ports(a)) for a in seen]
        at = labels.index("192.168.50.11")
        assert all("192.168.50.11" not in l for l in labels[:at]), f"{name}: {labels}"
        assert labels[at + 1:] == [["127.0.0.1", "192.168.50.11"]], f"{name}: {labels}"
    bus.stop()
