"""kpr.memory: compacted objects mean what they meant, the collector's pauses nest and end,
the bus settles an agent's memory once, and the store's bytes per service stay bounded."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kpr import bus as kbus
from kpr import memory, translate
from kpr.bus import Backoff, EventBus
from kpr.model import NodeInfo, Service, ServiceKey
from kpr.store import ObjectStore


@contextlib.contextmanager
def held_here() -> Iterator[list[int]]:
    """The bytes that the block's own calls (this file's frames on their stack) allocated and
    still hold at its end, as counted[0]: what another thread allocates meanwhile (one an
    earlier test left running in this process) is not counted, as the process's traced total
    would count it."""
    counted: list[int] = []
    tracemalloc.start(64)  # deep enough to reach this file's frame from any allocation
    try:
        yield counted
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, __file__, all_frames=True)])
        counted.append(sum(t.size for t in snap.traces))
    finally:
        tracemalloc.stop()


NODE = NodeInfo("node1", ("192.168.50.10",))
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def service(i: int, node_port: bool = False) -> dict:
    spec: dict = {
        "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
        "selector": {"app": f"svc{i}"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    if node_port:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = 30000 + i
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc{i}", "namespace": f"ns{i % 7}", "labels": {"tier": "web"}},
        "spec": spec,
    }


def endpoint_slice(i: int, endpoints: int = 10) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"svc{i}-abcde", "namespace": f"ns{i % 7}", "labels": {translate.SERVICE_NAME_LABEL: f"svc{i}"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"10.244.{(i * endpoints + j) // 250 % 256}.{(i * endpoints + j) % 250 + 1}"],
                "conditions": {"ready": j != 3, "serving": True, "terminating": j == 3},
                "nodeName": f"node{j % 3}",
            }
            for j in range(endpoints)
        ],
    }


def parsed(obj: dict) -> dict:
    """As a source hands it over: every string a fresh object, as json and yaml make them."""
    return json.loads(json.dumps(obj))


class NullPublisher:
    def __init__(self) -> None:
        self.upserts = 0

    def upsert(self, service: Service) -> None:
        self.upserts += 1

    def delete(self, key: ServiceKey) -> None:
        pass

    def sync_complete(self) -> None:
        pass


# --- compact -------------------------------------------------------------------------------


def test_compact_keeps_every_value_and_what_translate_makes_of_it():
    for i, node_port in ((1, False), (2, True)):
        svc, es = parsed(service(i, node_port)), parsed(endpoint_slice(i))
        want_svc, want_es = copy.deepcopy(svc), copy.deepcopy(es)
        want = translate.translate_service(want_svc, [want_es], None, NODE)
        assert memory.compact(svc) is svc and memory.compact(es) is es
        assert svc == want_svc and es == want_es
        assert json.dumps(svc) == json.dumps(want_svc)  # the order of keys too
        got = translate.translate_service(svc, [es], None, NODE)
        assert got == want and got is not None and got.frontends[0].backends


def test_compact_shares_repeated_strings_and_flag_dicts_only():
    """Strings are immutable, so sharing them is free; a dict shared between objects would
    be one mutation away from changing both, so only dicts of flags are (nothing writes to
    an endpoint's conditions once parsed)."""
    a, b = parsed(endpoint_slice(1)), parsed(endpoint_slice(2))
    assert a["endpoints"][0]["nodeName"] is not b["endpoints"][0]["nodeName"]
    memory.compact(a)
    memory.compact(b)
    ea, eb = a["endpoints"][0], b["endpoints"][0]
    assert ea["nodeName"] is eb["nodeName"]
    assert a["ports"][0]["protocol"] is b["ports"][0]["protocol"] is sys.intern("TCP")
    assert a["endpoints"][0]["addresses"][0] is sys.intern("10.244.0.11")
    # Conditions (flags only) are shared across endpoints and objects ...
    assert ea["conditions"] is eb["conditions"] is a["endpoints"][1]["conditions"]
    assert a["endpoints"][3]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert a["endpoints"][3]["conditions"] is not ea["conditions"]
    # ... while a dict holding anything else stays the object's own, even when equal.
    assert a["ports"][0] == b["ports"][0] and a["ports"][0] is not b["ports"][0]
    assert a["endpoints"][0] is not b["endpoints"][0]


def test_compact_interns_keys_yaml_made_again_for_each_object_in_order():
    docs = list(yaml.load_all(yaml.dump_all([service(1), service(2)], Dumper=_Dumper), Loader=_Loader))
    a, b = docs
    assert next(iter(a["spec"])) is not next(iter(b["spec"]))
    want = copy.deepcopy(docs)
    for d in docs:
        memory.compact(d)
    assert docs == want and [json.dumps(d) for d in docs] == [json.dumps(d) for d in want]
    for x, y in ((a, b), (a["spec"], b["spec"]), (a["spec"]["ports"][0], b["spec"]["ports"][0])):
        assert all(kx is ky for kx, ky in zip(x, y))


def test_an_object_compacted_once_is_not_walked_again():
    svc = parsed(service(1))
    memory.compact(svc)
    fresh = "".join(["10.96.", "9.9"])  # made at run time: not the interned string
    svc["spec"]["clusterIP"] = fresh  # as the allocator fills one in, after the source compacted
    memory.compact(svc)
    assert svc["spec"]["clusterIP"] is fresh
    other = parsed(service(1))  # the same object parsed again: new strings, compacted
    memory.compact(other)
    assert other["spec"]["selector"]["app"] is svc["spec"]["selector"]["app"]


def test_compact_leaves_other_values_alone():
    obj = {"a": [1, 2.5, None, True, ["x", {"y": "z"}]], "b": {}, "c": {"n": 1, "f": False}, 1: "int key"}
    want = copy.deepcopy(obj)
    assert memory.compact(obj) == want
    deep: dict = {"leaf": "x"}
    for _ in range(sys.getrecursionlimit() + 100):  # what no parser hands over, yet no crash
        deep = {"k": [deep]}
    assert memory.compact(deep) is deep
    assert memory.compact("text") == "text" and memory.compact(None) is None


def test_the_files_source_and_the_store_keep_one_packed_copy_of_each_object(tmp_path):
    from kpr.allocator import Allocator
    from kpr.config import PortRange
    from kpr.sources.files import FilesSource

    d = tmp_path / "services.d"
    d.mkdir()
    (d / "a.yaml").write_text(yaml.dump_all([service(1), endpoint_slice(1)], Dumper=_Dumper))
    (d / "b.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [service(2), endpoint_slice(2)]}))
    store = ObjectStore(NODE, NullPublisher())
    src = FilesSource(d, Allocator(tmp_path / "alloc.json", ["10.96.0.0/12"], PortRange(first=30000, last=32767)))
    src.scan_once(store)
    assert len(store.services) == 2 and not store.errors
    refs = [("EndpointSlice", f"ns{i}", f"svc{i}-abcde") for i in (1, 2)]
    for ref, name in zip(refs, ("a.yaml", "b.json")):
        kept = store._objects[ref]
        assert type(kept) is bytes, "packed once translated"
        assert src._files[name].objects[ref] is kept and src._sent[ref] is kept, "one copy for the source and the store"
    a, b = (store.object(ref) for ref in refs)
    assert a == endpoint_slice(1) and b == endpoint_slice(2)
    # The model keeps one string per node name, whichever object (YAML or JSON) named it.
    names = {
        id(be.node_name)
        for s in store.services.values()
        for f in s.frontends
        for be in f.backends
        if be.node_name == "node0"
    }
    assert names == {id(sys.intern("node0"))}
    # Unchanged files read again (a new mtime) send nothing: equal objects stay the same.
    for name in ("a.yaml", "b.json"):
        (d / name).write_text((d / name).read_text())
        (d / name).touch()
    src._files["a.yaml"].sig = src._files["b.json"].sig = (0, 0, 0)
    assert src.scan_once(store) is False


def test_an_allocated_service_is_kept_as_changes_over_the_files_version(tmp_path):
    """The files source keeps each Service as its file says (packed) and hands the store the
    allocated one: packed whole, the two copies took 10.5 MB at 20k services. The allocated
    one is kept as its spec's changes over the file's bytes (memory.pack_over), which the
    source holds anyway: the same bytes object, and an Over of about 140 bytes."""
    from kpr.allocator import Allocator
    from kpr.config import PortRange
    from kpr.sources.files import FilesSource

    d = tmp_path / "services.d"
    d.mkdir()
    plain = service(1)
    del plain["spec"]["clusterIP"]  # allocated: ClusterIP, clusterIPs, families, policy
    (d / "a.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [plain, service(2, node_port=True), endpoint_slice(1)]}))
    store = ObjectStore(NODE, NullPublisher(), cluster_cidrs=["10.96.0.0/12"])
    src = FilesSource(d, Allocator(tmp_path / "alloc.json", ["10.96.0.0/12"], PortRange(first=30000, last=32767)))
    src.scan_once(store)
    assert len(store.services) == 2 and not store.errors
    for name in ("svc1", "svc2"):
        ref = ("Service", f"ns{name[-1]}", name)
        kept = store._objects[ref]
        assert type(kept) is memory.Over and src._sent[ref] is kept
        assert kept.base is src._files["a.json"].objects[ref], "the file's bytes, not a copy"
        allocated = store.object(ref)
        assert allocated["spec"]["clusterIPs"] == [allocated["spec"]["clusterIP"]] and allocated["spec"]["ipFamilies"] == ["IPv4"]
        # Smaller than the allocated Service packed whole, which zstd compresses too (about
        # 165 against 140 bytes; twice as much uncompressed).
        assert sys.getsizeof(kept) + sys.getsizeof(kept.values) < sys.getsizeof(memory.pack(allocated))
    # read again unchanged: nothing is sent (the Overs compare equal), and the file's objects
    # stay the bytes the store's Overs and slices hold (else two copies after any edit)
    (d / "a.json").touch()
    src._files["a.json"].sig = (0, 0, 0)
    assert src.scan_once(store) is False
    for ref in [("Service", "ns1", "svc1"), ("Service", "ns2", "svc2"), ("EndpointSlice", "ns1", "svc1-abcde")]:
        kept = store._objects[ref]
        assert getattr(kept, "base", kept) is src._files["a.json"].objects[ref], ref


def test_a_written_cluster_ip_is_one_string_for_the_model_and_the_allocator(tmp_path):
    """A Service's written ClusterIP reaches the model (validation's reading) and the
    allocator's records (the Service unpacked for allocation): one string object for both,
    not two equal ones (1.1 MB at 20k services)."""
    from kpr.allocator import Allocator
    from kpr.config import PortRange
    from kpr.sources.files import FilesSource

    d = tmp_path / "services.d"
    d.mkdir()
    two = service(2)
    two["spec"]["clusterIPs"] = [two["spec"]["clusterIP"]]
    (d / "a.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [service(1), two, endpoint_slice(1)]}))
    allocator = Allocator(tmp_path / "alloc.json", ["10.96.0.0/12"], PortRange(first=30000, last=32767))
    store = ObjectStore(NODE, NullPublisher(), cluster_cidrs=["10.96.0.0/12"])
    FilesSource(d, allocator).scan_once(store)
    assert len(store.services) == 2 and not store.errors
    for i in (1, 2):
        address = store.services[ServiceKey(f"ns{i}", f"svc{i}")].frontends[0].address
        kept = allocator._records[f"ns{i}/svc{i}"].cluster_ips[0]
        assert kept == address and kept is address, (i, kept)


def test_the_pass_keeps_no_service_reading_once_the_store_has_translated(tmp_path):
    """What validation read of each object (translate.remember_checked) lives until the store
    translates it, not until the pass ends: a Service's reading left under the file's bytes
    once allocation made its Over (650 bytes each, 13 MB at 20k services) was freed only after
    the store had made the model, as holes nothing filled (about 4 MB of RSS in-process)."""
    from kpr.allocator import Allocator
    from kpr.config import PortRange
    from kpr.sources.files import FilesSource

    d = tmp_path / "services.d"
    d.mkdir()
    plain = service(3)
    del plain["spec"]["clusterIP"]  # allocated: its reading is brought up to date (_allocated_spec)
    items = [service(1), service(2, node_port=True), plain] + [endpoint_slice(i) for i in (1, 2, 3)]
    (d / "a.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    store = ObjectStore(NODE, NullPublisher(), cluster_cidrs=["10.96.0.0/12"])
    left: list[int] = []

    class Sink:
        def apply(self, upserts, deletes):
            # Every Service's reading (the allocated one's brought up to date) and every
            # slice's, each under the bytes the store is handed.
            sent = {id(o) for o in upserts}
            assert len(translate._checked) == 6 and all(id(k) in sent for k in translate._checked), \
                "a reading is kept only under what the store is handed"
            store.apply(upserts, deletes)
            left.append(len(translate._checked))  # still inside the pass

        def __getattr__(self, name):
            return getattr(store, name)

    src = FilesSource(d, Allocator(tmp_path / "alloc.json", ["10.96.0.0/12"], PortRange(first=30000, last=32767)))
    src.scan_once(Sink())
    assert len(store.services) == 3 and not store.errors
    assert left == [0], f"{left[0]} readings held past translation"


def test_pack_over_gives_back_the_object_in_order_or_packs_it_whole():
    before = service(3)
    base = memory.pack(before)
    after = {**before, "spec": {**before["spec"], "clusterIP": "10.96.9.9", "clusterIPs": ["10.96.9.9"], "ipFamilies": ["IPv4"]}}
    over = memory.pack_over(base, before, after)
    assert type(over) is memory.Over and over.keys == ("clusterIP", "clusterIPs", "ipFamilies")
    back = memory.unpack(over)
    assert back == after and json.dumps(back) == json.dumps(after), "the same keys in the same order"
    assert memory.unpack(over) is not back and memory.pack(over) is over
    again = memory.pack_over(memory.pack(before), before, after)
    assert again is not over and memory.same(over, again) and memory.same(over, memory.pack(after))
    assert not memory.same(over, memory.pack_over(base, before, {**after, "spec": {**after["spec"], "ipFamilies": ["IPv6"]}}))
    assert memory.is_packed(over) and memory.is_packed(base) and not memory.is_packed(after)
    # anything but new or changed spec fields in place is packed whole
    spec = dict(before["spec"])
    del spec["selector"]
    reordered = {"ports": before["spec"]["ports"], **before["spec"]}
    for whole in (
        {**before, "spec": spec},  # a field removed
        {**before, "spec": reordered},  # another order
        {**before, "metadata": {**before["metadata"]}, "spec": after["spec"]},  # another top-level object
        {**before, "status": {}, "spec": after["spec"]},  # a top-level field added
        before,  # nothing changed: what the source sends is then the file's bytes themselves
    ):
        kept = memory.pack_over(base, before, whole)
        assert type(kept) is bytes and memory.unpack(kept) == whole


def test_pack_keeps_what_marshal_cannot_hold_as_it_is_and_same_compares_by_value():
    import datetime

    obj = {"a": [1, 2.5, None, True, "x"], "b": {"c": {}}}
    packed = memory.pack(obj)
    assert type(packed) is bytes and memory.unpack(packed) == obj and memory.unpack(packed) is not obj
    assert memory.pack(packed) is packed and memory.unpack(obj) is obj
    dated = {"metadata": {"annotations": {"when": datetime.date(2024, 1, 1)}}}  # a YAML timestamp
    assert memory.pack(dated) is dated
    assert memory.same(packed, copy.deepcopy(obj)) and memory.same(packed, memory.pack(copy.deepcopy(obj)))
    assert not memory.same(packed, {**obj, "b": 1}) and not memory.same(None, obj)



def test_a_large_packed_object_is_compressed_and_unpacks_equal():
    """An EndpointSlice of 10 endpoints packs to under a third of its marshal bytes (zstd, or
    deflate without the zstandard package, against the preset dictionary; about 200 of 770
    bytes), unpacks equal, packs what it unpacks to the same bytes, and a small object stays
    plain marshal."""
    import marshal

    es = json.loads(json.dumps(endpoint_slice(7)))
    packed = memory.pack(es)
    assert type(packed) is bytes and packed[:1] == (b"\x01" if memory._zstd is not None else b"\x00")
    assert len(packed) < len(marshal.dumps(es)) / 3, (len(packed), len(marshal.dumps(es)))
    assert memory.unpack(packed) == es and memory.pack(memory.unpack(packed)) == packed
    assert memory.same(packed, copy.deepcopy(es)) and not memory.same(packed, endpoint_slice(8))
    small = {"kind": "Service", "metadata": {"name": "a"}}
    assert memory.pack(small) == marshal.dumps(small) and memory.unpack(memory.pack(small)) == small
    # Any thread packs (the files source's, the bus's workers): one compressor, under a lock.
    out: list[bytes] = []
    threads = [threading.Thread(target=lambda: out.append(memory.pack(es))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [packed] * 8


# Run in a process of its own: a (de)compressor used by two threads at once can crash the
# process, which would take the test run with it instead of failing this test.
PACK_AT_ONCE = """
import json, sys, threading
sys.path.insert(0, sys.argv[1])
from test_memory import endpoint_slice, service
from kpr import memory

objs = [json.loads(json.dumps(endpoint_slice(i, endpoints=1 + i % 30))) for i in range(24)]
objs += [json.loads(json.dumps(service(i))) for i in range(8)]
want = [memory.pack(o) for o in objs]
wrong = []
start = threading.Barrier(6)

def work():
    start.wait()
    for _ in range(150):
        for o, w in zip(objs, want):
            try:
                if memory.pack(o) != w:
                    wrong.append("packed differently")
                if memory.unpack(w) != o:
                    wrong.append("unpacked differently")
            except Exception as e:
                wrong.append(repr(e))

threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(wrong), wrong[:5])
"""


def test_threads_pack_and_unpack_at_once():
    """The files source's thread packs while the bus's workers and API threads unpack: one
    zstd compressor and decompressor serve them all, and neither is thread-safe (used at
    once they raised, wrote corrupt frames or crashed the process), so each call holds them
    alone. Objects of many sizes, packed and unpacked by six threads at once, all come back
    as packed alone."""
    proc = subprocess.run([sys.executable, "-c", PACK_AT_ONCE, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("0 []"), proc.stdout


def test_deflate_packs_without_zstandard_and_both_forms_unpack(monkeypatch):
    """Without the zstandard package objects are deflated as before; bytes of either form
    unpack equal (one process makes one form, but unpack takes both)."""
    es = json.loads(json.dumps(endpoint_slice(7)))
    monkeypatch.setattr(memory, "_zstd", None)
    deflated = memory.pack(es)
    assert deflated[:1] == b"\x00" and memory.unpack(deflated) == es
    monkeypatch.undo()
    if memory._zstd is not None:
        zstd = memory.pack(es)
        assert zstd[:1] == b"\x01" and memory.unpack(zstd) == es and len(zstd) < len(deflated) * 1.2
        # zstd compresses a Service too (about 200 bytes of marshal: deflate's cost kept it out)
        import marshal

        svc = json.loads(json.dumps(service(3)))
        packed = memory.pack(svc)
        assert packed[:1] == b"\x01" and len(packed) < len(marshal.dumps(svc)) * 0.7 and memory.unpack(packed) == svc
        assert memory.pack(memory.unpack(packed)) == packed


# --- the collector ---------------------------------------------------------------------------


def test_gc_paused_nests_and_restores():
    seen = []

    @memory.gc_paused
    def inner() -> None:
        seen.append(gc.isenabled())

    @memory.gc_paused
    def outer(fail: bool) -> None:
        seen.append(gc.isenabled())
        inner()
        seen.append(gc.isenabled())
        if fail:
            raise RuntimeError("boom")

    assert gc.isenabled()
    outer(False)
    assert seen == [False, False, False] and gc.isenabled()
    with pytest.raises(RuntimeError):
        outer(True)
    assert gc.isenabled()
    gc.disable()
    try:
        inner()
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()


def test_a_paused_batch_that_leaves_many_objects_freezes_them():
    kept = []

    @memory.gc_paused
    def batch(n: int) -> None:
        kept.extend([i] for i in range(n))  # lists: tracked by the collector, unlike {"i": i}

    # Earlier tests in this process (agents that settled their memory) may have frozen
    # objects: start from none.
    gc.unfreeze()
    gc.collect()
    try:
        batch(100)
        assert gc.get_freeze_count() == 0 and gc.isenabled()
        batch(memory.FREEZE_AFTER + 1000)
        assert gc.get_freeze_count() > memory.FREEZE_AFTER and gc.isenabled()
    finally:
        gc.unfreeze()


def test_a_paused_batch_that_also_frees_older_objects_freezes_what_it_leaves():
    """The collector's count is allocations less deallocations of any generation: a batch
    that frees as many frozen objects (an agent's first pass after the read-ahead) as it
    leaves new ones counts about zero, yet leaves them all to the next collections."""
    n = memory.FREEZE_AFTER + 1000
    older = [[i] for i in range(n)]
    gc.unfreeze()
    gc.collect()
    gc.freeze()  # as the read-ahead's batch ended
    kept = []

    @memory.gc_paused
    def batch() -> None:
        kept.extend([i] for i in range(n))
        older.clear()  # freed: each one counts down the youngest generation

    try:
        frozen = gc.get_freeze_count()
        batch()
        assert len(gc.get_objects(0)) < memory.FREEZE_AFTER
        # What the batch left is frozen: in no generation the collector walks. (Not by the
        # freeze count: threads an earlier test left, finishing now, free frozen objects too.)
        walked = set(map(id, gc.get_objects()))
        assert frozen and not any(id(k) in walked for k in kept)
    finally:
        gc.unfreeze()


def test_one_heap_limits_glibc_to_one_arena():
    import subprocess

    # In a process of its own: the setting is process-wide.
    code = "from kpr import memory; assert memory.one_heap()"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_settle_freezes_and_trims():
    try:
        freed = memory.settle()
        assert freed >= 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert memory.rss_bytes() > 0


# --- the bus ---------------------------------------------------------------------------------


def _bus(settle_memory: bool, monkeypatch):
    calls = []
    monkeypatch.setattr(kbus.memory, "settle", lambda: calls.append("settle") or 0)
    monkeypatch.setattr(kbus.memory, "trim", lambda: calls.append("trim"))
    gate = threading.Event()

    def slow(hook, **kw):
        if hook == "kpr_sync_complete":
            gate.wait(5)

    bus = EventBus(backoff=Backoff(initial=0.01, maximum=0.05), settle_memory=settle_memory)
    bus.add_plugin("fast", lambda hook, **kw: None)
    bus.add_plugin("slow", slow)
    return bus, gate, calls


def test_bus_settles_once_every_plugin_has_the_initial_state(monkeypatch):
    bus, gate, calls = _bus(True, monkeypatch)
    bus.start()
    try:
        assert calls == ["trim"]  # the plugins' compiles are done when the bus starts
        bus.sync_complete()
        time.sleep(0.1)
        assert calls == ["trim"] and not bus.synced()  # one plugin still has it queued
        gate.set()
        assert bus.wait_idle(5) and bus.synced()
        deadline = time.monotonic() + 5
        while calls != ["trim", "settle"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == ["trim", "settle"]
        bus.sync_complete()  # a later sync is no initial state
        assert bus.wait_idle(5)
        time.sleep(0.05)
        assert calls == ["trim", "settle"]
    finally:
        gate.set()
        bus.stop()


def test_bus_leaves_memory_alone_unless_asked(monkeypatch):
    bus, gate, calls = _bus(False, monkeypatch)
    gate.set()
    bus.start()
    try:
        bus.sync_complete()
        assert bus.wait_idle(5) and bus.synced()
        time.sleep(0.05)
        assert calls == []
    finally:
        bus.stop()


# --- the store -------------------------------------------------------------------------------


def test_store_keeps_objects_packed_and_leaves_the_collector_on():
    store = ObjectStore(NODE, NullPublisher())
    svc, es = parsed(service(1)), parsed(endpoint_slice(1))
    store.apply([svc, memory.pack(es)], [])
    assert gc.isenabled()
    backends = store.services[ServiceKey("ns1", "svc1")].frontends[0].backends
    assert backends and backends[0].node_name is sys.intern("node0")
    kept = {ref: store._objects[ref] for ref in store._objects}
    assert all(type(v) is bytes for v in kept.values()), "dicts and packed objects alike"
    assert store.object(("Service", "ns1", "svc1")) == service(1)
    assert store.object(("EndpointSlice", "ns1", "svc1-abcde")) == endpoint_slice(1)


def _store_bytes_per_service(n: int = 2000) -> float:
    """What the store holds (objects and model) per service, for n services x 10 endpoints."""
    texts = [json.dumps(o) for i in range(n) for o in (service(i, i % 10 == 0), endpoint_slice(i))]
    publisher = NullPublisher()
    store = ObjectStore(NODE, publisher)
    store.apply([parsed(service(n)), parsed(endpoint_slice(n))], [])  # anything made once
    gc.collect()
    with held_here() as counted:
        objs = [json.loads(t) for t in texts]
        store.apply(objs, [])
        del objs
        gc.collect()
    held = counted[0]
    assert publisher.upserts == n + 1 and len(store.services) == n + 1
    return held / n


def test_store_bytes_per_service_are_bounded():
    """2k services x 10 endpoints: what the store holds (objects and model) per service.

    Measured in a fresh interpreter: in the suite's process the tests before it left
    process-wide tables (interned strings, caches) at sizes whose next resize could fall in
    the window (6.3 KB alone, 7.2 KB after tests/test_agent.py, 8.2 KB in a full CI run).
    3.7 KB now, the same in every run, with each backend one packed bytes object (4.6 KB with
    backends as dataclasses holding json's address strings, 5.3 KB with slices packed but not
    compressed, 6.8 KB while translation cached every endpoint address it parsed); 6.9 KB
    when first packed, 12.9 KB when the store kept the objects compacted, 15.3 KB before
    that. The bound leaves room for the model or the store's indexes to grow a little, not
    for backends as dataclasses, nor keeping the objects' dicts, an address cache, or slices
    uncompressed."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_memory; "
        "print(test_memory._store_bytes_per_service())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    per_service = float(out.stdout.strip().splitlines()[-1])
    assert per_service < 4000, f"{per_service:.0f} bytes per service"


def test_a_checked_slice_keeps_its_endpoints_in_columns():
    """What validation keeps of an EndpointSlice lives until the store translates it, in a
    full sync every slice's at once. With ten endpoints a slice 69 bytes per endpoint, of
    which 8 are the endpoint's (address, place and state in one u64 of an array) and the
    rest the slice's (its ref, key, ports, the array); 94 bytes with node name and zone
    references in two tuples, 236 bytes when an endpoint was a tuple, an int and json's
    address string (35 MB more at 200k endpoints, freed in holes only after the pass)."""
    texts = [json.dumps(endpoint_slice(i)) for i in range(500)]
    translate.validate_object(json.loads(texts[0]))  # anything made once
    gc.collect()
    with held_here() as counted:
        kept = []
        for text in texts:
            obj = json.loads(text)
            kept.append(translate.validate_object(obj))
            del obj
        gc.collect()
    held = counted[0]
    assert all(k is not None and k.texts is None for k in kept)
    assert kept[1].endpoints[0][0] == "10.244.0.11"  # the address, printed when asked
    per_endpoint = held / (500 * 10)
    assert per_endpoint < 90, f"{per_endpoint:.0f} bytes per endpoint"


def test_service_map_writer_groups_bytes_per_service_are_bounded():
    """2k ClusterIP services x 10 backends: the frontend groups the writer plans (and keeps
    as its shadow of the maps) per service, backend ids allocated for them included.

    Measured at about 2.0 KB with each group's kpr_svc entries packed in two bytes objects,
    its backend ids and slot order in tuples (4.7 KB with a dict of bytes per entry, a
    frozenset and dicts of lists); the bound is below what a dict per group alone would take."""
    from kpr.model import Backend, Frontend, FrontendType, Protocol
    from kpr.servicemaps import ServiceMapWriter

    def svc(i: int) -> Service:
        backends = tuple(Backend(f"10.{i // 25000}.{i // 100 % 250}.{i % 100 * 2 + j}", 8080, node_name=f"node{j % 3}") for j in range(10))
        frontend = Frontend(FrontendType.CLUSTER_IP, f"10.96.{i // 250}.{i % 250 + 1}", 80, Protocol.TCP, backends)
        return Service(ServiceKey(f"ns{i % 7}", f"svc{i}"), (frontend,))

    n = 2000
    services = [svc(i) for i in range(n)]
    writer = ServiceMapWriter("/nonexistent", sizes={"kpr_svc": 262144, "kpr_backend": 262144})  # never opened
    gc.collect()
    with held_here() as counted:
        desired = writer._plan(services, old={})
        gc.collect()
    held = counted[0]
    # one kpr_svc entry per service, its 10 backend slots packed for kpr_slots
    assert len(desired) == n and sum(g.n_svc for g in desired.values()) == n
    assert sum(len(g.slot_vals) for g in desired.values()) == 10 * n * 8
    per_service = held / n
    assert per_service < 2600, f"{per_service:.0f} bytes per service"


def test_allocator_bytes_per_service_are_bounded(tmp_path):
    """2k ClusterIP services, half with the ClusterIP written in the manifest: what the
    allocator keeps per service (its record, the key and ClusterIP strings, its two
    indexes). About 216 bytes with a record's one ClusterIP kept as its string, a shared empty
    mapping for no nodePorts and the explicit claims as a bit mask over the record's claims;
    264 with the ClusterIPs in a tuple of one; 316 with the
    explicit claims as a tuple of claim tuples (112 bytes per explicit ClusterIP); 468 when
    every record also kept its own list of ClusterIPs, dict of nodePorts and list of
    LoadBalancer addresses (empty for most). The bound fails either of those."""
    from kpr.allocator import Allocator
    from kpr.config import PortRange

    n = 2000
    allocator = Allocator(tmp_path / "alloc.json", ["10.96.0.0/12"], PortRange(first=30000, last=32767))
    # half of them with the ClusterIP written in the manifest (an explicit claim to mark)
    services = [{"metadata": {"namespace": "ns", "name": f"svc-{i:05d}"},
                 "spec": {"ports": [{"port": 80, "protocol": "TCP"}],
                          **({"clusterIP": f"10.100.{i // 250}.{i % 250 + 1}"} if i % 2 else {})}} for i in range(n)]
    gc.collect()
    with held_here() as counted:
        for s in services:
            allocator.allocate(s)
        gc.collect()
    held = counted[0]
    assert len(allocator.keys()) == n
    per_service = held / n
    assert per_service < 240, f"{per_service:.0f} bytes per service"


def test_the_writers_full_sync_reads_backend_addresses_from_their_bytes():
    """The kpr_backend keys of a full sync are made from each Backend's packed address (no
    address text printed and parsed back: 200k strings alive at once at 20k services), the
    same keys as from the text, for IPv4, IPv6 and the general form alike."""
    from kpr.model import Backend, Protocol
    from kpr.servicemaps import bulk

    def from_text(flat, port):
        return bulk._keys([b.address for b in flat], [bulk._tail(port, Protocol.TCP)] * len(flat))

    n = 20000
    flat = [Backend(f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}", 8080, node_name="node1") for i in range(n)]
    mixed = flat[:3] + [Backend("fd00::1", 8080), Backend("10.0.0.1", 8080, node_name="n" * 300)]
    for backends in (flat, mixed):
        assert bulk._backend_keys(backends, [8080] * len(backends), [Protocol.TCP], [len(backends)]) == from_text(backends, 8080)
    gc.collect()
    tracemalloc.start()
    try:
        keys = bulk._backend_keys(flat, [8080] * n, [Protocol.TCP], [n])
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(keys) == n
    # The keys and their list are what is kept; the address strings were as much again.
    assert peak < 1.3 * held, f"peak {peak} for {held} kept"


def test_translates_inline_packed_tests_take_what_is_packed_takes():
    """kpr.translate keeps validation's readings by packed object, testing `x.__class__ in
    memory.PACKED` inline (a call costs as much again): it must take exactly what is_packed takes."""
    from types import SimpleNamespace

    before = service(4)
    base = memory.pack(before)
    after = {**before, "spec": {**before["spec"], "clusterIP": "10.96.9.4"}}
    kept = [base, memory.pack_over(base, before, after), before, memory.pack({"t": object()})]
    assert [type(k) for k in kept] == [bytes, memory.Over, dict, dict]
    try:
        for k in kept:
            reading = SimpleNamespace(ref=None)
            translate.remember_checked(k, reading)  # type: ignore[arg-type]
            packed = memory.is_packed(k)
            assert (translate.checked(k) is reading) == packed
            assert (translate.take_checked(k) is reading) == packed
            assert translate.checked(k) is None
    finally:
        translate.forget_checked()
