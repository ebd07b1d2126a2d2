"""FilesSource: manifests in a directory, fed to a sink as the API server would feed it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from kpr import memory
from kpr.allocator import Allocator
from kpr.config import PortRange
from kpr.sources.files import FilesSource, parse_manifest
from kpr.testing.waiting import wait_for

RANGE = PortRange(first=30000, last=32767)


class RecordingSink:
    """Keeps what a store would keep, and every call in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple] = []
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.errors: dict[str, str] = {}
        self.batches: list[tuple[list[dict], list[tuple[str, str, str]]]] = []
        self.synced_calls = 0

    def apply(self, upserts, deletes):
        with self.lock:
            self.events.append(("apply", len(upserts), len(deletes)))
            upserts = [memory.unpack(o) for o in upserts]  # objects may come packed
            self.batches.append((upserts, list(deletes)))
            for ref in deletes:
                assert ref in self.objects, f"delete of unknown {ref}"
                del self.objects[ref]
            for obj in upserts:
                m = obj["metadata"]
                self.objects[(obj["kind"], m["namespace"], m["name"])] = obj

    def synced(self):
        with self.lock:
            self.events.append(("synced",))
            self.synced_calls += 1

    def report_error(self, origin, reason):
        with self.lock:
            self.events.append(("error", origin, reason))
            self.errors[origin] = reason

    def clear_error(self, origin):
        with self.lock:
            self.events.append(("clear", origin))
            assert origin in self.errors, f"clear of unreported {origin}"
            del self.errors[origin]

    def get(self, kind: str, name: str, ns: str = "default") -> dict | None:
        with self.lock:
            return self.objects.get((kind, ns, name))


def service(name: str, ns: str | None = None, **spec) -> dict:
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}])
    meta: dict = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def slice_(svc: str, *addresses: str, name: str | None = None) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{svc}-abc", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "nodeName": "node1"} for a in addresses],
    }


def write(path: Path, *docs: dict) -> None:
    # Write then rename, as editors and kubectl-style tools do, so a poll never sees half.
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    os.replace(tmp, path)


def make(tmp_path: Path, cidrs=("10.96.0.0/16",), rng: PortRange = RANGE, poll: float = 0.05, **kw) -> FilesSource:
    d = tmp_path / "services.d"
    d.mkdir(parents=True, exist_ok=True)
    alloc = Allocator(tmp_path / "state" / "allocations.json", list(cidrs), rng)
    # Emptiness trusted at once unless a test says otherwise: several tests remove the last
    # file and expect its objects gone (the grace period has tests of its own below).
    kw.setdefault("empty_grace_period", 0)
    return FilesSource(d, alloc, poll_interval=poll, **kw)



# --- initial state and sync ------------------------------------------------------------------


def test_initial_batch_then_synced_once(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("web"), slice_("web", "10.244.0.5", "10.244.1.5"))
    write(src.path / "b.yml", service("db", ns="data"))
    sink = RecordingSink()
    assert src.scan_once(sink)
    assert sink.events[0] == ("apply", 3, 0)
    assert sink.events[1] == ("synced",)
    assert set(sink.objects) == {
        ("Service", "default", "web"),
        ("EndpointSlice", "default", "web-abc"),
        ("Service", "data", "db"),
    }
    assert not src.scan_once(sink)
    assert not src.scan_once(sink)
    assert sink.synced_calls == 1
    assert sink.errors == {}


def test_synced_even_when_empty_or_directory_missing(tmp_path):
    alloc = Allocator(tmp_path / "alloc.json", [], RANGE)
    src = FilesSource(tmp_path / "nope", alloc, poll_interval=0.05)
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.synced_calls == 1
    assert "does not exist" in sink.errors[str(tmp_path / "nope")]
    (tmp_path / "nope").mkdir()
    write(tmp_path / "nope" / "a.yaml", service("web"))
    src.scan_once(sink)
    assert sink.errors == {}
    assert sink.get("Service", "web") is not None
    assert sink.synced_calls == 1


