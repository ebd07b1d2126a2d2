"""host_routing with other nodes' pods behind a vxlan overlay, as flannel vxlan lays them out
(host_routing_env.overlay_rig: tc_nodeport_env's two nodes in their vxlan layout, node1's pods
on cni0, node2's behind flannel.1): real traffic from the external client to a local pod, from
a local pod to a remote pod over the overlay and back, and per-packet ClusterIP from a local pod
to a backend on the remote node, IPv4 and IPv6, TCP and UDP, without the plugin and with it
(the overlay left to discovery, or also listed as a device, and with bpf_redirect_neigh forced
off).
The counters prove what carried the packets: into the bridge by bpf_redirect, into the overlay
by bpf_redirect_neigh (`redirect_neigh_overlay`) or the stack, never bpf_redirect_peer.
"""

from __future__ import annotations

import socket

import pytest

from kpr.bpf import links
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.plugins.host_routing import datapath as D
from kpr.testing.waiting import wait_for

from host_routing_env import OVERLAY_DEV, OVERLAY_PODS, PORT, PY, Rig, answers, client, delta, overlay_rig, rig_fixtures
from tc_nodeport_env import CLIENT, CLIENT6

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PODS = OVERLAY_PODS
LOCAL, REMOTE = "p1a", "p2a"  # on node1 (the plugin's node), on node2 behind flannel.1
CIP, CIP6 = "10.96.78.10", "fd96::78:10"
KEY = ServiceKey("default", "hr-ovl-cip")
N = 3  # attempts per protocol and family: at least 4 * N packets each way


env, hr = rig_fixtures(overlay_rig, prefix="kpr-hr-ovl", delete=(KEY,))


def traffic(r: Rig, dst: tuple[str, str], port: int, src: str) -> list[str]:
    out = []
    for addr in dst:
        out += answers(client(r.topo, "tcp", addr, port, N, "timeout=3", ns=src))
        out += answers(client(r.topo, "udp", addr, port, N, "timeout=3", ns=src))
    return out


def seen_by(backend: str, src: str) -> list[str]:
    addrs = (CLIENT, CLIENT6) if src == "cl" else PODS[src]
    return [f"{backend} {addrs[fam]}" for fam in (0, 1) for _ in range(2 * N)]


def service(backend: str) -> Service:
    fes = []
    for fam, addr in ((0, CIP), (1, CIP6)):
        be = (Backend(PODS[backend][fam], PORT, node_name="node2"),)
        fes += [Frontend(FrontendType.CLUSTER_IP, addr, 80, proto, be) for proto in (Protocol.TCP, Protocol.UDP)]
    return Service(KEY, tuple(fes))


def tcx_names(r: Rig, dev: str) -> list[str]:
    with r.topo[r.node].enter():
        ids = links.query(socket.if_nametoindex(dev), links.ATTACH_TCX_INGRESS)
    return [links.prog_name(i) or "?" for i in ids]


def test_without_plugin_the_stack_carries_everything(hr: Rig) -> None:
    assert traffic(hr, PODS[LOCAL], PORT, "cl") == seen_by(LOCAL, "cl")
    assert traffic(hr, PODS[REMOTE], PORT, LOCAL) == seen_by(REMOTE, LOCAL)
    assert tcx_names(hr, "eth0") == [] and tcx_names(hr, OVERLAY_DEV) == []


