"""tc_nodeport end to end: real traffic from an external client through the node's tc programs
to pods on this node and on another one (topology in tc_nodeport_env.py).

Every backend answers with its name and the client address it sees, so each test checks both
which backend answered and whether the client's address survived (DSR, local backends) or
became the node's (SNAT).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.bpf import maps as M
from kpr.bpf.cleanup import attachments, cleanup
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.testing.agent import AgentConfig, kpr_cleanup, running_agent
from kpr.testing.netns import Topology
from kpr.testing.waiting import wait_for

from tc_nodeport_env import (
    CLIENT,
    CLIENT2,
    CLIENT6,
    NODE1_ETH1,
    NODES,
    PODS,
    TCX,
    Cluster,
    answers,
    backends,
    build_topology,
    client,
    cluster,
    full_checksums,
    loadbalancer,
    node_harness,
    nodeport,
    start_plugin,
    tc_filters,
)
from tc_nodeport_env import name_and_peer as _name_and_peer

pytestmark = pytest.mark.kernel

NP, LB = FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER
TCP, UDP = Protocol.TCP, Protocol.UDP
N1, N2 = NODES["node1"]["addr"], NODES["node2"]["addr"]
N1_6 = NODES["node1"]["addr6"]


@pytest.fixture(scope="module")
def env(require_kernel: None) -> Iterator[Cluster]:
    with cluster(gc_interval=1.0, conntrack_size=65536) as c:
        yield c


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "env" in request.fixturenames:
        request.getfixturevalue("env").clear()


# ---------------------------------------------------------------------- local and remote backends


def test_nodeport_to_a_local_pod_keeps_the_client_address(env: Cluster) -> None:
    env.apply(nodeport("web", 30080, "p1a", v6=True))
    assert _name_and_peer(client(env.topo, "tcp", N1, 30080, 3)) == [("p1a", CLIENT)] * 3
    assert _name_and_peer(client(env.topo, "tcp", N1_6, 30080, 2)) == [("p1a", CLIENT6)] * 2
    st = env.stats("node1")
    assert st["new_local"] >= 5 and st["reply_revnat"] >= 5, st


SOL_PACKET, PACKET_AUXDATA, PACKET_OUTGOING = 263, 8, 4
TP_STATUS_CSUMNOTREADY = 8  # struct tpacket_auxdata's tp_status: the skb is CHECKSUM_PARTIAL


def _ones_sum(data: bytes) -> int:
    """The folded one's-complement sum of `data`'s 16-bit words (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return total


class _PodCapture:
    """Every IPv4 TCP packet the pod's eth0 receives for `port`, each with whether the skb came
    CHECKSUM_PARTIAL (an AF_PACKET socket in the pod's namespace, PACKET_AUXDATA)."""

    def __init__(self, topo: Topology, pod: str, port: int) -> None:
        self.port = port
        self.seen: list[tuple[bool, bytes]] = []
        with topo[pod].enter():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))  # ETH_P_IP
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.sock.bind(("eth0", 0x0800))

    def drain(self) -> list[tuple[bool, bytes]]:
        while True:
            try:
                data, anc, _, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(20), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return self.seen
            if addr[2] == PACKET_OUTGOING or len(data) < 20 or data[9] != 6:
                continue
            ihl = (data[0] & 0xf) * 4
            if int.from_bytes(data[ihl + 2:ihl + 4], "big") != self.port:
                continue
            status = next(struct.unpack("I", d[:4])[0] for lvl, t, d in anc if (lvl, t) == (SOL_PACKET, PACKET_AUXDATA))
            self.seen.append((bool(status & TP_STATUS_CSUMNOTREADY), data))

    def close(self) -> None:
        self.sock.close()


def test_local_dnat_leaves_a_partial_checksum_as_the_pseudo_header_sum(env: Cluster) -> None:
    """Through the NodePort to the local pod, the client's TCP packets arrive CHECKSUM_PARTIAL
    (veths offload) and redirect_peer hands them to the pod as such, whose stack never verifies
    them: their L4 field must hold the pseudo header's sum for the DNAT'd addresses (not
    complemented; the device would add the rest), which only the helper's patch keeps (lib/csum.h
    kpr_csum_l4_diff2); any packet that is not PARTIAL carries a whole, valid checksum. Both the
    flows' first packets (the local stage) and established ones (the entry program) are checked."""
    pod_ip = PODS["p1a"][1]
    env.apply(nodeport("csum-local", 30086, "p1a"))
    cap = _PodCapture(env.topo, "p1a", 8080)
    try:
        assert _name_and_peer(client(env.topo, "tcp", N1, 30086, 3)) == [("p1a", CLIENT)] * 3

        def partial_syns_and_rest() -> bool:
            got = cap.drain()
            syn = [d for p, d in got if p and d[(d[0] & 0xf) * 4 + 13] & 0x02]
            return len(syn) >= 3 and sum(1 for p, d in got if p and d not in syn) >= 3

        wait_for(partial_syns_and_rest, 10, "three PARTIAL SYNs and three PARTIAL later packets in the pod")
        for partial, d in cap.drain():
            ihl = (d[0] & 0xf) * 4
            src, dst = d[12:16], d[16:20]
            assert dst == bytes(map(int, pod_ip.split("."))), d.hex()
            l4 = d[ihl:int.from_bytes(d[2:4], "big")]
            pseudo = src + dst + bytes([0, 6]) + len(l4).to_bytes(2, "big")
            field = int.from_bytes(l4[16:18], "big")
            if partial:
                assert field == _ones_sum(pseudo), f"PARTIAL: 0x{field:04x}, not 0x{_ones_sum(pseudo):04x}: {d.hex()}"
            else:
                assert _ones_sum(pseudo + l4) == 0xffff, f"an invalid checksum 0x{field:04x}: {d.hex()}"
    finally:
        cap.close()


