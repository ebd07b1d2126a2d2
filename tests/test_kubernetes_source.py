"""The kubernetes source against the test API server (kpr.testing.apiserver): initial sync,
changes, selectors, relists without flaps, resumed watches, outages, token rotation and the
three ways to connect. The store is the real one; only its publisher records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kpr.config import SourceSection
from kpr.kube.client import KubeConfigError, connect
from kpr.kube.informer import JitterBackoff
from kpr.model import NodeInfo
from kpr.sources.kubernetes import KubernetesSource, has_host_port, service_selector
from kpr.store import ObjectStore
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.waiting import wait_for

FAST = JitterBackoff(initial=0.05, maximum=0.3)


def service(name: str, ns: str = "default", port: int = 80, labels: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}], **spec},
    }


def endpoint_slice(svc: str, addresses: list[str], ns: str = "default", node: str = "node1", labels: dict | None = None) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-abc", "namespace": ns, "labels": {"kubernetes.io/service-name": svc, **(labels or {})}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "nodeName": node, "conditions": {"ready": True}} for a in addresses],
    }


def node_object(name: str, addresses: list[str], zone: str = "") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone} if zone else {}},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses] + [{"type": "Hostname", "address": name}]},
    }


def pod(name: str, node: str, host_port: int | None) -> dict:
    port = {"containerPort": 8080, "protocol": "TCP"}
    if host_port:
        port["hostPort"] = host_port
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": [port]}]},
        "status": {"phase": "Running", "podIP": "10.244.1.9", "podIPs": [{"ip": "10.244.1.9"}]},
    }


class Recorder:
    """The store's publisher: every upsert and delete, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.synced = 0

    def upsert(self, svc) -> None:
        self.events.append(("upsert", str(svc.key)))

    def delete(self, key) -> None:
        self.events.append(("delete", str(key)))

    def sync_complete(self) -> None:
        self.synced += 1


@pytest.fixture
def api():
    with KubeApiServer(bookmark_interval=0.5) as srv:
        yield srv


class Running:
    def __init__(self, srv: KubeApiServer, node: str = "node1", proxy_name: str = "", idle_timeout: float = 5.0, **section):
        self.section = SourceSection(kind="kubernetes", apiServer=srv.url, tokenFile=srv.token_file, caFile=srv.ca_file, **section)
        self.nodes: list[dict | None] = []
        self.recorder = Recorder()
        self.store = ObjectStore(NodeInfo(name=node, addresses=("192.168.1.1",)), self.recorder, proxy_name=proxy_name)
        self.source = KubernetesSource(self.section, node, proxy_name, on_node=self.nodes.append, backoff=FAST, idle_timeout=idle_timeout)

    def __enter__(self) -> "Running":
        self.source.start(self.store)
        return self

    def __exit__(self, *exc) -> None:
        self.source.stop()
        # Stop aborts the watches mid-stream: without that a watch kept alive by bookmarks
        # (every 0.5 s) would hold its thread for minutes. No clock bound on stop itself (it
        # joins for up to 0.9 s, a loaded CI can take longer and stop is still right).
        wait_for(lambda: all(inf.join(0) for inf in self.source.informers.values()), 10, "every informer's thread ended")

    def synced(self, timeout: float = 10.0) -> None:
        # The store marks itself synced, then tells its publisher (under its lock, on the
        # source's thread): wait for the publisher too, whose count tests read.
        wait_for(lambda: self.store.is_synced and self.recorder.synced, timeout, "the initial sync")

    def has(self, key: str) -> bool:
        return any(str(k) == key for k in self.store.services)

    def backends(self, key: str) -> set[str]:
        svc = next(s for k, s in self.store.services.items() if str(k) == key)
        return {b.address for f in svc.frontends for b in f.backends}


def test_selector_is_kube_proxys():
    assert service_selector("") == "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    assert service_selector("kpr") == "service.kubernetes.io/service-proxy-name=kpr,!service.kubernetes.io/headless"


def test_host_port_pods_only():
    assert has_host_port(pod("a", "node1", 8000))
    assert not has_host_port(pod("a", "node1", None))
    assert not has_host_port({"spec": "garbage"})


