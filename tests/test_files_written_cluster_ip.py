"""A Service whose manifest writes its one IPv4 ClusterIP is allocated by the files source from
validation's reading (translate._written_allocation, Allocator.take_written, memory.over):
without unpacking it, diffing the allocated copy or reading it again. These tests hold that
short way to the general one (allocate, pack_over, checked_after_allocation): same allocated
object, same allocator state, same reading, same services in the store, same errors."""

from __future__ import annotations

import copy

import pytest
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


def _written_service(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80}], "clusterIP": "10.96.0.10", **spec}}


def test_one_definition_of_the_written_spec(tmp_path, monkeypatch):
    """The allocated fields of a written IPv4 ClusterIP have one definition
    (translate.written_spec): the allocator's written way and the short way's values
    (written_allocation) both follow a change to it."""
    real = translate.written_spec
    monkeypatch.setattr(translate, "written_spec", lambda ip: {**real(ip), "ipFamilyPolicy": "Changed"})
    svc = _written_service()
    allocated = Allocator(tmp_path / "a.json", CIDRS, RANGE).allocate(copy.deepcopy(svc)).obj
    assert allocated["spec"]["ipFamilyPolicy"] == "Changed"
    packed = memory.pack(svc)
    translate.remember_checked(packed, translate.validate_object(copy.deepcopy(svc), translate.address_rules(tuple(CIDRS))))
    try:
        ip, keys, values = translate.written_allocation(packed)
    finally:
        translate.forget_checked()
    assert dict(zip(keys, values))["ipFamilyPolicy"] == "Changed"


def test_written_allocation_takes_packed_bytes_only():
    """written_allocation tests what it is given (the files source passes any object it holds):
    packed bytes of a written Service get the short way; an Over (memory.over builds on bytes
    only) and an object kept unpacked get None, no error."""
    svc = _written_service()
    found = translate.validate_object(copy.deepcopy(svc), translate.address_rules(tuple(CIDRS)))
    packed = memory.pack(svc)
    translate.remember_checked(packed, found)
    try:
        ip, keys, values = translate.written_allocation(packed)
        made = memory.over(packed, keys, values)
        translate.remember_checked(made, found)  # as the files source does for the allocated copy
        assert translate.written_allocation(made) is None
        assert translate.written_allocation(copy.deepcopy(svc)) is None
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



# --- many passes: the short way against the general one -----------------------------------
# Each pass edits the services' files, then both sources (one with the short way turned off)
# take it; after each, the same models, errors, allocations and LoadBalancer news. One pass
# alone (above) misses what a pass leaves for the next: a retry left pending, a refusal's
# second try in the same pass, a LoadBalancer that went back to ClusterIP.

NAMES = ("a", "b", "c")
ADDRESSES = ("10.96.0.10", "10.96.0.11", "10.96.0.12")
step = st.one_of(
    st.tuples(st.just("ip"), st.sampled_from(NAMES), st.sampled_from(ADDRESSES + (None, "None"))),
    st.tuples(st.just("lb"), st.sampled_from(NAMES), st.sampled_from(ADDRESSES + (None,))),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.none()),
    st.tuples(st.just("restart"), st.none(), st.none()),
)


class _Side:
    """One source (short way or not), its store and what its LoadBalancer handler heard;
    restarted as the agent is: a new source and store, the allocator read from its file."""

    def __init__(self, root, short: bool):
        self.root, self.short, self.heard = root, short, []
        self.restart()

    def restart(self) -> None:
        from test_files_source import make
        from test_translate_checked_service import _Publisher

        self.src = make(self.root, cidrs=CIDRS)
        self.store = ObjectStore(NODE, _Publisher(), cluster_cidrs=CIDRS)
        self.src.watch_services(lambda ups, dels: self.heard.append((sorted(map(repr, ups)), sorted(dels))))

    def scan(self) -> None:
        with pytest.MonkeyPatch.context() as m:
            if not self.short:
                m.setattr(translate, "written_allocation", lambda packed: None)
            self.src.scan_once(self.store)

    def seen(self):
        errors = {k.rsplit("/", 1)[-1]: v for k, v in self.store.errors.items()}
        alloc = self.src.allocator
        return self.store.services, errors, {k: alloc.get(k) for k in alloc.keys()}, self.heard


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(step, min_size=1, max_size=3), min_size=2, max_size=6))
def test_many_passes_serve_the_same_with_and_without_the_short_way(tmp_path_factory, passes):
    from test_files_source import service, write

    root = tmp_path_factory.mktemp("passes")
    # b and c write the same address: the clash (one refused, named) until one moves off it.
    specs: dict[str, dict | None] = {"a": {"clusterIP": "10.96.0.10"}, "b": {"clusterIP": "10.96.0.11"}, "c": {"clusterIP": "10.96.0.11"}}
    sides = [_Side(root / "short", True), _Side(root / "general", False)]
    try:
        for i, ops in enumerate([[]] + passes):
            for op, name, value in ops:
                if op == "restart":
                    for side in sides:
                        side.restart()
                elif op == "remove":
                    specs[name] = None
                else:
                    spec = {} if value is None else {"clusterIP": value}
                    if op == "lb":
                        spec["type"] = "LoadBalancer"
                    specs[name] = spec
            for side in sides:
                for name, spec in specs.items():
                    path = side.src.path / f"{name}.yaml"
                    if spec is None:
                        path.unlink(missing_ok=True)
                    else:
                        write(path, service(name, **copy.deepcopy(spec)))
                side.scan()
            assert sides[0].seen() == sides[1].seen(), f"pass {i}: {ops}"
    finally:
        translate.forget_checked()
