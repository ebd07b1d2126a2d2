"""lb_ipam end to end on real kernels: two nodes run `kpr run` (files source, lb_ipam,
announce_arp, tc_nodeport) in namespaces on a bridge, reading the same manifests. A
LoadBalancer Service that names no address (IPv4, and IPv6) gets one from the pool on both
nodes alike; the node with the endpoint answers ARP / NDP for it; a client behind the router
reaches the pod through tc_nodeport, its own address kept (externalTrafficPolicy Local), and
`kpr service list` shows the address. Layout and agents: announce_arp_env.Segment; pod server
and client: tc_nodeport_env.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from kpr import api
from kpr.testing.echo import start_echo
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

from announce_arp_env import ROUTER4, ROUTER6, Segment, segment
from tc_nodeport_env import answers, client

pytestmark = pytest.mark.kernel

# Inside the router's on-link VIP prefixes (it resolves them with ARP / NDP itself).
POOLS = {4: "10.0.100.16/28", 6: "fd00:100::10/124"}
POD = {4: "10.244.1.5", 6: "fd00:10:244::5"}


def manifests(family: int) -> str:
    """web (Local policy, its endpoint on node1) and other (no endpoints): LoadBalancers without addresses."""
    fam = f"IPv{family}"
    lb = dict(type="LoadBalancer", family=fam, port_name="http", protocol="TCP")
    return yaml_docs(service("web", local=True, **lb), service("other", **lb),
                     endpoint_slice("web", [POD[family]], port_name="http", ready=True, family=fam))


def lb_ipam_status(seg: Segment, name: str) -> dict | None:
    st = seg.status(name)
    return st["plugins"].get("lb_ipam") if st else None


def lb_addresses(seg: Segment, name: str) -> dict[str, str]:
    """`kpr service list`'s LoadBalancer addresses on one node: service -> address."""
    rows = api.get(seg.nodes[name].socket, "/v1/services", timeout=2)
    return {r["service"]: r["address"] for r in rows if r["type"] == "LoadBalancer"}


@pytest.fixture
def seg(tmp_path):
    with segment(tmp_path, n_nodes=2) as s:
        yield s


@pytest.mark.parametrize("family", [4, 6])
def test_an_address_from_the_pool_announced_and_served(seg, family):
    topo = seg.topo
    topo.add_pod("n1", "p1", POD[4], ip6=POD[6])
    start_echo(topo["p1"], "p1", 8080)
    (seg.manifests / "web.yaml").write_text(manifests(family))
    for name, node in seg.nodes.items():
        seg.write_config(node)
        cfg = json.loads(node.config.read_text())
        cfg["plugins"]["tc_nodeport"] = {"enabled": True}
        cfg["plugins"]["lb_ipam"] = {"enabled": True, "pools": [{"name": "vips", "addresses": [POOLS[4], POOLS[6]]}]}
        node.config.write_text(json.dumps(cfg, indent=1))
        seg.start(name)

    def allocated(name: str) -> dict[str, str] | None:
        if seg.nodes[name].proc.poll() is not None:
            raise AssertionError(f"agent {name} exited: {seg.log_tail(name)}")
        try:
            got = lb_addresses(seg, name)
        except api.ApiError:
            return None
        return got if len(got) == 2 else None

    views = {n: wait_for(lambda n=n: allocated(n), 60, f"addresses on {n}") for n in seg.nodes}
    # Two nodes, no coordination, the same answer; from the pool, one address each.
    assert views["node1"] == views["node2"]
    vip = views["node1"]["default/web"]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network(POOLS[family])
    assert vip != views["node1"]["default/other"]
    for n in seg.nodes:
        st = lb_ipam_status(seg, n)
        assert st["counters"]["pool_vips_used"] == 2 and st["counters"]["pool_vips_free"] == 30

    # Only node1 has a local endpoint (Local policy), so it alone is eligible and answers.
    wait_for(lambda: seg.owners(vip) == {"node1"}, 30, "node1 owning the address")
    if family == 4:
        macs = seg.arping(vip, 3)
        assert macs and set(macs) == {seg.nodes["node1"].mac}
    else:
        seg.resolve(vip)
        wait_for(lambda: seg.neigh_owner(vip) == "node1", 10, "the router's NDP entry naming node1")

    # Through tc_nodeport to the pod; the client's address is kept.
    rows = wait_for(lambda: (r := client(topo, "tcp", vip, 80, 3, ns="r")) and all(a.startswith("p1 ") for a in answers(r)) and r,
                    30, "the router reaching the pod through the address")
    assert answers(rows) == [f"p1 {ROUTER4 if family == 4 else ROUTER6}"] * 3
