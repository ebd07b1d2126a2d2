"""One pod port in two Services, ready in one and terminating in the other (issue 13, item 2).

kpr_backend holds one entry per (address, port, protocol), shared by every service listing
that pod port; whether the pod is active or terminating is the service's business, kept in
the service's slots. Each test makes a client remember the shared pod in the service where
it is ready (the pod is that service's only backend at first), then gives that service a
second backend and marks the pod terminating in the other service, written last (a second
EndpointSlice updated a moment later). Then, with sessionAffinity ClientIP on both:

- 20 connections to the service where the pod is ready all reach it (a state shared by the
  services made the programs drop the remembered backend and pick again, spreading them);
- 20 connections to the other service reach one backend, never the terminating pod;
- the maps read back (`kpr service list --datapath`, `kpr explain`) show the pod active in
  one service and terminating in the other.

On socklb (ClusterIP), tc_nodeport and xdp_nodeport (NodePort on node1's address; XDP to
node2's pods, which it source-NATs itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.explain import explain, parse_target
from kpr.model import BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.readback import DatapathMaps

import socklb_env
import tc_nodeport_env as tcenv

pytestmark = pytest.mark.kernel

ACTIVE, TERM = BackendState.ACTIVE, BackendState.TERMINATING
TCP = Protocol.TCP
N1 = tcenv.NODES["node1"]["addr"]
CONNECTIONS = 20
AFFINITY = 300  # seconds: longer than any test

FrontendAt = tuple[str, int]  # (address, port)
Members = list[tuple[str, BackendState]]  # (pod, its state in the service)


def states(pin: Path, fe: FrontendAt) -> dict[str, str]:
    """Backend address -> state in the frontend's external scope, as the maps read back."""
    with DatapathMaps(pin) as dm:
        row = next(r for r in dm.frontends() if (r["address"], r["port"]) == fe)
    return {b["address"]: b["state"] for b in row["backends"]}


def explained(pin: Path, fe: FrontendAt, **kw: Any) -> dict[str, str]:
    """Backend address -> state as `kpr explain` lists them (selectable, then terminating)."""
    r = explain(pin, parse_target(f"{fe[0]}:{fe[1]}/TCP"), **kw)
    return {b["address"]: b.get("state", "?") for b in r["backends"] + r["terminating"]}


