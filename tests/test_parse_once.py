"""EndpointSlices from the files source are read once: validation's parse is what the store
translates (translate.checked), and the result is the same as reading them again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from kpr import memory, translate
from kpr.allocator import Allocator
from kpr.config import PortRange
from kpr.model import NodeInfo, Service, ServiceKey
from kpr.sources.files import FilesSource
from kpr.store import ObjectStore
from kpr.translate import SERVICE_NAME_LABEL

NODE = NodeInfo("node1", ("192.168.50.10",), zone="z1")
# IPv6 only: IPv4 ClusterIPs go unchecked, so a slice can list one (see "thief").
CIDRS = ["fd00:96::/112"]


class Publisher:
    def __init__(self) -> None:
        self.services: dict[ServiceKey, Service] = {}

    def upsert(self, service: Service) -> None:
        self.services[service.key] = service

    def delete(self, key: ServiceKey) -> None:
        del self.services[key]

    def sync_complete(self) -> None:
        pass


class DictSink:
    """Hands a store the objects unpacked, as a source without validation's parse would."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def apply(self, upserts, deletes) -> None:
        self.store.apply([memory.unpack(o) for o in upserts], deletes)

    def synced(self) -> None:
        self.store.synced()

    def report_error(self, origin: str, reason: str) -> None:
        self.store.report_error(origin, reason)

    def clear_error(self, origin: str) -> None:
        self.store.clear_error(origin)


def service(name: str, ip: str, **spec: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}], **spec},
    }


def endpoint_slice(svc: str, endpoints: list[dict], name: str = "", address_type: str = "IPv4") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{svc}-1", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }


def manifests() -> dict[str, list[dict]]:
    """Files of services whose slices take every path through the parse."""
    hinted = {"forZones": [{"name": "z1"}]}
    return {
        "a.yaml": [
            service("web", "10.96.0.10", trafficDistribution="PreferClose"),
            endpoint_slice("web", [
                {"addresses": ["10.244.1.1"], "nodeName": "node1", "zone": "z1", "hints": hinted},
                {"addresses": ["10.244.1.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
                {"addresses": ["10.244.1.3"], "conditions": {"ready": False}},
                {"addresses": ["10.244.1.4"], "nodeName": "node2", "zone": "z2", "hints": {"forZones": [{"name": "z2"}]}},
            ]),
            endpoint_slice("web", [{"addresses": ["10.244.1.9"]}], name="web-2"),
            # An endpoint with two addresses: the index reads both, so this takes the long way.
            service("multi", "10.96.0.11"),
            endpoint_slice("multi", [{"addresses": ["10.244.2.1", "10.244.2.2"]}]),
        ],
        "b.yaml": [
            service("pub", "10.96.0.12", publishNotReadyAddresses=True),
            endpoint_slice("pub", [{"addresses": ["10.244.3.1"], "conditions": {"ready": False}}]),
            endpoint_slice("pub", [{"addresses": ["db.example"]}], name="pub-fqdn", address_type="FQDN"),
            # A slice for a service no file defines, and one naming the service of another.
            endpoint_slice("ghost", [{"addresses": ["10.244.4.1"]}]),
            # A ClusterIP another slice lists as an endpoint: the store's index must know the
            # slice's addresses.
            service("thief", "10.244.1.9"),
        ],
    }


def write(d: Path, files: dict[str, list[dict]]) -> None:
    for name, docs in files.items():
        (d / name).write_text(yaml.safe_dump_all(docs))


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every EndpointSlice _parse_slice reads."""
    seen: list[str] = []
    real = translate._parse_slice

    def counting(obj: dict):
        seen.append(obj["metadata"]["name"])
        return real(obj)

    monkeypatch.setattr(translate, "_parse_slice", counting)
    return seen


def run(tmp_path: Path, name: str, sink_of=lambda store: store) -> tuple[FilesSource, ObjectStore, Publisher]:
    d = tmp_path / name
    d.mkdir()
    write(d, manifests())
    src = FilesSource(d, Allocator(tmp_path / f"{name}.json", CIDRS, PortRange(first=30000, last=32767)))
    pub = Publisher()
    store = ObjectStore(NODE, pub, cluster_cidrs=[], origin_of=src.origin_of)
    src.scan_once(sink_of(store))
    return src, store, pub


def test_a_full_sync_reads_each_slice_once_and_translates_as_before(tmp_path: Path, parses: list[str]) -> None:
    src, store, pub = run(tmp_path, "once")
    # Read once each, but for the long way (two addresses, FQDN): validation, then translation.
    assert sorted(parses) == sorted(
        ["web-1", "web-2", "multi-1", "multi-1", "pub-1", "pub-fqdn", "pub-fqdn", "ghost-1"]
    )
    assert translate._checked == {}  # nothing kept past the pass
    parses.clear()
    _, reread, again = run(tmp_path, "twice", DictSink)
    assert len(parses) > 8  # the dicts were read again: the comparison means something
    assert pub.services == again.services
    assert {Path(k).name: v.replace("/once/", "/") for k, v in store.errors.items()} == {
        Path(k).name: v.replace("/twice/", "/") for k, v in reread.errors.items()
    }
    assert store._endpoint_ips == reread._endpoint_ips
    web = pub.services[ServiceKey("shop", "web")]
    # 10.244.1.3 is neither ready nor serving; web-2 has no hints, so no endpoint is left out.
    assert sorted(b.address for b in web.frontends[0].backends) == ["10.244.1.1", "10.244.1.2", "10.244.1.4", "10.244.1.9"]
    assert "10.244.1.9 is an endpoint address of EndpointSlice shop/web-2" in store.errors["service shop/thief"]


def test_a_changed_file_reads_its_slices_once(tmp_path: Path, parses: list[str]) -> None:
    src, store, pub = run(tmp_path, "change")
    parses.clear()
    files = manifests()
    files["a.yaml"][2]["endpoints"] = [{"addresses": ["10.244.1.8"]}]  # web-2 moves
    write(src.path, {"a.yaml": files["a.yaml"]})
    now = time.time() + 5
    os.utime(src.path / "a.yaml", (now, now))
    src.scan_once(store)
    # The file is validated whole, and that is all: web-2 changed, and web's translation
    # takes its parse and that of web-1, whose bytes in the store equal those just read.
    assert sorted(parses) == ["multi-1", "web-1", "web-2"]
    assert translate._checked == {}
    web = pub.services[ServiceKey("shop", "web")]
    assert "10.244.1.8" in {b.address for b in web.frontends[0].backends}
    assert "service shop/thief" not in store.errors  # 10.244.1.9 is nobody's endpoint now


def test_what_the_store_never_takes_is_forgotten_even_when_the_sink_fails(tmp_path: Path) -> None:
    class Failing(DictSink):
        def apply(self, upserts, deletes) -> None:
            raise RuntimeError("sink down")

    with pytest.raises(RuntimeError):
        run(tmp_path, "fail", Failing)
    assert translate._checked == {}
