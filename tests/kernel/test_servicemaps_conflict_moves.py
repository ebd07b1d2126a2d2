"""A frontend two services claim goes to the one that holds it; the other's claim waits
(`conflicts`) and is retried when the holder lets go. Letting go is a deletion
(test_servicemaps.py: test_conflicting_frontend_goes_to_the_first_service) or an update that
moves the holder elsewhere: a manifest giving service A the ClusterIP and nodePort that B had
from the allocator moves B to new ones in the same pass, and A must then be served there
(found by an operator check with real traffic: A's ClusterIP timed out and its nodePort was
refused until the next restart, while `kpr status` said the maps were in sync). Every waiting
claim is kept: with two waiting, the one the next holder did not take was forgotten."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.readback import differences
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel

CIP, NP = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT
TCP = Protocol.TCP
A_BACKEND, B_BACKEND = Backend("10.1.0.1", 8080), Backend("10.1.0.2", 8080)


def svc(name: str, cluster_ip: str, node_port: int, backend: Backend) -> Service:
    return Service(ServiceKey("default", name), (Frontend(CIP, cluster_ip, 80, TCP, (backend,)),
                                                 Frontend(NP, "10.0.1.10", node_port, TCP, (backend,))))


@pytest.fixture
def writer(pin_dir: Path) -> Iterator[ServiceMapWriter]:
    w = ServiceMapWriter(pin_dir).open()
    w.apply_batch([("sync", None)])  # the initial state (empty) written: changes go to the maps as they come
    assert w.initial_written
    yield w
    w.close()


def served(w: ServiceMapWriter) -> dict[str, list[str]]:
    return {fe: e["backends"] for fe, e in w.read_back()["frontends"].items()}


def test_a_claim_waiting_on_a_frontend_is_retried_when_its_holder_moves_away(writer: ServiceMapWriter) -> None:
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))  # B holds both: A waits
    waiting = writer.kpr_status().counters["conflicts"]
    assert waiting == 3  # the ClusterIP, the nodePort on the node address and on any address
    writer.upsert(svc("b", "10.96.0.21", 31001, B_BACKEND))  # B moves on
    assert served(writer) == {
        "10.96.0.20:80/TCP external": ["10.1.0.1:8080"],
        "10.0.1.10:31000/TCP external": ["10.1.0.1:8080"],
        "0.0.0.0:31000/TCP external": ["10.1.0.1:8080"],
        "10.96.0.21:80/TCP external": ["10.1.0.2:8080"],
        "10.0.1.10:31001/TCP external": ["10.1.0.2:8080"],
        "0.0.0.0:31001/TCP external": ["10.1.0.2:8080"],
    }
    assert writer.kpr_status().counters["conflicts"] == 0
    assert differences(writer)["count"] == 0


def test_the_same_in_one_batch_as_the_bus_delivers_one_pass_of_the_files_source(writer: ServiceMapWriter) -> None:
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    failed = writer.apply_batch([("upsert", svc("a", "10.96.0.20", 31000, A_BACKEND)),
                                 ("upsert", svc("b", "10.96.0.21", 31001, B_BACKEND))])
    assert failed == {}
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.1:8080"]
    assert served(writer)["10.0.1.10:31000/TCP external"] == ["10.1.0.1:8080"]
    assert writer.kpr_status().counters["conflicts"] == 0


def test_a_holder_that_keeps_the_frontend_keeps_the_claim_waiting(writer: ServiceMapWriter) -> None:
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    writer.upsert(svc("b", "10.96.0.20", 31000, Backend("10.1.0.3", 8080)))  # B changes, stays
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.3:8080"]
    assert writer.kpr_status().counters["conflicts"] == 3


def test_every_claim_waiting_on_a_frontend_is_kept_until_one_gets_it(writer: ServiceMapWriter) -> None:
    """Three services on one address (externalIPs or LoadBalancer IPs two manifests share:
    nothing allocates those): each holder that goes hands the frontend to a waiting one, the
    second waiter too after the first has had it and gone."""
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("c", "10.96.0.20", 31000, Backend("10.1.0.3", 8080)))
    writer.delete(ServiceKey("default", "a"))
    by_backend = {"10.1.0.2:8080": "b", "10.1.0.3:8080": "c"}
    (first,) = served(writer)["10.96.0.20:80/TCP external"]
    assert writer.kpr_status().counters["conflicts"] == 3  # the other waits on all three
    writer.delete(ServiceKey("default", by_backend[first]))
    (other,) = set(by_backend) - {first}
    assert served(writer)["10.96.0.20:80/TCP external"] == [other]
    assert served(writer)["10.0.1.10:31000/TCP external"] == [other]
    assert writer.kpr_status().counters["conflicts"] == 0


def test_status_names_the_frontend_its_holder_and_the_service_not_served_there(writer: ServiceMapWriter) -> None:
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    writer.upsert(svc("b", "10.96.0.20", 31001, B_BACKEND))  # only the ClusterIP is shared
    st = writer.kpr_status()
    assert st.details["conflicts"] == {"10.96.0.20:80/TCP": {"owner": "default/a", "waiting": ["default/b"]}}
    assert "1 conflicting frontends (first 10.96.0.20:80/TCP: default/b not served there)" in st.message
    writer.delete(ServiceKey("default", "a"))
    assert "conflicts" not in writer.kpr_status().details
