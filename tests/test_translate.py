"""Table-driven tests of kpr.translate: Kubernetes objects -> the service model.

Each case is a sentence saying what Kubernetes behaviour it pins, the input objects as
YAML documents (first the Service or Pod, then EndpointSlices / Endpoints), the node, and
the exact frontends expected, one line each, in the translation's order:

    "<type> <address>:<port>/<protocol> [flags] -> <backend>; <backend>"   ("-" for none)

with backends written "<address>:<port> [terminating] [node=<n>] [local] [zone=<z>]".
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass
from textwrap import dedent, indent

import pytest
import yaml

from kpr.model import (
    Backend,
    BackendState,
    Frontend,
    FrontendType,
    InvalidObject,
    NodeInfo,
    Service,
    ServiceKey,
)
from kpr.translate import (
    NO_RULES,
    AddressRules,
    canonical_ip,
    cluster_ips_of,
    endpoint_addresses_of,
    object_ref,
    service_key_of,
    translate_pod,
    translate_service,
    validate_object,
)

NODE = NodeInfo("node-a", ("192.168.1.10", "2001:db8::10"))


# --- describing results ----------------------------------------------------------------


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def describe_backend(b: Backend) -> str:
    parts = [hostport(b.address, b.port)]
    if b.state is BackendState.TERMINATING:
        parts.append("terminating")
    if b.node_name:
        parts.append(f"node={b.node_name}")
    if b.local:
        parts.append("local")
    if b.zone:
        parts.append(f"zone={b.zone}")
    return " ".join(parts)


def describe_frontend(f: Frontend) -> str:
    parts = [f.type.value, f"{hostport(f.address, f.port)}/{f.protocol.value}"]
    if f.port_name:
        parts.append(f"name={f.port_name}")
    if f.external_local:
        parts.append("eTP=Local")
    if f.internal_local:
        parts.append("iTP=Local")
    if f.affinity_timeout:
        parts.append(f"affinity={f.affinity_timeout}")
    if f.source_ranges:
        parts.append("ranges=" + ",".join(f.source_ranges))
    if f.health_check_node_port:
        parts.append(f"hc={f.health_check_node_port}")
    backends = "; ".join(describe_backend(b) for b in f.backends) or "-"
    return " ".join(parts) + " -> " + backends


def summarize(service: Service | None) -> list[str] | None:
    return None if service is None else [describe_frontend(f) for f in service.frontends]


# --- building inputs -------------------------------------------------------------------


def block(text: str, prefix: str = "") -> str:
    """A YAML block written at any indentation in the source, re-indented by prefix."""
    return indent(dedent(text).strip("\n") + "\n", prefix)


def svc(spec: str, status: str = "", metadata: str = "") -> str:
    """The Service shop/web with the given spec, status and extra metadata blocks."""
    text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n"
    text += block(metadata, "  ") if metadata else ""
    text += "spec:\n" + block(spec, "  ")
    return text + ("status:\n" + block(status, "  ") if status else "")


def eps(
    body: str, name: str = "web-1", family: str = "IPv4", service: str = "web", ns: str = "shop"
) -> str:
    """An EndpointSlice of service `service`; body holds its ports and endpoints."""
    labels = f"{{kubernetes.io/service-name: {service}}}"
    return (
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        f"metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n"
        f"addressType: {family}\n" + block(body)
    )


def legacy(body: str) -> str:
    """The legacy Endpoints object of shop/web; body holds its subsets."""
    return "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: shop}\n" + block(body)


def load(docs: list[str]) -> tuple[dict, list[dict], dict | None]:
    """(first object, EndpointSlices, Endpoints) from YAML documents."""
    objs = [yaml.safe_load(d) for d in docs]
    slices = [o for o in objs[1:] if o["kind"] == "EndpointSlice"]
    endpoints = [o for o in objs[1:] if o["kind"] == "Endpoints"]
    return objs[0], slices, endpoints[0] if endpoints else None


@dataclass
class Case:
    id: str
    description: str
    objects: list[str]
    expected: list[str] | None
    node: NodeInfo = NODE
    proxy_name: str = ""

    def __str__(self) -> str:
        return self.id


SLICE_8080 = eps("""
    ports: [{port: 8080}]
    endpoints:
    - {addresses: [10.1.0.1], nodeName: node-a}
    - {addresses: [10.1.0.2], nodeName: node-b}
""")
BACKENDS_8080 = "10.1.0.1:8080 node=node-a local; 10.1.0.2:8080 node=node-b"
# Every combination of endpoint conditions that matters.
CONDITIONS_SLICE = eps("""
    ports: [{port: 80}]
    endpoints:
    - {addresses: [10.1.0.1]}
    - {addresses: [10.1.0.2], conditions: {}}
    - {addresses: [10.1.0.3], conditions: {ready: false, serving: true, terminating: true}}
    - {addresses: [10.1.0.4], conditions: {ready: false, serving: false, terminating: true}}
    - {addresses: [10.1.0.5], conditions: {ready: false, terminating: true}}
    - {addresses: [10.1.0.6], conditions: {ready: false, serving: true, terminating: false}}
    - {addresses: [10.1.0.7], conditions: {ready: false}}
    - {addresses: [10.1.0.8], conditions: {ready: true, serving: true, terminating: false}}
    - {addresses: [10.1.0.9], conditions: {terminating: true}}
""")
NOT_READY_SLICE = eps("""
    ports: [{port: 80}]
    endpoints:
    - {addresses: [10.1.0.1], conditions: {ready: false}}
    - {addresses: [10.1.0.2], conditions: {ready: false, serving: true, terminating: true}}
""")
# Topology-aware routing: this node is in zone z1. Endpoint 10.1.0.3 lives in z2 but is
# hinted for z1 and z3, so hints, not zones, decide.
ZONED = NodeInfo("node-a", ("192.168.1.10", "2001:db8::10"), zone="z1")
TOPOLOGY_SLICE = eps("""
    ports: [{port: 80}]
    endpoints:
    - {addresses: [10.1.0.1], nodeName: node-b, zone: z1, hints: {forZones: [{name: z1}]}}
    - {addresses: [10.1.0.2], nodeName: node-c, zone: z2, hints: {forZones: [{name: z2}]}}
    - addresses: [10.1.0.3]
      nodeName: node-d
      zone: z2
      hints: {forZones: [{name: z3}, {name: z1}]}
""")
IN_Z1 = "10.1.0.1:80 node=node-b zone=z1; 10.1.0.3:80 node=node-d zone=z2"
ALL_ZONES = "10.1.0.1:80 node=node-b zone=z1; 10.1.0.2:80 node=node-c zone=z2; " + (
    "10.1.0.3:80 node=node-d zone=z2"
)
# A local endpoint the hints send to z2, a remote one hinted for z1, a remote one for z2.
LOCAL_HINTED_ELSEWHERE_SLICE = eps("""
    ports: [{port: 80}]
    endpoints:
    - {addresses: [10.1.0.1], nodeName: node-a, zone: z1, hints: {forZones: [{name: z2}]}}
    - {addresses: [10.1.0.2], nodeName: node-b, zone: z1, hints: {forZones: [{name: z1}]}}
    - {addresses: [10.1.0.3], nodeName: node-c, zone: z2, hints: {forZones: [{name: z2}]}}