def test_stop_aborts_a_quiet_watch():
    """stop() ends a watch that sends nothing: the informers' reads are aborted, not left to
    their idle timeout (60 s here) or the next bookmark (none within the test). The `api`
    fixture's bookmarks every 0.5 s would end them without the abort, so Running's own check
    on exit cannot show it."""
    with KubeApiServer(bookmark_interval=300) as srv:
        srv.create(node_object("node1", ["10.0.0.1"]))
        r = Running(srv, idle_timeout=60.0)
        with r:
            r.synced()
            wait_for(lambda: srv.open_watches == len(r.source.informers), what="every watch open")
            r.source.stop()
            wait_for(lambda: all(inf.join(0) for inf in r.source.informers.values()), 10, "every informer's thread ended")


def test_initial_sync_holds_everything_in_one_batch_then_synced(api):
    api.create(node_object("node1", ["10.0.0.1"], zone="zone-a"))
    for i in range(30):
        api.create(service(f"s{i}"))
        api.create(endpoint_slice(f"s{i}", [f"10.244.0.{i + 1}"]))
    with Running(api, page_size=7) as r:
        r.synced()
        assert r.recorder.synced == 1
        assert len(r.store.services) == 30
        # One batch to the sink, the Node before it.
        assert r.source.applied == 1
        assert r.nodes and r.nodes[0]["metadata"]["name"] == "node1"
        # Every service went out once, already with its endpoints.
        assert len(r.recorder.events) == 30
        assert r.backends("default/s3") == {"10.244.0.4"}
        lists = [q for m, p, q in api.requests if p == "/api/v1/services" and q.get("watch") not in ("true", "1")]
        assert len(lists) == 5, "30 services at 7 a page is 5 pages"
        assert all(q.get("limit") == "7" for q in lists)


def test_changes_and_deletes_flow_by_the_watch(api):
    api.create(node_object("node1", ["10.0.0.1"]))
    with Running(api) as r:
        r.synced()

        def relists():
            kinds = r.source.status()["kinds"]
            return kinds["Service"]["relists"], kinds["EndpointSlice"]["relists"]

        before = relists()
        api.create(service("web"))
        api.create(endpoint_slice("web", ["10.244.1.5"]))
        wait_for(lambda: r.has("default/web") and r.backends("default/web") == {"10.244.1.5"}, what="web with its backend")
        # Brought by the watches, not by listing again (no clock: a loaded CI is slower).
        assert relists() == before
        s = api.get("EndpointSlice", "default", "web-abc")
        s["endpoints"].append({"addresses": ["10.244.1.6"], "nodeName": "node1", "conditions": {"ready": True}})
        api.update(s)
        wait_for(lambda: r.backends("default/web") == {"10.244.1.5", "10.244.1.6"}, what="the second backend")
        api.delete("Service", "default", "web")
        wait_for(lambda: not r.has("default/web"), what="web deleted")
        # The store drops the service and then tells its publisher, on the source's thread:
        # the event may land a moment after the dict no longer holds it.
        wait_for(lambda: ("delete", "default/web") in r.recorder.events, what="the delete published")
        assert relists() == before