def test_a_pod_created_after_start_is_reached_through_its_peer(env: Cluster) -> None:
    """The agent follows links as they come (kpr.netdevs): a pod's veth made after the programs
    were attached is known to them at once, so its first packets go by bpf_redirect_peer, not
    to the stack as a device of unknown kind; when the pod goes, its device's entry goes."""

    from tc_nodeport_env import PORT, PY, SERVER

    plugin = env.plugins["node1"]
    topo = env.topo
    topo.add_pod("node1", "p1n", "10.244.1.40", ip6="fd44:1::40")
    server = topo.popen("p1n", [PY, "-c", SERVER, "p1n", str(PORT)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    lxc = next(i for i in topo["node1"].ifaces if i.startswith("lxcp1n"))
    idx = topo.ifindex("node1", lxc)
    wait_for(lambda: idx in plugin.nodeport.devices, 10, "the new pod's veth classified")
    dp = plugin.datapath
    assert dp is not None
    # What the programs read: the facility keeps the watcher's links before it writes
    # kpr_np_devkind, so a packet sent once the veth is in the dict may still find no kind.
    kind = M.U32.pack(int(plugin.nodeport.devices[idx].kind))
    wait_for(lambda: dp.maps["kpr_np_devkind"].lookup(M.U32.pack(idx)) == kind, 10, "its kind in kpr_np_devkind")
    before = env.stats("node1")

    def fresh(node: str) -> Service:
        fe = Frontend(NP, NODES[node]["addr"], 30085, TCP, (Backend("10.244.1.40", PORT, node_name="node1",
                                                                     local=node == "node1"),))
        return Service(ServiceKey("default", "fresh"), (fe,))

    env.apply(fresh)
    assert _name_and_peer(client(env.topo, "tcp", N1, 30085, 3)) == [("p1n", CLIENT)] * 3
    after = env.stats("node1")
    assert after["fwd_peer"] - before["fwd_peer"] >= 3, (before, after)
    assert after["fwd_stack_unknown_dev"] == before["fwd_stack_unknown_dev"]
    kinds = plugin.nodeport.kpr_status().details["deviceKinds"]["links"]
    assert kinds["veth_peer"] >= 5, kinds  # eth0 and the pods' host-side devices
    topo.run("node1", ["ip", "link", "del", lxc])
    wait_for(lambda: idx not in plugin.nodeport.devices, 10, "the pod's veth gone")
    wait_for(lambda: dp.maps["kpr_np_devkind"].lookup(M.U32.pack(idx)) is None, 10, "its kind unset")


def test_remote_backend_with_snat_sees_the_node_address(env: Cluster) -> None:
    env.apply(loadbalancer("lb-snat", "203.0.113.10", "p2a"))
    env.apply(loadbalancer("lb-snat-udp", "203.0.113.10", "p2a", proto=UDP))
    assert _name_and_peer(client(env.topo, "tcp", "203.0.113.10", 80, 3)) == [("p2a", N1)] * 3
    assert _name_and_peer(client(env.topo, "udp", "203.0.113.10", 80, 2)) == [("p2a", N1)] * 2
    st = env.stats("node1")
    assert st["new_snat"] >= 5 and st["reply_snat"] >= 5, st


def test_snat_leaves_offloaded_checksums_right_where_the_node_completes_them(env: Cluster) -> None:
    # The client's packets reach node1 CHECKSUM_PARTIAL (veths offload): their L4 field holds the
    # pseudo header's sum only, which the programs must patch for the addresses and not for the
    # ports (lib/csum.h kpr_csum_l4_diff2). Veth deliveries trust such a field, so here node1
    # sends with transmit offload off: the kernel completes each checksum from the field as the
    # programs left it, and node2's pod and the client verify it (a wrong one is dropped).
    env.apply(loadbalancer("lb-csum", "203.0.113.12", "p2a"))
    env.apply(loadbalancer("lb-csum-udp", "203.0.113.12", "p2a", proto=UDP))
    before = env.stats("node1")
    full_checksums(env.topo, "node1")
    try:
        assert _name_and_peer(client(env.topo, "tcp", "203.0.113.12", 80, 3)) == [("p2a", N1)] * 3
        assert _name_and_peer(client(env.topo, "udp", "203.0.113.12", 80, 2)) == [("p2a", N1)] * 2
    finally:
        full_checksums(env.topo, "node1", on=False)
    st = env.stats("node1")
    # new flows (the SNAT stage) and established packets (the entry program's rewrite) both ran
    assert st["new_snat"] - before.get("new_snat", 0) >= 5 and st["established"] > before.get("established", 0), st


def test_remote_backend_with_dsr_sees_the_client_and_answers_directly(env: Cluster) -> None:
    before1, before2 = env.stats("node1"), env.stats("node2")
    env.apply(loadbalancer("lb-dsr", "203.0.113.11", "p2a", mode="dsr"))
    assert _name_and_peer(client(env.topo, "tcp", "203.0.113.11", 80, 3)) == [("p2a", CLIENT)] * 3
    a1, a2 = env.stats("node1"), env.stats("node2")
    assert a1["new_dsr"] - before1["new_dsr"] == 3
    assert a1["reply_snat"] == before1["reply_snat"], "DSR replies never pass node1"
    assert a2["dsr_received"] - before2["dsr_received"] >= 3, "node2 stripped the DSR option"
    assert a2["reply_revnat"] - before2["reply_revnat"] >= 3, "node2 gave the replies the frontend's address"


def test_hybrid_mode_is_dsr_for_tcp_and_snat_for_udp(env: Cluster) -> None:
    env.apply(loadbalancer("lb-hy", "203.0.113.12", "p2a", mode="hybrid"))
    env.apply(loadbalancer("lb-hy-udp", "203.0.113.12", "p2a", mode="hybrid", proto=UDP))
    assert _name_and_peer(client(env.topo, "tcp", "203.0.113.12", 80, 1)) == [("p2a", CLIENT)]
    assert _name_and_peer(client(env.topo, "udp", "203.0.113.12", 80, 1)) == [("p2a", N1)]


def test_external_traffic_policy_local(env: Cluster) -> None:
    env.apply(nodeport("etp-local", 30081, "p1a", local_policy=True))
    # node1 has the backend: the client's address is kept
    assert _name_and_peer(client(env.topo, "tcp", N1, 30081, 2)) == [("p1a", CLIENT)] * 2
    # node2 has none: it drops (no answer, no reset)
    assert answers(client(env.topo, "tcp", N2, 30081, 1, "timeout=1")) == ["TimeoutError"]
    assert env.stats("node2")["drop_no_local_backend"] >= 1


def test_health_check_node_port_answers_200_or_503(env: Cluster) -> None:
    env.apply(nodeport("hc", 30082, "p1a", "p1b", local_policy=True, hc=32100))
    r1 = client(env.topo, "http", N1, 32100)[0]
    r2 = client(env.topo, "http", N2, 32100)[0]
    assert r1["status"] == 200 and r1["body"]["service"] == {"namespace": "default", "name": "hc"}
    assert r1["body"]["localEndpoints"] == 2
    assert r2["status"] == 503 and r2["body"]["localEndpoints"] == 0
    assert env.plugins["node1"].nodeport.kpr_status().details["healthChecks"] == {32100: {"service": "default/hc", "localEndpoints": 2}}
    # the service goes: so does the listener
    env.delete(ServiceKey("default", "hc"))
    assert client(env.topo, "http", N1, 32100)[0].get("error") == "ECONNREFUSED"


def test_frontend_without_backends_refuses_at_once(env: Cluster) -> None:
    env.apply(loadbalancer("empty", "203.0.113.13"))
    env.apply(loadbalancer("empty-udp", "203.0.113.13", proto=UDP, port=53))
    # ECONNREFUSED, not TimeoutError: a TCP reset and an ICMP port unreachable came back (the
    # answer tells a refusal from a timeout; no clock needed)
    assert answers(client(env.topo, "tcp", "203.0.113.13", 80, 1)) == ["ECONNREFUSED"]
    assert answers(client(env.topo, "udp", "203.0.113.13", 53, 1)) == ["ECONNREFUSED"]


def test_unserved_port_on_an_announced_address_is_dropped_not_looped(env: Cluster) -> None:
    env.apply(loadbalancer("only80", "203.0.113.14", "p1a"))
    before = env.stats("node1")["drop_vip_unserved"]
    # without the guard node1 would route the packet back to the router, which sends it to node1 ...
    assert answers(client(env.topo, "tcp", "203.0.113.14", 443, 1, "timeout=1")) == ["TimeoutError"]
    after = env.stats("node1")["drop_vip_unserved"]
    assert 1 <= after - before <= 4, "dropped once per SYN (retransmits), not looping"
    assert _name_and_peer(client(env.topo, "tcp", "203.0.113.14", 80, 1)) == [("p1a", CLIENT)]


def test_source_ranges_and_session_affinity(env: Cluster) -> None:
    env.apply(loadbalancer("ranged", "203.0.113.15", "p1a", ranges=("10.200.0.0/16",)))
    assert answers(client(env.topo, "tcp", "203.0.113.15", 80, 1, "timeout=1")) == ["TimeoutError"]
    env.apply(loadbalancer("ranged", "203.0.113.15", "p1a", ranges=(f"{CLIENT}/32",)))
    assert _name_and_peer(client(env.topo, "tcp", "203.0.113.15", 80, 1)) == [("p1a", CLIENT)]

    def sticky(node: str) -> Service:
        fe = Frontend(LB, "203.0.113.16", 80, TCP, backends(node, "p1a", "p1b", "p2a"), affinity_timeout=60)
        return Service(ServiceKey("default", "sticky"), (fe,))

    env.apply(sticky)
    got = {name for name, _ in _name_and_peer(client(env.topo, "tcp", "203.0.113.16", 80, 8))}
    assert len(got) == 1, got


def test_several_devices_at_once(env: Cluster) -> None:
    env.apply(nodeport("multi", 30083, "p1a"))
    for dev in ("eth0", "eth1"):
        assert tc_filters(env.topo, "node1", dev, "ingress") == [(TCX, "kpr_np_ingress")]
        assert tc_filters(env.topo, "node1", dev, "egress") == [(TCX, "kpr_np_egress")]
    assert _name_and_peer(client(env.topo, "tcp", NODE1_ETH1, 30083, 2, ns="cl2")) == [("p1a", CLIENT2)] * 2
    assert _name_and_peer(client(env.topo, "tcp", N1, 30083, 1)) == [("p1a", CLIENT)]
    status = env.plugins["node1"].kpr_status()
    assert status.healthy and status.counters["devices_attached"] == 2, status


def test_stale_udp_flows_are_cleared_when_the_backend_goes(env: Cluster) -> None:
    env.apply(loadbalancer("dns", "203.0.113.17", "p2a", proto=UDP, port=53))
    # p2a stays a backend of another service, so its backend entry (and id) outlive this change:
    # only clearing the tracked flow moves it
    env.apply(loadbalancer("other", "203.0.113.19", "p2a", proto=UDP, port=53))
    # one client socket, one 5-tuple, throughout: conntrack pins it to its backend
    assert answers(client(env.topo, "udp", "203.0.113.17", 53, 2, "sport=45053"))[0].startswith("p2a")
    stale_before = env.plugins["node1"].nodeport.kpr_status().counters["stale_flows_cleared"]
    env.apply(loadbalancer("dns", "203.0.113.17", "p2b", proto=UDP, port=53))
    # p2a is still alive: without clearing, the tracked flow would keep reaching it
    assert answers(client(env.topo, "udp", "203.0.113.17", 53, 2, "sport=45053"))[0].startswith("p2b")
    assert env.plugins["node1"].nodeport.kpr_status().counters["stale_flows_cleared"] > stale_before


def test_conntrack_gc_counts_and_expires(env: Cluster) -> None:
    # a remote backend (SNAT: its mapping in the conntrack entry and kpr_snat) and a local one
    # (DNAT only: a kpr_np_rev entry), so every kind of entry is this test's own, whatever ran before
    env.apply(loadbalancer("gc", "203.0.113.18", "p2a", proto=UDP, port=53))
    env.apply(loadbalancer("gc-local", "203.0.113.20", "p1a", proto=UDP, port=53))
    client(env.topo, "udp", "203.0.113.18", 53, 3)
    got = answers(client(env.topo, "udp", "203.0.113.20", 53, 3))
    assert len(got) == 3 and all(a.startswith("p1a") for a in got), got
    p = env.plugins["node1"].nodeport
    assert p is not None and p.collector is not None
    p.collector.run()
    st = p.kpr_status().counters
    assert st["conntrack_entries"] >= 6 and st["snat_entries"] >= 3 and st["reverse_entries"] >= 3, st
    # pretend 2 minutes passed: UDP flows (60 s) expire, their SNAT ports come back
    import kpr.nodeport.gc as G

    real = G.now_ns
    G.now_ns = lambda: real() + 120 * 10**9  # type: ignore[assignment]
    try:
        res = p.collector.run()
    finally:
        G.now_ns = real  # type: ignore[assignment]
    assert res.ct_expired >= 6 and res.snat_freed >= 3 and res.rev_expired >= 3, res


def test_status_reports_what_the_writer_does_not_honour(env: Cluster) -> None:
    st = env.plugins["node1"].nodeport.kpr_status()
    writer = st.details["writer"]
    # this test's writers were made with the writer's defaults (131072 conntrack entries), not
    # from the plugin's section as the agent's is: the facility says so instead of ignoring it
    assert writer["conntrackSize"] == {"configured": 65536, "kpr_ct": 131072, "kpr_np_rev": 65536, "honoured": False}
    assert st.counters["config_not_honoured"] >= 1 and "not honoured" in st.message
    st = env.plugins["node1"].kpr_status()
    assert st.counters["drops_total"] == sum(v for k, v in st.counters.items() if k.startswith("drop_"))


# ---------------------------------------------------------------------- attachment


FOREIGN = "int foreign_ingress(struct __sk_buff *skb) { return -1; }\n"  # TC_ACT_UNSPEC: let the next filter run


def test_foreign_filters_are_never_touched_and_reattach_is_idempotent(
    kernel_headers: Path, pin_dir: Path, topology: Topology
) -> None:
    from pyroute2 import IPRoute

    pin, topo = pin_dir, topology
    build_topology(topo, second_device=False, pods=("p1a",))
    b = compile_and_load(FOREIGN)
    try:
        fn = load_prog(b, "foreign_ingress", "SCHED_CLS")
        with topo["node1"].enter(), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.tc("add", "clsact", idx)
            ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name="foreign_ingress", parent="ffff:fff2", classid=1,
                   direct_action=True, prio=1)
        with node_harness(topo, "node1", pin) as h:
            h.apply(nodeport("att", 30090, "p1a")("node1"))
            p1 = start_plugin(h)
            # pref 1 is the foreign filter's: kpr takes the next one and leaves it alone (no
            # tcx link at that hook: it would run ahead of the foreign filter); egress has
            # no foreign filter: a tcx link
            assert tc_filters(topo, "node1", "eth0", "ingress") == [(1, "foreign_ingress"), (2, "kpr_np_ingress")]
            assert p1.kpr_status().details["foreignFiltersFirst"] == {"eth0": ["foreign_ingress"]}
            assert _name_and_peer(client(topo, "tcp", N1, 30090, 1)) == [("p1a", CLIENT)]
            # a second agent (restart) replaces kpr's filter in place: no duplicate, no gap
            p2 = start_plugin(h, keep_attached_on_stop=False)
            assert tc_filters(topo, "node1", "eth0", "ingress") == [(1, "foreign_ingress"), (2, "kpr_np_ingress")]
            assert tc_filters(topo, "node1", "eth0", "egress") == [(TCX, "kpr_np_egress")]
            assert len([a for a in attachments(pin) if a["target"]["ifname"] == "eth0"]) == 2
            assert _name_and_peer(client(topo, "tcp", N1, 30090, 1)) == [("p1a", CLIENT)]
            h.forget(p1)
            p1.datapath.close()  # the first agent is gone (its programs were replaced)
            p1.datapath = None
            h.stop(p2)
            assert tc_filters(topo, "node1", "eth0", "ingress") == [(1, "foreign_ingress")]
            assert tc_filters(topo, "node1", "eth0", "egress") == []
            assert attachments(pin) == []
    finally:
        b.cleanup()


def test_node_changes_reattach(kernel_headers: Path, pin_dir: Path, topology: Topology) -> None:
    pin, topo = pin_dir, topology
    build_topology(topo, pods=())
    with node_harness(topo, "node1", pin) as h:
        start_plugin(h)
        assert tc_filters(topo, "node1", "eth1", "ingress") == []
        from kpr.model import NodeInfo

        # from a thread outside the node's namespace, as the bus worker may be
        h.node_changed(NodeInfo("node1", (N1, NODE1_ETH1), ("eth0", "eth1")))
        assert tc_filters(topo, "node1", "eth1", "ingress") == [(TCX, "kpr_np_ingress")]
        h.node_changed(NodeInfo("node1", (NODE1_ETH1,), ("eth1",)))
        assert tc_filters(topo, "node1", "eth0", "ingress") == []
        assert tc_filters(topo, "node1", "eth1", "egress") == [(TCX, "kpr_np_egress")]


def test_kpr_cleanup_detaches_what_a_killed_agent_left(
    kernel_headers: Path, tmp_path: Path, pin_dir: Path, topology: Topology
) -> None:
    # The killed agent's tcx links, plus an orphan of an older version (a kpr clsact filter)
    # and another owner's filter at the same hook: kpr's go, the other owner's stays.
    from pyroute2 import IPRoute

    pin, topo = pin_dir, topology
    build_topology(topo, pods=())
    b = compile_and_load(FOREIGN)
    with node_harness(topo, "node1", pin, ("eth0", "eth1")) as h:  # stopping p leaves its links
        p = start_plugin(h)
        try:
            assert tc_filters(topo, "node1", "eth1", "egress") == [(TCX, "kpr_np_egress")]
            fn = load_prog(b, "foreign_ingress", "SCHED_CLS")
            with topo["node1"].enter(), IPRoute() as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.tc("add", "clsact", idx)
                for prio, fd, name in ((1, fn.fd, "foreign_ingress"), (2, p.datapath.fd("kpr_np_ingress"), "kpr_np_ingress")):
                    ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name=name, parent="ffff:fff2", classid=1,
                           direct_action=True, prio=prio)
            assert tc_filters(topo, "node1", "eth0", "ingress") == [
                (TCX, "kpr_np_ingress"), (1, "foreign_ingress"), (2, "kpr_np_ingress")]
            res = kpr_cleanup(pin, tmp_path)  # `kpr cleanup`, as an operator runs it
            assert res.returncode == 0, res.stderr
            assert res.stdout.count("detached tcx link") == 4, res.stdout
            assert res.stdout.count("detached tc ingress filter kpr_np_ingress") == 1, res.stdout
            assert tc_filters(topo, "node1", "eth0", "ingress") == [(1, "foreign_ingress")]
            assert tc_filters(topo, "node1", "eth0", "egress") == []
            for d in ("ingress", "egress"):
                assert tc_filters(topo, "node1", "eth1", d) == []
            assert not pin.exists()
        finally:
            b.cleanup()


