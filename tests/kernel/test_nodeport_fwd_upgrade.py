"""An upgrade onto a forwarding counter map (kpr_np_fwd, XDP: kpr_np_xfwd) pinned by a kpr
before the per-kind cached-send slots (issue 14: one increment per cached redirect instead of
three). bcc would adopt the smaller pin as it is and lose every increment past its end; the
load moves it aside instead, so the compile pins a map of KPR_NP_FWD_MAX slots, and then adds
the old map's per-CPU sums into the new one (old counters keep their slot index) and unpins it.
A compile that fails puts the old pin back: the old programs keep counting into it. The same
for the statistics map (kpr_np_stats, XDP: kpr_np_xstats) when KPR_NP_ST_MAX grew. A pin of
the current size is kept. (Before: the pins were unpinned before the compile and the sums
lost; a failed compile left no pin at all.)

Programs compiled and loaded into a scratch pin dir (never attached), the pins read back.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

from kpr.bpf import builds, percpu
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


def _old_pin(pin_dir: Path, name: str, slots: int) -> tuple[int, dict[int, list[int]]]:
    """A counter map of `slots` slots as an older kpr left it, slot i counting i+1 on CPU 0
    and 100*(i+1) on the last CPU. Returns its id and the per-CPU values."""
    cpus = percpu.possible_cpus()
    vals = {}
    for i in range(slots):
        v = [0] * cpus
        v[0] += i + 1
        v[-1] += 100 * (i + 1)
        vals[i] = v
    entries = {M.U32.pack(i): struct.pack(f"<{cpus}Q", *v) for i, v in vals.items()}
    return pin_map(pin_dir, name, M.MapSpec(name, PERCPU_ARRAY, 4, 8, slots), entries), vals


def _per_cpu(m: M.BpfMap, i: int) -> list[int]:
    cpus = percpu.possible_cpus()
    val = (ctypes.c_uint64 * cpus)()
    M.check_rc(M.libbpf().bpf_map_lookup_elem(m.fd, M.U32.pack(i), val), "lookup")
    return list(val)


@pytest.mark.parametrize("build", [T.Datapath, X.Datapath], ids=["tc", "xdp"])
def test_a_counter_map_of_the_old_size_is_replaced_and_its_sums_carried(pin_dir: Path, build: type) -> None:
    assert OLD_SLOTS < D.FWD_SLOTS and min(D.FWD_CACHED) == OLD_SLOTS, "the cached slots follow the old ones"
    name = build.FWD_MAP
    old_id, fwd_vals = _old_pin(pin_dir, name, OLD_SLOTS)
    # the statistics map as a kpr before the two conntrack-slot counters pinned it
    stats_id, stats_vals = _old_pin(pin_dir, build.STATS_MAP, len(D.STATS) - 2)
    writer = ServiceMapWriter(pin_dir).open()
    dp = None
    try:
        dp = build(pin_dir, mode="snat").load()
        for pinned, want, old, vals in ((name, D.FWD_SLOTS, old_id, fwd_vals),
                                        (build.STATS_MAP, len(D.STATS), stats_id, stats_vals)):
            with M.BpfMap.open_pinned(pin_dir / pinned) as now:
                assert now.info().max_entries == want
                assert now.id != old
                # the programs count into the pinned map, not the old one
                used = set(builds.map_ids(dp.fd(dp.ENTRIES[0])))
                assert now.id in used and old not in used
                # each old slot's per-CPU values carried to the same index and CPU; new slots zero
                for i, v in vals.items():
                    assert _per_cpu(now, i) == v, (pinned, i)
                for i in range(len(vals), want):
                    assert not any(_per_cpu(now, i)), (pinned, i)
        assert not list(pin_dir.glob("*" + dp.COUNTERS_ASIDE)), "nothing left aside"
        got = dp.stats()
        assert {"fwd_redirect", "fwd_nh_cached", "egress_physical"} <= set(got)
        assert got[D.STATS[0]] == sum(stats_vals[0])
        # a pin of the current size stays: counters survive an ordinary restart
        assert dp.set_aside_old_counters() == []
        with M.BpfMap.open_pinned(pin_dir / name) as again:
            assert again.id == dp.maps[name].id
    finally:
        if dp is not None:
            dp.close()
        writer.close()


@pytest.mark.parametrize("build", [T.Datapath, X.Datapath], ids=["tc", "xdp"])
def test_a_failed_compile_leaves_the_old_counter_pins(pin_dir: Path, build: type) -> None:
    old_fwd, _ = _old_pin(pin_dir, build.FWD_MAP, OLD_SLOTS)
    old_stats, _ = _old_pin(pin_dir, build.STATS_MAP, len(D.STATS) - 2)
    writer = ServiceMapWriter(pin_dir).open()
    try:
        broken = build(pin_dir, mode="snat", extra_cflags=["-DKPR_NP_MODE=("])  # (a compile error)
        with pytest.raises(Exception):
            broken.load()
        for pinned, old in ((build.FWD_MAP, old_fwd), (build.STATS_MAP, old_stats)):
            with M.BpfMap.open_pinned(pin_dir / pinned) as m:
                assert m.id == old, pinned
        assert not list(pin_dir.glob("*" + build.COUNTERS_ASIDE))
    finally:
        writer.close()
