"""Manifests that claim addresses they must not, with real traffic (issue 11, item 4).

Objects go through the agent's object store (socklb_env's Env.feed) to the service map
writer and socklb, as in the agent. Before address validation, a Service with
`clusterIP: 127.0.0.1` took every pod's connections to its own loopback port, and a
ClusterIP equal to another pod's address took the connections meant for that pod. Now the
store refuses both (naming the field) and the traffic reaches who it was meant for; a valid
service fed in the same batch is served, so the hooks demonstrably work.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.model import ServiceKey
from kpr.translate import SERVICE_NAME_LABEL

import socklb_env
from socklb_env import PORT, Env, answers, socklb  # noqa: F401 - the module fixture

pytestmark = pytest.mark.kernel


@pytest.fixture(autouse=True)
def _clean(socklb: Env) -> Iterator[None]:  # noqa: F811 - the fixture imported above
    yield
    socklb.clear()


def service(name: str, *cluster_ips: str) -> dict:
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ips[0],
            "clusterIPs": list(cluster_ips),
            "ipFamilies": families,
            "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}],
        },
    }


def endpoint_slice(service_name: str, pod: str, v6: bool = False) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-{'v6' if v6 else 'v4'}",
            "namespace": "default",
            "labels": {SERVICE_NAME_LABEL: service_name},
        },
        "addressType": "IPv6" if v6 else "IPv4",
        "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [socklb_env.PODS[pod][1 if v6 else 0]], "nodeName": "node1"}],
    }


def test_a_loopback_cluster_ip_redirects_no_pod_loopback(socklb: Env) -> None:  # noqa: F811
    # be1's own server listens on every address, loopback included: it answers "be1" there.
    socklb.feed(
        service("loop4", "127.0.0.1"),
        endpoint_slice("loop4", "be2"),
        service("loop6", "::1"),
        endpoint_slice("loop6", "be2", v6=True),
        service("good", "10.96.7.7"),
        endpoint_slice("good", "be2"),
    )
    assert answers(socklb.client("tcp", "127.0.0.1", PORT, 3, ns="be1")) == ["be1"] * 3
    assert answers(socklb.client("tcp", "::1", PORT, 3, ns="be1")) == ["be1"] * 3
    # The control: a valid ClusterIP to be2 in the same batch is translated by the same hooks.
    assert answers(socklb.client("tcp", "10.96.7.7", PORT, 3, ns="be1")) == ["be2"] * 3
    store = socklb.store
    assert store is not None
    assert ServiceKey("default", "loop4") not in store.services
    assert ServiceKey("default", "loop6") not in store.services
    assert "spec.clusterIPs[0]: 127.0.0.1 is a loopback address" in store.errors["service default/loop4"]
    assert "spec.clusterIPs[0]: ::1 is a loopback address" in store.errors["service default/loop6"]


def test_a_cluster_ip_equal_to_another_pods_address_hijacks_nothing(socklb: Env) -> None:  # noqa: F811
    be3 = socklb_env.PODS["be3"][0]
    socklb.feed(
        service("db", "10.96.7.8"),
        endpoint_slice("db", "be3"),
        service("thief", be3),
        endpoint_slice("thief", "be2"),
    )
    # Connections meant for be3 reach be3; be3's own service is served.
    assert answers(socklb.client("tcp", be3, PORT, 3)) == ["be3"] * 3
    assert answers(socklb.client("tcp", "10.96.7.8", PORT, 3)) == ["be3"] * 3
    store = socklb.store
    assert store is not None
    assert ServiceKey("default", "thief") not in store.services
    assert (
        f"spec.clusterIPs[0]: {be3} is an endpoint address of EndpointSlice default/db-v4"
        in store.errors["service default/thief"]
    )

    # A service already served that becomes a hijacker (the pod shows up in a slice later)
    # is withdrawn, not kept as its last good state.
    be1 = socklb_env.PODS["be1"][0]
    socklb.feed(service("late", be1), endpoint_slice("late", "be2"))
    assert answers(socklb.client("tcp", be1, PORT, 2)) == ["be2"] * 2  # no slice lists be1 yet
    socklb.feed(service("web", "10.96.7.9"), endpoint_slice("web", "be1"))
    assert ServiceKey("default", "late") not in store.services
    assert answers(socklb.client("tcp", be1, PORT, 3)) == ["be1"] * 3
