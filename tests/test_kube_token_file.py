"""The bearer token file the Kubernetes client re-reads (kpr.kube.client._TokenFile)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kpr.kube import client
from kpr.kube.client import _TokenFile


def test_one_rotation_seen_by_many_threads_counts_once(tmp_path, monkeypatch):
    # Every informer thread refreshes before its requests; they all see the rotated file at
    # once. A slow log line between noticing the new token and keeping it widens the window in
    # which a second thread used to count the same rotation again.
    f = tmp_path / "token"
    f.write_text("first\n")
    tokens = _TokenFile(f)
    f.write_text("second-and-longer\n")
    info = client.log.info

    def slow_info(*a, **kw):
        time.sleep(0.05)
        info(*a, **kw)

    monkeypatch.setattr(client.log, "info", slow_info)
    start = threading.Barrier(8)
    seen: list[str] = []

    def refresh():
        start.wait()
        seen.append(tokens.refresh())

    threads = [threading.Thread(target=refresh) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["second-and-longer"] * 8
    assert tokens.rotations == 1


def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("only\n")
    tokens = _TokenFile(f)
    monkeypatch.setattr(Path, "read_text", lambda *a, **kw: pytest.fail("read again"))
    assert tokens.refresh() == "only"
    assert tokens.rotations == 0
