"""ObjectStore: the checks across objects that no single manifest can show wrong (issue 11).

A ClusterIP equal to one of the node's addresses, or to an address an EndpointSlice,
Endpoints or Pod lists as an endpoint, would take the traffic meant for that host or pod.
The service claiming it is refused (its last good state withdrawn when that serves the
address); the endpoint's own service is served; removing the conflict lets the claimer in.
Also: ClusterIPs outside service.clusterCIDR refused, a warning when a family has no
network, and errors naming the file with the files source (unit, and `kpr status --json`
of a running agent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kpr.allocator import Allocator
from kpr.config import PortRange, SourceSection
from kpr.kube.informer import JitterBackoff
from kpr.model import FrontendType, NodeInfo, Service, ServiceKey
from kpr.sources.files import FilesSource
from kpr.sources.kubernetes import KubernetesSource
from kpr.store import ObjectStore
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.waiting import free_port, wait_for
from kpr.translate import SERVICE_NAME_LABEL

NODE = NodeInfo("node1", ("192.168.50.10", "fd50::10"))
WEB = ServiceKey("shop", "web")
DB = ServiceKey("shop", "db")


class Publisher:
    """Records what the store publishes, as the bus would receive it."""

    def __init__(self) -> None:
        self.services: dict[ServiceKey, Service] = {}
        self.calls: list[tuple[str, str]] = []

    def upsert(self, service: Service) -> None:
        self.services[service.key] = service
        self.calls.append(("upsert", str(service.key)))

    def delete(self, key: ServiceKey) -> None:
        del self.services[key]
        self.calls.append(("delete", str(key)))

    def sync_complete(self) -> None:
        pass

    def cluster_ips(self, key: ServiceKey) -> list[str]:
        service = self.services.get(key)
        if service is None:
            return []
        return sorted({f.address for f in service.frontends if f.type is FrontendType.CLUSTER_IP})


def service(name: str, *cluster_ips: str, ns: str = "shop") -> dict:
    spec: dict = {"ports": [{"name": "http", "port": 80}]}
    if cluster_ips:
        spec["clusterIP"] = cluster_ips[0]
        spec["clusterIPs"] = list(cluster_ips)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(svc: str, *addresses: str, name: str = "", ns: str = "shop") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{svc}-1", "namespace": ns, "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": "IPv6" if addresses and ":" in addresses[0] else "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [a]} for a in addresses],
    }


def legacy_endpoints(svc: str, *addresses: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": svc, "namespace": "shop"},
        "subsets": [{"addresses": [{"ip": a} for a in addresses], "ports": [{"name": "http", "port": 8080}]}],
    }


def host_port_pod(name: str, address: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8081}]}]},
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    }


def ref(obj: dict) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])


def make(**kw) -> tuple[ObjectStore, Publisher]:
    pub = Publisher()
    return ObjectStore(NODE, pub, **kw), pub


# --- a ClusterIP that is an endpoint's address -----------------------------------------

# (id, the objects listing 10.244.1.5 as an endpoint, the object the error names)
LISTERS = [
    ("slice", [endpoint_slice("db", "10.244.1.5")], "EndpointSlice shop/db-1"),
    ("legacy-endpoints", [legacy_endpoints("db", "10.244.1.5")], "Endpoints shop/db"),
    ("pod", [host_port_pod("agent", "10.244.1.5")], "Pod shop/agent"),
    ("not-ready", [{**endpoint_slice("db", "10.244.1.5"), "endpoints": [
        {"addresses": ["10.244.1.5"], "conditions": {"ready": False}}]}], "EndpointSlice shop/db-1"),
]


@pytest.mark.parametrize("order", ["claim-first", "endpoint-first", "one-batch"])
@pytest.mark.parametrize(("listers", "named"), [c[1:] for c in LISTERS], ids=[c[0] for c in LISTERS])
def test_a_cluster_ip_that_is_an_endpoint_address_is_refused(listers: list[dict], named: str, order: str) -> None:
    store, pub = make()
    claimer = [service("web", "10.244.1.5"), endpoint_slice("web", "10.244.2.1")]
    owner = [service("db", "10.96.0.20"), *listers]
    if order == "claim-first":
        store.apply(claimer, [])
        store.apply(owner, [])
    elif order == "endpoint-first":
        store.apply(owner, [])
        store.apply(claimer, [])
    else:
        store.apply(claimer + owner, [])
    assert WEB not in pub.services
    assert store.errors["service shop/web"] == (
        f"Service shop/web: spec.clusterIPs[0]: 10.244.1.5 is an endpoint address of {named}; not served"
    )
    # The endpoint's own service is not refused.
    assert pub.cluster_ips(DB) == ["10.96.0.20"]
    assert "service shop/db" not in store.errors


@pytest.mark.parametrize(
    "remove",
    ["delete-slice", "slice-drops-address", "claimer-moves"],
)
def test_removing_the_conflict_lets_the_claimer_in(remove: str) -> None:
    store, pub = make()
    db_slice = endpoint_slice("db", "10.244.1.5", "10.244.1.6")
    store.apply([service("web", "10.244.1.5"), service("db", "10.96.0.20"), db_slice], [])
    assert WEB not in pub.services
    if remove == "delete-slice":
        store.apply([], [ref(db_slice)])
        expected = ["10.244.1.5"]
    elif remove == "slice-drops-address":
        store.apply([endpoint_slice("db", "10.244.1.6")], [])
        expected = ["10.244.1.5"]
    else:
        store.apply([service("web", "10.96.0.21")], [])
        expected = ["10.96.0.21"]
    assert pub.cluster_ips(WEB) == expected
    assert "service shop/web" not in store.errors


def test_an_address_listed_twice_stays_listed_until_both_go() -> None:
    store, pub = make()
    a, b = endpoint_slice("db", "10.244.1.5", name="db-a"), endpoint_slice("db", "10.244.1.5", name="db-b")
    store.apply([service("web", "10.244.1.5"), service("db", "10.96.0.20"), a, b], [])
    store.apply([], [ref(a)])
    assert WEB not in pub.services and "EndpointSlice shop/db-b" in store.errors["service shop/web"]
    store.apply([], [ref(b)])
    assert pub.cluster_ips(WEB) == ["10.244.1.5"]


def test_a_served_service_that_becomes_a_hijacker_is_withdrawn() -> None:
    """Without a service network nothing tells a ClusterIP from a pod's address: the pod,
    once a slice lists it, wins, and the service's last good state goes (it would hijack)."""
    store, pub = make()
    store.apply([service("web", "10.244.1.5")], [])
    assert pub.cluster_ips(WEB) == ["10.244.1.5"]
    store.apply([service("db", "10.96.0.20"), endpoint_slice("db", "10.244.1.5")], [])
    assert WEB not in pub.services and pub.calls[-1] == ("delete", "shop/web")
    assert "is an endpoint address of EndpointSlice shop/db-1" in store.errors["service shop/web"]


