"""The writer stage (kpr.pipeline) on the real bus: changes reach the plugins only after the
writer applied them, a burst is one batch, the generation grows and reaches the hooks, the
initial state is held back until it is written, failed writes are retried before any plugin
sees them, and node changes stay barriers. With the real writer and kernel maps:
tests/kernel/test_pipeline_maps.py."""

import threading

import pytest

from kpr import hookimpl
from kpr.bus import Backoff, EventBus
from kpr.model import Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.pluginmanager import hook_caller
from kpr.testing.waiting import wait_for


def svc(name: str, port: int = 80) -> Service:
    return Service(ServiceKey("default", name), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", port, Protocol.TCP),))


class ScriptedWriter:
    """A stand-in for the service map writer, on purpose: these are ordering tests of the
    stage (kpr.pipeline.WriterStage), which hold a batch inside the writer, fail a given key
    so many times, or fail the initial sync, on cue; the real writer does none of that on
    demand without kernel maps. It implements kpr.pipeline.MapWriter, the stage's whole view
    of the writer (test_the_stand_in_has_the_real_writers_stage_api keeps the two alike): keeps
    what it was given as `maps`, records each batch. The real writer behind the stage:
    test_the_real_writer_holds_everything_back_until_its_initial_state_is_written below
    (root-free, before its maps exist) and tests/kernel/test_pipeline_maps.py."""

    on_written = None

    def __init__(self, written: bool = True, sync_writes: bool = True):
        self.maps: dict[ServiceKey, Service] = {}
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_times: dict[str, int] = {}
        self.written = written
        # Whether a "sync" change writes the initial state (False: it fails, as a full sync
        # the kernel refuses does, and the writer retries it on its own).
        self.sync_writes = sync_writes

    @property
    def initial_written(self) -> bool:
        return self.written

    def apply_batch(self, changes):
        self.gate.wait(5)
        failed = {}
        labels = []
        for i, (event, payload) in enumerate(changes):
            key = payload.key if event == "upsert" else payload
            labels.append(f"{event}:{key}")
            if self.fail_times.get(str(key), 0) > 0:
                self.fail_times[str(key)] -= 1
                failed[i] = OSError(f"map write failed for {key}")
            elif event == "upsert":
                self.maps[key] = payload
            elif event == "delete":
                self.maps.pop(key, None)
            elif event == "sync" and self.sync_writes:
                self.written = True
        self.batches.append(labels)
        return failed


class Plugin:
    """A plugin's hook invoker that notes what the writer's maps held when each hook ran."""

    def __init__(self, writer: ScriptedWriter):
        self.writer = writer
        self.calls: list[tuple[str, object, object]] = []  # (hook, argument, generation)
        self.maps_at_call: list[object] = []

    def __call__(self, hook, **kw):
        arg = kw.get("service") or kw.get("key") or kw.get("node")
        self.calls.append((hook, arg, kw.get("generation")))
        if hook == "kpr_service_upsert":
            self.maps_at_call.append(self.writer.maps.get(arg.key))
        elif hook == "kpr_service_delete":
            self.maps_at_call.append(self.writer.maps.get(arg, "absent"))

    def hooks(self):
        return [c[0] for c in self.calls]


def make(writer: ScriptedWriter, *names: str) -> tuple[EventBus, dict[str, Plugin]]:
    bus = EventBus(backoff=Backoff(initial=0.01, maximum=0.05))
    bus.set_writer("servicemaps", writer)
    plugins = {n: Plugin(writer) for n in names}
    for n, p in plugins.items():
        bus.add_plugin(n, p)
    return bus, plugins


def block_in_writer(bus: EventBus, writer: ScriptedWriter) -> None:
    """Leave the stage inside the writer with a first batch ("first"), so what follows queues
    up behind it; open writer.gate to go on."""
    writer.gate.clear()
    bus.upsert(svc("first"))
    wait_for(lambda: bus.stage.busy_hook == "apply_batch", 5, "the stage inside the writer")


def test_plugins_get_a_change_only_once_the_writer_applied_it_with_its_generation():
    writer = ScriptedWriter()
    bus, plugins = make(writer, "a", "b")
    bus.start()
    try:
        bus.upsert(svc("web", 1))
        assert bus.wait_idle(5)
        bus.upsert(svc("web", 2))
        assert bus.wait_idle(5)
        bus.delete(ServiceKey("default", "web"))
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    for p in plugins.values():
        assert p.hooks() == ["kpr_service_upsert", "kpr_service_upsert", "kpr_service_delete"]
        upserts = [c[1] for c in p.calls[:2]]
        assert p.maps_at_call == [upserts[0], upserts[1], "absent"], "the maps already held each state"
        gens = [c[2] for c in p.calls]
        assert gens == [1, 2, 3], "one generation per batch, growing"
    assert bus.stage.generation == 3


def test_a_burst_is_one_batch_and_its_changes_share_a_generation():
    writer = ScriptedWriter()
    bus, plugins = make(writer, "a")
    bus.start()
    try:
        block_in_writer(bus, writer)  # a burst queues up behind the first batch
        for i in range(50):
            bus.upsert(svc(f"s{i}"))
        bus.upsert(svc("s7", 8080))  # coalesces with s7's waiting change
        writer.gate.set()
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    assert writer.batches[0] == ["upsert:default/first"]
    assert len(writer.batches) == 2 and len(writer.batches[1]) == 50, "the burst is one batch"
    calls = plugins["a"].calls
    assert [c[2] for c in calls] == [1] + [2] * 50
    s7 = [c[1] for c in calls if c[1].key.name == "s7"]
    assert [s.frontends[0].port for s in s7] == [8080], "the latest state only"


def test_the_initial_state_reaches_plugins_only_once_it_is_written():
    """The writer collects the initial state and writes it at sync complete; when that fails
    (it retries on its own), plugins get nothing, and everything once it is written."""
    writer = ScriptedWriter(written=False, sync_writes=False)
    bus, plugins = make(writer, "a")
    bus.start()
    try:
        bus.upsert(svc("web"))
        bus.upsert(svc("db"))
        bus.node_changed(NodeInfo("n1", ("10.0.0.2",)))
        bus.sync_complete()
        assert not bus.wait_idle(0.3), "held back: the initial state is not in the maps"
        assert plugins["a"].calls == [] and not bus.synced()
        assert writer.batches, "the writer had the changes"
        # The writer's own retry writes it, and says so.
        writer.written = True
        writer.on_written()
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    p = plugins["a"]
    assert p.hooks() == ["kpr_service_upsert", "kpr_service_upsert", "kpr_node_changed", "kpr_sync_complete"]
    assert {c[2] for c in p.calls if c[0] != "kpr_node_changed"} == {1}
    assert bus.synced() and bus.stage.stats.synced


def test_a_change_the_writer_failed_is_retried_before_any_plugin_sees_it():
    writer = ScriptedWriter()
    writer.fail_times["default/web"] = 2
    bus, plugins = make(writer, "a")
    bus.start()
    try:
        bus.upsert(svc("web"))
        bus.upsert(svc("other"))
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    p = plugins["a"]
    assert [c[1].key.name for c in p.calls] == ["other", "web"], "web waited for its write"
    assert p.maps_at_call == [svc("other"), svc("web")]
    st = bus.stage.stats
    assert (st.errors, st.retries, st.failing) == (2, 2, {})
    assert "map write failed" in st.last_error


def test_a_newer_state_replaces_a_failed_write_waiting_for_its_retry():
    writer = ScriptedWriter()
    writer.fail_times["default/web"] = 1
    bus = EventBus(backoff=Backoff(initial=0.5, maximum=0.5))
    bus.set_writer("servicemaps", writer)
    p = Plugin(writer)
    bus.add_plugin("a", p)
    bus.start()
    try:
        bus.upsert(svc("web", 1))
        wait_for(lambda: bus.stage.stats.errors, 5, "the failed write")
        bus.upsert(svc("web", 2))
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    assert [c[1].frontends[0].port for c in p.calls] == [2]


def test_a_node_change_stays_a_barrier_through_the_stage():
    writer = ScriptedWriter()
    bus, plugins = make(writer, "a")
    bus.start()
    try:
        block_in_writer(bus, writer)
        bus.upsert(svc("web", 1))
        bus.node_changed(NodeInfo("n1", ("10.0.0.2",)))
        bus.upsert(svc("web", 2))
        writer.gate.set()
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    order = [(h, a.frontends[0].port if isinstance(a, Service) else None) for h, a, _ in plugins["a"].calls]
    assert order == [
        ("kpr_service_upsert", 80),
        ("kpr_service_upsert", 1),
        ("kpr_node_changed", None),
        ("kpr_service_upsert", 2),
    ]


def test_stopping_waits_for_the_stage_to_leave_the_writer():
    writer = ScriptedWriter()
    bus, _ = make(writer, "a")
    bus.start()
    block_in_writer(bus, writer)
    bus.request_stop()
    assert bus.busy_hook("servicemaps") == "apply_batch"
    assert not bus.join("servicemaps", 0.1), "still inside the writer"
    writer.gate.set()
    assert bus.join("servicemaps", 5) and bus.join("a", 5)


class OldStyle:
    """A plugin written before generations: its hooks name only the service or key."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def kpr_service_upsert(self, service):
        self.calls.append(("upsert", service.key.name))

    @hookimpl
    def kpr_service_delete(self, key):
        self.calls.append(("delete", key.name))

    @hookimpl
    def kpr_sync_complete(self):
        self.calls.append(("sync", None))


class WantsGeneration:
    def __init__(self, writer):
        self.writer = writer
        self.calls = []

    @hookimpl
    def kpr_service_upsert(self, service, generation):
        self.calls.append(("upsert", service.key.name, generation, self.writer.maps.get(service.key) == service))

    @hookimpl
    def kpr_sync_complete(self, generation):
        self.calls.append(("sync", None, generation, self.writer.written))


def test_synchronous_bus_runs_the_stage_and_the_plugins_before_returning():
    """Tests and harnesses: no threads, the same order and generations; plugins written with or
    without the generation argument both work (pluggy hands each what it names)."""
    writer = ScriptedWriter(written=False)
    bus = EventBus(synchronous=True)
    bus.set_writer("servicemaps", writer)
    old, new = OldStyle(), WantsGeneration(writer)
    bus.add_plugin("old", hook_caller(old, "old"))
    bus.add_plugin("new", hook_caller(new, "new"))
    bus.start()
    bus.upsert(svc("web"))
    assert new.calls == [] and old.calls == [], "held: the initial state is not written"
    bus.sync_complete()
    assert new.calls == [("upsert", "web", 1, True), ("sync", None, 1, True)]
    bus.upsert(svc("db"))
    assert new.calls[-1] == ("upsert", "db", 2, True), "applied and delivered before upsert returned"
    bus.delete(ServiceKey("default", "web"))
    assert old.calls == [("upsert", "web"), ("sync", None), ("upsert", "db"), ("delete", "web")]
    assert bus.synced() and bus.wait_idle(0)

    writer.fail_times["default/broken"] = 1
    with pytest.raises(OSError, match="map write failed"):
        bus.upsert(svc("broken"))
    assert old.calls[-1] == ("delete", "web"), "a failed write reaches no plugin"


def test_the_stand_in_has_the_real_writers_stage_api():
    """What the stage calls (kpr.pipeline.MapWriter) is the real writer's, by name and signature."""
    import inspect

    from kpr.pipeline import MapWriter
    from kpr.servicemaps import ServiceMapWriter

    for name in ("apply_batch", "initial_written", "on_written"):
        assert hasattr(MapWriter, name) or name in MapWriter.__annotations__, name
        assert hasattr(ServiceMapWriter, name), f"the real writer has no {name}"
    real, stand_in = ServiceMapWriter.apply_batch, ScriptedWriter.apply_batch
    assert list(inspect.signature(real).parameters) == list(inspect.signature(stand_in).parameters)
    assert isinstance(inspect.getattr_static(ServiceMapWriter, "initial_written"), property)
    assert isinstance(inspect.getattr_static(ScriptedWriter, "initial_written"), property)


def test_the_real_writer_holds_everything_back_until_its_initial_state_is_written(tmp_path):
    """The real ServiceMapWriter behind the stage, root-free: before sync complete it only
    collects the initial state; its initial sync fails here (no maps: never opened), as one
    the kernel refuses would, so the stage hands nothing on, node change and sync included.
    Its retry writing the state: tests/kernel/test_pipeline_maps.py."""
    from kpr.servicemaps import ServiceMapWriter

    writer = ServiceMapWriter(tmp_path / "never-opened", check_interval=0)
    bus = EventBus(synchronous=True)
    bus.set_writer("servicemaps", writer)
    rec = WantsGeneration(writer)
    bus.add_plugin("rec", hook_caller(rec, "rec"))
    bus.start()
    bus.upsert(svc("web"))
    bus.node_changed(NodeInfo("n1", ("10.0.0.2",)))
    bus.sync_complete()
    assert rec.calls == [] and not bus.synced() and not writer.initial_written
    assert "not open" in writer.sync_error, "the initial sync was tried, and failed"
    assert bus.stage.pending_count() == 3, "held: upsert, node, sync"


def test_the_stage_counts_what_it_hands_on_per_kind():
    from kpr.metrics import Metrics

    m = Metrics()
    writer = ScriptedWriter(written=False)  # the initial state held back, then handed on at once
    bus = EventBus(backoff=Backoff(initial=0.01, maximum=0.05), on_event=m.on_event)
    bus.set_writer("servicemaps", writer)
    plugin = Plugin(writer)
    bus.add_plugin("a", plugin)
    bus.start()
    try:
        for i in range(50):
            bus.upsert(svc(f"s{i}"))
        bus.delete(ServiceKey("default", "gone"))
        bus.sync_complete()
        wait_for(lambda: bus.synced() and bus.stage.stats.synced, 10, "the initial state handed on")
        wait_for(lambda: bus.wait_idle(0), 10, "the plugin's worker idle")
    finally:
        bus.stop()

    def count(name, event):
        return m.registry.get_sample_value("kpr_events_handled_total", {"plugin": name, "event": event, "result": "ok"})

    assert bus.stage.stats.delivered == 52
    assert (count("servicemaps", "upsert"), count("servicemaps", "delete"), count("servicemaps", "sync")) == (50, 1, 1)
    assert (count("a", "upsert"), count("a", "delete"), count("a", "sync")) == (50, 1, 1)