def test_server_side_selectors_keep_other_proxies_and_headless_services_away(api):
    api.create(service("mine"))
    api.create(service("theirs", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    api.create(service("headless", labels={"service.kubernetes.io/headless": ""}, clusterIP="None"))
    with Running(api) as r:
        r.synced()
        assert {str(k) for k in r.store.services} == {"default/mine"}
        # The watch starts after the list that made the store synced: wait for its request.
        def watches():
            return [q for m, p, q in api.requests if p == "/api/v1/services" and q.get("watch") in ("true", "1")]
        wait_for(watches, 5, "the services watch")
        assert watches()[0]["labelSelector"] == service_selector("")
    with Running(api, proxy_name="other") as r:
        r.synced()
        assert {str(k) for k in r.store.services} == {"default/theirs"}


def test_relist_after_410_emits_nothing_for_unchanged_services(api):
    for i in range(5):
        api.create(service(f"s{i}"))
        api.create(endpoint_slice(f"s{i}", [f"10.244.0.{i + 1}"]))
    with Running(api) as r:
        r.synced()
        before = list(r.recorder.events)
        relists = r.source.status()["kinds"]["Service"]["relists"]
        # While the server is away, one service changes and one goes; then the server
        # comes back without the history, so the watch cannot resume: a relist.
        api.down()
        s1 = api.get("Service", "default", "s1")
        s1["spec"]["ports"][0]["port"] = 81
        api.update(s1)
        api.delete("Service", "default", "s2")
        api.expire()
        api.up()
        wait_for(lambda: r.source.status()["kinds"]["Service"]["relists"] > relists, 10, "a relist")
        wait_for(lambda: len(r.recorder.events) >= len(before) + 2, 5, "the two changes")
        time.sleep(0.3)
        assert sorted(r.recorder.events[len(before):]) == [("delete", "default/s2"), ("upsert", "default/s1")]


def test_dropped_watch_resumes_from_the_last_resource_version(api):
    api.create(service("a"))
    with Running(api) as r:
        r.synced()
        api.create(service("b"))
        wait_for(lambda: r.has("default/b"), 10, "b")
        last = r.source.informers["Service"].stats.resource_version
        lists = r.source.status()["kinds"]["Service"]["relists"]
        n = len(api.requests)
        api.drop_watches()
        wait_for(
            lambda: any(p == "/api/v1/services" and q.get("watch") in ("true", "1") for m, p, q in api.requests[n:]),
            5, "a new watch",
        )
        rewatch = next(q for m, p, q in api.requests[n:] if p == "/api/v1/services" and q.get("watch") in ("true", "1"))
        assert int(rewatch["resourceVersion"]) >= int(last)
        assert r.source.status()["kinds"]["Service"]["relists"] == lists, "a dropped watch must not relist"
        api.create(service("c"))
        wait_for(lambda: r.has("default/c"), 10, "c after the resumed watch")


def test_outage_keeps_the_last_good_state_and_reports_it_then_recovers(api):
    api.create(node_object("node1", ["10.0.0.1"]))
    api.create(service("web"))
    api.create(endpoint_slice("web", ["10.244.1.5"]))
    with Running(api) as r:
        r.synced()
        api.down()
        api.drop_watches()
        wait_for(lambda: r.source.status()["state"] == "disconnected" and "Service" in r.store.errors, 10, "the outage in status")
        st = r.source.status()
        assert "last good state" in r.store.errors["Service"]
        assert st["lastError"] and st["lastErrorAgeSeconds"] is not None
        time.sleep(1.0)
        assert r.has("default/web") and ("delete", "default/web") not in r.recorder.events
        api.up()
        api.create(service("late"))
        wait_for(lambda: r.has("default/late"), 10, "a change after the outage")
        wait_for(lambda: not r.store.errors, 5.0, "errors cleared")
        assert r.source.status()["state"] == "watching"
        assert ("delete", "default/web") not in r.recorder.events


def test_server_errors_back_off_and_recover(api):
    api.create(service("web"))
    with Running(api) as r:
        r.synced()
        api.fail(500)
        api.drop_watches()
        wait_for(lambda: "500" in r.store.errors.get("Service", ""), 5, "the 500 in status")
        errors = r.source.status()["kinds"]["Service"]["errors"]
        time.sleep(1.0)
        # Backoff: a handful of attempts in a second, not a spin.
        assert r.source.status()["kinds"]["Service"]["errors"] - errors < 15
        api.heal()
        api.create(service("after"))
        wait_for(lambda: r.has("default/after"), 5.0, "a change after the errors")


def test_initial_sync_waits_for_a_server_that_answers_late(api):
    api.create(service("web"))
    api.fail(503)
    with Running(api) as r:
        time.sleep(0.8)
        assert not r.store.is_synced and r.recorder.synced == 0
        assert r.source.status()["state"] == "syncing"
        api.heal()
        r.synced(5)
        assert r.has("default/web")


def test_token_rotation(api):
    api.create(service("web"))
    with Running(api) as r:
        r.synced()
        # The watches start after the lists that made the store synced: one not yet open when
        # the watches are dropped could start with the old token and bring the change itself.
        wait_for(lambda: api.open_watches == len(r.source.informers), what="every watch open")
        api.rotate_token()
        api.drop_watches()
        api.create(service("after"))
        wait_for(lambda: r.has("default/after"), 5.0, "a change after the token rotated")
        assert r.source.status()["tokenRotations"] == 1


def test_invalid_object_is_reported_and_its_last_good_version_kept(api):
    api.create(service("web"))
    with Running(api) as r:
        r.synced()
        bad = api.get("Service", "default", "web")
        bad["spec"]["sessionAffinity"] = "Sometimes"
        api.update(bad)
        wait_for(lambda: any(o.startswith("Service default/web") for o in r.store.errors), 10, "the invalid service reported")
        assert r.has("default/web")
        good = api.get("Service", "default", "web")
        good["spec"]["sessionAffinity"] = "None"
        api.update(good)
        wait_for(lambda: not any(o.startswith("Service default/web") for o in r.store.errors), 10, "the error cleared")


def test_node_object_and_host_port_pods_of_this_node(api):
    api.create(node_object("node1", ["10.0.0.1"], zone="zone-a"))
    api.create(node_object("node2", ["10.0.0.2"]))
    api.create(pod("hp", "node1", 8000))
    api.create(pod("plain", "node1", None))
    api.create(pod("elsewhere", "node2", 8000))
    with Running(api) as r:
        r.synced()
        assert [n["metadata"]["name"] for n in r.nodes] == ["node1"]
        assert {str(k) for k in r.store.services} == {"default/pod:hp"}
        # every Pod of this node reaches the store, hostPorts or not (kpr_pods_changed)
        assert r.store.local_pods == {"default/hp": ("10.244.1.9",), "default/plain": ("10.244.1.9",)}
        n = api.get("Node", "", "node1")
        n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b"
        api.update(n)
        wait_for(lambda: len(r.nodes) == 2, 10, "the node change")
        assert r.nodes[-1]["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-b"
        api.delete("Pod", "default", "hp")
        wait_for(lambda: not r.store.services, 10, "the pod's hostPort gone")


def test_missing_node_is_reported(api):
    with Running(api, node="ghost") as r:
        r.synced()
        assert r.nodes == [None]
        assert any("ghost" in o for o in r.store.errors)


# --- connecting ------------------------------------------------------------------------


def _list_services(conn) -> int:
    from kubernetes.client import CoreV1Api

    return len(CoreV1Api(conn.client).list_service_for_all_namespaces().items)


def test_connect_by_kubeconfig(api, tmp_path):
    api.create(service("web"))
    cfg = api.write_kubeconfig(tmp_path / "kubeconfig")
    conn = connect(SourceSection(kind="kubernetes", kubeconfig=str(cfg)))
    assert _list_services(conn) == 1 and conn.how.startswith("kubeconfig")


def test_connect_in_cluster(api, monkeypatch):
    host, port = api.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    conn = connect(SourceSection(kind="kubernetes", tokenFile=api.token_file, caFile=api.ca_file))
    assert _list_services(conn) == 0 and conn.how == "in-cluster"


def test_connect_refuses_what_it_cannot_use(api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="no way to reach the API server"):
        connect(SourceSection(kind="kubernetes"))
    with pytest.raises(KubeConfigError, match="no such file"):
        connect(SourceSection(kind="kubernetes", kubeconfig=str(tmp_path / "nope")))
    with pytest.raises(KubeConfigError, match="no CA file"):
        connect(SourceSection(kind="kubernetes", apiServer=api.url, tokenFile=api.token_file, caFile=tmp_path / "ca.crt"))
    insecure = tmp_path / "insecure"
    text = Path(api.write_kubeconfig(tmp_path / "k")).read_text()
    import yaml

    doc = yaml.safe_load(text)
    for c in doc["clusters"]:
        c["cluster"].pop("certificate-authority", None)
        c["cluster"].pop("certificate-authority-data", None)
        c["cluster"]["insecure-skip-tls-verify"] = True
    insecure.write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeConfigError, match="always verifies TLS"):
        connect(SourceSection(kind="kubernetes", kubeconfig=str(insecure)))


def test_a_server_with_another_ca_is_never_trusted(api, tmp_path):
    other = tmp_path / "other-ca.pem"
    with KubeApiServer() as second:
        other.write_bytes(Path(second.ca_file).read_bytes())
    section = SourceSection(kind="kubernetes", apiServer=api.url, tokenFile=api.token_file, caFile=other)
    store = ObjectStore(NodeInfo(name="node1"), Recorder())
    src = KubernetesSource(section, "node1", backoff=FAST)
    src.start(store)
    try:
        wait_for(lambda: "Service" in store.errors, 5, "the TLS failure reported")
        assert "CERTIFICATE_VERIFY_FAILED" in store.errors["Service"]
        assert not store.is_synced
    finally:
        src.stop()


def test_a_stalled_server_is_noticed_and_left_behind_when_it_answers_again(api):
    api.create(node_object("node1", ["10.0.0.1"]))
    api.create(service("web"))
    with Running(api, idle_timeout=1.0) as r:
        r.synced()
        api.stall()
        wait_for(lambda: "timed out" in r.store.errors.get("Service", ""), 10, "the silent watch given up")
        assert r.has("default/web")
        api.heal()
        api.create(service("after"))
        wait_for(lambda: r.has("default/after"), 5.0, "a change once the server answers")
        wait_for(lambda: not r.store.errors, 5.0, "errors cleared")
