"""NodePort and LoadBalancer end to end on the three common pod layouts (tc_nodeport_env.py:
per-pod veths with host routes, pods on a Linux bridge, remote pods behind a vxlan overlay),
with tc_nodeport alone and with xdp_nodeport in front of it on node1.

Each setup is one topology shared by its tests. Every test checks which backend answered and
which client address it saw, and the data path's forwarding counters (kpr_np_fwd) prove which
helper carried the packets: bpf_redirect_peer only into a pod's veth, never into a bridge or
an overlay device, XDP passing to the stack what it cannot redirect, and nothing given up on
for want of a device's kind.

test_every_connection_to_a_bridged_local_pod_succeeds is the regression test for the bridge
defect (issue 12): with bpf_redirect_peer chosen for every non-external egress device, every
connection after the first to a pod on cni0 was dropped by the kernel after the program
returned, without a counter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kpr.netdevs import DevKind
from kpr.nodeport import datapath as D

from tc_nodeport_env import (
    CLIENT,
    CLIENT6,
    LAYOUTS,
    NODES,
    UDP,
    Cluster,
    answers,
    client,
    layout_cluster,
    loadbalancer,
    name_and_peer,
    nodeport,
    vtep4,
    vtep6,
    xdp_on,
)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

N1, N1_6 = NODES["node1"]["addr"], NODES["node1"]["addr6"]
SETUPS = [(layout, plugin) for layout in LAYOUTS for plugin in ("tc_nodeport", "xdp_nodeport")]


@dataclass
class Env:
    c: Cluster
    layout: str
    plugin: str

    @property
    def xdp(self) -> bool:
        return self.plugin == "xdp_nodeport"

    def stats(self) -> dict[str, int]:
        # node1's counters: with XDP, both plugins' (each counts its own program's packets; only
        # XDP sees a frontend's packets, it translates them before tc does)
        out = dict(self.c.stats("node1"))
        for node, p in self.c.extra:
            if node == "node1" and p.datapath is not None:
                for k, v in p.datapath.stats().items():
                    out[k] = out.get(k, 0) + v
        return out

    def settled_stats(self, quiet: float = 0.5, timeout: float = 10.0) -> dict[str, int]:
        """node1's counters once they stay still for `quiet` s: an earlier test's flows may
        still send their last packets (a late FIN or reply counts as reply_snat), which must not
        count as this test's; those still closing are ended first (their FIN retransmissions
        go on for minutes, with growing gaps)."""
        self.c.topo.end_closing()
        last, deadline = self.stats(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.stats()
            if now == last:
                break
            last = now
        return last

    def snat_source(self, v6: bool = False) -> str:
        """The address a remote backend sees for source-NATed flows: the egress device's."""
        if self.layout == "vxlan":
            return vtep6("node1") if v6 else vtep4("node1")
        return N1_6 if v6 else N1


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{la}-{p.split('_')[0]}" for la, p in SETUPS])
def env(request: pytest.FixtureRequest, require_kernel: None) -> Iterator[Env]:
    layout, plugin = request.param
    with layout_cluster(layout, plugin, gc_interval=1.0, conntrack_size=65536) as c:
        if plugin == "xdp_nodeport":
            assert xdp_on(c.topo, "node1", "eth0") == [(1, "kpr_xnp_ingress")], "native XDP on node1's eth0"
        yield Env(c, layout, plugin)


@pytest.fixture(autouse=True)
def _clean(env: Env) -> Iterator[None]:
    yield
    env.c.clear()


def _expect(env: Env, before: dict[str, int], want: list[tuple[str, str]], *args: object) -> None:
    """The client's answers through node1 are `want`; on failure the message has node1's counters."""
    got = name_and_peer(client(env.c.topo, *args))
    assert got == want, (args, got, _delta(before, env.stats()))


def _no_give_ups(d: dict[str, int]) -> None:
    assert d.get("fwd_stack_unknown_dev", 0) == 0, d
    assert not {k: v for k, v in d.items() if k in D.DROP_STATS}, d


def test_local_backends_keep_the_client_address(env: Env) -> None:
    c = env.c
    before = env.stats()
    c.apply(nodeport("web", 30080, "p1a", v6=True))
    c.apply(nodeport("web-udp", 30080, "p1a", proto=UDP, v6=True))
    c.apply(loadbalancer("lb", "203.0.113.10", "p1a"))
    c.apply(loadbalancer("lb6", "2001:db8:f::10", "p1a"))
    _expect(env, before, [("p1a", CLIENT)] * 3, "tcp", N1, 30080, 3)
    _expect(env, before, [("p1a", CLIENT6)] * 2, "tcp", N1_6, 30080, 2)
    _expect(env, before, [("p1a", CLIENT)] * 2, "udp", N1, 30080, 2)
    _expect(env, before, [("p1a", CLIENT6)] * 2, "udp", N1_6, 30080, 2)
    _expect(env, before, [("p1a", CLIENT)] * 2, "tcp", "203.0.113.10", 80, 2)
    _expect(env, before, [("p1a", CLIENT6)] * 2, "tcp", "2001:db8:f::10", 80, 2)
    d = _delta(before, env.stats())
    flows = 13
    assert d.get("new_local", 0) >= flows, d
    _no_give_ups(d)
    pod_kind = "egress_veth_peer" if env.layout == "veth" else "egress_bridge"
    assert d.get(pod_kind, 0) >= flows, d
    if env.xdp:
        # XDP_REDIRECT cannot reach a pod's veth (its peer runs no XDP) nor a bridge: the stack forwards
        assert d.get("fwd_stack_xdp_unreachable", 0) >= flows and d.get("fwd_peer", 0) == 0, d
    elif env.layout == "veth":
        assert d.get("fwd_peer", 0) >= flows, d
    else:
        # a bridge has no peer: redirected by the FIB's MACs (or the neighbour subsystem), never redirect_peer
        assert d.get("fwd_peer", 0) == 0, d
        assert d.get("fwd_redirect", 0) + d.get("fwd_neigh", 0) >= flows, d


