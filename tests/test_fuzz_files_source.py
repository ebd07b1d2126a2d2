"""Property-based: malformed manifests fed through the files source into a running agent.

Hypothesis mutates valid Services, EndpointSlices and Pods (wrong types, missing fields,
out-of-range ports, bad addresses, huge values, unicode, nulls, deep nesting, unknown keys,
corrupt bytes) and writes them, a batch at a time, into the manifests directory of an
in-process agent (files source, a recording plugin, the local API on a unix socket). After
each batch: the agent lives and answers status over its socket, every malformed file that
cannot be served is reported under its path in source.errors, nothing crashed (no traceback
logged), and every valid service of 00-good.yaml is served exactly as before.

Two kinds of variant:
- colliding: keeps the (kind, namespace, name) of a good object, or breaks it into an invalid
  one. It is always reported: as invalid, or as a duplicate that 00-good.yaml wins.
- fresh: the same mutations in a namespace of its own. It may happen to be valid, and then it
  is served; it must never touch the good services, nor crash anything on the way into the
  model.

The run is derandomized (the same examples every time, no example database), so CI is
repeatable; KPR_FUZZ_BATCHES raises the number of batches and KPR_FUZZ_RANDOM=1 draws new
examples, for a longer hunt.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import textwrap
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kpr import api, hookimpl
from kpr.config import parse_config
from kpr.daemon import Agent
from kpr.model import PluginStatus
from kpr.testing.waiting import wait_for

BATCH = 12
BATCHES = int(os.environ.get("KPR_FUZZ_BATCHES", "45"))
# Fresh variants: positions 1, 4, 7, 10 of a batch. The last file written is a colliding one,
# so once it is reported, the pass that read it had every file of the batch to read.
FRESH_EVERY = 3
# KPR_FUZZ_RANDOM=1: new examples every run (a longer hunt), instead of CI's fixed ones.
DERANDOMIZE = not os.environ.get("KPR_FUZZ_RANDOM")

GOOD: list[dict] = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            "selector": {"app": "web"},
        },
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "nodeName": "node1", "conditions": {"ready": True}},
            {"addresses": ["10.244.2.7"], "nodeName": "node2", "conditions": {"ready": False, "serving": True, "terminating": True}},
        ],
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "shop", "namespace": "default", "annotations": {"service.kpr.io/lb-algorithm": "maglev"}},
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.20",
            "externalTrafficPolicy": "Local",
            "sessionAffinity": "ClientIP",
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 5353, "nodePort": 30053, "protocol": "UDP"},
            ],
        },
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "shop-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "shop"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": ["10.244.1.9"], "nodeName": "node1", "zone": "a", "hints": {"forZones": [{"name": "a"}]}},
            {"addresses": ["10.244.3.9"], "nodeName": "node3"},
        ],
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "lb", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.30",
            "externalIPs": ["192.0.2.10"],
            "loadBalancerSourceRanges": ["198.51.100.0/24"],
            "ports": [{"port": 443, "targetPort": 8443, "nodePort": 30443}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}},
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "lb-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "lb"}},
        "addressType": "IPv4",
        "ports": [{"port": 8443}],
        "endpoints": [{"addresses": ["10.244.1.20", "10.244.1.21"], "nodeName": "node1"}],
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "hp", "namespace": "default"},
        "spec": {
            "nodeName": "node1",
            "containers": [{"name": "c", "ports": [{"containerPort": 8443, "hostPort": 9443, "protocol": "TCP"}]}],
        },
        "status": {"podIP": "10.244.1.30", "podIPs": [{"ip": "10.244.1.30"}]},
    },
]

IDENTITY = {("kind",), ("metadata",), ("metadata", "name"), ("metadata", "namespace")}

BAD_STRINGS = [
    "", " ", "10.0.0.300", "::g", "1.2.3", "256.1.1.1", "0.0.0.0", "127.0.0.1", "255.255.255.255",
    "224.0.0.1", "169.254.1.1", "fe80::1", "::", "::1", "::ffff:10.0.0.1", "10.96.0.10/32", "0x0a000001",
    "010.001.001.001", "1.2.3.4 ", "tcp", "TCP ", "SCTP", "ClusterIP", "NodePort", "ExternalName", "Local",
    "Cluster", "PreferClose", "http", "-1", "65536", "1e3", "null", "~", "yes", "ü", "名前", "😀" * 40,
    "\u202eevil", "a\tb", "line\nbreak", "x" * 70000, "kubernetes.io/service-name", "${HOME}", "- x",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**16 + 80, 2**31, 2**32 + 80, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(BAD_STRINGS),
)


def nest(depth: int, leaf: object = 1) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


values = st.one_of(
    scalars,
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), inner, max_size=4),
        max_leaves=10,
    ),
    st.integers(20, 90).map(nest),
)
# Values of the same type as the one they replace: variants drawn from these are often valid,
# and then odd-but-valid objects go all the way into the model and to the plugins.
PLAUSIBLE_STRINGS = ["TCP", "UDP", "SCTP", "http", "dns", "Local", "Cluster", "ClientIP", "None", "NodePort",
                     "LoadBalancer", "ClusterIP", "ExternalName", "IPv4", "IPv6", "FQDN", "node1", "node2", "a",
                     "PreferClose", "10.96.0.10", "10.96.0.20", "192.168.50.10", "0.0.0.0/0", "2001:db8::/64", ""]


def plausible_like(old: object) -> st.SearchStrategy:
    if isinstance(old, bool):
        return st.booleans()
    if isinstance(old, int):
        return st.one_of(st.integers(1, 65535), st.sampled_from([0, -1, 65536, 2**31]))
    if isinstance(old, str):
        return st.one_of(st.sampled_from(PLAUSIBLE_STRINGS), st.ip_addresses().map(str), st.text(max_size=10))
    # Frozen copies: a strategy must not change with the document it was drawn for.
    if isinstance(old, list):
        return st.lists(st.sampled_from(tuple(own(old))), max_size=len(old) + 2) if old else st.just([])
    if isinstance(old, dict):
        keys, vals = tuple(sorted(old, key=str)), tuple(own(list(old.values())))
        return st.dictionaries(st.sampled_from(keys), st.sampled_from(vals), max_size=len(old)) if old else st.just({})
    return st.none()

# Values that break an identity field: never a usable kind, name or namespace of another
# object (any string would be a valid name or namespace, so none is drawn for those).
identity_breakers = st.one_of(
    st.sampled_from([0, 1, -1, True, False, 1.5, float("nan"), [], ["web"], {}, {"name": "web"}]),
    st.lists(scalars, min_size=1, max_size=3),
    st.integers(20, 90).map(nest),
)
kind_breakers = st.one_of(identity_breakers, st.sampled_from(["", "ConfigMap", "service", "Secret", "EndpointSliceList"]))
# Corruptions of the serialized bytes that no parser accepts: NUL, bytes that are no UTF-8.
CORRUPT = [b"\x00", b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: object, path: tuple) -> object:
    for p in path:
        doc = doc[p]  # type: ignore[index]
    return doc


def own(value: object) -> object:
    """A private copy of a drawn value. Later mutations change it in place, and a drawn value
    may be shared: a constant of sampled_from, or (strategies are cached by their arguments)
    a part of an earlier example; changing one of those makes generation depend on history."""
    return copy.deepcopy(value)


@st.composite
def variant(draw, mild: bool = False) -> tuple[str, bytes, dict | None]:
    """(file suffix, the file's bytes, the mutated object or None when the bytes are corrupt).
    `mild` draws replacements from plausible values."""
    doc = copy.deepcopy(draw(st.sampled_from(GOOD)))
    for _ in range(draw(st.integers(1, 2 if mild else 3))):
        paths = [p for p in _paths(doc) if p and not (mild and (p in IDENTITY or p == ("apiVersion",)))]
        if not isinstance(doc, dict) or not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(doc, path[:-1]), path[-1]
        op = "replace" if mild else draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if path in IDENTITY:
            if op == "delete" and path != ("metadata", "namespace"):
                del parent[key]
            elif path == ("metadata", "namespace"):
                parent[key] = own(draw(st.one_of(st.none(), st.just(""), identity_breakers)))
            elif path == ("kind",):
                parent[key] = own(draw(kind_breakers))
            elif path == ("metadata",):
                # A mapping could be valid metadata naming another object.
                parent[key] = own(draw(identity_breakers.filter(lambda v: not isinstance(v, dict))))
            else:
                parent[key] = own(draw(identity_breakers))
        elif op == "replace":
            parent[key] = own(draw(plausible_like(parent[key]) if mild else values))
        elif op == "delete":
            del parent[key]
        else:
            target = _get(doc, path)
            if isinstance(target, dict):
                new_key = draw(st.one_of(st.text(max_size=12), st.integers(-3, 3), st.sampled_from(["status", "spec", "x" * 300])))
                if new_key not in target and not (path == ("metadata",) and new_key in ("name", "namespace")):
                    target[new_key] = own(draw(values))
            elif isinstance(target, list):
                target.append(own(draw(values)))
            else:
                parent[key] = own(draw(values))
    fmt = draw(st.sampled_from(["yaml", "yaml", "json", "list"] + ([] if mild else ["corrupt"])))
    if fmt == "json":
        return ".json", json.dumps(doc).encode(), doc
    if fmt == "list":
        return ".yaml", yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [doc]}, sort_keys=False, allow_unicode=True).encode(), doc
    data = yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans())).encode()
    if fmt == "corrupt":
        at = draw(st.integers(0, len(data)))
        cut = draw(st.booleans())
        data = data[:at] + draw(st.sampled_from(CORRUPT)) + (b"" if cut else data[at:])
        return ".yaml", data, None
    return ".yaml", data, doc


class Recorder:
    """The last state each service reached the plugins in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: dict[str, object] = {}
        self.calls = 0

    @hookimpl
    def kpr_service_upsert(self, service):
        with self.lock:
            self.calls += 1
            self.services[str(service.key)] = service

    @hookimpl
    def kpr_service_delete(self, key):
        with self.lock:
            self.calls += 1
            self.services.pop(str(key), None)

    @hookimpl
    def kpr_status(self):
        return PluginStatus(healthy=True, counters={"calls": self.calls})


class CrashLog(logging.Handler):
    """Every log record that carries a traceback: some code caught what it did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "crash" in record.getMessage() or "scan_failed" in record.getMessage():
            self.records.append(record)


def _category(reason: str) -> str:
    for words, category in (
        ("which wins; ignored here", "duplicate of a good object"),
        ("not UTF-8", "bytes: not UTF-8"),
        ("binary file", "bytes: binary"),
        ("nested deeper", "too deep"),
        ("not valid YAML", "not YAML"),
        ("is not supported", "kind not supported"),
        ("not a mapping", "not a mapping"),
    ):
        if words in reason:
            return category
    return "invalid object"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_malformed_manifests_never_hurt_the_agent_or_the_good_services(tmp_path):
    manifests = tmp_path / "m"
    manifests.mkdir()
    write_atomic(manifests / "00-good.yaml", yaml.safe_dump_all(GOOD, sort_keys=False).encode())
    sock = tmp_path / "kpr.sock"
    cfg = parse_config(
        textwrap.dedent(
            f"""
            node: {{name: node1, addresses: [192.168.50.10], devices: [lo]}}
            source: {{kind: files, path: {manifests}, statePath: {tmp_path}/alloc.json, pollInterval: 0.02}}
            service: {{clusterCIDR: [10.96.0.0/16]}}
            api: {{socket: {sock}}}
            metrics: {{address: ""}}
            agent: {{stateDir: {tmp_path}/state, shutdownTimeout: 3}}
            """
        )
    )
    rec = Recorder()
    crashes = CrashLog()
    logging.getLogger().addHandler(crashes)
    agent = Agent(cfg, internal_plugins={"rec": rec})
    agent.setup()
    fed = {"variants": 0, "fresh": 0, "fresh_served": 0, "corrupt": 0, "batches": 0}
    reasons: dict[str, int] = {}
    try:
        # In process, nothing ticks the agent's ready flag: synced and delivered is the same.
        wait_for(lambda: api.get(sock, "/v1/status")["source"]["synced"], 20, "source synced")
        good_rows = api.get(sock, "/v1/services")
        good_keys = {r["service"] for r in good_rows}
        assert {"default/web", "default/shop", "default/lb"} <= good_keys and len(good_keys) == 4, good_keys
        wait_for(lambda: good_keys <= set(rec.services), 10, "good services delivered to the plugin")
        with rec.lock:
            good_models = {k: rec.services[k] for k in good_keys}
        assert api.get(sock, "/v1/status")["source"]["errors"] == {}
        previous: list[Path] = []

        @settings(
            max_examples=BATCHES,
            deadline=None,
            derandomize=DERANDOMIZE,
            database=None,
            # No shrinking: every replay costs a batch through the agent, and the failing
            # batch's files are named in the failure anyway.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(st.lists(st.one_of(variant(), variant(mild=True)), min_size=BATCH, max_size=BATCH))
        def feed(batch):
            n = fed["batches"]
            fed["batches"] += 1
            for p in previous:
                p.unlink(missing_ok=True)
            previous.clear()
            colliding: list[Path] = []
            for i, (suffix, data, doc) in enumerate(batch):
                fresh = i % FRESH_EVERY == 1 and i < BATCH - 1 and doc is not None
                if fresh:
                    # The same mutation in a namespace of its own: serialised again so the
                    # namespace is in the bytes (corrupt bytes stay colliding).
                    doc = copy.deepcopy(doc)
                    meta = doc.get("metadata") if isinstance(doc, dict) else None
                    if isinstance(meta, dict) and meta.get("namespace") in (None, "", "default"):
                        meta["namespace"] = f"fuzz-{n}"
                        data = json.dumps(doc).encode() if suffix == ".json" else yaml.safe_dump(doc, sort_keys=False).encode()
                    else:
                        fresh = False
                path = manifests / f"bad-{n:03d}-{i:02d}{'-fresh' if fresh else ''}{suffix}"
                write_atomic(path, data)
                previous.append(path)
                fed["variants"] += 1
                fed["fresh"] += fresh
                fed["corrupt"] += doc is None
                if not fresh:
                    colliding.append(path)

            # Every colliding file is reported under its own path (which also tells that the
            # pass that read the batch is done: a pass reads every changed file).
            def reported():
                st_ = api.get(sock, "/v1/status")
                errors = st_["source"]["errors"]
                return st_ if all(str(p) in errors for p in colliding) else None

            def unreported() -> str:
                errors = api.get(sock, "/v1/status")["source"]["errors"]
                missing = {p.name: p.read_bytes()[:3000] for p in colliding if str(p) not in errors}
                return f"not reported: {missing}\nerrors: {errors}"

            status = wait_for(reported, 10, f"batch {n}: every colliding file reported", show=unreported)
            errors = status["source"]["errors"]
            for p in colliding:
                reason = errors[str(p)]
                assert "\n" not in reason and len(reason) <= 2000, reason
                reasons[_category(reason)] = reasons.get(_category(reason), 0) + 1
            assert not [o for o in errors if "00-good" in o], errors
            fed["fresh_served"] += sum(1 for p in previous if "-fresh" in p.name and str(p) not in errors)
            for p in previous:
                if "-fresh" in p.name and str(p) in errors and os.environ.get("KPR_FUZZ_DEBUG"):
                    print("FRESH", errors[str(p)][:200])

            # The agent lives: the source polls, the API answers, no traceback anywhere.
            assert agent.source._thread is not None and agent.source._thread.is_alive()
            assert not crashes.records, [crashes.format(r) for r in crashes.records]
            assert status["plugins"]["rec"]["healthy"] is True, status["plugins"]["rec"]

            # Every good service is served exactly as before, in the API and at the plugin.
            rows = [r for r in api.get(sock, "/v1/services") if r["service"] in good_keys]
            if rows != good_rows:
                missing = [r for r in good_rows if r not in rows]
                extra = [r for r in rows if r not in good_rows]
                now = api.get(sock, "/v1/status")["source"]["errors"]
                raise AssertionError(f"batch {n}: good services changed: missing {missing}, extra {extra}; errors {now}")
            with rec.lock:
                for key, model in good_models.items():
                    assert rec.services.get(key) == model, key

        feed()
    finally:
        logging.getLogger().removeHandler(crashes)
        agent.shutdown()
    print(f"\nfed {fed}\ncolliding files reported as {sorted(reasons.items(), key=lambda kv: -kv[1])}")
    assert fed["variants"] >= 500 or BATCHES * BATCH < 500, fed
    assert fed["corrupt"] > 0 and fed["fresh"] > 0


# Found by a longer run of the hunt above (KPR_FUZZ_BATCHES=2500): one valid EndpointSlice in
# any namespace listing a served ClusterIP took that service down. The store now lets an
# endpoint count only against a ClusterIP that is the newcomer (see ObjectStore._conflicts).
def test_a_slice_elsewhere_cannot_take_a_served_cluster_ip_down(tmp_path):
    from kpr.allocator import Allocator
    from kpr.config import PortRange
    from kpr.model import NodeInfo
    from kpr.sources.files import FilesSource
    from kpr.store import ObjectStore

    class Publisher:
        def __init__(self) -> None:
            self.deleted: list[str] = []

        def upsert(self, service) -> None:
            pass

        def delete(self, key) -> None:
            self.deleted.append(str(key))

        def sync_complete(self) -> None:
            pass

    manifests = tmp_path / "m"
    manifests.mkdir()
    write_atomic(manifests / "00-good.yaml", yaml.safe_dump_all(GOOD, sort_keys=False).encode())
    src = FilesSource(manifests, Allocator(tmp_path / "a.json", ["10.96.0.0/16"], PortRange(first=30000, last=32767)))
    pub = Publisher()
    node = NodeInfo(name="node1", addresses=("192.168.50.10",), devices=("lo",))
    store = ObjectStore(node, pub, cluster_cidrs=["10.96.0.0/16"], origin_of=src.origin_of)
    src.scan_once(store)
    assert "default/web" in {str(s.key) for s in store.snapshot()}
    slice_elsewhere = copy.deepcopy(GOOD[3])
    slice_elsewhere["metadata"]["namespace"] = "other"
    slice_elsewhere["endpoints"][0]["addresses"] = ["10.96.0.10"]  # web's ClusterIP
    write_atomic(manifests / "other.yaml", yaml.safe_dump(slice_elsewhere).encode())
    src.scan_once(store)
    assert "default/web" in {str(s.key) for s in store.snapshot()}
    assert pub.deleted == []
