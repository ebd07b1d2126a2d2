"""HostPort end to end: Pod objects go through the agent's object store (translate_pod, the
"pod:<name>" pseudo-service) to the service map writer and the plugins, and real traffic to
nodeIP:hostPort reaches the pod that declares it, at its containerPort.

- socklb (socklb_env.py): a pod in the hooked child cgroup, and the host, dial the node's
  addresses; nothing in the node namespace listens on a hostPort, so an answer from a pod
  proves the connect/sendmsg hooks translated it.
- tc_nodeport (tc_nodeport_env.py): an external client behind a router dials the node
  that runs the pod; node1's kernel has no listener there either.

Without the Pod (deleted, or finished) the same traffic is refused by the node's own kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.model import ServiceKey
from kpr.testing.fixtures import clear_after
from kpr.translate import object_ref

import socklb_env
import tc_nodeport_env
from socklb_env import NODE4, NODE6, Env, answers, socklb  # noqa: F401 - the module fixture
from tc_nodeport_env import CLIENT, CLIENT2, CLIENT6, NODE1_ETH1, NODES, Cluster

pytestmark = pytest.mark.kernel

N1, N1_6, N2 = NODES["node1"]["addr"], NODES["node1"]["addr6"], NODES["node2"]["addr"]


# Each module-wide set-up forgets the Pods and services of the test that used it.
_clean_socklb = clear_after("socklb")
_clean_np = clear_after("np")


def hostport(host_port: int, protocol: str = "TCP", host_ip: str = "") -> dict:
    """A container port with a hostPort; the container port is the pods' server port (8080)."""
    port = {"containerPort": socklb_env.PORT, "hostPort": host_port, "protocol": protocol}
    return {**port, "hostIP": host_ip} if host_ip else port


def pod(name: str, addrs: tuple[str, str], *ports: dict, node: str = "node1", phase: str = "Running") -> dict:
    """A Pod as the API serves it: scheduled on `node`, dual-stack, one container with `ports`."""
    ip4, ip6 = addrs
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "server", "ports": list(ports)}]},
        "status": {"phase": phase, "podIP": ip4, "podIPs": [{"ip": ip4}, {"ip": ip6}]},
    }


def finished(obj: dict) -> dict:
    return {**obj, "status": {**obj["status"], "phase": "Succeeded"}}


def errors(rows: list[dict]) -> list[str]:
    return [r.get("error", f"answered {r}") for r in rows]


# ---------------------------------------------------------------- socklb: pods and the host


def be(name: str) -> tuple[str, str]:
    return socklb_env.PODS[name]


def test_pod_and_host_reach_a_host_port_through_socklb(socklb: Env) -> None:
    web = pod("web", be("be2"), hostport(9080), hostport(9080, "UDP"))
    # the control: nothing answers at nodeIP:hostPort before the Pod is there
    assert errors(socklb.client("tcp", NODE4, 9080, 1)) == ["ECONNREFUSED"]
    socklb.feed(web)
    assert ServiceKey("default", "pod:web") in socklb.applied, "the store publishes the Pod as pod:<name>"
    before = socklb.plugin.stats()

    for node_ip in (NODE4, NODE6):
        rows = socklb.client("tcp", node_ip, 9080, 3)
        assert answers(rows) == ["be2"] * 3, f"pod -> {node_ip}:9080/TCP"
        assert all(r["peer"] == [node_ip, 9080] for r in rows), "getpeername shows nodeIP:hostPort"
        rows = socklb.client("udp", node_ip, 9080, 2)
        assert answers(rows) == ["be2"] * 2, f"pod -> {node_ip}:9080/UDP"
        assert all(r["src"] == [node_ip, 9080] for r in rows), "recvfrom's source is nodeIP:hostPort"
        assert answers(socklb.client("udpconn", node_ip, 9080, 1)) == ["be2"]
    assert answers(socklb.client("tcp", NODE4, 9080, 2, ns="node")) == ["be2"] * 2, "the host too"

    after = socklb.plugin.stats()
    assert after["connect"] - before["connect"] == 3 + 3 + 1 + 1 + 2
    assert after["sendmsg"] - before["sendmsg"] == 2 + 2
    # the container port is served at the hostPort only: the pod's port at the node is not
    assert errors(socklb.client("tcp", NODE4, socklb_env.PORT, 1)) == ["ECONNREFUSED"]


