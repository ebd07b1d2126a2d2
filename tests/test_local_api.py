"""The local API over a real unix socket: bounded connections, timeouts, and clients that
misbehave (send nothing, drip, never read, hang up) cost a thread for seconds at most and
never a traceback in the log."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kpr import api
from kpr.api import ApiError, ApiServer
from kpr.testing.waiting import wait_for


class FakeAgent:
    """What the API reads from an agent: status, the store's services, the plugins' statuses
    (services a plugin refused), the plugin handles."""

    def __init__(self, status_delay: float = 0.0, big: int = 0):
        self.status_delay = status_delay
        self.big = big
        self.store = SimpleNamespace(snapshot=lambda: [])
        self.handles: list = []

    def status(self) -> dict:
        if self.status_delay:
            time.sleep(self.status_delay)
        return {"ready": True, "padding": "x" * self.big}

    def plugin_statuses(self) -> dict:
        return {}


@pytest.fixture
def serve(tmp_path):
    servers: list[ApiServer] = []

    def start(agent=None, **kw) -> ApiServer:
        srv = ApiServer(tmp_path / f"api{len(servers)}.sock", agent or FakeAgent(), **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def test_status_is_served(serve):
    srv = serve()
    assert api.get(srv.path, "/v1/status") == {"ready": True, "padding": ""}
    assert api.get(srv.path, "/v1/services") == []
    with pytest.raises(ApiError, match="404"):
        api.get(srv.path, "/nope")


def test_a_client_that_sends_nothing_is_dropped(serve):
    srv = serve(io_timeout=0.3, deadline=60)
    s = connect(srv.path)
    t0 = time.monotonic()
    # Closed by the agent, no answer: before the client's 10 s timeout (recv would raise) and
    # the 60 s deadline, so by the io timeout (no upper clock bound a loaded machine trips).
    assert s.recv(100) == b""
    assert time.monotonic() - t0 >= 0.25
    s.close()
    wait_for(lambda: srv.stats()["active"] == 0, what="slot freed")
    assert api.get(srv.path, "/v1/status")["ready"] is True


def test_a_client_that_drips_is_cut_at_the_deadline(serve):
    srv = serve(io_timeout=1.0, deadline=1.0)
    s = connect(srv.path)
    s.sendall(b"GET /v1/status HTTP/1.0\r\n")
    # A header line every 0.2 s never trips the per-read timeout; the deadline cuts it.
    closed = False
    for i in range(40):
        try:
            s.sendall(f"X-Drip-{i}: 1\r\n".encode())
        except OSError:
            closed = True
            break
        time.sleep(0.2)
        if srv.stats()["dropped"]:
            closed = True
            break
    # 40 lines 0.2 s apart never trip the per-read timeout: only the 1 s deadline closes it
    # within the loop (no clock bound here: a loaded machine stretches the loop, not the cut)
    assert closed
    s.close()
    wait_for(lambda: srv.stats()["active"] == 0, what="slot freed")


def test_a_client_that_reads_nothing_frees_its_slot(serve):
    # 8 MB of status: far more than a unix socket buffers, so the write blocks on the client.
    srv = serve(FakeAgent(big=8 << 20), io_timeout=0.5, deadline=2.0)
    s = connect(srv.path)
    s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
    wait_for(lambda: srv.stats()["active"] == 1, what="connection served")
    # The client never reads: only the io timeout or the deadline frees the slot.
    wait_for(lambda: srv.stats()["active"] == 0, timeout=20, what="writer given up")
    s.close()


def test_connections_are_bounded_and_the_excess_told_so(serve):
    srv = serve(max_connections=3, io_timeout=1.0, deadline=2.0)
    idle = [connect(srv.path) for _ in range(3)]
    wait_for(lambda: srv.stats()["active"] == 3, what="three connections served")
    extra = connect(srv.path)
    answer = b""
    while chunk := extra.recv(4096):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 503")
    assert int(dict(l.split(b": ") for l in head.split(b"\r\n")[1:])[b"Content-Length"]) == len(body)
    assert json.loads(body) == {"error": "too many connections; try again soon"}
    assert srv.stats()["refused"] == 1
    with pytest.raises(ApiError, match="503"):
        api.get(srv.path, "/v1/status")
    # The idle ones time out; then the API answers again.
    wait_for(lambda: srv.stats()["active"] == 0, timeout=5, what="idle clients dropped")
    assert api.get(srv.path, "/v1/status")["ready"] is True
    for s in idle + [extra]:
        s.close()


def test_no_more_threads_than_the_bound(serve):
    srv = serve(max_connections=4, io_timeout=5.0, deadline=5.0)
    before = threading.active_count()
    socks = [connect(srv.path) for _ in range(50)]
    wait_for(lambda: srv.stats()["active"] == 4, what="four served")
    # connect() returns once a client is queued (the listen backlog): the accept loop may
    # still be refusing the last ones. Wait for all of them, then count the threads.
    wait_for(lambda: srv.stats()["refused"] == 46, what="the other 46 refused", show=srv.stats)
    assert threading.active_count() - before <= 4
    assert srv.stats()["active"] == 4
    for s in socks:
        s.close()


def test_a_client_that_hangs_up_leaves_no_traceback(serve, caplog, capfd):
    # The answer is computed after the client has gone, so writing it fails (EPIPE).
    srv = serve(FakeAgent(status_delay=0.2, big=1 << 20))
    caplog.set_level(logging.DEBUG, logger="kpr.api")
    for _ in range(5):
        s = connect(srv.path)
        s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
        s.close()
    # And one that resets the connection mid-answer.
    s = connect(srv.path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
    time.sleep(0.3)
    s.recv(10)
    s.close()
    wait_for(lambda: srv.stats()["active"] == 0, what="all handled")
    time.sleep(0.1)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert any("api.client_gone" in r.getMessage() for r in caplog.records)
    assert api.get(srv.path, "/v1/status")["ready"] is True


def test_an_api_bug_answers_500_with_one_log_record(serve, caplog):
    class Broken(FakeAgent):
        def status(self):
            raise RuntimeError("boom")

    srv = serve(Broken())
    with pytest.raises(ApiError, match="500.*RuntimeError: boom"):
        api.get(srv.path, "/v1/status")
    # warnings and errors only: another test may have left kpr's loggers at INFO (api.listen)
    assert [r.getMessage() for r in caplog.records if r.name == "kpr.api" and r.levelno >= logging.WARNING] == [
        "api.error path=/v1/status"
    ]
