"""xdp_nodeport end to end: real traffic from an external client through node1's XDP program
to a backend on node2, source-NATed (topology in tc_nodeport_env.py, node1 with eth0 only).

A veth delivers frames its XDP program redirects or transmits only when the peer has an XDP
program too: the router's side of node1's link gets a bare XDP_PASS program for the test.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.bpf.cleanup import attachments, cleanup
from kpr.model import Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.plugins.xdp_nodeport.config import XdpNodePortConfig
from kpr.plugins.xdp_nodeport.plugin import XdpNodePort
from kpr.testing.agent import AgentConfig, kpr_cleanup, running_agent
from kpr.testing.netns import Topology

from tc_nodeport_env import (
    CLIENT,
    NODES,
    PODS,
    Cluster,
    answers,
    backends,
    build_topology,
    client,
    cluster,
    dev_with,
    full_checksums,
    name_and_peer,
    node_harness,
    on_node_address,
    peer_pass,
    start_xdp,
    xdp_on,
)

pytestmark = pytest.mark.kernel

NP, LB = FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER
TCP, UDP = Protocol.TCP, Protocol.UDP
N1 = NODES["node1"]["addr"]
def service(name: str, fe_type: FrontendType, addr: str | None, port: int, *pods: str, proto: Protocol = TCP) -> Any:
    def make(node: str) -> Service:
        a = addr or NODES[node]["addr"]
        return Service(ServiceKey("default", name), (Frontend(fe_type, a, port, proto, backends(node, *pods)),))

    return make


def peers(rows: list[dict]) -> list[tuple[str, str]]:
    return [tuple(a.partition(" ")[::2]) for a in answers(rows)]  # type: ignore[misc]


@pytest.fixture(scope="module")
def env(require_kernel: None) -> Iterator[Cluster]:
    with cluster(start=False, second_device=False) as c:
        full_checksums(c.topo, "cl", *(p for p, (node, _a, _b) in PODS.items() if node == "node2"))
        with peer_pass(c.topo, "rt", dev_with(c.topo, "rt", NODES["node1"]["rt"])):
            c.plugins["node1"] = start_xdp(  # type: ignore[assignment]
                c.harnesses["node1"], gc_interval=1.0, conntrack_size=65536, xdp_mode="native",
                keep_attached_on_stop=False,
            )
            try:
                yield c
            finally:
                c.stop("node1")
                assert xdp_on(c.topo, "node1", "eth0") == [], "kpr_stop detaches"


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "env" in request.fixturenames:
        request.getfixturevalue("env").clear()


def test_nodeport_to_a_remote_backend_is_source_nated_in_xdp(env: Cluster) -> None:
    assert xdp_on(env.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")], "native XDP on node1's device"
    env.apply(service("web", NP, None, 30080, "p2a"))
    env.apply(service("web-udp", NP, None, 30080, "p2a", proto=UDP))
    env.apply(service("lb", LB, "203.0.113.10", 80, "p2a"))
    assert peers(client(env.topo, "tcp", N1, 30080, 3)) == [("p2a", N1)] * 3
    assert peers(client(env.topo, "udp", N1, 30080, 2)) == [("p2a", N1)] * 2
    assert peers(client(env.topo, "tcp", "203.0.113.10", 80, 2)) == [("p2a", N1)] * 2
    st = env.stats("node1")
    assert st["new_snat"] >= 7 and st["reply_snat"] >= 7, st
    status = env.plugins["node1"].kpr_status()
    assert status.healthy, status
    assert status.details["devices"] == {"eth0": {"xdp": "native"}}, status.details
    assert status.counters["new_snat"] >= 7


def _explain(env: Cluster, target: str, sport: int) -> dict:
    from kpr.explain import explain, parse_target

    return explain(env.pins["node1"], parse_target(target), source=CLIENT, sport=sport, via="device", device="eth0")


def test_explain_names_the_remote_backend_xdp_reaches(env: Cluster) -> None:
    """`kpr explain` on a device where XDP runs: under Maglev, for many source ports, the
    backend it names (both remote: source-NATed in XDP) is the one real traffic reaches."""
    from kpr.servicemaps import ALGORITHM_ANNOTATION

    env.apply(on_node_address("xmag", 30085, "p2a", "p2b", annotations=((ALGORITHM_ANNOTATION, "maglev"),)))
    predicted = {}
    for sp in range(21000, 21024):
        r = _explain(env, f"{N1}:30085/UDP", sp)
        assert (r["verdict"], r["by"], r["hook"]) == ("forward", "maglev", "XDP on eth0"), r
        predicted[sp] = next(p for p, (_n, ip4, _ip6) in PODS.items() if ip4 == r["backend"]["address"])
    assert set(predicted.values()) == {"p2a", "p2b"}, predicted  # the ports spread: the check has teeth
    before = env.stats("node1")["new_snat"]
    reached = {sp: name_and_peer(client(env.topo, "udp", N1, 30085, 1, f"sport={sp}"))[0] for sp in predicted}
    assert reached == {sp: (pod, N1) for sp, pod in predicted.items()}
    assert env.stats("node1")["new_snat"] - before == len(predicted), "XDP translated them"
    r = _explain(env, f"{N1}:30085/UDP", 21000)
    assert r["by"] == "conntrack" and r["backend"]["address"] == PODS[predicted[21000]][1]


def test_explain_drop_reason_agrees_with_xdp_and_its_monitor_event(env: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    from kpr.monitor import Monitor

    env.apply(on_node_address("xlocal", 30086, "p2a", external_local=True))
    r = _explain(env, f"{N1}:30086/UDP", 4242)
    assert (r["verdict"], r["reason"], r["hook"]) == ("drop", "no_local_backend", "XDP on eth0"), r
    before = env.stats("node1")["drop_no_local_backend"]
    with Monitor(env.pins["node1"]) as m:
        assert answers(client(env.topo, "udp", N1, 30086, 1, "sport=4242", "timeout=0.5")) == ["TimeoutError"]
        events = m.collect(1) + m.poll(200)
    assert env.stats("node1")["drop_no_local_backend"] == before + 1
    assert [(e.type, e.hook, e.reason, e.client, e.frontend) for e in events] == [
        ("drop", "xdp", r["reason"], f"{CLIENT}:4242", f"{N1}:30086")
    ]

    # An announced address on a port it does not serve: no service, and dropped (vip_unserved).
    from kpr import cli

    env.apply(service("xvip", LB, "203.0.113.40", 53, "p2a", proto=UDP))
    r = _explain(env, "203.0.113.40:54/UDP", 4243)
    assert (r["verdict"], r["reason"], r["service"]) == ("drop", "vip_unserved", None), r
    assert cli.main(["explain", "203.0.113.40:54/UDP", "--pin-path", str(env.pins["node1"]), "--via", "device", "eth0"]) == 1
    assert "is no service, and dropped: vip_unserved" in capsys.readouterr().out
    before = env.stats("node1")["drop_vip_unserved"]
    assert answers(client(env.topo, "udp", "203.0.113.40", 54, 1, "sport=4243", "timeout=0.5")) == ["TimeoutError"]
    assert env.stats("node1")["drop_vip_unserved"] == before + 1


def test_frontend_without_backends_answers_port_unreachable(env: Cluster) -> None:
    env.apply(service("empty", NP, None, 30081))
    # ECONNREFUSED, not TimeoutError: the ICMP port unreachable came back (the answer tells a
    # refusal from a timeout; no clock needed)
    assert answers(client(env.topo, "tcp", N1, 30081, 1, "timeout=5")) == ["ECONNREFUSED"]
    assert env.stats("node1")["icmp_sent"] >= 1


def test_reattach_is_idempotent_and_recorded_once(env: Cluster) -> None:
    h = env.harnesses["node1"]
    before = attachments(env.pins["node1"])
    assert [(r["kind"], r["target"]["ifname"], r["prog_name"]) for r in before] == [("xdp", "eth0", "kpr_xnp_ingress")]
    h.node_changed(h.node)
    h.node_changed(h.node)
    assert xdp_on(env.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
    assert len(attachments(env.pins["node1"])) == 1
    env.apply(service("web2", NP, None, 30082, "p2b"))
    assert peers(client(env.topo, "tcp", N1, 30082, 2)) == [("p2b", N1)] * 2


def test_dsr_is_refused_by_the_config_not_the_kernel() -> None:
    with pytest.raises(Exception, match="mode"):
        XdpNodePortConfig.model_validate({"mode": "dsr"})


def test_generic_mode_and_kpr_cleanup_detaches(
    kernel_headers: Path, tmp_path: Path, pin_dir: Path, topology: Topology
) -> None:
    pin, topo = pin_dir, topology
    build_topology(topo, pods=())
    with node_harness(topo, "node1", pin, ("eth0", "eth1")) as h:  # stopping p leaves its links
        p = start_xdp(h, xdp_mode="generic")
        for dev in ("eth0", "eth1"):
            assert xdp_on(topo, "node1", dev) == [(2, "kpr_xnp_ingress")]
        assert "generic XDP on eth0, eth1" in p.kpr_status().message
        res = kpr_cleanup(pin, tmp_path)  # `kpr cleanup`, as an operator runs it
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("detached xdp") == 2, res.stdout
        for dev in ("eth0", "eth1"):
            assert xdp_on(topo, "node1", dev) == []
        assert not pin.exists()


def test_a_new_instance_adopts_the_pinned_link(env: Cluster) -> None:
    """A killed agent (no stop): the next one, of the same build, keeps the program the pinned XDP
    link runs (no compile); one program on the device, the same link, the NodePort served
    before and after. (An upgrade through the link: test_upgrade.py's NodePort case.)"""
    from kpr.bpf import links

    p1 = env.plugins["node1"]
    env.apply(service("adopt", NP, None, 30083, "p2a"))
    assert peers(client(env.topo, "tcp", N1, 30083, 2)) == [("p2a", N1)] * 2
    first = p1._attached[("eth0", "xdp")]
    assert first.how == "xdp-link" and first.link_pin is not None
    link_id = links.link_info(first.link_fd).id
    # the next agent, while the first one still holds its programs (killed, not stopped)
    h = env.harnesses["node1"]
    p2 = start_xdp(h, gc_interval=1.0, conntrack_size=65536, xdp_mode="native", keep_attached_on_stop=False)
    try:
        a = p2._attached[("eth0", "xdp")]
        assert a.action == "adopted" and links.link_info(a.link_fd).id == link_id
        assert p2.datapath.build == "adopted"
        assert xdp_on(env.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
        assert p2.kpr_status().details["links"]["eth0"]["action"] == "adopted"
        assert [(r["kind"], r["target"]["ifname"]) for r in attachments(env.pins["node1"])] == [("xdp", "eth0")]
        assert peers(client(env.topo, "tcp", N1, 30083, 2)) == [("p2a", N1)] * 2
    finally:
        # hand the device back to the module's plugin (which then stops with detach)
        h.forget(p2)
        p2._teardown(detach=False)
        h.node_changed(h.node)
    assert xdp_on(env.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
    assert links.link_info(p1._attached[("eth0", "xdp")].link_fd).id == link_id


def test_without_xdp_links_the_fallback_attaches_and_moves_to_a_link_later(
    kernel_headers: Path, monkeypatch: pytest.MonkeyPatch, pin_dir: Path, topology: Topology
) -> None:
    pin, topo = pin_dir, topology
    build_topology(topo, pods=())
    monkeypatch.setenv("KPR_BPF_LINKS", "xdp")
    with node_harness(topo, "node1", pin) as h:
        p1 = start_xdp(h, xdp_mode="generic")
        p2 = None
        try:
            assert p1._attached[("eth0", "xdp")].how == "xdp"
            assert xdp_on(topo, "node1", "eth0") == [(2, "kpr_xnp_ingress")]
            h.stop(p1)
            assert xdp_on(topo, "node1", "eth0") == [(2, "kpr_xnp_ingress")], "stays after stop"
            monkeypatch.delenv("KPR_BPF_LINKS")
            p2 = start_xdp(h, xdp_mode="generic")
            assert p2._attached[("eth0", "xdp")].how == "xdp-link"
            assert xdp_on(topo, "node1", "eth0") == [(2, "kpr_xnp_ingress")]
        finally:
            for p in (p1, p2):
                if p is not None:
                    with contextlib.suppress(Exception):
                        p._teardown(detach=False)


def test_agent_restarts_under_traffic_lose_no_connection(kernel_headers: Path) -> None:
    """`kpr run` with xdp_nodeport in node1's namespace; the external client opens a connection
    to the NodePort (a remote backend: SNAT in XDP) every 10 ms and holds one more. SIGTERM +
    start and SIGKILL + start: no failed connection, the held one unbroken, one program on the
    device, the same link."""
    import signal

    from socklb_env import assert_no_loss, restarts_under_load
    from tc_nodeport_env import NP_RESTART_PORT, nodeport_restart_rig

    from kpr.bpf import links

    with nodeport_restart_rig("kpr-xnp-rs", plugin="xdp_nodeport", pods=("p2a",), section={"xdpMode": "native"}) as rig:
        full_checksums(rig.topo, "cl", "p2a")
        with peer_pass(rig.topo, "rt", dev_with(rig.topo, "rt", NODES["node1"]["rt"])):
            rig.start()
            pin = rig.pin / "links" / "xdp_nodeport" / "eth0" / "xdp"
            link_id = links.pinned(pin.parent)[pin].id

            def one() -> None:
                assert xdp_on(rig.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
                assert links.pinned(pin.parent)[pin].id == link_id, "the same link"

            res, windows = restarts_under_load(rig, N1, NP_RESTART_PORT, after_stop=one, after_start=one)
            rig.stop(signal.SIGTERM)
        assert_no_loss(res, windows)


def test_agent_with_the_plugin_disabled_attaches_nothing(
    kernel_headers: Path, tmp_path: Path, pin_dir: Path, topology: Topology
) -> None:
    pin, topo = pin_dir, topology
    cfg = AgentConfig(tmp_path, pin, addresses=(N1,), devices=("eth0", "eth1"), shutdown_timeout=None,
                      extra={"service": {"clusterCIDR": ["10.96.0.0/16"]}})
    build_topology(topo, pods=())

    section = {"xdpMode": "native", "conntrackSize": 65536}
    with running_agent(cfg.plugin("xdp_nodeport", enabled=False, **section), netns=topo["node1"]):
        for dev in ("eth0", "eth1"):
            assert xdp_on(topo, "node1", dev) == [], "a disabled plugin attaches nothing"
        assert attachments(pin) == []

    with running_agent(cfg.plugin("xdp_nodeport", enabled=True, **section), netns=topo["node1"]) as agent:
        for dev in ("eth0", "eth1"):
            assert xdp_on(topo, "node1", dev) == [(1, "kpr_xnp_ingress")]
        status = agent.plugin_statuses()["xdp_nodeport"]
        assert status["healthy"], status
    for dev in ("eth0", "eth1"):
        assert xdp_on(topo, "node1", dev) == [(1, "kpr_xnp_ingress")], "stop leaves it (keepAttachedOnStop)"
    cleanup(pin)
    for dev in ("eth0", "eth1"):
        assert xdp_on(topo, "node1", dev) == [], "`kpr cleanup` removes it"
