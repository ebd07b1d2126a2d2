"""announce_arp without sockets: ownership decisions in the plugin (fake membership, responder
and drop rules), and the responder's replies as frames (scapy, no interface)."""

import logging
import time
from collections import Counter

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from kpr.config import parse_config
from kpr.context import PluginContext
from kpr.model import Backend, BackendState, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.plugins.announce_arp import ownership
from kpr.plugins.announce_arp.config import AnnounceARPConfig
from kpr.plugins.announce_arp.membership import Health
from kpr.plugins.announce_arp.plugin import AnnounceARP
from kpr.plugins.announce_arp.responder import Answerer, garp_frames
from kpr.testing.waiting import wait_for

ME = "node1"
MAC = "02:00:00:00:00:01"
ASKER = "02:00:00:00:00:99"


class FakeMembership:
    def __init__(self, live=(ME,), eligible=None):
        self.self_name = ME
        self.live = frozenset(live)
        self.peer_eligible = dict(eligible or {})
        self.published = None
        self.callbacks = []
        # held(): this node's eligibility as peers know it stays what it was (a write that has
        # not landed) until landed()
        self.holding, self.written = False, None

    def start(self):
        pass

    def stop(self):
        pass

    def live_nodes(self):
        return self.live

    def eligible(self, node):
        if node == self.self_name:
            return self.written if self.holding else self.published
        # None: a peer that has not published yet (still loading its services)
        e = self.peer_eligible.get(node)
        return None if e is None else frozenset(e)

    def publish(self, eligible):
        self.published = eligible

    def subscribe(self, cb):
        self.callbacks.append(cb)

    def health(self):
        return Health(True, "fake", {})

    def held(self):
        self.holding, self.written = True, self.published

    def landed(self):
        self.holding = False
        for cb in self.callbacks:
            cb()

    def change(self, live=None, eligible=None):
        if live is not None:
            self.live = frozenset(live)
        if eligible is not None:
            self.peer_eligible = dict(eligible)
        for cb in self.callbacks:
            cb()


class FakeResponder:
    def __init__(self):
        self.owned = frozenset()
        self.history = []
        self.counters = Counter()
        self.error = ""

    def start(self):
        pass

    def stop(self):
        self.set_owned(set())

    def set_owned(self, addresses):
        new = frozenset(addresses)
        taken, dropped = set(new - self.owned), set(self.owned - new)
        self.owned = new
        if taken or dropped:
            self.history.append(new)
        return taken, dropped

    def health(self):
        return (not self.error, self.error, {})


class FakeDrops:
    def __init__(self):
        self.addresses = frozenset()
        self.installed = False
        self.fail = False
        self.removed = False

    def update(self, addrs):
        if self.fail:
            raise RuntimeError("nft: boom")
        self.addresses = frozenset(addrs)
        self.installed = True

    def dropped(self):
        return 7

    def remove(self):
        self.removed = True


def lb(name, address, *, local=False, backends=(("10.244.0.5", "node1", True),), ftype=FrontendType.LOAD_BALANCER, labels=()):
    bes = tuple(Backend(a, 8080, BackendState.ACTIVE, node_name=n, local=n == ME) for a, n, _ in backends if _)
    bes += tuple(Backend(a, 8080, BackendState.TERMINATING, node_name=n, local=n == ME) for a, n, ok in backends if not ok)
    fe = Frontend(ftype, address, 443, Protocol.TCP, bes, external_local=local)
    return Service(ServiceKey("default", name), (fe,), labels=tuple(labels))



@pytest.fixture
def make():
    started = []

    def _make(extra="", membership=None, drops=None, node_addresses=("192.168.1.1",)):
        text = f"plugins:\n  announce_arp: {{enabled: true, interfaces: [lo]{extra}}}\n"
        cfg = parse_config(text)
        section = AnnounceARPConfig.model_validate(cfg.plugin_raw("announce_arp"))
        ctx = PluginContext("announce_arp", NodeInfo(ME, node_addresses), logging.getLogger("t"), cfg, None)
        m = membership or FakeMembership()
        r = FakeResponder()
        d = drops or FakeDrops()
        p = AnnounceARP(membership_factory=lambda c, x: m, responder_factory=lambda c: r, droprules_factory=lambda c: d,
                        bpf_factory=lambda c, x: None)
        p.kpr_configure(config=section, context=ctx)
        p.kpr_start(context=ctx)
        started.append((p, ctx))
        return p, m, r, d

    yield _make
    for p, ctx in started:
        p.kpr_stop(context=ctx)


