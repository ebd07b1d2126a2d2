"""host_routing's per-packet services: pods the socket hooks do not cover (no socklb here at
all, as for a pod outside socklb's cgroup or with hostNamespaceOnly) reach ClusterIPs through
the program at their host-side device: DNAT to a backend with conntrack, and the reply gets the
service address back on every path to the pod: from a local backend (pod device ingress), from
a remote one (external device ingress, before bpf_redirect_peer), and through the stack (pod
device egress).
"""

from __future__ import annotations


import pytest

from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.testing.waiting import wait_for

from host_routing_env import CLIENT, PODS, PORT, Rig, answers, client, delta, rig_fixtures, sent_out

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CIP, CIP6 = "10.96.77.10", "fd96::77:10"
KEY = ServiceKey("default", "hr-cip")


def service(*backends: str) -> Service:
    """ClusterIP CIP:80 and CIP6:80 (TCP and UDP) -> `backends` (pods, or "cl": outside the node) on PORT."""
    fes = []
    for fam, addr in ((0, CIP), (1, CIP6)):
        bes = tuple(Backend((PODS[n] if n in PODS else (CLIENT, "fd21::2"))[fam], PORT, node_name="node" if n in PODS else "other",
                            local=n in PODS) for n in backends)
        for proto in (Protocol.TCP, Protocol.UDP):
            fes.append(Frontend(FrontendType.CLUSTER_IP, addr, 80, proto, bes))
    return Service(KEY, tuple(fes))


env, hr = rig_fixtures(prefix="kpr-hr-svc", delete=(KEY,))


def dial(r: Rig, src: str, n: int = 3, timeout: float = 2) -> list[str]:
    out = []
    for addr in (CIP, CIP6):
        out += answers(client(r.topo, "tcp", addr, 80, n, f"timeout={timeout}", ns=src))
        out += answers(client(r.topo, "udp", addr, 80, n, f"timeout={timeout}", ns=src))
    return out


def seen_by(backend: str, src: str, n: int = 3) -> list[str]:
    return [f"{backend} {PODS[src][fam]}" for fam in (0, 1) for _ in range(2 * n)]


@pytest.mark.parametrize("src", ["p1", "b1"])
@pytest.mark.parametrize("backend,carrier", [("p2", "redirect_peer"), ("cl", "out")],
                         ids=["local-backend", "remote-backend"])
def test_pod_reaches_a_clusterip(hr: Rig, src: str, backend: str, carrier: str) -> None:
    """From a veth pod and a bridge pod, to a local backend (into p2 by bpf_redirect_peer) and a
    remote one (out by bpf_redirect_neigh, then with the remembered route's MACs): DNAT there, the
    service address back on the reply."""
    hr.start()
    hr.source_pods("b1", "b2")
    wait_for(lambda: PODS["b1"][1] in hr.plugin.plan.pods, what="bridge pods learned from the source")
    hr.writer.upsert(service(backend))
    before = hr.stats()
    assert dial(hr, src) == seen_by(backend, src)
    d = delta(before, hr.stats())
    assert d.get("service_new", 0) >= 12 and d.get("service_revnat", 0) >= 12, d
    assert (sent_out(d) if carrier == "out" else d.get(carrier, 0)) >= 12, d


def test_established_flow_keeps_its_backend(hr: Rig) -> None:
    hr.start()
    hr.writer.upsert(service("p2", "cl"))
    # one UDP "connection" from a fixed source port: every datagram to the backend its first one got
    rows = [answers(client(hr.topo, "udp", CIP, 80, 1, "sport=40123", ns="p1"))[0] for _ in range(8)]
    assert len(set(rows)) == 1 and rows[0] in (f"p2 {PODS['p1'][0]}", f"cl {PODS['p1'][0]}"), rows
    seen = set(answers(client(hr.topo, "tcp", CIP, 80, 30, ns="p1")))
    assert seen == {f"p2 {PODS['p1'][0]}", f"cl {PODS['p1'][0]}"}  # new flows spread over both


def test_reply_through_the_stack_is_translated_at_the_pod_device(hr: Rig) -> None:
    """No external device for the plugin: the remote backend's replies reach the pod through the
    host's stack, and the pod device's egress program gives them the service address back."""
    hr.start(devices=["nosuchdev"])
    hr.writer.upsert(service("cl"))
    before = hr.stats()
    assert dial(hr, "p1") == seen_by("cl", "p1")
    d = delta(before, hr.stats())
    assert d.get("service_revnat", 0) >= 12, d
    assert d.get("redirect_peer", 0) == 0, d  # nothing came in through an external device program


def test_turned_off_pods_outside_the_socket_hooks_cannot_reach_services(hr: Rig) -> None:
    hr.start(clusterIP=False)
    hr.writer.upsert(service("p2"))
    rows = client(hr.topo, "tcp", CIP, 80, 1, "timeout=1", ns="p1")
    assert "answer" not in rows[0], rows
    assert hr.plugin.kpr_status().details["clusterIP"] is False


def test_with_socklb_only_pods_outside_its_cgroup_take_the_per_packet_path(hr: Rig) -> None:
    """socklb on a child cgroup: a client in it has its connect() rewritten (the program sees the
    backend's address, no service); the same pod's client outside it is balanced per packet."""
    from kpr.testing import echo
    from kpr.testing.cgroup import child_cgroup

    from socklb_env import start_socklb

    hr.start()
    hr.writer.upsert(service("p2"))
    with child_cgroup("kpr-hr-socklb") as cg:
        sl = start_socklb(hr.topo, hr.pin, cg, keepAttachedOnStop=False)
        try:
            before = hr.stats()
            rows = echo.client(hr.topo["p1"], "tcp", CIP, 80, 3, cgroup=cg)
            assert answers(rows) == [f"p2 {PODS['p1'][0]}"] * 3
            assert delta(before, hr.stats()).get("service_new", 0) == 0  # socklb's, at connect()

            before = hr.stats()
            assert answers(client(hr.topo, "tcp", CIP, 80, 3, ns="p1")) == [f"p2 {PODS['p1'][0]}"] * 3
            assert delta(before, hr.stats()).get("service_new", 0) >= 3  # host_routing's, per packet
        finally:
            sl.kpr_stop(context=sl.context)


@pytest.mark.parametrize("src", ["p1", "b1"])
def test_hairpin_a_pod_reaches_itself_through_a_service(hr: Rig, src: str) -> None:
    """The backend picked is the client pod itself: the source becomes the service address (the
    pod sees the ClusterIP as its peer), and the reply, addressed to the ClusterIP, comes back
    into the same pod from the service."""
    hr.start()
    hr.source_pods("b1", "b2")
    wait_for(lambda: PODS["b1"][1] in hr.plugin.plan.pods, what="bridge pods learned from the source")
    hr.writer.upsert(service(src))
    before = hr.stats()
    want = [f"{src} {addr}" for addr in (CIP, CIP6) for _ in range(6)]
    assert dial(hr, src) == want
    d = delta(before, hr.stats())
    assert d.get("service_hairpin", 0) >= 24, d  # requests and replies
