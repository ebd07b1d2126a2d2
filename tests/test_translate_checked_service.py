"""A Service is read once: validation's reading of the manifest's version (kept by the files
source, translate.remember_checked) is reused for the allocated version, brought up to date
with what allocation filled in (translate.checked_after_allocation; None when anything else
changed or a filled-in value does not read cleanly), and the store translates it
without reading it again. Whatever the Service and whatever allocation did, the reading
reused must be the one a fresh reading of the allocated Service gives."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpr import memory, translate
from kpr.allocator import Allocator, AllocationError
from kpr.config import PortRange
from kpr.model import NodeInfo
from kpr.store import ObjectStore

CIDRS = ("10.96.0.0/16", "fd00:96::/112")
RULES = translate.address_rules(CIDRS)
NODE = NodeInfo("node1", ("192.168.50.10",))

spec_fields = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
    "clusterIP": st.sampled_from(["10.96.0.10", "010.96.0.11", "fd00:96::5", "None", ""]),
    "clusterIPs": st.sampled_from([["10.96.0.10"], ["10.96.0.10", "fd00:96::5"], ["fd00:96::5"]]),
    "ipFamilies": st.sampled_from([["IPv4"], ["IPv6"], ["IPv4", "IPv6"], ["IPv6", "IPv4"]]),
    "ipFamilyPolicy": st.sampled_from(["SingleStack", "PreferDualStack", "RequireDualStack"]),
    "externalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
    "healthCheckNodePort": st.sampled_from([30500, 0]),
    "externalIPs": st.just(["192.0.2.7"]),
})
port = st.fixed_dictionaries({"name": st.sampled_from(["http", "dns"]), "port": st.sampled_from([80, 53])},
                             optional={"nodePort": st.sampled_from([30080, 30053]), "protocol": st.sampled_from(["TCP", "UDP"])})


def _service(spec: dict, ports: list[dict], labels: dict | None) -> dict:
    meta: dict = {"name": "web", "namespace": "shop"}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {**spec, "ports": ports}}


@settings(max_examples=600, deadline=None)
@given(spec_fields, st.lists(port, min_size=1, max_size=2, unique_by=lambda p: (p["name"], p.get("protocol"))),
       st.sampled_from([None, {"app": "web"}]), st.sampled_from([CIDRS, CIDRS[:1]]))
def test_a_reused_reading_is_a_fresh_reading_of_the_allocated_service(tmp_path_factory, spec, ports, labels, cidrs):
    svc = _service(spec, ports, labels)
    rules = translate.address_rules(cidrs)
    try:
        found = translate.validate_object(copy.deepcopy(svc), rules)
    except translate.InvalidObject:
        return
    packed = memory.pack(svc)
    translate.remember_checked(packed, found)
    try:
        read = memory.unpack(packed)
        allocator = Allocator(tmp_path_factory.mktemp("a") / "a.json", list(cidrs), PortRange(first=30000, last=32767))
        try:
            allocated = allocator.allocate(read).obj
        except AllocationError:
            return
        reused = translate.checked_after_allocation(packed, read, allocated)
        if reused is None:
            return
        fresh = translate.validate_object(allocated, rules)
        assert reused.spec == fresh.spec
        assert (reused.ref, reused.key, reused.labels, reused.annotations) == (fresh.ref, fresh.key, fresh.labels, fresh.annotations)
    finally:
        translate.forget_checked()


def test_an_explicit_cluster_ip_is_read_once(tmp_path, monkeypatch):
    """The files source into the store: the Service is parsed by validation only, and the
    store serves what it would serve reading it itself."""
    from test_files_source import make, service, slice_, write

    src = make(tmp_path, cidrs=CIDRS[:1])
    write(src.path / "a.yaml", service("web", clusterIP="10.96.0.10"), slice_("web", "10.244.0.5"),
          service("auto"), slice_("auto", "10.244.0.6"))
    calls = []
    original = translate._parse_service

    def counted(obj, rules=translate.NO_RULES):
        calls.append(obj["metadata"]["name"])
        return original(obj, rules)

    monkeypatch.setattr(translate, "_parse_service", counted)
    store = ObjectStore(NODE, _Publisher(), cluster_cidrs=CIDRS[:1])
    src.scan_once(store)
    # Validation only, also for auto, whose ClusterIP was picked (the picked fields are read
    # on their own, translate._allocated_spec).
    assert sorted(calls) == ["auto", "web"]
    monkeypatch.setattr(translate, "_parse_service", original)
    for key, service_ in store.services.items():
        kept = store.object(("Service", key.namespace, key.name))
        slices = [store.object(("EndpointSlice", key.namespace, f"{key.name}-abc"))]
        assert service_ == translate.translate_service(kept, slices, None, NODE, "", translate.address_rules(CIDRS[:1]), key)


def test_allocation_that_fills_in_values_updates_the_reading():
    svc = _service({"type": "NodePort", "clusterIP": "10.96.0.10"}, [{"name": "http", "port": 80}], None)
    found = translate.validate_object(svc, RULES)
    packed = memory.pack(svc)
    translate.remember_checked(packed, found)
    try:
        read = memory.unpack(packed)

        def reading(**spec):
            allocated = {**read, "spec": {**read["spec"], **spec}}
            reused = translate.checked_after_allocation(packed, read, allocated)
            if reused is not None:
                assert reused.spec == translate.validate_object(allocated, RULES).spec
            return reused

        picked_port = reading(ports=[{"name": "http", "port": 80, "nodePort": 30001}])
        assert picked_port.spec.ports[0].node_port == 30001 and picked_port.spec.cluster_ips == found.spec.cluster_ips
        other_ip = reading(clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"])
        assert [ip[0] for ip in other_ip.spec.cluster_ips] == ["10.96.0.11"]
        assert reading(clusterIPs=["10.96.0.10", "fd00:96::7"], ipFamilies=["IPv4", "IPv6"]).spec.families == (4, 6)
        same = reading(clusterIPs=["10.96.0.10"], ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack")
        assert same.spec == found.spec and same.ref is found.ref
        # Values that do not read cleanly, and changes allocation never makes: read afresh
        # by translation, which names the problem.
        assert reading(clusterIP="10.97.0.1", clusterIPs=["10.97.0.1"]) is None  # outside the CIDR
        assert reading(clusterIP="10.96.0.11", clusterIPs=["10.96.0.12"]) is None
        assert reading(ipFamilyPolicy="Sometimes") is None
        assert reading(ports=[{"name": "http", "port": 80, "nodePort": 70000}]) is None
        assert reading(ports=[]) is None
        assert reading(selector={"app": "web"}) is None
        with_status = {**read, "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}
        assert translate.checked_after_allocation(packed, read, with_status) is None
    finally:
        translate.forget_checked()


def test_families_allocation_drops_update_the_reading(tmp_path):
    """PreferDualStack with both families written, and only an IPv4 clusterCIDR: allocation
    keeps the written ClusterIP and fills in ipFamilies [IPv4]; the reading's families follow."""
    svc = _service({"clusterIP": "10.96.0.10", "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"},
                   [{"name": "http", "port": 80}], None)
    rules = translate.address_rules(CIDRS[:1])
    found = translate.validate_object(copy.deepcopy(svc), rules)
    assert found.spec.families == (4, 6)
    packed = memory.pack(svc)
    translate.remember_checked(packed, found)
    try:
        read = memory.unpack(packed)
        allocated = Allocator(tmp_path / "a.json", list(CIDRS[:1]), PortRange(first=30000, last=32767)).allocate(read).obj
        assert allocated["spec"]["ipFamilies"] == ["IPv4"]
        reused = translate.checked_after_allocation(packed, read, allocated)
        assert reused.spec.families == (4,)
        assert reused.spec == translate.validate_object(allocated, rules).spec
    finally:
        translate.forget_checked()

class _Publisher:
    def upsert(self, service) -> None:
        pass

    def delete(self, key) -> None:
        pass

    def sync_complete(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    translate.forget_checked()


def test_a_service_whose_reading_is_kept_is_no_slice():
    """Services' readings are kept beside slices' (by their packed bytes): what reads a
    slice's reading must not take a Service's for one (endpoint_addresses_of never raises
    and finds none; a Service handed as a slice is refused by name, not an AttributeError)."""
    svc = _service({"clusterIP": "10.96.0.10"}, [{"name": "http", "port": 80}], None)
    packed = memory.pack(svc)
    translate.remember_checked(packed, translate.validate_object(copy.deepcopy(svc), RULES))
    assert translate.endpoint_addresses_of(packed, RULES) == set()
    with pytest.raises(translate.InvalidObject, match="expected an EndpointSlice"):
        translate.translate_service(svc, [packed], None, NODE, "", RULES)