def _tags(ids: list[int]) -> set[bytes | None]:
    from kpr.bpf.links import prog_tag

    return {prog_tag(pid) for pid in ids}


def _tcx_ids(topo: Topology, dev: str, direction: str) -> list[int]:
    import socket

    from kpr.plugins.tc_nodeport.attach import tcx_programs

    with topo["node1"].enter():
        return [pid for pid, _n in tcx_programs(socket.if_nametoindex(dev), direction)]


def test_stop_kill_and_upgrade_keep_one_program_per_hook(
    kernel_headers: Path, pin_dir: Path, topology: Topology
) -> None:
    """Stop leaves the tcx links; the next instance adopts them (after a stop: the same build,
    no compile) or updates them (after a kill, an upgrade): one program per hook, the same links and maps, the NodePort served throughout; a
    device dropped from node.devices loses kpr's programs even when an earlier run put them
    there; an older version's clsact filter is removed once the link runs."""
    from pyroute2 import IPRoute

    from kpr.bpf import links

    pin, topo = pin_dir, topology
    build_topology(topo, pods=("p1a",))
    started: list = []
    try:
        with node_harness(topo, "node1", pin, ("eth0", "eth1")) as h:
            h.apply(nodeport("adopt", 30091, "p1a")("node1"))

            def start(devices: tuple[str, ...] | None = None, **kw: Any) -> Any:
                p = start_plugin(h, devices, **kw)
                started.append(p)
                return p

            def one_each(devices: tuple[str, ...] = ("eth0", "eth1")) -> None:
                for dev in devices:
                    assert tc_filters(topo, "node1", dev, "ingress") == [(TCX, "kpr_np_ingress")]
                    assert tc_filters(topo, "node1", dev, "egress") == [(TCX, "kpr_np_egress")]

            serve = lambda: _name_and_peer(client(topo, "tcp", N1, 30091, 2)) == [("p1a", CLIENT)] * 2  # noqa: E731
            p1 = start()
            one_each()
            assert {a.action for a in p1._attached.values()} == {"created"}
            ids1 = {k: links.link_info(a.link_fd).id for k, a in p1._attached.items()}
            maps1 = {n: m.id for n, m in p1.datapath.maps.items()}
            assert serve()
            h.stop(p1)  # SIGTERM: the links stay, the NodePort is served
            one_each()
            assert serve()
            p2 = start()  # the same build: the links' programs kept, no compile
            one_each()
            assert p2.datapath.build == "adopted"
            assert {a.action for a in p2._attached.values()} == {"adopted"}
            assert {k: links.link_info(a.link_fd).id for k, a in p2._attached.items()} == ids1
            assert {n: m.id for n, m in p2.datapath.maps.items()} == maps1
            before = _tags(_tcx_ids(topo, "eth0", "ingress"))
            # SIGKILL and an upgrade (ICMP unreachable compiled out): p2 never stops; the new
            # build replaces it through the links
            p3 = start(extra_cflags=["-UKPR_NP_ICMP_UNREACH", "-DKPR_NP_ICMP_UNREACH=0"])
            one_each()
            assert p3.datapath.build == "compiled"
            assert {a.action for a in p3._attached.values()} == {"updated"}
            assert {k: links.link_info(a.link_fd).id for k, a in p3._attached.items()} == ids1
            assert {n: m.id for n, m in p3.datapath.maps.items()} == maps1
            # the entries run the new build (the changed code is in a stage: the pinned
            # kpr_np_calls array holds the new stages)
            assert _tcx_ids(topo, "eth0", "ingress") == [p3.datapath.prog_id("kpr_np_ingress")]
            assert _tags(_tcx_ids(topo, "eth0", "ingress")) == before
            assert serve()
            h.apply(nodeport("adopt-empty", 30093)("node1"))
            assert answers(client(topo, "tcp", N1, 30093, 1, "timeout=1")) == ["TimeoutError"], "dropped, no ICMP"
            assert len(attachments(pin)) == 4
            # an older version's clsact filter at a hook (as kpr attached before links)
            with topo["node1"].enter(), IPRoute() as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.tc("add", "clsact", idx)  # tcx needs none
                ipr.tc("add-filter", "bpf", idx, ":1", fd=p3.datapath.fd("kpr_np_ingress"), name="kpr_np_ingress",
                       parent="ffff:fff2", classid=1, direct_action=True, prio=1)
            assert tc_filters(topo, "node1", "eth0", "ingress") == [(TCX, "kpr_np_ingress"), (1, "kpr_np_ingress")]
            # a new instance for eth0 only: eth1 was an earlier run's, and goes
            p4 = start(("eth0",))
            one_each(("eth0",))
            for d in ("ingress", "egress"):
                assert tc_filters(topo, "node1", "eth1", d) == []
            assert [r["target"]["ifname"] for r in attachments(pin)] == ["eth0", "eth0"]
            assert sorted(p.name for p in (pin / "links" / "tc_nodeport").iterdir()) == ["eth0"]
            assert serve()
    finally:
        for p in started:
            with contextlib.suppress(Exception):
                p._teardown(detach=False)


