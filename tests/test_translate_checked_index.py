"""The store's index of endpoint addresses a ClusterIP could be: a slice validation read
(translate.checked) is filtered by comparing each endpoint's packed int (address << 2 | its
state) with service.clusterCIDR's range; the answer must be the one the general path gives
from the object's text, at the range's edges, for every endpoint state and both families."""

from __future__ import annotations

import ipaddress

import pytest

from kpr import memory
from kpr.translate import AddressRules, endpoint_addresses_of, forget_checked, remember_checked, validate_object

# Every state the packing keeps in the low two bits: ready, draining (serving and
# terminating), unusable (not ready, not serving).
STATES = (
    {"ready": True, "serving": True, "terminating": False},
    {"ready": False, "serving": True, "terminating": True},
    {"ready": False, "serving": False, "terminating": False},
)


def _edges(cidr: str) -> list[str]:
    """The addresses just outside, at and just inside both ends of `cidr`."""
    net = ipaddress.ip_network(cidr)
    first, last = int(net.network_address), int(net.broadcast_address)
    make = type(net.network_address)
    return [str(make(i)) for i in (first - 1, first, first + 1, last - 1, last, last + 1)]


def _slice(family: int, addresses: list[str], state: dict) -> dict:
    """A slice of `addresses`, every endpoint in `state` (one state a slice: an address
    refused in one state must not hide behind the same address accepted in another)."""
    endpoints = [{"addresses": [a], "conditions": state} for a in addresses]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"web-v{family}", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": f"IPv{family}", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def _checked_addresses(obj: dict, rules: AddressRules) -> set[str]:
    packed = memory.pack(obj)
    found = validate_object(obj, rules)
    assert found is not None
    remember_checked(packed, found)
    try:
        return endpoint_addresses_of(packed, rules)
    finally:
        forget_checked()


V4, V6 = "10.96.0.0/16", "fd00:96::/112"


@pytest.mark.parametrize(
    ("family", "cidrs", "inside"),
    [
        (4, (V4, V6), V4),
        (6, (V4, V6), V6),
        (4, (V4,), V4),
        (6, (V4,), None),  # no IPv6 network: every IPv6 endpoint could be a ClusterIP
        (4, (V6,), None),
        (4, (), None),
        (4, ("10.96.0.7/32",), "10.96.0.7/32"),
        (6, ("fd00:96::/128",), "fd00:96::/128"),
    ],
)
def test_a_checked_slices_addresses_in_the_cluster_cidr_are_the_general_paths(family, cidrs, inside) -> None:
    rules = AddressRules(cidrs)
    edges = _edges(inside if inside else (V4 if family == 4 else V6))
    edges = [a for a in dict.fromkeys(edges) if ipaddress.ip_address(a).version == family]
    want = {a for a in edges if inside is None or ipaddress.ip_address(a) in ipaddress.ip_network(inside)}
    for state in STATES:
        obj = _slice(family, edges, state)
        assert endpoint_addresses_of(obj, rules) == want, state  # the general path, from the text
        assert _checked_addresses(obj, rules) == want, state


@pytest.mark.parametrize(("family", "inside"), [(4, V4), (6, V6), (4, "10.96.0.7/32")])
def test_a_slice_of_one_edge_address_is_answered_as_the_general_path(family, inside) -> None:
    """One endpoint a slice: the checked path answers a slice that lies wholly below or above
    the network from its lowest and highest codes; an endpoint at an edge, in the lowest
    state and without a place (its code the range's very end), must still count."""
    rules = AddressRules((inside,))
    for address in dict.fromkeys(_edges(inside)):
        want = {address} if ipaddress.ip_address(address) in ipaddress.ip_network(inside) else set()
        for state in STATES:
            obj = _slice(family, [address], state)
            assert endpoint_addresses_of(obj, rules) == want, (address, state)
            assert _checked_addresses(obj, rules) == want, (address, state)
