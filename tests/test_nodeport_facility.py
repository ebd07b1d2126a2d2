"""The NodePort facility without a kernel: one facility for both NodePort plugins (the plugin
manager adds it once), its settings merged from their sections, and the per-service
bookkeeping whose changes are differences (first reference in, last reference out)."""

from __future__ import annotations

import pytest

from kpr.bpf import maps as M
from kpr.config import ConfigError, parse_config
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.nodeport.facility import NodePortFacility, Settings, settings_from
from kpr.nodeport.services import MODE_ANNOTATION, ServiceBook, service_state
from kpr.pluginmanager import build_plugin_manager
from kpr.plugins.tc_nodeport.config import TcNodePortConfig
from kpr.plugins.xdp_nodeport.config import XdpNodePortConfig

LB = FrontendType.LOAD_BALANCER


def _lb(name: str, vip: str, port: int = 80, mode: str = "", backend: str = "10.244.1.10") -> Service:
    fe = Frontend(LB, vip, port, Protocol.TCP, (Backend(backend, 8080, node_name="n1"),))
    return Service(ServiceKey("default", name), (fe,), annotations=((MODE_ANNOTATION, mode),) if mode else ())


def test_both_plugins_get_one_facility() -> None:
    config = parse_config("plugins:\n  tc_nodeport: {enabled: true, mode: dsr}\n  xdp_nodeport: {enabled: true}\n")
    kpm = build_plugin_manager(config, facilities={"servicemaps": lambda cfg: object(),
                                                   "nodeport": NodePortFacility.from_config})
    names = [h.name for h in kpm.handles]
    assert names.count("nodeport") == 1 and names.index("nodeport") < names.index("tc_nodeport")
    fac = kpm.handle("nodeport").plugin
    assert isinstance(fac, NodePortFacility)
    assert kpm.pm.hook.kpr_service_upsert.get_hookimpls()[0].plugin is fac, "only the facility takes services"
    assert [i.plugin for i in kpm.pm.hook.kpr_service_upsert.get_hookimpls()] == [fac]


def test_settings_merge_and_disagreements_name_both_keys() -> None:
    tc = TcNodePortConfig.model_validate({"healthCheck": False, "gcInterval": 5})
    xdp = XdpNodePortConfig.model_validate({"healthCheckAddress": "10.0.0.1", "gcInterval": 5})
    st = settings_from({"tc_nodeport": tc, "xdp_nodeport": xdp})
    assert st.health_check and st.health_check_address == "10.0.0.1" and st.gc_interval == 5
    assert settings_from({}) == Settings()
    with pytest.raises(ConfigError) as exc:
        settings_from({"tc_nodeport": TcNodePortConfig.model_validate({"gcInterval": 3, "healthCheck": False}),
                       "xdp_nodeport": xdp})
    assert exc.value.problems == [
        "plugins.xdp_nodeport.gcInterval: 5.0 disagrees with plugins.tc_nodeport.gcInterval: 3.0 "
        "(one NodePort facility serves both plugins)"
    ]


def test_flow_slots_are_on_by_default_and_both_plugins_must_agree() -> None:
    """flowSlots: one setting for both builds (a flow XDP begins in a slot is looked for there by
    tc); false builds both without the slot tables, and the collector then never marks the
    conntrack gate clean (its programs write kpr_ct unmarked)."""
    from kpr.nodeport import datapath as D

    assert settings_from({"tc_nodeport": TcNodePortConfig.model_validate({})}).flow_slots
    off = settings_from({"tc_nodeport": TcNodePortConfig.model_validate({"flowSlots": False}),
                         "xdp_nodeport": XdpNodePortConfig.model_validate({"flowSlots": False})})
    assert off.flow_slots is False
    with pytest.raises(ConfigError) as exc:
        settings_from({"tc_nodeport": TcNodePortConfig.model_validate({"flowSlots": False}),
                       "xdp_nodeport": XdpNodePortConfig.model_validate({})})
    assert exc.value.problems == [
        "plugins.xdp_nodeport.flowSlots: True disagrees with plugins.tc_nodeport.flowSlots: False "
        "(one NodePort facility serves both plugins)"
    ]
    with pytest.raises(ValueError, match="flowSlots"):
        TcNodePortConfig.model_validate({"flowSlots": "maybe"})
    on, no = D.Datapath("/nonexistent"), D.Datapath("/nonexistent", flow_slots=False)
    assert D.CT_SLOTS_ON and D.SNAT_SLOTS_ON, "the headers' default (README issue 14)"
    assert on.ct_slots() and on.snat_slots() and not set(D.NO_SLOTS) & set(on.cflags())
    assert not no.ct_slots() and not no.snat_slots() and set(D.NO_SLOTS) <= set(no.cflags())
    # a test's own -D flag still decides (extra_cflags come last)
    assert D.Datapath("/nonexistent", flow_slots=False, extra_cflags=["-DKPR_NP_CT_SLOTS=1"]).ct_slots()
    # SNAT slots are taken only with the SNAT mapping in conntrack and the next hop cached
    assert not D.Datapath("/nonexistent", extra_cflags=["-DKPR_NP_SNAT_IN_CT=0"]).snat_slots()


@pytest.mark.parametrize("flow_slots", [True, False])
def test_the_facilitys_collector_serves_builds_as_flow_slots_say(flow_slots: bool) -> None:
    """The collector kpr_start makes (NodePortFacility._new_collector) marks kpr_np_ct_gate clean
    only for builds with slot tables: flowSlots false's programs write kpr_ct unmarked."""
    from pathlib import Path

    fac = NodePortFacility(settings_from({"tc_nodeport": TcNodePortConfig.model_validate({"flowSlots": flow_slots})}))
    fac.pin = Path("/nonexistent")
    collector = fac._new_collector({})
    assert collector.ct_slots is flow_slots and collector.pin == fac.pin


