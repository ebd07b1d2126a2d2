"""`kpr monitor` on the tc NodePort path (topology in tc_nodeport_env.py): a scripted sequence
of new flows and drops from the external client arrives in order, with how each flow was
translated and the drop counters' reasons; then the drops off the service path (an announced
address on a port it does not serve, a DSR packet too big for the route with DF clear) and a
malformed packet (type pass: left to the stack)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.model import Protocol
from kpr.monitor import Monitor

from tc_nodeport_env import CLIENT, NODES, PODS, PY, Cluster, client, loadbalancer, one_device_cluster
from tc_nodeport_env import on_node_address as _svc

pytestmark = pytest.mark.kernel

UDP = Protocol.UDP

N1 = NODES["node1"]["addr"]
VIP = "203.0.113.30"

# A TCP segment cut short after its source port: the IP header is sound (the router forwards
# it), the TCP header is not.
TRUNCATED_TCP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.sendto(b"\x13\x88", (sys.argv[1], 0))
"""
# One UDP datagram of 1496 bytes (IP) with DF clear from a fixed source port: it fits every
# link, but not with the 8-byte DSR option added.
BIG_NO_DF = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear
s.bind(("0.0.0.0", int(sys.argv[3])))
s.sendto(b"x" * 1468, (sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def env(require_kernel: None) -> Iterator[Cluster]:
    with one_device_cluster() as c:
        yield c


def test_new_flows_and_drops_in_order(env: Cluster) -> None:
    env.apply(_svc("local", 30200, "p1a"))
    env.apply(_svc("remote", 30201, "p2a"))
    env.apply(_svc("nolocal", 30202, "p2b", external_local=True))
    env.apply(_svc("ranged", 30203, "p1a", source_ranges=("192.0.2.0/24",)))
    env.apply(_svc("empty", 30204))
    with Monitor(env.pins["node1"]) as m:
        for port, sport in ((30200, 5000), (30201, 5001), (30202, 5002), (30203, 5003), (30204, 5004)):
            client(env.topo, "udp", N1, port, 1, f"sport={sport}", "timeout=0.3")
        events = m.collect(5)
        events += m.poll(200)
    p1a, p2a = PODS["p1a"][1], PODS["p2a"][1]
    got = [(e.type, e.hook, e.reason, e.client, e.frontend, e.backend) for e in events]
    assert got == [
        ("new", "tc", "local", f"{CLIENT}:5000", f"{N1}:30200", f"{p1a}:8080"),
        ("new", "tc", "snat", f"{CLIENT}:5001", f"{N1}:30201", f"{p2a}:8080"),
        ("drop", "tc", "no_local_backend", f"{CLIENT}:5002", f"{N1}:30202", None),
        ("drop", "tc", "source_range", f"{CLIENT}:5003", f"{N1}:30203", None),
        ("drop", "tc", "no_backend", f"{CLIENT}:5004", f"{N1}:30204", None),
    ]


def test_drops_off_the_service_path_and_malformed_packets(env: Cluster) -> None:
    env.apply(loadbalancer("mon-vip", VIP, "p1a", proto=UDP, port=53))
    env.apply(_svc("mon-dsr", 30205, "p2a", annotations=(("service.kpr.io/lb-mode", "dsr"),)))
    before = env.stats("node1")
    with Monitor(env.pins["node1"]) as m:
        client(env.topo, "udp", VIP, 54, 1, "sport=5005", "timeout=0.3")  # the VIP serves 53 only
        env.topo.run("cl", [PY, "-c", TRUNCATED_TCP, N1])
        env.topo.run("cl", [PY, "-c", BIG_NO_DF, N1, "30205", "5006"])
        events = m.collect(4)
        events += m.poll(200)
    after = env.stats("node1")
    p2a = PODS["p2a"][1]
    got = [(e.type, e.hook, e.reason, e.client, e.frontend, e.backend) for e in events]
    assert got == [
        ("drop", "tc", "vip_unserved", f"{CLIENT}:5005", f"{VIP}:54", None),
        ("pass", "tc", "malformed", f"{CLIENT}:0", f"{N1}:0", None),
        ("new", "tc", "dsr", f"{CLIENT}:5006", f"{N1}:30205", f"{p2a}:8080"),
        ("drop", "tc", "mtu", f"{CLIENT}:5006", f"{N1}:30205", None),
    ]
    assert events[1].protocol == "TCP"
    # the counters of the same names moved with them
    for counter in ("drop_vip_unserved", "malformed", "drop_mtu"):
        assert after[counter] == before[counter] + 1, counter
