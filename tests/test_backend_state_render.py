"""A backend's state is per service (issue 13, item 2), root-free: the writer's rendering puts
it in each service's slots and none in the shared kpr_backend entry; read-back and `kpr
explain` take it from the slot. The kernel side: tests/kernel/test_backend_state.py."""

from __future__ import annotations

from kpr.bpf import maps as M
from kpr.explain import render
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.readback import slot_state
from kpr.servicemaps import ServiceMapWriter

TERM = BackendState.TERMINATING
P, Q, R = (Backend(f"10.1.0.{i}", 8080) for i in (1, 2, 3))


def svc(name: str, vip: str, *backends: Backend) -> Service:
    fe = Frontend(FrontendType.CLUSTER_IP, vip, 80, Protocol.TCP, tuple(backends), affinity_timeout=60)
    return Service(ServiceKey("default", name), (fe,))


def slots(w: ServiceMapWriter, s: Service) -> dict[int, tuple[int, int]]:
    """Slot -> (backend id, flags) of the service's one frontend, external scope; slot 0 ->
    (count, terminating)."""
    (g,) = w._render(s).values()
    table = g.slot_table()
    assert {scope for scope, _slot in table} == {M.SCOPE_EXTERNAL}
    return {slot: v for (_scope, slot), v in table.items()}


def test_one_pod_port_ready_in_one_service_terminating_in_another() -> None:
    ready = svc("ready", "10.96.0.1", P, Q)
    term = svc("term", "10.96.0.2", Backend(P.address, P.port, state=TERM), Q, R)
    entries = {}
    for order in ((ready, term), (term, ready)):
        w = ServiceMapWriter("/nonexistent")  # never opened: rendering makes no syscalls
        got = {s.key.name: slots(w, s) for s in order}
        pid = w._backend_ids[M.addr_to_bytes(P.address) + (8080).to_bytes(2, "big") + b"\x06"]
        entries[order[0].key.name] = w._pending_vals[pid]
        # the ready service: P selectable and active in its slot
        assert got["ready"][0] == (2, 0)
        assert {got["ready"][i] for i in (1, 2)} >= {(pid, M.BACKEND_ACTIVE)}
        # the other: P after its two selectable slots, terminating in its slot
        assert got["term"][0] == (2, 1) and got["term"][3] == (pid, M.BACKEND_TERMINATING)
        assert {got["term"][i][1] for i in (1, 2)} == {M.BACKEND_ACTIVE}
    # the shared entry is the same whichever service was rendered last, and says no state
    assert entries["ready"] == entries["term"]
    addr, port, proto, reserved, flags = M.BACKEND.unpack(entries["ready"])
    assert (M.bytes_to_addr(addr), M.ntohs(port), proto, reserved, flags) == (P.address, 8080, 6, 0, 0)


def test_kep_1669_fallback_slots_are_selectable_and_terminating() -> None:
    got = slots(ServiceMapWriter("/nonexistent"), svc("f", "10.96.0.3", *(Backend(b.address, 8080, state=TERM) for b in (P, Q))))
    assert got[0] == (2, 0), "no ready backend: the terminating ones are selectable"
    assert {got[1][1], got[2][1]} == {M.BACKEND_TERMINATING}


def test_slot_state() -> None:
    assert slot_state(1, 2, M.BACKEND_ACTIVE) == "active"
    assert slot_state(2, 2, M.BACKEND_TERMINATING) == "terminating"  # fallback
    assert slot_state(3, 2, M.BACKEND_ACTIVE) == "terminating"  # after count: existing flows only
    assert slot_state(1, 1, 7) == "7"  # a state this version does not know: shown as is


def test_explain_text_names_a_selectable_backends_state() -> None:
    be = {"id": 1, "address": "10.1.0.1", "port": 8080, "local": True}
    r = {
        "frontend": "10.96.0.3:80/TCP", "from": None, "hook": "socket", "steps": [], "verdict": "forward",
        "service": {"type": "ClusterIP", "entry": "10.96.0.3:80/TCP", "scope": "external", "trafficPolicy": "Cluster",
                    "algorithm": "random", "affinityTimeout": 0},
        "backends": [dict(be, state="terminating")], "terminating": [dict(be, id=2, address="10.1.0.2", state="terminating")],
        "backend": dict(be, state="terminating"), "by": "random",
    }
    text = render(r)
    assert "backends: 10.1.0.1:8080 (terminating, local)  terminating: 10.1.0.2:8080 (local)" in text
    assert "=> forwarded to 10.1.0.1:8080 (terminating, local) (random)" in text