def test_parses_lists_json_multidoc_and_skips_other_files(tmp_path):
    src = make(tmp_path)
    d = src.path
    (d / "list.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [service("l1"), service("l2")]}))
    typed = {"apiVersion": "v1", "kind": "ServiceList", "items": [{k: v for k, v in service("t1").items() if k != "kind"}]}
    (d / "typed.yaml").write_text(yaml.safe_dump(typed))
    (d / "one.json").write_text(json.dumps(service("j1")))
    (d / "multi.yaml").write_text("---\n" + yaml.safe_dump(service("m1")) + "---\n" + yaml.safe_dump(service("m2")) + "---\n")
    for ignored in (".hidden.yaml", "#auto.yaml#", "backup.yaml~", "notes.txt", ".multi.yaml.swp"):
        (d / ignored).write_text(yaml.safe_dump(service("ignored-" + ignored.strip(".#~"))))
    (d / "sub").mkdir()
    (d / "sub" / "deep.yaml").write_text(yaml.safe_dump(service("deep")))
    sink = RecordingSink()
    src.scan_once(sink)
    assert sorted(n for (_, _, n) in sink.objects) == ["j1", "l1", "l2", "m1", "m2", "t1"]
    assert sink.errors == {}
    assert sink.get("Service", "t1")["metadata"]["namespace"] == "default"


def test_parse_manifest_reports_line():
    with pytest.raises(Exception, match="flow sequence started at line 3"):
        parse_manifest("x.yaml", b"kind: Service\nmetadata:\n  name: [oops\n")
    with pytest.raises(Exception, match="line 2"):
        parse_manifest("x.json", b'{"kind": "Service",\n  oops}')
    with pytest.raises(Exception, match="not a mapping"):
        parse_manifest("x.yaml", b"- a\n- b\n")


@pytest.mark.parametrize(
    "text",
    [
        # 19+ digits: orjson (the fast reader) makes a float of these, json an int.
        '{"kind": "Service", "spec": {"ports": [{"port": 18446744073709551616}], "x": 1.5}}',
        '{"kind": "Service", "spec": {"port": -9223372036854775809, "y": [0.25]}}',
        '{"kind": "List", "items": [{"kind": "Service", "big": 123456789012345678901234567890}]}',
        # What orjson refuses and json reads: json's reading.
        '{"kind": "Service", "a": NaN, "b": Infinity, "c": 1e400}',
        '{"kind": "Service", "name": "\\ud800"}',
        '{"kind": "Service", "a": 1, "a": 2, "b": 0.1, "c": -0, "d": 18446744073709551615}',
    ],
)
def test_parse_manifest_json_reads_as_json_does(text):
    # The files source reads JSON with orjson when it can; every object must be exactly
    # what json.loads makes (types included: a port of 2**64 is an int, refused as such).
    expected = json.loads(text)
    expected = expected["items"] if expected["kind"] == "List" else [expected]
    got = parse_manifest("x.json", text.encode())
    assert repr(got) == repr(expected)
    assert [type(v) for d in got for v in d.values()] == [type(v) for d in expected for v in d.values()]
    big = got[0].get("spec", got[0]).get("ports", [{}])[0].get("port") if "ports" in text else None
    if big is not None:
        assert type(big) is int


def test_parse_manifest_yaml_with_floats(tmp_path):
    # A YAML file with a float goes through the same depth walk (its reader is not orjson).
    assert parse_manifest("x.yaml", b"kind: Service\nspec:\n  x: 1.5\n") == [{"kind": "Service", "spec": {"x": 1.5}}]


# --- live reload -------------------------------------------------------------------------------


def test_live_add_modify_delete(tmp_path):
    src = make(tmp_path)
    sink = RecordingSink()
    src.start(sink)
    try:
        wait_for(lambda: sink.synced_calls == 1)
        assert sink.objects == {}

        write(src.path / "web.yaml", service("web"), slice_("web", "10.244.0.5"))
        wait_for(lambda: sink.get("EndpointSlice", "web-abc") is not None)
        assert sink.get("Service", "web") is not None
        n_batches = len(sink.batches)

        # Only the object that changed is sent again.
        write(src.path / "web.yaml", service("web"), slice_("web", "10.244.0.5", "10.244.0.6"))
        wait_for(lambda: len(sink.get("EndpointSlice", "web-abc")["endpoints"]) == 2)
        upserts, deletes = sink.batches[n_batches]
        assert [o["kind"] for o in upserts] == ["EndpointSlice"] and deletes == []

        # A rewrite with the same content sends nothing.
        n_batches = len(sink.batches)
        write(src.path / "web.yaml", service("web"), slice_("web", "10.244.0.5", "10.244.0.6"))
        time.sleep(0.3)
        assert len(sink.batches) == n_batches

        # Dropping an object from a file deletes just that one.
        write(src.path / "web.yaml", service("web"))
        wait_for(lambda: sink.get("EndpointSlice", "web-abc") is None)
        assert sink.get("Service", "web") is not None

        (src.path / "web.yaml").unlink()
        wait_for(lambda: sink.objects == {})
        assert sink.batches[-1] == ([], [("Service", "default", "web")])
        assert sink.synced_calls == 1
    finally:
        src.stop()


def test_in_place_edit_is_seen(tmp_path):
    src = make(tmp_path)
    sink = RecordingSink()
    path = src.path / "web.yaml"
    path.write_text(yaml.safe_dump(service("web")))
    src.scan_once(sink)
    # Same size and inode, only the mtime moves: still a change.
    text = path.read_text().replace("port: 80", "port: 81")
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    src.scan_once(sink)
    assert sink.get("Service", "web")["spec"]["ports"][0]["port"] == 81


def test_stop_is_quick(tmp_path):
    src = make(tmp_path, poll=30)
    sink = RecordingSink()
    src.start(sink)
    wait_for(lambda: sink.synced_calls == 1)
    thread = src._thread
    src.stop()
    # The thread sleeps 30 s between polls: its end well before that shows stop cut the sleep
    # short (no clock bound on stop itself: its join is what a loaded machine stretches). This
    # source's thread, not every "kpr-files" one (another test's may still be running).
    wait_for(lambda: not thread.is_alive(), 10)


# --- bad files -----------------------------------------------------------------------------------


def test_malformed_yaml_keeps_last_good_until_fixed(tmp_path):
    src = make(tmp_path)
    sink = RecordingSink()
    path = src.path / "web.yaml"
    write(path, service("web"), slice_("web", "10.244.0.5"))
    src.scan_once(sink)
    good = dict(sink.objects)

    path.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n")
    src.scan_once(sink)
    assert sink.objects == good  # nothing deleted
    assert "line 4" in sink.errors[str(path)]

    path.write_text("- just\n- a list\n")
    src.scan_once(sink)
    assert "not a mapping" in sink.errors[str(path)]
    assert sink.objects == good

    write(path, service("web"))
    src.scan_once(sink)
    assert sink.errors == {}
    assert ("clear", str(path)) in sink.events
    assert set(sink.objects) == {("Service", "default", "web")}


def test_broken_file_at_start_is_reported_and_others_apply(tmp_path):
    src = make(tmp_path)
    (src.path / "bad.yaml").write_text("kind: Service\n  : :\n")
    write(src.path / "good.yaml", service("web"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "web")}
    assert list(sink.errors) == [str(src.path / "bad.yaml")]
    assert sink.synced_calls == 1


def test_unknown_kind_is_reported_and_skipped(tmp_path):
    src = make(tmp_path)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {}}
    path = src.path / "mixed.yaml"
    write(path, cm, service("web"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "web")}
    reason = sink.errors[str(path)]
    assert "ConfigMap" in reason and "default/settings" in reason


