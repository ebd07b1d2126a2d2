"""xdp_nodeport with a NodePort whose only backend is a pod on the node itself (topology in
tc_nodeport_env.py: the external client behind the router, node1 with eth0, pod p1a on node1).

XDP DNATs the request and hands it to the stack, which delivers it to the pod
(fwd_stack_xdp_unreachable: XDP_REDIRECT cannot reach the pod's veth); XDP has no egress hook,
so the pod's reply leaves with the pod's address and the client resets it: the connection times
out. Documented (README, xdp_nodeport): local backends need tc_nodeport alongside, whose egress
program translates the replies. The plugin's status and log say so when it happens, instead of
a silent timeout; with tc_nodeport beside it the same NodePort answers and the note goes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.testing.agent import AgentConfig, running_agent
from kpr.testing.netns import Topology
from kpr.testing.waiting import wait_for

from tc_nodeport_env import (
    CLIENT,
    NODES,
    Cluster,
    answers,
    build_topology,
    client,
    cluster,
    dev_with,
    full_checksums,
    nodeport,
    peer_pass,
    start_plugin,
    start_xdp,
    xdp_on,
)

pytestmark = pytest.mark.kernel

N1 = NODES["node1"]["addr"]
PORT = 30081
XDP_CFG = dict(xdp_mode="native", health_check=False, keep_attached_on_stop=False)


@pytest.fixture(scope="module")
def env(require_kernel: None) -> Iterator[Cluster]:
    with cluster(start=False, second_device=False) as c:
        full_checksums(c.topo, "cl", "p1a")
        with peer_pass(c.topo, "rt", dev_with(c.topo, "rt", NODES["node1"]["rt"])):
            c.plugins["node1"] = start_xdp(c.harnesses["node1"], **XDP_CFG)
            try:
                c.apply(nodeport("web", PORT, "p1a"))
                yield c
            finally:
                c.clear()
                c.stop("node1")


def test_alone_a_local_backend_times_out_and_status_says_why(env: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    assert xdp_on(env.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
    x = env.plugins["node1"]
    assert answers(client(env.topo, "tcp", N1, PORT, 1)) == ["TimeoutError"], "the pod's reply is not translated"
    st = env.stats("node1")
    assert st["new_local"] >= 1 and st["fwd_stack_xdp_unreachable"] >= 1, st
    with caplog.at_level(logging.WARNING, logger="kpr.plugins.xdp_nodeport.plugin"):
        status = x.kpr_status()
        x.kpr_status()
    assert status.details["localBackendsUnserved"] == ["eth0"], status.details
    assert "new flows to local backends, replies untranslated on eth0: enable tc_nodeport alongside" in status.message
    assert status.details["kernctx"] is None, "an XDP build has no skb checksum state to read"
    warned = unserved_warnings(caplog)
    assert len(warned) == 1 and "devices=eth0" in warned[0], "logged once, not per status"


def unserved_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "xdp_nodeport_local_backends_unserved" in r.getMessage()]


def test_a_restart_notes_only_the_flows_after_it(env: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The stats map is pinned and outlives a restart, its new_local counter too: the flows of
    an earlier run are no reason for a note (nor a warning) after the restart."""
    assert answers(client(env.topo, "tcp", N1, PORT, 1)) == ["TimeoutError"]
    assert env.plugins["node1"].kpr_status().details["localBackendsUnserved"] == ["eth0"]
    env.stop("node1")
    env.plugins["node1"] = start_xdp(env.harnesses["node1"], **XDP_CFG)
    x = env.plugins["node1"]
    before = env.stats("node1")["new_local"]
    assert before >= 1, "the pinned counter kept the earlier run's flows"
    with caplog.at_level(logging.WARNING, logger="kpr.plugins.xdp_nodeport.plugin"):
        status = x.kpr_status()
    assert status.details["localBackendsUnserved"] == [] and "new flows" not in status.message, status
    assert unserved_warnings(caplog) == []
    # a flow of this run: the note again, counting this run's flows only
    assert answers(client(env.topo, "tcp", N1, PORT, 1)) == ["TimeoutError"]
    fresh = env.stats("node1")["new_local"] - before
    status = x.kpr_status()
    assert fresh >= 1 and status.details["localBackendsUnserved"] == ["eth0"], status
    assert f"; {fresh} new flows to local backends, replies untranslated on eth0" in status.message, status.message


