"""announce_arp against real kernels: nodes in namespaces on a bridge, each running `kpr run`
with the plugin, and a router namespace whose own neighbour table (filled by ping / arping)
is the judge. Everything lives in namespaces these tests create (see announce_arp_env).
Failover tests run with both memberships: heartbeats, and Leases on a test API server.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time

import pytest

from kpr.plugins.announce_arp import ownership
from kpr.plugins.announce_arp.config import Member
from kpr.plugins.announce_arp.droprules import DropRules
from kpr.plugins.announce_arp.heartbeat import Codec, Heartbeat, cluster_id
from kpr.testing.agent import kpr_cli
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.netns import Topology, in_netns
from kpr.testing.waiting import stays

from announce_arp_env import KEY, PORT, VIP4, VIP6, Segment, flood, lb_manifest, node_ip4, segment, wait_for

pytestmark = pytest.mark.kernel

NODES = ["node1", "node2", "node3"]


# Failover tests take the membership as an indirect parameter of `seg`.
BOTH_MEMBERSHIPS = pytest.mark.parametrize("seg", ["heartbeat", "kubernetes"], indirect=True)


@pytest.fixture
def seg(request, tmp_path):
    membership = getattr(request, "param", "heartbeat")
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(KubeApiServer(bookmark_interval=0.5)) if membership == "kubernetes" else None
        yield stack.enter_context(segment(tmp_path, membership=membership, apiserver=srv))


@contextlib.contextmanager
def solo(tmp_path, **announce):
    """One node without members (it alone announces) and the router; torn down on exit."""
    with segment(tmp_path, n_nodes=1, members=False, announce=announce) as s:
        yield s.topo, s


def assert_only_owner_answers(s: Segment, vip: str, owner: str, count: int = 3) -> None:
    macs = s.arping(vip, count)
    assert macs and len(macs) == count and set(macs) == {s.nodes[owner].mac}, (
        f"arping {vip}: replies from {[s.by_mac(m) or m for m in macs]}, expected {count} from {owner}; "
        f"its counters: {(s.plugin(owner) or {}).get('counters')}"
    )


def agreed_owner(s: Segment, vip: str, running: list[str]) -> str | None:
    """The owner every running agent names, or None while they disagree."""
    views = set()
    for n in running:
        p = s.plugin(n)
        if p is None:
            return None
        views.add(p["details"]["owners"].get(vip))
    return views.pop() if len(views) == 1 else None


@BOTH_MEMBERSHIPS
def test_owner_answers_moves_on_sigkill_and_comes_back_without_flapping(seg):
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, NODES))
    (seg.manifests / "lb6.yaml").write_text(lb_manifest("lb6", VIP6, NODES))
    for n in NODES:
        seg.start(n)
    seg.wait_ready(NODES)

    owner = {vip: ownership.rank(vip, NODES)[0] for vip in (VIP4, VIP6)}
    for vip in (VIP4, VIP6):
        wait_for(lambda: seg.owners(vip) == {owner[vip]}, 5, f"{vip} owned by {owner[vip]} alone", lambda: {n: seg.plugin(n)["details"] for n in NODES})
        assert agreed_owner(seg, vip, NODES) == owner[vip]
        seg.resolve(vip)
        assert seg.neigh_owner(vip) == owner[vip]
    # non-owners never answer: every request gets exactly one reply, from the owner
    assert_only_owner_answers(seg, VIP4, owner[VIP4])
    # ...and never even see the requests: their kernel filter passes owned targets only
    for n in NODES:
        if n not in owner.values():
            assert seg.plugin(n)["counters"]["requests_not_owned"] == 0, n

    # SIGKILL: no goodbye, peers notice the silence; the router's existing entry is moved by
    # the new owner's gratuitous ARP / unsolicited NA alone (nothing here sends it traffic).
    victim = owner[VIP4]
    moved = [vip for vip in (VIP4, VIP6) if owner[vip] == victim]
    nxt = {vip: ownership.rank(vip, NODES)[1] for vip in moved}
    # deadInterval 0.5 s (heartbeat) or leaseDuration 3 s (kubernetes, the default), plus the
    # time to notice, decide and announce: no clock bound here (a loaded CI is slower), the
    # failover's speed is bench_announce_arp's (goal < 2 s); the wait is only a net.
    t0 = time.monotonic()
    seg.stop(victim, signal.SIGKILL)
    for vip in moved:
        wait_for(lambda: seg.neigh_owner(vip) == nxt[vip], seg.expiry() + 20, f"router entry for {vip} -> {nxt[vip]}", lambda: seg.neigh(vip))
    print(f"failover membership={seg.membership} expiry={seg.expiry()}s took={time.monotonic() - t0:.2f}s")
    rest = [n for n in NODES if n != victim]
    assert_only_owner_answers(seg, VIP4, nxt[VIP4])
    if seg.membership == "kubernetes":
        # the survivors saw its Lease run out (not released)
        assert all(seg.plugin(n)["counters"]["lease_peer_expiries"] == 1 for n in rest), {n: seg.plugin(n)["counters"] for n in rest}

    # It comes back: ownership returns to it once (the ranking is the same everywhere)...
    seg.start(victim)
    seg.wait_ready(NODES)
    for vip in moved:
        wait_for(lambda: seg.neigh_owner(vip) == owner[vip], 5, f"router entry for {vip} back to {victim}", lambda: seg.neigh(vip))
    # The returning owner announces as soon as it ranks itself first; the interim owner lets go
    # once it sees the returner's heartbeat or renewed Lease, a renewal or so later. Within that
    # handover both claim the address (CI saw it: the check came before the interim let go).
    for vip in moved:
        wait_for(lambda: seg.owners(vip) == {owner[vip]}, seg.expiry() + 1.5, f"{vip} handed back to {victim} alone",
                 lambda: {v: (seg.owners(v), seg.neigh(v)) for v in (VIP4, VIP6)})
    # ...and stays: no agent changes ownership again and all agree, for a while.
    changes = {n: seg.plugin(n)["counters"]["ownership_changes"] for n in NODES}
    stays(lambda: all(seg.owners(vip) == {owner[vip]} and seg.neigh_owner(vip) in (owner[vip], None) for vip in (VIP4, VIP6)),
          2.0, "one owner per address, the router agreeing", lambda: {vip: (seg.owners(vip), seg.neigh(vip)) for vip in (VIP4, VIP6)})
    assert {n: seg.plugin(n)["counters"]["ownership_changes"] for n in NODES} == changes
    assert_only_owner_answers(seg, VIP4, owner[VIP4])
    # the restarted node took the address without a claim-then-release: one change only
    assert seg.plugin(victim)["counters"]["ownership_changes"] == 1
    for n in rest:
        assert seg.plugin(n)["healthy"], seg.plugin(n)


@BOTH_MEMBERSHIPS
def test_sigterm_hands_over_before_the_dead_interval(seg):
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, NODES))
    for n in NODES:
        # a long expiry: only the leaving heartbeat (the released Lease) can move the address
        # within the wait below, a third of it (no clock bound: a loaded CI is slower)
        seg.start(n, **seg.long_expiry(30.0))
    seg.wait_ready(NODES)
    owner, nxt = ownership.rank(VIP4, NODES)[:2]
    wait_for(lambda: seg.owners(VIP4) == {owner}, 5, "owner")
    seg.resolve(VIP4)
    assert seg.neigh_owner(VIP4) == owner
    t0 = time.monotonic()
    seg.send_signal(owner, signal.SIGTERM)
    wait_for(lambda: seg.neigh_owner(VIP4) == nxt, 10, "handover before the 30 s expiry", lambda: seg.neigh(VIP4))
    print(f"handover membership={seg.membership} took={time.monotonic() - t0:.2f}s")
    assert seg.reap(owner) == 0
    assert_only_owner_answers(seg, VIP4, nxt)
    # it cleaned up after itself: no drop table left in its namespace
    assert nft_table(seg.topo, seg.nodes[owner].ns) is None


def _send_heartbeat(seg: Segment, node: str, data: bytes) -> None:
    """Send one datagram from the node's own address and port, inside its namespace."""
    n = seg.nodes[node]
    with in_netns(seg.topo.namespaces[n.ns].path):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((node_ip4(n.index), PORT))
            for other in seg.nodes.values():
                if other.name != node:
                    s.sendto(data, (node_ip4(other.index), PORT))