def test_nothing_is_announced_before_sync_complete(make):
    p, m, r, _ = make()
    p.kpr_service_upsert(service=lb("a", "10.0.100.10"))
    time.sleep(0.2)
    assert r.owned == frozenset() and m.published is None
    p.kpr_sync_complete()
    wait_for(lambda: r.owned == {"10.0.100.10"}, what="owned after sync")
    assert m.published == {"10.0.100.10"}


def test_only_addresses_this_node_ranks_first_for(make):
    addrs = [f"10.0.100.{i}" for i in range(1, 41)]
    peers = {"node2": set(addrs), "node3": set(addrs)}
    p, m, r, _ = make(membership=FakeMembership(live=(ME, "node2", "node3"), eligible=peers))
    for i, a in enumerate(addrs):
        p.kpr_service_upsert(service=lb(f"s{i}", a))
    p.kpr_sync_complete()
    expected = {a for a in addrs if ownership.rank(a, [ME, "node2", "node3"])[0] == ME}
    assert 0 < len(expected) < len(addrs)
    wait_for(lambda: r.owned == expected, what="rank-first addresses")
    # node2 dies: node1 takes exactly those node2 owned and ranks it second for
    m.change(live=(ME, "node3"))
    expected2 = {a for a in addrs if ownership.rank(a, [ME, "node3"])[0] == ME}
    wait_for(lambda: r.owned == expected2, what="takeover")
    assert expected <= expected2
    # node2 returns: ownership is what it was
    m.change(live=(ME, "node2", "node3"))
    wait_for(lambda: r.owned == expected, what="return")


def test_losing_an_address_stops_answering_at_once(make):
    addr = "10.0.100.10"
    rival = next(n for n in (f"n{i}" for i in range(100)) if ownership.rank(addr, [ME, n])[0] == n)
    p, m, r, _ = make(membership=FakeMembership(live=(ME,)))
    p.kpr_service_upsert(service=lb("a", addr))
    p.kpr_sync_complete()
    wait_for(lambda: r.owned == {addr}, what="owned")
    # "At once" without a clock (a loaded machine is slow to wake any thread): the first
    # decision that knows the rival is live gives the address up, no hold-down, no later pass.
    plans = []
    plan = p.plan
    p.plan = lambda: plans.append(pl := plan()) or pl
    # The rival's eligibility before its liveness: a pass that sees it live sees both.
    m.change(eligible={rival: {addr}})
    m.change(live=(ME, rival))
    wait_for(lambda: r.owned == frozenset(), what="released")
    first = next(pl for pl in plans if rival in pl.live)
    assert first.owned == frozenset(), first
    # the rival is live but not eligible (eTP=Local without endpoints there): ours again
    m.change(eligible={rival: set()})
    wait_for(lambda: r.owned == {addr}, what="back")


def test_an_address_coming_back_is_taken_once_peers_can_know(make):
    """This node ranks first for addr but was not eligible (eTP=Local, no local endpoint): the
    rival holds it. When a local endpoint comes, the node takes addr only once its eligibility
    has reached its peers (the Lease membership: written to the API server), so the two never
    both answer while the rival cannot know; it gives addr up at once when no longer eligible."""
    addr = "10.0.100.10"
    rival = next(n for n in (f"n{i}" for i in range(100)) if ownership.rank(addr, [ME, n])[0] == ME)
    elsewhere = (("10.244.1.5", rival, True),)
    here = (("10.244.0.5", ME, True),)
    p, m, r, _ = make(membership=FakeMembership(live=(ME, rival), eligible={rival: {addr}}))
    p.kpr_service_upsert(service=lb("a", addr, local=True, backends=elsewhere))
    p.kpr_sync_complete()
    wait_for(lambda: p._plan.owners.get(addr) == rival, what="the rival owns it")
    m.held()  # the write that would tell the rival does not land
    p.kpr_service_upsert(service=lb("a", addr, local=True, backends=here))
    wait_for(lambda: addr in p._plan.eligible_here, what="the plan with the local endpoint applied")
    assert r.owned == frozenset() and p._plan.owners[addr] == rival
    m.landed()
    wait_for(lambda: r.owned == {addr}, what="taken once the rival can know")
    m.held()
    p.kpr_service_upsert(service=lb("a", addr, local=True, backends=elsewhere))
    wait_for(lambda: addr not in p._plan.eligible_here, what="the plan without the local endpoint applied")
    assert r.owned == frozenset(), "given up at once, before its peers know"


