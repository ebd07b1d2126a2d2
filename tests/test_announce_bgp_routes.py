"""Which routes announce_bgp wants: eTP Local, namespaces, selectors, ClusterIP, v4/v6, merging."""

from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.plugins.announce_bgp.routes import (
    NEXT_HOP_SELF,
    Advertisement,
    Attrs,
    Peer,
    RouteTable,
    announced_addresses,
    next_hop,
    service_routes,
)
from kpr.selectors import Selector

LB, EXT, CIP = FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP, FrontendType.CLUSTER_IP
ACTIVE, TERM = BackendState.ACTIVE, BackendState.TERMINATING
P4 = Peer("10.0.0.254")
P6 = Peer("fd00::fe")


def be(addr="10.244.0.5", local=True, state=ACTIVE):
    return Backend(addr, 8080, state, node_name="node1" if local else "node2", local=local)


def svc(*frontends, name="web", ns="default", labels=None, kind="Service"):
    return Service(ServiceKey(ns, name), tuple(frontends), labels=tuple(sorted((labels or {}).items())), source_kind=kind)


def fe(type, address, backends=(be(),), local=False, internal_local=False, port=80):
    return Frontend(type, address, port, Protocol.TCP, tuple(backends), external_local=local, internal_local=internal_local)


DEFAULT = Advertisement()


def test_default_announces_lb_and_external_ips_not_cluster_ips():
    s = svc(fe(CIP, "10.96.0.10"), fe(LB, "10.0.100.10"), fe(EXT, "192.0.2.7"), fe(FrontendType.NODE_PORT, "192.168.50.10"))
    assert announced_addresses(s, DEFAULT) == {"10.0.100.10", "192.0.2.7"}
    routes, problems = service_routes(s, [DEFAULT], [P4])
    assert problems == []
    assert routes == {("10.0.0.254", "10.0.100.10/32"): Attrs(), ("10.0.0.254", "192.0.2.7/32"): Attrs()}


def test_cluster_ip_optional():
    adv = Advertisement(types=frozenset({CIP, LB}))
    s = svc(fe(CIP, "10.96.0.10"), fe(LB, "10.0.100.10"))
    assert announced_addresses(s, adv) == {"10.96.0.10", "10.0.100.10"}


def test_etp_local_needs_an_active_local_endpoint():
    remote_only = svc(fe(LB, "10.0.100.10", [be(local=False)], local=True))
    assert announced_addresses(remote_only, DEFAULT) == set()
    local_terminating = svc(fe(LB, "10.0.100.10", [be(local=True, state=TERM), be("10.244.2.1", local=False)], local=True))
    assert announced_addresses(local_terminating, DEFAULT) == set()
    local_ready = svc(fe(LB, "10.0.100.10", [be(local=True), be("10.244.2.1", local=False)], local=True))
    assert announced_addresses(local_ready, DEFAULT) == {"10.0.100.10"}


def test_etp_cluster_needs_a_ready_endpoint_anywhere():
    assert announced_addresses(svc(fe(LB, "10.0.100.10", [be(local=False)])), DEFAULT) == {"10.0.100.10"}
    assert announced_addresses(svc(fe(LB, "10.0.100.10", [])), DEFAULT) == set()
    assert announced_addresses(svc(fe(LB, "10.0.100.10", [be(state=TERM)])), DEFAULT) == set()


def test_any_port_of_an_address_is_enough():
    s = svc(
        fe(LB, "10.0.100.10", [be(local=False)], local=True, port=80),
        fe(LB, "10.0.100.10", [be(local=True)], local=True, port=443),
    )
    assert announced_addresses(s, DEFAULT) == {"10.0.100.10"}


def test_internal_traffic_policy_local_for_announced_cluster_ips():
    adv = Advertisement(types=frozenset({CIP}))
    assert announced_addresses(svc(fe(CIP, "10.96.0.10", [be(local=False)], internal_local=True)), adv) == set()
    assert announced_addresses(svc(fe(CIP, "10.96.0.10", [be(local=True)], internal_local=True)), adv) == {"10.96.0.10"}


