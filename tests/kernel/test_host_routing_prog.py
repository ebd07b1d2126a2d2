"""host_routing's programs decision by decision, with BPF_PROG_TEST_RUN (Katran-style fixtures:
description, input packet, expected verdict, expected output, and the counter that must move).

The runs happen inside a namespace shaped like a node (host_routing_env.prog_lab: an external
veth "eth0", one pod on a veth with a /32 route, a vxlan overlay to another node's pods,
permanent neighbour entries), so the programs' FIB lookups see real routes. The kernel does not
carry out a redirect in a test run: the verdict and the rewritten frame (MACs, TTL, NAT) are
what is checked; end to end delivery is test_host_routing.py's.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from kpr.bpf import maps as M
from kpr.plugins.host_routing import datapath as D
from kpr.testing.prog_run import TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, Case

from host_routing_env import (CIP, CIP_EMPTY, FAR4, MAC_OUT, MAC_POD, NODE4, OUT4, OUT6, POD4, POD6, REMOTE4,
                              REMOTE6, Lab, prog_lab)

pytestmark = pytest.mark.kernel

@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[Lab]:
    with prog_lab("kpr-hr-prog") as lab:
        yield lab


def test_struct_packers_match_the_c_structs(lab: Lab) -> None:
    t = lab.dp.bpf
    for name, key, leaf in (("kpr_hr_pods", M.KprAddr, D.POD), ("kpr_hr_devs", ctypes.c_uint32, D.DEV)):
        table = t[name.encode()]
        assert ctypes.sizeof(table.Key) == ctypes.sizeof(key), name
        assert ctypes.sizeof(table.Leaf) == leaf.size, name
    assert len(D.STATS) == len(t[b"kpr_hr_stats"]), "STATS mirrors KPR_HR_ST_MAX"


def from_out(lab: Lab) -> Ether:
    return Ether(src=MAC_OUT, dst=lab.mac)


def from_pod(lab: Lab) -> Ether:
    return Ether(src=MAC_POD, dst=lab.lxc_mac)


def tcp4(src: str, dst: str, ttl: int = 64, **ip: Any) -> IP:
    return IP(src=src, dst=dst, ttl=ttl, **ip) / TCP(sport=40000, dport=8080, flags="S") / Raw(b"kpr")


def same(pkt: Any) -> bytes:
    return bytes(pkt)


def into_pod(lab: Lab, l3: Any) -> Ether:
    """The frame as delivered into the pod: the route's MACs, one hop less."""
    out = Ether(src=lab.lxc_mac, dst=MAC_POD) / l3.copy()
    if IP in out:
        out[IP].ttl -= 1
        del out[IP].chksum
    else:
        out[IPv6].hlim -= 1
    return Ether(bytes(out))