def test_a_host_ip_limits_the_host_port_to_that_node_address(socklb: Env) -> None:
    socklb.feed(
        pod("only4", be("be1"), hostport(9081, host_ip=NODE4), hostport(9081, "UDP", host_ip=NODE4)),
        pod("only6", be("be3"), hostport(9082, host_ip=NODE6)),
        pod("unset", be("be2"), hostport(9083, host_ip="0.0.0.0")),
    )
    assert answers(socklb.client("tcp", NODE4, 9081, 2)) == ["be1"] * 2
    assert answers(socklb.client("udpconn", NODE4, 9081, 1)) == ["be1"]
    # be1 is dual-stack, but its hostPort is bound to the IPv4 node address only
    assert errors(socklb.client("tcp", NODE6, 9081, 1)) == ["ECONNREFUSED"]
    assert errors(socklb.client("udpconn", NODE6, 9081, 1)) == ["ECONNREFUSED"]
    assert answers(socklb.client("tcp", NODE6, 9082, 2)) == ["be3"] * 2
    assert errors(socklb.client("tcp", NODE4, 9082, 1)) == ["ECONNREFUSED"]
    # hostIP 0.0.0.0 is the same as none: every node address of each pod family
    rows = socklb.client("tcp", NODE4, 9083, 1) + socklb.client("tcp", NODE6, 9083, 1)
    assert answers(rows) == ["be2"] * 2


def test_a_host_ip_that_is_not_a_node_address_captures_nothing(socklb: Env) -> None:
    # Regression: such a hostPort was translated like any frontend, so one pod could take every
    # other pod's traffic to an outside address (as CVE-2020-8554 with ExternalIPs).
    outside = ("198.51.100.53", "fd51::53")
    socklb.feed(pod("thief", be("be1"), *(hostport(9085, proto, ip) for ip in outside for proto in ("TCP", "UDP"))))
    for host in outside:
        for mode in ("tcp", "udpconn"):
            rows = socklb.client(mode, host, 9085, 1)
            assert "error" in rows[0], f"{mode} to {host}:9085 was captured: {rows}"
    for mode in ("tcp", "udpconn"):
        assert "error" in socklb.client(mode, "198.51.100.53", 9085, 1, ns="node")[0], "nor the host's"
    assert ServiceKey("default", "pod:thief") not in socklb.applied


def test_socklb_stops_translating_when_the_pod_goes_or_finishes(socklb: Env) -> None:
    web = pod("short", be("be3"), hostport(9084), hostport(9084, "UDP"))
    key = ServiceKey("default", "pod:short")
    socklb.feed(web)
    rows = socklb.client("tcp", NODE4, 9084, 1) + socklb.client("udpconn", NODE6, 9084, 1)
    assert answers(rows) == ["be3"] * 2, "TCP at the IPv4 and UDP at the IPv6 node address"

    socklb.feed(finished(web))
    assert key not in socklb.applied, "a Succeeded pod serves nothing"
    # not translated any more: the node's own kernel refuses (nothing listens on the hostPort)
    for node_ip in (NODE4, NODE6):
        assert errors(socklb.client("tcp", node_ip, 9084, 1)) == ["ECONNREFUSED"], node_ip
        assert errors(socklb.client("udpconn", node_ip, 9084, 1)) == ["ECONNREFUSED"], node_ip

    socklb.feed(web)  # running again (a new pod of the same name)
    assert answers(socklb.client("tcp", NODE4, 9084, 1)) == ["be3"]
    socklb.feed(gone=[object_ref(web)])
    assert key not in socklb.applied
    assert errors(socklb.client("tcp", NODE4, 9084, 1) + socklb.client("tcp", NODE6, 9084, 1)) == ["ECONNREFUSED"] * 2
    assert errors(socklb.client("tcp", NODE4, 9084, 1, ns="node")) == ["ECONNREFUSED"], "the host is not served either"


# ---------------------------------------------------------------- tc_nodeport: external clients


@pytest.fixture(scope="module")
def np(require_kernel: None) -> Iterator[Cluster]:
    with tc_nodeport_env.cluster(conntrack_size=65536) as c:
        yield c


def tc_pod(name: str, *ports: dict, **kw: Any) -> dict:
    node, ip4, ip6 = tc_nodeport_env.PODS[name]
    return pod(name, (ip4, ip6), *ports, node=node, **kw)