def test_forged_replayed_and_unsigned_heartbeats_are_ignored(seg, tmp_path):
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, NODES))
    first, second = ownership.rank(VIP4, NODES)[:2]
    for n in NODES:
        seg.start(n)
    seg.wait_ready(NODES)
    wait_for(lambda: seg.owners(VIP4) == {first}, 5, "owner")
    # Record what `first` sends (its own frames only: replaying others' frames from its port
    # would teach the bridge their MACs on the wrong port), to replay it once it is dead.
    pcap = tmp_path / "hb.pcap"
    fns = seg.topo.namespaces[seg.nodes[first].ns]
    cap = fns.popen(
        ["tcpdump", "-Z", "root", "-i", "eth0", "-U", "-c", "12", "-w", str(pcap),
         "ether", "src", seg.nodes[first].mac, "and", "udp", "src", "port", str(PORT)]
    )
    cap.wait(timeout=10)
    seg.stop(first, signal.SIGKILL)
    rest = [n for n in NODES if n != first]
    wait_for(lambda: seg.owners(VIP4) == {second}, 10, "takeover")

    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    frames = []
    for pkt in rdpcap(str(pcap)):
        pkt = Ether(bytes(pkt))
        # Captured on a veth with checksum offload: the UDP checksum is still partial.
        del pkt[UDP].chksum
        frames.append(bytes(pkt))
    assert len(frames) == 12
    members = [Member(n, node_ip4(i + 1)) for i, n in enumerate(NODES)]
    fresh = lambda eligible, key: Codec(key, cluster_id(members, PORT)).encode(  # noqa: E731
        Heartbeat(first, time.time_ns(), 1, time.time(), eligible)
    )
    before = {n: seg.plugin(n)["counters"] for n in rest}
    # replayed: the dead node's own, correctly signed heartbeats, sent again on its segment
    with in_netns(fns.path):
        from scapy.config import conf
        import scapy.arch  # noqa: F401

        s = conf.L2socket(iface="eth0", promisc=False)
        try:
            for f in frames:
                s.send(f)
        finally:
            s.close()
    # forged: fresh, eligible for the VIP, from the dead node's address, with the wrong key
    _send_heartbeat(seg, first, fresh(frozenset({VIP4}), b"not-the-cluster-key-0123456789"))
    # unsigned garbage
    _send_heartbeat(seg, first, b"KPRHB1" + b"\0" * 32 + b'{"n":"%s"}' % first.encode())

    stays(lambda: seg.owners(VIP4) == {second} and not any(first in seg.plugin(n)["details"]["live"] for n in rest),
          1.5, f"{second} the owner, {first} dead to the others", lambda: (seg.owners(VIP4), {n: seg.plugin(n)["details"]["live"] for n in rest}),
          interval=0.05)
    for n in rest:
        c = seg.plugin(n)["counters"]
        assert c.get("heartbeat_rejected_replay", 0) - before[n].get("heartbeat_rejected_replay", 0) >= 5, repr({k: v for k, v in c.items() if "heartbeat" in k})
        assert c.get("heartbeat_rejected_bad_mac", 0) - before[n].get("heartbeat_rejected_bad_mac", 0) >= 2, c

    # Control: the same path accepts a correctly signed fresh heartbeat (a node that has not
    # synced yet, so ownership stays): the rejections above were the checks, not deafness.
    def heard(n: str) -> float:
        peer = seg.plugin(n)["details"]["membership"]["peers"].get(first) or {}
        ago = peer.get("lastHeardSecondsAgo")
        return float("inf") if ago is None else ago

    # Heard again (the time since shrinks, for good): not "live" for a moment, which lasts
    # only deadInterval and a loaded machine's polls could miss.
    heard_before = {n: heard(n) for n in rest}
    _send_heartbeat(seg, first, fresh(None, KEY))
    wait_for(lambda: all(heard(n) < heard_before[n] for n in rest), 10, "signed heartbeat accepted",
             lambda: {n: heard(n) for n in rest})
    assert seg.owners(VIP4) == {second}


