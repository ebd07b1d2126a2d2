"""FilesSource with inotify: changes reach the sink without waiting for a poll, a file being
written is never read, and a directory inotify cannot watch is polled (status says so)."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from kpr.sources import dirwatch
from kpr.testing.waiting import wait_for

from test_files_source import RecordingSink, make, service, write

# Far longer than any wait below: only an event can explain a change reaching the sink.
NEVER = 3600.0


@pytest.fixture
def watched(tmp_path):
    """A started source that only events can move (pollInterval an hour), past its first pass."""
    src = make(tmp_path, poll=NEVER)
    sink = RecordingSink()
    src.start(sink)
    try:
        wait_for(lambda: sink.synced_calls == 1, 5, "first pass")
        yield src, sink
    finally:
        src.stop()


def test_changes_renames_and_removals_arrive_without_a_poll(watched):
    src, sink = watched
    assert src.status() == {"watch": "inotify"}
    passes = src.passes
    write(src.path / "a.yaml", service("a"))  # written aside, renamed in (IN_MOVED_TO)
    wait_for(lambda: sink.get("Service", "a") is not None, 5, "a via rename")
    (src.path / "b.yaml").write_text(yaml.safe_dump(service("b")))  # in place (IN_CLOSE_WRITE)
    wait_for(lambda: sink.get("Service", "b") is not None, 5, "b written in place")
    (src.path / "a.yaml").unlink()  # IN_DELETE
    wait_for(lambda: sink.get("Service", "a") is None, 5, "a removed")
    assert src.passes - passes <= 3


def test_a_burst_costs_a_few_passes_not_one_per_file(watched):
    src, sink = watched
    passes = src.passes
    for i in range(50):
        write(src.path / f"s{i}.yaml", service(f"s{i}"))
    wait_for(lambda: all(sink.get("Service", f"s{i}") for i in range(50)), 5, "all 50")
    # 50 renames in a loop: a handful of passes, not one per file
    assert src.passes - passes < 10, src.passes - passes


def test_a_half_written_file_is_never_read(tmp_path):
    src = make(tmp_path, poll=NEVER)
    sink = RecordingSink()
    write(src.path / "web.yaml", service("web", type="ClusterIP"))
    src.start(sink)
    try:
        wait_for(lambda: sink.get("Service", "web") is not None, 5, "web")
        full = yaml.safe_dump_all([service("web", type="NodePort"), service("extra")])
        half = full[: full.index("---")]  # valid YAML on its own: the first document only
        f = open(src.path / "web.yaml", "w")
        try:
            f.write(half)
            f.flush()
            os.fsync(f.fileno())
            # Another file completes meanwhile: its pass must leave web.yaml as it was.
            write(src.path / "other.yaml", service("other"))
            wait_for(lambda: sink.get("Service", "other") is not None, 5, "other")
            assert sink.get("Service", "web")["spec"]["type"] == "ClusterIP"
            assert "web.yaml" in src._busy()
            src.scan_once()  # an explicit pass (as the safety-net poll) skips it too
            assert sink.get("Service", "web")["spec"]["type"] == "ClusterIP"
            assert sink.get("Service", "extra") is None
            f.write(full[len(half):])
        finally:
            f.close()
        wait_for(lambda: sink.get("Service", "extra") is not None, 5, "the completed file")
        assert sink.get("Service", "web")["spec"]["type"] == "NodePort"
    finally:
        src.stop()


def test_a_missing_directory_is_polled_until_it_appears(tmp_path):
    src = make(tmp_path, poll=0.05)
    src.path.rmdir()
    sink = RecordingSink()
    src.start(sink)
    try:
        wait_for(lambda: src.status().get("watch") == "poll", 5, "poll mode")
        assert "inotify_add_watch" in src.status()["watchFallback"]
        src.path.mkdir()
        wait_for(lambda: src.status() == {"watch": "inotify"}, 5, "watching once it exists")
        write(src.path / "a.yaml", service("a"))
        wait_for(lambda: sink.get("Service", "a") is not None, 5, "a")
        # the directory goes away and comes back: watched again
        (src.path / "a.yaml").unlink()
        src.path.rmdir()
        wait_for(lambda: src.status().get("watch") == "poll", 5, "poll mode again")
        src.path.mkdir()
        wait_for(lambda: src.status() == {"watch": "inotify"}, 5, "watching again")
    finally:
        src.stop()


def test_network_filesystems_are_not_trusted_to_raise_events(tmp_path):
    assert dirwatch.fs_type(tmp_path) not in ("", "nfs")
    assert not dirwatch._remote(dirwatch.fs_type(tmp_path))
    for kind in ("nfs", "nfs4", "cifs", "fuse.sshfs", "9p", "ceph"):
        assert dirwatch._remote(kind), kind
    assert dirwatch.fs_type("/proc/self") == "proc"


def test_a_configmap_volume_swap_arrives_and_editor_files_wake_nothing(watched):
    src, sink = watched
    d = src.path

    def version(name: str, svc_type: str) -> None:
        (d / name).mkdir()
        (d / name / "web.yaml").write_text(yaml.safe_dump(service("web", type=svc_type)))
        # as the kubelet's atomic writer: a new ..data link renamed over the old one
        os.symlink(name, d / "..data_tmp")
        os.replace(d / "..data_tmp", d / "..data")

    version("..v1", "ClusterIP")
    os.symlink("..data/web.yaml", d / "web.yaml")
    wait_for(lambda: (s := sink.get("Service", "web")) and s["spec"]["type"] == "ClusterIP", 5, "first version")
    version("..v2", "NodePort")
    wait_for(lambda: sink.get("Service", "web")["spec"]["type"] == "NodePort", 5, "swapped version")

    passes = src.passes
    (d / ".web.yaml.swp").write_bytes(b"\0" * 64)
    (d / "notes.tmp").write_text("x")
    (d / "web.yaml~").write_text("x")
    time.sleep(0.3)
    assert src.passes == passes
