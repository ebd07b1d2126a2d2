"""An upgrade onto a forwarding counter map (kpr_np_fwd, XDP: kpr_np_xfwd) pinned by a kpr
before the per-kind cached-send slots (issue 14: one increment per cached redirect instead of
three). bcc would adopt the smaller pin as it is and lose every increment past its end; the
load unpins it instead, so the compile pins a map of KPR_NP_FWD_MAX slots. The counters
restart from zero: no error, no refused start. A pin of the current size is kept.

Programs compiled and loaded into a scratch pin dir (never attached), the pins read back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpr.bpf import builds
from kpr.bpf import maps as M
from kpr.nodeport import datapath as D
from kpr.plugins.tc_nodeport import datapath as T
from kpr.plugins.xdp_nodeport import datapath as X
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.bpffs import pin_map

pytestmark = pytest.mark.kernel

# the layout before the per-kind cached-send slots: reasons (8 slots), then one per device kind
OLD_SLOTS = D.FWD_SLOTS - len(D.FWD_CACHED)
PERCPU_ARRAY = 6  # BPF_MAP_TYPE_PERCPU_ARRAY, as lib/nodeport.h declares the counters


@pytest.mark.parametrize("build", [T.Datapath, X.Datapath], ids=["tc", "xdp"])
def test_a_counter_map_of_the_old_size_is_replaced_and_counts_restart(pin_dir: Path, build: type) -> None:
    assert OLD_SLOTS < D.FWD_SLOTS and min(D.FWD_CACHED) == OLD_SLOTS, "the cached slots follow the old ones"
    name = build.FWD_MAP
    spec = M.MapSpec(name, PERCPU_ARRAY, 4, 8, OLD_SLOTS)
    old_id = pin_map(pin_dir, name, spec)
    writer = ServiceMapWriter(pin_dir).open()
    dp = None
    try:
        dp = build(pin_dir, mode="snat").load()
        with M.BpfMap.open_pinned(pin_dir / name) as now:
            assert now.info().max_entries == D.FWD_SLOTS
            assert now.id != old_id
            # the programs count into the pinned map, not the old one
            used = set(builds.map_ids(dp.fd(dp.ENTRIES[0])))
            assert now.id in used and old_id not in used
        got = dp.stats()
        assert {"fwd_redirect", "fwd_nh_cached", "egress_physical"} <= set(got)
        assert all(v == 0 for v in got.values()), got
        # a pin of the current size stays: counters survive an ordinary restart
        assert dp.unpin_old_counters() is False
        with M.BpfMap.open_pinned(pin_dir / name) as again:
            assert again.id == dp.maps[name].id
    finally:
        if dp is not None:
            dp.close()
        writer.close()