def test_local_traffic_policy_follows_ready_local_endpoints(seg):
    # The rank-last node is the only one with an endpoint: eligibility beats the ranking.
    last = ownership.rank(VIP4, NODES)[-1]
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, [last], local=True))
    for n in NODES:
        seg.start(n)
    seg.wait_ready(NODES)
    wait_for(lambda: seg.owners(VIP4) == {last}, 5, f"owned by {last}")
    seg.resolve(VIP4)
    assert seg.neigh_owner(VIP4) == last
    assert_only_owner_answers(seg, VIP4, last)

    # The endpoint moves: the old node stops answering, the new one announces.
    other = ownership.rank(VIP4, NODES)[0]
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, [other], local=True))
    wait_for(lambda: seg.neigh_owner(VIP4) == other, 10, f"router entry -> {other}", lambda: seg.neigh(VIP4))
    # Each agent reads the manifest change on its own pass: the old owner may let go a moment
    # after the new one announced. Wait for that rather than read the owners once.
    wait_for(lambda: seg.owners(VIP4) == {other}, 10, f"{other} the only owner", lambda: seg.owners(VIP4))
    assert_only_owner_answers(seg, VIP4, other)

    # No ready local endpoint anywhere: nobody answers.
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, [], local=True))
    wait_for(lambda: seg.owners(VIP4) == set(), 10, "nobody owns")
    assert seg.arping(VIP4, 2) == []