""")
TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS = "service.kubernetes.io/topology-aware-hints"
PROXY_LABEL = "service.kubernetes.io/service-proxy-name"
RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"

SERVICE_CASES = [
    Case(
        "clusterip-basic",
        "A ClusterIP service gets one ClusterIP frontend whose backends are the ready slice "
        "endpoints, numerically sorted, local when their nodeName is this node, with zone.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{port: 80, targetPort: 8080}]
            """),
            eps("""
                ports: [{port: 8080}]
                endpoints:
                - {addresses: [10.1.0.10], nodeName: node-b, zone: z2}
                - {addresses: [10.1.0.9], nodeName: node-a, zone: z1, conditions: {ready: true}}
            """),
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> 10.1.0.9:8080 node=node-a local zone=z1; "
            "10.1.0.10:8080 node=node-b zone=z2"
        ],
    ),
    Case(
        "protocols",
        "Ports match slice ports on name and protocol; protocol defaults to TCP; UDP and SCTP "
        "are carried through.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports:
                - {name: dns, port: 53, protocol: UDP}
                - {name: dns-tcp, port: 53}
                - {name: sig, port: 2905, protocol: SCTP}
            """),
            eps("""
                ports:
                - {name: dns, port: 5353, protocol: UDP}
                - {name: dns-tcp, port: 5353, protocol: TCP}
                - {name: sig, port: 2905, protocol: SCTP}
                endpoints:
                - {addresses: [10.1.0.1]}
            """),
        ],
        [
            "ClusterIP 10.96.0.10:53/TCP name=dns-tcp -> 10.1.0.1:5353",
            "ClusterIP 10.96.0.10:53/UDP name=dns -> 10.1.0.1:5353",
            "ClusterIP 10.96.0.10:2905/SCTP name=sig -> 10.1.0.1:2905",
        ],
    ),
    Case(
        "port-protocol-mismatch",
        "A slice port with the right name but another protocol gives no backends; a slice "
        "port with another name neither.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports:
                - {name: dns, port: 53, protocol: UDP}
                - {name: web, port: 80}
            """),
            eps("""
                ports:
                - {name: dns, port: 53, protocol: TCP}
                - {name: http, port: 8080}
                endpoints:
                - {addresses: [10.1.0.1]}
            """),
        ],
        ["ClusterIP 10.96.0.10:53/UDP name=dns -> -", "ClusterIP 10.96.0.10:80/TCP name=web -> -"],
    ),
    Case(
        "named-port-two-slices",
        "A named targetPort resolves per EndpointSlice: two slices carrying the port name with "
        "different numbers give backends on each slice's own port.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{name: http, port: 80, targetPort: http}]
            """),
            eps("""
                ports: [{name: http, port: 8080, protocol: TCP}]
                endpoints: [{addresses: [10.1.0.2]}]
            """),
            eps(
                """
                ports: [{name: http, port: 9090, protocol: TCP}]
                endpoints: [{addresses: [10.1.0.1]}]
                """,
                name="web-2",
            ),
        ],
        ["ClusterIP 10.96.0.10:80/TCP name=http -> 10.1.0.1:9090; 10.1.0.2:8080"],
    ),
    Case(
        "nodeport",
        "A NodePort service is reachable on its nodePort at every node address of its family "
        "plus loopback, with the same backends as its ClusterIP.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
            """),
            SLICE_8080,
        ],
        [
            f"ClusterIP 10.96.0.10:80/TCP -> {BACKENDS_8080}",
            f"NodePort 127.0.0.1:30080/TCP -> {BACKENDS_8080}",
            f"NodePort 192.168.1.10:30080/TCP -> {BACKENDS_8080}",
        ],
    ),
    Case(
        "nodeport-no-node-addresses",
        "Without node addresses a NodePort is still reachable on loopback.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                ports: [{port: 80, nodePort: 30080}]
            """)
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> -", "NodePort 127.0.0.1:30080/TCP -> -"],
        node=NodeInfo("node-a"),
    ),
    Case(
        "dual-stack",
        "A dual-stack service gets a ClusterIP and NodePorts per family; each frontend gets "
        "only the backends of its own family (the slice's addressType).",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                clusterIPs: [10.96.0.10, 'fd00:96::a']
                ipFamilies: [IPv4, IPv6]
                ipFamilyPolicy: RequireDualStack
                ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
            """),
            eps("""
                ports: [{port: 8080}]
                endpoints: [{addresses: [10.1.0.1]}]
            """),
            eps(
                """
                ports: [{port: 8080}]
                endpoints: [{addresses: ['fd00:1:0:0::1']}]
                """,
                name="web-v6",
                family="IPv6",
            ),
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:8080",
            "ClusterIP [fd00:96::a]:80/TCP -> [fd00:1::1]:8080",
            "NodePort 127.0.0.1:30080/TCP -> 10.1.0.1:8080",
            "NodePort 192.168.1.10:30080/TCP -> 10.1.0.1:8080",
            "NodePort [::1]:30080/TCP -> [fd00:1::1]:8080",
            "NodePort [2001:db8::10]:30080/TCP -> [fd00:1::1]:8080",
        ],
    ),
    Case(
        "ipv6-only-families-from-cluster-ips",
        "Without ipFamilies the families come from the clusterIPs: an IPv6-only service gets "
        "NodePorts on IPv6 node addresses only; IPv6 text is normalised.",
        [
            svc("""
                type: NodePort
                clusterIP: 'FD00:96:0:0::A'
                ports: [{port: 80, nodePort: 30080}]
            """),
            eps(
                """
                ports: [{port: 80}]
                endpoints: [{addresses: ['fd00:1::0:2']}]
                """,
                family="IPv6",
            ),
        ],
        [
            "ClusterIP [fd00:96::a]:80/TCP -> [fd00:1::2]:80",
            "NodePort [::1]:30080/TCP -> [fd00:1::2]:80",
            "NodePort [2001:db8::10]:30080/TCP -> [fd00:1::2]:80",
        ],
    ),
    Case(
        "loadbalancer",
        "LoadBalancer frontends come from VIP-mode ingress IPs and spec.loadBalancerIP "
        "(deduplicated); Proxy-mode and hostname-only ingresses are skipped (KEP-1860); with "
        "allocateLoadBalancerNodePorts false and no nodePort there is no NodePort.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                allocateLoadBalancerNodePorts: false
                loadBalancerIP: 203.0.113.1
                ports: [{port: 80, targetPort: 8080}]
                """,
                status="""
                loadBalancer:
                  ingress:
                  - {ip: 203.0.113.1}
                  - {ip: 203.0.113.2, ipMode: VIP}
                  - {ip: 203.0.113.3, ipMode: Proxy}
                  - {hostname: lb.example.com}
                """,
            ),
            SLICE_8080,
        ],
        [
            f"ClusterIP 10.96.0.10:80/TCP -> {BACKENDS_8080}",
            f"LoadBalancer 203.0.113.1:80/TCP -> {BACKENDS_8080}",
            f"LoadBalancer 203.0.113.2:80/TCP -> {BACKENDS_8080}",
        ],
    ),
    Case(
        "loadbalancer-explicit-nodeport",
        "allocateLoadBalancerNodePorts false does not remove a nodePort that is set.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                allocateLoadBalancerNodePorts: false
                ports: [{port: 80, nodePort: 30080}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
            )
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> -",
            "NodePort 127.0.0.1:30080/TCP -> -",
            "NodePort 192.168.1.10:30080/TCP -> -",
            "LoadBalancer 203.0.113.1:80/TCP -> -",
        ],
    ),
    Case(
        "lb-status-without-lb-type",
        "A stale load balancer status on a service that is no longer type LoadBalancer gives "
        "no LoadBalancer frontend.",
        [
            svc(
                """
                clusterIP: 10.96.0.10
                ports: [{port: 80}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
            )
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> -"],
    ),
    Case(
        "external-ips",
        "externalIPs become ExternalIP frontends; addresses of a family the service does not "
        "have are dropped, as kube-proxy's per-family proxiers do.",
        [
            svc("""
                clusterIP: 10.96.0.10
                externalIPs: [198.51.100.7, '2001:db8::7']
                ports: [{port: 80}]
            """)
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> -", "ExternalIP 198.51.100.7:80/TCP -> -"],
    ),
    Case(
        "etp-local",
        "externalTrafficPolicy Local marks NodePort, LoadBalancer and ExternalIP frontends "
        "external_local (not ClusterIP); healthCheckNodePort goes on NodePort and LoadBalancer.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                externalTrafficPolicy: Local
                healthCheckNodePort: 32000
                externalIPs: [198.51.100.7]
                ports: [{port: 80, nodePort: 30080}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
            )
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> -",
            "NodePort 127.0.0.1:30080/TCP eTP=Local hc=32000 -> -",
            "NodePort 192.168.1.10:30080/TCP eTP=Local hc=32000 -> -",
            "LoadBalancer 203.0.113.1:80/TCP eTP=Local hc=32000 -> -",
            "ExternalIP 198.51.100.7:80/TCP eTP=Local -> -",
        ],
    ),
    Case(
        "etp-global",
        "externalTrafficPolicy Global (the pre-1.14 name) means Cluster; a healthCheckNodePort "
        "without Local is not carried.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                externalTrafficPolicy: Global
                healthCheckNodePort: 32000
                ports: [{port: 80, nodePort: 30080}]
            """)
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> -",
            "NodePort 127.0.0.1:30080/TCP -> -",
            "NodePort 192.168.1.10:30080/TCP -> -",
        ],
    ),
    Case(
        "itp-local",
        "internalTrafficPolicy Local marks only ClusterIP frontends internal_local.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                internalTrafficPolicy: Local
                externalTrafficPolicy: Cluster
                ports: [{port: 80, nodePort: 30080}]
            """)
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP iTP=Local -> -",
            "NodePort 127.0.0.1:30080/TCP -> -",
            "NodePort 192.168.1.10:30080/TCP -> -",
        ],
    ),
    Case(
        "affinity-default",
        "sessionAffinity ClientIP without a config uses the API default of 10800 seconds on "
        "every frontend.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                sessionAffinity: ClientIP
                ports: [{port: 80, nodePort: 30080}]
            """)
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP affinity=10800 -> -",
            "NodePort 127.0.0.1:30080/TCP affinity=10800 -> -",
            "NodePort 192.168.1.10:30080/TCP affinity=10800 -> -",
        ],
    ),
    Case(
        "affinity-timeout",
        "sessionAffinityConfig.clientIP.timeoutSeconds sets the affinity timeout.",
        [
            svc("""
                clusterIP: 10.96.0.10
                sessionAffinity: ClientIP
                sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
                ports: [{port: 80}]
            """)
        ],
        ["ClusterIP 10.96.0.10:80/TCP affinity=60 -> -"],
    ),
    Case(
        "affinity-none",
        "sessionAffinity None ignores a leftover timeout.",
        [
            svc("""
                clusterIP: 10.96.0.10
                sessionAffinity: None
                sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
                ports: [{port: 80}]
            """)
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> -"],
    ),
    Case(
        "source-ranges",
        "loadBalancerSourceRanges are normalised (host bits cleared, IPv6 compressed, padding "
        "trimmed), deduplicated, sorted and set on LoadBalancer frontends only.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                loadBalancerSourceRanges:
                - '2001:DB8:0::/32'
                - ' 10.0.0.1/8'
                - 192.168.0.0/16
                - 10.0.0.0/8
                ports: [{port: 80, nodePort: 30080}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
            )
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> -",
            "NodePort 127.0.0.1:30080/TCP -> -",
            "NodePort 192.168.1.10:30080/TCP -> -",
            "LoadBalancer 203.0.113.1:80/TCP ranges=10.0.0.0/8,192.168.0.0/16,2001:db8::/32 -> -",
        ],
    ),
    Case(
        "source-ranges-annotation",
        "Without the field, the service.beta.kubernetes.io/load-balancer-source-ranges "
        "annotation (comma separated) gives the ranges.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                allocateLoadBalancerNodePorts: false
                ports: [{port: 80}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
                metadata=f"annotations: {{{RANGES_ANNOTATION}: '10.1.0.0/16, 10.2.0.0/16,'}}",
            )
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> -",
            "LoadBalancer 203.0.113.1:80/TCP ranges=10.1.0.0/16,10.2.0.0/16 -> -",
        ],
    ),
    Case(
        "source-ranges-field-wins",
        "When both are set the field wins over the annotation, as in the API.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                loadBalancerSourceRanges: [10.9.0.0/16]
                allocateLoadBalancerNodePorts: false
                ports: [{port: 80}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
                metadata=f"annotations: {{{RANGES_ANNOTATION}: '10.1.0.0/16'}}",
            )
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> -",
            "LoadBalancer 203.0.113.1:80/TCP ranges=10.9.0.0/16 -> -",
        ],
    ),
    Case(
        "conditions",
        "ready nil means ready; not ready but serving and terminating is TERMINATING; serving "
        "nil takes ready's value; not ready and not terminating is dropped.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{port: 80}]
            """),
            CONDITIONS_SLICE,
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80; 10.1.0.2:80; 10.1.0.3:80 terminating; "
            "10.1.0.8:80; 10.1.0.9:80"
        ],
    ),
    Case(
        "publish-not-ready",
        "publishNotReadyAddresses makes every endpoint count as ready.",
        [
            svc("""
                clusterIP: 10.96.0.10
                publishNotReadyAddresses: true
                ports: [{port: 80}]
            """),
            NOT_READY_SLICE,
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80; 10.1.0.2:80"],
    ),
    Case(
        "dedupe-across-slices",
        "The same address:port in two slices (an endpoint moving between slices) counts once, "
        "the ready copy winning over the terminating one.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{port: 80}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints:
                - addresses: [10.1.0.1]
                  conditions: {ready: false, serving: true, terminating: true}
                  nodeName: node-b
            """),
            eps(
                """
                ports: [{port: 80}]
                endpoints:
                - {addresses: [10.1.0.1], nodeName: node-b}
                - {addresses: [10.1.0.2], nodeName: node-b}
                """,
                name="web-2",
            ),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80 node=node-b; 10.1.0.2:80 node=node-b"],
    ),
    Case(
        "first-address",
        "An endpoint with several addresses contributes its first, as kube-proxy does.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{port: 80}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints: [{addresses: [10.1.0.5, 10.1.0.6]}]
            """),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.5:80"],
    ),
    Case(
        "ignored-slices",
        "FQDN slices, slices of another service or namespace, and slice ports without a port "
        "number give no backends.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{port: 80}]
            """),
            eps(
                """
                ports: [{port: 80}]
                endpoints: [{addresses: [db.example.com]}]
                """,
                family="FQDN",
            ),
            eps(
                """
                ports: [{port: 80}]
                endpoints: [{addresses: [10.1.0.1]}]
                """,
                name="api-1",
                service="api",
            ),
            eps(
                """
                ports: [{port: 80}]
                endpoints: [{addresses: [10.1.0.2]}]
                """,
                name="web-2",
                ns="other",
            ),
            eps(
                """
                ports: [{name: ''}]
                endpoints: [{addresses: [10.1.0.3]}]
                """,
                name="web-3",
            ),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> -"],
    ),
    Case(
        "legacy-endpoints",
        "Without EndpointSlices the legacy Endpoints object is used: ready addresses are "
        "active, notReadyAddresses left out, ports matched by name, nodeName kept.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{name: http, port: 80}, {name: admin, port: 81}]
            """),
            legacy("""
                subsets:
                - addresses: [{ip: 10.1.0.2, nodeName: node-b}, {ip: 10.1.0.1, nodeName: node-a}]
                  notReadyAddresses: [{ip: 10.1.0.3}]
                  ports: [{name: http, port: 8080}, {name: admin, port: 8081, protocol: UDP}]
            """),
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP name=http -> 10.1.0.1:8080 node=node-a local; "
            "10.1.0.2:8080 node=node-b",
            "ClusterIP 10.96.0.10:81/TCP name=admin -> -",
        ],
    ),
    Case(
        "legacy-endpoints-publish-not-ready",
        "With publishNotReadyAddresses the legacy notReadyAddresses are used too.",
        [
            svc("""
                clusterIP: 10.96.0.10
                publishNotReadyAddresses: true
                ports: [{port: 80}]
            """),
            legacy("""
                subsets:
                - addresses: [{ip: 10.1.0.1}]
                  notReadyAddresses: [{ip: 10.1.0.3}]
                  ports: [{port: 8080}]
            """),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:8080; 10.1.0.3:8080"],
    ),
    Case(
        "legacy-endpoints-ignored-with-slices",
        "When EndpointSlices exist the legacy Endpoints object is not looked at.",
        [
            svc("""
                clusterIP: 10.96.0.10
                ports: [{port: 80}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints: [{addresses: [10.1.0.1]}]
            """),
            legacy("subsets: [{addresses: [{ip: 10.1.0.9}], ports: [{port: 80}]}]"),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80"],
    ),
    Case(
        "sloppy-ipv4",
        "IPv4 text with leading zeros (accepted for old objects) is read as decimal and "
        "normalised, like Kubernetes' ParseIPSloppy.",
        [
            svc("""
                clusterIP: 010.096.000.010
                ports: [{port: 80}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints: [{addresses: [010.001.000.001]}]
            """),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80"],
    ),
    Case(
        "topology-prefer-close",
        "trafficDistribution PreferClose with every ready endpoint hinted and one hinted for "
        "this node's zone: ClusterIP and Cluster-policy NodePorts take only the endpoints "
        "hinted for the zone, whatever zone they live in (KEP-4444, KEP-2433).",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                trafficDistribution: PreferClose
                ports: [{port: 80, nodePort: 30080}]
            """),
            TOPOLOGY_SLICE,
        ],
        [
            f"ClusterIP 10.96.0.10:80/TCP -> {IN_Z1}",
            f"NodePort 127.0.0.1:30080/TCP -> {IN_Z1}",
            f"NodePort 192.168.1.10:30080/TCP -> {IN_Z1}",
        ],
        node=ZONED,
    ),
    Case(
        "topology-mode-annotation",
        "The annotation service.kubernetes.io/topology-mode: Auto turns hints on too, on "
        "LoadBalancer and ExternalIP frontends as on the ClusterIP.",
        [
            svc(
                """
                type: LoadBalancer
                clusterIP: 10.96.0.10
                allocateLoadBalancerNodePorts: false
                externalIPs: [198.51.100.7]
                ports: [{port: 80}]
                """,
                status="loadBalancer: {ingress: [{ip: 203.0.113.1}]}",
                metadata=f"annotations: {{{TOPOLOGY_MODE}: Auto}}",
            ),
            TOPOLOGY_SLICE,
        ],
        [
            f"ClusterIP 10.96.0.10:80/TCP -> {IN_Z1}",
            f"LoadBalancer 203.0.113.1:80/TCP -> {IN_Z1}",
            f"ExternalIP 198.51.100.7:80/TCP -> {IN_Z1}",
        ],
        node=ZONED,
    ),
    Case(
        "topology-aware-hints-annotation",
        "The older annotation service.kubernetes.io/topology-aware-hints: auto turns hints on.",
        [
            svc(
                "clusterIP: 10.96.0.10\nports: [{port: 80}]",
                metadata=f"annotations: {{{TOPOLOGY_HINTS}: auto}}",
            ),
            TOPOLOGY_SLICE,
        ],
        [f"ClusterIP 10.96.0.10:80/TCP -> {IN_Z1}"],
        node=ZONED,
    ),
    Case(
        "topology-mode-disabled-wins",
        "topology-mode wins over the older annotation: Disabled there leaves hints off even "
        "with topology-aware-hints: auto.",
        [
            svc(
                "clusterIP: 10.96.0.10\nports: [{port: 80}]",
                metadata=f"annotations: {{{TOPOLOGY_MODE}: Disabled, {TOPOLOGY_HINTS}: auto}}",
            ),
            TOPOLOGY_SLICE,
        ],
        [f"ClusterIP 10.96.0.10:80/TCP -> {ALL_ZONES}"],
        node=ZONED,
    ),
    Case(
        "topology-not-requested",
        "Without trafficDistribution or a topology annotation, hints are ignored.",
        [svc("clusterIP: 10.96.0.10\nports: [{port: 80}]"), TOPOLOGY_SLICE],
        [f"ClusterIP 10.96.0.10:80/TCP -> {ALL_ZONES}"],
        node=ZONED,
    ),
    Case(
        "topology-zone-unknown",
        "A node without a known zone uses every endpoint.",
        [
            svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]"),
            TOPOLOGY_SLICE,
        ],
        [f"ClusterIP 10.96.0.10:80/TCP -> {ALL_ZONES}"],
    ),
    Case(
        "topology-no-hint-for-zone",
        "When no endpoint is hinted for this node's zone every endpoint is used, rather than "
        "none.",
        [
            svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]"),
            TOPOLOGY_SLICE,
        ],
        [f"ClusterIP 10.96.0.10:80/TCP -> {ALL_ZONES}"],
        node=NodeInfo("node-a", ("192.168.1.10",), zone="z9"),
    ),
    Case(
        "topology-endpoint-without-hints",
        "One ready endpoint without hints (here in another slice) turns hints off for the "
        "service: every endpoint is used.",
        [
            svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]"),
            TOPOLOGY_SLICE,
            eps("ports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.4]}]", name="web-2"),
        ],
        [f"ClusterIP 10.96.0.10:80/TCP -> {ALL_ZONES}; 10.1.0.4:80"],
        node=ZONED,
    ),
    Case(
        "topology-empty-hints",
        "Hints naming no zone count as no hints.",
        [
            svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]"),
            TOPOLOGY_SLICE,
            eps(
                """
                ports: [{port: 80}]
                endpoints: [{addresses: [10.1.0.4], hints: {forZones: []}}]
                """,
                name="web-2",
            ),
        ],
        [f"ClusterIP 10.96.0.10:80/TCP -> {ALL_ZONES}; 10.1.0.4:80"],
        node=ZONED,
    ),
    Case(
        "topology-terminating",
        "Only ready endpoints decide whether hints apply (a terminating one without hints "
        "does not turn them off) and only ready ones are filtered: terminating ones stay for "
        "draining, picked only when no ready one is left, which hints never leave.",
        [
            svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]"),
            eps("""
                ports: [{port: 80}]
                endpoints:
                - {addresses: [10.1.0.1], hints: {forZones: [{name: z1}]}}
                - {addresses: [10.1.0.2], hints: {forZones: [{name: z2}]}}
                - addresses: [10.1.0.3]
                  conditions: {ready: false, serving: true, terminating: true}
                - addresses: [10.1.0.4]
                  conditions: {ready: false, serving: true, terminating: true}
                  hints: {forZones: [{name: z2}]}
                - addresses: [10.1.0.5]
                  conditions: {ready: false}
            """),
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80; 10.1.0.3:80 terminating; "
            "10.1.0.4:80 terminating"
        ],
        node=ZONED,
    ),
    Case(
        "topology-etp-local",
        "With externalTrafficPolicy Local, Local wins over hints: external frontends keep the "
        "local endpoint the hints send elsewhere, for their node-local scope, besides the "
        "zone's endpoints for in-cluster callers; the ClusterIP (Cluster) gets the zone's only.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                externalTrafficPolicy: Local
                trafficDistribution: PreferClose
                ports: [{port: 80, nodePort: 30080}]
            """),
            LOCAL_HINTED_ELSEWHERE_SLICE,
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> 10.1.0.2:80 node=node-b zone=z1",
            "NodePort 127.0.0.1:30080/TCP eTP=Local -> 10.1.0.1:80 node=node-a local zone=z1; "
            "10.1.0.2:80 node=node-b zone=z1",
            "NodePort 192.168.1.10:30080/TCP eTP=Local -> 10.1.0.1:80 node=node-a local zone=z1; "
            "10.1.0.2:80 node=node-b zone=z1",
        ],
        node=ZONED,
    ),
    Case(
        "topology-itp-local",
        "With internalTrafficPolicy Local the ClusterIP keeps the local endpoint the hints send "
        "elsewhere; Cluster-policy NodePorts get the zone's endpoints only.",
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                internalTrafficPolicy: Local
                trafficDistribution: PreferClose
                ports: [{port: 80, nodePort: 30080}]
            """),
            LOCAL_HINTED_ELSEWHERE_SLICE,
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP iTP=Local -> 10.1.0.1:80 node=node-a local zone=z1; "
            "10.1.0.2:80 node=node-b zone=z1",
            "NodePort 127.0.0.1:30080/TCP -> 10.1.0.2:80 node=node-b zone=z1",
            "NodePort 192.168.1.10:30080/TCP -> 10.1.0.2:80 node=node-b zone=z1",
        ],
        node=ZONED,
    ),
    Case(
        "topology-dual-stack",
        "Hints are judged per IP family, as kube-proxy's per-family proxiers do: IPv4 "
        "endpoints all hinted are filtered while an IPv6 endpoint without hints leaves IPv6 "
        "with every endpoint.",
        [
            svc("""
                clusterIP: 10.96.0.10
                clusterIPs: [10.96.0.10, 'fd00:96::a']
                ipFamilies: [IPv4, IPv6]
                trafficDistribution: PreferClose
                ports: [{port: 80}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints:
                - {addresses: [10.1.0.1], hints: {forZones: [{name: z1}]}}
                - {addresses: [10.1.0.2], hints: {forZones: [{name: z2}]}}
            """),
            eps(
                """
                ports: [{port: 80}]
                endpoints:
                - {addresses: ['fd00:1::1'], hints: {forZones: [{name: z1}]}}
                - {addresses: ['fd00:1::2']}
                """,
                name="web-v6",
                family="IPv6",
            ),
        ],
        [
            "ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80",
            "ClusterIP [fd00:96::a]:80/TCP -> [fd00:1::1]:80; [fd00:1::2]:80",
        ],
        node=ZONED,
    ),
    Case(
        "topology-legacy-endpoints",
        "Legacy Endpoints carry no hints: a service served from them uses every address.",
        [
            svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]"),
            legacy("subsets: [{addresses: [{ip: 10.1.0.1}, {ip: 10.1.0.2}], ports: [{port: 80}]}]"),
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80; 10.1.0.2:80"],
        node=ZONED,
    ),
    Case(
        "proxy-name-unlabelled",
        "Without a proxy name, a service without the service-proxy-name label is served.",
        [svc("clusterIP: 10.96.0.10\nports: [{port: 80}]")],
        ["ClusterIP 10.96.0.10:80/TCP -> -"],
    ),
    Case(
        "proxy-name-labelled-not-ours",
        "Without a proxy name, a service carrying the service-proxy-name label is left to "
        "the proxy it names.",
        [
            svc(
                "clusterIP: 10.96.0.10\nports: [{port: 80}]",
                metadata=f"labels: {{{PROXY_LABEL}: other}}",
            )
        ],
        None,
    ),
    Case(
        "proxy-name-match",
        "With a proxy name, a service whose label equals it is served.",
        [
            svc(
                "clusterIP: 10.96.0.10\nports: [{port: 80}]",
                metadata=f"labels: {{{PROXY_LABEL}: kpr}}",
            )
        ],
        ["ClusterIP 10.96.0.10:80/TCP -> -"],
        proxy_name="kpr",
    ),
    Case(
        "proxy-name-mismatch",
        "With a proxy name, a service labelled for another proxy is not served.",
        [
            svc(
                "clusterIP: 10.96.0.10\nports: [{port: 80}]",
                metadata=f"labels: {{{PROXY_LABEL}: other}}",
            )
        ],
        None,
        proxy_name="kpr",
    ),
    Case(
        "proxy-name-unlabelled-with-name",
        "With a proxy name, an unlabelled service belongs to the default proxy, not us.",
        [svc("clusterIP: 10.96.0.10\nports: [{port: 80}]")],
        None,
        proxy_name="kpr",
    ),
    Case(
        "headless",
        "A headless service (clusterIP None) has no data path, external IPs included.",
        [
            svc("""
                clusterIP: None
                clusterIPs: [None]
                ipFamilies: [IPv4]
                externalIPs: [198.51.100.7]
                ports: [{port: 80}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints: [{addresses: [10.1.0.1]}]
            """),
        ],
        None,
    ),
    Case(
        "external-name",
        "An ExternalName service is DNS only.",
        [
            svc("""
                type: ExternalName
                externalName: db.example.com
                ports: [{port: 5432}]
            """)
        ],
        None,
    ),
    Case(
        "unallocated-cluster-ip",
        "A service whose clusterIP is not allocated yet is skipped, as kube-proxy does.",
        [svc("type: NodePort\nports: [{port: 80, nodePort: 30080}]")],
        None,
    ),
    Case(
        "no-ports",
        "A service without ports has no frontend.",
        [svc("clusterIP: 10.96.0.10")],
        None,
    ),
]


@pytest.mark.parametrize("case", SERVICE_CASES, ids=str)
def test_translate_service(case: Case) -> None:
    service, slices, endpoints = load(case.objects)
    result = translate_service(service, slices, endpoints, case.node, case.proxy_name)
    assert summarize(result) == case.expected, case.description
    if result is not None:
        assert result.key == ServiceKey("shop", "web")
        assert result.source_kind == "Service"


# --- HostPort --------------------------------------------------------------------------

RUNNING = """
    phase: Running
    podIP: 10.1.0.5
    podIPs: [{ip: 10.1.0.5}]
"""
RUNNING_DUAL = """
    phase: Running
    podIP: 10.1.0.5
    podIPs: [{ip: 10.1.0.5}, {ip: 'fd00:1::5'}]
"""
LOCAL = "node=node-a local"


def pod(ports: str, status: str = RUNNING, spec: str = "nodeName: node-a") -> str:
    """The Pod mon/agent: extra spec lines, the main container's ports, the status."""
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: mon}\nspec:\n"
    text += block(spec, "  ") if spec else ""
    text += "  containers:\n  - name: main\n    ports:\n" + block(ports, "    ")
    return text + "status:\n" + block(status, "  ")


POD_CASES = [
    Case(
        "hostport",
        "A hostPort without hostIP is reachable on every node address of the pod IP's family "
        "and goes to podIP:containerPort on this node.",
        [pod("- {containerPort: 8080, hostPort: 80}")],
        [f"HostPort 192.168.1.10:80/TCP -> 10.1.0.5:8080 {LOCAL}"],
    ),
    Case(
        "hostport-host-ip",
        "A hostIP limits the hostPort to that address; 0.0.0.0 means unset; ports without "
        "hostPort are not exposed.",
        [
            pod("""
                - {name: metrics, containerPort: 9100, hostPort: 9100, hostIP: 192.168.1.10}
                - {containerPort: 53, hostPort: 53, protocol: UDP, hostIP: 0.0.0.0}
                - {containerPort: 8080}
            """)
        ],
        [
            f"HostPort 192.168.1.10:53/UDP -> 10.1.0.5:53 {LOCAL}",
            f"HostPort 192.168.1.10:9100/TCP name=metrics -> 10.1.0.5:9100 {LOCAL}",
        ],
    ),
    Case(
        "hostport-dual-stack",
        "A dual-stack pod's hostPort is reachable on node addresses of both families, each "
        "going to the pod IP of its family.",
        [pod("- {containerPort: 8080, hostPort: 80}", RUNNING_DUAL)],
        [
            f"HostPort 192.168.1.10:80/TCP -> 10.1.0.5:8080 {LOCAL}",
            f"HostPort [2001:db8::10]:80/TCP -> [fd00:1::5]:8080 {LOCAL}",
        ],
    ),
    Case(
        "hostport-host-ip-not-a-node-address",
        "A hostIP that is not one of the node's addresses is not served: the pod would take "
        "every client's traffic to that address (CVE-2020-8554 with ExternalIPs).",
        [
            pod("""
                - {containerPort: 53, hostPort: 53, protocol: UDP, hostIP: 8.8.8.8}
                - {containerPort: 8080, hostPort: 80, hostIP: 192.168.1.10}
            """)
        ],
        [f"HostPort 192.168.1.10:80/TCP -> 10.1.0.5:8080 {LOCAL}"],
    ),
    Case(
        "hostport-host-ip-other-family",
        "A hostIP of a family the pod has no IP in gives nothing.",
        [pod("- {containerPort: 8080, hostPort: 80, hostIP: '2001:db8::10'}")],
        None,
    ),
    Case(
        "hostport-sidecar",
        "Restartable init containers (sidecars) serve their hostPorts; plain init containers "
        "do not.",
        [
            pod(
                "- {containerPort: 8080}",
                spec="""
                nodeName: node-a
                initContainers:
                - name: sidecar
                  restartPolicy: Always
                  ports: [{containerPort: 15000, hostPort: 15000}]
                - name: setup
                  ports: [{containerPort: 16000, hostPort: 16000}]
                """,
            )
        ],
        [f"HostPort 192.168.1.10:15000/TCP -> 10.1.0.5:15000 {LOCAL}"],
    ),
    Case(
        "hostport-unscheduled",
        "A pod without nodeName is taken as ours (the caller filters by node).",
        [pod("- {containerPort: 8080, hostPort: 80}", spec="")],
        [f"HostPort 192.168.1.10:80/TCP -> 10.1.0.5:8080 {LOCAL}"],
    ),
    Case(
        "hostport-other-node",
        "A pod on another node has no HostPort here.",
        [pod("- {containerPort: 8080, hostPort: 80}", spec="nodeName: node-b")],
        None,
    ),
    Case(
        "hostport-succeeded",
        "A finished pod (Succeeded) has no HostPort.",
        [pod("- {containerPort: 8080, hostPort: 80}", RUNNING.replace("Running", "Succeeded"))],
        None,
    ),
    Case(
        "hostport-failed",
        "A finished pod (Failed) has no HostPort.",
        [pod("- {containerPort: 8080, hostPort: 80}", RUNNING.replace("Running", "Failed"))],
        None,
    ),
    Case(
        "hostport-no-ip",
        "A pod without an IP yet has no HostPort.",
        [pod("- {containerPort: 8080, hostPort: 80}", "phase: Pending")],
        None,
    ),
    Case(
        "hostport-none",
        "A pod without hostPorts has no pseudo-service.",
        [pod("- {containerPort: 8080}")],
        None,
    ),
    Case(
        "hostport-host-network",
        "A host-network pod binds its ports itself; nothing to translate.",
        [pod("- {containerPort: 80, hostPort: 80}", spec="nodeName: node-a\nhostNetwork: true")],
        None,
    ),
]


@pytest.mark.parametrize("case", POD_CASES, ids=str)
def test_translate_pod(case: Case) -> None:
    obj, _, _ = load(case.objects)
    result = translate_pod(obj, case.node)
    assert summarize(result) == case.expected, case.description
    if result is not None:
        assert result.key == ServiceKey("mon", "pod:agent")
        assert result.source_kind == "Pod"


@pytest.mark.parametrize("case", SERVICE_CASES + POD_CASES, ids=str)
def test_case_inputs_are_valid(case: Case) -> None:
    """Every object in the tables passes validate_object, so the rows test translation."""
    for text in case.objects:
        validate_object(yaml.safe_load(text))


# --- invalid objects -------------------------------------------------------------------

SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "bad", "namespace": "shop"},
    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
}
SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "bad",
        "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv4",
    "ports": [{"port": 80}],
    "endpoints": [{"addresses": ["10.1.0.1"]}],
}
ENDPOINTS = {
    "apiVersion": "v1",
    "kind": "Endpoints",
    "metadata": {"name": "bad", "namespace": "shop"},
    "subsets": [{"addresses": [{"ip": "10.1.0.1"}], "ports": [{"port": 80}]}],
}
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "bad", "namespace": "shop"},
    "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]},
    "status": {"podIP": "10.1.0.1", "podIPs": [{"ip": "10.1.0.1"}]},
}
DELETE = object()


