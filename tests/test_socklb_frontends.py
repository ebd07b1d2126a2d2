"""socklb's view of a service's frontends for its reverse-NAT map (no kernel needed)."""

from __future__ import annotations

from kpr.bpf import maps as M
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.plugins.socklb.plugin import _frontends

CIP = M.addr_to_bytes("10.96.0.30")


def web() -> Service:
    backends = (Backend("10.244.0.5", 8080), Backend("10.244.0.6", 8080))
    return Service(ServiceKey("default", "web"), (
        Frontend(FrontendType.CLUSTER_IP, "10.96.0.30", 80, Protocol.TCP, backends),
        Frontend(FrontendType.NODE_PORT, "0.0.0.0", 30080, Protocol.TCP, backends),
        Frontend(FrontendType.CLUSTER_IP, "10.96.0.30", 80, Protocol.SCTP, backends),  # not the map's
    ))


def test_every_tcp_and_udp_frontend_with_its_backends() -> None:
    bes = frozenset({(M.addr_to_bytes("10.244.0.5"), M.htons(8080)), (M.addr_to_bytes("10.244.0.6"), M.htons(8080))})
    assert _frontends(web()) == {(CIP, M.htons(80), 6): bes, (None, M.htons(30080), 6): bes}


def test_only_the_frontends_asked_for() -> None:
    # kpr_sync_complete asks for the frontends some socket in the map dialled: the others'
    # backend sets are never made (every service's at 20k services: 30 MB of RSS at ready).
    nodeport = (None, M.htons(30080), 6)
    assert set(_frontends(web(), {nodeport, (CIP, M.htons(81), 6)})) == {nodeport}
    assert _frontends(web(), set()) == {}