def test_invalid_object_keeps_last_good_and_others_apply(tmp_path):
    src = make(tmp_path)
    path = src.path / "web.yaml"
    write(path, service("web"), slice_("web", "10.244.0.5"))
    sink = RecordingSink()
    src.scan_once(sink)
    good_svc = sink.get("Service", "web")

    bad = service("web", ports=[{"port": 99999}])
    write(path, bad, slice_("web", "10.244.0.5", "10.244.0.6"), service("new", ports=[{"port": "x"}]))
    src.scan_once(sink)
    assert sink.get("Service", "web") == good_svc
    assert len(sink.get("EndpointSlice", "web-abc")["endpoints"]) == 2
    assert sink.get("Service", "new") is None  # invalid from the start: never sent
    reason = sink.errors[str(path)]
    assert "Service default/web" in reason and "last good" in reason
    assert "Service default/new" in reason

    write(path, service("web", ports=[{"port": 81}]), slice_("web", "10.244.0.5"))
    src.scan_once(sink)
    assert sink.errors == {}
    assert sink.get("Service", "web")["spec"]["ports"][0]["port"] == 81


def test_invalid_object_kept_across_unchanged_passes_and_deleted_with_file(tmp_path):
    src = make(tmp_path)
    path = src.path / "web.yaml"
    write(path, service("web"))
    sink = RecordingSink()
    src.scan_once(sink)
    write(path, service("web", ports=[{"port": 0}]))
    src.scan_once(sink)
    write(path, service("web", ports=[{"port": -1}]))  # still invalid: still the first good one
    src.scan_once(sink)
    assert sink.get("Service", "web")["spec"]["ports"][0]["port"] == 80
    path.unlink()
    src.scan_once(sink)
    assert sink.objects == {} and sink.errors == {}


def test_duplicate_object_first_file_wins(tmp_path):
    src = make(tmp_path)
    write(src.path / "b.yaml", service("web", ports=[{"port": 2}]))
    write(src.path / "a.yaml", service("web", ports=[{"port": 1}]))
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.get("Service", "web")["spec"]["ports"][0]["port"] == 1
    reason = sink.errors[str(src.path / "b.yaml")]
    assert "Service default/web" in reason and "a.yaml" in reason
    assert str(src.path / "a.yaml") not in sink.errors

    # The winner goes: the other copy takes over and the complaint goes with it.
    (src.path / "a.yaml").unlink()
    src.scan_once(sink)
    assert sink.get("Service", "web")["spec"]["ports"][0]["port"] == 2
    assert sink.errors == {}
    assert ("Service", "default", "web") not in sum((d for _, d in sink.batches), [])


