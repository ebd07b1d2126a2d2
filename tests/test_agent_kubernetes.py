"""The agent with the kubernetes source, end to end but for the kernel: the test API
server -> source -> store -> bus -> a recording plugin, with node facts from the Node
object, `kpr status` and `kpr service list` over the local API, and source metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from kpr import hookimpl
from kpr.config import parse_config
from kpr.daemon import Agent, node_object_facts
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.waiting import free_port, wait_for


class Recorder:
    def __init__(self) -> None:
        self.upserts: list = []

    @hookimpl
    def kpr_service_upsert(self, service):
        self.upserts.append(service)


def node_object(name: str, address: str, zone: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]},
    }


LOCAL_WEB = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]},
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "nodeName": "node1", "conditions": {"ready": True}},
            {"addresses": ["10.244.2.7"], "nodeName": "node2", "conditions": {"ready": True}},
        ],
    },
]


def agent_config(tmp: Path, api: KubeApiServer, node: str, metrics: str = '""'):
    text = textwrap.dedent(
        f"""
        node: {{name: {node}, devices: [lo]}}
        source: {{kind: kubernetes, apiServer: "{api.url}", tokenFile: {api.token_file}, caFile: {api.ca_file}}}
        api: {{socket: {tmp}/{node}.sock}}
        metrics: {{address: {metrics}}}
        agent: {{stateDir: {tmp}/{node}-state, shutdownTimeout: 3}}
        """
    )
    path = tmp / f"{node}.yaml"
    path.write_text(text)
    return path, parse_config(text)


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpr.cli", *args, "--config", str(cfg)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def api():
    with KubeApiServer(bookmark_interval=0.5) as srv:
        srv.create(node_object("node1", "192.168.50.10", "zone-a"))
        srv.create(node_object("node2", "192.168.50.20", "zone-b"))
        for obj in LOCAL_WEB:
            srv.create(obj)
        yield srv


def start(cfg) -> tuple[Agent, Recorder]:
    rec = Recorder()
    agent = Agent(cfg, internal_plugins={"rec": rec})
    agent.setup()
    try:
        wait_for(lambda: agent.bus.synced(), 10, "the agent's sync")
        agent._tick()
    except Exception:
        agent.shutdown()
        raise
    return agent, rec


def test_node_facts_status_service_list_and_metrics(api, tmp_path):
    port = free_port()
    cfg_file, cfg = agent_config(tmp_path, api, "node1", metrics=f'"127.0.0.1:{port}"')
    agent, rec = start(cfg)
    try:
        # Addresses and zone come from the Node object: the config names none, and lo has
        # no global address.
        assert agent.node.addresses == ("192.168.50.10",) and agent.node.zone == "zone-a"
        st = json.loads(cli(cfg_file, "status", "--json").stdout)
        assert st["node"]["addresses"] == ["192.168.50.10"] and st["node"]["zone"] == "zone-a"
        src = st["source"]
        assert src["kind"] == "kubernetes" and src["state"] == "watching" and src["server"] == api.url
        assert src["connection"] == "apiServer" and src["errors"] == {} and "path" not in src
        assert set(src["kinds"]) == {"Node", "Service", "EndpointSlice", "Pod"}
        assert src["secondsSinceLastEvent"] is not None
        text = cli(cfg_file, "status")
        assert "state=watching" in text.stdout and "zone=zone-a" in text.stdout, text.stdout

        rows = json.loads(cli(cfg_file, "service", "list", "--json").stdout)
        # NodePort on the Node's address (and, as kube-proxy does, on localhost).
        assert {r["address"] for r in rows if r["type"] == "NodePort"} == {"192.168.50.10", "127.0.0.1"}
        nodeport = next(r for r in rows if r["type"] == "NodePort" and r["address"] != "127.0.0.1")
        assert nodeport["address"] == "192.168.50.10" and nodeport["port"] == 30080
        assert {b["address"] for b in nodeport["backends"]} == {"10.244.1.5", "10.244.2.7"}

        # The Node's address changes: NodePort follows.
        n = api.get("Node", "", "node1")
        n["status"]["addresses"][0]["address"] = "192.168.50.11"
        api.update_status(n)
        wait_for(lambda: agent.node.addresses == ("192.168.50.11",), 10, "the new node address")
        wait_for(lambda: any(f.address == "192.168.50.11" for s in [rec.upserts[-1]] for f in s.frontends), 10, "NodePort on it")

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kpr_source_events_total{kind="Node",type="MODIFIED"} 1.0' in metrics
        assert 'kpr_source_relists_total{kind="Service"} 0.0' in metrics

        # The API server goes away: status says so, under the watched kinds; nothing is lost.
        api.down()
        api.drop_watches()
        # "disconnected" comes with the first kind whose watch fails again, which may be Node's
        # or Pod's: wait for the status that shows the outage under a service kind as well.
        def outage() -> dict | None:
            st = json.loads(cli(cfg_file, "status", "--json").stdout)
            src = st["source"]
            return st if src["state"] == "disconnected" and {"Service", "EndpointSlice"} & set(src["errors"]) else None

        st = wait_for(outage, 10, "the outage in status, under Service or EndpointSlice")
        assert st["services"] == 1 and st["source"]["lastError"]
        assert "last error" in cli(cfg_file, "status").stdout
        api.up()
        wait_for(lambda: json.loads(cli(cfg_file, "status", "--json").stdout)["source"]["state"] == "watching", 10, "recovery")
    finally:
        assert agent.shutdown() == 0


def test_two_agents_decide_local_traffic_by_their_node_name(api, tmp_path):
    _, cfg1 = agent_config(tmp_path, api, "node1")
    _, cfg2 = agent_config(tmp_path, api, "node2")
    a1, _ = start(cfg1)
    try:
        a2, _ = start(cfg2)
        try:
            for agent, address, local in ((a1, "192.168.50.10", "10.244.1.5"), (a2, "192.168.50.20", "10.244.2.7")):
                svc = next(iter(agent.store.services.values()))
                nodeport = [f for f in svc.frontends if f.type.value == "NodePort" and f.address != "127.0.0.1"]
                assert [f.address for f in nodeport] == [address]
                # externalTrafficPolicy Local: the data path takes only backends marked
                # local, and which are local is decided by each agent's node name.
                assert nodeport[0].external_local
                assert [b.address for b in nodeport[0].backends if b.local] == [local]
                cluster = [f for f in svc.frontends if f.type.value == "ClusterIP"]
                assert {b.address for b in cluster[0].backends} == {"10.244.1.5", "10.244.2.7"}
                assert not cluster[0].internal_local
        finally:
            a2.shutdown()
    finally:
        a1.shutdown()


def test_node_object_facts_ignore_what_is_not_an_address():
    node = node_object("n", "10.0.0.1", "z")
    node["status"]["addresses"] += [{"type": "ExternalIP", "address": "203.0.113.5"}, {"type": "InternalIP", "address": "bogus"}, "junk"]
    assert node_object_facts(node) == (("10.0.0.1", "203.0.113.5"), "z")
    assert node_object_facts(None) == ((), "")
    assert node_object_facts({"metadata": "x", "status": []}) == ((), "")


def test_a_config_without_a_way_to_the_api_server_stops_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = parse_config(f"node: {{name: n, devices: [lo]}}\nsource: {{kind: kubernetes}}\napi: {{socket: {tmp_path}/s}}\nmetrics: {{address: ''}}\nagent: {{stateDir: {tmp_path}/st}}\n")
    agent = Agent(cfg)
    with pytest.raises(Exception, match="no way to reach the API server"):
        agent.setup()
    agent.shutdown()


def test_prefer_close_follows_the_zone_of_the_nodes_node_object(api, tmp_path):
    api.create({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "near", "namespace": "default"},
        "spec": {"trafficDistribution": "PreferClose", "ports": [{"port": 80, "targetPort": 8080}]},
    })
    api.create({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "near-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "near"}},
        "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.1"], "nodeName": "node1", "zone": "zone-a", "conditions": {"ready": True}, "hints": {"forZones": [{"name": "zone-a"}]}},
            {"addresses": ["10.244.2.1"], "nodeName": "node2", "zone": "zone-b", "conditions": {"ready": True}, "hints": {"forZones": [{"name": "zone-b"}]}},
        ],
    })
    _, cfg = agent_config(tmp_path, api, "node1")
    agent, _ = start(cfg)
    try:
        def cluster_backends():
            svc = next(s for k, s in agent.store.services.items() if str(k) == "default/near")
            return {b.address for f in svc.frontends if f.type.value == "ClusterIP" for b in f.backends}

        assert cluster_backends() == {"10.244.1.1"}, "zone-a's endpoint only, the zone from node1's Node"
        # The node moves to zone-b (its label changes at the API server): the backends follow.
        n = api.get("Node", "", "node1")
        n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b"
        api.update(n)
        wait_for(lambda: cluster_backends() == {"10.244.2.1"}, 10, "zone-b's endpoint")
        # A zone no endpoint is hinted for: every endpoint, as kube-proxy falls back.
        n = api.get("Node", "", "node1")
        n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-c"
        api.update(n)
        wait_for(lambda: cluster_backends() == {"10.244.1.1", "10.244.2.1"}, 10, "every endpoint")
    finally:
        agent.shutdown()
