"""announce_bgp against real BGP speakers kpr does not implement: bird2 (and gobgpd as a second
opinion) in a router namespace, kpr's ExaBGP in a node namespace (the plugin's `netns`),
linked by a veth. Nothing touches the host's addresses or routes."""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from kpr.config import parse_config
from kpr.daemon import Agent
from kpr.testing.agent import AgentConfig, kpr_cli
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.model import BackendState, FrontendType, NodeInfo
from kpr.plugins.announce_bgp.exabgp import Backoff, ExaBGPMissing, find_exabgp
from kpr.testing.waiting import free_port, wait_until

from bgp_env import LOCAL_ASN, ROUTER_ASN, Bird, BirdNeighbor, GoBGP, lb_service, make_plugin

pytestmark = pytest.mark.kernel

ACTIVE, TERM = BackendState.ACTIVE, BackendState.TERMINATING
NODE_IP, RTR_IP = "10.99.0.1", "10.99.0.2"
NODE_IP6, RTR_IP6 = "fd99::1", "fd99::2"
FAST = Backoff(first=0.2, maximum=2.0, stable=5.0)
ROUTER_ID = "10.255.0.1"
LB_IP = "10.0.100.10"
LB_PREFIX = f"{LB_IP}/32"


@pytest.fixture(autouse=True)
def _tools():
    for tool in ("bird", "birdc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install bird2)")
    try:
        find_exabgp()
    except ExaBGPMissing as e:
        pytest.skip(str(e))


