"""lib/monitor.h is the one definition of the monitor's event layout and names: the Python
mirror matches it field by field (names, order, sizes), its reasons are drop counter names,
and events decode, filter and print (root-free)."""

from __future__ import annotations

import ctypes
import re

import pytest

from kpr import drops
from kpr.bpf import maps as M
from kpr.monitor import HOOKS, MONITOR_H, NEW_HOW, REASONS, TYPES, Event, EventFilter, MonCfg, MonEvent, MonitorError
from kpr.nodeport.datapath import DROP_STATS, FWD_STATS, STATS

C_SIZES = {"__u64": 8, "__u32": 4, "__u16": 2, "__be16": 2, "__u8": 1, "union kpr_addr": 16}


def _c_fields(struct: str) -> list[tuple[str, int]]:
    text = MONITOR_H.read_text()
    body = re.search(rf"struct {struct} {{(.*?)\n}};", text, re.S)
    assert body, struct
    out = []
    for line in body[1].splitlines():
        m = re.match(r"\s*((?:union )?[\w]+)\s+(\w+);", line)
        if m:
            out.append((m[2], C_SIZES[m[1]]))
    return out


@pytest.mark.parametrize("struct,mirror", [("kpr_mon_event", MonEvent), ("kpr_mon_cfg", MonCfg)])
def test_python_mirror_matches_the_header(struct: str, mirror: type[ctypes.Structure]) -> None:
    c = _c_fields(struct)
    py = [(name, ctypes.sizeof(t)) for name, t in mirror._fields_]
    assert py == c
    asserted = re.search(rf"sizeof\(struct {struct}\) == (\d+)", MONITOR_H.read_text())
    assert asserted and ctypes.sizeof(mirror) == int(asserted[1])


def test_names_come_from_the_header_and_reasons_are_drop_counter_names() -> None:
    assert set(TYPES.values()) == {"new", "drop", "refuse", "ct_full", "nat_full", "pass"}
    assert set(HOOKS.values()) == {"socket", "tc", "xdp"}
    assert set(NEW_HOW.values()) == {"socket", "local", "snat", "dsr"}
    counter_reasons = {drops.reason_of("tc_nodeport", s) for s in (*STATS, *FWD_STATS.values())} | set(drops.SOCKET_REFUSALS)
    # "malformed" is the one passed (not dropped) packet with an event of its own (type pass)
    assert set(REASONS.values()) <= counter_reasons | {"malformed"}
    # ... and every drop or refusal the programs count has its reason: the events tell them all
    dropped = counter_reasons - {None}
    assert {drops.reason_of("tc_nodeport", s) for s in DROP_STATS} <= dropped
    assert {"short_frame", "tail_call_missing"} <= dropped
    assert dropped <= set(REASONS.values())


def _raw(**kw: object) -> bytes:
    e = MonEvent()
    for k, v in kw.items():
        if k in ("saddr", "daddr", "baddr"):
            ctypes.memmove(getattr(e, k), M.addr_to_bytes(str(v)), 16)
        else:
            setattr(e, k, v)
    return bytes(e)


def test_decode_filter_and_print() -> None:
    new = Event.decode(_raw(type=1, hook=2, reason=3, proto=17, saddr="10.100.0.2", sport=M.htons(4000),
                            daddr="10.0.1.10", dport=M.htons(30080), baddr="10.244.2.11", bport=M.htons(8080),
                            rev_nat=5, backend_id=9, ts=1))
    assert (new.type, new.hook, new.reason, new.protocol) == ("new", "tc", "snat", "UDP")
    assert (new.client, new.frontend, new.backend) == ("10.100.0.2:4000", "10.0.1.10:30080", "10.244.2.11:8080")
    assert "new      tc     10.100.0.2:4000 -> 10.0.1.10:30080/UDP => 10.244.2.11:8080 (snat)" in new.text()
    drop = Event.decode(_raw(type=2, hook=3, reason=3, proto=6, saddr="fd10::2", sport=M.htons(5), daddr="2001:db8:f::1",
                             dport=M.htons(80)))
    assert drop.backend is None and drop.client == "[fd10::2]:5" and drop.text().endswith("/TCP: source_range")
    sock = Event.decode(_raw(type=3, hook=1, reason=1, proto=6, daddr="10.96.0.10", dport=M.htons(80), cookie=77))
    assert sock.client is None and "socket 77 -> 10.96.0.10:80/TCP: no_backend" in sock.text()
    assert sock.to_json()["cookie"] == 77 and sock.to_json()["backend"] is None

    # a drop without packet headers (kpr_mon_bare: a missing stage, a frame too short)
    bare = Event.decode(_raw(type=2, hook=2, reason=15, ts=1))
    assert (bare.reason, bare.client, bare.frontend, bare.protocol) == ("tail_call_missing", None, "", "")
    assert bare.text().endswith(" drop     tc     -: tail_call_missing")
    assert bare.to_json()["frontend"] is None and bare.to_json()["client"] is None
    assert EventFilter(reasons=frozenset({"tail_call_missing"}))(bare) and not EventFilter(addresses=frozenset({"::"}))(bare)

    assert EventFilter()(new) and EventFilter(types=frozenset({"drop"}))(drop) and not EventFilter(types=frozenset({"drop"}))(new)
    assert EventFilter(reasons=frozenset({"source_range"}))(drop) and not EventFilter(reasons=frozenset({"no_backend"}))(drop)
    assert EventFilter(addresses=frozenset({"10.244.2.11"}))(new) and not EventFilter(addresses=frozenset({"10.244.2.11"}))(drop)
    assert EventFilter(addresses=frozenset({"fd10:0::2"}))(drop)
    new.service = "default/web"
    assert EventFilter(services=frozenset({"default/web"}))(new) and not EventFilter(services=frozenset({"default/web"}))(drop)
    assert EventFilter(types=frozenset({"new", "refuse"})).type_mask() == (1 << 1) | (1 << 3)


@pytest.mark.parametrize("kw,why", [
    ({"types": frozenset({"dropped"})}, "not an event type"),
    ({"reasons": frozenset({"nope"})}, "not a reason"),
    ({"addresses": frozenset({"web"})}, "not an IP address"),
])
def test_bad_filters_name_the_problem(kw: dict, why: str) -> None:
    with pytest.raises(MonitorError, match=why):
        EventFilter(**kw)


def test_cli_without_maps_says_why(tmp_path, capsys) -> None:
    from kpr import cli

    assert cli.main(["monitor", "--pin-path", str(tmp_path), "--no-names"]) == 2
    assert "no kpr_mon_cfg or kpr_mon_ring under" in capsys.readouterr().err
    assert cli.main(["monitor", "--pin-path", str(tmp_path), "--no-names", "--type", "bogus"]) == 2
    assert "not an event type" in capsys.readouterr().err
