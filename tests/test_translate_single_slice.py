"""A service of one EndpointSlice without zone hints to honour (the common case) takes a
short way to its backends (translate._single_slice_backends); whatever the slice holds,
translation must give what the general path gives, backend for backend and in order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpr import translate
from kpr.model import NodeInfo

NODE = NodeInfo(name="node-a", addresses=("192.168.0.10",), zone="zone-a")

SERVICE = {
    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"clusterIP": "10.96.0.10", "type": "NodePort", "ports": [
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]},
}

conditions = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={"ready": st.booleans(), "serving": st.booleans(), "terminating": st.booleans()}),
)
endpoint = st.fixed_dictionaries(
    {"addresses": st.lists(st.sampled_from(["10.244.0.1", "10.244.0.2", "10.244.0.10", "10.244.1.3", "10.1.0.9"]), min_size=1, max_size=1)},
    optional={
        "conditions": conditions,
        "nodeName": st.sampled_from(["", "node-a", "node-b"]),
        "zone": st.sampled_from(["zone-a", "zone-b"]),
        "hints": st.just({"forZones": [{"name": "zone-b"}]}),
    },
)
port = st.fixed_dictionaries({
    "name": st.sampled_from(["http", "dns", "other"]),
    "protocol": st.sampled_from(["TCP", "UDP"]),
    "port": st.sampled_from([0, 8080, 8081, 53]),
})


def _slice(endpoints: list[dict], ports: list[dict]) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    }


def _both_ways(svc: dict, es: dict, monkeypatch: pytest.MonkeyPatch):
    fast = translate.translate_service(svc, [es], None, NODE)
    with monkeypatch.context() as m:
        m.setattr(translate, "_single_slice_backends", lambda *a: None)
        general = translate.translate_service(svc, [es], None, NODE)
    return fast, general


@settings(max_examples=300, deadline=None)
@given(st.lists(endpoint, max_size=8), st.lists(port, min_size=1, max_size=3), st.booleans(), st.booleans())
def test_single_slice_gives_what_the_general_path_gives(endpoints, ports, publish, topology):
    svc = {**SERVICE, "spec": {**SERVICE["spec"], "publishNotReadyAddresses": publish}}
    if topology:
        svc["spec"]["trafficDistribution"] = "PreferClose"
    with pytest.MonkeyPatch.context() as mp:
        fast, general = _both_ways(svc, _slice(endpoints, ports), mp)
    assert fast == general
    if fast is not None:
        for a, b in zip(fast.frontends, general.frontends):
            assert [x.address for x in a.backends] == [x.address for x in b.backends]


def test_the_short_way_is_taken_and_sorts_by_address(monkeypatch):
    taken = []
    original = translate._single_slice_backends

    def spy(*args):
        out = original(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(translate, "_single_slice_backends", spy)
    es = _slice([{"addresses": [a]} for a in ("10.244.0.10", "10.244.0.2", "10.244.0.9")], [{"name": "http", "port": 8080, "protocol": "TCP"}])
    service = translate.translate_service(SERVICE, [es], None, NODE)
    assert taken == [True]
    http = next(f for f in service.frontends if f.port == 80)
    assert [b.address for b in http.backends] == ["10.244.0.2", "10.244.0.9", "10.244.0.10"]


def test_an_address_listed_twice_takes_the_general_way(monkeypatch):
    es = _slice(
        [{"addresses": ["10.244.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
         {"addresses": ["10.244.0.2"], "conditions": {"ready": True}}],
        [{"name": "http", "port": 8080, "protocol": "TCP"}],
    )
    assert translate._single_slice_backends(translate._parse_slice(es), False, "node-a") is None
    fast, general = _both_ways(SERVICE, es, monkeypatch)
    assert fast == general
    http = next(f for f in fast.frontends if f.port == 80)
    assert [b.state.value for b in http.backends] == ["active"]


def test_a_full_table_of_places_keeps_names_in_the_parse(monkeypatch):
    """A slice's parse keeps each endpoint's (node name, zone) as an index into the model's
    table of places; when that table is full it keeps the names themselves, and translation
    gives the same backends (nodes are new places: at most PLACES_MAX are ever indexed)."""
    from kpr import model

    endpoints = [{"addresses": [f"10.244.0.{i}"], "nodeName": f"node-only-here-{i}", "zone": "zone-q"} for i in (3, 1, 2)]
    es = _slice(endpoints, [{"name": "http", "port": 8080, "protocol": "TCP"}])
    monkeypatch.setattr(model, "PLACES_MAX", len(model.places))
    parsed = translate._parse_slice(es)
    assert parsed.pairs == (("node-only-here-3", "zone-q"), ("node-only-here-1", "zone-q"), ("node-only-here-2", "zone-q"))
    assert [e[2:4] for e in parsed.endpoints] == list(parsed.pairs)
    service = translate.translate_service(SERVICE, [es], None, NODE)
    http = next(f for f in service.frontends if f.port == 80)
    assert [(b.address, b.node_name, b.zone) for b in http.backends] == [
        (f"10.244.0.{i}", f"node-only-here-{i}", "zone-q") for i in (1, 2, 3)
    ]
    monkeypatch.undo()
    assert translate._parse_slice(es).pairs is None
    again = next(f for f in translate.translate_service(SERVICE, [es], None, NODE).frontends if f.port == 80)
    assert [(b.address, b.node_name, b.zone) for b in again.backends] == [
        (b.address, b.node_name, b.zone) for b in http.backends
    ]


def test_a_refused_slice_adds_no_places():
    """The model's table of places never gives an entry back (backends hold their index) and
    stops at PLACES_MAX: a slice refused at its last endpoint (bad input, read again at every
    pass) must not fill it with the names of the endpoints before."""
    from kpr import model
    from kpr.model import InvalidObject

    names = [f"node-of-a-refused-slice-{i}" for i in range(3)]
    endpoints = [{"addresses": [f"10.244.7.{i + 1}"], "nodeName": n, "zone": "zone-r"} for i, n in enumerate(names)]
    es = _slice([*endpoints, {"addresses": ["not-an-address"]}], [{"name": "http", "port": 8080, "protocol": "TCP"}])
    with pytest.raises(InvalidObject, match=r"endpoints\[3\]"):
        translate.validate_object(es)
    assert [(n, "zone-r") in model.place_ids for n in names] == [False] * 3
    assert translate.validate_object(_slice(endpoints, es["ports"])).pairs is None  # read whole: indexed
    assert [(n, "zone-r") in model.place_ids for n in names] == [True] * 3


def test_a_node_name_longer_than_kubernetes_allows_takes_the_general_path():
    """Such a name is not indexed in the model's table of places (model.place_id): the parse
    keeps the names, and translation gives the backend with them."""
    endpoints = [{"addresses": ["10.244.8.1"], "nodeName": "n" * 300, "zone": "zone-l"},
                 {"addresses": ["10.244.8.2"], "nodeName": "node-a", "zone": "zone-l"}]
    es = _slice(endpoints, [{"name": "http", "port": 8080, "protocol": "TCP"}])
    assert translate._parse_slice(es).pairs == (("n" * 300, "zone-l"), ("node-a", "zone-l"))
    http = next(f for f in translate.translate_service(SERVICE, [es], None, NODE).frontends if f.port == 80)
    assert [(b.address, b.node_name, b.local) for b in http.backends] == [("10.244.8.1", "n" * 300, False), ("10.244.8.2", "node-a", True)]