def test_without_tcx_links_clsact_filters_keep_one_copy(
    kernel_headers: Path, monkeypatch: pytest.MonkeyPatch, pin_dir: Path, topology: Topology
) -> None:
    """KPR_BPF_LINKS=tcx: clsact filters as before links, replaced in place by the next
    instance; allowed again, the next instance moves to a tcx link and drops the filter."""
    pin, topo = pin_dir, topology
    build_topology(topo, second_device=False, pods=("p1a",))
    started: list = []
    try:
        with node_harness(topo, "node1", pin) as h:
            h.apply(nodeport("fb", 30092, "p1a")("node1"))
            serve = lambda: _name_and_peer(client(topo, "tcp", N1, 30092, 2)) == [("p1a", CLIENT)] * 2  # noqa: E731
            monkeypatch.setenv("KPR_BPF_LINKS", "tcx")
            for _ in range(2):
                p = start_plugin(h)
                started.append(p)
                assert tc_filters(topo, "node1", "eth0", "ingress") == [(1, "kpr_np_ingress")]
                assert tc_filters(topo, "node1", "eth0", "egress") == [(1, "kpr_np_egress")]
                assert p.kpr_status().details["linksFallback"]
                assert serve()
                h.stop(p)
                assert tc_filters(topo, "node1", "eth0", "ingress") == [(1, "kpr_np_ingress")], "stays"
            monkeypatch.delenv("KPR_BPF_LINKS")
            p = start_plugin(h)
            started.append(p)
            assert tc_filters(topo, "node1", "eth0", "ingress") == [(TCX, "kpr_np_ingress")]
            assert tc_filters(topo, "node1", "eth0", "egress") == [(TCX, "kpr_np_egress")]
            assert not p.kpr_status().details["linksFallback"]
            assert serve()
    finally:
        for p in started:
            with contextlib.suppress(Exception):
                p._teardown(detach=False)


