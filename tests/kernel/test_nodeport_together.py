"""NodePort plugins together, through a real agent (files source, bus, facilities) in node1's
namespace of tc_nodeport_env's two-node cluster, with real traffic from the external client:

  - tc_nodeport and xdp_nodeport at once: XDP takes every packet first and serves what it can
    (new flows, remote backends by SNAT and their replies), tc behind it delivers to the local
    backend and gives its replies the frontend's address; one NodePort facility owns the maps,
    the collector and the health checks; each plugin counts only its own program's packets;
  - every built-in plugin on one node (socklb, tc_nodeport, xdp_nodeport, host_routing,
    announce_arp, announce_bgp with bird on the router, lb_ipam): a ClusterIP through the
    socket hooks, a NodePort and an lb_ipam address from outside, `kpr status` ready and healthy.
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr import api
from kpr.bpf import maps as M
from kpr.bpf.cleanup import cleanup, scratch_pin_dir
from kpr.nodeport import datapath as D
from kpr.testing import echo
from kpr.testing.cgroup import child_cgroup
from kpr.testing.netns import Topology

from tc_nodeport_env import (
    CLIENT,
    NODES,
    PODS,
    build_topology,
    client,
    dev_with,
    full_checksums,
    name_and_peer,
    peer_pass,
)

pytestmark = pytest.mark.kernel

N1, RT1 = NODES["node1"]["addr"], NODES["node1"]["rt"]
CLUSTER_IP, NODE_PORT, HC_PORT = "10.96.9.10", 30099, 32199
POOL = "203.0.113.32/28"  # inside the router's route for announced addresses (to node1)


def _manifests() -> str:
    def slice_(name: str, svc: str, pods: tuple[str, ...]) -> str:
        eps = "".join(f"  - addresses: [{PODS[p][1]}]\n    nodeName: {PODS[p][0]}\n" for p in pods)
        return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                f"metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\n"
                f"addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}")

    return "---\n".join([
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n"
        f"spec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n"
        f"  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]\n",
        slice_("web-1", "web", ("p1a", "p2a")),
        # its own mode, other than tc_nodeport's default (dsr in the first test): the one frontend
        # table must keep it, whatever XDP's default (snat)
        "apiVersion: v1\nkind: Service\n"
        "metadata: {name: lb, namespace: default, annotations: {service.kpr.io/lb-mode: snat}}\n"
        "spec:\n  type: LoadBalancer\n  clusterIP: 10.96.9.11\n  externalTrafficPolicy: Local\n"
        f"  healthCheckNodePort: {HC_PORT}\n"
        "  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30098}]\n",
        slice_("lb-1", "lb", ("p1b",)),
    ])


@contextlib.contextmanager
def _agent(topo: Topology, pin: Path, work: Path, plugins: str) -> Iterator[Any]:
    """`kpr run` in node1's namespace (socklb_env.AgentRig) with `plugins` (YAML of the plugins
    section), started and ready; stopped (SIGTERM) and everything it attached removed
    (`kpr cleanup`) afterwards."""
    import signal

    from socklb_env import AgentRig

    config = f"node: {{name: node1, addresses: [{N1}], devices: [eth0]}}\nservice: {{clusterCIDR: [10.96.0.0/16]}}\n" + plugins
    rig = AgentRig(topo, pin, work, config, _manifests(), agent_ns="node1", load_ns="cl")
    rig.write_config()
    try:
        rig.start(timeout=120)
        yield rig
        rig.stop(signal.SIGTERM)
        assert rig.proc is not None and rig.proc.returncode == 0, (work / "agent-1.log").read_text()[-3000:]
    finally:
        rig.kill()
        cleanup(pin)


def _status(work: Path) -> dict:
    """`kpr status --json` of the running agent (its API socket)."""
    return api.get(work / "kpr.sock", "/v1/status", timeout=10)


def _reach(topo: Topology, host: str, port: int, want: set[tuple[str, str]], tries: int = 10) -> set[tuple[str, str]]:
    """(backend, client address it saw) over connections from the external client, until `want` is seen."""
    seen: set[tuple[str, str]] = set()
    for _ in range(tries):
        seen.update(name_and_peer(client(topo, "tcp", host, port, 6)))
        if want <= seen:
            break
    return seen


@pytest.fixture
def cluster_for_xdp(kernel_headers: Path) -> Iterator[Topology]:
    """The cluster with node1's pods p1a, p1b and node2's p2a, set up for XDP on veths: full
    checksums from every sender, an XDP program on the router's side of node1's link."""
    with Topology() as topo:
        build_topology(topo, second_device=False, pods=("p1a", "p1b", "p2a"))
        full_checksums(topo, "cl", "p1a", "p1b", "p2a")
        with peer_pass(topo, "rt", dev_with(topo, "rt", RT1)):
            yield topo


def _delta(before: dict, after: dict, key: str) -> float:
    return after["counters"].get(key, 0) - before["counters"].get(key, 0)


def test_tc_and_xdp_nodeport_together(cluster_for_xdp: Topology, tmp_path: Path) -> None:
    topo = cluster_for_xdp
    # tc's default dsr is never used: XDP in front source-NATs every new flow (node2 runs no kpr)
    plugins = ("plugins:\n  tc_nodeport: {enabled: true, mode: dsr}\n"
               "  xdp_nodeport: {enabled: true, xdpMode: auto}\n")
    with scratch_pin_dir("kpr-np-both") as pin, _agent(topo, pin, tmp_path, plugins):
        st = _status(tmp_path)
        assert st["ready"], st
        names = [p["name"] for p in api.get(tmp_path / "kpr.sock", "/v1/plugins", timeout=10)]
        assert names.count("nodeport") == 1, names
        before = st["plugins"]
        # the local pod keeps the client's address, the remote one sees node1's (SNAT)
        seen = _reach(topo, N1, NODE_PORT, {("p1a", CLIENT), ("p2a", N1)})
        assert seen == {("p1a", CLIENT), ("p2a", N1)}, seen
        after = _status(tmp_path)["plugins"]
        xdp, tc, shared = after["xdp_nodeport"], after["tc_nodeport"], after["nodeport"]
        assert xdp["healthy"] and tc["healthy"] and shared["healthy"], (xdp, tc, shared)
        # XDP serves what it can: every new flow, the remote backend's replies
        assert _delta(before["xdp_nodeport"], xdp, "new_local") >= 1, xdp["counters"]
        assert _delta(before["xdp_nodeport"], xdp, "new_snat") >= 1, xdp["counters"]
        assert _delta(before["xdp_nodeport"], xdp, "reply_snat") >= 1, xdp["counters"]
        # tc serves the local backend's replies (XDP has no egress hook) ...
        assert _delta(before["tc_nodeport"], tc, "reply_revnat") >= 1, tc["counters"]
        # ... and counts only its own packets: it balanced nothing, XDP did
        assert _delta(before["tc_nodeport"], tc, "new_local") == 0, tc["counters"]
        assert _delta(before["tc_nodeport"], tc, "new_snat") == 0, tc["counters"]
        assert _delta(before["xdp_nodeport"], xdp, "reply_revnat") == 0, xdp["counters"]
        assert tc["details"]["statsMaps"] != xdp["details"]["statsMaps"]
        # one health-check listener for the eTP=Local service, served once for both plugins
        assert shared["details"]["healthChecks"] == {str(HC_PORT): {"service": "default/lb", "localEndpoints": 1}} or \
            shared["details"]["healthChecks"] == {HC_PORT: {"service": "default/lb", "localEndpoints": 1}}, shared
        r = client(topo, "http", N1, HC_PORT)[0]
        assert r["status"] == 200 and r["body"]["localEndpoints"] == 1, r
        assert shared["counters"]["gc_errors"] == 0
        # the frontend table holds the annotated service's mode, written once for both hooks
        with M.BpfMap.open_pinned(pin / D.FE_MAP) as fe:
            modes = {}
            for k, v in fe.items():
                a, port, proto = D.NP_FE_KEY.unpack(k)
                modes[(M.bytes_to_addr(a), M.ntohs(port), proto)] = D.MODE_NAMES[D.NP_FE.unpack(v)[0]]
        assert {(N1, 30098, 6), ("0.0.0.0", 30098, 6)} <= set(modes) and set(modes.values()) == {"snat"}, modes
        assert all(port == 30098 for _a, port, _p in modes), "only the annotated service's frontends"


@pytest.fixture
def bird_on_router(cluster_for_xdp: Topology, tmp_path: Path) -> Iterator[Any]:
    from bgp_env import Bird, BirdNeighbor

    bird = Bird(cluster_for_xdp["rt"], tmp_path / "bird", RT1, [BirdNeighbor("node1", RT1, N1)])
    bird.start()
    try:
        yield bird
    finally:
        bird.stop()


def test_every_builtin_plugin_on_one_node(cluster_for_xdp: Topology, bird_on_router: Any, tmp_path: Path) -> None:
    from bgp_env import LOCAL_ASN, ROUTER_ASN

    topo = cluster_for_xdp
    work = tmp_path / "agent"
    work.mkdir()
    with child_cgroup("kpr-np-all") as cg, scratch_pin_dir("kpr-np-all") as pin:
        plugins = textwrap.dedent(f"""
            plugins:
              socklb: {{enabled: true, cgroupPath: {cg}, keepAttachedOnStop: false}}
              tc_nodeport: {{enabled: true, mode: snat}}
              xdp_nodeport: {{enabled: true, xdpMode: auto}}
              host_routing: {{enabled: true}}
              announce_arp: {{enabled: true, interfaces: [eth0]}}
              announce_bgp: {{enabled: true, localASN: {LOCAL_ASN}, routerID: {N1},
                              peers: [{{address: {RT1}, asn: {ROUTER_ASN}}}]}}
              lb_ipam: {{enabled: true, pools: [{{name: vips, addresses: [{POOL}]}}]}}
            """)
        with _agent(topo, pin, work, plugins):
            # a ClusterIP, by the socket hooks, from a process of node1 in the agent's cgroup
            rows = echo.client(topo["node1"], "tcp", CLUSTER_IP, 80, 8, "timeout=2", cgroup=cg)
            assert {a.split()[0] for a in echo.answers(rows)} <= {"p1a", "p2a"} and len(rows) == 8, rows
            # a NodePort from outside, local and remote backends
            seen = _reach(topo, N1, NODE_PORT, {("p1a", CLIENT), ("p2a", N1)})
            assert seen == {("p1a", CLIENT), ("p2a", N1)}, seen
            # the LoadBalancer address lb_ipam gave, from outside
            rows = api.get(work / "kpr.sock", "/v1/services", timeout=10)
            lb_ips = {r["address"] for r in rows if r.get("service") == "default/lb" and r.get("type") == "LoadBalancer"}
            assert len(lb_ips) == 1, rows
            lb_ip = lb_ips.pop()
            assert lb_ip.startswith("203.0.113."), lb_ip
            assert set(name_and_peer(client(topo, "tcp", lb_ip, 80, 4))) == {("p1b", CLIENT)}
            # bird learned it from announce_bgp
            deadline = time.monotonic() + 30
            while f"{lb_ip}/32" not in bird_on_router.routes() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"{lb_ip}/32" in bird_on_router.routes(), bird_on_router.show("route", "all")
            st = _status(work)
            assert st["ready"], st
            unhealthy = {n: p.get("message") for n, p in st["plugins"].items() if not p.get("healthy")}
            assert not unhealthy, unhealthy
            expected = {"socklb", "tc_nodeport", "xdp_nodeport", "host_routing", "announce_arp", "announce_bgp",
                        "lb_ipam", "nodeport", "servicemaps"}
            assert expected <= set(st["plugins"]), sorted(st["plugins"])