def test_a_starting_node_waits_for_peers_still_loading(make):
    addr = "10.0.100.10"
    # A hold far longer than the test: only node2's publication can end it (with a short one a
    # loaded machine let it run out first, and the node decided without node2)
    p, m, r, _ = make(extra=", peerSyncTimeout: 600", membership=FakeMembership(live=(ME, "node2")))
    p.kpr_service_upsert(service=lb("a", addr))
    p.kpr_sync_complete()
    wait_for(lambda: p.kpr_status().message == "waiting for peers to sync: node2", what="waiting")
    assert m.published == {addr} and r.owned == frozenset()
    # node2 publishes: ownership follows the ranking at once, no claim-then-release
    m.change(eligible={"node2": {addr}})
    expected = {addr} if ownership.rank(addr, [ME, "node2"])[0] == ME else set()
    wait_for(lambda: p._plan.owners == {addr: ownership.rank(addr, [ME, "node2"])[0]}, what="decided")
    assert r.owned == expected and len(r.history) <= 1


def test_the_wait_for_peers_is_bounded(make):
    p, m, r, _ = make(extra=", peerSyncTimeout: 0.3", membership=FakeMembership(live=(ME, "node2")))
    p.kpr_service_upsert(service=lb("a", "10.0.100.10"))
    p.kpr_sync_complete()
    # The responder takes the address a moment before the plan it acted on is kept: wait for
    # the plan, which holds the claim and the (empty) wait list together.
    wait_for(lambda: p._plan.owned == {"10.0.100.10"}, what="claimed after the hold")
    assert p._plan.waiting_for == () and r.owned == {"10.0.100.10"}


def test_local_policy_needs_a_ready_local_endpoint(make):
    p, m, r, _ = make(membership=FakeMembership(live=(ME, "node2"), eligible={"node2": {"10.0.100.10"}}))
    p.kpr_service_upsert(service=lb("a", "10.0.100.10", local=True, backends=(("10.244.2.5", "node2", True), ("10.244.0.5", ME, False))))
    p.kpr_sync_complete()
    wait_for(lambda: m.published == frozenset(), what="published")
    time.sleep(0.1)
    assert r.owned == frozenset()
    # a ready endpoint arrives here and node2 loses its own
    p.kpr_service_upsert(service=lb("a", "10.0.100.10", local=True, backends=(("10.244.0.5", ME, True),)))
    m.change(eligible={"node2": set()})
    wait_for(lambda: r.owned == {"10.0.100.10"}, what="owned once eligible")
    assert m.published == {"10.0.100.10"}


def test_cluster_policy_needs_a_ready_endpoint_somewhere(make):
    p, m, r, _ = make()
    p.kpr_service_upsert(service=lb("a", "10.0.100.10", backends=(("10.244.2.5", "node2", True),)))
    p.kpr_service_upsert(service=lb("b", "10.0.100.11", backends=()))
    p.kpr_service_upsert(service=lb("c", "10.0.100.12", backends=(("10.244.2.6", "node2", False),)))
    p.kpr_sync_complete()
    wait_for(lambda: r.owned == {"10.0.100.10"}, what="owned")
    # the plan is recorded just after the responder took the address: wait for it too
    wait_for(lambda: p._plan.owned == {"10.0.100.10"}, what="plan recorded")
    assert p._plan.known == {"10.0.100.10", "10.0.100.11", "10.0.100.12"}