def test_agent_restarts_under_traffic_lose_no_connection(kernel_headers: Path) -> None:
    """`kpr run` in node1's namespace; the external client opens a connection to the NodePort
    every 10 ms and holds one more. SIGTERM + start and SIGKILL + start: no failed
    connection, the long-lived one unbroken, one program per hook, the same maps."""
    import signal

    from socklb_env import assert_no_loss, restarts_under_load

    from kpr.bpf import maps as M
    from tc_nodeport_env import NP_RESTART_PORT, nodeport_restart_rig

    with nodeport_restart_rig("kpr-np-rs") as rig:
        rig.start()
        with M.BpfMap.open_pinned(rig.pin / "kpr_ct") as m:
            ct_id = m.id

        def stays() -> None:
            assert tc_filters(rig.topo, "node1", "eth0", "ingress") == [(TCX, "kpr_np_ingress")]

        def one_each() -> None:
            assert tc_filters(rig.topo, "node1", "eth0", "ingress") == [(TCX, "kpr_np_ingress")]
            assert tc_filters(rig.topo, "node1", "eth0", "egress") == [(TCX, "kpr_np_egress")]

        res, windows = restarts_under_load(rig, N1, NP_RESTART_PORT, after_stop=stays, after_start=one_each)
        with M.BpfMap.open_pinned(rig.pin / "kpr_ct") as m:
            assert m.id == ct_id, "the same conntrack map"
        assert len(list(rig.pin.glob("kpr_np_calls*"))) == 1, "earlier builds' stage arrays are unpinned"
        assert_no_loss(res, windows)
        rig.stop(signal.SIGTERM)


