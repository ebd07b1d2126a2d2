"""A Service whose manifest writes its one IPv4 ClusterIP is allocated by the files source from
validation's reading (translate._written_allocation, Allocator.take_written, memory.over):
without unpacking it, diffing the allocated copy or reading it again. These tests hold that
short way to the general one (allocate, pack_over, checked_after_allocation): same allocated
object, same allocator state, same reading, same services in the store, same errors."""

from __future__ import annotations

import copy

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kpr import memory, translate
from kpr.allocator import AllocationError, Allocator
from kpr.config import PortRange
from kpr.model import NodeInfo
from kpr.store import ObjectStore

RANGE = PortRange(first=30000, last=32767)
CIDRS = ["10.96.0.0/16"]
NODE = NodeInfo("node1", ("192.168.50.10",))

# Weighted to the short way's shape (a written IPv4 ClusterIP), with each way out of it.
spec_fields = st.fixed_dictionaries({
    "clusterIP": st.sampled_from(["10.96.0.10"] * 6 + ["010.96.0.11", "fd00:96::5", "None", ""]),
}, optional={
    "type": st.sampled_from(["ClusterIP"] * 3 + ["NodePort", "ExternalName"]),
    "clusterIPs": st.sampled_from([["10.96.0.10"]] * 3 + [["10.96.0.11"], ["10.96.0.10", "fd00:96::5"], []]),
    "ipFamilies": st.sampled_from([["IPv4"]] * 3 + [["IPv6"], ["IPv4", "IPv6"], []]),
    "ipFamilyPolicy": st.sampled_from(["SingleStack"] * 3 + ["PreferDualStack"]),
    "selector": st.just({"app": "web"}),
})


@settings(max_examples=500, deadline=None)
@given(spec_fields, st.permutations(["ports", "clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "selector"]),
       st.sampled_from([None, "shop/web", "shop/other"]))
def test_the_short_way_allocates_as_the_general_way(tmp_path_factory, spec, order, holder):
    spec = {"ports": [{"name": "http", "port": 80}], **spec}
    spec = {k: spec[k] for k in order if k in spec}  # keys in any order: Over's keys follow it
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": spec}
    rules = translate.address_rules(tuple(CIDRS))
    try:
        found = translate.validate_object(copy.deepcopy(svc), rules)
    except translate.InvalidObject:
        return
    if found.written is None:
        return
    packed = memory.pack(svc)
    dirs = tmp_path_factory.mktemp("a")
    general, short = (Allocator(dirs / f"{n}.json", CIDRS, RANGE) for n in ("general", "short"))
    if holder is not None:  # the address held already, by this service or another
        for a in (general, short):
            a.allocate({"metadata": {"name": holder.split("/")[1], "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.10"}})
    translate.remember_checked(packed, found)
    try:
        read = memory.unpack(packed)
        try:
            allocated = general.allocate(read).obj
        except AllocationError:
            allocated = None
        ip, keys, values = translate.written_allocation(packed)
        took = short.take_written("shop/web", ip)
        event(f"taken={took}")
        # Taken exactly when the general way takes it without displacing anyone.
        assert took == (allocated is not None and holder != "shop/other")
        if not took:
            assert short.get("shop/web") == general.get("shop/web") or allocated is None
            return
        assert short.get("shop/web") == general.get("shop/web") and short.dirty == general.dirty
        made = memory.over(packed, keys, values)
        assert memory.unpack(made) == allocated
        assert list(memory.unpack(made)["spec"]) == list(allocated["spec"])  # key order too
        diffed = memory.pack_over(packed, read, allocated)
        assert (made.base, made.keys) == (diffed.base, diffed.keys)
        assert memory.unpack(made) == memory.unpack(diffed)
        # The reading stands for the allocated Service, as checked_after_allocation finds.
        assert translate.checked_after_allocation(packed, read, allocated) is found
    finally:
        translate.forget_checked()


def _scan(tmp_path, docs, monkeypatch=None, short=True):
    from test_files_source import make, write
    from test_translate_checked_service import _Publisher

    src = make(tmp_path, cidrs=CIDRS)
    write(src.path / "a.yaml", *docs)
    if not short:
        monkeypatch.setattr(translate, "written_allocation", lambda packed: None)
    store = ObjectStore(NODE, _Publisher(), cluster_cidrs=CIDRS)
    src.scan_once(store)
    return src, store


def test_the_files_source_serves_the_same_with_and_without_the_short_way(tmp_path, monkeypatch):
    from test_files_source import service, slice_

    docs = [
        service("web", clusterIP="10.96.0.10"),
        slice_("web", "10.244.0.5"),
        service("both", clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"], ipFamilies=["IPv4"]),
        # Writes the address web holds: refused by the general way, which names it.
        service("clash", clusterIP="10.96.0.10"),
        service("auto"),
        slice_("auto", "10.244.0.6"),
        service("np", type="NodePort", clusterIP="10.96.0.12"),
    ]
    calls = []
    taken = Allocator.take_written

    def counted(self, key, ip, old=False):
        calls.append(key)
        return taken(self, key, ip, old)

    monkeypatch.setattr(Allocator, "take_written", counted)
    fast, fast_store = _scan(tmp_path / "short", copy.deepcopy(docs))
    # The short way served web and both; clash was tried and left to the general way.
    assert {"default/web", "default/both", "default/clash"} <= set(calls)
    allocated_short = {k: fast.allocator.get(k) for k in fast.allocator.keys()}
    with monkeypatch.context() as m:
        slow, slow_store = _scan(tmp_path / "general", copy.deepcopy(docs), m, short=False)
    assert fast_store.services == slow_store.services
    def errors(store):  # by file name: the two sources read two directories
        return {k.rsplit("/", 1)[-1]: v for k, v in store.errors.items()}

    assert errors(fast_store) == errors(slow_store)
    assert "already allocated to service default/web" in errors(fast_store)["a.yaml"]
    assert allocated_short == {k: slow.allocator.get(k) for k in slow.allocator.keys()}
    for ref in (("Service", "default", "web"), ("Service", "default", "both")):
        assert fast_store.object(ref) == slow_store.object(ref)
        assert fast_store.object(ref)["spec"]["clusterIPs"] == [fast_store.object(ref)["spec"]["clusterIP"]]