def ext_cases(lab: Lab) -> list[tuple[Case, str]]:
    v6 = IPv6(src=OUT6, dst=POD6, hlim=64) / TCP(sport=40000, dport=8080, flags="S") / Raw(b"kpr")
    return [
        (Case("ARP is the stack's", p := from_out(lab) / ARP(psrc=OUT4, pdst=NODE4), TC_ACT_UNSPEC, same(p)),
         "pass_not_ip"),
        (Case("for the node itself", p := from_out(lab) / tcp4(OUT4, NODE4), TC_ACT_UNSPEC, same(p)), "pass_not_pod"),
        (Case("IPv4 to a pod: bpf_redirect_peer with the route's MACs, TTL - 1",
              from_out(lab) / tcp4(OUT4, POD4), TC_ACT_REDIRECT, into_pod(lab, tcp4(OUT4, POD4))), "redirect_peer"),
        (Case("IPv6 to a pod: bpf_redirect_peer, hop limit - 1", from_out(lab) / v6, TC_ACT_REDIRECT, into_pod(lab, v6)),
         "redirect_peer"),
        (Case("a fragment to a pod is the stack's", p := from_out(lab) / tcp4(OUT4, POD4, flags="MF"), TC_ACT_UNSPEC,
              same(p)), "pass_fragment"),
        (Case("IPv4 options (a DSR frontend, say) are the stack's",
              p := from_out(lab) / tcp4(OUT4, POD4, options=[IPOption(b"\x9a\x08" + bytes(6))]), TC_ACT_UNSPEC, same(p)),
         "pass_ip_options"),
        (Case("an IPv6 extension header is the stack's",
              p := from_out(lab) / IPv6(src=OUT6, dst=POD6) / IPv6ExtHdrDestOpt() / TCP(dport=8080), TC_ACT_UNSPEC,
              same(p)), "pass_ip_options"),
        (Case("TTL 1 to a pod: the stack sends time exceeded", p := from_out(lab) / tcp4(OUT4, POD4, ttl=1),
              TC_ACT_UNSPEC, same(p)), "pass_ttl"),
        (Case("to another node's pod (behind the overlay): not local, the stack's",
              p := from_out(lab) / tcp4(OUT4, REMOTE4), TC_ACT_UNSPEC, same(p)), "pass_not_pod"),
        (Case("multicast is the stack's", p := from_out(lab) / IP(src=OUT4, dst="224.0.0.5") / UDP(dport=5000),
              TC_ACT_UNSPEC, same(p)), "pass_local"),
    ]


@pytest.mark.parametrize("i", range(10))
def test_from_netdev(lab: Lab, i: int) -> None:
    case, counter = ext_cases(lab)[i]
    lab.run(D.FROM_NETDEV, lab.eth0, case, counter)


def pod_cases(lab: Lab) -> list[tuple[Case, str]]:
    def leaves(dst: str, dport: int = 8080) -> Any:
        def check(out: Ether) -> None:
            assert out[IP].dst == dst and out[TCP].dport == dport and out[IP].ttl == 63, out.summary()
            assert out[IP].src == POD4 and out.src == MAC_POD  # MACs are bpf_redirect_neigh's to fill
        return check

    return [
        (Case("pod to the outside: bpf_redirect_neigh", from_pod(lab) / tcp4(POD4, FAR4), TC_ACT_REDIRECT,
              leaves(FAR4)), "redirect_neigh"),
        (Case("pod to the node: the stack's", p := from_pod(lab) / tcp4(POD4, NODE4), TC_ACT_UNSPEC, same(p)),
         "pass_local"),
        (Case("a source that is no known pod: the stack's", p := from_pod(lab) / tcp4("10.244.1.99", FAR4),
              TC_ACT_UNSPEC, same(p)), "pass_not_pod"),
        (Case("pod to a ClusterIP: DNAT to the backend, then out",
              from_pod(lab) / IP(src=POD4, dst=CIP) / TCP(sport=40100, dport=80, flags="S") / Raw(b"kpr"),
              TC_ACT_REDIRECT, leaves(FAR4)), "service_new"),
        (Case("pod to another node's pod behind the vxlan device: bpf_redirect_neigh into the overlay",
              from_pod(lab) / tcp4(POD4, REMOTE4), TC_ACT_REDIRECT, leaves(REMOTE4)), "redirect_neigh_overlay"),
        (Case("IPv6 over the overlay likewise, hop limit - 1",
              from_pod(lab) / IPv6(src=POD6, dst=REMOTE6, hlim=64) / TCP(sport=40000, dport=8080, flags="S"),
              TC_ACT_REDIRECT, lambda out: (out[IPv6].dst, out[IPv6].hlim) == (REMOTE6, 63) or pytest.fail(out.summary())),
         "redirect_neigh_overlay"),
        (Case("pod to a ClusterIP without backends: dropped", from_pod(lab) / IP(src=POD4, dst=CIP_EMPTY) / TCP(dport=80),
              TC_ACT_SHOT, None, check_checksums=False), "drop_no_backend"),
    ]


