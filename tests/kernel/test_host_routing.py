"""host_routing end to end: real traffic between an external client and pods on per-pod veths
and on a bridge (topology in host_routing_env.py), without the plugin, with it, and with each
of the talk's fallbacks forced; the plugin's counters prove which helper carried the packets.
"""

from __future__ import annotations

import socket
import time

import pytest

from kpr.bpf import links
from kpr.bpf.cleanup import cleanup
from kpr.testing.waiting import wait_for

from host_routing_env import CLIENT, NODE, PODS, PORT, Rig, answers, client, delta, rig_fixtures, sent_out

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


env, hr = rig_fixtures(prefix="kpr-hr-e2e")


def traffic(r: Rig, pod: str, *, src: str = "cl", n: int = 3) -> list[str]:
    """TCP and UDP, IPv4 and IPv6, from `src` to `pod`: every answer names the pod and the
    client's own address (nothing translated on the way)."""
    out = []
    for fam in (0, 1):
        out += answers(client(r.topo, "tcp", PODS[pod][fam], PORT, n, ns=src))
        out += answers(client(r.topo, "udp", PODS[pod][fam], PORT, n, ns=src))
    return out


def expected(pod: str, src: str = "cl", n: int = 3) -> list[str]:
    addrs = (CLIENT, "fd21::2") if src == "cl" else PODS[src]
    return [f"{pod} {addrs[fam]}" for fam in (0, 1) for _ in range(2 * n)]


def tcx_names(r: Rig, dev: str, direction: str) -> list[str]:
    at = links.ATTACH_TCX_INGRESS if direction == "ingress" else links.ATTACH_TCX_EGRESS
    with r.topo["node"].enter():
        ids = links.query(socket.if_nametoindex(dev), at)
    return [links.prog_name(i) or "?" for i in ids]


def test_without_plugin_the_stack_carries_everything(hr: Rig) -> None:
    for pod in PODS:
        assert traffic(hr, pod, n=1) == expected(pod, n=1)
    assert tcx_names(hr, "eth0", "ingress") == []


@pytest.mark.parametrize("peer,neigh", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["peer+neigh", "redirect+neigh", "peer+stack", "redirect+stack"])
def test_helpers_and_fallbacks(hr: Rig, peer: bool, neigh: bool) -> None:
    p = hr.start(redirectPeer=peer, redirectNeigh=neigh)
    hr.source_pods("b1", "b2")
    wait_for(lambda: "10.245.9.11" in p.plan.pods, what="bridge pod learned from the source")
    helpers = p.kpr_status().details["helpers"]
    assert helpers["toPod"] == ("bpf_redirect_peer" if peer else "bpf_redirect")
    assert helpers["toNetdev"] == ("bpf_redirect_neigh" if neigh else "stack")

    before = hr.stats()
    assert traffic(hr, "p1") == expected("p1")
    d = delta(before, hr.stats())
    # into the veth pod: the peer helper, or its fallback, never both
    if peer:
        assert d.get("redirect_peer", 0) >= 12 and d.get("redirect", 0) == 0, d
    else:
        assert d.get("redirect", 0) >= 12 and d.get("redirect_peer", 0) == 0, d
    # out of the node: bpf_redirect_neigh (then bpf_redirect with the remembered route's MACs),
    # or the stack with the reason counted
    if neigh:
        assert sent_out(d) >= 12 and d.get("redirect_neigh", 0) >= 1 and d.get("pass_neigh_off", 0) == 0, d
    else:
        assert sent_out(d) == 0 and d.get("pass_neigh_off", 0) >= 12, d

    before = hr.stats()
    assert traffic(hr, "b1") == expected("b1")
    d = delta(before, hr.stats())
    # a bridge has no peer: bpf_redirect to it with the route's MACs, whatever redirectPeer says
    assert d.get("redirect", 0) >= 12 and d.get("redirect_peer", 0) == 0, d


def test_bridge_pods_every_connection(hr: Rig) -> None:
    """Pods on a bridge: every connection from outside succeeds (30 of 30, twice), none of
    them by bpf_redirect_peer (the kernel would drop it unseen)."""
    hr.start()
    hr.source_pods("b1", "b2")
    wait_for(lambda: "10.245.9.12" in hr.plugin.plan.pods, what="bridge pods learned")
    for _ in range(2):
        before = hr.stats()
        rows = client(hr.topo, "tcp", PODS["b2"][0], PORT, 30, ns="cl")
        assert answers(rows) == [f"b2 {CLIENT}"] * 30
        d = delta(before, hr.stats())
        assert d.get("redirect_peer", 0) == 0 and d.get("redirect", 0) >= 30, d