def test_inside_service_cluster_cidr_a_cluster_ip_always_beats_an_endpoint_listing_it() -> None:
    """No pod lives in the service network: a slice listing one of its addresses cannot
    refuse the service, not even when both arrive at once (an agent's restart)."""
    store, pub = make(cluster_cidrs=["10.96.0.0/16"])
    store.apply([service("web", "10.96.0.10"), service("db", "10.96.0.20"), endpoint_slice("db", "10.96.0.10")], [])
    assert pub.cluster_ips(WEB) == ["10.96.0.10"] and "service shop/web" not in store.errors
    # Nor later, once served.
    store.apply([endpoint_slice("db", "10.96.0.10", name="db-2")], [])
    assert pub.cluster_ips(WEB) == ["10.96.0.10"] and ("delete", "shop/web") not in pub.calls


def test_a_change_that_conflicts_keeps_the_last_good_state() -> None:
    """A service served at a harmless address that asks for a pod's keeps what it had."""
    store, pub = make()
    store.apply([service("web", "10.96.0.10"), service("db", "10.96.0.20"), endpoint_slice("db", "10.244.1.5")], [])
    store.apply([service("web", "10.244.1.5")], [])
    assert pub.cluster_ips(WEB) == ["10.96.0.10"]
    assert "spec.clusterIPs[0]: 10.244.1.5 is an endpoint address" in store.errors["service shop/web"]


