"""An operator's checks of one `kpr run` (socklb and tc_nodeport) together, with real traffic:
manifests edited live and while the agent is down, and what the agent wrote read back.

What the piecewise tests cover and these do not repeat: the kpr_fe lines through writer
updates and repairs (test_lb_fe.py, BPF_PROG_TEST_RUN), the NodePort prefilter's words
(test_nodeport_prefilter.py), restarts under load with unchanged manifests
(test_socklb.py, test_tc_nodeport.py, test_xdp_nodeport.py: test_agent_restarts_under_traffic_lose_no_connection),
allocations kept across restarts (test_allocator.py, test_files_source.py), a restart's full
sync with changes at the writer (test_servicemaps_bulk.py). Here the same agent's socket hooks
and NodePort programs carry new connections through every step, so the pieces are checked
with each other: a backend set crossing the 4 ids a kpr_fe line holds both ways, a nodePort
moved (the old port no longer a service: the client is refused by node1's own stack), and a
SIGKILL after which the manifests changed before the agent came back.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from socklb_env import LOAD, AgentRig

from kpr.testing.echo import PY, start_running
from kpr.testing.operator_lab import (
    BACKENDS4 as B4,
    NODE4,
    PORT,
    OperatorLab,
    endpoint_slice,
    fe_disagreements,
    operator_lab,
    tc_programs,
)
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel

CIP = "10.96.10.10"


def web(n: int, node_port: int = 30080, first: int = 0) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
             "spec": {"type": "NodePort", "clusterIP": CIP,
                      "ports": [{"name": "http", "port": 80, "targetPort": PORT, "nodePort": node_port}]}},
            endpoint_slice("web", B4[first:first + n])]


def allocated(name: str, backends: tuple[str, ...], node_port: int | None = None) -> list[dict]:
    """A NodePort service whose ClusterIP (and nodePort, unless given) the agent allocates."""
    port: dict = {"name": "http", "port": 80, "targetPort": PORT}
    if node_port is not None:
        port["nodePort"] = node_port
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
             "spec": {"type": "NodePort", "ports": [port]}},
            endpoint_slice(name, backends)]


@pytest.fixture
def lab(kernel_headers: Path) -> Iterator[tuple[OperatorLab, AgentRig]]:
    with operator_lab("kpr-op") as lab:
        rig = AgentRig(lab.topo, lab.pin, lab.work, "", "", agent_ns="node1", load_ns="cl", agent=lab.agent)
        try:
            yield lab, rig
        finally:
            rig.kill()  # before the lab's `kpr cleanup`


def in_sync(lab: OperatorLab) -> None:
    """`kpr status` says the maps equal the desired state, and the kpr_fe lines agree with
    kpr_svc and kpr_slots (what the NodePort programs read first)."""
    wait_for(lambda: lab.status()["maps"]["count"] == 0, 30, "the maps to equal the desired state",
             lambda: lab.status()["maps"])
    st = lab.status()
    assert st["ready"] and not st["source"]["errors"], st["source"]
    assert fe_disagreements(lab.pin) == []


def reaches(lab: OperatorLab, want: set[str], *, cip: str, node_port: int) -> None:
    """New connections to the ClusterIP (socklb) and to the nodePort (tc_nodeport) reach `want`
    and nothing else; every address of a set that fits in a kpr_fe line is seen."""
    n = 4 * len(want)

    def now() -> tuple[set[str], set[str]]:
        return set(lab.cluster_ip(cip, 80, n)), set(lab.node_port(node_port, n))

    def ok() -> bool:
        a, b = now()
        return a <= want and b <= want and (len(want) > 4 or a == b == want)

    wait_for(ok, 20, f"new connections to reach {sorted(want)}", now, interval=0.3)
    a, b = now()
    assert a <= want and b <= want, (sorted(a), sorted(b))


def refused(lab: OperatorLab, node_port: int) -> None:
    wait_for(lambda: set(lab.node_port(node_port, 4)) == {"ECONNREFUSED"}, 20,
             f"port {node_port} to be no service (node1's stack refuses it)", lambda: lab.node_port(node_port, 4))


def test_live_edits_cross_the_kpr_fe_line_and_move_a_node_port(lab: tuple[OperatorLab, AgentRig]) -> None:
    lab_, rig = lab
    lab_.write("web", web(1))
    rig.start()
    for n in (1, 4, 5, 12, 3, 1):  # across the 4 ids a kpr_fe line holds, both ways
        lab_.write("web", web(n))
        reaches(lab_, set(B4[:n]), cip=CIP, node_port=30080)
        in_sync(lab_)
    lab_.write("web", web(3, first=4))  # the same count, other backends: the line's ids change
    reaches(lab_, set(B4[4:7]), cip=CIP, node_port=30080)
    in_sync(lab_)
    lab_.write("web", web(3, node_port=30081))
    reaches(lab_, set(B4[:3]), cip=CIP, node_port=30081)
    refused(lab_, 30080)
    in_sync(lab_)
    lab_.write("web", web(3))
    reaches(lab_, set(B4[:3]), cip=CIP, node_port=30080)
    refused(lab_, 30081)
    in_sync(lab_)


def test_a_service_given_anothers_allocated_cluster_ip_and_node_port_is_served_there(
    lab: tuple[OperatorLab, AgentRig],
) -> None:
    """The allocator moves the other service to new values in the same pass; the writer held
    the frontends for it a moment longer, and must hand them over when it lets go. (The other
    service's name sorts after this one's: the pass then hands the writer the claim before the
    move, as it did when this was found.)"""
    lab_, rig = lab
    lab_.write("z-auto", allocated("z-auto", B4[9:10]))
    lab_.write("web", web(5))
    rig.start()
    in_sync(lab_)
    auto_ip = next(a for t, a, _p, _pr in lab_.services()["z-auto"] if t == "ClusterIP")
    auto_np = next(p for t, _a, p, _pr in lab_.services()["z-auto"] if t == "NodePort")
    doc = web(5)
    doc[0]["spec"]["clusterIP"] = auto_ip
    doc[0]["spec"]["ports"][0]["nodePort"] = auto_np
    lab_.write("web", doc)
    wait_for(lambda: next(a for t, a, _p, _pr in lab_.services()["z-auto"] if t == "ClusterIP") != auto_ip, 20,
             "the allocator to move the other service")
    moved = lab_.services()["z-auto"]
    reaches(lab_, set(B4[:5]), cip=auto_ip, node_port=auto_np)
    reaches(lab_, {B4[9]}, cip=next(a for t, a, _p, _pr in moved if t == "ClusterIP"),
            node_port=next(p for t, _a, p, _pr in moved if t == "NodePort"))
    refused(lab_, 30080)
    in_sync(lab_)
    assert lab_.status()["plugins"]["servicemaps"]["counters"]["conflicts"] == 0


def test_edits_made_while_the_agent_was_killed_are_served_after_its_start(lab: tuple[OperatorLab, AgentRig]) -> None:
    lab_, rig = lab
    lab_.write("keep", allocated("keep", B4[0:2]))
    lab_.write("chg", allocated("chg", B4[2:3]))
    lab_.write("gone", allocated("gone", B4[5:6]))
    rig.start()
    in_sync(lab_)
    before = lab_.services()
    keep_ip = next(a for t, a, _p, _pr in before["keep"] if t == "ClusterIP")
    keep_np = next(p for t, _a, p, _pr in before["keep"] if t == "NodePort")
    chg_ip = next(a for t, a, _p, _pr in before["chg"] if t == "ClusterIP")
    gone_np = next(p for t, _a, p, _pr in before["gone"] if t == "NodePort")
    programs = tc_programs(lab_)
    assert programs == {"cgroup": 10, "ingress": 1, "egress": 1}, programs
    # new connections every 10 ms to the service nobody edits, through both data paths
    loads = [start_running(lab_.topo, "node1", [PY, "-c", LOAD, keep_ip, "80", "0.01"], cgroup=lab_.cgroup),
             start_running(lab_.topo, "cl", [PY, "-c", LOAD, NODE4, str(keep_np), "0.01"])]
    try:
        rig.stop(signal.SIGKILL)
        lab_.write("chg", allocated("chg", B4[2:8], node_port=30111))  # 1 -> 6 backends, a nodePort given
        lab_.remove("gone")
        lab_.write("new", allocated("new", B4[8:12]))
        rig.start()
        in_sync(lab_)
        after = lab_.services()
        assert set(after) == {"keep", "chg", "new"}
        assert after["keep"] == before["keep"], "an unchanged service keeps its ClusterIP and nodePort"
        assert next(a for t, a, _p, _pr in after["chg"] if t == "ClusterIP") == chg_ip
        reaches(lab_, set(B4[2:8]), cip=chg_ip, node_port=30111)
        new_ip = next(a for t, a, _p, _pr in after["new"] if t == "ClusterIP")
        new_np = next(p for t, _a, p, _pr in after["new"] if t == "NodePort")
        reaches(lab_, set(B4[8:12]), cip=new_ip, node_port=new_np)
        refused(lab_, gone_np)
        reaches(lab_, set(B4[0:2]), cip=keep_ip, node_port=keep_np)
        assert tc_programs(lab_) == programs, "the restarted agent adopted its programs, attached no second copy"
    finally:
        results = [load.finish() for load in loads]
    for res in results:
        assert res["attempts"] > 100
        assert res["failed"] == [], res["failed"][:5]
        assert not res["held"]["error"], res["held"]