@pytest.mark.parametrize("i", range(7))
def test_from_pod(lab: Lab, i: int) -> None:
    case, counter = pod_cases(lab)[i]
    lab.run(D.FROM_POD, lab.lxc, case, counter)


def test_reply_of_a_service_flow_is_translated_back(lab: Lab) -> None:
    """The remote backend's reply, arriving on eth0, leaves for the pod with the ClusterIP as source."""
    req = from_pod(lab) / IP(src=POD4, dst=CIP) / TCP(sport=41000, dport=80, flags="S") / Raw(b"kpr")
    lab.run(D.FROM_POD, lab.lxc, Case("request", req, TC_ACT_REDIRECT), "service_new")

    def check(out: Ether) -> None:
        assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (CIP, 80, POD4, 41000), out.summary()
        assert out.dst == MAC_POD

    reply = from_out(lab) / IP(src=FAR4, dst=POD4) / TCP(sport=8080, dport=41000, flags="SA") / Raw(b"kpr")
    lab.run(D.FROM_NETDEV, lab.eth0, Case("reply", reply, TC_ACT_REDIRECT, check), "service_revnat")


def test_replies_are_looked_up_only_once_a_flow_was_made(lab: Lab) -> None:
    """KPR_HR_CT_GATE: until a program made a per-packet flow (kpr_hr_flows), replies skip the
    conntrack lookup: a tracked flow's reply then passes untranslated; the first new flow sets it."""
    flows = lab.dp.bpf.get_table(b"kpr_hr_flows")
    req = from_pod(lab) / IP(src=POD4, dst=CIP) / TCP(sport=41001, dport=80, flags="S") / Raw(b"kpr")
    reply = from_out(lab) / IP(src=FAR4, dst=POD4) / TCP(sport=8080, dport=41001, flags="SA") / Raw(b"kpr")
    lab.run(D.FROM_POD, lab.lxc, Case("request", req, TC_ACT_REDIRECT), "service_new")
    assert flows[flows.Key(0)].value == 1
    flows[flows.Key(0)] = flows.Leaf(0)  # as on a pin path where no flow was made yet
    try:
        lab.run(D.FROM_NETDEV, lab.eth0, Case("not looked up", reply, TC_ACT_REDIRECT, into_pod(lab, reply[IP])),
                "redirect_peer")
        lab.run(D.FROM_POD, lab.lxc, Case("tracked: no new flow, the gate stays", req, TC_ACT_REDIRECT),
                "service_established")
        assert flows[flows.Key(0)].value == 0
    finally:
        flows[flows.Key(0)] = flows.Leaf(1)
    lab.run(D.FROM_NETDEV, lab.eth0, Case("looked up", reply, TC_ACT_REDIRECT), "service_revnat")


def nh_table(lab: Lab) -> Any:
    return lab.dp.bpf.get_table(D.NH_MAP.encode())


def set_next_hop(lab: Lab, addr: str, ifindex: int, dmac: str, smac: str, max_len: int = 1518,
                 gen: int | None = None) -> None:
    """A kpr_hr_nh entry as the programs write it; `gen`: the current generation unless given."""
    table = nh_table(lab)
    leaf = table.Leaf()
    gens = lab.dp.bpf.get_table(D.GEN_MAP.encode())
    leaf.ifindex, leaf.max_len = ifindex, max_len
    leaf.gen = int(gens[gens.Key(0)].value) if gen is None else gen
    ctypes.memmove(leaf.dmac, bytes.fromhex(dmac.replace(":", "")), 6)
    ctypes.memmove(leaf.smac, bytes.fromhex(smac.replace(":", "")), 6)
    table[table.Key.from_buffer_copy(M.addr_to_bytes(addr))] = leaf


