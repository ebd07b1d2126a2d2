"""A backend id carries a generation (lib/maps.h struct kpr_backend): once a deleted backend's
kpr_backend index is given to another backend, the established flows that conntrack still
holds for the deleted one (by its id) must not be sent to the new one. They take the path of
a deleted backend's flow: a new pick among the service's current backends.

tc_nodeport's ingress program on packets (BPF_PROG_TEST_RUN) against maps a ServiceMapWriter
with a 5-entry kpr_backend (indexes 1..4) fills, so the writer reuses an index after a few
backends. The node "lb" routes remote pods 10.244.2.0/24 to node2 (static neighbour): the
output packet's destination is the backend picked.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from kpr.bpf import maps as M
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.netdevs import classify
from kpr.readback import DatapathMaps
from kpr.plugins.tc_nodeport import datapath as D
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.netns import Topology, in_netns
from kpr.testing.prog_run import TC_ACT_REDIRECT, test_run

pytestmark = pytest.mark.kernel

NODE4, OUT4, NODE2_4 = "10.0.0.1", "10.0.0.2", "10.0.0.3"
MAC_OUT, MAC_NODE2 = "02:00:00:00:00:02", "02:00:00:00:00:03"
CLIENT = "192.0.2.50"
VIP, VIP2, VIP3, VIP4 = "203.0.113.60", "203.0.113.61", "203.0.113.62", "203.0.113.63"
OLD, OTHER2, OTHER3, CURRENT, NEW = "10.244.2.60", "10.244.2.61", "10.244.2.62", "10.244.2.63", "10.244.2.64"
SIZES = {"kpr_backend": 5}  # indexes 1..4


def _svc(name: str, vip: str, backend: str) -> Service:
    return Service(ServiceKey("gen", name), (
        Frontend(FrontendType.LOAD_BALANCER, vip, 53, Protocol.UDP, (Backend(backend, 5353, node_name="node2"),)),
    ))


@dataclass
class Lab:
    topo: Topology
    writer: ServiceMapWriter
    dp: D.Datapath
    ifindex: int
    mac: str

    def send(self, sport: int, vip: str = VIP) -> tuple[int, Ether]:
        pkt = Ether(src=MAC_OUT, dst=self.mac) / IP(src=CLIENT, dst=vip) / UDP(sport=sport, dport=53) / Raw(b"kpr-gen")
        ctx = struct.pack("=11I", 0, 0, 0, 0, 0, 0, 0, 0, 0, self.ifindex, self.ifindex)
        with in_netns(self.topo["lb"].path):
            res = test_run(self.dp.fd(D.INGRESS), bytes(pkt), ctx=ctx)
        return res.signed, Ether(res.data_out)


@pytest.fixture
def lab(pin_dir: Path, topology: Topology) -> Iterator[Lab]:
    pin, topo = pin_dir, topology
    topo.add_node("lb")
    topo.add_namespace("out")
    topo.link("lb", "out", [f"{NODE4}/24"], [f"{OUT4}/24"])
    topo["lb"].run(
        f"ip neigh replace {OUT4} lladdr {MAC_OUT} dev eth0 nud permanent && "
        f"ip neigh replace {NODE2_4} lladdr {MAC_NODE2} dev eth0 nud permanent && "
        f"ip route replace default via {OUT4} && ip route replace 10.244.2.0/24 via {NODE2_4}"
    )
    ifindex = topo.ifindex("lb", "eth0")
    writer = ServiceMapWriter(pin, sizes=SIZES).open()
    dp = None
    try:
        dp = D.Datapath(pin, mode="snat")
        dp.sizes = dict(SIZES)
        dp.load()
        dp.set_devices({ifindex: (NODE4, None)}, (NODE4, None))
        dp.set_device_kinds({i: d.kind for i, d in classify(topo["lb"].netns).items()})
        dp.set_node_addresses([NODE4])
        dp.set_vips([VIP, VIP2, VIP3, VIP4])
        dp.invalidate_next_hops()
        yield Lab(topo, writer, dp, ifindex, topo.mac("lb", "eth0"))
    finally:
        if dp is not None:
            dp.close()
        writer.close()


def test_a_flow_of_a_deleted_backend_never_reaches_the_backend_its_index_was_given_to(lab: Lab) -> None:
    w = lab.writer
    for s in (_svc("a", VIP, OLD), _svc("b", VIP2, OTHER2), _svc("c", VIP3, OTHER3)):
        w.upsert(s)
    old_id = w.backend_ids()[f"{OLD}:5353/UDP"]
    # two established flows to the backend that goes
    for sport in (6001, 6002):
        verdict, out = lab.send(sport)
        assert verdict == TC_ACT_REDIRECT and out[IP].dst == OLD
    # the service's backend replaced: OLD's index is freed (CURRENT takes the last unused one)
    w.upsert(_svc("a", VIP, CURRENT))
    assert f"{OLD}:5353/UDP" not in w.backend_ids()
    # a deleted backend's flow: picked again among the service's backends
    verdict, out = lab.send(6001)
    assert verdict == TC_ACT_REDIRECT and out[IP].dst == CURRENT
    # another service's new backend takes OLD's index, in the next generation
    w.upsert(_svc("d", VIP4, NEW))
    new_id = w.backend_ids()[f"{NEW}:5353/UDP"]
    assert M.backend_index(new_id) == (M.backend_index(old_id)[0], M.backend_index(old_id)[1] + 1)
    # the other flow conntrack still holds by OLD's id: the same path as the first, not NEW
    verdict, out = lab.send(6002)
    assert verdict == TC_ACT_REDIRECT and out[IP].dst == CURRENT
    # the new backend is served under its own id
    verdict, out = lab.send(6003, VIP4)
    assert verdict == TC_ACT_REDIRECT and out[IP].dst == NEW
    # read back as the programs read (kpr explain): the old id names no backend any more
    with DatapathMaps(w.pin_path) as dm:
        assert dm.backend(old_id) is None
        assert dm.backend(new_id)["address"] == NEW


def test_a_backend_whose_id_carries_a_generation_keeps_its_cached_next_hop(lab: Lab) -> None:
    """kpr_np_nh caches next hops by backend index, not by the whole id: a backend given a
    reused index (an id with generation 1, above kpr_np_nh's size as a whole) is still sent
    without a FIB lookup once its next hop is cached."""
    w = lab.writer
    for s in (_svc("a", VIP, OLD), _svc("b", VIP2, OTHER2), _svc("c", VIP3, OTHER3)):
        w.upsert(s)
    w.upsert(_svc("a", VIP, CURRENT))  # OLD's index freed
    w.upsert(_svc("d", VIP4, NEW))  # and given to NEW, in generation 1
    new_id = w.backend_ids()[f"{NEW}:5353/UDP"]
    assert M.backend_index(new_id)[1] == 1
    verdict, out = lab.send(6101, VIP4)  # new flow: the route looked up and cached
    assert verdict == TC_ACT_REDIRECT and out[IP].dst == NEW and out[Ether].dst == MAC_NODE2
    before = lab.dp.stats()["fwd_nh_cached"]
    verdict, out = lab.send(6101, VIP4)  # established: the cached next hop
    assert verdict == TC_ACT_REDIRECT and out[IP].dst == NEW and out[Ether].dst == MAC_NODE2
    assert lab.dp.stats()["fwd_nh_cached"] == before + 1