@pytest.mark.parametrize("cluster_ip", [True, False], ids=["clusterIP", "no-clusterIP"])
def test_pod_to_pod_and_pod_to_outside(hr: Rig, cluster_ip: bool) -> None:
    """Without per-packet services a pod's remembered route out of the node is looked up first
    (KPR_HR_CACHE_FIRST): a bridge pod's frames to the other bridge pod stay switched all the
    same, and its own way out is remembered too."""
    hr.start(clusterIP=cluster_ip)
    hr.source_pods("b1", "b2")
    wait_for(lambda: "10.245.9.11" in hr.plugin.plan.pods, what="bridge pods learned")
    before = hr.stats()
    assert traffic(hr, "p2", src="p1") == expected("p2", "p1")
    d = delta(before, hr.stats())
    assert d.get("redirect_peer", 0) >= 24 and sent_out(d) == 0, d  # both ways into peers

    before = hr.stats()
    assert traffic(hr, "b2", src="b1") == expected("b2", "b1")
    d = delta(before, hr.stats())
    assert d.get("pass_switched", 0) >= 24 and d.get("redirect", 0) == 0, d  # one bridge: switched, not routed

    before = hr.stats()
    assert answers(client(hr.topo, "tcp", CLIENT, PORT, 3, ns="p1")) == [f"cl {PODS['p1'][0]}"] * 3
    d = delta(before, hr.stats())
    assert sent_out(d) >= 6 and d.get("redirect_peer", 0) >= 6, d

    before = hr.stats()
    assert answers(client(hr.topo, "tcp", CLIENT, PORT, 3, ns="b1")) == [f"cl {PODS['b1'][0]}"] * 3
    d = delta(before, hr.stats())
    assert sent_out(d) >= 6 and d.get("out_route_cached", 0) >= 1 and d.get("redirect", 0) >= 6, d

    before = hr.stats()  # the bridge pods between themselves again, their ways out remembered
    assert traffic(hr, "b2", src="b1") == expected("b2", "b1")
    d = delta(before, hr.stats())
    assert d.get("pass_switched", 0) >= 24 and d.get("redirect", 0) == 0 and sent_out(d) == 0, d


def test_learns_pods_live(hr: Rig) -> None:
    from host_routing_env import add_veth_pod

    p = hr.start()
    assert "10.245.9.11" not in p.plan.pods  # bridge pods: only the source names them
    before = hr.stats()
    assert answers(client(hr.topo, "tcp", PODS["b1"][0], PORT, 2, ns="cl")) == [f"b1 {CLIENT}"] * 2
    assert delta(before, hr.stats()).get("pass_not_pod", 0) >= 2

    syncs = p.syncs
    time.sleep(1)
    assert p.syncs - syncs <= 1, "the plugin's own attachments must not keep waking its watcher"
    add_veth_pod(hr.topo, "p3", "10.244.9.13", "fd44:9::13")
    try:
        wait_for(lambda: "10.244.9.13" in p.plan.pods and ("lxcp3", "ingress") in p.attached,
                 what="new pod's route and device picked up")
        before = hr.stats()
        assert answers(client(hr.topo, "tcp", "10.244.9.13", PORT, 3, ns="cl")) == [f"p3 {CLIENT}"] * 3
        assert delta(before, hr.stats()).get("redirect_peer", 0) >= 6
    finally:
        hr.topo.run("node", ["ip", "link", "del", "lxcp3"])
    wait_for(lambda: "10.244.9.13" not in p.plan.pods and ("lxcp3", "ingress") not in p.attached,
             what="gone pod forgotten")
    assert not (p._link_dir() / "lxcp3").exists()