def test_objects_go_in_file_order_each_under_the_file_that_wins_it(tmp_path):
    """A pass handles (allocates, sends) objects file by file, in sorted file names, each in
    its file's order, an object two files define at its place in the winning (first) file:
    automatic values so follow the files. A first pass (everything new) orders them without
    sorting (`_in_order`); a pass with little changed sorts: both the same."""
    src = make(tmp_path)
    write(src.path / "b.yaml", service("x"), service("y", ports=[{"port": 2}]), service("w"))
    write(src.path / "a.yaml", service("z"), service("y", ports=[{"port": 1}]), slice_("z", "10.244.0.5"))
    for i in range(40):
        write(src.path / f"c{i:02d}.yaml", service(f"other{i:02d}"))
    sink = RecordingSink()
    src.scan_once(sink)
    names = [(o["kind"], o["metadata"]["name"]) for o in sink.batches[0][0]]
    expected = [("Service", "z"), ("Service", "y"), ("EndpointSlice", "z-abc"), ("Service", "x"), ("Service", "w")]
    assert names == expected + [("Service", f"other{i:02d}") for i in range(40)]
    # Each object once (a ref two files hold is handled at the winner's place only), and refs
    # no file holds (deletes) first.
    gone = ("Service", "default", "gone")
    refs = src._in_order({gone, *((k, "default", n) for k, n in names)})
    assert refs == [gone] + [(k, "default", n) for k, n in names]
    # A later pass where a few objects changed sorts them: the same order.
    write(src.path / "b.yaml", service("x", ports=[{"port": 5}]), service("y", ports=[{"port": 6}]),
          service("w", ports=[{"port": 7}]))
    write(src.path / "a.yaml", service("z", ports=[{"port": 3}]), service("y", ports=[{"port": 4}]),
          slice_("z", "10.244.0.6"))
    src.scan_once(sink)
    assert [(o["kind"], o["metadata"]["name"]) for o in sink.batches[1][0]] == expected