def one_pod_two_services(
    apply: Callable[[str, FrontendAt, Members], None],
    connect: Callable[[FrontendAt, int], list[str]],
    pin: Path,
    address: Callable[[str], str],
    pods: tuple[str, ...],
    frontends: tuple[FrontendAt, FrontendAt],
    explain_kw: dict[str, Any],
) -> None:
    """The scenario of the module docstring. pods: the shared pod, the ready service's second
    backend, then any more for the other service. apply(name, frontend, members) writes a
    service with affinity; connect(frontend, n): the pods n new connections reached."""
    shared, second, *more = pods
    ready, term = frontends

    apply("ready", ready, [(shared, ACTIVE)])
    assert connect(ready, 1) == [shared], "the only backend"
    apply("ready", ready, [(shared, ACTIVE), (second, ACTIVE)])
    apply("term", term, [(shared, TERM), (second, ACTIVE), *((p, ACTIVE) for p in more)])

    # every check made, then asserted together: the message names all that differs
    wrong = []
    got = connect(ready, CONNECTIONS)
    if got != [shared] * CONNECTIONS:
        wrong.append(f"affinity to {shared}, ready in this service, must hold: {got}")
    got = connect(term, CONNECTIONS)
    if len(set(got)) != 1 or shared in got:
        wrong.append(f"one backend, never the terminating {shared}: {got}")
    want = {
        ready: {address(shared): "active", address(second): "active"},
        term: {address(shared): "terminating", **{address(p): "active" for p in (second, *more)}},
    }
    for fe, states_wanted in want.items():
        if (read := states(pin, fe)) != states_wanted:
            wrong.append(f"read back {fe}: {read}, want {states_wanted}")
        if (told := explained(pin, fe, **explain_kw)) != states_wanted:
            wrong.append(f"kpr explain {fe}: {told}, want {states_wanted}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- socklb (ClusterIP)


@pytest.fixture
def sock(kernel_headers: Path) -> Iterator[socklb_env.Env]:
    from kpr.bpf.probes import cgroup2_mount

    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    with socklb_env.running("kpr-bstate") as env:
        yield env


def sock_apply(env: socklb_env.Env) -> Callable[[str, FrontendAt, Members], None]:
    def apply(name: str, fe: FrontendAt, members: Members) -> None:
        bes = [socklb_env.be(p, state=s) for p, s in members]
        env.apply(socklb_env.service(name, [(FrontendType.CLUSTER_IP, *fe)], bes, protocols=(TCP,),
                                     affinity_timeout=AFFINITY))

    return apply


def sock_connect(env: socklb_env.Env) -> Callable[[FrontendAt, int], list[str]]:
    return lambda fe, n: socklb_env.answers(env.client("tcp", fe[0], fe[1], n))


def sock_address(pod: str) -> str:
    return socklb_env.PODS[pod][0]


def test_socklb_one_pod_ready_in_one_service_terminating_in_another(sock: socklb_env.Env) -> None:
    one_pod_two_services(sock_apply(sock), sock_connect(sock), sock.pin, sock_address, ("be1", "be2", "be3"),
                         (("10.96.13.1", 80), ("10.96.13.2", 80)), {"via": "socket"})


def test_socklb_affinity_holds_among_terminating_fallback_backends(sock: socklb_env.Env) -> None:
    """No ready backend left (KEP-1669): the terminating ones fill this service's selectable
    slots, and a client sticks to the one it got, as to any selectable backend."""
    apply, connect = sock_apply(sock), sock_connect(sock)
    other, fallback = ("10.96.13.4", 80), ("10.96.13.3", 80)
    apply("other", other, [("be2", ACTIVE), ("be3", ACTIVE)])
    apply("fallback", fallback, [("be2", TERM), ("be3", TERM)])
    got = connect(fallback, CONNECTIONS)
    assert len(set(got)) == 1, f"affinity must hold among fallback backends: {got}"
    assert states(sock.pin, fallback) == {sock_address("be2"): "terminating", sock_address("be3"): "terminating"}
    assert states(sock.pin, other) == {sock_address("be2"): "active", sock_address("be3"): "active"}


# ---------------------------------------------------------------- tc_nodeport, xdp_nodeport (NodePort)


def np_apply(c: tcenv.Cluster) -> Callable[[str, FrontendAt, Members], None]:
    """A NodePort on each node's own address (the frontend's port), backends as each node
    sees them (local where the pod runs)."""

    def apply(name: str, fe: FrontendAt, members: Members) -> None:
        def make(node: str) -> Service:
            bes = tuple(tcenv.backends(node, p, state=s)[0] for p, s in members)
            f = Frontend(FrontendType.NODE_PORT, tcenv.NODES[node]["addr"], fe[1], TCP, bes, affinity_timeout=AFFINITY)
            return Service(ServiceKey("default", name), (f,))

        c.apply(make)

    return apply


def np_scenario(c: tcenv.Cluster, pods: tuple[str, ...], ports: tuple[int, int]) -> None:
    def connect(fe: FrontendAt, n: int) -> list[str]:
        return [name for name, _peer in tcenv.name_and_peer(tcenv.client(c.topo, "tcp", fe[0], fe[1], n))]

    one_pod_two_services(np_apply(c), connect, c.pins["node1"], lambda pod: tcenv.PODS[pod][1], pods,
                         ((N1, ports[0]), (N1, ports[1])),
                         {"via": "device", "device": "eth0", "source": tcenv.CLIENT})


def test_tc_nodeport_one_pod_ready_in_one_service_terminating_in_another(require_kernel: None) -> None:
    with tcenv.one_device_cluster() as c:
        np_scenario(c, ("p1a", "p1b", "p2a"), (30131, 30132))


@pytest.fixture
def xdp(require_kernel: None) -> Iterator[tcenv.Cluster]:
    """xdp_nodeport alone on node1's eth0 (native), serving node2's pods."""
    with tcenv.cluster(start=False, second_device=False) as c:
        tcenv.full_checksums(c.topo, "cl", "p2a", "p2b")
        with tcenv.peer_pass(c.topo, "rt", tcenv.dev_with(c.topo, "rt", tcenv.NODES["node1"]["rt"])):
            c.plugins["node1"] = tcenv.start_xdp(c.harnesses["node1"], xdp_mode="native", keep_attached_on_stop=False)
            try:
                yield c
            finally:
                c.stop("node1")


def test_xdp_nodeport_one_pod_ready_in_one_service_terminating_in_another(xdp: tcenv.Cluster) -> None:
    assert tcenv.xdp_on(xdp.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
    before = xdp.stats("node1")["new_snat"]
    np_scenario(xdp, ("p2a", "p2b"), (30133, 30134))
    assert xdp.stats("node1")["new_snat"] - before >= 2 * CONNECTIONS, "XDP served them"


# ---------------------------------------------------------------- upgrade


def test_maps_of_an_older_run_lose_the_shared_state_on_adoption(kernel_headers: Path, pin_dir: Path) -> None:
    """An older kpr kept the state in kpr_backend's (now reserved) byte: a new writer adopts
    such maps as they are (same sizes) and zeroes the byte at its sync."""
    from kpr.bpf import maps as M
    from kpr.servicemaps import ServiceMapWriter

    pod = socklb_env.be("be1", state=TERM)
    svc = socklb_env.service("old", [(FrontendType.CLUSTER_IP, "10.96.13.9", 80)], [socklb_env.be("be2"), pod],
                             protocols=(TCP,))
    pin = pin_dir
    w = ServiceMapWriter(pin).open()
    try:
        w.upsert(svc)
        (bid,) = [M.U32.unpack(k)[0] for k, v in w.maps["kpr_backend"].items() if M.bytes_to_addr(v[:16]) == pod.address]
        old = bytearray(w.maps["kpr_backend"].lookup(M.U32.pack(bid)))
        old[19] = M.BACKEND_TERMINATING  # where the old layout kept the state
        w.maps["kpr_backend"].update(M.U32.pack(bid), bytes(old))
    finally:
        w.close()
    w = ServiceMapWriter(pin).open()
    try:
        w.upsert(svc)
        assert w.maps["kpr_backend"].lookup(M.U32.pack(bid))[19] == 0, "the reserved byte is zero again"
        assert states(pin, ("10.96.13.9", 80)) == {pod.address: "terminating", socklb_env.PODS["be2"][0]: "active"}
        assert w.check() == 0, "nothing left to repair"
    finally:
        w.close()