def test_namespaces_and_selector():
    adv = Advertisement(namespaces=frozenset({"prod"}), selector=Selector.build({"bgp": "yes"}))
    base = fe(LB, "10.0.100.10")
    assert announced_addresses(svc(base, ns="prod", labels={"bgp": "yes"}), adv) == {"10.0.100.10"}
    assert announced_addresses(svc(base, ns="dev", labels={"bgp": "yes"}), adv) == set()
    assert announced_addresses(svc(base, ns="prod", labels={"bgp": "no"}), adv) == set()


def test_hostport_pods_are_never_announced():
    assert announced_addresses(svc(fe(LB, "10.0.100.10"), kind="Pod"), DEFAULT) == set()


def test_v4_and_v6_prefixes_per_peer_family():
    s = svc(fe(LB, "10.0.100.10"), fe(LB, "FD00:100::0010"))
    routes, problems = service_routes(s, [DEFAULT], [P4, P6])
    assert set(routes) == {("10.0.0.254", "10.0.100.10/32"), ("fd00::fe", "fd00:100::10/128")}
    assert all(a.next_hop == NEXT_HOP_SELF for a in routes.values())
    assert problems == []


def test_cross_family_route_takes_a_node_address_as_next_hop():
    dual = Peer("10.0.0.254", (4, 6))
    s = svc(fe(LB, "10.0.100.10"), fe(LB, "fd00:100::10"))
    routes, problems = service_routes(s, [DEFAULT], [dual], ["192.168.50.10", "fd00:50::10"])
    assert routes[("10.0.0.254", "fd00:100::10/128")].next_hop == "fd00:50::10"
    assert routes[("10.0.0.254", "10.0.100.10/32")].next_hop == NEXT_HOP_SELF
    # Without a v6 node address the v6 route cannot go over the v4 session: reported, not sent.
    routes, problems = service_routes(s, [DEFAULT], [dual], ["192.168.50.10"])
    assert set(routes) == {("10.0.0.254", "10.0.100.10/32")}
    assert problems == ["fd00:100::10/128 to peer 10.0.0.254: no IPv6 node address for the next hop"]
    assert next_hop("fd00::1/128", P6, []) == NEXT_HOP_SELF


def test_advertisement_peers_restrict_the_routes():
    adv = Advertisement(peers=frozenset({"10.0.0.253"}))
    routes, _ = service_routes(svc(fe(LB, "10.0.100.10")), [adv], [P4, Peer("10.0.0.253")])
    assert set(routes) == {("10.0.0.253", "10.0.100.10/32")}


def test_overlapping_advertisements_merge_attributes():
    a = Advertisement(communities=("64512:100", "no-export"), local_preference=100, med=50)
    b = Advertisement(communities=("64512:20",), large_communities=("64512:1:2",), local_preference=200, med=10)
    routes, _ = service_routes(svc(fe(LB, "10.0.100.10")), [a, b], [P4])
    assert routes[("10.0.0.254", "10.0.100.10/32")] == Attrs(
        communities=("64512:20", "64512:100", "no-export"),
        large_communities=("64512:1:2",),
        local_preference=200,
        med=10,
    )


def test_route_table_merges_services_sharing_an_address_and_reports_changes():
    t = RouteTable()
    rk = ("10.0.0.254", "10.0.100.10/32")
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    assert t.set(a, {rk: Attrs(communities=("1:1",))}) == {rk}
    assert t.set(a, {rk: Attrs(communities=("1:1",))}) == set()  # idempotent
    assert t.set(b, {rk: Attrs(communities=("2:2",))}) == {rk}
    assert t.routes[rk].communities == ("1:1", "2:2")
    assert t.owners(rk) == [a, b]
    assert t.remove(a) == {rk}
    assert t.routes[rk].communities == ("2:2",)
    assert t.remove(b) == {rk}
    assert t.routes == {} and t.services() == []
    assert t.remove(b) == set()  # a delete for a service never seen