def test_next_hop_of_a_pod_is_remembered_and_forgotten(lab: Lab) -> None:
    """The FIB's answer for a pod behind a peer is kept (kpr_hr_nh): the next packet gets the same
    frame without a lookup; flush_next_hops() (every sync) forgets it. Not armed (generation 0,
    KPR_HR_CACHE_FIRST), nothing is kept."""
    lab.dp.flush_next_hops()
    assert lab.dp.next_hops() == {}
    pkt = from_out(lab) / tcp4(OUT4, POD4)
    to_pod = Case("to the pod", pkt, TC_ACT_REDIRECT, into_pod(lab, tcp4(OUT4, POD4)))
    lab.dp.disarm_out()
    lab.run(D.FROM_NETDEV, lab.eth0, to_pod, "redirect_peer")
    assert lab.dp.next_hops() == {}
    lab.dp.bump_out_generation()
    try:
        for _ in range(2):
            lab.run(D.FROM_NETDEV, lab.eth0, to_pod, "redirect_peer")
            assert lab.dp.next_hops() == {POD4: lab.lxc}
        assert lab.dp.flush_next_hops() == 1 and lab.dp.next_hops() == {}
    finally:
        lab.dp.disarm_out()


def test_remembered_next_hop_is_used_only_while_it_holds(lab: Lab) -> None:
    bogus_d, bogus_s = "02:00:00:00:aa:aa", "02:00:00:00:bb:bb"
    l3 = tcp4(OUT4, POD4)
    pkt = from_out(lab) / l3

    def with_macs(dst: str, src: str) -> bytes:
        out = into_pod(lab, l3)
        out.dst, out.src = dst, src
        return bytes(out)

    lab.dp.bump_out_generation()
    try:
        # an entry that holds is used as it is: its MACs, not the FIB's, prove it
        set_next_hop(lab, POD4, lab.lxc, bogus_d, bogus_s)
        lab.run(D.FROM_NETDEV, lab.eth0, Case("entry used", pkt, TC_ACT_REDIRECT, with_macs(bogus_d, bogus_s)),
                "redirect_peer")
        # the pod's route names another device now: the FIB decides, and its answer replaces the entry
        set_next_hop(lab, POD4, lab.eth0, bogus_d, bogus_s)
        lab.run(D.FROM_NETDEV, lab.eth0, Case("entry of another device", pkt, TC_ACT_REDIRECT,
                                              into_pod(lab, l3)), "redirect_peer")
        assert lab.dp.next_hops() == {POD4: lab.lxc}
        # longer than the device's MTU allowed when the entry was made: the FIB decides
        set_next_hop(lab, POD4, lab.lxc, bogus_d, bogus_s, max_len=len(pkt) - 1)
        lab.run(D.FROM_NETDEV, lab.eth0, Case("longer than the entry allows", pkt, TC_ACT_REDIRECT,
                                              into_pod(lab, l3)), "redirect_peer")
        # of an older generation (a sync or a route or neighbour change since): the FIB decides
        set_next_hop(lab, POD4, lab.lxc, bogus_d, bogus_s)
        lab.dp.bump_out_generation()
        lab.run(D.FROM_NETDEV, lab.eth0, Case("of an older generation", pkt, TC_ACT_REDIRECT,
                                              into_pod(lab, l3)), "redirect_peer")
    finally:
        lab.dp.flush_next_hops()
        lab.dp.disarm_out()


