"""The files source reads ahead (preload) while the agent's plugins start: the first pass
takes what was read, and sends exactly what a pass without read-ahead sends."""

from __future__ import annotations

import pytest

from kpr.sources import files as files_mod
from test_files_source import RecordingSink, make, service, slice_, write


@pytest.fixture(autouse=True)
def _read_ahead_on_a_thread(monkeypatch):
    """These tests count the agent's own _load_file calls: the read-ahead on its thread
    (the worker process's read-ahead: test_files_source_worker.py)."""
    monkeypatch.setenv("KPR_FILES_WORKER", "0")


def _counting_loads(monkeypatch) -> list[str]:
    """The names _load_file reads, in order."""
    names: list[str] = []
    original = files_mod.FilesSource._load_file

    def counted(self, tr, name, sig, old):
        names.append(name)
        return original(self, tr, name, sig, old)

    monkeypatch.setattr(files_mod.FilesSource, "_load_file", counted)
    return names


def _tree(tmp_path):
    src = make(tmp_path)
    write(src.path / "a.yaml", service("web"), slice_("web", "10.244.0.5", "10.244.1.5"))
    write(src.path / "b.yaml", service("db", ns="data", clusterIP="10.96.0.1"), {"kind": "Nope", "metadata": {"name": "x"}})
    return src


def _read_ahead(src) -> None:
    """src's read-ahead, run to its end."""
    src.preload()
    src._preload_thread.join(30)
    assert not src._preload_thread.is_alive(), "the read-ahead did not end"


def test_first_pass_takes_what_preload_read(tmp_path, monkeypatch):
    plain = _tree(tmp_path / "plain")
    expected = RecordingSink()
    plain.scan_once(expected)

    loads = _counting_loads(monkeypatch)
    src = _tree(tmp_path / "preloaded")
    _read_ahead(src)
    assert loads == ["a.yaml", "b.yaml"]
    sink = RecordingSink()
    assert src.scan_once(sink)
    assert loads == ["a.yaml", "b.yaml"]  # not read again
    assert sink.objects == expected.objects
    assert [e[0] for e in sink.events] == [e[0] for e in expected.events]
    assert {k.replace("/preloaded/", "/"): v.replace("/preloaded/", "/") for k, v in sink.errors.items()} == {
        k.replace("/plain/", "/"): v.replace("/plain/", "/") for k, v in expected.errors.items()
    }
    assert sink.errors  # the unsupported kind is reported by the pass, once
    assert src._preloaded == {}


def test_file_changed_after_preload_is_read_again(tmp_path, monkeypatch):
    loads = _counting_loads(monkeypatch)
    src = _tree(tmp_path)
    _read_ahead(src)
    write(src.path / "a.yaml", service("web"), slice_("web", "10.244.0.9"))
    sink = RecordingSink()
    src.scan_once(sink)
    assert loads == ["a.yaml", "b.yaml", "a.yaml"]
    eps = sink.get("EndpointSlice", "web-abc")["endpoints"]
    assert [e["addresses"] for e in eps] == [["10.244.0.9"]]


def test_stop_during_preload_leaves_nothing_running(tmp_path):
    src = _tree(tmp_path)
    src.preload()
    thread = src._preload_thread
    src.stop()
    assert not thread.is_alive()
    # A source stopped before its start still starts and reads everything.
    sink = RecordingSink()
    src._stop.clear()
    src.scan_once(sink)
    assert ("Service", "default", "web") in sink.objects


