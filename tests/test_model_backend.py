"""model.Backend, one packed bytes object per backend, reads back every field as given."""

from __future__ import annotations

import copy
import gc
import inspect
import pickle
import sys

import pytest

from kpr import model
from kpr.model import (
    BACKEND_LOCAL,
    BACKEND_TERMINATING,
    Backend,
    BackendState,
    Frontend,
    FrontendType,
    Protocol,
    backend_v4,
    backends_v4,
)

FULL = dict(address="10.0.0.1", port=80, state=BackendState.TERMINATING, node_name="n1", local=True, zone="z1")
FIELDS = ["address", "port", "state", "node_name", "local", "zone"]


def fields_of(b: Backend) -> dict:
    return {name: getattr(b, name) for name in FIELDS}


def test_fields_by_position_and_keyword_and_defaults() -> None:
    assert list(inspect.signature(Backend).parameters) == FIELDS
    by_keyword, by_position = Backend(**FULL), Backend(*FULL.values())
    assert fields_of(by_keyword) == fields_of(by_position) == FULL
    assert by_keyword == by_position and hash(by_keyword) == hash(by_position)
    assert fields_of(Backend("10.0.0.1", 80)) == dict(
        address="10.0.0.1", port=80, state=BackendState.ACTIVE, node_name="", local=False, zone=""
    )
    with pytest.raises(TypeError):
        Backend()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Backend(**FULL, unknown=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("change", [dict(address="10.0.0.2"), dict(port=81), dict(state=BackendState.ACTIVE),
                                    dict(node_name="n2"), dict(local=False), dict(zone="z2")], ids=str)
def test_every_field_counts_in_equality(change: dict) -> None:
    assert Backend(**FULL) != Backend(**{**FULL, **change})


def test_immutable_pickle_copy_repr() -> None:
    b = Backend(**FULL)
    for name in FIELDS:
        with pytest.raises(AttributeError):
            setattr(b, name, FULL[name])
    assert not hasattr(b, "__dict__")
    assert pickle.loads(pickle.dumps(b)) == b and copy.deepcopy(b) is b
    assert repr(b) == (
        "Backend(address='10.0.0.1', port=80, state=<BackendState.TERMINATING: 'terminating'>, "
        "node_name='n1', local=True, zone='z1')"
    )


def test_state_by_value_and_refused_when_unknown() -> None:
    assert Backend("10.0.0.1", 80, "terminating").state is BackendState.TERMINATING  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="draining"):
        Backend("10.0.0.1", 80, "draining")  # type: ignore[arg-type]


def test_compact_form_is_small() -> None:
    """The point of the class: an IPv4 backend in 64 bytes (with its GC header), where the
    dataclass and its address string took 144."""
    b = Backend("10.244.123.234", 8080, node_name="node-with-a-long-name-1", zone="zone-a")
    assert len(b) == 9 and sys.getsizeof(b) <= 64
    assert gc.get_referents(b) == [Backend]  # no string kept per backend
    assert len(Backend("fd00:1::abcd", 8080)) == 21


@pytest.mark.parametrize("address", ["10.0.0.1", "fd00::1", "2001:db8::", "::ffff:1.2.3.4"])
def test_canonical_addresses_are_packed(address: str) -> None:
    b = Backend(address, 443)
    assert b[0] & model._GENERAL == 0 and b.address == address
    assert b.family == (6 if ":" in address else 4)


@pytest.mark.parametrize(
    "fields",
    [
        # not canonical text: read back as written, not normalised
        dict(address="010.0.0.1", port=80),
        dict(address="FD00::1", port=80),
        dict(address="fd00:0::1", port=80),
        dict(address="not-an-ip", port=80),
        dict(address="10.1.3.9\x00", port=80),
        dict(address="fd00::1\x00", port=80),
        # ports out of a u16, or not ints; names that are not strings
        dict(address="10.0.0.1", port=70000),
        dict(address="10.0.0.1", port=-1),
        dict(address="10.0.0.1", port="80"),
        dict(address="10.0.0.1", port=80, node_name=None),
    ],
    ids=str,
)
def test_what_the_compact_form_cannot_hold_reads_back_as_given(fields: dict) -> None:
    b = Backend(**fields)
    assert b[0] & model._GENERAL
    assert fields_of(b) == {**fields_of(Backend("10.0.0.1", 80)), **fields}
    assert b == Backend(**fields) and b != Backend("10.0.0.1", 80)


def test_backend_v4_is_the_same_backend() -> None:
    for state in BackendState:
        made = backend_v4(0x0AF4_0102, 8080, state, "node-a", True, "z")
        assert made == Backend("10.244.1.2", 8080, state, "node-a", True, "z") and type(made) is Backend


