"""host_routing's kpr_hr_pods sync (Datapath.set_pods) on a real kernel map: the plugin's plan
fills the map up to its size (max_pods), so a full map is a normal state, and a pod replaced by
another there must not be refused (the gone one leaves first)."""

from __future__ import annotations

import pytest

from kpr.bpf import maps as M
from kpr.plugins.host_routing import datapath as D

pytestmark = pytest.mark.kernel

SIZE = 4  # max_pods of the map under test


def test_a_full_pods_map_takes_a_new_pod_in_place_of_a_gone_one(require_kernel: None) -> None:
    dp = D.Datapath("/nonexistent", D.Helpers(peer=True, neigh=True), max_pods=SIZE)
    spec = M.MapSpec(D.PODS_MAP, M.BPF_MAP_TYPE_HASH, 16, D.POD.size, SIZE)
    with M.BpfMap.create(spec) as m:
        dp.maps[D.PODS_MAP] = m
        first = {f"10.244.1.{i}": 10 + i for i in range(1, SIZE + 1)}
        assert dp.set_pods(first) == (SIZE, 0)
        # the pod at .1 is gone, a new one at .9 took its place, the pod at .2 moved: still SIZE pods
        second = {a: i for a, i in first.items() if a != "10.244.1.1"} | {"10.244.1.9": 19, "10.244.1.2": 42}
        assert dp.set_pods(second) == (2, 1)
        held = {M.bytes_to_addr(k): D.POD.unpack(v)[0] for k, v in m.items()}
        assert held == second
        assert dp.set_pods(second) == (0, 0), "nothing to write the second time"


def test_an_adopted_smaller_pods_map_is_planned_against_its_own_size(pin_dir, caplog: pytest.LogCaptureFixture) -> None:
    """kpr_hr_pods pinned by an earlier run with a smaller maxPods is adopted as it is (the
    programs keep their map): the plugin caps its pods at that size (pods_capacity), not at the
    configured maxPods, else every sync would fail writing more than the map holds."""
    from kpr.testing.bpffs import pin_map

    pin_map(pin_dir, D.PODS_MAP, M.MapSpec(D.PODS_MAP, M.BPF_MAP_TYPE_HASH, 16, D.POD.size, 16))
    dp = D.Datapath(pin_dir, D.Helpers(peer=True, neigh=True), max_pods=32).load()
    try:
        assert dp.maps[D.PODS_MAP].info().max_entries == 16, "the pinned map adopted"
        assert dp.pods_capacity == 16
        assert "host_routing_pinned_size" in caplog.text
        assert dp.set_pods({f"10.244.2.{i}": 100 + i for i in range(dp.pods_capacity)}) == (16, 0)
    finally:
        dp.close()