def test_dual_stack_names_the_conflicting_family() -> None:
    store, pub = make()
    store.apply(
        [service("web", "10.96.0.10", "fd44::5"), service("db", "10.96.0.20"), endpoint_slice("db", "FD44::5")], []
    )
    assert WEB not in pub.services
    assert "spec.clusterIPs[1]: fd44::5 is an endpoint address of EndpointSlice shop/db-1" in store.errors["service shop/web"]


def test_a_service_whose_own_slice_lists_its_cluster_ip_is_refused() -> None:
    """Its ClusterIP would still capture connections to that pod from everyone else."""
    store, pub = make()
    store.apply([service("web", "10.244.1.5"), endpoint_slice("web", "10.244.1.5")], [])
    assert WEB not in pub.services
    assert "EndpointSlice shop/web-1" in store.errors["service shop/web"]


def test_services_that_get_no_data_path_are_not_checked() -> None:
    store, pub = make()
    headless = service("web", "None")
    other_proxy = service("db", "10.244.1.5")
    other_proxy["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    store.apply([headless, other_proxy, endpoint_slice("x", "10.244.1.5")], [])
    assert store.errors == {}


# --- a ClusterIP that is the node's address --------------------------------------------


def test_a_cluster_ip_equal_to_a_node_address_is_refused_and_follows_the_node() -> None:
    store, pub = make()
    store.apply([service("web", "192.168.50.10"), service("db", "10.96.0.20", "FD50::10")], [])
    assert WEB not in pub.services and DB not in pub.services
    assert store.errors["service shop/web"] == (
        "Service shop/web: spec.clusterIPs[0]: 192.168.50.10 is an address of this node (node1); not served"
    )
    assert "spec.clusterIPs[1]: fd50::10 is an address of this node" in store.errors["service shop/db"]
    store.set_node(NodeInfo("node1", ("192.168.50.11",)))
    assert pub.cluster_ips(WEB) == ["192.168.50.10"] and pub.cluster_ips(DB) == ["10.96.0.20", "fd50::10"]
    assert store.errors == {}
    # The node takes the address back: the service serving it is withdrawn.
    store.set_node(NodeInfo("node1", ("192.168.50.10",)))
    assert WEB not in pub.services and "service shop/web" in store.errors


# --- service.clusterCIDR ---------------------------------------------------------------


def test_cluster_ips_outside_the_cluster_cidr_are_refused_for_any_source() -> None:
    """The kubernetes source validates without the config; the store checks the range."""
    store, pub = make(cluster_cidrs=["10.96.0.0/16"])
    store.apply([service("web", "10.97.0.10"), service("db", "10.96.0.20")], [])
    assert WEB not in pub.services and pub.cluster_ips(DB) == ["10.96.0.20"]
    assert store.errors["service shop/web"] == (
        "Service shop/web: spec.clusterIPs[0]: 10.97.0.10 is not in service.clusterCIDR 10.96.0.0/16"
    )
    assert store.warnings == {}


def test_a_family_without_cluster_cidr_is_accepted_with_one_warning() -> None:
    store, pub = make(cluster_cidrs=["10.96.0.0/16"])
    store.apply([service("web", "10.96.0.10", "fd00::10"), service("db", "10.96.0.20", "fd00::20")], [])
    assert pub.cluster_ips(WEB) == ["10.96.0.10", "fd00::10"] and DB in pub.services
    assert store.warnings == {
        "service.clusterCIDR IPv6": "no IPv6 network configured: IPv6 ClusterIPs are not range-checked "
        "(first seen: shop/db fd00::20)"
    }
    assert store.errors == {}


# --- the file named, with the files source ---------------------------------------------


def files_source(tmp_path: Path, cidrs: tuple[str, ...] = ("10.96.0.0/16",)) -> FilesSource:
    (tmp_path / "m").mkdir()
    allocator = Allocator(tmp_path / "alloc.json", list(cidrs), PortRange(first=30000, last=32767))
    return FilesSource(tmp_path / "m", allocator, poll_interval=0.05)


def write(path: Path, *docs: dict) -> None:
    path.write_text(yaml.safe_dump_all(docs))


def test_files_source_names_the_file_object_and_field_and_keeps_the_rest(tmp_path: Path) -> None:
    # IPv4 without a service network: the thief is caught by the endpoint listing it.
    src = files_source(tmp_path, cidrs=("fd00:96::/112",))
    store, pub = make(cluster_cidrs=["fd00:96::/112"], origin_of=src.origin_of)
    m = src.path
    write(
        m / "shop.yaml",
        service("loop", "127.0.0.1"),
        service("outside", "fd00:97::1"),
        service("web", "10.96.0.10"),
        endpoint_slice("web", "10.244.1.5"),
    )
    write(m / "thief.yaml", service("thief", "10.244.1.5"))
    src.scan_once(store)
    assert pub.cluster_ips(WEB) == ["10.96.0.10"]  # the rest of the file stays in force
    shop = store.errors[str(m / "shop.yaml")]
    assert "Service shop/loop: spec.clusterIPs[0]: 127.0.0.1 is a loopback address; skipped" in shop
    assert "Service shop/outside: spec.clusterIPs[0]: fd00:97::1 is not in service.clusterCIDR fd00:96::/112; skipped" in shop
    assert store.errors["service shop/thief"] == (
        f"Service shop/thief (in {m / 'thief.yaml'}): spec.clusterIPs[0]: 10.244.1.5 is an endpoint "
        f"address of EndpointSlice shop/web-1 (in {m / 'shop.yaml'}); not served"
    )
    assert ServiceKey("shop", "thief") not in pub.services

    # Fixed in place: the files source's last good version of "loop" was none, so it
    # appears now; the thief moves to a free address and is let in.
    write(m / "thief.yaml", service("thief", "10.96.0.99"))
    write(
        m / "shop.yaml",
        service("loop", "10.96.0.11"),
        service("outside", "fd00:96::12"),
        service("web", "10.96.0.10"),
        endpoint_slice("web", "10.244.1.5"),
    )
    time.sleep(0.01)  # a new mtime for the rewritten files
    src.scan_once(store)
    assert store.errors == {}
    assert pub.cluster_ips(ServiceKey("shop", "thief")) == ["10.96.0.99"]
    assert pub.cluster_ips(ServiceKey("shop", "loop")) == ["10.96.0.11"]


def test_files_source_without_cluster_cidr_checks_no_range(tmp_path: Path) -> None:
    src = files_source(tmp_path, cidrs=())
    store, pub = make(origin_of=src.origin_of)
    write(src.path / "web.yaml", service("web", "10.97.0.10"))
    src.scan_once(store)
    assert pub.cluster_ips(WEB) == ["10.97.0.10"] and store.errors == {}
    assert "service.clusterCIDR IPv4" in store.warnings


# --- the kubernetes source: an API server that lets a bad address through ----------------


def test_kubernetes_source_gets_the_same_checks() -> None:
    """The test API server, like a misconfigured or older real one, stores these services;
    the kubernetes source refuses the loopback ClusterIP (validate_object) and the store the
    one outside service.clusterCIDR and the one that is a pod's address."""
    with KubeApiServer(bookmark_interval=0.5) as api:
        for obj in (
            service("loop", "127.0.0.1", ns="default"),
            service("outside", "fd00:97::1", ns="default"),
            service("thief", "10.96.1.5", ns="default"),
            service("db", "10.96.0.20", ns="default"),
            endpoint_slice("db", "10.96.1.5", ns="default"),
            service("web", "10.96.0.10", ns="default"),
        ):
            api.create(obj)
        section = SourceSection(kind="kubernetes", apiServer=api.url, tokenFile=api.token_file, caFile=api.ca_file)
        pub = Publisher()
        # IPv4 without a service network, so the thief is judged by the endpoint listing it.
        store = ObjectStore(NODE, pub, cluster_cidrs=["fd00:96::/112"])
        src = KubernetesSource(section, "node1", backoff=JitterBackoff(initial=0.05, maximum=0.3))
        src.start(store)
        try:
            wait_for(lambda: store.is_synced, 10, "the initial sync")
            assert sorted(str(k) for k in pub.services) == ["default/db", "default/web"]
            errors = store.errors
            assert "spec.clusterIPs[0]: 127.0.0.1 is a loopback address" in errors["Service default/loop"]
            assert errors["service default/outside"] == (
                "Service default/outside: spec.clusterIPs[0]: fd00:97::1 is not in service.clusterCIDR fd00:96::/112"
            )
            assert errors["service default/thief"] == (
                "Service default/thief: spec.clusterIPs[0]: 10.96.1.5 is an endpoint address of "
                "EndpointSlice default/db-1; not served"
            )
            # The pod leaves the slice: the claimer is let in.
            api.update(endpoint_slice("db", "10.96.1.6", ns="default"))
            wait_for(lambda: pub.cluster_ips(ServiceKey("default", "thief")) == ["10.96.1.5"], 5, "the thief let in")
        finally:
            src.stop()


# --- kpr status --json of a running agent ----------------------------------------------


def test_refusals_show_in_kpr_status_json(tmp_path: Path) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    write(manifests / "bad.yaml", service("loop", "127.0.0.1"), service("web", "192.168.0.10"))
    write(manifests / "node.yaml", service("node", "192.168.50.10"))
    cfg = tmp_path / "kpr.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            node: {{name: node1, addresses: [192.168.50.10], devices: [lo]}}
            source: {{kind: files, path: {manifests}, statePath: {tmp_path}/alloc.json, pollInterval: 0.05}}
            service: {{clusterCIDR: [192.168.0.0/16]}}
            api: {{socket: {tmp_path}/kpr.sock}}
            metrics: {{address: "127.0.0.1:{free_port()}"}}
            agent: {{stateDir: {tmp_path}/state, shutdownTimeout: 3}}
            """
        )
    )
    kpr = [sys.executable, "-m", "kpr.cli"]
    proc = subprocess.Popen(kpr + ["run", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        status: dict = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(kpr + ["status", "--json", "--config", str(cfg)], capture_output=True, text=True)
            if out.returncode == 0:
                status = json.loads(out.stdout)
                if status["ready"] and len(status["source"]["errors"]) == 2:
                    break
            time.sleep(0.1)
        errors = status["source"]["errors"]
        assert "Service shop/loop: spec.clusterIPs[0]: 127.0.0.1 is a loopback address" in errors[str(manifests / "bad.yaml")]
        assert errors["service shop/node"] == (
            f"Service shop/node (in {manifests / 'node.yaml'}): spec.clusterIPs[0]: 192.168.50.10 "
            "is an address of this node (node1); not served"
        )
        rows = json.loads(
            subprocess.run(kpr + ["service", "list", "--json", "--config", str(cfg)], capture_output=True, text=True, check=True).stdout
        )
        assert [r["service"] for r in rows] == ["shop/web"]
    finally:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    # ... and in the log.
    assert "127.0.0.1 is a loopback address" in stderr
    assert "192.168.50.10 is an address of this node" in stderr


def test_counts_follow_every_publication() -> None:
    store, pub = make()

    def recount() -> tuple[int, int, int]:
        services = list(pub.services.values())
        return (
            len(services),
            sum(len(s.frontends) for s in services),
            sum(len(f.backends) for s in services for f in s.frontends),
        )

    steps = [
        ([service("web", "10.96.0.10"), endpoint_slice("web", "10.244.1.1", "10.244.1.2")], []),
        ([service("db", "10.96.0.11", "fd00::11"), endpoint_slice("db", "10.244.2.1")], []),
        ([endpoint_slice("web", "10.244.1.1")], []),  # a backend fewer
        ([host_port_pod("agent", "10.244.3.1")], []),
        ([service("thief", "10.244.1.1")], []),  # refused: an endpoint's address
        ([], [ref(endpoint_slice("web"))]),  # web loses its backends, keeps its frontend
        ([], [ref(service("db"))]),
    ]
    seen = set()
    for upserts, deletes in steps:
        store.apply(upserts, deletes)
        assert store.counts() == recount()
        seen.add(store.counts())
    assert len(seen) == len(steps) - 1  # every step but the refused one changed something
    # A service that becomes a hijacker is withdrawn, and no longer counted.
    store.apply([service("web2", "10.96.0.20")], [])
    store.apply([endpoint_slice("db", "10.96.0.20")], [])
    assert ServiceKey("shop", "web2") not in pub.services
    assert store.counts() == recount()


def test_two_services_claiming_one_address_both_follow_its_listing() -> None:
    store, pub = make()
    a, b = ServiceKey("shop", "a"), ServiceKey("shop", "b")
    store.apply([service("a", "10.244.1.5"), service("b", "10.244.1.5")], [])
    assert pub.cluster_ips(a) == pub.cluster_ips(b) == ["10.244.1.5"]
    store.apply([endpoint_slice("db", "10.244.1.5")], [])  # both claims are now hijacks
    assert a not in pub.services and b not in pub.services
    assert {"service shop/a", "service shop/b"} <= store.errors.keys()
    store.apply([], [ref(endpoint_slice("db"))])
    assert pub.cluster_ips(a) == pub.cluster_ips(b) == ["10.244.1.5"]
    # One claimer left: the listing still reaches it, and only it.
    store.apply([service("a", "10.96.0.9")], [])
    store.apply([endpoint_slice("db", "10.244.1.5")], [])
    assert pub.cluster_ips(a) == ["10.96.0.9"] and b not in pub.services
    assert "service shop/a" not in store.errors
    store.apply([], [ref(service("b"))])
    store.apply([], [ref(endpoint_slice("db"))])
    assert store._claims == {"10.96.0.9": a}


def test_a_published_service_has_the_stores_own_key() -> None:
    """One ServiceKey per service: the model's is the one the store keys it by, not a copy
    made by translation (20k services held 20k more)."""
    store, pub = make(cluster_cidrs=["10.96.0.0/16"])
    store.apply([service("web", "10.96.0.10"), endpoint_slice("web", "10.244.1.5")], [])
    (key,) = store.services
    assert pub.services[WEB].key is key
    assert store.services[key].key is key
    # the ClusterIP's claim holds the same object, not one made for the index
    assert store._claims["10.96.0.10"] is key


def test_a_services_members_follow_its_objects_through_every_shape() -> None:
    """What feeds a service (its Service, slices, legacy Endpoints) is followed through
    adds, removals and re-adds in any order; the model is the same as a fresh store's at
    each step. The Service's own ref is implied by the key and a service of one slice keeps
    that slice's ref alone, no tuple of two (64 bytes a service, 1.3 MB at 20k)."""
    store, pub = make()
    backends = lambda: sorted(b.address for f in pub.services[WEB].frontends for b in f.backends)  # noqa: E731
    held: dict[tuple[str, str, str], dict] = {}

    def step(upserts: list[dict], deletes: list[dict]) -> None:
        for o in upserts:
            held[ref(o)] = o
        for o in deletes:
            held.pop(ref(o))
        store.apply(upserts, [ref(o) for o in deletes])
        fresh, fresh_pub = make()
        fresh.apply(list(held.values()), [])
        assert pub.services == fresh_pub.services and store.counts() == fresh.counts()

    web, s1, s2, s3 = (service("web", "10.96.0.10"), endpoint_slice("web", "10.244.1.1", name="web-1"),
                       endpoint_slice("web", "10.244.1.2", name="web-2"), endpoint_slice("web", "10.244.1.3", name="web-3"))
    step([s1], [])  # a slice before its Service: nothing served yet
    assert WEB not in pub.services and store._members[WEB] == ref(s1)
    step([web], [])
    assert backends() == ["10.244.1.1"] and store._members[WEB] == ref(s1)
    step([s2, s3], [])
    assert backends() == ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
    step([], [s1, s3])
    assert backends() == ["10.244.1.2"] and store._members[WEB] == ref(s2)
    step([], [s2])
    assert backends() == [] and store._members[WEB] == ()  # the Service alone
    step([legacy_endpoints("web", "10.244.1.9")], [])
    assert backends() == ["10.244.1.9"]
    step([], [web])
    assert WEB not in pub.services and store._members[WEB] == ref(legacy_endpoints("web"))
    step([], [legacy_endpoints("web")])
    assert WEB not in store._members and WEB not in pub.services
    step([web, s1], [])
    assert backends() == ["10.244.1.1"]
    step([], [web, s1])
    assert WEB not in store._members
    # A service's refs beyond eight are a set: followed as well.
    many = [endpoint_slice("web", f"10.244.2.{i}", name=f"web-{i}") for i in range(1, 11)]
    step([web, *many], [])
    assert len(backends()) == 10 and type(store._members[WEB]) is set
    step([], many[:9])
    assert backends() == ["10.244.2.10"]
    # set_node translates every service again, one of a Service alone included.
    step([service("db", "10.96.0.11")], [])
    store.set_node(NodeInfo("node1", ("192.168.50.11",)))
    assert DB in pub.services and backends() == ["10.244.2.10"]