def test_a_changed_mtu_is_honoured(hr: Rig) -> None:
    """The programs remember pods' next hops from their FIB lookups (kpr_hr_nh); a link change,
    here the pod device's MTU, makes the plugin's sync forget them, so the FIB's MTU check holds
    again: a packet too big for the pod's device is left to the stack (which answers with
    "fragmentation needed"), not carried into the pod by a remembered next hop."""
    p = hr.start()
    pod = PODS["p1"][0]
    assert traffic(hr, "p1", n=1) == expected("p1", n=1)

    def remembered() -> bool:
        # a sync just after start (the plugin's first link/route events) may forget the entry
        # the traffic above made: traffic again until one stays (a full run saw it empty)
        if pod in p.datapath.next_hops():
            return True
        traffic(hr, "p1", n=1)
        return pod in p.datapath.next_hops()

    wait_for(remembered, what="p1's next hop remembered")
    syncs = p.syncs
    hr.topo.run("node", ["ip", "link", "set", "lxcp1", "mtu", "1280"])
    try:
        wait_for(lambda: p.syncs > syncs and pod not in p.datapath.next_hops(), what="next hops forgotten")
        before = hr.stats()
        hr.topo.run("cl", ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1400", pod], check=False)
        d = delta(before, hr.stats())
        assert d.get("pass_fib", 0) >= 1 and d.get("redirect_peer", 0) == 0, d
    finally:
        hr.topo.run("node", ["ip", "link", "set", "lxcp1", "mtu", "1500"])
    assert answers(client(hr.topo, "tcp", pod, PORT, 2, ns="cl")) == [f"p1 {CLIENT}"] * 2


def test_remembered_route_out_follows_a_changed_neighbour(hr: Rig) -> None:
    """Replies out of the node go by the remembered route with its MACs (kpr_hr_out); when the
    next hop's MAC changes (the client's NIC replaced, its neighbour entry updated), the plugin's
    next-hop watcher forgets every remembered route and the traffic follows the new MAC."""
    p = hr.start()
    pod, new_mac = PODS["p1"][0], "02:00:00:00:7e:57"
    old_mac = hr.topo.mac("cl", "eth0")
    assert answers(client(hr.topo, "tcp", pod, PORT, 2, ns="cl")) == [f"p1 {CLIENT}"] * 2

    def remembered() -> bool:
        # a sync or refresh just after the traffic may have forgotten it: traffic again until one stays
        if (pod, CLIENT) in p.datapath.out_routes():
            return True
        client(hr.topo, "tcp", pod, PORT, 1, ns="cl")
        return (pod, CLIENT) in p.datapath.out_routes()

    wait_for(remembered, what="p1's route to the client remembered", show=p.datapath.out_routes)
    invalidations = p.kpr_status().counters["out_route_invalidations"]
    try:
        hr.topo.run("cl", ["ip", "link", "set", "eth0", "address", new_mac])
        hr.topo.run("node", ["ip", "neigh", "replace", CLIENT, "lladdr", new_mac, "dev", "eth0"])
        # the watcher counts an invalidation after the plugin's invalidate() returned, and a
        # refresh may forget the route first: wait for the count, then for the route to be gone
        wait_for(lambda: p.kpr_status().counters["out_route_invalidations"] > invalidations,
                 what="the next-hop watcher's invalidation counted")
        wait_for(lambda: (pod, CLIENT) not in p.datapath.out_routes(), what="remembered routes forgotten")
        before = hr.stats()
        assert answers(client(hr.topo, "tcp", pod, PORT, 3, ns="cl")) == [f"p1 {CLIENT}"] * 3
        assert sent_out(delta(before, hr.stats())) >= 6
    finally:
        hr.topo.run("cl", ["ip", "link", "set", "eth0", "address", old_mac])
        hr.topo.run("node", ["ip", "neigh", "replace", CLIENT, "lladdr", old_mac, "dev", "eth0"])


def test_leaves_what_it_does_not_understand_to_the_stack(hr: Rig) -> None:
    hr.start()
    before = hr.stats()
    hr.topo.run("cl", ["ping", "-c", "2", "-i", "0.2", NODE])  # the node itself
    hr.topo.run("cl", ["ip", "neigh", "flush", "dev", "eth0"])
    hr.topo.run("cl", ["ping", "-c", "2", "-i", "0.2", "-s", "3000", PODS["p1"][0]])  # fragments, ARP first
    d = delta(before, hr.stats())
    assert d.get("pass_not_pod", 0) >= 2, d
    assert d.get("pass_not_ip", 0) >= 1, d
    assert d.get("pass_fragment", 0) >= 4, d
    res = hr.topo.run("cl", ["ping", "-c", "1", "-t", "1", PODS["p1"][0]], check=False)
    assert "Time to live exceeded" in res.stdout or res.returncode != 0
    assert delta(before, hr.stats()).get("pass_ttl", 0) >= 1


def test_restart_adopts_links_and_cleanup_removes_them(hr: Rig) -> None:
    p = hr.start(keepAttachedOnStop=True)
    hr.stop()  # the links stay: traffic keeps its fast path without an agent
    assert tcx_names(hr, "eth0", "ingress") == ["kpr_hr_from_net"]
    assert tcx_names(hr, "lxcp1", "ingress") == ["kpr_hr_from_pod"]
    assert traffic(hr, "p1", n=1) == expected("p1", n=1)

    p = hr.start(keepAttachedOnStop=True)
    assert tcx_names(hr, "eth0", "ingress") == ["kpr_hr_from_net"]  # updated in place, no second copy
    before = hr.stats()
    assert traffic(hr, "p1", n=1) == expected("p1", n=1)
    assert delta(before, hr.stats()).get("redirect_peer", 0) >= 4
    hr.stop()
    with hr.topo["node"].enter():
        removed = cleanup(hr.pin)  # `kpr cleanup`
    assert any("host_routing/eth0/ingress" in line for line in removed), removed
    for dev, direction in (("eth0", "ingress"), ("lxcp1", "ingress"), ("lxcp1", "egress")):
        assert tcx_names(hr, dev, direction) == []
    assert traffic(hr, "p1", n=1) == expected("p1", n=1)
    hr.writer.close()
    hr.writer.open()  # the maps the cleanup removed, for the tests after this one
    del p


def test_next_to_tc_nodeport_on_the_same_device(hr: Rig) -> None:
    """tc_nodeport and host_routing both on eth0's ingress (tcx, in attach order): NodePort
    traffic to local pods on a veth and on a bridge is tc_nodeport's, and the replies, which
    host_routing sends out of eth0 by bpf_redirect_neigh, still get the frontend back at eth0's
    egress (tc_nodeport's reverse NAT)."""
    from kpr.model import Backend, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
    from kpr.plugins.tc_nodeport.plugin import TcNodePort
    from kpr.testing.harness import PluginHarness

    hr.start()
    hr.source_pods("b1", "b2")
    wait_for(lambda: PODS["b1"][0] in hr.plugin.plan.pods, what="bridge pods learned")
    np_port = 30090
    key = ServiceKey("default", "hr-np")
    # tc_nodeport as the agent runs it: after the NodePort facility, behind the writer (hr's)
    node = NodeInfo(hr.node, addresses=hr.addresses, devices=("eth0",))
    with PluginHarness(node, hr.pin, writer=hr.writer, netns=hr.topo[hr.node]) as h:
        h.start(TcNodePort(), {"keepAttachedOnStop": False}, name="tc_nodeport")
        try:
            for pod in ("p1", "b1"):
                h.apply(Service(key, (Frontend(FrontendType.NODE_PORT, NODE, np_port, Protocol.TCP,
                                               (Backend(PODS[pod][0], PORT, node_name="node", local=True),)),)))
                before = hr.stats()
                assert answers(client(hr.topo, "tcp", NODE, np_port, 10, ns="cl")) == [f"{pod} {CLIENT}"] * 10
                assert sent_out(delta(before, hr.stats())) >= 20  # the replies went by host_routing
            assert tcx_names(hr, "eth0", "ingress") == ["kpr_hr_from_net", "kpr_np_ingress"]
        finally:
            h.delete(key)


def test_a_failed_pods_write_still_moves_the_generation(hr: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kpr_hr_pods write that fails half way has changed part of the map: the next hops and
    routes remembered before it must not be trusted after it (the sync moves the generation
    whatever set_pods did)."""
    p = hr.start()
    dp = p.datapath
    real = dp.set_pods

    def half_then_fail(pods):
        real(pods)
        raise OSError(7, "E2BIG (injected after the write)")

    monkeypatch.setattr(dp, "set_pods", half_then_fail)
    before = dp._last_gen
    with pytest.raises(OSError):
        p._sync("test")
    assert dp._last_gen > before
