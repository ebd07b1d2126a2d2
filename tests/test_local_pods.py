"""Pods on this node reach plugins: the store follows Pod objects (both sources deliver them)
and publishes the whole set when it changes; the bus delivers it as kpr_pods_changed, the
latest set replacing one not delivered yet; host_routing takes the addresses from it."""

from __future__ import annotations

import threading

from kpr.bus import Backoff, EventBus
from kpr.model import NodeInfo
from kpr.plugins.host_routing.plugin import HostRouting
from kpr.store import ObjectStore

NODE = NodeInfo("node1", addresses=("10.0.0.1",))


def pod(name: str, node: str = "node1", ips: tuple[str, ...] = ("10.244.1.5",), *, phase: str = "Running",
        host_network: bool = False) -> dict:
    spec: dict = {"nodeName": node, "containers": [{"name": "c"}]}
    if host_network:
        spec["hostNetwork"] = True
    status: dict = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": a} for a in ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            "status": status}


class Publisher:
    def __init__(self) -> None:
        self.pods: list[dict[str, tuple[str, ...]]] = []

    def upsert(self, service) -> None: ...
    def delete(self, key) -> None: ...
    def sync_complete(self) -> None: ...

    def pods_changed(self, pods: dict[str, tuple[str, ...]]) -> None:
        self.pods.append(pods)


def test_store_publishes_the_pods_of_this_node() -> None:
    pub = Publisher()
    store = ObjectStore(NODE, pub)
    store.apply([
        pod("web", ips=("10.244.1.5", "fd44:1::5")),
        pod("elsewhere", node="node2", ips=("10.244.2.5",)),
        pod("hostnet", host_network=True, ips=("10.0.0.1",)),
        pod("done", phase="Succeeded", ips=("10.244.1.6",)),
        pod("pending", ips=()),
    ], [])
    assert pub.pods == [{"shop/web": ("10.244.1.5", "fd44:1::5")}]
    store.apply([pod("elsewhere", node="node2", ips=("10.244.2.6",))], [])  # not ours: nothing new
    assert len(pub.pods) == 1
    store.apply([pod("pending", ips=("10.244.1.7",))], [])  # got its address
    assert pub.pods[-1] == {"shop/web": ("10.244.1.5", "fd44:1::5"), "shop/pending": ("10.244.1.7",)}
    store.apply([pod("web", phase="Failed")], [("Pod", "shop", "pending")])
    assert pub.pods[-1] == {}
    assert store.local_pods == {}


def test_store_without_a_pods_publisher_still_works() -> None:
    class Plain:
        def upsert(self, service) -> None: ...
        def delete(self, key) -> None: ...
        def sync_complete(self) -> None: ...

    store = ObjectStore(NODE, Plain())
    store.apply([pod("web")], [])
    assert store.local_pods == {"shop/web": ("10.244.1.5",)}


def test_bus_delivers_kpr_pods_changed_latest_set_wins() -> None:
    calls: list[tuple[str, object]] = []
    gate = threading.Event()

    def invoke(hook: str, **kw: object) -> None:
        gate.wait(5)
        calls.append((hook, kw.get("pods")))

    bus = EventBus(backoff=Backoff(initial=0.01, maximum=0.05))
    bus.add_plugin("p", invoke)
    bus.start()
    try:
        for i in range(5):
            bus.pods_changed({"shop/web": (f"10.244.1.{i}",)})
        gate.set()
        assert bus.wait_idle(5)
    finally:
        bus.stop()
    pods_calls = [c for c in calls if c[0] == "kpr_pods_changed"]
    assert pods_calls[-1] == ("kpr_pods_changed", {"shop/web": ("10.244.1.4",)})
    assert len(pods_calls) <= 2  # the burst coalesced (one may have been taken before the gate held)


def test_host_routing_takes_pod_addresses_from_kpr_pods_changed() -> None:
    hr = HostRouting()
    hr.kpr_pods_changed(pods={"shop/web": ("10.244.1.5", "fd44:1:0::5"), "shop/db": ("10.244.1.6",)})
    assert hr.source_pods == {"10.244.1.5", "fd44:1::5", "10.244.1.6"}