def test_backends_v4_are_the_same_backends() -> None:
    """The public builder translation makes a slice's IPv4 backends with: each flag bit
    means what Backend's own arguments say, in the given order, for the given port."""
    place = model.place_id("node-b", "zone-b")
    assert place is not None
    flags = (0, BACKEND_TERMINATING, BACKEND_LOCAL, BACKEND_TERMINATING | BACKEND_LOCAL)
    made = backends_v4(9090, [(f, place, 0x0A00_0001 + i) for i, f in enumerate(flags)])
    states = (BackendState.ACTIVE, BackendState.TERMINATING) * 2
    assert made == tuple(
        Backend(f"10.0.0.{1 + i}", 9090, state, "node-b", i >= 2, "zone-b") for i, state in enumerate(states)
    )
    assert all(type(b) is Backend for b in made) and backends_v4(80, []) == ()


def test_places_past_the_table_are_kept_in_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Node names come and go with nodes: the table of (node, zone) pairs stops growing at
    PLACES_MAX, and a backend of a pair not in it keeps its names itself."""
    known = Backend("10.0.0.1", 80, node_name="n1")
    monkeypatch.setattr(model, "PLACES_MAX", len(model.places))
    new = Backend("10.0.0.1", 80, node_name="node-never-seen-before", zone="z9")
    assert new[0] & model._GENERAL and (new.node_name, new.zone) == ("node-never-seen-before", "z9")
    assert backend_v4(0x0A000001, 80, BackendState.ACTIVE, "node-never-seen-before", False, "z9") == new
    assert Backend("10.0.0.1", 80, node_name="n1") == known and not known[0] & model._GENERAL
    assert ("node-never-seen-before", "z9") not in model.place_ids


def test_frontends_compare_by_their_backends() -> None:
    fe = Frontend(FrontendType.CLUSTER_IP, "10.96.0.1", 80, Protocol.TCP, (Backend(**FULL),))
    assert fe == Frontend(FrontendType.CLUSTER_IP, "10.96.0.1", 80, Protocol.TCP, (Backend(*FULL.values()),))
    assert hash(fe) == hash(Frontend(FrontendType.CLUSTER_IP, "10.96.0.1", 80, Protocol.TCP, (Backend(**FULL),)))
    assert fe.selectable(local_only=True) == fe.backends


def test_backends_hand_out_one_int_per_port_number() -> None:
    """A reader listing every backend's port (the writer's full sync: 200k) holds one int
    per port number, not one per backend."""
    ports = [Backend(f"10.0.{i // 256}.{i % 256}", 8080 + i % 2).port for i in range(1000)]
    assert len({id(p) for p in ports}) == 2 and ports[:2] == [8080, 8081]


def test_the_general_form_is_equal_and_hashed_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends kept as marshal writes them (a full table of places, an address not in
    canonical text) are equal by their fields, whatever the strings' interning and sharing:
    marshal writes an interned string with another type code and a string met twice as a
    reference, so equal fields gave other bytes (the store saw a changed service)."""
    monkeypatch.setattr(model, "PLACES_MAX", len(model.places))
    fresh = "".join  # a new, uninterned string of the same text
    pairs = [
        (Backend(sys.intern("2001:DB8::1"), 80), Backend(fresh(["2001:DB8", "::1"]), 80)),
        (
            Backend("10.0.0.1", 80, node_name=sys.intern("node-general"), zone=sys.intern("node-general")),
            Backend("10.0.0.1", 80, node_name=fresh(["node-", "general"]), zone=fresh(["node-", "general"])),
        ),
        (
            backend_v4(0x0A000001, 80, BackendState.ACTIVE, "node-general", False, "zone-general"),
            Backend(fresh(["10.0.", "0.1"]), 80, node_name=fresh(["node-", "general"]), zone=fresh(["zone-", "general"])),
        ),
    ]
    for a, b in pairs:
        assert a[0] & model._GENERAL and b[0] & model._GENERAL
        assert fields_of(a) == fields_of(b)
        assert a == b and hash(a) == hash(b), (bytes(a), bytes(b))


def test_names_longer_than_kubernetes_allows_are_kept_by_the_backend() -> None:
    """The table of places never gives an entry back: a node name or zone longer than
    Kubernetes allows (a manifest's, unchecked) would be held there for good, its bytes
    unbounded. Such a backend keeps its names itself, freed with it."""
    long_node, long_zone = "n" * 254, "z" * 64
    for node, zone in ((long_node, ""), ("node-a", long_zone)):
        b = Backend("10.0.0.1", 80, node_name=node, zone=zone)
        assert b[0] & model._GENERAL and (b.node_name, b.zone) == (node, zone)
        assert (node, zone) not in model.place_ids and model.place_id(node, zone) is None
    fits = Backend("10.0.0.1", 80, node_name="n" * 253, zone="z" * 63)
    assert not fits[0] & model._GENERAL and fits.node_name == "n" * 253