def test_what_is_never_announced(make):
    p, m, r, _ = make(extra=", serviceSelector: {announce: 'yes'}", node_addresses=("10.0.100.20",))
    sel = (("announce", "yes"),)
    p.kpr_service_upsert(service=lb("lb", "10.0.100.10", labels=sel))
    p.kpr_service_upsert(service=lb("ext", "10.0.100.11", ftype=FrontendType.EXTERNAL_IP, labels=sel))
    p.kpr_service_upsert(service=lb("cip", "10.96.0.10", ftype=FrontendType.CLUSTER_IP, labels=sel))
    p.kpr_service_upsert(service=lb("np", "10.0.100.30", ftype=FrontendType.NODE_PORT, labels=sel))
    p.kpr_service_upsert(service=lb("unlabelled", "10.0.100.12"))
    p.kpr_service_upsert(service=lb("nodeaddr", "10.0.100.20", ftype=FrontendType.EXTERNAL_IP, labels=sel))
    p.kpr_sync_complete()
    wait_for(lambda: r.owned == {"10.0.100.10", "10.0.100.11"}, what="owned")
    p.kpr_service_delete(key=ServiceKey("default", "ext"))
    wait_for(lambda: r.owned == {"10.0.100.10"}, what="deleted")


def test_drop_rules_fail_closed_and_recover(make):
    drops = FakeDrops()
    drops.fail = True
    p, m, r, d = make(drops=drops)
    assert p.drop is True
    p.kpr_service_upsert(service=lb("a", "10.0.100.10"))
    p.kpr_sync_complete()
    wait_for(lambda: not p.kpr_status().healthy, what="unhealthy")
    st = p.kpr_status()
    assert "drop rules: nft: boom" in st.message and "retrying" in st.message
    assert r.owned == frozenset()
    drops.fail = False
    # The next try is the backoff's delay away, which grows with each failure while this test
    # waits its turn on a loaded machine (up to 30 s, plus the control loop's 1 s tick)
    wait_for(lambda: r.owned == {"10.0.100.10"}, timeout=40, what="recovered")
    assert d.addresses == {"10.0.100.10"}
    wait_for(lambda: p.kpr_status().healthy, what="healthy")


def test_status_reports_responder_problems(make):
    p, m, r, _ = make(extra=", dropUnserved: false")
    p.kpr_sync_complete()
    wait_for(lambda: p.kpr_status().message.startswith("owns 0 of 0"), what="status")
    r.error = "interface lo: cannot open packet socket: OSError: boom; retrying in 0.4s"
    st = p.kpr_status()
    assert st.healthy is False and "cannot open packet socket" in st.message


def test_stop_releases_and_removes_the_table(make):
    p, m, r, d = make()
    p.kpr_service_upsert(service=lb("a", "10.0.100.10"))
    p.kpr_sync_complete()
    wait_for(lambda: r.owned == {"10.0.100.10"}, what="owned")
    p.kpr_stop(context=p.context)
    assert r.owned == frozenset() and d.removed


# --- frames -----------------------------------------------------------------------------


def arp_request(target, src_ip="10.0.0.254", src_mac=ASKER):
    return bytes(Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=src_mac, psrc=src_ip, pdst=target))


def ns(target, src="fd00::fe", hlim=255):
    dst = "ff02::1:ff00:10"
    pkt = Ether(src=ASKER, dst="33:33:ff:00:00:10") / IPv6(src=src, dst=dst, hlim=hlim) / ICMPv6ND_NS(tgt=target)
    if src != "::":
        pkt = pkt / ICMPv6NDOptSrcLLAddr(lladdr=ASKER)
    return bytes(pkt)


def test_arp_reply_uses_the_interface_mac_and_checks_ownership_every_time():
    a = Answerer(MAC)
    kind, reply, target = a.answer(arp_request("10.0.100.10"), frozenset({"10.0.100.10"}))
    assert (kind, target) == ("arp", "10.0.100.10")
    pkt = Ether(reply)
    assert (pkt.src, pkt.dst) == (MAC, ASKER)
    assert (pkt[ARP].op, pkt[ARP].hwsrc, pkt[ARP].psrc, pkt[ARP].hwdst, pkt[ARP].pdst) == (2, MAC, "10.0.100.10", ASKER, "10.0.0.254")
    # the same request again, cached, after the address was lost
    assert a.answer(arp_request("10.0.100.10"), frozenset()) == ("not_owned", None, "10.0.100.10")
    assert a.answer(arp_request("10.0.100.11"), frozenset({"10.0.100.10"}))[0] == "not_owned"