def seen(rows: list[dict]) -> list[tuple[str, str]]:
    """(pod, client address it saw) of each answer."""
    return [(name, peer) for name, _, peer in (a.partition(" ") for a in tc_nodeport_env.answers(rows))]


def client(np: Cluster, *args: Any, ns: str = "cl") -> list[dict]:
    return tc_nodeport_env.client(np.topo, *args, ns=ns)


def test_external_client_reaches_a_host_port_on_the_pods_node(np: Cluster) -> None:
    assert errors(client(np, "tcp", N1, 9090, 1)) == ["ECONNREFUSED"], "the control: node1 itself serves nothing there"
    np.feed(tc_pod("p1a", hostport(9090), hostport(9090, "UDP")), tc_pod("p2a", hostport(9091)))
    before = np.stats("node1")

    assert seen(client(np, "tcp", N1, 9090, 3)) == [("p1a", CLIENT)] * 3, "a local pod keeps the client's address"
    assert seen(client(np, "tcp", N1_6, 9090, 2)) == [("p1a", CLIENT6)] * 2
    assert seen(client(np, "udp", N1, 9090, 2)) == [("p1a", CLIENT)] * 2
    assert seen(client(np, "udp", N1_6, 9090, 1)) == [("p1a", CLIENT6)]
    assert seen(client(np, "tcp", NODE1_ETH1, 9090, 2, ns="cl2")) == [("p1a", CLIENT2)] * 2, "every node address"
    after = np.stats("node1")
    assert after["new_local"] - before["new_local"] >= 10, (before, after)

    # a hostPort is served by the node its pod runs on, and nowhere else
    assert seen(client(np, "tcp", N2, 9091, 2)) == [("p2a", CLIENT)] * 2
    assert errors(client(np, "tcp", N1, 9091, 1)) == ["ECONNREFUSED"]
    assert errors(client(np, "tcp", N2, 9090, 1)) == ["ECONNREFUSED"]


def test_a_host_ip_limits_the_host_port_on_the_external_path(np: Cluster) -> None:
    np.feed(tc_pod("p1b", hostport(9092, host_ip=N1), hostport(9092, "UDP", host_ip=N1)))
    assert seen(client(np, "tcp", N1, 9092, 2)) == [("p1b", CLIENT)] * 2
    assert seen(client(np, "udp", N1, 9092, 1)) == [("p1b", CLIENT)]
    # node1's other addresses, on eth1 and IPv6, do not carry it
    assert errors(client(np, "tcp", NODE1_ETH1, 9092, 1, ns="cl2")) == ["ECONNREFUSED"]
    assert errors(client(np, "udp", NODE1_ETH1, 9092, 1, ns="cl2")) == ["ECONNREFUSED"]
    assert errors(client(np, "tcp", N1_6, 9092, 1)) == ["ECONNREFUSED"]
    # an address routed to node1 that is not node1's own is no hostIP it can serve
    np.feed(tc_pod("p1a", hostport(9094, host_ip="203.0.113.40")))
    assert "error" in client(np, "tcp", "203.0.113.40", 9094, 1, "timeout=1")[0]
    assert "pod:p1a" not in {k.name for k in np.stores["node1"].services}


def test_tc_nodeport_stops_translating_when_the_pod_goes_or_finishes(np: Cluster) -> None:
    web = tc_pod("p1a", hostport(9093), hostport(9093, "UDP"))
    np.feed(web)
    assert seen(client(np, "tcp", N1, 9093, 1) + client(np, "udp", N1, 9093, 1)) == [("p1a", CLIENT)] * 2

    np.feed(finished(web))
    assert ServiceKey("default", "pod:p1a") not in np.stores["node1"].services
    # node1's kernel answers for itself again: RST for TCP, port unreachable for UDP
    assert errors(client(np, "tcp", N1, 9093, 1) + client(np, "udp", N1, 9093, 1)) == ["ECONNREFUSED"] * 2
    assert errors(client(np, "tcp", N1_6, 9093, 1)) == ["ECONNREFUSED"]

    np.feed(web)
    assert seen(client(np, "tcp", N1, 9093, 1)) == [("p1a", CLIENT)]
    np.feed(gone=[object_ref(web)])
    assert errors(client(np, "tcp", N1, 9093, 1) + client(np, "udp", N1, 9093, 1)) == ["ECONNREFUSED"] * 2
