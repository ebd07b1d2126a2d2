"""`kpr monitor` on the tc NodePort path (topology in tc_nodeport_env.py): a scripted sequence
of new flows and drops from the external client arrives in order, with how each flow was
translated and the drop counters' reasons."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.monitor import Monitor

from tc_nodeport_env import CLIENT, NODES, PODS, Cluster, client, one_device_cluster
from tc_nodeport_env import on_node_address as _svc

pytestmark = pytest.mark.kernel

N1 = NODES["node1"]["addr"]


@pytest.fixture(scope="module")
def env() -> Iterator[Cluster]:
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