def test_arp_frames_that_are_not_answered():
    a = Answerer(MAC)
    owned = frozenset({"10.0.100.10"})
    # someone else announcing our address: a conflict, not answered
    assert a.answer(arp_request("10.0.100.10", src_ip="10.0.100.10"), owned)[0] == "gratuitous"
    # ...and only then: another node announcing an address we do not hold is its business
    assert a.answer(arp_request("10.0.100.10", src_ip="10.0.100.10"), frozenset())[0] == "ignored"
    # our own frames
    assert a.answer(arp_request("10.0.100.10", src_mac=MAC), owned)[0] == "ignored"
    reply = bytes(Ether(src=ASKER, dst=MAC) / ARP(op=2, hwsrc=ASKER, psrc="10.0.0.254", pdst="10.0.100.10"))
    assert a.answer(reply, owned)[0] == "ignored"
    assert a.answer(b"\x00" * 14, owned)[0] == "ignored"


def test_neighbour_advertisement_for_a_solicitation():
    a = Answerer(MAC)
    kind, reply, target = a.answer(ns("fd00:100::10"), frozenset({"fd00:100::10"}))
    assert (kind, target) == ("na", "fd00:100::10")
    pkt = Ether(reply)
    assert (pkt.src, pkt.dst, pkt[IPv6].src, pkt[IPv6].dst, pkt[IPv6].hlim) == (MAC, ASKER, "fd00:100::10", "fd00::fe", 255)
    na = pkt[ICMPv6ND_NA]
    assert (na.tgt, na.S, na.O, na.R) == ("fd00:100::10", 1, 1, 0)
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == MAC
    # duplicate address detection is defended to all nodes
    pkt = Ether(a.answer(ns("fd00:100::10", src="::"), frozenset({"fd00:100::10"}))[1])
    assert (pkt.dst, pkt[IPv6].dst, pkt[ICMPv6ND_NA].S) == ("33:33:00:00:00:01", "ff02::1", 0)
    # hop limit below 255: crossed a router, ignored
    assert a.answer(ns("fd00:100::10", hlim=64), frozenset({"fd00:100::10"}))[0] == "ignored"
    assert a.answer(ns("fd00:100::11"), frozenset({"fd00:100::10"}))[0] == "not_owned"


def test_gratuitous_frames():
    req, rep = (Ether(f) for f in garp_frames("10.0.100.10", MAC))
    assert req.dst == rep.dst == "ff:ff:ff:ff:ff:ff"
    assert (req[ARP].op, req[ARP].psrc, req[ARP].pdst, req[ARP].hwsrc) == (1, "10.0.100.10", "10.0.100.10", MAC)
    # Linux takes a gratuitous reply only with target MAC = sender MAC
    assert (rep[ARP].op, rep[ARP].psrc, rep[ARP].pdst, rep[ARP].hwsrc, rep[ARP].hwdst) == (2, "10.0.100.10", "10.0.100.10", MAC, MAC)
    (na,) = (Ether(f) for f in garp_frames("fd00:100::10", MAC))
    assert (na.dst, na[IPv6].dst, na[IPv6].hlim) == ("33:33:00:00:00:01", "ff02::1", 255)
    assert (na[ICMPv6ND_NA].tgt, na[ICMPv6ND_NA].O, na[ICMPv6ND_NA].S) == ("fd00:100::10", 1, 0)
    assert na[ICMPv6NDOptDstLLAddr].lladdr == MAC


def test_cache_is_bounded():
    a = Answerer(MAC, size=8)
    for i in range(20):
        a.answer(arp_request("10.0.100.10", src_ip=f"10.0.0.{i + 1}"), frozenset())
    assert len(a._cache) == 8


