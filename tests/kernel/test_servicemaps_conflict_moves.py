"""A frontend two services claim goes to the one that holds it; the other's claim waits
(`conflicts`) and is retried when the holder lets go. Letting go is a deletion
(test_servicemaps.py: test_conflicting_frontend_goes_to_the_first_service) or an update that
moves the holder elsewhere: a manifest giving service A the ClusterIP and nodePort that B had
from the allocator moves B to new ones in the same pass, and A must then be served there
(found by an operator check with real traffic: A's ClusterIP timed out and its nodePort was
refused until the next restart, while `kpr status` said the maps were in sync). Every waiting
claim is kept (with two waiting, the one the next holder did not take was forgotten) and served
first come first served; a claim goes when its service no longer wants the frontend; a retry
that fails keeps its claim (check() tries it again) without failing the holder's change."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.readback import differences
from kpr.servicemaps import ALGORITHM_ANNOTATION, ServiceMapWriter

pytestmark = pytest.mark.kernel

CIP, NP = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT
TCP = Protocol.TCP
A_BACKEND, B_BACKEND, C_BACKEND = Backend("10.1.0.1", 8080), Backend("10.1.0.2", 8080), Backend("10.1.0.3", 8080)


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


def test_a_holder_that_keeps_the_frontend_keeps_the_claim_waiting(
    writer: ServiceMapWriter, caplog: pytest.LogCaptureFixture
) -> None:
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    caplog.set_level(logging.INFO, logger="kpr.servicemaps")
    writer.upsert(svc("b", "10.96.0.20", 31000, Backend("10.1.0.3", 8080)))  # B changes, stays
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.3:8080"]
    assert writer.kpr_status().counters["conflicts"] == 3
    # nothing was freed: a retry here would be one upsert of A per update of B (too often)
    assert "frontend_conflict_retry" not in caplog.text


def test_claims_are_served_in_the_order_they_came(writer: ServiceMapWriter) -> None:
    """First come, first served, whatever the names: B holds, C claims, then A. When B moves C
    gets the frontends (not A, first in key order) and A keeps waiting; when C moves, A gets them."""
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("c", "10.96.0.20", 31000, C_BACKEND))
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    writer.upsert(svc("b", "10.96.0.21", 31001, B_BACKEND))
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.3:8080"]
    assert served(writer)["0.0.0.0:31000/TCP external"] == ["10.1.0.3:8080"]
    assert writer.kpr_status().counters["conflicts"] == 3  # frontends waited for (A's three)
    writer.upsert(svc("c", "10.96.0.22", 31002, C_BACKEND))
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.1:8080"]
    assert served(writer)["10.0.1.10:31000/TCP external"] == ["10.1.0.1:8080"]
    assert writer.kpr_status().counters["conflicts"] == 0
    assert differences(writer)["count"] == 0


def test_a_full_sync_keeps_every_claim_in_key_order(writer: ServiceMapWriter) -> None:
    """A full sync (a restart's) decides in key order: a holds, b then c wait."""
    claimants = (("c", C_BACKEND), ("b", B_BACKEND), ("a", A_BACKEND))
    writer.full_sync([svc(n, "10.96.0.20", 31000, be) for n, be in claimants])
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.1:8080"]
    writer.delete(ServiceKey("default", "a"))
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.2:8080"]
    writer.delete(ServiceKey("default", "b"))
    assert served(writer)["10.0.1.10:31000/TCP external"] == ["10.1.0.3:8080"]
    assert writer.kpr_status().counters["conflicts"] == 0


@pytest.mark.parametrize("leaves", ["moves", "is_deleted"])
def test_a_claim_goes_when_its_service_no_longer_wants_the_frontend(writer: ServiceMapWriter, leaves: str) -> None:
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    if leaves == "moves":
        writer.upsert(svc("a", "10.96.0.30", 31010, A_BACKEND))
        assert served(writer)["10.96.0.30:80/TCP external"] == ["10.1.0.1:8080"]
    else:
        writer.delete(ServiceKey("default", "a"))
    status = writer.kpr_status()
    assert status.counters["conflicts"] == 0
    assert "conflicting" not in status.message


def one_frontend(name: str, backend: Backend, address: str = "10.96.0.20", maglev: bool = False) -> Service:
    return Service(ServiceKey("default", name), (Frontend(CIP, address, 80, TCP, (backend,)),),
                   annotations=((ALGORITHM_ANNOTATION, "maglev"),) if maglev else ())


def fill_maglev(w: ServiceMapWriter) -> None:
    """Fill kpr_maglev (sized 2) behind the writer's back: its next table's write fails in the
    kernel (E2BIG); the failed write's rollback takes these strays out again."""
    t, k, v, n = w.specs["kpr_maglev"].inner
    for i in range(2):
        with M.BpfMap.create(M.MapSpec("kpr_stray_in", t, k, v, n)) as inner:
            w.maps["kpr_maglev"].update(M.MAGLEV_KEY.pack(9000 + i, 0), M.U32.pack(inner.fd))


@pytest.fixture
def failing_claim(pin_dir: Path, caplog: pytest.LogCaptureFixture) -> Iterator[tuple[ServiceMapWriter, dict]]:
    """B holds 10.96.0.20:80, A (Maglev) waits for it; kpr_maglev is filled behind the writer's
    back, so when B moves away A's retry fails in the kernel (its table does not fit). Yields
    the writer and what the bus stage was told about B's move."""
    with ServiceMapWriter(pin_dir, sizes={"kpr_maglev": 2}, create_datapath_maps=False) as w:
        w.apply_batch([("sync", None)])
        w.upsert(one_frontend("b", B_BACKEND))
        w.upsert(one_frontend("a", A_BACKEND, maglev=True))
        fill_maglev(w)
        caplog.set_level(logging.INFO, logger="kpr.servicemaps")
        failed = w.apply_batch([("upsert", one_frontend("b", B_BACKEND, address="10.96.0.21"))])
        yield w, failed


def test_a_waiting_claim_that_fails_is_not_the_holders_error_and_stays(
    failing_claim: tuple[ServiceMapWriter, dict], caplog: pytest.LogCaptureFixture
) -> None:
    w, failed = failing_claim
    assert failed == {}  # B's move was written: the stage must not retry it
    assert served(w)["10.96.0.21:80/TCP external"] == ["10.1.0.2:8080"]
    assert any("event=frontend_conflict_retry_failed" in r.getMessage() for r in caplog.get_records("setup"))
    assert w.kpr_status().counters["conflicts"] == 1  # A still waits for it


def test_check_retries_a_claim_on_a_frontend_nobody_holds(failing_claim: tuple[ServiceMapWriter, dict]) -> None:
    w, _ = failing_claim
    assert "10.96.0.20:80/TCP external" not in served(w)
    w.check()  # (the failed write's rollback took the stray tables out: A's now fits)
    assert served(w)["10.96.0.20:80/TCP external"] == ["10.1.0.1:8080"]
    assert w.kpr_status().counters["conflicts"] == 0
    assert differences(w)["count"] == 0


def test_every_claim_waiting_on_a_frontend_is_kept_until_one_gets_it(writer: ServiceMapWriter) -> None:
    """Three services on one address (externalIPs or LoadBalancer IPs two manifests share:
    nothing allocates those): each holder that goes hands the frontend to the next waiting,
    the second waiter too after the first has had it and gone."""
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    writer.upsert(svc("b", "10.96.0.20", 31000, B_BACKEND))
    writer.upsert(svc("c", "10.96.0.20", 31000, C_BACKEND))
    writer.delete(ServiceKey("default", "a"))
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.2:8080"]
    assert writer.kpr_status().counters["conflicts"] == 3  # c waits on all three
    writer.delete(ServiceKey("default", "b"))
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.3:8080"]
    assert served(writer)["10.0.1.10:31000/TCP external"] == ["10.1.0.3:8080"]
    assert writer.kpr_status().counters["conflicts"] == 0


def test_status_names_the_frontend_its_holder_and_the_services_not_served_there(writer: ServiceMapWriter) -> None:
    """The waiting services in the order they are served (they came: c, then b)."""
    writer.upsert(svc("a", "10.96.0.20", 31000, A_BACKEND))
    writer.upsert(svc("c", "10.96.0.20", 31002, C_BACKEND))  # only the ClusterIP is shared
    writer.upsert(svc("b", "10.96.0.20", 31001, B_BACKEND))
    st = writer.kpr_status()
    assert st.details["conflicts"] == {
        "10.96.0.20:80/TCP": {"owner": "default/a", "waiting": ["default/c", "default/b"]}
    }
    assert "1 conflicting frontends (first 10.96.0.20:80/TCP: default/c, default/b not served there)" in st.message
    writer.delete(ServiceKey("default", "a"))
    assert served(writer)["10.96.0.20:80/TCP external"] == ["10.1.0.3:8080"]
    assert writer.kpr_status().details["conflicts"] == {
        "10.96.0.20:80/TCP": {"owner": "default/c", "waiting": ["default/b"]}
    }
    writer.delete(ServiceKey("default", "b"))
    assert "conflicts" not in writer.kpr_status().details


def test_a_claim_stays_while_its_service_is_refused_for_room(
    pin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """a claims X (b holds it) and Y, for which kpr_svc has no room (c holds its last entry):
    a is refused and its claim on X stays, also once b lets X go (a, refused, cannot take it
    then); when room comes back a gets X. check() meanwhile leaves a to the refused' retry."""
    x, y, z = "10.96.0.20", "10.96.0.21", "10.96.0.22"
    a = Service(ServiceKey("default", "a"), (Frontend(CIP, x, 80, TCP, (A_BACKEND,)),
                                              Frontend(CIP, y, 80, TCP, (A_BACKEND,))))
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 2}, create_datapath_maps=False) as w:
        w.apply_batch([("sync", None)])
        w.upsert(one_frontend("b", B_BACKEND, address=x))
        w.upsert(one_frontend("c", C_BACKEND, address=z))
        w.upsert(a)
        assert list(w.refused) == [a.key]
        assert w.kpr_status().details["conflicts"] == {f"{x}:80/TCP": {"owner": "default/b", "waiting": ["default/a"]}}
        w.delete(ServiceKey("default", "b"))
        assert list(w.refused) == [a.key]  # X and Y do not fit beside c
        assert w.kpr_status().details["conflicts"] == {f"{x}:80/TCP": {"owner": "", "waiting": ["default/a"]}}
        caplog.set_level(logging.INFO, logger="kpr.servicemaps")
        w.check()
        w.check()
        assert "frontend_conflict_retry" not in caplog.text  # (a refused waiter, retried every period)
        w.delete(ServiceKey("default", "c"))
        assert served(w) == {f"{x}:80/TCP external": ["10.1.0.1:8080"], f"{y}:80/TCP external": ["10.1.0.1:8080"]}
        assert not w.refused
        assert "conflicts" not in w.kpr_status().details


def test_a_failed_initial_sync_leaves_no_claim_for_check_to_serve(pin_dir: Path) -> None:
    """The initial sync fails (m's Maglev table does not fit: kpr_maglev filled behind the
    writer's back) and is rolled back: nobody holds 10.96.0.20:80. A check() before its retry
    must not serve b there (b waits: in key order a holds it), or the retry would give it
    back to a: traffic moved twice."""
    with ServiceMapWriter(pin_dir, sizes={"kpr_maglev": 2}, create_datapath_maps=False) as w:
        fill_maglev(w)
        initial = [one_frontend("a", A_BACKEND), one_frontend("b", B_BACKEND),
                   one_frontend("m", C_BACKEND, address="10.96.0.30", maglev=True)]
        assert w.apply_batch([("upsert", s) for s in initial] + [("sync", None)]) == {}
        assert not w.initial_written
        assert w.kpr_status().counters["conflicts"] == 0  # (the failed plan's: its retry decides again)
        w.check()
        assert "10.96.0.20:80/TCP external" not in served(w)
        assert w.apply_batch([("sync", None)]) == {}  # the retry (the rollback took the strays out)
        assert w.initial_written
        assert served(w)["10.96.0.20:80/TCP external"] == ["10.1.0.1:8080"]
