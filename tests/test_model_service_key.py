"""ServiceKey is a tuple (issue 11): its hashing, equality and ordering run in C, not as
Python calls (about 300k of them on the way to ready at 20k services), and it still behaves
as the frozen dataclass it was wherever kpr makes, keeps or hands one on."""

from __future__ import annotations

import copy
import pickle
import sys

import pytest

from kpr import memory
from kpr.model import NodeInfo, ServiceKey
from kpr.store import ObjectStore
from kpr.testing.bus import make_bus, svc
from kpr.translate import SERVICE_NAME_LABEL


def python_calls(fn) -> list[str]:
    """The Python functions fn calls (C functions are not listed)."""
    calls: list[str] = []

    def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "call":
            calls.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return [c for c in calls if c not in ("python_calls.<locals>.profile", fn.__code__.co_qualname)]


def test_hash_equality_and_order_run_no_python_code():
    a, same, b = ServiceKey("ns", "a"), ServiceKey("ns", "a"), ServiceKey("ns", "b")
    held = {a: 1}
    members = {a, b}

    def work() -> None:
        hash(a)
        assert a == same and a != b and not (a == b)
        assert a < b and b > a and a <= same
        assert held[same] == 1 and same in members and b not in held
        assert sorted([b, a]) == [a, b]

    work()  # (the asserts hold before profiling: a failure names them, not the profile)
    assert python_calls(work) == []


def test_construction_by_position_and_keyword_repr_str_parse():
    key = ServiceKey("ns", "web")
    assert ServiceKey(namespace="ns", name="web") == key
    assert (key.namespace, key.name) == ("ns", "web")
    assert repr(key) == "ServiceKey(namespace='ns', name='web')"
    assert str(key) == f"{key}" == "ns/web"
    assert ServiceKey.parse("ns/web") == key and type(ServiceKey.parse("ns/web")) is ServiceKey
    for bad in ("ns", "/web", "ns/", ""):
        with pytest.raises(ValueError):
            ServiceKey.parse(bad)
    with pytest.raises(TypeError):
        ServiceKey("ns")
    with pytest.raises(TypeError):
        ServiceKey("ns", "web", "extra")


def test_frozen_slotted_and_ordered_as_namespace_then_name():
    key = ServiceKey("ns", "web")
    with pytest.raises(AttributeError):
        key.name = "other"  # type: ignore[misc]
    assert not hasattr(key, "__dict__")
    keys = [ServiceKey(n, s) for n in ("b", "a", "ab") for s in ("z", "a", "m")]
    assert sorted(keys) == sorted(keys, key=lambda k: (k.namespace, k.name))
    # the same hash as the dataclass gave (hash of the (namespace, name) tuple)
    assert hash(key) == hash(("ns", "web"))


def test_round_trips_as_a_service_key():
    key = ServiceKey("ns", "web")
    for back in (pickle.loads(pickle.dumps(key)), copy.copy(key), copy.deepcopy(key),
                 # marshal refuses tuple subclasses: pack keeps the key itself, not a plain tuple
                 memory.unpack(memory.pack(key))):
        assert back == key and type(back) is ServiceKey


def test_the_store_and_the_bus_hand_on_service_keys():
    published: list = []

    class Publisher:
        def upsert(self, service) -> None:  # noqa: ANN001
            published.append(service.key)

        def delete(self, key) -> None:  # noqa: ANN001
            published.append(key)

        def sync_complete(self) -> None:
            pass

    store = ObjectStore(NodeInfo("node1", ("192.168.50.10",)), Publisher())
    svc_obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5"], "ports": [{"name": "http", "port": 80}]}}
    slice_obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "web-1", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                 "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                 "endpoints": [{"addresses": ["10.244.1.5"]}]}
    store.apply([svc_obj, slice_obj], [])
    store.apply([], [("Service", "shop", "web")])
    assert published == [ServiceKey("shop", "web")] * 2
    assert all(type(k) is ServiceKey for k in published)

    bus, recs = make_bus("a")
    bus.start()
    try:
        bus.changes([svc("web"), ServiceKey("default", "gone")])
        assert bus.wait_idle(10)
    finally:
        bus.stop()
    (upsert, service), (delete, key) = recs["a"].calls
    assert (upsert, delete) == ("kpr_service_upsert", "kpr_service_delete")
    assert type(service.key) is ServiceKey and service.key == ServiceKey("default", "web")
    assert type(key) is ServiceKey and key == ServiceKey("default", "gone")