def test_kernel_filter_passes_owned_targets_only():
    from scapy.arch.common import compile_filter

    from kpr.plugins.announce_arp.responder import NOTHING, filter_for

    assert filter_for(set()) == NOTHING
    f = filter_for({"10.0.100.10", "fd00:100::10"})
    assert "arp dst host 10.0.100.10" in f
    assert "ip6[48:4] = 0xfd000100 and ip6[52:4] = 0x00000000 and ip6[56:4] = 0x00000000 and ip6[60:4] = 0x00000010" in f
    # a thousand addresses of each family still compile into one program
    many = {f"10.1.{i // 250}.{i % 250}" for i in range(1000)} | {f"fd00::{i:x}" for i in range(1000)}
    assert compile_filter(filter_for(many), linktype=1).bf_len < 4096


class _FakeSock:
    def __init__(self):
        self.sent = []
        self.outs = self

    def send(self, frame):
        self.sent.append((time.monotonic(), frame))


def _announcer(**kw):
    import threading

    from kpr.plugins.announce_arp.responder import Responder

    r = Responder(["fake0"], **kw)
    port = r.ports["fake0"]
    port.sock, port.mac = _FakeSock(), MAC
    t = threading.Thread(target=r._announce_loop, daemon=True)
    t.start()
    return r, port.sock, t


def _stop_announcer(r, t):
    r._stop.set()
    with r._due_cv:
        r._due_cv.notify_all()
    t.join(2)


def test_taking_an_address_announces_it_garp_repeat_times():
    r, sock, t = _announcer(garp_repeat=3, garp_spacing=0.05)
    try:
        taken, dropped = r.set_owned({"10.0.100.10", "fd00:100::10"})
        assert taken == {"10.0.100.10", "fd00:100::10"} and dropped == set()
        wait_for(lambda: len(sock.sent) >= 9, what="announcements")
        time.sleep(0.2)
        frames = [Ether(f) for _, f in sock.sent]
        arp = [f for f in frames if ARP in f]
        na = [f for f in frames if ICMPv6ND_NA in f]
        # each repeat: a request and a reply (target MAC = sender MAC) for v4, one NA for v6
        assert len(arp) == 6 and sorted(f[ARP].op for f in arp) == [1, 1, 1, 2, 2, 2]
        assert len(na) == 3 and all(f[ICMPv6ND_NA].O == 1 for f in na)
        times = sorted(ts for ts, f in sock.sent if ARP in Ether(f) and Ether(f)[ARP].op == 1)
        assert times[2] - times[0] >= 0.09  # spaced garpSpacing apart
        # the counter moves after each send returns: wait for it, then none beyond the nine
        wait_for(lambda: r.counters["garp_sent"] >= 9, what="nine counted")
        assert r.counters["garp_sent"] == 9
    finally:
        _stop_announcer(r, t)


def test_a_dropped_address_is_no_longer_announced_and_periodic_announcements():
    r, sock, t = _announcer(garp_repeat=5, garp_spacing=0.1, garp_interval=0.3)
    try:
        r.set_owned({"10.0.100.10"})
        wait_for(lambda: len(sock.sent) >= 2, what="first announcement")
        r.set_owned(set())
        n = len(sock.sent)
        time.sleep(0.5)
        assert len(sock.sent) <= n + 2  # at most one send already under way
        r.set_owned({"10.0.100.11"})
        wait_for(lambda: any(ARP in Ether(f) and Ether(f)[ARP].psrc == "10.0.100.11" for _, f in sock.sent), what="new")
        # after the repeats are done, garpInterval keeps announcing it (waited for: a loaded
        # machine may take longer than the 0.8 s the repeats and one interval need)
        def late():
            return [ts for ts, f in sock.sent if Ether(f)[ARP].psrc == "10.0.100.11"]
        wait_for(lambda: len(late()) >= 2 * 5 + 2, 10, "the repeats and a periodic announcement", show=lambda: len(late()))
        assert all(Ether(f)[ARP].psrc != "10.0.100.10" for ts, f in sock.sent if ts > time.monotonic() - 0.9)
    finally:
        _stop_announcer(r, t)
