"""A service of one port on one ClusterIP and nothing else (the common case) takes a short way
to its frontend (translate._service_frontends); for any service, the frontends must be those
the general way (translate._all_frontends) makes, field for field and in order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kpr import translate
from kpr.model import Backend, NodeInfo, Protocol

NODE = NodeInfo(name="node-a", addresses=("192.168.0.10", "fd00::10"))

address = st.sampled_from([("10.96.0.10", 4, 0x0A60000A), ("10.96.0.11", 4, 0x0A60000B), ("fd00:96::a", 6, 0xFD000096 << 96 | 10)])
service_port = st.builds(
    translate._ServicePort,
    name=st.sampled_from(["", "http", "dns"]),
    protocol=st.sampled_from([Protocol.TCP, Protocol.UDP]),
    port=st.sampled_from([53, 80]),
    node_port=st.sampled_from([0, 30080]),
)


def specs(ports: st.SearchStrategy, cluster_ips: st.SearchStrategy, others: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(
        translate._ServiceSpec,
        type=st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
        cluster_ips=cluster_ips,
        families=st.sampled_from([(4,), (6,), (4, 6)]),
        ports=ports,
        external_ips=others,
        lb_ips=others,
        source_ranges=st.sampled_from([(), ("10.0.0.0/8",)]),
        external_local=st.booleans(),
        internal_local=st.booleans(),
        affinity_timeout=st.sampled_from([0, 10800]),
        health_check_node_port=st.sampled_from([0, 30999]),
        publish_not_ready=st.just(False),
        topology=st.just(False),
    )


spec = st.one_of(
    # the short way's shape, with any type, nodePort, policy and affinity
    specs(st.tuples(service_port), st.tuples(address), st.just(())),
    specs(st.lists(service_port, min_size=1, max_size=2).map(tuple), st.lists(address, min_size=1, max_size=2).map(tuple),
          st.lists(address, max_size=1).map(tuple)),
)
all_backends = (Backend("10.244.0.1", 8080), Backend("10.244.0.2", 8080, local=True), Backend("fd00:244::1", 53))
# (every backend, the Local policy's): they differ, so a frontend given the other is seen
choice = st.sampled_from([(all_backends, all_backends[1:2]), (all_backends[:1], ()), ((), ())])


@settings(max_examples=800, deadline=None)
@given(spec, st.data())
def test_one_frontend_short_way_is_the_general_way(spec, data):
    # Backends for the service's ports (some left out), in both families.
    keys = {(p.name, p.protocol, family) for p in spec.ports for family in (4, 6)}
    backends = {k: data.draw(choice) for k in sorted(keys) if data.draw(st.integers(0, 3))}
    assert translate._service_frontends(spec, backends, NODE) == translate._all_frontends(spec, backends, NODE)


def test_the_short_way_serves_the_usual_service():
    """One TCP port on one ClusterIP, internal policy Local: its local backends only."""
    both = (Backend("10.244.0.1", 8080), Backend("10.244.0.2", 8080, local=True))
    spec = translate._ServiceSpec("ClusterIP", (("10.96.0.10", 4, 0x0A60000A),), (4,),
                                  (translate._ServicePort("http", Protocol.TCP, 80, 0),), (), (), (), False, True, 0, 0, False, False)
    (frontend,) = translate._service_frontends(spec, {("http", Protocol.TCP, 4): (both, both[1:])}, NODE)
    assert (frontend.address, frontend.port, frontend.backends, frontend.internal_local) == ("10.96.0.10", 80, both[1:], True)