@pytest.mark.parametrize("flow_slots", [True, False])
def test_each_plugin_builds_as_its_flow_slots_say(flow_slots: bool) -> None:
    from pathlib import Path

    from kpr.plugins.tc_nodeport.plugin import TcNodePort
    from kpr.plugins.xdp_nodeport.plugin import XdpNodePort

    for plugin, cfg in ((TcNodePort(), TcNodePortConfig), (XdpNodePort(), XdpNodePortConfig)):
        plugin.pin = Path("/nonexistent")
        dp = plugin._new_datapath(cfg.model_validate({"flowSlots": flow_slots}), 16381)
        assert (dp.ct_slots(), dp.snat_slots()) == (flow_slots, flow_slots), type(plugin).__name__


def test_a_change_yields_only_its_own_differences() -> None:
    book = ServiceBook()
    a = book.put(ServiceKey("default", "a"), service_state(_lb("a", "203.0.113.1", mode="dsr"))[0])
    assert a is not None
    assert a.ports_added == {(80, 6)} and a.vips_added == {"203.0.113.1"}
    assert a.modes_set == {("203.0.113.1", 80, 6): "dsr"}
    # a second service on the same port adds no port; its own address only
    b = book.put(ServiceKey("default", "b"), service_state(_lb("b", "203.0.113.2"))[0])
    assert b is not None and b.ports_added == set() and b.vips_added == {"203.0.113.2"} and not b.modes_set
    assert book.put(ServiceKey("default", "b"), service_state(_lb("b", "203.0.113.2"))[0]) is None, "unchanged"
    # a moved backend: the frontend's old backend is reported for its flows to be cleared
    moved = book.put(ServiceKey("default", "b"), service_state(_lb("b", "203.0.113.2", backend="10.244.1.99"))[0])
    assert moved is not None
    assert list(moved.backends_removed.values()) == [frozenset({(M.addr_to_bytes("10.244.1.10"), M.htons(8080))})]
    gone = book.put(ServiceKey("default", "a"), None)
    assert gone is not None and gone.ports_removed == set(), "b still uses port 80"
    assert gone.vips_removed == {"203.0.113.1"} and gone.modes_removed == {("203.0.113.1", 80, 6)}
    last = book.put(ServiceKey("default", "b"), None)
    assert last is not None and last.ports_removed == {(80, 6)}
    assert book.ports() == set() and book.vips() == set() and book.modes() == {}


def test_two_services_claiming_one_frontend_mode() -> None:
    book = ServiceBook()
    book.put(ServiceKey("default", "a"), service_state(_lb("a", "203.0.113.1", mode="dsr"))[0])
    ch = book.put(ServiceKey("default", "b"), service_state(_lb("b", "203.0.113.1", mode="snat"))[0])
    assert ch is not None and ch.modes_set == {("203.0.113.1", 80, 6): "snat"}
    ch = book.put(ServiceKey("default", "b"), None)
    assert ch is not None and ch.modes_set == {("203.0.113.1", 80, 6): "dsr"} and not ch.modes_removed


def _state(frontends: dict, nodeports: dict | None = None) -> "SvcState":
    from kpr.nodeport.services import SvcState

    return SvcState(frontends, nodeports or {}, frozenset(), {}, 0, 0, False)


def test_allowed_never_sees_a_service_half_updated() -> None:
    """The collector's thread asks allowed() while the facility's thread updates services (the
    initial burst overlaps the collector's first pass, which runs at once). A frontend whose
    owner is being updated must read as before or after, never as its owner's entries half
    removed: then a ClusterIP frontend on a port some NodePort also uses fell back to that
    NodePort's backends, and its live flows were judged stale and cleared."""
    import sys
    import threading

    port, tcp = M.htons(30080), 6
    fe = (bytes(10) + b"\xff\xff" + bytes([10, 96, 0, 1]), port, tcp)
    a, b, other = (b"\x0a" * 16, 8080), (b"\x0b" * 16, 8080), (b"\x0c" * 16, 8080)
    book = ServiceBook()
    book.put(ServiceKey("default", "np"), _state({}, {(port, tcp): frozenset({other})}))
    states = [_state({fe: frozenset({a})}), _state({fe: frozenset({a, b})})]
    key = ServiceKey("default", "vip")
    book.put(key, states[0])
    wrong: list = []
    stop = threading.Event()

    def collector() -> None:
        while not stop.is_set():
            try:
                got = book.allowed(*fe)
            except RuntimeError as e:  # "dictionary changed size during iteration"
                wrong.append(e)
                continue
            if got is not None and a not in got:
                wrong.append(got)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=collector)
    t.start()
    try:
        for i in range(20000):
            book.put(key, states[(i + 1) % 2])
            if len(wrong) >= 5:
                break
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert not wrong, f"allowed() saw {len(wrong)} half-updated answers, e.g. {wrong[0]!r}"



@pytest.mark.parametrize(("plugins", "copy"), [("socklb: {enabled: true}", False),
                                               ("socklb: {enabled: true}\n  tc_nodeport: {enabled: true}", True),
                                               ("xdp_nodeport: {enabled: true}", True)])
def test_the_writer_keeps_kpr_fe_only_for_the_nodeport_programs(plugins: str, copy: bool) -> None:
    # kpr_fe (kpr.servicemaps.fetable) is read only by lib/nodeport.h: without a NodePort plugin
    # the writer would pay for a copy on every kpr_svc write that no program reads
    kpm = build_plugin_manager(parse_config(f"plugins:\n  {plugins}\n"))
    writer = kpm.handle("servicemaps").plugin
    assert writer.frontend_table is copy