@pytest.mark.parametrize("devices,neigh", [
    (("eth0",), True),
    (("eth0", OVERLAY_DEV), True),
    (("eth0", OVERLAY_DEV), False),
], ids=["overlay-found", "overlay-listed", "overlay-listed-stack"])
def test_overlay_layout(hr: Rig, devices: tuple[str, ...], neigh: bool) -> None:
    p = hr.start(devices=list(devices), redirectNeigh=neigh)
    hr.source_pods(LOCAL, "p1b", REMOTE)  # a source naming a remote pod: routed into the overlay, not local
    wait_for(lambda: PODS[LOCAL][1] in p.plan.pods, what="node1's bridge pods learned from the source")
    listed = OVERLAY_DEV in devices
    ovl = hr.topo.ifindex(hr.node, OVERLAY_DEV)
    assert p.plan.devices[ovl] == D.DevEntry(D.DEV_F_OVERLAY | (D.DEV_F_EXTERNAL if listed else 0), 4)
    assert ovl not in p.plan.pod_devices.values()
    assert sorted(p.plan.not_local) == sorted(PODS[REMOTE]) and PODS[REMOTE][0] not in p.plan.pods
    assert tcx_names(hr, OVERLAY_DEV) == (["kpr_hr_from_net"] if listed else [])

    # the external client to a local pod: into the bridge with the route's MACs
    hr.topo.end_closing()
    before = hr.stats()
    assert traffic(hr, PODS[LOCAL], PORT, "cl") == seen_by(LOCAL, "cl")
    d = delta(before, hr.stats())
    assert d.get("redirect", 0) >= 8 * N and d.get("redirect_peer", 0) == 0, d

    # a local pod to a remote pod: into flannel.1 by bpf_redirect_neigh (or the stack); the
    # replies, decapsulated on flannel.1, into the bridge by bpf_redirect where the program is
    # on flannel.1, else by the stack
    for what, dst, port, backend in (("pod", PODS[REMOTE], PORT, REMOTE), ("ClusterIP", (CIP, CIP6), 80, REMOTE)):
        if what == "ClusterIP":
            hr.writer.upsert(service(REMOTE))
        hr.topo.end_closing()  # (an earlier step's last FIN, late, must not count in this one)
        before = hr.stats()
        assert traffic(hr, dst, port, LOCAL) == seen_by(backend, LOCAL), what
        d = delta(before, hr.stats())
        assert d.get("redirect_peer", 0) == 0 and d.get("redirect_neigh", 0) == 0, (what, d)
        if neigh:
            assert d.get("redirect_neigh_overlay", 0) >= 8 * N and d.get("pass_not_dev", 0) == 0, (what, d)
        else:
            assert d.get("redirect_neigh_overlay", 0) == 0 and d.get("pass_neigh_off", 0) >= 8 * N, (what, d)
        if listed:
            assert d.get("redirect", 0) >= 8 * N, (what, d)
        else:
            assert d.get("redirect", 0) == 0, (what, d)
        if what == "ClusterIP":
            assert d.get("service_new", 0) >= 4 * N and d.get("service_revnat", 0) >= 8 * N, d

    # a remote pod to a local pod: decapsulated on flannel.1, then into the bridge by bpf_redirect
    # where the program is on flannel.1 (else by the stack); the replies into the overlay as above
    hr.topo.end_closing()
    before = hr.stats()
    assert traffic(hr, PODS[LOCAL], PORT, REMOTE) == seen_by(LOCAL, REMOTE)
    d = delta(before, hr.stats())
    assert d.get("redirect_peer", 0) == 0 and d.get("redirect_neigh", 0) == 0, d
    assert (d.get("redirect", 0) >= 8 * N) == listed and (d.get("redirect_neigh_overlay", 0) >= 8 * N) == neigh, d


# 2 MB through a pod's echo server and back: "<all back?> <bytes back>".
BULK = r"""
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.makefile("rb").readline()  # the server's greeting
data, got = b"x" * 2_000_000, 0
def read():
    global got
    while got < len(data):
        d = s.recv(1 << 16)
        if not d:
            return
        got += len(d)
t = threading.Thread(target=read)
t.start()
s.sendall(data)
t.join(30)
print(got == len(data), got)
"""


def test_bulk_over_the_overlay_learns_the_path_mtu(hr: Rig) -> None:
    """The pods keep MTU 1500 (tc_nodeport_env), above flannel.1's 1450: a segment too big for the
    overlay, GSO or not, is left to the stack (pass_fib), whose ICMP teaches the pod the path MTU,
    as without the plugin; the rest goes into the overlay by bpf_redirect_neigh. 2 MB each way,
    IPv4 and IPv6."""
    p = hr.start()
    hr.source_pods(LOCAL)
    wait_for(lambda: PODS[LOCAL][1] in p.plan.pods, what="node1's bridge pods learned from the source")
    for addr in PODS[REMOTE]:
        hr.topo.run(LOCAL, "ip route flush cache && ip -6 route flush cache")
        hr.topo.end_closing()
        before = hr.stats()
        out = hr.topo.run(LOCAL, [PY, "-c", BULK, addr, str(PORT)], timeout=90)
        assert out.stdout.split() == ["True", "2000000"], out.stdout
        d = delta(before, hr.stats())
        assert d.get("pass_fib", 0) >= 1 and d.get("redirect_neigh_overlay", 0) >= 10, (addr, d)
        assert "mtu 1450" in hr.topo.run(LOCAL, ["ip", "route", "get", addr]).stdout, addr