def test_with_tc_nodeport_alongside_the_local_backend_answers(env: Cluster) -> None:
    x = env.plugins["node1"]
    tc = start_plugin(env.harnesses["node1"], health_check=False, keep_attached_on_stop=False)
    try:
        assert answers(client(env.topo, "tcp", N1, PORT, 2)) == [f"p1a {CLIENT}"] * 2
        status = wait_for(lambda: (s := x.kpr_status()).details["localBackendsUnserved"] == [] and s,
                          what="the note gone with tc_nodeport's egress program on eth0")
        assert "enable tc_nodeport" not in status.message, status.message
    finally:
        env.harnesses["node1"].stop(tc)
    # tc_nodeport gone (its programs detached): the flows it served are no reason for the note,
    # a new flow is
    assert x.kpr_status().details["localBackendsUnserved"] == []
    assert answers(client(env.topo, "tcp", N1, PORT, 1)) == ["TimeoutError"]
    assert x.kpr_status().details["localBackendsUnserved"] == ["eth0"]


def test_a_start_whose_stats_read_fails_still_starts(env: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline read at start fails (the stats map going under our feet): the start goes
    on as status does with no reading, and its attachments stay the plugin's to stop."""
    from kpr.plugins.xdp_nodeport import datapath as XD

    env.stop("node1")
    real = XD.Datapath.stats
    failed = []

    def fail_once(self: XD.Datapath) -> dict[str, int]:
        if not failed:
            failed.append(1)
            raise OSError(9, "stats map closed")
        return real(self)

    monkeypatch.setattr(XD.Datapath, "stats", fail_once)
    env.plugins["node1"] = start_xdp(env.harnesses["node1"], **XDP_CFG)
    assert failed, "the start read the stats"
    assert xdp_on(env.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")]
    assert env.plugins["node1"].kpr_status().counters["devices_attached"] == 1


@pytest.mark.parametrize("with_tc", [False, True], ids=["alone", "with_tc_nodeport"])
def test_agent_says_at_start_when_nothing_serves_local_backends(
    with_tc: bool, kernel_headers: Path, tmp_path: Path, pin_dir: Path, topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`kpr run` (in process) in node1's namespace: xdp_nodeport without tc_nodeport in the
    config logs xdp_nodeport_local_backends_unserved at start, at INFO (a correct XDP-only node
    with no local pods starts so; the status note is the warning when a flow meets it); with
    tc_nodeport, nothing."""
    build_topology(topology, second_device=False, pods=())
    cfg = AgentConfig(tmp_path, pin_dir, addresses=(N1,), devices=("eth0",), shutdown_timeout=None,
                      extra={"service": {"clusterCIDR": ["10.96.0.0/16"]}})
    cfg = cfg.plugin("xdp_nodeport", enabled=True, xdpMode="generic", keepAttachedOnStop=False)
    if with_tc:
        cfg = cfg.plugin("tc_nodeport", enabled=True, keepAttachedOnStop=False)
    with caplog.at_level(logging.INFO, logger="kpr.plugins.xdp_nodeport.plugin"):
        with running_agent(cfg, netns=topology["node1"]) as agent:
            assert agent.plugin_statuses()["xdp_nodeport"]["healthy"]
    said = [r for r in caplog.records if "xdp_nodeport_local_backends_unserved" in r.getMessage()]
    if with_tc:
        assert said == []
    else:
        assert [(r.levelno, "reason=tc_nodeport_disabled" in r.getMessage()) for r in said] == [(logging.INFO, True)]