def test_an_address_not_a_pods_is_not_remembered(lab: Lab) -> None:
    """A packet from outside to an address that is no local pod's (the node's own, mostly) leaves
    nothing in kpr_hr_nh (an earlier build remembered "not a pod" there for the generation: no
    measured gain, and such entries could push pods' next hops out of the LRU). So an address
    made a pod's in kpr_hr_pods is delivered from its next packet, before the generation moves
    (that build passed it as not a pod's until then)."""
    l3 = tcp4(OUT4, POD4)
    pkt = from_out(lab) / l3
    lab.dp.flush_next_hops()
    lab.dp.set_pods({POD6: lab.lxc})
    try:
        lab.dp.bump_out_generation()  # armed, as the agent's watcher does at start
        node = from_out(lab) / tcp4(OUT4, NODE4)
        for _ in range(2):
            lab.run(D.FROM_NETDEV, lab.eth0, Case("the node's address", node, TC_ACT_UNSPEC, same(node)),
                    "pass_not_pod")
        lab.run(D.FROM_NETDEV, lab.eth0, Case("not a pod's", pkt, TC_ACT_UNSPEC, same(pkt)), "pass_not_pod")
        assert lab.dp.next_hops() == {}
        lab.dp.set_pods({POD4: lab.lxc, POD6: lab.lxc})  # no generation move
        lab.run(D.FROM_NETDEV, lab.eth0, Case("a pod's now", pkt, TC_ACT_REDIRECT, into_pod(lab, l3)),
                "redirect_peer")
        assert lab.dp.next_hops() == {POD4: lab.lxc}
    finally:
        lab.dp.set_pods({POD4: lab.lxc, POD6: lab.lxc})
        lab.dp.flush_next_hops()
        lab.dp.disarm_out()


