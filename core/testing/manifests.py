"""Kubernetes manifests for tests: a Service and its EndpointSlice as YAML, from a few facts.

    from kpr.testing.manifests import endpoint_slice, service, yaml_docs

    text = yaml_docs(
        service("web", cluster_ip="10.96.0.10"),
        endpoint_slice("web", ["10.244.1.5"]),            # on node1, port 8080
    )
    cfg.manifest("web", text)                             # kpr.testing.agent.AgentConfig

What a test does not name stays out of the document (no ports' names unless `port_name`,
no conditions unless `ready`), as a hand-written manifest would have it; the files source,
kubectl and the test API server all read the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = ["endpoint_slice", "service", "yaml_docs"]


def _family(addr: str) -> str:
    return "IPv6" if ":" in addr else "IPv4"


def service(
    name: str,
    *,
    namespace: str = "default",
    type: str | None = None,
    cluster_ip: str | None = None,
    port: int = 80,
    target_port: int = 8080,
    port_name: str | None = None,
    protocol: str | None = None,
    node_port: int | None = None,
    local: bool | None = None,
    family: str | None = None,
    labels: Mapping[str, str] | None = None,
    lb_ip: str | None = None,
    external_ips: Sequence[str] = (),
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A v1 Service with one port (`port` -> `target_port`). `type` ClusterIP unless given;
    `local`: externalTrafficPolicy Local (True) or Cluster (False); `family` "IPv4"/"IPv6"
    (ipFamilies); `lb_ip`: the address in status.loadBalancer.ingress."""
    p: dict[str, Any] = {}
    if port_name is not None:
        p["name"] = port_name
    p |= {"port": port, "targetPort": target_port}
    if protocol is not None:
        p["protocol"] = protocol
    if node_port is not None:
        p["nodePort"] = node_port
    spec: dict[str, Any] = {}
    if type is not None:
        spec["type"] = type
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    if local is not None:
        spec["externalTrafficPolicy"] = "Local" if local else "Cluster"
    if family is not None:
        spec["ipFamilies"] = [family]
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    spec["ports"] = [p]
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    if lb_ip is not None:
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return doc


def endpoint_slice(
    service: str,
    endpoints: Sequence[str | tuple[str, str | None]],
    *,
    namespace: str = "default",
    name: str | None = None,
    port: int = 8080,
    port_name: str | None = None,
    protocol: str = "TCP",
    node: str | None = "node1",
    ready: bool | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice of `service` (named <service>-1 unless `name`):
    one endpoint per address, each on `node` (or an (address, node) pair naming its own;
    None: no nodeName), conditions.ready when `ready` is given. The address type is the
    first address's family unless `family` says."""
    eps = []
    for ep in endpoints:
        addr, on = (ep, node) if isinstance(ep, str) else ep
        row: dict[str, Any] = {"addresses": [addr]}
        if ready is not None:
            row["conditions"] = {"ready": ready}
        if on is not None:
            row["nodeName"] = on
        eps.append(row)
    p: dict[str, Any] = {}
    if port_name is not None:
        p["name"] = port_name
    p |= {"port": port, "protocol": protocol}
    addr_type = family or (_family(eps[0]["addresses"][0]) if eps else "IPv4")
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service}-1", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": addr_type,
        "ports": [p],
        "endpoints": eps,
    }


def yaml_docs(*docs: Mapping[str, Any]) -> str:
    """The documents as one multi-document YAML text."""
    return yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)