def test_the_read_ahead_logs_nothing_until_the_first_pass(tmp_path, caplog):
    """While the read-ahead runs, plugins compile BPF code and the loader captures fd 2: a
    line logged then would be lost and read as compiler output. Its lines (a file that does
    not parse included) are logged by the first pass, once."""
    import logging

    src = _tree(tmp_path)
    (src.path / "c.json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
        assert not [r for r in caplog.records if r.threadName == "kpr-files-preload"]
        assert not [r for r in caplog.records if "files.preloaded" in r.getMessage()]
        src.scan_once(RecordingSink())
        messages = [r.getMessage() for r in caplog.records]
    assert sum("files.preloaded files=3" in m for m in messages) == 1
    assert sum("files.parse_failed file=c.json" in m for m in messages) == 1


def test_the_agent_reads_ahead_only_when_a_core_is_idle(monkeypatch):
    """On a busy node the read-ahead and the plugins' compile stretch each other: the agent
    reads ahead only while the load average leaves a CPU it may use idle."""
    import os

    from kpr import daemon

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert daemon.spare_core() == (True, 0.4, 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    assert daemon.spare_core() == (False, 1.0, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert daemon.spare_core()[0] is False  # one CPU: nothing to overlap with


def test_the_read_ahead_lines_are_logged_when_no_pass_comes(tmp_path, caplog):
    """An agent whose plugin fails to start stops its source before any pass: what the
    read-ahead held (a file that does not parse) is logged by the stop, not lost."""
    import logging

    src = _tree(tmp_path)
    (src.path / "c.json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
        src.stop()
        messages = [r.getMessage() for r in caplog.records]
    assert sum("files.parse_failed file=c.json" in m for m in messages) == 1
    assert sum("files.preloaded files=3" in m for m in messages) == 1


def test_the_read_ahead_lines_are_logged_by_a_first_pass_without_directory(tmp_path, caplog):
    """A first pass that finds the directory gone (a mount not there yet) returns early: it
    still logs what the read-ahead held."""
    import logging

    src = _tree(tmp_path)
    (src.path / "c.json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
        src.path.rename(tmp_path / "elsewhere")
        src.scan_once(RecordingSink())
        messages = [r.getMessage() for r in caplog.records]
    assert sum("files.parse_failed file=c.json" in m for m in messages) == 1


def test_a_read_ahead_that_starts_after_the_first_pass_reads_nothing(tmp_path, monkeypatch):
    """Started late (the first pass took the lock first), a read-ahead would hold every
    file's parse and validation reading until a later pass discarded them unread."""
    from kpr import translate

    src = _tree(tmp_path)
    src.scan_once(RecordingSink())
    loads = _counting_loads(monkeypatch)
    _read_ahead(src)
    assert loads == []
    assert src._preloaded == {}
    assert translate._checked == {}


def test_a_held_line_keeps_when_and_where_it_was_written(tmp_path, caplog):
    """Logged by the first pass, the read-ahead's lines still say when, on which thread and
    at which line they were written: the log shows when a file was read."""
    import logging
    import time

    src = _tree(tmp_path)
    (src.path / "c.json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
        time.sleep(0.05)
        before_pass = time.time()
        src.scan_once(RecordingSink())
    held = [r for r in caplog.records if "files.parse_failed file=c.json" in r.getMessage()]
    assert len(held) == 1
    assert held[0].created < before_pass
    assert held[0].threadName == "kpr-files-preload"
    assert held[0].funcName == "_load_file" and held[0].pathname.endswith("files.py")


def test_files_deleted_and_added_after_the_read_ahead(tmp_path, monkeypatch):
    """A file deleted after the read-ahead sends nothing, one added is read by the first
    pass: the first pass sends what a pass without read-ahead sends for the same tree."""

    def edit(src):
        (src.path / "b.yaml").unlink()
        write(src.path / "c.yaml", service("api", ns="data", clusterIP="10.96.0.1"))

    plain = _tree(tmp_path / "plain")
    edit(plain)
    expected = RecordingSink()
    plain.scan_once(expected)

    loads = _counting_loads(monkeypatch)
    src = _tree(tmp_path / "preloaded")
    _read_ahead(src)
    edit(src)
    sink = RecordingSink()
    src.scan_once(sink)
    assert loads == ["a.yaml", "b.yaml", "c.yaml"]
    assert sink.objects == expected.objects
    assert ("Service", "data", "db") not in sink.objects and ("Service", "data", "api") in sink.objects
    assert not any("b.yaml" in origin for origin in sink.errors)