RESPONDERS = pytest.mark.parametrize("responder", ["auto", "python"])


def assert_answering(s: Segment, node: str, responder: str, interfaces: tuple[str, ...] = ("eth0",)) -> None:
    want = "bpf" if responder == "auto" else "python"
    assert s.plugin(node)["details"]["answering"] == {i: want for i in interfaces}, s.plugin(node)["details"]


@RESPONDERS
def test_only_the_configured_interfaces_answer(tmp_path, responder):
    with solo(tmp_path, responder=responder) as (topo, s):
        # a second link between node and router that the plugin is not configured for
        topo.link("n1", "r", "10.1.0.1/24", "10.1.0.254/24", ifname_a="eth1", ifname_b="eth1")
        (s.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, ["node1"]))
        (s.manifests / "lb6.yaml").write_text(lb_manifest("lb6", VIP6, ["node1"]))
        s.start("node1")
        try:
            s.wait_ready(["node1"])
            wait_for(lambda: sorted(s.plugin("node1")["details"]["owned"]) == [VIP4, VIP6], 5, "owned")
            assert_answering(s, "node1", responder)
            assert_only_owner_answers(s, VIP4, "node1")
            assert s.arping(VIP4, 2, iface="eth1") == []
            assert s.solicit(VIP6) == [s.nodes["node1"].mac]
            assert s.solicit(VIP6, iface="eth1") == []
            assert s.solicit("fd00:100::99") == []  # not owned by anyone
            c = s.plugin("node1")["counters"]
            assert c["arp_replies"] == 3
            if responder == "auto":
                assert c["bpf_arp_replies:eth0"] == 3, c
                assert "bpf_arp_replies:eth1" not in c
        finally:
            s.stop("node1")


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_a_requester_resolves_the_address_at_once_under_a_flood(tmp_path, vip):
    """An ARP (NDP) scan from 50,000 distinct requesters must not starve a real neighbour."""
    with solo(tmp_path) as (topo, s):
        client, scanner = s.add_host("c", 50), s.add_host("f", 60)
        (s.manifests / "lb.yaml").write_text(lb_manifest("lb", vip, ["node1"]))
        s.start("node1")
        try:
            s.wait_ready(["node1"])
            assert_answering(s, "node1", "auto")
            wait_for(lambda: s.plugin("node1")["details"]["owned"] == [vip], 5, "owned")
            fam = "-6" if ":" in vip else "-4"
            errors: list[BaseException] = []
            sent: list[int] = []

            def run_flood() -> None:
                try:
                    sent.append(flood(s, vip, 6.0, 50_000, 5_000, ns=scanner, count_replies=False)[1])
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            t = threading.Thread(target=run_flood)
            t.start()
            try:
                time.sleep(1.0)  # the flood is under way
                for attempt in range(3):
                    topo.run(client, ["ip", fam, "neigh", "flush", "dev", "eth0"], check=False)
                    # one ping, one second: the kernel sends a single request in that time
                    ping = topo.run(client, ["ping", fam, "-c", "1", "-W", "1", vip], check=False)
                    out = json.loads(topo.run(client, ["ip", fam, "-j", "neigh", "show", vip, "dev", "eth0"]).stdout or "[]")
                    macs = [e.get("lladdr") for e in out if e.get("lladdr")]
                    assert macs == [s.nodes["node1"].mac], (
                        f"attempt {attempt}: client neighbour entry {out}; ping: {ping.stdout} {ping.stderr}; "
                        f"counters {s.plugin('node1')['counters']}")
                assert t.is_alive(), "the flood ended before the client's attempts"
            finally:
                t.join()
            assert not errors, errors
            c = s.plugin("node1")["counters"]
            answered = c["arp_replies"] if fam == "-4" else c["na_replies"]
            # a real flood (not one the sender could not produce), and every request answered
            assert sent[0] > 20_000 and answered >= sent[0], (sent, {k: v for k, v in c.items() if "bpf" in k})
        finally:
            s.stop("node1")


