"""tc_nodeport without a kernel: its config section, the per-service state the NodePort
facility derives, and the collector's decisions on fake maps."""

from __future__ import annotations

import pytest

from kpr.bpf import maps as M
from kpr.config import ConfigError, parse_config
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.nodeport import gc as G
from kpr.pluginmanager import build_plugin_manager
from kpr.plugins.tc_nodeport import datapath as D
from kpr.plugins.tc_nodeport.config import TcNodePortConfig
from kpr.testing.standin_maps import DictMap
from kpr.testing.waiting import stays, wait_for
from kpr.nodeport.services import MODE_ANNOTATION, service_state


def test_defaults_and_the_documented_shape() -> None:
    cfg = TcNodePortConfig.model_validate(
        {"mode": "dsr", "algorithm": "maglev", "maglevTableSize": 16381, "conntrackSize": 524288, "healthCheck": True}
    )
    assert (cfg.mode, cfg.algorithm, cfg.maglev_table_size, cfg.conntrack_size, cfg.health_check) == (
        "dsr", "maglev", 16381, 524288, True,
    )
    d = TcNodePortConfig()
    assert d.mode == "snat" and d.tc_priority == 1 and d.keep_attached_on_stop


@pytest.mark.parametrize(
    "section, problem",
    [
        ({"mode": "tunnel"}, "plugins.tc_nodeport.mode"),
        ({"maglevTableSize": 16380}, "must be a prime number"),
        ({"conntrackSize": 10}, "plugins.tc_nodeport.conntrackSize"),
        ({"healthCheckAddress": "nope"}, "not an IP address"),
        ({"gcInterval": 0}, "plugins.tc_nodeport.gcInterval"),
        ({"devices": ["eth0"]}, "plugins.tc_nodeport.devices: unknown key"),
    ],
)
def test_check_config_names_the_key(section: dict, problem: str) -> None:
    config = parse_config("plugins:\n  tc_nodeport: {enabled: false}\n")
    config.plugins["tc_nodeport"] = type(config.plugins["tc_nodeport"]).model_validate({"enabled": False, **section})
    with pytest.raises(ConfigError) as exc:
        build_plugin_manager(config)
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_enabled_plugin_requires_the_service_maps() -> None:
    config = parse_config("plugins:\n  tc_nodeport: {enabled: true, mode: hybrid}\n")
    kpm = build_plugin_manager(config, facilities={"servicemaps": lambda cfg: object(), "nodeport": lambda cfg: object()})
    assert [h.name for h in kpm.handles] == ["servicemaps", "nodeport", "tc_nodeport"]
    assert kpm.handle("tc_nodeport").section.mode == "hybrid"


def _svc(annotations: tuple = ()) -> Service:
    b_local = Backend("10.244.1.11", 8080, node_name="n1", local=True)
    b_term = Backend("10.244.1.12", 8080, state=BackendState.TERMINATING, node_name="n1", local=True)
    b_remote = Backend("10.244.2.11", 8080, node_name="n2")
    bes = (b_local, b_term, b_remote)
    return Service(
        ServiceKey("default", "web"),
        (
            Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", 80, Protocol.TCP, bes),
            Frontend(FrontendType.NODE_PORT, "10.0.0.1", 30080, Protocol.TCP, bes, external_local=True,
                     health_check_node_port=32000),
            Frontend(FrontendType.LOAD_BALANCER, "203.0.113.5", 80, Protocol.TCP, bes, external_local=True,
                     health_check_node_port=32000),
            Frontend(FrontendType.EXTERNAL_IP, "198.51.100.9", 80, Protocol.UDP, bes),
            Frontend(FrontendType.LOAD_BALANCER, "203.0.113.5", 9000, Protocol.SCTP, bes),
        ),
        annotations=annotations,
    )


def test_service_state() -> None:
    st, problem = service_state(_svc())
    assert problem == ""
    # ClusterIP and SCTP frontends are not this plugin's
    assert {(M.bytes_to_addr(a), M.ntohs(p), pr) for a, p, pr in st.frontends} == {
        ("10.0.0.1", 30080, 6), ("203.0.113.5", 80, 6), ("198.51.100.9", 80, 17),
    }
    assert st.vips == {"203.0.113.5", "198.51.100.9"}
    assert st.nodeports == {(M.htons(30080), 6): st.frontends[(M.addr_to_bytes("10.0.0.1"), M.htons(30080), 6)]}
    # terminating backends keep their flows: they are allowed
    assert len(st.frontends[(M.addr_to_bytes("203.0.113.5"), M.htons(80), 6)]) == 3
    # the health check counts ready local endpoints only
    assert (st.hc_port, st.local_endpoints) == (32000, 1)
    assert st.modes == {}


