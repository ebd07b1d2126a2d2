"""host_routing in the real agent (`kpr run` in the node's namespace, files source): pods on a
bridge are learned from the Pod objects in the manifests (kpr_pods_changed), a pod outside the
socket hooks reaches a ClusterIP per packet, a Pod removed from the manifests is forgotten, and
`kpr cleanup` takes every program off the devices afterwards."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from kpr import api
from kpr.bpf import links
from kpr.bpf.cleanup import cleanup
from kpr.testing.netns import Topology
from kpr.testing.waiting import wait_for

from host_routing_env import CLIENT, NODE, NODE6, PODS, PORT, answers, build_topology, client
from socklb_env import AgentRig

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CIP = "10.96.88.10"


def pod_manifest(name: str) -> str:
    ip4, ip6 = PODS[name]
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n"
            f"spec: {{nodeName: node, containers: [{{name: c, image: x}}]}}\n"
            f"status: {{phase: Running, podIP: {ip4}, podIPs: [{{ip: {ip4}}}, {{ip: '{ip6}'}}]}}\n")


def manifests(pods: tuple[str, ...]) -> str:
    svc = ("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
           f"spec: {{clusterIP: {CIP}, ports: [{{name: http, port: 80, targetPort: {PORT}}}]}}\n"
           "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
           "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n"
           f"addressType: IPv4\nports: [{{name: http, port: {PORT}, protocol: TCP}}]\n"
           f"endpoints:\n  - addresses: [{PODS['p2'][0]}]\n    nodeName: node\n")
    return "---\n".join([svc, *(pod_manifest(p) for p in pods)])


def test_agent_learns_bridge_pods_from_the_source_and_serves_clusterips_per_packet(
    pin_dir: Path, topology: Topology
) -> None:
    pin, topo = pin_dir, topology
    with tempfile.TemporaryDirectory(prefix="kpr-hr-agent-") as work:
        build_topology(topo, pods=("p1", "p2", "b1"))
        config = (f"node: {{name: node, addresses: [{NODE}, \"{NODE6}\"], devices: [eth0]}}\n"
                  "plugins: {host_routing: {enabled: true, keepAttachedOnStop: true}}\n")
        rig = AgentRig(topo, pin, Path(work), config, manifests(("b1", "p1")), agent_ns="node", load_ns="cl")
        rig.write_config()
        try:
            rig.start()

            def hr() -> dict:
                return api.get(Path(work) / "kpr.sock", "/v1/status", timeout=10)["plugins"]["host_routing"]

            wait_for(lambda: PODS["b1"][0] in hr()["details"]["pods"], timeout=20, what="b1 learned from its Pod")
            st = hr()
            assert st["healthy"], st["message"]
            assert st["details"]["pods"][PODS["b1"][0]]["learnedFrom"] == "source"
            assert st["details"]["pods"][PODS["p1"][0]]["learnedFrom"] == "route"
            before = st["counters"]["redirect"]
            assert answers(client(topo, "tcp", PODS["b1"][0], PORT, 5, ns="cl")) == [f"b1 {CLIENT}"] * 5
            # counters are read through another process's API: wait for the state, do not time it
            wait_for(lambda: hr()["counters"]["redirect"] - before >= 10, timeout=20,
                     what="b1's packets to the bridge with the route's MACs", show=lambda: hr()["counters"])

            # b1 is outside any socket hook (no socklb here): its ClusterIP works per packet
            before = hr()["counters"]["service_new"]
            assert answers(client(topo, "tcp", CIP, 80, 3, ns="b1")) == [f"p2 {PODS['b1'][0]}"] * 3
            wait_for(lambda: hr()["counters"]["service_new"] - before >= 3, timeout=20,
                     what="3 per-packet ClusterIP flows counted", show=lambda: hr()["counters"])

            # the Pod leaves the manifests: forgotten; its traffic is the stack's again
            (Path(work) / "manifests" / "services.yaml").write_text(manifests(("p1",)))
            wait_for(lambda: PODS["b1"][0] not in hr()["details"]["pods"], timeout=20, what="b1 forgotten")
            before = hr()["counters"]["pass_not_pod"]
            assert answers(client(topo, "tcp", PODS["b1"][0], PORT, 2, ns="cl")) == [f"b1 {CLIENT}"] * 2
            wait_for(lambda: hr()["counters"]["pass_not_pod"] - before >= 2, timeout=20,
                     what="b1's packets left to the stack", show=lambda: hr()["counters"])
        finally:
            rig.kill()
            with topo["node"].enter():
                cleanup(pin)  # `kpr cleanup`
                for dev in ("eth0", "lxcp1"):
                    assert links.query(socket.if_nametoindex(dev), links.ATTACH_TCX_INGRESS) == [], dev
