"""kpr.testing.restart_probe: the restart benchmark's probe against loopback servers, and the
figures window() takes from its records (no root: the probe at normal priority)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kpr.testing.restart_probe import probe_argv, progress, started, window
from kpr.testing.waiting import free_port, wait_for


@contextlib.contextmanager
def server(greet: bool, echo: bool = True) -> Iterator[int]:
    """A loopback TCP server: with `greet`, a line per connection then an echo of every byte
    (without `echo`: the bytes read and dropped, as a stalled path would); without `greet`, it
    never accepts (handshakes complete in the kernel, no greeting ever comes)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=512)
    stop = threading.Event()

    def conn(c: socket.socket) -> None:
        # The probe may close with a reset (its held connection at the end): not a failure here.
        with c, contextlib.suppress(ConnectionError):
            c.sendall(b"be1\n")
            while d := c.recv(64):
                if echo:
                    c.sendall(d)

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True) if greet else None
    if t:
        t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        if t:
            t.join(2)
        srv.close()


def probe(port: int, enough: Callable[[dict], bool], what: str, timeout: float = 1.0) -> tuple[dict, float, float]:
    """The probe's records and a window [t0, t1] that ends once `enough` holds of the counts
    since t0 (kpr.testing.restart_probe.progress; attempts and echoes counted from t0, so
    every one counted started in the window), however slowly a loaded machine runs it. The
    records hold at least every attempt the probe had counted at t1 (`counted_at_t1`)."""
    proc = subprocess.Popen(probe_argv("127.0.0.1", port, timeout=timeout, prio=0), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    p = started(proc)
    t0 = time.monotonic()
    base = progress(p)

    def since_t0() -> dict:
        now = progress(p)
        return {**now, "attempts": now["attempts"] - base["attempts"], "echoes": now["echoes"] - base["echoes"]}

    try:
        wait_for(lambda: enough(since_t0()), 60, what, show=since_t0, interval=0.05)
    except AssertionError:
        p.finish()
        raise
    t1 = time.monotonic()
    counted = progress(p)["attempts"]
    rec = p.finish()
    rec["counted_at_t1"] = counted
    return rec, t0, t1


def test_a_served_port_every_tick_answered_and_echoed() -> None:
    with server(greet=True) as port:
        rec, t0, t1 = probe(port, lambda n: n["attempts"] >= 40 and n["echoes"] >= 30, "40 attempts, 30 echoes")
    assert rec["held"] == "" and rec["prio"] == "SCHED_OTHER"
    att = rec["attempts"]
    assert len(att) >= 40 and all(a[4] == "" for a in att)
    # each: due <= started <= handshake <= greeting, on the caller's clock
    assert all(a[0] <= a[1] <= a[2] <= a[3] for a in att)
    # attempts go on to the window's end and the records lose none the probe counted (a count,
    # not a time: a loaded machine may stall the probe for any while)
    assert t0 - 1 < att[0][1] < t1 and len(att) >= rec["counted_at_t1"]
    # The last echo may still be on its way when the probe stops (recorded unanswered, null):
    # on a loaded machine that is no failure; every earlier one came back, in order.
    echoes = rec["echoes"]
    assert len(echoes) >= 30 and all(b is not None and a <= b for a, b in echoes[:-1])
    assert echoes[-1][1] is None or echoes[-1][0] <= echoes[-1][1]
    f = window(rec, t0, t1, 0.01)
    assert f["failed"] == 0 and 0 < f["connect_ms"] <= f["answer_ms"] and f["interval_ms"] >= 5


def test_a_closed_port_fails_every_attempt_and_the_held_connection() -> None:
    port = free_port()
    rec, t0, t1 = probe(port, lambda n: n["attempts"] > 10, "more than 10 attempts")
    assert rec["held"] == "at start: ECONNREFUSED"
    assert rec["attempts"] and {a[4] for a in rec["attempts"]} == {"ECONNREFUSED"}
    f = window(rec, t0, t1, 0.01)
    assert f["failed"] == f["attempts"] > 10 and f["errors"] == ["ECONNREFUSED"]
    assert f["interval_ms"] == pytest.approx((t1 - t0) * 1e3)  # no completion at all: the whole window


def test_a_port_that_never_answers_times_out_after_its_handshake() -> None:
    with server(greet=False) as port:
        rec, _t0, _t1 = probe(port, lambda n: n["attempts"] >= 10, "10 attempts", timeout=0.2)
    att = rec["attempts"]
    assert att and all(a[2] is not None and a[3] is None and a[4] == "timeout" for a in att)
    assert rec["held"].startswith("at start: ")  # its greeting never came either


def test_a_held_connection_that_stops_echoing_is_reported_stalled() -> None:
    """No error on the held connection, but its echo never comes back (the path dropped it):
    the probe says so, and the window counts the unanswered echo to its end."""
    with server(greet=True, echo=False) as port:
        rec, t0, t1 = probe(port, lambda n: n["unanswered_s"] >= 0.6, "an echo unanswered for 0.6 s", timeout=0.2)
    assert rec["held"].startswith("stalled: no echo for "), rec["held"]
    assert rec["echoes"] and rec["echoes"][-1][1] is None
    assert all(a[4] == "" for a in rec["attempts"])  # new connections were served all along
    assert window(rec, t0, t1, 0.01)["echo_ms"] >= 400


def rec_of(*attempts: tuple) -> dict:
    return {"attempts": [list(a) for a in attempts], "echoes": [[1.0, 1.002], [2.0, 2.05], [None, 3.0]]}


def test_window_figures() -> None:
    rec = rec_of(
        (0.99, 0.99, 0.991, 0.995, ""),    # before the window: its handshake starts the first interval
        (1.00, 1.001, 1.002, 1.01, ""),
        (1.01, 1.03, None, None, "timeout"),  # 20 ms late, failed
        (1.02, 1.03, 1.10, 1.12, ""),      # a 70 ms handshake
        (1.03, 1.031, 1.032, 1.04, ""),
        (3.00, 3.0, 3.001, 3.002, ""),     # after the window: ends the last interval
    )
    f = window(rec, 1.0, 2.0, 0.01)
    assert f["attempts"] == 4 and f["failed"] == 1 and f["errors"] == ["timeout"]
    assert f["connect_ms"] == pytest.approx(70) and f["answer_ms"] == pytest.approx(90)
    assert f["late_ms"] == pytest.approx(20)
    # handshakes at 0.991, 1.002, 1.032, 1.10, then none until 3.001
    assert f["interval_ms"] == pytest.approx(1901)
    assert f["echo_ms"] == pytest.approx(50)  # echoes sent in the window only; an unsent one skipped
    rec["echoes"].append([1.5, None])  # unanswered when the probe stopped: until the window's end
    assert window(rec, 1.0, 2.0, 0.01)["echo_ms"] == pytest.approx(500)
    # sent before the window, still unanswered: on its way throughout, so the window's (a
    # stalled held connection whose only echo left as the probe started); one answered before
    # the window is not
    early = {"attempts": [], "echoes": [[0.5, 0.6], [0.9, None]]}
    assert window(early, 1.0, 2.0, 0.01)["echo_ms"] == pytest.approx(1100)
    assert window({"attempts": [], "echoes": [[0.5, 0.6]]}, 1.0, 2.0, 0.01)["echo_ms"] == 0
    assert f["load_pct"] == pytest.approx(4.0)


def test_window_with_nothing_in_it() -> None:
    f = window(rec_of(), 1.0, 1.5, 0.01)
    assert f["attempts"] == f["failed"] == 0 and f["interval_ms"] == pytest.approx(500) and f["connect_ms"] == 0


def test_window_counts_a_stall_that_outlasts_it() -> None:
    """Handshakes until 1.1, then none while the probe ran (service never back): the stall
    counts until the window's end, not only the 10 ms spacing before it."""
    rec = rec_of(
        (0.99, 0.99, 0.991, 0.995, ""),
        (1.09, 1.09, 1.091, 1.095, ""),
        (1.10, 1.10, 1.101, 1.105, ""),
        (1.11, 1.11, None, None, "timeout"),
    )
    f = window(rec, 1.0, 2.0, 0.01)
    assert f["failed"] == 1
    assert f["interval_ms"] == pytest.approx(899)
    # nothing after the window but one handshake before it: from that one to the end
    f = window(rec_of((0.5, 0.5, 0.501, 0.502, ""), (1.2, 1.2, None, None, "timeout")), 1.0, 2.0, 0.01)
    assert f["interval_ms"] == pytest.approx(1499)