class Lab:
    """A node namespace (kpr's ExaBGP) and a router namespace (the peer), plus plugins to stop."""

    def __init__(self, topo, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.plugins = []

    def close(self) -> None:
        for p in self.plugins:
            p.kpr_stop(context=None)

    def pair(self, v6: bool = False, node: str = "node", rtr: str = "rtr"):
        if node not in self.topo.namespaces:
            self.topo.add_node(node)
        if rtr not in self.topo.namespaces:
            self.topo.add_router(rtr)
        if v6:
            self.topo.link(node, rtr, [f"{NODE_IP6}/64"], [f"{RTR_IP6}/64"])
        else:
            self.topo.link(node, rtr, [f"{NODE_IP}/24"], [f"{RTR_IP}/24"])

    def bird(self, neighbors: list[BirdNeighbor] | None = None, rtr: str = "rtr") -> Bird:
        b = Bird(self.topo[rtr], self.tmp / f"bird-{rtr}", RTR_IP, neighbors or [BirdNeighbor("node1", RTR_IP, NODE_IP)])
        b.start()
        return b

    def plugin(self, node: str = "node", addresses=(NODE_IP,), **section):
        section.setdefault("localASN", LOCAL_ASN)
        # Not an address of the node: the next hop must be the session's address, not the id.
        section.setdefault("routerID", ROUTER_ID)
        section.setdefault("peers", [{"address": RTR_IP, "asn": ROUTER_ASN, "holdTime": 6}])
        section.setdefault("gracefulRestartTime", 30)
        section["netns"] = self.topo[node].netns
        p = make_plugin(section, NodeInfo(node, tuple(addresses)), self.tmp / f"state-{node}-{len(self.plugins)}", backoff=FAST)
        self.plugins.append(p)
        return p


@pytest.fixture
def lab(topology, tmp_path):
    lab = Lab(topology, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def peer_up(plugin, address=RTR_IP) -> bool:
    return plugin.speaker.peers[address].state == "up"


def eor_done(plugin, address=RTR_IP) -> bool:
    sp = plugin.speaker
    return sp.peers[address].state == "up" and sp.peers[address].eor_sent and sp.in_flight() == 0


def test_routes_reach_bird_with_next_hop_and_communities_only_after_sync_and_go_on_delete(lab):
    lab.pair()
    bird = lab.bird()
    p = lab.plugin(
        advertisements=[{"communities": ["64512:100", "no-export"], "largeCommunities": ["64512:7:9"], "med": 20}]
    )
    p.kpr_service_upsert(lb_service("web", LB_IP, local=True))
    p.kpr_service_upsert(lb_service("ext", "192.0.2.7", type=FrontendType.EXTERNAL_IP, backends=(("10.244.2.3", False, ACTIVE),)))
    p.kpr_service_upsert(lb_service("internal", "10.96.0.10", type=FrontendType.CLUSTER_IP))

    # The session comes up at once, but nothing is announced before the initial sync.
    wait_until(lambda: bird.established("node1"), 15, "session up")
    wait_until(lambda: peer_up(p), 5, "exabgp sees the session")
    time.sleep(0.5)
    assert bird.routes() == {}
    assert not p.kpr_status().healthy or p.kpr_status().counters["routes_advertised"] == 0

    p.kpr_sync_complete()
    routes = wait_until(lambda: (r := bird.routes()) and LB_PREFIX in r and "192.0.2.7/32" in r and r, 10, "routes at bird")
    (web,) = routes[LB_PREFIX]
    assert web["via"] == NODE_IP and web["attrs"]["next_hop"] == NODE_IP
    assert web["attrs"]["as_path"] == str(LOCAL_ASN)
    assert "(64512,100)" in web["attrs"]["community"] and "(65535,65281)" in web["attrs"]["community"]  # no-export
    assert web["attrs"]["large_community"] == "(64512, 7, 9)"
    assert web["attrs"]["med"] == "20"
    assert "10.96.0.10/32" not in routes  # ClusterIPs only when asked for

    st = wait_until(lambda: (s := p.kpr_status()).counters["routes_advertised"] == 2 and s, 5, "status")
    assert st.healthy, st.message
    assert st.counters["peers_up"] == 1 and st.counters[f"peer_up:{RTR_IP}"] == 1
    assert st.details["peers"][RTR_IP]["state"] == "up"
    assert {r["prefix"] for r in st.details["routes"]} == {LB_PREFIX, "192.0.2.7/32"}

    p.kpr_service_delete(lb_service("web", LB_IP).key)
    wait_until(lambda: LB_PREFIX not in bird.routes(), 5, "withdrawal")
    assert "192.0.2.7/32" in bird.routes()
    assert p.kpr_status().counters["routes_advertised"] == 1


def test_etp_local_withdraws_with_the_last_local_endpoint_and_announces_when_one_returns(lab):
    lab.pair()
    bird = lab.bird()
    p = lab.plugin()
    remote = ("10.244.2.9", False, ACTIVE)
    p.kpr_service_upsert(lb_service("web", LB_IP, local=True, backends=(("10.244.0.5", True, ACTIVE), remote)))
    p.kpr_sync_complete()
    wait_until(lambda: LB_PREFIX in bird.routes(), 15, "announced with a local endpoint")

    # The local endpoint starts terminating: a serving-but-terminating endpoint is not ready.
    p.kpr_service_upsert(lb_service("web", LB_IP, local=True, backends=(("10.244.0.5", True, TERM), remote)))
    wait_until(lambda: LB_PREFIX not in bird.routes(), 5, "withdrawn without a ready local endpoint")
    p.kpr_service_upsert(lb_service("web", LB_IP, local=True, backends=(remote,)))
    time.sleep(0.3)
    assert LB_PREFIX not in bird.routes()

    p.kpr_service_upsert(lb_service("web", LB_IP, local=True, backends=(("10.244.0.6", True, ACTIVE), remote)))
    wait_until(lambda: LB_PREFIX in bird.routes(), 5, "announced again")


def test_peer_restart_relearns_the_routes(lab):
    lab.pair()
    bird = lab.bird()
    p = lab.plugin()
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_sync_complete()
    wait_until(lambda: LB_PREFIX in bird.routes(), 15, "route")

    bird.stop()
    wait_until(lambda: p.speaker.peers[RTR_IP].state == "down", 10, "session down in status")
    st = p.kpr_status()
    assert not st.healthy and st.counters["peers_up"] == 0 and RTR_IP in st.message
    bird.start()  # a fresh bird: an empty table
    wait_until(lambda: LB_PREFIX in bird.routes(), 20, "route learned again")
    wait_until(lambda: p.kpr_status().healthy, 5, "healthy again")


def test_exabgp_killed_is_restarted_and_graceful_restart_keeps_and_then_refreshes_routes(lab):
    lab.pair()
    bird = lab.bird()
    p = lab.plugin()
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_service_upsert(lb_service("gone", "10.0.100.11"))
    p.kpr_sync_complete()
    wait_until(lambda: {LB_PREFIX, "10.0.100.11/32"} <= set(bird.routes()), 15, "routes")
    wait_until(lambda: eor_done(p), 5, "end-of-rib sent")
    old_pid = p.supervisor.pid

    p.supervisor.kill()  # SIGKILL: no NOTIFICATION, the TCP session just dies
    # While ExaBGP is down, a service goes away: the next ExaBGP must not bring it back.
    p.kpr_service_delete(lb_service("gone", "10.0.100.11").key)

    def restarted() -> bool:
        assert LB_PREFIX in bird.routes(), "graceful restart: the router keeps the route while exabgp restarts"
        return p.supervisor.pid not in (None, old_pid) and eor_done(p)

    wait_until(restarted, 20, "exabgp restarted and re-synced", interval=0.05)
    counters = p.kpr_status().counters
    assert counters["exabgp_restarts"] >= 1 and counters["exabgp_crashes"] == 1
    # Stale routes the new ExaBGP did not re-announce are flushed at its End-of-RIB.
    wait_until(lambda: "10.0.100.11/32" not in bird.routes(), 10, "stale route flushed")
    assert LB_PREFIX in bird.routes()
    # The new instance is live: a change still gets through.
    p.kpr_service_upsert(lb_service("new", "10.0.100.12"))
    wait_until(lambda: "10.0.100.12/32" in bird.routes(), 5, "route via the new exabgp")


def test_agent_restart_keeps_routes_at_the_router(lab):
    lab.pair()
    bird = lab.bird()
    first = lab.plugin()
    for name, ip in (("web", LB_IP), ("old", "10.0.100.11")):
        first.kpr_service_upsert(lb_service(name, ip))
    first.kpr_sync_complete()
    wait_until(lambda: {LB_PREFIX, "10.0.100.11/32"} <= set(bird.routes()), 15, "routes")
    wait_until(lambda: eor_done(first), 5, "end-of-rib sent")

    first.kpr_stop(context=None)  # what the agent does on SIGTERM
    lab.plugins.remove(first)
    time.sleep(1.0)
    assert LB_PREFIX in bird.routes(), "routes survive the agent's stop (graceful restart)"

    second = lab.plugin()
    second.kpr_service_upsert(lb_service("web", LB_IP))  # "old" was deleted while the agent was down
    for _ in range(10):
        assert LB_PREFIX in bird.routes()
        time.sleep(0.05)
    second.kpr_sync_complete()
    wait_until(lambda: eor_done(second), 15, "new agent synced")
    wait_until(lambda: "10.0.100.11/32" not in bird.routes(), 10, "route of the deleted service flushed")
    assert LB_PREFIX in bird.routes()


def test_ipv6_routes_over_an_ipv6_session(lab):
    lab.pair(v6=True)
    bird = lab.bird([BirdNeighbor("node1", RTR_IP6, NODE_IP6)])
    p = lab.plugin(addresses=(NODE_IP6,), peers=[{"address": RTR_IP6, "asn": ROUTER_ASN, "holdTime": 6}], advertisements=[{"communities": ["64512:6"]}])
    p.kpr_service_upsert(lb_service("v6", "fd00:100::10"))
    p.kpr_service_upsert(lb_service("v4", LB_IP))  # not carried: the session's family is IPv6
    p.kpr_sync_complete()
    routes = wait_until(lambda: (r := bird.routes()) and "fd00:100::10/128" in r and r, 15, "v6 route")
    (r6,) = routes["fd00:100::10/128"]
    assert r6["attrs"]["next_hop"].split()[0] == NODE_IP6 and r6["via"] == NODE_IP6
    assert "(64512,6)" in r6["attrs"]["community"]
    assert LB_PREFIX not in routes
    assert p.kpr_status().details["peers"][RTR_IP6]["state"] == "up"
    p.kpr_service_delete(lb_service("v6", "fd00:100::10").key)
    wait_until(lambda: "fd00:100::10/128" not in bird.routes(), 5, "v6 withdrawal")


def test_ipv6_routes_over_an_ipv4_session_take_the_node_v6_address_as_next_hop(lab):
    lab.topo.add_node("node")
    lab.topo.add_router("rtr")
    lab.topo.link("node", "rtr", [f"{NODE_IP}/24", f"{NODE_IP6}/64"], [f"{RTR_IP}/24", f"{RTR_IP6}/64"])
    bird = lab.bird()
    p = lab.plugin(addresses=(NODE_IP, NODE_IP6), peers=[{"address": RTR_IP, "asn": ROUTER_ASN, "holdTime": 6, "families": ["ipv4", "ipv6"]}])
    p.kpr_service_upsert(lb_service("dual", LB_IP))
    p.kpr_service_upsert(lb_service("v6", "fd00:100::10"))
    p.kpr_sync_complete()
    routes = wait_until(lambda: (r := bird.routes()) and {LB_PREFIX, "fd00:100::10/128"} <= set(r) and r, 15, "both families")
    assert routes[LB_PREFIX][0]["via"] == NODE_IP
    assert routes["fd00:100::10/128"][0]["via"] == NODE_IP6


def test_two_nodes_announcing_one_cluster_address_give_the_router_two_paths(lab):
    topo = lab.topo
    topo.add_node("n1")
    topo.add_node("n2")
    topo.add_router("rtr")
    topo.link("n1", "rtr", ["10.99.1.1/24"], ["10.99.1.2/24"])
    topo.link("n2", "rtr", ["10.99.2.1/24"], ["10.99.2.2/24"])
    bird = lab.bird([BirdNeighbor("node1", "10.99.1.2", "10.99.1.1"), BirdNeighbor("node2", "10.99.2.2", "10.99.2.1")])
    svc_backends = (("10.244.1.5", True, ACTIVE), ("10.244.2.5", False, ACTIVE))
    for node, own, rtr in (("n1", "10.99.1.1", "10.99.1.2"), ("n2", "10.99.2.1", "10.99.2.2")):
        p = lab.plugin(node=node, addresses=(own,), routerID=own, peers=[{"address": rtr, "asn": ROUTER_ASN, "holdTime": 6}])
        p.kpr_service_upsert(lb_service("shared", "10.0.100.20", backends=svc_backends))  # eTP=Cluster
        p.kpr_sync_complete()
    paths = wait_until(lambda: len(bird.routes().get("10.0.100.20/32", [])) == 2 and bird.routes()["10.0.100.20/32"], 20, "two paths")
    assert sorted(x["via"] for x in paths) == ["10.99.1.1", "10.99.2.1"]
    assert sorted(x["protocol"] for x in paths) == ["node1", "node2"]
    text = bird.show("route", "all", "10.0.100.20/32")
    assert text.count("BGP.next_hop") == 2, text


def test_gobgp_learns_the_same_routes(lab):
    if shutil.which("gobgpd") is None or shutil.which("gobgp") is None:
        pytest.skip("gobgpd not installed (apt-get install gobgpd)")
    lab.pair()
    gobgp = GoBGP(lab.topo["rtr"], lab.tmp / "gobgp", RTR_IP, [(NODE_IP, LOCAL_ASN)])
    gobgp.start()
    p = lab.plugin(advertisements=[{"communities": ["64512:100"], "largeCommunities": ["64512:1:2"], "med": 7}])
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_sync_complete()
    rib = wait_until(lambda: (r := gobgp.rib()) and LB_PREFIX in r and r, 20, "route at gobgpd")
    attrs = {a["type"]: a for a in rib[LB_PREFIX][0]["attrs"]}
    assert attrs[3]["nexthop"] == NODE_IP  # NEXT_HOP
    assert attrs[4]["metric"] == 7  # MED
    assert attrs[8]["communities"] == [(64512 << 16) | 100]  # COMMUNITIES
    assert attrs[32]["value"] == [{"ASN": 64512, "LocalData1": 1, "LocalData2": 2}]  # LARGE_COMMUNITY
    p.kpr_service_delete(lb_service("web", LB_IP).key)
    wait_until(lambda: LB_PREFIX not in gobgp.rib(), 5, "withdrawal at gobgpd")


def test_unreachable_peer_shows_in_status_and_is_retried(lab):
    lab.pair()
    p = lab.plugin()  # no router speaks BGP yet: connections are refused
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_sync_complete()
    wait_until(lambda: p.speaker.connected, 10, "bridge connected")
    time.sleep(1.0)
    st = p.kpr_status()
    assert not st.healthy
    assert st.counters["peers_up"] == 0 and st.counters[f"peer_up:{RTR_IP}"] == 0
    # ExaBGP passes through "connected" (TCP, no BGP session) on its retries: any state but up.
    assert any(f"{RTR_IP} {state}" in st.message for state in ("idle", "down", "connected")), st.message
    bird = lab.bird()  # the router appears: ExaBGP's retries find it
    wait_until(lambda: LB_PREFIX in bird.routes(), 30, "route once the peer is reachable")
    # ExaBGP tells the plugin the session is up a moment after bird shows the route (seen in a
    # full run: status still "connected" right after the route arrived).
    wait_until(lambda: p.kpr_status().healthy, 10, "status healthy once the peer is up")


def test_md5_password_and_a_non_standard_port(lab):
    lab.pair()
    bird = lab.bird([BirdNeighbor("node1", RTR_IP, NODE_IP, password='s3cret;{x} #q', port=1790)])
    p = lab.plugin(peers=[{"address": RTR_IP, "asn": ROUTER_ASN, "holdTime": 6, "port": 1790, "password": 's3cret;{x} #q'}])
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_sync_complete()
    wait_until(lambda: LB_PREFIX in bird.routes(), 20, "route over an MD5-signed session")
    assert oct(p.conf_path.stat().st_mode & 0o777) == "0o600"


def test_router_id_follows_the_node_address(lab):
    lab.pair()
    bird = lab.bird()
    p = lab.plugin(routerID=None, addresses=(NODE_IP,))
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_sync_complete()
    wait_until(lambda: "Neighbor ID:      10.99.0.1" in bird.show("protocols", "all", "node1"), 15, "router id from the node")
    # The agent updates the context before kpr_node_changed; the first IPv4 address is now another.
    p.context.node = NodeInfo("node", ("10.99.0.7", NODE_IP))
    p.kpr_node_changed(node=p.context.node)
    wait_until(lambda: "Neighbor ID:      10.99.0.7" in bird.show("protocols", "all", "node1"), 15, "new router id")
    wait_until(lambda: eor_done(p), 10, "re-synced")
    assert LB_PREFIX in bird.routes()


def test_a_source_address_that_appears_later_is_picked_up(lab):
    topo = lab.topo
    topo.add_node("node")
    topo.add_router("rtr")
    topo.link("node", "rtr", None, [f"{RTR_IP}/24"])  # the node's side has no address yet
    bird = lab.bird()
    p = lab.plugin()
    p.kpr_service_upsert(lb_service("web", LB_IP))
    p.kpr_sync_complete()
    assert p.local_addresses == {RTR_IP: None}
    time.sleep(0.5)
    topo.run("node", ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"])
    # ExaBGP, still without a local-address, may connect from the new address before the
    # plugin's recheck (every RECHECK_UNRESOLVED) restarts it with one: wait for the recheck
    wait_until(lambda: p.local_addresses == {RTR_IP: NODE_IP}, 20, "the source address picked up")
    routes = wait_until(lambda: (r := bird.routes()) and LB_PREFIX in r and r, 20, "route once the node has an address")
    # ExaBGP was restarted with the address as its local-address, so it is the next hop
    # (not the router id, which is what ExaBGP's "next-hop self" gives without one).
    assert routes[LB_PREFIX][0]["via"] == NODE_IP


def manifest(lb: str, node: str) -> str:
    """ingress/ingress, a LoadBalancer at `lb` labelled bgp=yes, Local policy, its one endpoint on `node`."""
    return yaml_docs(
        service("ingress", namespace="ingress", type="LoadBalancer", local=True, port=443, target_port=8443,
                port_name="https", labels={"bgp": "yes"}, lb_ip=lb),
        endpoint_slice("ingress", ["10.244.0.31"], namespace="ingress", port=8443, port_name="https", node=node),
    )


def agent_config(lab, tmp_path, *, poll: float, metrics: str = "", **section) -> AgentConfig:
    """An agent config: the files source on tmp_path/manifests, announce_bgp (`section`: more
    of its keys) to the lab's router."""
    cfg = AgentConfig(tmp_path, None, addresses=(NODE_IP,), source={"pollInterval": poll, "emptyGracePeriod": 0},
                      extra={"service": {"clusterCIDR": ["10.96.0.0/16"]}, "metrics": {"address": metrics}})
    return cfg.plugin("announce_bgp", localASN=LOCAL_ASN, netns=lab.topo["node"].netns, gracefulRestartTime=30,
                      peers=[{"address": RTR_IP, "asn": ROUTER_ASN, "holdTime": 6}], **section)


def manifest_lab(lab, tmp_path) -> tuple[Bird, Path, Path]:
    """The router with bird, and a manifests directory holding manifest(LB_IP, "node1") in one file."""
    lab.pair()
    bird = lab.bird()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    svc_file = manifests / "ingress.yaml"
    svc_file.write_text(manifest(lb=LB_IP, node="node1"))
    return bird, manifests, svc_file


def test_agent_end_to_end_from_manifest_changes(lab, tmp_path):
    bird, manifests, svc_file = manifest_lab(lab, tmp_path)
    port = free_port()
    cfg = agent_config(lab, tmp_path, poll=0.05, metrics=f"127.0.0.1:{port}",
                       advertisements=[{"serviceSelector": {"matchLabels": {"bgp": "yes"}}, "communities": ["64512:443"]}])
    agent = Agent(cfg.parse())
    agent.setup()
    try:
        routes = wait_until(lambda: (r := bird.routes()) and LB_PREFIX in r and r, 20, "route from the manifest")
        assert routes[LB_PREFIX][0]["via"] == NODE_IP and "(64512,443)" in routes[LB_PREFIX][0]["attrs"]["community"]
        st = wait_until(lambda: (s := agent.status()["plugins"]["announce_bgp"])["healthy"] and s, 10, "healthy")
        assert st["counters"]["routes_advertised"] == 1 and st["details"]["routerID"] == NODE_IP
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kpr_plugin_counter{counter="peers_up",plugin="announce_bgp"} 1.0' in body
        assert f'kpr_plugin_counter{{counter="peer_up:{RTR_IP}",plugin="announce_bgp"}} 1.0' in body

        # The endpoint moves to another node: eTP=Local, so this node withdraws.
        svc_file.write_text(manifest(lb=LB_IP, node="node2"))
        wait_until(lambda: LB_PREFIX not in bird.routes(), 10, "withdrawn when the endpoint leaves")
        svc_file.write_text(manifest(lb=LB_IP, node="node1"))
        wait_until(lambda: LB_PREFIX in bird.routes(), 10, "announced when it returns")
        # The LB address changes, then the service goes.
        svc_file.write_text(manifest(lb="10.0.100.77", node="node1"))
        wait_until(lambda: "10.0.100.77/32" in (r := bird.routes()) and LB_PREFIX not in r, 10, "address change")
        svc_file.unlink()
        wait_until(lambda: "10.0.100.77/32" not in bird.routes(), 10, "withdrawn on delete")
    finally:
        assert agent.shutdown() == 0


def test_a_manifest_change_reaches_service_list_and_bird_without_a_poll(lab, tmp_path):
    """pollInterval is a minute (the most it may be): only the files source's inotify watch
    can explain a change arriving within the waits below."""
    import json

    bird, manifests, svc_file = manifest_lab(lab, tmp_path)
    config = agent_config(lab, tmp_path, poll=60).write()

    def service_list() -> list[str]:
        res = kpr_cli("service", "list", "--json", "--config", str(config), timeout=30, check=True)
        return sorted({r["address"] for r in json.loads(res.stdout)})

    agent = Agent(parse_config(config.read_text()))
    agent.setup()
    try:
        wait_until(lambda: LB_PREFIX in bird.routes(), 20, "route from the manifest")
        assert agent.status()["source"]["watch"] == "inotify"
        assert LB_IP in service_list()
        # Rewritten in place, as an editor without a rename does: IN_CLOSE_WRITE.
        svc_file.write_text(manifest(lb="10.0.100.77", node="node1"))
        wait_until(lambda: "10.0.100.77/32" in (r := bird.routes()) and LB_PREFIX not in r, 10, "moved address at bird")
        assert "10.0.100.77" in service_list() and LB_IP not in service_list()
        # Renamed into place: IN_MOVED_TO.
        tmp = manifests / ".ingress.yaml.tmp"
        tmp.write_text(manifest(lb=LB_IP, node="node1"))
        tmp.rename(svc_file)
        wait_until(lambda: LB_PREFIX in (r := bird.routes()) and "10.0.100.77/32" not in r, 10, "back at bird")
        assert LB_IP in service_list()
        # Removed: IN_DELETE.
        svc_file.unlink()
        wait_until(lambda: LB_PREFIX not in bird.routes(), 10, "withdrawn")
        assert agent.store.counts()[0] == 0
    finally:
        assert agent.shutdown() == 0