def edit(base: dict, path: str, value: object) -> dict:
    """A deep copy of base with the dotted path (list indexes as numbers) set; DELETE removes."""
    obj = copy.deepcopy(base)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = obj
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


def ingress(*entries: dict) -> dict:
    return {"loadBalancer": {"ingress": list(entries)}}


def affinity(timeout: object) -> dict:
    return {"clientIP": {"timeoutSeconds": timeout}}


# (id, object, the message expected: the object's name and the field at fault)
INVALID = [
    ("not-a-mapping", ["Service"], "object is not a mapping"),
    ("no-kind", edit(SERVICE, "kind", DELETE), "object shop/bad: kind missing"),
    ("unknown-kind", edit(SERVICE, "kind", "Deployment"), "unsupported kind Deployment"),
    ("no-api-version", edit(SERVICE, "apiVersion", DELETE), "Service shop/bad: apiVersion missing"),
    (
        "service-api-version",
        edit(SERVICE, "apiVersion", "apps/v1"),
        "Service shop/bad: apiVersion: 'apps/v1' is not v1",
    ),
    (
        "slice-api-version",
        edit(SLICE, "apiVersion", "discovery.k8s.io/v1beta1"),
        "EndpointSlice shop/bad: apiVersion: 'discovery.k8s.io/v1beta1' is not discovery.k8s.io/v1",
    ),
    ("no-metadata", edit(SERVICE, "metadata", DELETE), "Service default/: metadata missing"),
    ("no-name", edit(SERVICE, "metadata.name", DELETE), "Service shop/: metadata.name missing"),
    ("label-value", edit(SERVICE, "metadata.labels", {"a": 1}), "metadata.labels: 'a'"),
    ("spec-not-mapping", edit(SERVICE, "spec", []), "spec: must be an object"),
    ("spec-type", edit(SERVICE, "spec.type", "Ingress"), "spec.type: 'Ingress' is not one of"),
    (
        "cluster-ip",
        edit(SERVICE, "spec.clusterIP", "10.96.0.300"),
        "spec.clusterIP: '10.96.0.300' is not an IP",
    ),
    (
        "cluster-ip-zone",
        edit(SERVICE, "spec.clusterIP", "fe80::1%eth0"),
        "spec.clusterIP: 'fe80::1%eth0' is not an IP",
    ),
    (
        "cluster-ips-same-family",
        edit(SERVICE, "spec.clusterIPs", ["10.96.0.10", "10.96.0.11"]),
        "spec.clusterIPs: at most one address per IP family",
    ),
    (
        "cluster-ips-mismatch",
        edit(SERVICE, "spec.clusterIPs", ["10.96.0.11"]),
        "spec.clusterIP: '10.96.0.10' differs from spec.clusterIPs[0]",
    ),
    (
        "cluster-ips-bad",
        edit(SERVICE, "spec.clusterIPs", ["10.96.0.10", "fd00::zz"]),
        "spec.clusterIPs[1]: 'fd00::zz' is not an IP",
    ),
    ("ip-families", edit(SERVICE, "spec.ipFamilies", ["IPv5"]), "spec.ipFamilies[0]: 'IPv5'"),
    (
        "ip-families-vs-ips",
        edit(SERVICE, "spec.ipFamilies", ["IPv6"]),
        "spec.clusterIPs[0]: 10.96.0.10 is not of a family in spec.ipFamilies",
    ),
    (
        "ip-family-policy",
        edit(SERVICE, "spec.ipFamilyPolicy", "Dual"),
        "spec.ipFamilyPolicy: 'Dual'",
    ),
    ("ports-not-list", edit(SERVICE, "spec.ports", {"port": 80}), "spec.ports: must be a list"),
    ("port-zero", edit(SERVICE, "spec.ports.0.port", 0), "spec.ports[0].port: 0 is not a port"),
    ("port-big", edit(SERVICE, "spec.ports.0.port", 70000), "spec.ports[0].port: 70000 is not"),
    ("port-string", edit(SERVICE, "spec.ports.0.port", "80"), "spec.ports[0].port: '80' is not"),
    ("port-bool", edit(SERVICE, "spec.ports.0.port", True), "spec.ports[0].port: True is not"),
    ("port-missing", edit(SERVICE, "spec.ports.0.port", DELETE), "spec.ports[0].port: None is not"),
    ("node-port", edit(SERVICE, "spec.ports.0.nodePort", 70000), "spec.ports[0].nodePort: 70000"),
    (
        "protocol",
        edit(SERVICE, "spec.ports.0.protocol", "HTTP"),
        "spec.ports[0].protocol: unknown protocol 'HTTP'",
    ),
    (
        "protocol-case",
        edit(SERVICE, "spec.ports.0.protocol", "tcp"),
        "spec.ports[0].protocol: unknown protocol 'tcp'",
    ),
    ("target-port", edit(SERVICE, "spec.ports.0.targetPort", 0), "spec.ports[0].targetPort: 0"),
    (
        "target-port-name",
        edit(SERVICE, "spec.ports.0.targetPort", ""),
        "spec.ports[0].targetPort: empty port name",
    ),
    ("port-name", edit(SERVICE, "spec.ports.0.name", 7), "spec.ports[0].name: must be a string"),
    (
        "external-ip",
        edit(SERVICE, "spec.externalIPs", ["1.2.3.4", "nope"]),
        "spec.externalIPs[1]: 'nope' is not an IP",
    ),
    ("lb-ip", edit(SERVICE, "spec.loadBalancerIP", "1.2.3"), "spec.loadBalancerIP: '1.2.3'"),
    (
        "ingress-ip",
        edit(SERVICE, "status", ingress({"ip": "300.1.1.1"})),
        "status.loadBalancer.ingress[0].ip: '300.1.1.1' is not an IP",
    ),
    (
        "ingress-ip-mode",
        edit(SERVICE, "status", ingress({"ip": "1.1.1.1", "ipMode": "Direct"})),
        "status.loadBalancer.ingress[0].ipMode: 'Direct' is not one of Proxy, VIP",
    ),
    (
        "etp",
        edit(SERVICE, "spec.externalTrafficPolicy", "local"),
        "spec.externalTrafficPolicy: 'local' is not one of Cluster, Global, Local",
    ),
    (
        "itp",
        edit(SERVICE, "spec.internalTrafficPolicy", "Global"),
        "spec.internalTrafficPolicy: 'Global' is not one of Cluster, Local",
    ),
    (
        "traffic-distribution",
        edit(SERVICE, "spec.trafficDistribution", True),
        "spec.trafficDistribution: must be a string, got bool",
    ),
    (
        "affinity",
        edit(SERVICE, "spec.sessionAffinity", "Cookie"),
        "spec.sessionAffinity: 'Cookie' is not one of ClientIP, None",
    ),
    (
        "affinity-timeout-zero",
        edit(SERVICE, "spec.sessionAffinityConfig", affinity(0)),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is not 1-86400",
    ),
    (
        "affinity-timeout-big",
        edit(SERVICE, "spec.sessionAffinityConfig", affinity(86401)),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is not 1-86400",
    ),
    (
        "affinity-timeout-string",
        edit(SERVICE, "spec.sessionAffinityConfig", affinity("60")),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: '60' is not 1-86400",
    ),
    (
        "source-range-prefix",
        edit(SERVICE, "spec.loadBalancerSourceRanges", ["10.0.0.0/33"]),
        "spec.loadBalancerSourceRanges[0]: '10.0.0.0/33' is not a CIDR",
    ),
    (
        "source-range-bare-ip",
        edit(SERVICE, "spec.loadBalancerSourceRanges", ["10.0.0.0/8", "10.0.0.1"]),
        "spec.loadBalancerSourceRanges[1]: '10.0.0.1' is not a CIDR",
    ),
    (
        "source-range-annotation",
        edit(SERVICE, "metadata.annotations", {RANGES_ANNOTATION: "10.0.0.0/8,x"}),
        f"metadata.annotations[{RANGES_ANNOTATION}]: 'x' is not a CIDR",
    ),
    (
        "health-check-port",
        edit(SERVICE, "spec.healthCheckNodePort", 70000),
        "spec.healthCheckNodePort: 70000 is not a port",
    ),
    (
        "publish-not-ready",
        edit(SERVICE, "spec.publishNotReadyAddresses", "yes"),
        "spec.publishNotReadyAddresses: must be true or false",
    ),
    (
        "allocate-node-ports",
        edit(SERVICE, "spec.allocateLoadBalancerNodePorts", 1),
        "spec.allocateLoadBalancerNodePorts: must be true or false",
    ),
    (
        "slice-address-type",
        edit(SLICE, "addressType", "IP"),
        "EndpointSlice shop/bad: addressType: 'IP'",
    ),
    (
        "slice-no-address-type",
        edit(SLICE, "addressType", DELETE),
        "addressType: None is not one of",
    ),
    (
        "slice-no-addresses",
        edit(SLICE, "endpoints.0.addresses", []),
        "endpoints[0].addresses: must be a non-empty list",
    ),
    (
        "slice-bad-address",
        edit(SLICE, "endpoints.0.addresses", ["10.1.0.1", "x"]),
        "endpoints[0].addresses[1]: 'x' is not an IPv4 address",
    ),
    (
        "slice-wrong-family",
        edit(SLICE, "endpoints.0.addresses", ["fd00::1"]),
        "endpoints[0].addresses[0]: 'fd00::1' is not an IPv4 address",
    ),
    (
        "slice-ready",
        edit(SLICE, "endpoints.0.conditions", {"ready": "true"}),
        "endpoints[0].conditions.ready: must be true or false",
    ),
    (
        # equal to {"ready": True} (1 == True): the usual conditions' short way takes a bool only
        "slice-ready-number",
        edit(SLICE, "endpoints.0.conditions", {"ready": 1}),
        "endpoints[0].conditions.ready: must be true or false",
    ),
    (
        "slice-terminating",
        edit(SLICE, "endpoints.0.conditions", {"terminating": 1}),
        "endpoints[0].conditions.terminating: must be true or false",
    ),
    (
        "slice-conditions",
        edit(SLICE, "endpoints.0.conditions", ["ready"]),
        "endpoints[0].conditions: must be an object",
    ),
    (
        "slice-node-name",
        edit(SLICE, "endpoints.0.nodeName", 5),
        "endpoints[0].nodeName: must be a string",
    ),
    ("slice-endpoint", edit(SLICE, "endpoints.0", "10.1.0.1"), "endpoints[0]: must be an object"),
    (
        "slice-hints",
        edit(SLICE, "endpoints.0.hints", ["z1"]),
        "endpoints[0].hints: must be an object, got list",
    ),
    (
        "slice-hints-for-zones",
        edit(SLICE, "endpoints.0.hints", {"forZones": {"name": "z1"}}),
        "endpoints[0].hints.forZones: must be a list, got dict",
    ),
    (
        "slice-hint",
        edit(SLICE, "endpoints.0.hints", {"forZones": [{"name": "z1"}, "z2"]}),
        "endpoints[0].hints.forZones[1]: must be an object, got str",
    ),
    (
        "slice-hint-name",
        edit(SLICE, "endpoints.0.hints", {"forZones": [{"name": 1}]}),
        "endpoints[0].hints.forZones[0].name: must be a string, got int",
    ),
    (
        "slice-hint-no-name",
        edit(SLICE, "endpoints.0.hints", {"forZones": [{}]}),
        "endpoints[0].hints.forZones[0].name: must not be empty",
    ),
    (
        "slice-hint-empty-name",
        edit(SLICE, "endpoints.0.hints", {"forZones": [{"name": "z1"}, {"name": ""}]}),
        "endpoints[0].hints.forZones[1].name: must not be empty",
    ),
    ("slice-port", edit(SLICE, "ports.0.port", 70000), "ports[0].port: 70000 is not a port"),
    (
        "slice-protocol",
        edit(SLICE, "ports.0.protocol", "ICMP"),
        "ports[0].protocol: unknown protocol 'ICMP'",
    ),
    (
        "endpoints-ip",
        edit(ENDPOINTS, "subsets.0.addresses.0.ip", "10.1.0"),
        "Endpoints shop/bad: subsets[0].addresses[0].ip: '10.1.0' is not an IP",
    ),
    ("endpoints-port", edit(ENDPOINTS, "subsets.0.ports.0.port", 0), "subsets[0].ports[0].port: 0"),
    (
        "pod-container-port",
        edit(POD, "spec.containers.0.ports.0.containerPort", DELETE),
        "Pod shop/bad: spec.containers[0].ports[0].containerPort: None is not a port",
    ),
    (
        "pod-host-port",
        edit(POD, "spec.containers.0.ports.0.hostPort", 70000),
        "spec.containers[0].ports[0].hostPort: 70000 is not a port",
    ),
    (
        "pod-host-ip",
        edit(POD, "spec.containers.0.ports.0.hostIP", "host"),
        "spec.containers[0].ports[0].hostIP: 'host' is not an IP",
    ),
    ("pod-ip", edit(POD, "status.podIP", "10.1.0.256"), "Pod shop/bad: status.podIP: '10.1.0.256'"),
    (
        "pod-ips",
        edit(POD, "status.podIPs", [{"ip": "10.1.0.1"}, {"ip": "fd00::g"}]),
        "status.podIPs[1].ip: 'fd00::g' is not an IP",
    ),
]