def test_concurrent_bumps_never_move_the_generation_back(lab: Lab) -> None:
    """The sync's thread and kpr.nexthops' thread both bump kpr_hr_gen: every bump must give a
    generation no other bump gave, and the map must end at the last one. A bump that read the
    value before another's write and wrote after it would hand out a number twice, or (after two
    of the other's) move the generation back, so entries remembered under the older number are
    trusted again (a pod added meanwhile then passed to the stack, a remembered route out used
    for what became a local pod)."""
    import sys

    per_thread, got = 5000, [[], []]
    lab.dp.disarm_out()
    first = lab.dp.bump_out_generation()
    go = threading.Barrier(2)

    def bumps(out: list[int]) -> None:
        go.wait()
        out.extend(lab.dp.bump_out_generation() for _ in range(per_thread))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over between the read and the write as often as it can
    try:
        threads = [threading.Thread(target=bumps, args=(out,)) for out in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
        now = int(lab.dp.bpf[b"kpr_hr_gen"][ctypes.c_uint32(0)].value)
        lab.dp.disarm_out()
    handed = got[0] + got[1]
    assert len(handed) == 2 * per_thread and len(set(handed)) == len(handed), "a generation handed out twice"
    assert now == max(handed) == first + 2 * per_thread


def out_of_node(out: Ether) -> None:
    """A pod's packet to FAR4 as bpf_redirect_neigh takes it: one hop less, MACs still the pod's."""
    assert out[IP].dst == FAR4 and out[IP].ttl == 63 and out.src == MAC_POD, out.summary()


def out_with_macs(lab: Lab) -> Any:
    """A pod's packet to FAR4 by a remembered route (KPR_HR_OUT_CACHE 2): one hop less, the MACs
    of eth0 and of the next hop (OUT4) as the FIB gave them when the route was remembered."""
    def check(out: Ether) -> None:
        assert out[IP].dst == FAR4 and out[IP].ttl == 63, out.summary()
        assert (out.src, out.dst) == (lab.mac, MAC_OUT), out.summary()
    return check


@pytest.fixture(scope="module")
def macs_lab(require_kernel: None) -> Iterator[Lab]:
    """The lab with KPR_HR_OUT_CACHE=2: remembered routes out of the node keep their MACs."""
    with prog_lab("kpr-hr-prog-macs", extra_cflags=("-DKPR_HR_OUT_CACHE=2",)) as lab:
        yield lab


@pytest.fixture(scope="module", params=[1, 0], ids=["cache-first", "pods-first"])
def nocip_lab(request: Any, require_kernel: None) -> Iterator[tuple[Lab, int]]:
    """The lab built without per-packet services (clusterIP: false), with KPR_HR_CACHE_FIRST on and off."""
    flags = ("-DKPR_HR_CLUSTER_IP=0", f"-DKPR_HR_CACHE_FIRST={request.param}")
    with prog_lab(f"kpr-hr-prog-nocip{request.param}", extra_cflags=flags) as lab:
        yield lab, request.param


def test_without_cluster_ip_a_remembered_route_holds_until_the_pods_sync(nocip_lab: tuple[Lab, int]) -> None:
    """KPR_HR_CACHE_FIRST: a packet into a pod looks its remembered next hop (kpr_hr_nh) up
    before kpr_hr_pods, and without per-packet services a pod's packet its remembered route
    (kpr_hr_out): one hash lookup less per packet each way; proof: a pod taken out of
    kpr_hr_pods without a generation move still has both used, where the build without the
    switch passes its packets as not a pod's. They hold no longer than that: the entries were
    made for a known pod (on this device), and the plugin's sync moves the generation right
    after every kpr_hr_pods change, so a pod gone misses from its next packet each way, and a
    route is not used from another device."""
    lab, first = nocip_lab
    pkt = from_pod(lab) / tcp4(POD4, FAR4)
    send = Case("pod to the outside", pkt, TC_ACT_REDIRECT, out_of_node)
    lab.dp.bump_out_generation()
    try:
        lab.run(D.FROM_POD, lab.lxc, send, "redirect_neigh")  # the FIB's, remembered
        lab.run(D.FROM_POD, lab.lxc, send, "out_route_cached")
        into = from_out(lab) / tcp4(OUT4, POD4)
        to_pod = Case("outside to the pod", into, TC_ACT_REDIRECT, into_pod(lab, tcp4(OUT4, POD4)))
        lab.run(D.FROM_NETDEV, lab.eth0, to_pod, "redirect_peer")  # the FIB's, remembered (kpr_hr_nh)
        lab.dp.set_pods({})  # no generation move yet: only the switch tells the builds apart
        if first:
            lab.run(D.FROM_POD, lab.lxc, send, "out_route_cached")
            lab.run(D.FROM_NETDEV, lab.eth0, to_pod, "redirect_peer")
        else:
            lab.run(D.FROM_POD, lab.lxc, Case("pods first", pkt, TC_ACT_UNSPEC, same(pkt)), "pass_not_pod")
            lab.run(D.FROM_NETDEV, lab.eth0, Case("pods first", into, TC_ACT_UNSPEC, same(into)), "pass_not_pod")
        lab.dp.bump_out_generation()  # as the sync does right after kpr_hr_pods
        lab.run(D.FROM_NETDEV, lab.eth0, Case("the pod gone", into, TC_ACT_UNSPEC, same(into)), "pass_not_pod")
        lab.dp.set_pods({POD4: lab.lxc, POD6: lab.lxc})
        # from eth0 the FIB's route leaves by the device the packet came in on: the stack's
        lab.run(D.FROM_POD, lab.eth0, Case("the pair from another device", pkt, TC_ACT_UNSPEC, same(pkt)),
                "pass_fib")
        lab.dp.set_pods({})
        lab.dp.bump_out_generation()  # as the sync does right after kpr_hr_pods
        lab.run(D.FROM_POD, lab.lxc, Case("the pod gone", pkt, TC_ACT_UNSPEC, same(pkt)), "pass_not_pod")
    finally:
        lab.dp.set_pods({POD4: lab.lxc, POD6: lab.lxc})
        lab.dp.disarm_out()


def test_a_generation_after_a_disarm_trusts_nothing_remembered_before(nocip_lab: tuple[Lab, int]) -> None:
    """disarm_out (generation 0) and a later bump: the new generation is one the load never used,
    so routes and next hops remembered before the disarm are looked up again (a bump from 0 to
    1 revived every entry of an earlier generation 1)."""
    lab, _first = nocip_lab
    pkt = from_pod(lab) / tcp4(POD4, FAR4)
    send = Case("pod to the outside", pkt, TC_ACT_REDIRECT, out_of_node)
    lab.dp.disarm_out()
    try:
        lab.dp.bump_out_generation()
        lab.run(D.FROM_POD, lab.lxc, send, "redirect_neigh")  # remembered in this generation
        assert lab.dp.out_routes() == {(POD4, FAR4): lab.eth0}
        lab.dp.disarm_out()
        lab.dp.bump_out_generation()
        assert lab.dp.out_routes() == {}, "an entry of a generation before the disarm is trusted again"
    finally:
        lab.dp.disarm_out()


def test_a_bridge_ports_remembered_route_waits_for_the_switched_frame_check(nocip_lab: tuple[Lab, int]) -> None:
    """A bridge port's pods route through the bridge: only their frames to the bridge's MAC are
    routed, the rest is switched. Their remembered route out (kpr_hr_out, marked l2) is
    therefore not used ahead of that check (KPR_HR_CACHE_FIRST's first lookup): a frame of the
    same pair to another MAC is left to the bridge, in both builds."""
    lab, _first = nocip_lab
    devs = lab.dp.maps[D.DEVS_MAP]
    key = M.U32.pack(lab.lxc)
    saved = devs.lookup(key)
    kind = D.DEV.unpack(saved)[1]
    gw = lab.lxc_mac  # the frames from_pod() makes are to the bridge
    devs.update(key, D.DEV.pack(D.DEV_F_POD | D.DEV_F_L2, kind, bytes.fromhex(gw.replace(":", "")), 0))
    lab.dp.set_pods({POD4: 4242, POD6: 4242})  # their route names the bridge (another device)
    lab.dp.bump_out_generation()
    routed = from_pod(lab) / tcp4(POD4, FAR4)
    switched = Ether(src=MAC_POD, dst="02:00:00:00:09:09") / tcp4(POD4, FAR4)
    try:
        lab.run(D.FROM_POD, lab.lxc, Case("to the bridge: routed", routed, TC_ACT_REDIRECT, out_of_node),
                "redirect_neigh")
        lab.run(D.FROM_POD, lab.lxc, Case("to the bridge again: remembered", routed, TC_ACT_REDIRECT, out_of_node),
                "out_route_cached")
        lab.run(D.FROM_POD, lab.lxc, Case("to another MAC: switched", switched, TC_ACT_UNSPEC, same(switched)),
                "pass_switched")
    finally:
        devs.update(key, saved)
        lab.dp.set_pods({POD4: lab.lxc, POD6: lab.lxc})
        lab.dp.disarm_out()


def test_a_changed_neighbour_mac_is_followed_from_the_next_packet(macs_lab: Lab) -> None:
    """KPR_HR_OUT_CACHE 2 sends with the next hop's MAC it remembered: the agent's kpr.nexthops
    watcher (here one without the 2 s refresh, so only the event moves it) moves the generation when the neighbour's
    MAC changes, so once it has, no packet goes to the old MAC: the next one asks the FIB
    (bpf_redirect_neigh: the kernel's neighbour output, which has the new MAC) and remembers
    the new MAC for the ones after it. Fails with the neighbour's MAC change not invalidating
    (kpr.nexthops.NeighbourBook) or the generation not compared (a stale entry sends to the old MAC)."""
    from kpr.nexthops import NextHopWatcher
    from kpr.testing.netns import in_netns
    from kpr.testing.waiting import wait_for

    lab = macs_lab
    new_mac = "02:00:00:00:00:22"
    pkt = from_pod(lab) / tcp4(POD4, FAR4)
    hr = lab.topo["hr"]

    def with_mac(mac: str) -> Any:
        def check(out: Ether) -> None:
            assert out[IP].dst == FAR4 and (out.src, out.dst) == (lab.mac, mac), out.summary()
        return check

    lab.dp.disarm_out()
    with in_netns(hr.path):
        w = NextHopWatcher(refresh=None, name="test-hr-macs")
        sub = w.subscribe(lab.dp.bump_out_generation, "host_routing")
        w.start()
    try:
        lab.run(D.FROM_POD, lab.lxc, Case("first: the FIB", pkt, TC_ACT_REDIRECT, out_of_node), "redirect_neigh")
        lab.run(D.FROM_POD, lab.lxc, Case("remembered", pkt, TC_ACT_REDIRECT, with_mac(MAC_OUT)), "redirect_out")
        n = sub.invalidations
        hr.run(f"ip neigh replace {OUT4} lladdr {new_mac} dev eth0 nud permanent")
        wait_for(lambda: sub.invalidations > n, 5, "the watcher's invalidation for the new MAC")
        lab.run(D.FROM_POD, lab.lxc, Case("after the change: the FIB again", pkt, TC_ACT_REDIRECT, out_of_node),
                "redirect_neigh")
        lab.run(D.FROM_POD, lab.lxc, Case("remembered with the new MAC", pkt, TC_ACT_REDIRECT, with_mac(new_mac)),
                "redirect_out")
    finally:
        w.stop()
        hr.run(f"ip neigh replace {OUT4} lladdr {MAC_OUT} dev eth0 nud permanent")
        lab.dp.disarm_out()


@pytest.mark.parametrize("mode", [1, 2])
def test_route_out_of_the_node_is_remembered_until_the_generation_moves(request: Any, mode: int) -> None:
    """KPR_HR_OUT_CACHE: a pod's packets to the outside reuse the FIB's route for their (pod,
    destination) pair (kpr_hr_out) while its generation holds: by bpf_redirect_neigh to the
    remembered next hop (1, the default), or by bpf_redirect with its MACs (2). Proof: a route
    changed under a remembered one is not seen until the generation moves (the agent's
    kpr.nexthops watcher moves it on every route and neighbour change); not armed (generation
    0), nothing is used."""
    lab: Lab = request.getfixturevalue("lab" if mode == 1 else "macs_lab")
    pkt = from_pod(lab) / tcp4(POD4, FAR4)
    send = Case("pod to the outside", pkt, TC_ACT_REDIRECT, out_of_node)
    remembered = Case("by the remembered route", pkt, TC_ACT_REDIRECT, out_of_node if mode == 1 else out_with_macs(lab))
    helper = "redirect_neigh" if mode == 1 else "redirect_out"
    lab.dp.disarm_out()
    try:
        for _ in range(2):  # not armed: the FIB every time
            lab.run(D.FROM_POD, lab.lxc, send, "redirect_neigh")
        assert lab.dp.out_routes() == {}
        lab.dp.bump_out_generation()
        lab.run(D.FROM_POD, lab.lxc, send, "redirect_neigh")  # the FIB's answer, remembered
        assert lab.dp.out_routes() == {(POD4, FAR4): lab.eth0}
        lab.run(D.FROM_POD, lab.lxc, remembered, "out_route_cached")
        lab.topo["hr"].run(f"ip route replace blackhole {FAR4}/32")
        lab.run(D.FROM_POD, lab.lxc, remembered, helper)  # still the remembered route: nobody said
        lab.dp.bump_out_generation()
        lab.run(D.FROM_POD, lab.lxc, Case("after the bump: the FIB's blackhole", pkt, TC_ACT_UNSPEC, same(pkt)),
                "pass_fib")
        assert lab.dp.out_routes() == {}
        # longer than the route's MTU allowed: the FIB decides (and a packet for another pair misses)
        lab.topo["hr"].run(f"ip route del blackhole {FAR4}/32")
        lab.run(D.FROM_POD, lab.lxc, send, "redirect_neigh")
        big = from_pod(lab) / tcp4(POD4, FAR4) / Raw(b"x" * 1500)
        lab.run(D.FROM_POD, lab.lxc, Case("too big for the route", big, TC_ACT_UNSPEC, same(big)), "pass_fib")
    finally:
        lab.topo["hr"].run(f"ip route del blackhole {FAR4}/32", check=False)
        lab.dp.disarm_out()