def tcx_ingress(topo: Topology, ns: str) -> list[str]:
    """Names of the tcx programs at eth0 ingress of a namespace, in order."""
    from kpr.bpf import links

    with in_netns(topo.namespaces[ns].path):
        idx = socket.if_nametoindex("eth0")
        return [links.prog_name(p) or "?" for p in links.query(idx, links.ATTACH_TCX_INGRESS)]


def test_the_program_is_adopted_on_restart_silent_without_an_agent_and_removed_by_cleanup(tmp_path):
    with solo(tmp_path) as (topo, s):
        (s.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, ["node1"]))
        s.start("node1")
        s.wait_ready(["node1"])
        assert s.plugin("node1")["details"]["bpf"]["interfaces"]["eth0"]["action"] == "created"
        assert_only_owner_answers(s, VIP4, "node1", 2)
        s.stop("node1", signal.SIGKILL)
        # killed: the pinned link keeps the program, which stops answering on its own
        assert tcx_ingress(topo, "n1") == ["kpr_arp_tc"]
        time.sleep(1.0)
        assert s.arping(VIP4, 2) == []
        s.start("node1")
        s.wait_ready(["node1"])
        # the same link, switched to the new agent's program: still one program at the hook
        assert s.plugin("node1")["details"]["bpf"]["interfaces"]["eth0"]["action"] == "updated"
        assert tcx_ingress(topo, "n1") == ["kpr_arp_tc"]
        assert_only_owner_answers(s, VIP4, "node1", 2)
        assert s.stop("node1") == 0
        assert s.arping(VIP4, 2) == []  # stopped: nothing answers
        config = s.nodes["node1"].config
        res = kpr_cli("cleanup", "--config", str(config), netns=topo["n1"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert tcx_ingress(topo, "n1") == []
        assert not (s.bpffs / "node1").exists()


def test_python_answers_where_the_program_cannot_attach(tmp_path):
    with solo(tmp_path) as (topo, s):
        (s.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, ["node1"]))
        # tcx links refused (as on a kernel without them): the interface falls back to Python
        s.start("node1", env={"KPR_BPF_LINKS": "off"})
        s.wait_ready(["node1"])
        p = s.plugin("node1")
        assert p["healthy"], p["message"]
        assert p["details"]["answering"] == {"eth0": "python"}
        assert "links turned off" in p["details"]["bpf"]["interfaces"]["eth0"]["error"], p["details"]["bpf"]
        assert tcx_ingress(topo, "n1") == []
        assert_only_owner_answers(s, VIP4, "node1", 2)
        assert s.plugin("node1")["counters"]["arp_replies"] == 2
        assert "bpf_arp_replies:eth0" not in s.plugin("node1")["counters"]
        s.stop("node1")


@RESPONDERS
def test_ipv6_solicitations_are_answered_with_the_interface_mac(tmp_path, responder):
    with solo(tmp_path, responder=responder) as (topo, s):
        (s.manifests / "lb6.yaml").write_text(lb_manifest("lb6", VIP6, ["node1"]))
        s.start("node1")
        try:
            s.wait_ready(["node1"])
            assert_answering(s, "node1", responder)
            s.resolve(VIP6)
            assert s.neigh_owner(VIP6) == "node1"
            assert s.plugin("node1")["counters"]["na_replies"] >= 1
            # the service goes: the address is dropped and no longer answered
            (s.manifests / "lb6.yaml").unlink()
            wait_for(lambda: s.plugin("node1")["details"]["owned"] == [], 10, "dropped")
            s.flush_neigh(VIP6)
            s.resolve(VIP6)
            assert s.neigh_owner(VIP6) is None
        finally:
            s.stop("node1")


def test_socket_failures_show_in_status_and_recover(tmp_path):
    with solo(tmp_path) as (topo, s):
        topo.link("n1", "r", None, None, ifname_a="eth1", ifname_b="eth1")
        (s.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, ["node1"]))
        s.start("node1", interfaces=["eth0", "eth1"])
        try:
            s.wait_ready(["node1"])
            topo.run("n1", "ip link set eth1 down")
            wait_for(lambda: not s.plugin("node1")["healthy"], 10, "unhealthy")
            p = s.plugin("node1")
            assert "interface eth1" in p["message"] and "retrying" in p["message"], p["message"]
            # the other interface keeps answering meanwhile
            assert_only_owner_answers(s, VIP4, "node1", 2)
            topo.run("n1", "ip link set eth1 up")
            wait_for(lambda: s.plugin("node1")["healthy"], 15, "healthy again", lambda: s.plugin("node1")["message"])
            # deleted outright, then a new eth1 appears
            topo.run("n1", "ip link del eth1")
            wait_for(lambda: "eth1" in s.plugin("node1")["message"], 10, "unhealthy after delete")
            topo.run("n1", "ip link add eth1 type veth peer name eth1p && ip link set eth1 up && ip link set eth1p up")
            wait_for(lambda: s.plugin("node1")["healthy"], 15, "healthy with the new eth1", lambda: s.plugin("node1")["message"])
            assert s.plugin("node1")["counters"]["socket_errors"] >= 2
        finally:
            s.stop("node1")


