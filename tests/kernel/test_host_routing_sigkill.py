"""host_routing after its agent is killed (SIGKILL, a crash): the programs stay attached (pinned
tcx links) with what they remember (kpr_hr_nh, kpr_hr_out, kpr_hr_gen: per load, unpinned) and
kpr_hr_pods / kpr_hr_devs (pinned) as the dead agent left them. The next agent must not inherit
stale knowledge: it adopts the pinned maps and rewrites them from what the node has now, and its
programs start with empty caches. Real traffic from the external client (host_routing_env)."""

from __future__ import annotations

import socket

import pytest

from kpr.bpf import maps as M
from kpr.plugins.host_routing import datapath as D
from kpr.plugins.host_routing.plugin import HostRouting
from kpr.testing.waiting import wait_for

from host_routing_env import CLIENT, PODS, PORT, Rig, add_veth_pod, answers, client, delta, rig_fixtures

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

env, hr = rig_fixtures(prefix="kpr-hr-kill")


def killed(r: Rig) -> HostRouting:
    """What SIGKILL leaves of the running plugin: no kpr_stop (links attached, the generation
    still armed, no disarm), its threads gone, its file descriptors closed by the kernel."""
    p = r.plugin
    assert p is not None and p.datapath is not None
    r.plugin = None
    if p.watcher is not None:
        p.watcher.stop()
    if p.nexthops is not None:
        p.nexthops.close()
    p.datapath.close()
    return p


def pinned_pods(r: Rig) -> dict[str, int]:
    with M.BpfMap.open_pinned(r.pin / D.PODS_MAP) as m:
        return {M.bytes_to_addr(k): D.POD.unpack(v)[0] for k, v in m.items()}


def pinned_devs(r: Rig) -> set[int]:
    with M.BpfMap.open_pinned(r.pin / D.DEVS_MAP) as m:
        return {M.U32.unpack(k)[0] for k, _v in m.items()}


def ifindex(r: Rig, dev: str) -> int:
    with r.topo["node"].enter():
        return socket.if_nametoindex(dev)


def learn_next_hop(r: Rig, p: HostRouting, addr: str, want: int) -> None:
    """Traffic from the client to `addr` until the programs remember its next hop as `want` (a
    sync just after the traffic may have emptied kpr_hr_nh: traffic again until it stays)."""

    def learned() -> bool:
        if p.datapath.next_hops().get(addr) == want:
            return True
        client(r.topo, "tcp", addr, PORT, 1, ns="cl")
        return p.datapath.next_hops().get(addr) == want

    wait_for(learned, what=f"{addr}'s next hop remembered as ifindex {want}", show=p.datapath.next_hops)


def test_a_restart_after_sigkill_rebuilds_what_the_dead_agent_remembered(hr: Rig) -> None:
    addr = PODS["p1"][0]
    p = hr.start(keepAttachedOnStop=True)
    old_if = ifindex(hr, "lxcp1")

    learn_next_hop(hr, p, addr, old_if)
    killed(hr)

    # While no agent runs: p1's device goes and its address is given to a new pod on another
    # device. The dead agent's programs and maps still name lxcp1's ifindex for it.
    hr.topo.run("node", ["ip", "link", "del", "lxcp1"])
    add_veth_pod(hr.topo, "p3", addr, "fd44:9::13")
    new_if = ifindex(hr, "lxcp3")
    assert pinned_pods(hr)[addr] == old_if and old_if in pinned_devs(hr)

    p = hr.start(keepAttachedOnStop=True)
    # the pinned maps are adopted and rewritten from the node as it is now
    assert pinned_pods(hr)[addr] == new_if
    assert old_if not in pinned_devs(hr) and new_if in pinned_devs(hr)
    assert not (p._link_dir() / "lxcp1").exists(), "the gone device's links swept"
    # the new programs' caches start empty: nothing the dead agent's programs learned survives
    assert addr not in p.datapath.next_hops()
    before = hr.stats()
    assert answers(client(hr.topo, "tcp", addr, PORT, 3, ns="cl")) == [f"p3 {CLIENT}"] * 3
    assert delta(before, hr.stats()).get("redirect_peer", 0) >= 3

    learn_next_hop(hr, p, addr, new_if)
