"""The device watcher's write (NodePortFacility._on_devices, its thread) takes the facility's
lock, as every other write of the next-hop generation: a change of kpr_np_devkind bumps it (a
read, then a write), which must not land inside another holder's critical section. Shown
with stop's (disarm, then close the tables) under the lock: the event waits, then finds the
tables gone, and the generation stays 0 (without the lock it armed the cache again, with no
watcher left to bump it). Real maps, pinned in a scratch directory."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.kernel


def test_a_device_event_waits_for_the_lock_and_does_not_rearm_a_disarmed_cache(require_kernel: None) -> None:
    from kpr.bpf import maps as M
    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.netdevs import DevKind, NetDev
    from kpr.nodeport import datapath as D
    from kpr.nodeport.facility import NodePortFacility
    from kpr.nodeport.tables import NodePortTables

    def gen(m: M.BpfMap) -> int:
        return D.NP_NH.unpack(m.lookup(M.U32.pack(D.NH_GEN)))[0]

    with scratch_pin_dir("kpr-devlock-h4") as pin:
        pin.mkdir()
        fac = NodePortFacility()
        fac.tables = NodePortTables(pin, 1024)
        try:
            nh = fac.tables.maps[D.NH_MAP]
            D.invalidate_next_hops(nh)  # armed, as the start leaves it
            event = {7: NetDev(7, "kprt-veth", DevKind.VETH_PEER, None, bytes(6))}
            with fac._lock:  # as _teardown holds it
                watcher = threading.Thread(target=fac._on_devices, args=(event,))
                watcher.start()
                watcher.join(0.5)  # (it cannot end while the lock is held: no timing decides the outcome)
                assert watcher.is_alive(), "the device event waited for the lock"
                assert list(fac.tables.maps[D.DEVKIND_MAP].keys()) == []
                fac.tables.disarm_next_hops()
                fac.tables.close()
                fac.tables = None
            watcher.join(30)
            assert not watcher.is_alive()
            with M.BpfMap.open_pinned(pin / D.NH_MAP) as m:
                assert gen(m) == 0, "the disarmed cache stays off"
            with M.BpfMap.open_pinned(pin / D.DEVKIND_MAP) as m:
                assert list(m.keys()) == []
            assert fac.devices == event
        finally:
            if fac.tables is not None:
                fac.tables.close()
