"""The greeting read and error naming the `python -c` clients share (kpr.testing.echo's
CLIENT_PRELUDE: CLIENT, restart_probe's PROBE, socklb_env's LOAD), on loopback; no root."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from kpr.testing.echo import CLIENT, CLIENT_PRELUDE, PY
from kpr.testing.restart_probe import PROBE
from kpr.testing.waiting import wait_for
from socklb_env import LOAD


def _prelude() -> dict:
    space: dict = {}
    exec(CLIENT_PRELUDE, space)
    return space


def test_the_greeting_is_read_to_its_line_end_and_eof_before_it_is_a_reset() -> None:
    p = _prelude()
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"pod")
        b.sendall(b"-a\n")
        assert p["greeting"](a) == "pod-a"
        b.sendall(b"half")
        b.close()
        with pytest.raises(ConnectionResetError) as e:
            p["greeting"](a)
    assert e.value.errno == errno.ECONNRESET
    assert p["err"](e.value) == "ECONNRESET"
    assert p["err"](TimeoutError("timed out")) == "TimeoutError"


@pytest.mark.parametrize("name, script", [("CLIENT", CLIENT), ("PROBE", PROBE), ("LOAD", LOAD)])
def test_each_client_takes_the_prelude_and_no_copy_of_it(name: str, script: str) -> None:
    assert script.startswith(CLIENT_PRELUDE), name
    body = script[len(CLIENT_PRELUDE):]
    assert "def err(" not in body and "def greeting(" not in body, name
    compile(script, name, "exec")


@pytest.fixture
def closing_server() -> Iterator[tuple[int, list[int]]]:
    """A loopback server that accepts and closes every connection at once, before any greeting;
    yields its port and the count of connections it closed."""
    srv = socket.create_server(("127.0.0.1", 0))
    closed = [0]

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()
            closed[0] += 1

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], closed
    finally:
        srv.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        srv.close()
        t.join()


def test_load_names_a_held_connection_closed_before_its_greeting(closing_server) -> None:
    # LOAD's held connection read its greeting by adding recv()'s b"" for ever when the server
    # closed first: it spun, and reported no error.
    port, closed = closing_server
    gap = 3600  # one churn attempt, then it sleeps: the server sees exactly two connections
    proc = subprocess.Popen([PY, "-c", LOAD, "127.0.0.1", str(port), str(gap)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        wait_for(lambda: closed[0] == 2, timeout=60, what="both connections closed by the server",
                 show=lambda: closed[0])
        out, _ = proc.communicate("", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["held"]["error"] == "ECONNRESET"
    assert summary["held"]["echoes"] == 0
    assert [e for _t, e in summary["failed"]] == ["ECONNRESET"]
