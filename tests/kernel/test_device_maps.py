"""The device maps' writers (kpr_np_dev, kpr_np_devkind, kpr_np_nodeaddr) are one definition,
kpr.nodeport.datapath.DeviceMaps, for the agent's tables and the lab's Datapath: a change bumps
the next-hop generation, writing what is there does not, a disarmed cache stays off. Real maps,
pinned in a scratch directory, through the agent's NodePortTables."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.kernel


def test_the_agent_and_the_lab_write_the_device_maps_with_one_writer():
    from kpr.nodeport import datapath as D
    from kpr.nodeport.tables import NodePortTables

    for name in ("set_devices", "set_device_kinds", "set_node_addresses"):
        assert getattr(NodePortTables, name) is getattr(D.DeviceMaps, name) is getattr(D.Datapath, name), name


def test_a_device_change_bumps_the_generation_in_the_agents_tables(require_kernel: None) -> None:
    from kpr.bpf import maps as M
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.nodeport import datapath as D
    from kpr.nodeport.tables import NodePortTables

    with scratch_pin_dir("kpr-devmaps-h4") as pin:
        pin.mkdir()
        t = NodePortTables(pin, 1024)
        try:
            nh = t.maps[D.NH_MAP]

            def gen() -> int:
                raw = nh.lookup(M.U32.pack(D.NH_GEN))
                return D.NP_NH.unpack(raw)[0] if raw is not None else 0

            t.set_device_kinds({7: 1})
            assert gen() == 0, "a disarmed cache is left off"
            start = D.invalidate_next_hops(nh)
            assert t.set_device_kinds({7: 1}) == (0, 0) and gen() == start, "nothing changed, nothing bumped"
            assert t.set_device_kinds({7: 2, 8: 1}) == (2, 0) and gen() not in (0, start)
            bumped = gen()
            t.set_devices({7: ("10.0.0.9", None)}, ("10.0.0.1", "fd00::1"))
            assert gen() not in (0, bumped), "a device's SNAT address changed"
            bumped = gen()
            t.set_devices({7: ("10.0.0.9", None)}, ("10.0.0.1", "fd00::1"))
            assert gen() == bumped
            assert len(list(t.maps[D.DEV_MAP].keys())) == 2
            t.set_node_addresses(["10.0.0.1"])
            assert [bytes(k) for k in t.maps[D.NODEADDR_MAP].keys()] == [M.addr_to_bytes("10.0.0.1")]
        finally:
            t.close()