def test_mode_annotation() -> None:
    st, problem = service_state(_svc(((MODE_ANNOTATION, "dsr"),)))
    assert problem == ""
    assert st.modes[("10.0.0.1", 30080, 6)] == "dsr"
    assert st.modes[("0.0.0.0", 30080, 6)] == "dsr", "the wildcard NodePort entry too"
    assert st.modes[("203.0.113.5", 80, 6)] == "dsr"
    # written whatever a plugin's default is: tc and XDP read one table, each with its own default
    same, _ = service_state(_svc(((MODE_ANNOTATION, "snat"),)))
    assert same.modes[("203.0.113.5", 80, 6)] == "snat"
    bad, problem = service_state(_svc(((MODE_ANNOTATION, "direct"),)))
    assert bad.modes == {} and "direct" in problem and "snat" in problem


# ---------------------------------------------------------------------- collector on fake maps


FakeMap = DictMap


A = M.addr_to_bytes
CLIENT, FE, BE, NODE = A("192.0.2.1"), A("203.0.113.5"), A("10.244.2.11"), A("10.0.0.1")
P = M.htons


# A SNAT flow as each build writes it: "two" entries (KPR_NP_SNAT_IN_CT: the mapping in the
# conntrack entry, one kpr_snat entry for replies naming client and frontend) or "four"
# (conntrack, SNAT forward and reverse, kpr_np_rev).
LAYOUTS = ("two", "four")


def _maps(now: int, *, flags: int, proto: int, last_seen: int, backend_id: int = 7,
          layout: str = "two") -> dict[str, FakeMap]:
    two = layout == "two"
    ct = FakeMap({
        D.CT_KEY.pack(CLIENT, FE, P(5000), P(80), proto, D.CT_DIR_ORIGINAL, 0):
            D.CT_ENTRY.pack(last_seen, backend_id, 3, flags | D.CT_F_NODE_PORT, 0, 0,
                            P(62000) if two else 0, 0, NODE if two else bytes(16)),
        # a flow another program tracks: never this collector's
        D.CT_KEY.pack(CLIENT, A("10.96.0.1"), P(5001), P(80), proto, D.CT_DIR_ORIGINAL, 0):
            D.CT_ENTRY.pack(0, 1, 1, 0, 0, 0, 0, 0, bytes(16)),
    })
    reverse_key = D.CT_KEY.pack(BE, NODE, P(8080), P(62000), proto, D.CT_DIR_REPLY, 0)
    if two:
        rev = FakeMap()
        snat = FakeMap({reverse_key: D.NAT_ENTRY.pack(CLIENT, P(5000), P(80), 0, now - 20 * 10**9, FE)})
    else:
        rev = FakeMap({D.CT_KEY.pack(BE, CLIENT, P(8080), P(5000), proto, D.CT_DIR_REPLY, 0): D.NP_REV.pack(FE, P(80), 0, 0, 0)})
        snat = FakeMap({
            D.CT_KEY.pack(CLIENT, BE, P(5000), P(8080), proto, D.CT_DIR_ORIGINAL, 0):
                D.NAT_ENTRY.pack(NODE, P(62000), 0, 0, 0, bytes(16)),
            reverse_key: D.NAT_ENTRY.pack(CLIENT, P(5000), 0, 0, 0, bytes(16)),
        })
    backend = FakeMap({M.U32.pack(7): M.BACKEND.pack(BE, P(8080), proto, 0, 0)})
    return {"kpr_ct": ct, D.REV_MAP: rev, "kpr_snat": snat, "kpr_backend": backend}


def _collector(maps: dict[str, FakeMap], allowed: G.BackendSet | None) -> G.Collector:
    return G.Collector(maps, lambda a, p, pr: allowed, lambda: {NODE}, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_live_flow_keeps_everything(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now - 5 * 10**9, layout=layout)
    entries = {name: dict(m.d) for name, m in maps.items()}
    c = _collector(maps, frozenset({(BE, P(8080))}))
    res = c.run()
    assert (res.ct_expired, res.stale, res.rev_expired, res.snat_freed) == (0, 0, 0, 0)
    assert c.totals.ct_entries == 1 and c.totals.snat_entries == 1
    assert c.totals.rev_entries == (0 if layout == "two" else 1)
    assert {name: m.d for name, m in maps.items()} == entries


def test_reverse_entry_of_no_flow_is_freed_once_past_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SNAT_IN_CT reverse entry whose conntrack entry is gone (evicted, never written): freed
    after GRACE_NS, kept while younger (its conntrack entry may be being written)."""
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now)
    maps["kpr_ct"].d.clear()
    (key, raw), = maps["kpr_snat"].d.items()
    young = D.NAT_ENTRY.pack(*D.NAT_ENTRY.unpack(raw)[:4], now - 10**9, FE)
    maps["kpr_snat"].d[key] = young
    assert _collector(maps, None).run().snat_freed == 0 and maps["kpr_snat"].d == {key: young}
    maps["kpr_snat"].d[key] = raw  # 20 s old
    assert _collector(maps, None).run().snat_freed == 1 and maps["kpr_snat"].d == {}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expired_udp_flow_frees_its_port_and_reverse_entry(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now - 61 * 10**9, layout=layout)
    res = _collector(maps, frozenset({(BE, P(8080))})).run()
    assert (res.ct_expired, res.snat_freed, res.rev_expired) == (1, 1, 0 if layout == "two" else 1)
    assert len(maps["kpr_ct"].d) == 1, "the other program's entry stays"
    assert maps["kpr_snat"].d == {} and maps[D.REV_MAP].d == {}


def test_established_tcp_lives_six_hours_a_syn_only_one_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    maps = _maps(now, flags=D.CT_F_SNAT | D.CT_F_SEEN_REPLY, proto=6, last_seen=now - 3600 * 10**9)
    assert _collector(maps, None).run().ct_expired == 0
    maps = _maps(now, flags=D.CT_F_SNAT, proto=6, last_seen=now - 120 * 10**9)
    assert _collector(maps, None).run().ct_expired == 1


def test_passes_judge_no_flow_stale_before_the_services_are_all_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass runs at once, in the initial burst of services: against a book still
    filling, a frontend two services share had only the first one's backends (the other's UDP
    flows judged stale and cleared). Until `ready()` (the facility: the initial sync complete)
    a periodic pass judges no flow stale; a pass asked for (a change's purge, the sync's end)
    does, and so does every pass once ready."""
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    other = frozenset({(A("10.244.2.12"), P(8080))})
    synced = False
    for stale_only, ready, want in ((False, False, 0), (True, False, 1), (False, True, 1)):
        synced = ready
        maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now)
        c = G.Collector(maps, lambda a, p, pr: other, lambda: {NODE}, 1.0, ready=lambda: synced)  # type: ignore[arg-type]
        assert c.run(stale_only=stale_only).stale == want, (stale_only, ready)


