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