@pytest.mark.parametrize(
    ("obj", "message"), [(o, m) for _, o, m in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_validate_object_rejects(obj: object, message: str) -> None:
    with pytest.raises(InvalidObject, match=re.escape(message)):
        validate_object(obj)  # type: ignore[arg-type]


@pytest.mark.parametrize("obj", [SERVICE, SLICE, ENDPOINTS, POD], ids=lambda o: o["kind"])
def test_validate_object_accepts(obj: dict) -> None:
    validate_object(obj)


def test_translate_service_raises_on_invalid_service() -> None:
    with pytest.raises(InvalidObject, match=re.escape("Service shop/bad: spec.ports[0].port")):
        translate_service(edit(SERVICE, "spec.ports.0.port", 0), [], None, NODE)


def test_translate_service_raises_on_invalid_slice() -> None:
    web = edit(SERVICE, "metadata.name", "web")
    bad = edit(SLICE, "endpoints.0.addresses", ["x"])
    with pytest.raises(
        InvalidObject, match=re.escape("EndpointSlice shop/bad: endpoints[0].addresses[0]")
    ):
        translate_service(web, [bad], None, NODE)


def test_translate_rejects_other_kinds() -> None:
    with pytest.raises(InvalidObject, match="Pod shop/bad: expected a Service"):
        translate_service(POD, [], None, NODE)
    with pytest.raises(InvalidObject, match="Endpoints shop/bad: expected an EndpointSlice"):
        translate_service(SERVICE, [ENDPOINTS], None, NODE)
    with pytest.raises(InvalidObject, match="Service shop/bad: expected a Pod"):
        translate_pod(SERVICE, NODE)


# --- behaviour beyond one table row ----------------------------------------------------


def node_port_of(service: Service | None) -> Frontend:
    assert service is not None
    return next(f for f in service.frontends if f.type is FrontendType.NODE_PORT)


def test_kep_1669_terminating_fallback() -> None:
    """With eTP=Local and the only local endpoint terminating-but-serving, external traffic
    falls back to it instead of being dropped; cluster-wide scope still picks the ready one."""
    service, slices, _ = load(
        [
            svc("""
                type: NodePort
                clusterIP: 10.96.0.10
                externalTrafficPolicy: Local
                ports: [{port: 80, nodePort: 30080}]
            """),
            eps("""
                ports: [{port: 80}]
                endpoints:
                - addresses: [10.1.0.1]
                  nodeName: node-a
                  conditions: {ready: false, serving: true, terminating: true}
                - addresses: [10.1.0.2]
                  nodeName: node-b
                - addresses: [10.1.0.3]
                  nodeName: node-a
                  conditions: {ready: false, serving: false, terminating: true}
            """),
        ]
    )
    node_port = node_port_of(translate_service(service, slices, None, NODE))
    assert node_port.external_scope_local
    assert [describe_backend(b) for b in node_port.selectable(local_only=True)] == [
        "10.1.0.1:80 terminating node=node-a local"
    ]
    assert [describe_backend(b) for b in node_port.selectable(local_only=False)] == [
        "10.1.0.2:80 node=node-b"
    ]
    # Once a local endpoint is ready again it is preferred over the terminating one.
    slices[0]["endpoints"][2]["conditions"] = {"ready": True}
    node_port = node_port_of(translate_service(service, slices, None, NODE))
    assert [describe_backend(b) for b in node_port.selectable(local_only=True)] == [
        "10.1.0.3:80 node=node-a local"
    ]


def case_objects(case_id: str) -> list[str]:
    return next(c for c in SERVICE_CASES if c.id == case_id).objects


def test_deterministic_regardless_of_input_order() -> None:
    """Equal input in any order gives an equal Service: the bus compares with ==."""
    service, slices, _ = load(case_objects("dedupe-across-slices"))
    for extra in ("named-port-two-slices", "dual-stack", "conditions"):
        _, more, _ = load(case_objects(extra))
        for i, s in enumerate(more):
            s["metadata"]["name"] = f"{extra}-{i}"
        slices += more
    reference = translate_service(service, slices, None, NODE)
    assert reference is not None and reference.frontends[0].backends
    rng = random.Random(7)
    for _ in range(10):
        shuffled = copy.deepcopy(slices)
        rng.shuffle(shuffled)
        for s in shuffled:
            rng.shuffle(s["endpoints"])
            rng.shuffle(s["ports"])
        assert translate_service(service, shuffled, None, NODE) == reference


def test_duplicate_endpoint_tie_break_is_order_independent() -> None:
    """Two copies differing only in zone: the same one wins whichever slice comes first."""
    service, _, _ = load([svc("clusterIP: 10.96.0.10\nports: [{port: 80}]")])
    a, b = (
        yaml.safe_load(
            eps(
                f"ports: [{{port: 80}}]\nendpoints: [{{addresses: [10.1.0.1], zone: {zone}}}]", name
            )
        )
        for name, zone in (("a", "z2"), ("b", "z1"))
    )
    first = translate_service(service, [a, b], None, NODE)
    assert first == translate_service(service, [b, a], None, NODE)
    assert summarize(first) == ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80 zone=z1"]


def test_duplicate_endpoint_hints_tie_break_is_order_independent() -> None:
    """Two copies differing only in hints: the same one wins whichever slice comes first, so
    whether the endpoint serves this zone does not depend on slice order."""
    service, _, _ = load(
        [svc("clusterIP: 10.96.0.10\ntrafficDistribution: PreferClose\nports: [{port: 80}]")]
    )
    a, b = (
        yaml.safe_load(
            eps(
                f"""
                ports: [{{port: 80}}]
                endpoints:
                - {{addresses: [10.1.0.1], hints: {{forZones: [{{name: {zone}}}]}}}}
                - {{addresses: [10.1.0.2], hints: {{forZones: [{{name: z1}}]}}}}
                """,
                name,
            )
        )
        for name, zone in (("a", "z2"), ("b", "z1"))
    )
    first = translate_service(service, [a, b], None, ZONED)
    assert first == translate_service(service, [b, a], None, ZONED)
    assert summarize(first) == ["ClusterIP 10.96.0.10:80/TCP -> 10.1.0.1:80; 10.1.0.2:80"]


def test_node_zone_is_optional_and_hashed() -> None:
    """Callers that know no zone keep working; the zone is part of the node's identity."""
    assert NodeInfo("node-a", ("192.168.1.10",), ("eth0",)).zone == ""
    assert len({ZONED, NodeInfo("node-a", ZONED.addresses, zone="z2"), ZONED}) == 2


def test_labels_and_annotations_sorted() -> None:
    obj = edit(SERVICE, "metadata.labels", {"b": "2", "a": "1"})
    obj["metadata"]["annotations"] = {"z": "26", "y": "25"}
    result = translate_service(obj, [], None, NODE)
    assert result is not None
    assert result.labels == (("a", "1"), ("b", "2"))
    assert result.annotations == (("y", "25"), ("z", "26"))
    assert result.key == ServiceKey("shop", "bad")


def test_pod_labels_and_default_namespace() -> None:
    obj = edit(POD, "metadata.labels", {"app": "agent"})
    del obj["metadata"]["namespace"]
    result = translate_pod(obj, NODE)
    assert result is not None
    assert result.key == ServiceKey("default", "pod:bad")
    assert result.labels == (("app", "agent"),)


def test_invalid_node_address_ignored() -> None:
    obj = edit(SERVICE, "spec.type", "NodePort")
    obj["spec"]["ports"][0]["nodePort"] = 30080
    result = translate_service(obj, [], None, NodeInfo("node-a", ("not-an-ip", "192.168.1.10")))
    assert summarize(result) == [
        "ClusterIP 10.96.0.10:80/TCP -> -",
        "NodePort 127.0.0.1:30080/TCP -> -",
        "NodePort 192.168.1.10:30080/TCP -> -",
    ]


def test_endpoint_without_node_name_is_not_local_on_nameless_node() -> None:
    service, slices, _ = load(
        [
            svc("clusterIP: 10.96.0.10\nports: [{port: 80}]"),
            eps("ports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.1]}]"),
        ]
    )
    result = translate_service(service, slices, None, NodeInfo(""))
    assert result is not None and result.frontends[0].backends[0].local is False


# --- object identity -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "ref", "key"),
    [
        (SERVICE, ("Service", "shop", "bad"), ServiceKey("shop", "bad")),
        (SLICE, ("EndpointSlice", "shop", "bad"), ServiceKey("shop", "web")),
        (ENDPOINTS, ("Endpoints", "shop", "bad"), ServiceKey("shop", "bad")),
        (POD, ("Pod", "shop", "bad"), ServiceKey("shop", "pod:bad")),
        (
            edit(SERVICE, "metadata.namespace", DELETE),
            ("Service", "default", "bad"),
            ServiceKey("default", "bad"),
        ),
        (edit(SLICE, "metadata.labels", {}), ("EndpointSlice", "shop", "bad"), None),
        (edit(SERVICE, "kind", "ConfigMap"), ("ConfigMap", "shop", "bad"), None),
        (edit(SERVICE, "metadata", DELETE), ("Service", "default", ""), None),
        ("junk", ("", "default", ""), None),
    ],
    ids=[
        "service",
        "slice",
        "endpoints",
        "pod",
        "default-namespace",
        "slice-unlabelled",
        "other-kind",
        "no-metadata",
        "junk",
    ],
)
def test_object_ref_and_service_key(
    obj: dict, ref: tuple[str, str, str], key: ServiceKey | None
) -> None:
    assert object_ref(obj) == ref
    assert service_key_of(obj) == key


# --- addresses no manifest may claim (issue 11) ----------------------------------------

# (class, address, the reason validation gives): every class refused as a ClusterIP,
# external, LoadBalancer or endpoint address.
SPECIAL = [
    ("loopback", "127.0.0.1", "is a loopback address"),
    ("loopback-net", "127.5.6.7", "is a loopback address"),
    ("loopback-v6", "::1", "is a loopback address"),
    ("unspecified", "0.0.0.0", "is an unspecified address (0.0.0.0/8)"),
    ("this-network", "0.1.2.3", "is an unspecified address (0.0.0.0/8)"),
    ("unspecified-v6", "::", "is an unspecified address"),
    ("link-local", "169.254.1.1", "is a link-local address (169.254.0.0/16)"),
    ("link-local-v6", "fe80::1", "is a link-local address (fe80::/10)"),
    ("multicast", "224.0.0.1", "is a multicast address (224.0.0.0/4)"),
    ("multicast-top", "239.255.255.255", "is a multicast address (224.0.0.0/4)"),
    ("multicast-v6", "ff02::1", "is a multicast address (ff00::/8)"),
    ("broadcast", "255.255.255.255", "is the broadcast address"),
    ("v4-mapped", "::ffff:10.1.0.1", "is an IPv4-mapped IPv6 address"),
]
# Neighbours of the refused ranges, and ranges some clusters use, that stay valid.
ORDINARY = [
    "126.255.255.255", "128.0.0.1", "1.0.0.0", "169.253.255.255", "169.255.0.1",
    "223.255.255.255", "240.0.0.1", "255.255.255.254", "10.96.0.0",
    "fe7f:ffff::1", "fec0::1", "2001:db8::1", "::2", "::fffe:a01:1", "fd00::1",
]


def v6(address: str) -> bool:
    return ":" in address


def with_cluster_ips(address: str, field: str) -> dict:
    family = "IPv6" if v6(address) else "IPv4"
    obj = edit(SERVICE, "spec.ipFamilies", [family])
    if field == "spec.clusterIP":
        obj["spec"]["clusterIP"] = address
    else:
        obj["spec"]["clusterIP"] = address
        obj["spec"]["clusterIPs"] = [address]
    return obj


def with_slice_address(address: str, index: int) -> dict:
    obj = edit(SLICE, "addressType", "IPv6" if v6(address) else "IPv4")
    ordinary = "fd00::1" if v6(address) else "10.1.0.1"
    obj["endpoints"][0]["addresses"] = [ordinary] * index + [address]
    return obj


def with_pod_ips(address: str, field: str) -> dict:
    obj = edit(POD, "status.podIPs", [{"ip": "10.1.0.1"}, {"ip": address}])
    if field == "status.podIP":
        obj["status"] = {"podIP": address}
    return obj


# (field as the error names it, build(address) -> an object claiming it in that field)
ADDRESS_FIELDS = [
    ("spec.clusterIP", lambda a: with_cluster_ips(a, "spec.clusterIP")),
    ("spec.clusterIPs[0]", lambda a: with_cluster_ips(a, "spec.clusterIPs")),
    ("spec.externalIPs[1]", lambda a: edit(SERVICE, "spec.externalIPs", ["192.0.2.1", a])),
    (
        "status.loadBalancer.ingress[0].ip",
        lambda a: edit(edit(SERVICE, "spec.type", "LoadBalancer"), "status", ingress({"ip": a})),
    ),
    ("spec.loadBalancerIP", lambda a: edit(SERVICE, "spec.loadBalancerIP", a)),
    ("endpoints[0].addresses[0]", lambda a: with_slice_address(a, 0)),
    ("endpoints[0].addresses[1]", lambda a: with_slice_address(a, 1)),
    ("subsets[0].addresses[0].ip", lambda a: edit(ENDPOINTS, "subsets.0.addresses.0.ip", a)),
    (
        "subsets[0].notReadyAddresses[0].ip",
        lambda a: edit(ENDPOINTS, "subsets.0.notReadyAddresses", [{"ip": a}]),
    ),
    ("status.podIP", lambda a: with_pod_ips(a, "status.podIP")),
    ("status.podIPs[1].ip", lambda a: with_pod_ips(a, "status.podIPs")),
]


@pytest.mark.parametrize(
    ("field", "build", "address", "reason"),
    [(f, b, a, r) for f, b in ADDRESS_FIELDS for _, a, r in SPECIAL],
    ids=[f"{f}-{c}" for f, _ in ADDRESS_FIELDS for c, _, _ in SPECIAL],
)
def test_special_addresses_are_refused_in_every_field(
    field: str, build, address: str, reason: str
) -> None:
    obj = build(address)
    kind, ns, name = object_ref(obj)
    with pytest.raises(InvalidObject, match=re.escape(f"{kind} {ns}/{name}: {field}: {address} {reason}")):
        validate_object(obj)


@pytest.mark.parametrize(
    ("field", "build", "address"),
    [(f, b, a) for f, b in ADDRESS_FIELDS for a in ORDINARY],
    ids=[f"{f}-{a}" for f, _ in ADDRESS_FIELDS for a in ORDINARY],
)
def test_ordinary_addresses_pass_in_every_field(field: str, build, address: str) -> None:
    validate_object(build(address))


def test_translation_refuses_what_validation_refuses() -> None:
    """Sources that skip validate_object still never get a loopback ClusterIP served."""
    with pytest.raises(InvalidObject, match=re.escape("spec.clusterIPs[0]: 127.0.0.1 is a loopback")):
        translate_service(with_cluster_ips("127.0.0.1", "spec.clusterIPs"), [], None, NODE)
    bad_slice = with_slice_address("169.254.0.9", 0)
    with pytest.raises(InvalidObject, match=re.escape("endpoints[0].addresses[0]: 169.254.0.9 is a link")):
        translate_service(edit(SERVICE, "metadata.name", "web"), [bad_slice], None, NODE)


def test_a_host_ip_of_any_address_is_no_endpoint() -> None:
    """hostIP 0.0.0.0 means every node address and status.hostIP is the node's: neither is
    an address traffic is delivered to, so neither is refused."""
    obj = edit(POD, "spec.containers.0.ports.0.hostIP", "0.0.0.0")
    obj["status"]["hostIP"] = "192.168.1.10"
    validate_object(obj)


# service.clusterCIDR: ClusterIPs must lie in the configured network of their family.
RULES = AddressRules(("10.96.0.0/16", "fd00:96::/112"))
CIDR_CASES = [
    # (id, ClusterIP, the rules, "" when accepted or the reason)
    ("inside", "10.96.1.2", RULES, ""),
    ("first-host", "10.96.0.1", RULES, ""),
    ("last-host", "10.96.255.254", RULES, ""),
    ("outside", "10.97.0.1", RULES, "is not in service.clusterCIDR 10.96.0.0/16"),
    ("pod-address", "10.244.0.5", RULES, "is not in service.clusterCIDR 10.96.0.0/16"),
    ("network", "10.96.0.0", RULES, "is the network address of service.clusterCIDR 10.96.0.0/16"),
    ("broadcast", "10.96.255.255", RULES, "is the broadcast address of service.clusterCIDR 10.96.0.0/16"),
    ("v6-inside", "fd00:96::5", RULES, ""),
    ("v6-last", "fd00:96::ffff", RULES, ""),
    ("v6-outside", "fd00:97::5", RULES, "is not in service.clusterCIDR fd00:96::/112"),
    ("v6-network", "fd00:96::", RULES, "is the network address of service.clusterCIDR fd00:96::/112"),
    ("special-first", "127.0.0.1", AddressRules(("127.0.0.0/8",)), "is a loopback address"),
    ("no-v6-network", "fd00:97::5", AddressRules(("10.96.0.0/16",)), ""),
    ("no-network", "10.97.0.1", NO_RULES, ""),
    ("slash-32", "10.96.0.7", AddressRules(("10.96.0.7/32",)), ""),
    ("slash-31", "10.96.0.6", AddressRules(("10.96.0.6/31",)), ""),
    ("host-bits", "10.96.3.3", AddressRules(("10.96.1.1/16",)), ""),
]


@pytest.mark.parametrize(
    ("address", "rules", "reason"), [c[1:] for c in CIDR_CASES], ids=[c[0] for c in CIDR_CASES]
)
def test_cluster_ips_lie_in_the_cluster_cidr(address: str, rules: AddressRules, reason: str) -> None:
    obj = with_cluster_ips(address, "spec.clusterIPs")
    if not reason:
        validate_object(obj, rules)
        assert translate_service(obj, [], None, NODE, rules=rules) is not None
        return
    message = f"Service shop/bad: spec.clusterIPs[0]: {address} {reason}"
    with pytest.raises(InvalidObject, match=re.escape(message)):
        validate_object(obj, rules)
    with pytest.raises(InvalidObject, match=re.escape(message)):
        translate_service(obj, [], None, NODE, rules=rules)


def test_cluster_cidr_checks_only_cluster_ips() -> None:
    """External, LoadBalancer and endpoint addresses lie outside the service network."""
    obj = edit(SERVICE, "spec.externalIPs", ["192.0.2.1"])
    obj["spec"]["loadBalancerIP"] = "198.51.100.1"
    validate_object(obj, AddressRules(("10.96.0.0/16",)))
    validate_object(SLICE, AddressRules(("10.96.0.0/16",)))


def test_address_rules() -> None:
    assert RULES.checks_family(4) and RULES.checks_family(6)
    assert not AddressRules(("10.96.0.0/16",)).checks_family(6)
    assert AddressRules(("10.96.1.1/16",)).cluster_cidrs == ("10.96.0.0/16",)
    with pytest.raises(ValueError, match="two IPv4 networks"):
        AddressRules(("10.96.0.0/16", "10.97.0.0/16"))


def test_addresses_for_the_stores_checks() -> None:
    """The store indexes ClusterIPs and endpoint addresses from raw objects: canonical
    text, the field each ClusterIP came from, and nothing raised for broken input."""
    dual = edit(SERVICE, "spec.clusterIPs", ["10.96.0.10", "FD00::0A"])
    assert cluster_ips_of(dual) == [("spec.clusterIPs[0]", "10.96.0.10"), ("spec.clusterIPs[1]", "fd00::a")]
    assert cluster_ips_of(SERVICE) == [("spec.clusterIP", "10.96.0.10")]
    assert cluster_ips_of(edit(SERVICE, "spec.clusterIP", "None")) == []
    assert cluster_ips_of(edit(SERVICE, "spec", "junk")) == []
    slice_ = edit(SLICE, "endpoints", [{"addresses": ["10.1.0.1", "010.001.000.002"]}, "junk", {}])
    assert endpoint_addresses_of(slice_) == {"10.1.0.1", "10.1.0.2"}
    legacy_eps = edit(ENDPOINTS, "subsets.0.notReadyAddresses", [{"ip": "10.1.0.3"}, 7])
    assert endpoint_addresses_of(legacy_eps) == {"10.1.0.1", "10.1.0.3"}
    assert endpoint_addresses_of(with_pod_ips("fd00::1", "status.podIPs")) == {"10.1.0.1", "fd00::1"}
    assert endpoint_addresses_of(SERVICE) == set()
    assert endpoint_addresses_of(edit(SLICE, "endpoints", 5)) == set()
    assert canonical_ip("2001:DB8::1") == "2001:db8::1" and canonical_ip("x") == ""