def test_remote_backends_with_snat(env: Env) -> None:
    c = env.c
    before = env.stats()
    c.apply(nodeport("rweb", 30081, "p2a", v6=True))
    c.apply(nodeport("rweb-udp", 30081, "p2a", proto=UDP, v6=True))
    c.apply(loadbalancer("rlb", "203.0.113.11", "p2a"))
    c.apply(loadbalancer("rlb6", "2001:db8:f::11", "p2a"))
    src4, src6 = env.snat_source(), env.snat_source(v6=True)
    _expect(env, before, [("p2a", src4)] * 3, "tcp", N1, 30081, 3)
    _expect(env, before, [("p2a", src6)] * 2, "tcp", N1_6, 30081, 2)
    _expect(env, before, [("p2a", src4)] * 2, "udp", N1, 30081, 2)
    _expect(env, before, [("p2a", src6)] * 2, "udp", N1_6, 30081, 2)
    _expect(env, before, [("p2a", src4)] * 2, "tcp", "203.0.113.11", 80, 2)
    _expect(env, before, [("p2a", src6)] * 2, "tcp", "2001:db8:f::11", 80, 2)
    d = _delta(before, env.stats())
    flows = 13
    assert d.get("new_snat", 0) >= flows and d.get("reply_snat", 0) >= flows, d
    _no_give_ups(d)
    assert d.get("fwd_peer", 0) == 0, d
    if env.layout == "vxlan":
        # out through flannel.1, which encapsulates; XDP cannot redirect into it
        assert d.get("egress_overlay", 0) >= flows, d
        if env.xdp:
            assert d.get("fwd_stack_xdp_unreachable", 0) >= flows, d
        else:
            assert d.get("fwd_redirect", 0) + d.get("fwd_neigh", 0) >= flows, d
    else:
        # out through eth0 (a veth to the router here: the external device)
        assert d.get("fwd_redirect", 0) + d.get("fwd_neigh", 0) + d.get("fwd_stack_no_neigh", 0) >= flows, d


def test_remote_backends_with_dsr(env: Env) -> None:
    if env.xdp:
        pytest.skip("DSR needs bpf_skb_adjust_room: xdp_nodeport refuses mode dsr")
    c = env.c
    before, before2 = env.settled_stats(), c.stats("node2")
    c.apply(loadbalancer("dsr", "203.0.113.12", "p2a", mode="dsr"))
    c.apply(loadbalancer("dsr6", "2001:db8:f::12", "p2a", mode="dsr"))
    _expect(env, before, [("p2a", CLIENT)] * 3, "tcp", "203.0.113.12", 80, 3)
    _expect(env, before, [("p2a", CLIENT6)] * 2, "tcp", "2001:db8:f::12", 80, 2)
    d1, d2 = _delta(before, env.stats()), _delta(before2, c.stats("node2"))
    assert d1.get("new_dsr", 0) == 5 and d1.get("reply_snat", 0) == 0, d1
    assert d2.get("dsr_received", 0) >= 5 and d2.get("reply_revnat", 0) >= 5, d2
    _no_give_ups(d1)
    assert d1.get("fwd_peer", 0) == 0, d1
    if env.layout == "vxlan":
        assert d1.get("egress_overlay", 0) >= 5, d1


ROUNDS, CONNECTIONS = 3, 30


def test_every_connection_to_a_bridged_local_pod_succeeds(env: Env) -> None:
    """The bridge defect's regression test: 30 of 30 NodePort connections to a pod on cni0, three
    rounds, each after the node learnt the pod's neighbour entry (the case bpf_redirect_peer
    took and the kernel dropped)."""
    if env.layout != "bridge":
        pytest.skip("the bridge layout's regression test")
    c = env.c
    c.apply(nodeport("bridged", 30090, "p1b"))
    before = env.stats()
    for rnd in range(ROUNDS):
        # (room for every connection to time out: a failing round reports which ones did)
        got = answers(client(c.topo, "tcp", N1, 30090, CONNECTIONS, "timeout=2", timeout=CONNECTIONS * 2 + 30))
        assert got == [f"p1b {CLIENT}"] * CONNECTIONS, f"round {rnd}: {got}"
    d = _delta(before, env.stats())
    assert d.get("new_local", 0) == ROUNDS * CONNECTIONS, d
    assert d.get("fwd_peer", 0) == 0, "never bpf_redirect_peer into a bridge"
    assert d.get("egress_bridge", 0) >= ROUNDS * CONNECTIONS, d
    _no_give_ups(d)
    # status says how packets left (each plugin its own program's packets) and what the devices are
    statuses = [p.kpr_status() for p in [c.plugins["node1"], *(p for n, p in c.extra if n == "node1")]]
    assert all(st.healthy for st in statuses), statuses
    kinds = c.plugins["node1"].nodeport.kpr_status().details["deviceKinds"]
    assert kinds["links"]["bridge"] == 1 and kinds["external"] == {"eth0": DevKind.VETH_PEER.name.lower()}, kinds
    total = {k: sum(st.counters.get(k, 0) for st in statuses) for k in ("egress_bridge", "fwd_stack_unknown_dev")}
    assert total["egress_bridge"] >= ROUNDS * CONNECTIONS and total["fwd_stack_unknown_dev"] == 0, statuses
