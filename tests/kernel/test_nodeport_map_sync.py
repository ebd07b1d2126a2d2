"""The NodePort plugins' own-map sync (kpr.nodeport.datapath.sync_map, shared with
host_routing) on a real kernel map: a map kept full (kpr_np_devkind holds every link of a busy
node) takes a new key in place of a gone one."""

from __future__ import annotations

import pytest

from kpr.bpf import maps as M
from kpr.nodeport import datapath as D

pytestmark = pytest.mark.kernel

SIZE = 4


def test_a_full_map_takes_a_new_key_in_place_of_a_gone_one(require_kernel: None) -> None:
    spec = M.MapSpec(D.DEVKIND_MAP, M.BPF_MAP_TYPE_HASH, 4, 4, SIZE)
    with M.BpfMap.create(spec) as m:
        first = {M.U32.pack(i): M.U32.pack(1) for i in range(1, SIZE + 1)}
        assert D.sync_map(m, first) == (SIZE, 0)
        # link 1 went away, link 9 came; link 2 changed kind: still SIZE links
        second = {k: v for k, v in first.items() if k != M.U32.pack(1)} | {M.U32.pack(9): M.U32.pack(1), M.U32.pack(2): M.U32.pack(3)}
        assert D.sync_map(m, second) == (2, 1)
        assert dict(m.items()) == second
        assert D.sync_map(m, second) == (0, 0), "nothing to write the second time"
