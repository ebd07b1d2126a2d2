"""`kpr monitor` against the socket hooks (topology in socklb_env.py): a scripted sequence of
connections and refusals arrives in order with backends and reasons; nothing is emitted while
nobody listens; filters and the CLI's JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import pytest

from kpr.model import FrontendType, Protocol
from kpr.monitor import EventFilter, Monitor

from socklb_env import NODE4, PODS, Env, answers, be, service
from socklb_env import clean_env, socklb  # noqa: F401 - the fixtures `env` and `socklb`

pytestmark = pytest.mark.kernel

CIP = FrontendType.CLUSTER_IP
NP = FrontendType.NODE_PORT
TCP = Protocol.TCP
IP = {name: v4 for name, (v4, _) in PODS.items()}



def test_events_of_a_scripted_sequence_in_order(env: Env) -> None:
    env.apply(service("mon-a", [(CIP, "10.96.3.10", 80)], [be("be1")], protocols=(TCP,)))
    env.apply(service("mon-b", [(CIP, "10.96.3.11", 80)], [], protocols=(TCP,)))
    env.apply(service("mon-c", [(CIP, "10.96.3.12", 80)], [be("be3")], protocols=(TCP,)))
    with Monitor(env.pin) as m:
        assert answers(env.client("tcp", "10.96.3.10", 80, 1)) == ["be1"]
        assert [r.get("error") for r in env.client("tcp", "10.96.3.11", 80, 1)] == ["ECONNREFUSED"]
        assert answers(env.client("tcp", "10.96.3.12", 80, 1)) == ["be3"]
        events = m.collect(3)
    got = [(e.type, e.hook, e.reason, e.frontend, e.backend) for e in events]
    assert got == [
        ("new", "socket", "socket", "10.96.3.10:80", f"{IP['be1']}:8080"),
        ("refuse", "socket", "no_backend", "10.96.3.11:80", None),
        ("new", "socket", "socket", "10.96.3.12:80", f"{IP['be3']}:8080"),
    ]
    assert events[0].cookie and events[0].protocol == "TCP" and events[0].rev_nat and events[0].backend_id
    assert events[0].ts_ns <= events[1].ts_ns <= events[2].ts_ns


def test_a_bind_refused_by_bind_protection_is_an_event(env: Env) -> None:
    env.apply(service("mon-bind", [(NP, NODE4, 30095)], [be("be1")], protocols=(TCP,)))
    with Monitor(env.pin) as m:
        assert env.client("bind", NODE4, 30095, "tcp", ns="node")[0].get("error") == "EADDRINUSE"
        events = m.collect(1) + m.poll(200)
    assert [(e.type, e.hook, e.reason, e.frontend, e.protocol) for e in events] == [
        ("refuse", "socket", "bind_refused", f"{NODE4}:30095", "TCP")
    ]
    assert events[0].cookie


def test_nothing_is_emitted_while_nobody_listens(env: Env) -> None:
    env.apply(service("mon-off", [(CIP, "10.96.3.20", 80)], [be("be2")], protocols=(TCP,)))
    with Monitor(env.pin) as m:
        assert answers(env.client("tcp", "10.96.3.20", 80, 1)) == ["be2"]
        assert len(m.collect(1)) == 1  # the set-up emits when someone listens
    assert answers(env.client("tcp", "10.96.3.20", 80, 5)) == ["be2"] * 5  # nobody listens
    with Monitor(env.pin) as m:
        assert m.poll(300) == [], "events were emitted with the flag off"
        assert answers(env.client("tcp", "10.96.3.20", 80, 1)) == ["be2"]
        assert len(m.collect(1)) == 1


def test_type_filter_in_the_programs_and_sampling(env: Env) -> None:
    env.apply(service("mon-t", [(CIP, "10.96.3.30", 80)], [be("be1")], protocols=(TCP,)))
    env.apply(service("mon-t0", [(CIP, "10.96.3.31", 80)], [], protocols=(TCP,)))
    keep = EventFilter(types=frozenset({"refuse"}))
    with Monitor(env.pin, types=keep.type_mask()) as m:
        env.client("tcp", "10.96.3.30", 80, 3)
        env.client("tcp", "10.96.3.31", 80, 2)
        events = m.collect(2) + m.poll(300)
    assert [(e.type, e.reason) for e in events] == [("refuse", "no_backend")] * 2
    with Monitor(env.pin, sample=1000) as m:
        env.client("tcp", "10.96.3.30", 80, 20)
        sampled = m.poll(300)
    assert len(sampled) < 10, "1 in 1000 sampled: 20 connections give a few events at most"


def test_cli_json_lines_with_filters(env: Env) -> None:
    env.apply(service("mon-cli", [(CIP, "10.96.3.40", 80)], [be("be2")], protocols=(TCP,)))
    env.apply(service("mon-cli0", [(CIP, "10.96.3.41", 80)], [], protocols=(TCP,)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kpr.cli", "monitor", "--pin-path", str(env.pin), "--no-names", "--json", "--count", "2",
         "--seconds", "30", "--address", "10.96.3.41"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        seen = 0
        while proc.poll() is None and time.monotonic() < deadline:
            env.client("tcp", "10.96.3.40", 80, 1)  # filtered out by address
            env.client("tcp", "10.96.3.41", 80, 1)
            seen += 1
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(r["frontend"] == "10.96.3.41:80" and r["reason"] == "no_backend" for r in rows), rows
    assert all(r["type"] == "refuse" and r["hook"] == "socket" and r["protocol"] == "TCP" for r in rows)


def test_a_killed_listener_stops_counting(env: Env, tmp_path) -> None:
    from kpr.bpf import maps as M
    from kpr.monitor import MonCfg

    def on() -> int:
        with M.BpfMap.open_pinned(env.pin / "kpr_mon_cfg") as cfg:
            return MonCfg.from_buffer_copy(cfg.lookup(M.U32.pack(0))).on

    reg = tmp_path / "listeners"
    killed = subprocess.Popen(["sleep", "60"])
    with Monitor(env.pin, registry=reg):
        (reg / f"{killed.pid}-1").touch()  # a second monitor, as it registers...
        killed.kill()  # ... then SIGKILL: it never lowers the flag
        killed.wait()
        with Monitor(env.pin, registry=reg):
            assert on() == 2  # the dead one is no longer counted
        assert on() == 1
    assert on() == 0 and not reg.exists()