def test_stale_udp_flow_is_cleared_even_when_young(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now)
    other = frozenset({(A("10.244.2.12"), P(8080))})
    res = _collector(maps, other).run(stale_only=True)
    assert res.stale == 1 and res.snat_freed == 1 and maps["kpr_snat"].d == {}
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now, layout="four")
    res = _collector(maps, other).run(stale_only=True)
    assert res.stale == 1 and res.snat_freed == 1 and res.rev_expired == 1
    # a frontend the plugin does not know is never judged
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now)
    assert _collector(maps, None).run(stale_only=True).stale == 0
    # TCP is left to end on its own (the datapath re-balances it when its backend entry goes)
    maps = _maps(now, flags=D.CT_F_SNAT, proto=6, last_seen=now)
    assert _collector(maps, other).run(stale_only=True).stale == 0


def test_dsr_reverse_entries_expire_on_their_own_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    rev = FakeMap({
        D.CT_KEY.pack(BE, CLIENT, P(8080), P(5000), 17, D.CT_DIR_REPLY, 0): D.NP_REV.pack(FE, P(80), D.REV_F_DSR, 0, now - 61 * 10**9),
        D.CT_KEY.pack(BE, CLIENT, P(8080), P(5001), 17, D.CT_DIR_REPLY, 0): D.NP_REV.pack(FE, P(80), D.REV_F_DSR, 0, now - 10**9),
    })
    maps = {"kpr_ct": FakeMap(), D.REV_MAP: rev, "kpr_snat": FakeMap(), "kpr_backend": FakeMap()}
    res = _collector(maps, None).run()
    assert res.rev_expired == 1 and len(rev.d) == 1


def test_collector_thread_leaves_quietly_once_its_maps_are_closed(caplog: pytest.LogCaptureFixture) -> None:
    """A datapath that closes its maps (dict emptied) while the collector's thread still runs,
    as a teardown whose stop() timed out leaves it: the thread ends instead of logging a
    KeyError traceback every interval (seen from a leaked collector in a later test)."""
    maps: dict[str, FakeMap] = {}
    c = G.Collector(maps, lambda a, p, pr: None, lambda: {NODE}, 0.01)  # type: ignore[arg-type]
    c.start()
    thread = c._thread
    assert thread is not None
    thread.join(2.0)
    assert not thread.is_alive()
    assert c.totals.errors == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    c.stop()


def test_collector_thread_passes_at_once_then_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A started collector's first pass is at once, not an interval later: nothing frees SNAT
    ports while no agent runs, and agents restarted within an interval of each other (a crash
    loop, a burst of restarts) would otherwise never pass at all; in bench_restart.py such a
    run refused NodePort flows for want of ports (SNAT range full of closed flows)."""
    now = 10**15
    monkeypatch.setattr(G, "now_ns", lambda: now)
    maps = _maps(now, flags=D.CT_F_SNAT, proto=17, last_seen=now - 61 * 10**9)
    c = G.Collector(maps, lambda a, p, pr: None, lambda: {NODE}, 3600.0)  # type: ignore[arg-type]
    c.start()
    try:
        wait_for(lambda: c.totals.runs, 10, "the first pass")
        assert c.totals.runs == 1 and maps["kpr_snat"].d == {}, "the expired flow's port freed by the first pass"
        stays(lambda: c.totals.runs == 1, 0.2, "one pass: the next an interval later")
    finally:
        c.stop()