def test_agent_end_to_end_with_the_files_source(
    kernel_headers: Path, tmp_path: Path, pin_dir: Path, topology: Topology
) -> None:
    """A real agent (files source, bus, writer facility, tc_nodeport) in node1's namespace; and
    with the plugin disabled, nothing attached at all."""
    pin, topo = pin_dir, topology
    cfg = AgentConfig(tmp_path, pin, addresses=(N1, NODE1_ETH1), devices=("eth0", "eth1"), shutdown_timeout=None,
                      extra={"service": {"clusterCIDR": ["10.96.0.0/16"]}})
    cfg.manifest("web", textwrap.dedent(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: web, namespace: default}}
        spec:
          type: NodePort
          clusterIP: 10.96.9.10
          ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30099}}]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
        addressType: IPv4
        ports: [{{name: http, port: 8080, protocol: TCP}}]
        endpoints:
          - addresses: [{PODS['p1a'][1]}]
            nodeName: node1
          - addresses: [{PODS['p2a'][1]}]
            nodeName: node2
        """))
    build_topology(topo, pods=("p1a", "p2a"))

    section = {"mode": "snat", "conntrackSize": 65536}
    with running_agent(cfg.plugin("tc_nodeport", enabled=False, **section), netns=topo["node1"]):
        for dev in ("eth0", "eth1"):
            assert tc_filters(topo, "node1", dev, "ingress") == [], "a disabled plugin attaches nothing"

    with running_agent(cfg.plugin("tc_nodeport", enabled=True, **section), netns=topo["node1"]) as agent:
        # running_agent waited for the bus to deliver the first state; the store's sync too
        wait_for(lambda: agent.store.is_synced, 15, "the store to sync")
        for dev in ("eth0", "eth1"):
            assert tc_filters(topo, "node1", dev, "ingress") == [(TCX, "kpr_np_ingress")]
        seen: set[tuple[str, str]] = set()

        def two_seen() -> bool:
            seen.update(_name_and_peer(client(topo, "tcp", N1, 30099, 4)))
            return len(seen) >= 2

        wait_for(two_seen, 10, "answers from two pods", show=lambda: seen)
        # the local pod keeps the client's address, the remote one sees node1's (SNAT)
        assert seen == {("p1a", CLIENT), ("p2a", N1)}, seen
        status = agent.plugin_statuses()["tc_nodeport"]
        assert status["healthy"], status
        assert status["counters"]["new_local"] >= 1 and status["counters"]["new_snat"] >= 1
        # the core's writer took conntrackSize from this plugin's section (the facility checks)
        shared = agent.plugin_statuses()["nodeport"]
        assert shared["healthy"], shared
        assert shared["details"]["writer"]["conntrackSize"]["honoured"] is True, shared["details"]["writer"]
        assert shared["counters"]["config_not_honoured"] == 0
    for dev in ("eth0", "eth1"):
        assert tc_filters(topo, "node1", dev, "ingress") == [(TCX, "kpr_np_ingress")], "stop leaves them"
    cleanup(pin)
    for dev in ("eth0", "eth1"):
        assert tc_filters(topo, "node1", dev, "ingress") == [], "`kpr cleanup` removes them"


def test_keep_attached_on_stop_leaves_nodeports_working(
    kernel_headers: Path, pin_dir: Path, topology: Topology
) -> None:
    pin, topo = pin_dir, topology
    build_topology(topo, second_device=False, pods=("p1a",))
    with node_harness(topo, "node1", pin) as h:
        h.apply(nodeport("keep", 30095, "p1a")("node1"))
        p = start_plugin(h, keep_attached_on_stop=True)
        h.stop(p)  # the agent stops (a restart): the programs and their maps stay
        assert tc_filters(topo, "node1", "eth0", "ingress") == [(TCX, "kpr_np_ingress")]
        assert _name_and_peer(client(topo, "tcp", N1, 30095, 2)) == [("p1a", CLIENT)] * 2
        assert len(attachments(pin)) == 2, "still recorded for `kpr cleanup`"
    # the pin_dir fixture's teardown (scratch_pin_dir) is `kpr cleanup`: it detaches them