def test_same_name_in_other_namespace_or_kind_is_no_duplicate(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("web"), slice_("web", "10.244.0.5", name="web"))
    write(src.path / "b.yaml", service("web", ns="other"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert len(sink.objects) == 3 and sink.errors == {}


# --- allocation ---------------------------------------------------------------------------------


def test_cluster_ips_and_node_ports_are_filled_in(tmp_path):
    src = make(tmp_path, cidrs=("10.96.0.0/16", "fd00:10:96::/112"))
    write(
        src.path / "svc.yaml",
        service("v4"),
        service("v6", ipFamilies=["IPv6"]),
        service("ds", ipFamilyPolicy="RequireDualStack"),
        service("np", type="NodePort"),
        service("lb", type="LoadBalancer", externalTrafficPolicy="Local"),
        service("headless", clusterIP="None"),
    )
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.errors == {}
    spec = lambda n: sink.get("Service", n)["spec"]  # noqa: E731
    assert spec("v4")["clusterIP"].startswith("10.96.") and spec("v4")["ipFamilies"] == ["IPv4"]
    assert spec("v6")["clusterIP"].startswith("fd00:10:96::")
    assert spec("ds")["ipFamilies"] == ["IPv4", "IPv6"] and len(spec("ds")["clusterIPs"]) == 2
    assert spec("np")["ports"][0]["nodePort"] in RANGE
    assert spec("lb")["ports"][0]["nodePort"] in RANGE
    assert spec("lb")["healthCheckNodePort"] in RANGE
    assert spec("headless")["clusterIP"] == "None"
    ips = [ip for n in ("v4", "v6", "ds", "np", "lb") for ip in spec(n)["clusterIPs"]]
    assert len(ips) == len(set(ips))


def test_no_cluster_cidr_leaves_services_without_cluster_ip(tmp_path):
    src = make(tmp_path, cidrs=())
    write(src.path / "svc.yaml", service("web"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert "clusterIP" not in sink.get("Service", "web")["spec"]
    assert sink.errors == {}


def test_allocations_stable_across_restart(tmp_path):
    docs = [service(f"s{i}", type="NodePort", ipFamilyPolicy="PreferDualStack") for i in range(10)]
    cidrs = ("10.96.0.0/16", "fd00:10:96::/112")
    src = make(tmp_path, cidrs=cidrs)
    write(src.path / "a.yaml", *docs)
    sink = RecordingSink()
    src.scan_once(sink)
    before = {k: v["spec"] for k, v in sink.objects.items()}

    # A new source and allocator on the same state; a newcomer sorts first and must not
    # take anyone's values.
    write(src.path / "0-new.yaml", service("newcomer", type="NodePort"))
    src2 = make(tmp_path, cidrs=cidrs)
    sink2 = RecordingSink()
    src2.scan_once(sink2)
    after = {k: v["spec"] for k, v in sink2.objects.items() if k[2] != "newcomer"}
    assert after == before
    new = sink2.get("Service", "newcomer")["spec"]
    assert new["clusterIP"] not in {s["clusterIP"] for s in before.values()}
    assert new["ports"][0]["nodePort"] not in {s["ports"][0]["nodePort"] for s in before.values()}


def test_allocations_of_services_gone_are_released_after_sync(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("stays"))
    write(src.path / "b.yaml", service("goes"))
    src.scan_once(RecordingSink())
    state = tmp_path / "state" / "allocations.json"
    assert set(json.loads(state.read_text())["services"]) == {"default/stays", "default/goes"}

    # Gone while kpr was down: released once the restarted source has read everything.
    (src.path / "b.yaml").unlink()
    src2 = make(tmp_path)
    assert src2.allocator.get("default/goes") is not None
    sink2 = RecordingSink()
    src2.scan_once(sink2)
    assert src2.allocator.get("default/goes") is None
    assert set(json.loads(state.read_text())["services"]) == {"default/stays"}

    # Gone while running: released right away.
    (src.path / "a.yaml").unlink()
    src2.scan_once(sink2)
    assert json.loads(state.read_text())["services"] == {}


def test_allocations_kept_while_a_file_does_not_parse(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("web"))
    src.scan_once(RecordingSink())
    ip = src.allocator.get("default/web")["clusterIPs"]
    # Broken across a restart: its services may still be in there, so keep their values.
    (src.path / "a.yaml").write_text("kind: Service\nmetadata: {name: web\n")
    src2 = make(tmp_path)
    sink = RecordingSink()
    src2.scan_once(sink)
    assert sink.errors and src2.allocator.get("default/web")["clusterIPs"] == ip
    write(src.path / "a.yaml", service("web"))
    src2.scan_once(sink)
    assert sink.get("Service", "web")["spec"]["clusterIPs"] == ip


def test_explicit_values_respected(tmp_path):
    src = make(tmp_path)
    write(
        src.path / "a.yaml",
        service("web", type="NodePort", clusterIP="10.96.7.7", ports=[{"port": 80, "nodePort": 30080}]),
    )
    sink = RecordingSink()
    src.scan_once(sink)
    spec = sink.get("Service", "web")["spec"]
    assert spec["clusterIPs"] == ["10.96.7.7"] and spec["ports"][0]["nodePort"] == 30080
    assert src.allocator.get("default/web") == {
        "clusterIPs": ["10.96.7.7"], "nodePorts": {"/TCP/80": 30080}, "explicit": ["10.96.7.7", "30080/TCP"]
    }


def test_writing_allocated_values_into_the_manifest_sends_nothing(tmp_path):
    # As when `kubectl get -o yaml` output replaces a hand-written manifest.
    src = make(tmp_path)
    write(src.path / "a.yaml", service("web", type="NodePort"))
    sink = RecordingSink()
    src.scan_once(sink)
    full = sink.get("Service", "web")
    n = len(sink.batches)
    write(src.path / "a.yaml", full)
    src.scan_once(sink)
    assert len(sink.batches) == n
    assert sink.errors == {}


def test_identical_duplicate_taking_over_sends_nothing(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("web"))
    write(src.path / "b.yaml", service("web"))
    sink = RecordingSink()
    src.scan_once(sink)
    n = len(sink.batches)
    (src.path / "a.yaml").unlink()
    src.scan_once(sink)
    assert len(sink.batches) == n
    assert sink.errors == {} and sink.get("Service", "web") is not None


def test_conflicting_explicit_node_port_first_keeps_it(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("first", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    write(src.path / "b.yaml", service("second", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
          service("bystander"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.get("Service", "first")["spec"]["ports"][0]["nodePort"] == 30080
    assert sink.get("Service", "second") is None
    assert sink.get("Service", "bystander") is not None
    reason = sink.errors[str(src.path / "b.yaml")]
    assert "Service default/second" in reason and "30080" in reason and "default/first" in reason

    # The holder lets go: the second gets it on the next pass, and the error clears.
    write(src.path / "a.yaml", service("first", type="NodePort", ports=[{"port": 80, "nodePort": 30081}]))
    src.scan_once(sink)
    assert sink.get("Service", "second")["spec"]["ports"][0]["nodePort"] == 30080
    assert sink.get("Service", "first")["spec"]["ports"][0]["nodePort"] == 30081
    assert sink.errors == {}


def test_conflict_winner_stable_across_restart(tmp_path):
    src = make(tmp_path)
    write(src.path / "z.yaml", service("holder", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    sink = RecordingSink()
    src.scan_once(sink)
    # A contender in a file that sorts first, added later: refused.
    write(src.path / "a.yaml", service("contender", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    src.scan_once(sink)
    assert sink.get("Service", "contender") is None

    # After a restart the holder keeps it, though the contender is read first.
    src2 = make(tmp_path)
    sink2 = RecordingSink()
    src2.scan_once(sink2)
    assert sink2.get("Service", "holder")["spec"]["ports"][0]["nodePort"] == 30080
    assert sink2.get("Service", "contender") is None
    assert "default/holder" in sink2.errors[str(src.path / "a.yaml")]

    # The holder moves off it; the contender, read earlier in the same pass, still gets it
    # in that pass (no error flickers).
    n = len(sink2.events)
    write(src.path / "z.yaml", service("holder", type="NodePort", ports=[{"port": 80, "nodePort": 30081}]))
    src2.scan_once(sink2)
    assert sink2.get("Service", "contender")["spec"]["ports"][0]["nodePort"] == 30080
    assert sink2.errors == {}
    assert [e[0] for e in sink2.events[n:]] == ["clear", "apply"]
    write(src.path / "z.yaml", service("holder", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    src2.scan_once(sink2)
    assert sink2.get("Service", "holder")["spec"]["ports"][0]["nodePort"] == 30081  # last good
    assert "default/contender" in sink2.errors[str(src.path / "z.yaml")]

    # The holder went away while kpr was down: the contender gets it in the initial batch.
    (src.path / "z.yaml").unlink()
    src3 = make(tmp_path)
    sink3 = RecordingSink()
    src3.scan_once(sink3)
    assert sink3.get("Service", "contender")["spec"]["ports"][0]["nodePort"] == 30080
    assert sink3.errors == {}


def test_conflicting_cluster_ip_keeps_last_good(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("first", clusterIP="10.96.1.1"))
    write(src.path / "b.yaml", service("second"))
    sink = RecordingSink()
    src.scan_once(sink)
    good = sink.get("Service", "second")
    write(src.path / "b.yaml", service("second", clusterIP="10.96.1.1", ports=[{"port": 81}]))
    src.scan_once(sink)
    assert sink.get("Service", "second") == good
    assert "clusterIP 10.96.1.1 is already allocated to service default/first" in sink.errors[str(src.path / "b.yaml")]
    assert sink.get("Service", "first")["spec"]["clusterIP"] == "10.96.1.1"


def test_explicit_value_moves_an_automatic_one(tmp_path):
    # A manifest that names a value gets it even when another service was given it
    # automatically; that one moves, both in one batch.
    src = make(tmp_path, rng=PortRange(first=30000, last=30001))
    write(src.path / "a.yaml", service("auto", type="NodePort"))
    sink = RecordingSink()
    src.scan_once(sink)
    taken = sink.get("Service", "auto")["spec"]["ports"][0]["nodePort"]
    write(src.path / "b.yaml", service("pinned", type="NodePort", ports=[{"port": 80, "nodePort": taken}]))
    src.scan_once(sink)
    assert sink.errors == {}
    upserts, _ = sink.batches[-1]
    assert {o["metadata"]["name"] for o in upserts} == {"auto", "pinned"}
    assert sink.get("Service", "pinned")["spec"]["ports"][0]["nodePort"] == taken
    assert sink.get("Service", "auto")["spec"]["ports"][0]["nodePort"] == ({30000, 30001} - {taken}).pop()


def test_allocation_error_is_reported(tmp_path):
    src = make(tmp_path, cidrs=("10.96.0.0/16",))
    write(src.path / "a.yaml", service("v6", ipFamilies=["IPv6"]), service("ok"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.get("Service", "ok") is not None and sink.get("Service", "v6") is None
    assert "no IPv6 service.clusterCIDR" in sink.errors[str(src.path / "a.yaml")]


def test_examples_load_cleanly(tmp_path):
    examples = Path(__file__).resolve().parent.parent / "examples" / "manifests"
    alloc = Allocator(tmp_path / "alloc.json", ["10.96.0.0/16", "fd00:10:96::/112"], RANGE)
    src = FilesSource(examples, alloc)
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.errors == {}
    assert len([r for r in sink.objects if r[0] == "Service"]) >= 5
    lb = [o for o in sink.objects.values() if o["kind"] == "Service" and o["spec"].get("type") == "LoadBalancer"]
    assert lb and all(o["spec"]["healthCheckNodePort"] in RANGE for o in lb)


# --- sudden emptiness, size cap, files kpr cannot read -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_emptied_directory_keeps_last_good_state_for_the_grace_period(tmp_path):
    clock = Clock()
    src = make(tmp_path, empty_grace_period=60, clock=clock)
    sink = RecordingSink()
    write(src.path / "web.yaml", service("web"), slice_("web", "10.244.0.5"))
    write(src.path / "db.yaml", service("db"))
    src.scan_once(sink)
    good = dict(sink.objects)
    n_batches = len(sink.batches)

    # A mount not up yet, a sync half done: every manifest gone at once.
    for f in src.path.iterdir():
        f.unlink()
    (src.path / "README").write_text("not a manifest\n")
    src.scan_once(sink)
    assert sink.objects == good and len(sink.batches) == n_batches
    warning = sink.errors[str(src.path)]
    assert "empty (no manifest files) while 3 objects were served" in warning
    assert "source.emptyGracePeriod" in warning and "60s" in warning

    # Still within the grace period: still kept, warned once (not re-reported every pass).
    clock.now += 59
    src.scan_once(sink)
    assert sink.objects == good
    assert [e for e in sink.events if e[0] == "error"] == [("error", str(src.path), warning)]

    # The files come back: nothing was ever deleted, so nothing is sent; the warning goes.
    write(src.path / "web.yaml", service("web"), slice_("web", "10.244.0.5"))
    write(src.path / "db.yaml", service("db"))
    src.scan_once(sink)
    assert sink.objects == good and len(sink.batches) == n_batches
    assert sink.errors == {}

    # Emptied again: the grace period starts afresh, and once it has passed emptiness is
    # believed and everything goes in one batch.
    clock.now += 100
    for f in src.path.glob("*.yaml"):
        f.unlink()
    src.scan_once(sink)
    assert sink.objects == good
    clock.now += 60
    src.scan_once(sink)
    assert sink.objects == {}
    assert sorted(sink.batches[-1][1]) == sorted(good)
    assert sink.errors == {}
    # Empty and nothing served: nothing to distrust any more.
    clock.now += 1
    src.scan_once(sink)
    assert sink.errors == {}


def test_files_all_emptied_count_as_an_empty_directory(tmp_path):
    clock = Clock()
    src = make(tmp_path, empty_grace_period=30, clock=clock)
    sink = RecordingSink()
    write(src.path / "a.yaml", service("a"))
    (src.path / "b.json").write_text(json.dumps(service("b")))
    src.scan_once(sink)
    good = dict(sink.objects)
    assert len(good) == 2
    # Truncated in place (a copy tool that creates first and fills later); comments only.
    (src.path / "a.yaml").write_text("# nothing yet\n---\n")
    (src.path / "b.json").write_text("")
    src.scan_once(sink)
    assert sink.objects == good
    assert "empty (no objects in its manifest files) while 2 objects" in sink.errors[str(src.path)]
    # One file filled again: not empty, so the other file's emptiness is believed at once.
    write(src.path / "a.yaml", service("a"))
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "a")}
    assert sink.errors == {}


def test_one_file_emptied_is_believed_at_once(tmp_path):
    src = make(tmp_path, empty_grace_period=60, clock=Clock())
    sink = RecordingSink()
    write(src.path / "a.yaml", service("a"))
    write(src.path / "b.yaml", service("b"))
    src.scan_once(sink)
    (src.path / "b.yaml").unlink()
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "a")}
    assert sink.errors == {}


def test_a_broken_file_keeps_the_directory_from_being_empty(tmp_path):
    src = make(tmp_path, empty_grace_period=60, clock=Clock())
    sink = RecordingSink()
    write(src.path / "a.yaml", service("a"))
    src.scan_once(sink)
    (src.path / "a.yaml").write_text("kind: Service\nmetadata: {name: [\n")
    src.scan_once(sink)
    # The file's own rule applies (last good kept), not the directory's.
    assert set(sink.objects) == {("Service", "default", "a")}
    assert list(sink.errors) == [str(src.path / "a.yaml")]


def test_empty_at_start_is_simply_empty_and_grace_zero_trusts_at_once(tmp_path):
    src = make(tmp_path, empty_grace_period=60, clock=Clock())
    sink = RecordingSink()
    src.scan_once(sink)
    assert sink.synced_calls == 1 and sink.objects == {} and sink.errors == {}

    src0 = make(tmp_path / "other", empty_grace_period=0)
    sink0 = RecordingSink()
    write(src0.path / "a.yaml", service("a"))
    src0.scan_once(sink0)
    (src0.path / "a.yaml").unlink()
    src0.scan_once(sink0)
    assert sink0.objects == {} and sink0.errors == {}


def test_grace_period_in_real_time_with_the_polling_thread(tmp_path):
    src = make(tmp_path, empty_grace_period=0.5)
    sink = RecordingSink()
    write(src.path / "a.yaml", service("a"))
    src.start(sink)
    try:
        wait_for(lambda: sink.get("Service", "a") is not None)
        (src.path / "a.yaml").unlink()
        t0 = time.monotonic()
        wait_for(lambda: str(src.path) in sink.errors)
        assert sink.get("Service", "a") is not None
        wait_for(lambda: sink.get("Service", "a") is None)
        assert time.monotonic() - t0 >= 0.45
        wait_for(lambda: sink.errors == {})
    finally:
        src.stop()


def test_file_over_the_size_cap_is_reported_and_never_read(tmp_path, monkeypatch):
    src = make(tmp_path, max_file_size=4096)
    sink = RecordingSink()
    path = src.path / "web.yaml"
    write(path, service("web"))
    write(src.path / "other.yaml", service("other"))
    src.scan_once(sink)
    good = dict(sink.objects)

    # Sparse: a gigabyte that costs no disk, and would cost a gigabyte of memory if read.
    with open(path, "r+b") as f:
        f.truncate(1 << 30)
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    src.scan_once(sink)
    assert sink.objects == good
    assert sink.errors[str(path)] == "larger than source.maxFileSize (4096 bytes); not read, keeping its last good objects"
    assert sum(reads) == 0

    write(path, service("web2"))
    src.scan_once(sink)
    assert ("Service", "default", "web2") in sink.objects and sink.errors == {}

    big = src.path / "big.yaml"
    big.write_text("# " + "x" * 5000 + "\n")
    src.scan_once(sink)
    assert sink.errors[str(big)].endswith("not read, nothing from it applied")


def test_bounded_read_stops_at_the_cap_whatever_the_size_says(tmp_path):
    from kpr.sources.files import _read_bounded

    # /proc files claim size 0 and hold more: the cap holds on what is read.
    assert _read_bounded(Path("/proc/self/status"), 64) is None
    assert _read_bounded(Path("/proc/self/status"), 1 << 20).startswith(b"Name:")
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert _read_bounded(p, 100) == b"x" * 100
    assert _read_bounded(p, 99) is None


def test_symlink_loop_dangling_link_and_directory_are_reported(tmp_path):
    src = make(tmp_path)
    sink = RecordingSink()
    write(src.path / "a.yaml", service("a"))
    target = tmp_path / "b-target.yaml"
    write(target, service("b"))
    (src.path / "b.yaml").symlink_to(target)
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "a"), ("Service", "default", "b")}

    # The link's target goes (a ConfigMap swap half done): b's last good stays, reported.
    target.unlink()
    (src.path / "loop.yaml").symlink_to(src.path / "loop.yaml")
    (src.path / "dir.yaml").mkdir()
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "a"), ("Service", "default", "b")}
    assert sink.errors == {
        str(src.path / "b.yaml"): "dangling symlink (its target does not exist)",
        str(src.path / "loop.yaml"): "symlink loop (too many levels of symbolic links)",
        str(src.path / "dir.yaml"): "not a regular file (a directory)",
    }
    n_events = len(sink.events)
    src.scan_once(sink)
    assert len(sink.events) == n_events, "an unchanged problem is not reported again"

    write(target, service("b"))
    (src.path / "loop.yaml").unlink()
    (src.path / "dir.yaml").rmdir()
    src.scan_once(sink)
    assert sink.errors == {}
    (src.path / "b.yaml").unlink()
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "a")}


def test_unreadable_file_is_reported_and_keeps_last_good(tmp_path, monkeypatch):
    src = make(tmp_path)
    sink = RecordingSink()
    path = src.path / "web.yaml"
    write(path, service("web"))
    src.scan_once(sink)
    real_open = os.open

    def deny(p, *a, **kw):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, *a, **kw)

    # As root a mode of 000 does not stop a read; a denied open is what a non-root agent sees.
    monkeypatch.setattr(os, "open", deny)
    write(path, service("web"), service("web2"))
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "web")}
    assert sink.errors == {str(path): "cannot read: Permission denied"}
    monkeypatch.setattr(os, "open", real_open)
    path.touch()
    src.scan_once(sink)
    assert ("Service", "default", "web2") in sink.objects and sink.errors == {}


ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("deep.json", b"[" * 100000 + b"]" * 100000, "not valid JSON: nested deeper than 64 levels"),
        ("deep.yaml", b"kind: Service\nx: " + b"[" * 500 + b"]" * 500, "nested deeper than 64 levels"),
        ("deepblock.yaml", "".join(" " * i + f"k{i}:\n" for i in range(200)).encode() + b" " * 200 + b"1\n", "nested deeper than 64 levels"),
        ("bomb.yaml", ALIAS_BOMB.encode(), "values (YAML aliases expanded)"),
        ("binary.yaml", b"\x7fELF\x02\x01\x01\x00\x00\x00", "a binary file, not YAML or JSON text (NUL byte at offset 7)"),
        ("latin1.yaml", b"kind: Service\nmetadata: {name: caf\xe9}\n", "not UTF-8 text (byte 34)"),
        ("date.yaml", b"kind: Service\nmetadata: {name: 2024-13-45}\n", "not valid YAML: month must be in 1..12"),
        ("ctrl.yaml", b"kind: Service\x01\n", "not valid YAML: unacceptable character #x0001"),
    ],
)
def test_hostile_file_is_reported_and_the_rest_applies(tmp_path, name, data, reason):
    src = make(tmp_path)
    sink = RecordingSink()
    write(src.path / "good.yaml", service("good"))
    (src.path / name).write_bytes(data)
    src.scan_once(sink)
    assert set(sink.objects) == {("Service", "default", "good")}
    assert reason in sink.errors[str(src.path / name)]
    assert "\n" not in sink.errors[str(src.path / name)]


def test_a_huge_value_is_cut_in_the_report(tmp_path):
    src = make(tmp_path)
    sink = RecordingSink()
    svc = service("web")
    svc["spec"]["type"] = "x" * 100000
    write(src.path / "web.yaml", svc)
    src.scan_once(sink)
    reason = sink.errors[str(src.path / "web.yaml")]
    assert len(reason) <= 500 and reason.endswith("…")


def test_origin_of_names_the_winning_file(tmp_path):
    src = make(tmp_path)
    sink = RecordingSink()
    write(src.path / "b.yaml", service("web"))
    write(src.path / "a.yaml", service("web"))
    src.scan_once(sink)
    assert src.origin_of(("Service", "default", "web")) == str(src.path / "a.yaml")
    assert src.origin_of(("Service", "default", "nope")) is None