def test_heartbeat_socket_failure_shows_and_recovers(seg):
    (seg.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, NODES))
    seg.topo.run("n1", "ip addr del 10.0.0.1/24 dev eth0")
    seg.start("node1")
    wait_for(lambda: (p := seg.plugin("node1")) is not None and "cannot bind 10.0.0.1" in p["message"], 15, "bind error in status", lambda: seg.plugin("node1"))
    p = seg.plugin("node1")
    assert p["healthy"] is False and "retrying" in p["message"]
    # not taking part: it announces nothing while it cannot hear its peers
    assert p["details"]["owned"] == []
    seg.topo.run("n1", "ip addr add 10.0.0.1/24 dev eth0")
    wait_for(lambda: seg.plugin("node1")["healthy"], 15, "healthy", lambda: seg.plugin("node1")["message"])
    # alone (its peers are not running): after deadInterval it owns the address
    wait_for(lambda: seg.owners(VIP4) == {"node1"}, 5, "owns")


def nft_table(topo: Topology, ns: str) -> dict | None:
    res = topo.run(ns, ["nft", "-j", "list", "table", "inet", "kpr_announce_arp"], check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def set_elements(table: dict, name: str) -> list[str]:
    for item in table["nftables"]:
        if "set" in item and item["set"]["name"] == name:
            return sorted(item["set"].get("elem", []))
    return []


@pytest.mark.parametrize("drop", ["auto", "false"])
def test_drop_table_stops_forwarding_loops(tmp_path, drop):
    with solo(tmp_path, dropUnserved=drop) as (topo, s):
        (s.manifests / "lb4.yaml").write_text(lb_manifest("lb4", VIP4, ["node1"]))
        topo.run("n1", "nft add table inet someone_else && nft add chain inet someone_else c")
        node_mac = s.nodes["node1"].mac
        # Frames the node sends back onto the segment for the VIP: the loop.
        cap = topo.popen(
            "r",
            ["tcpdump", "-i", "eth0", "-nn", "-e", "-l", "ether", "src", node_mac, "and", "ip", "dst", "host", VIP4],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        s.start("node1")
        try:
            s.wait_ready(["node1"])
            time.sleep(0.5)  # tcpdump up
            topo.run("r", ["ping", "-c", "3", "-i", "0.2", "-W", "0.5", VIP4], check=False)
            time.sleep(0.5)
            cap.terminate()
            looped = [l for l in cap.communicate(timeout=5)[0].splitlines() if l.strip()]
            table = nft_table(topo, "n1")
            if drop == "auto":
                assert table is not None and set_elements(table, "vips4") == [VIP4]
                assert looped == [], looped[:5]
                wait_for(lambda: s.plugin("node1")["counters"].get("dropped_packets", 0) >= 3, 8, "drop counter")
            else:
                # the control: without the table the node routes the VIP's traffic back out
                assert table is None
                assert len(looped) >= 3
        finally:
            s.stop("node1")
        assert nft_table(topo, "n1") is None, "table left behind"
        assert topo.run("n1", "nft list table inet someone_else", check=False).returncode == 0


def test_drop_rules_touch_only_their_own_table(topology: Topology) -> None:
    topo = topology
    topo.add_node("n")
    topo.run("n", "nft add table inet someone_else && nft add chain inet someone_else c '{ type filter hook forward priority 0; }'")
    before = topo.run("n", "nft list table inet someone_else").stdout
    d = DropRules(["eth0", "eth1.100"], argv_prefix=["ip", "netns", "exec", topo.netns_name("n")])
    d.install()
    d.update({VIP4, VIP6, "10.0.100.11"})
    t = nft_table(topo, "n")
    assert set_elements(t, "vips4") == sorted([VIP4, "10.0.100.11"]) and set_elements(t, "vips6") == [VIP6]
    d.update({VIP6})
    t = nft_table(topo, "n")
    assert set_elements(t, "vips4") == [] and set_elements(t, "vips6") == [VIP6]
    assert d.dropped() == 0
    # a table left by a crashed agent is replaced, not duplicated
    DropRules(["eth0"], argv_prefix=d.argv_prefix).install()
    assert set_elements(nft_table(topo, "n"), "vips6") == []
    d.remove()
    d.remove()  # idempotent
    assert nft_table(topo, "n") is None
    assert topo.run("n", "nft list table inet someone_else").stdout == before
