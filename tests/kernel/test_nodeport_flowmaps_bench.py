"""The flow-map labs of benchmarks/bench_nodeport_flowmaps.py (kpr.testing.flow_maps): the
programs of a re-pinned lab write their flows into the maps of that kind and only there, so the
benchmark's figure for a kind is that kind's; the prototype array layout's builds
(kpr.testing.ct_array) keep their flows in its arrays and find them there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.bpf import maps as M
from kpr.nodeport.datapath import NO_SLOTS
from kpr.testing.ct_array import ARRAY_MAPS, load_array_build, used_slots
from kpr.testing.flow_maps import KINDS, pinned_kind, repin_flow_maps
from kpr.testing.nodeport_bench import VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted
from kpr.testing.prog_run import one_cpu

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", params=["hash", "percpu-lru"])
def lab(request: pytest.FixtureRequest, require_kernel: None) -> Iterator[tuple[str, ProgLab]]:
    with ProgLab(10) as pl:
        repin_flow_maps(pl, request.param)
        pl.load("xdp", "default", NO_SLOTS)
        yield request.param, pl


def test_a_new_flow_lands_in_the_maps_of_the_labs_kind(lab: tuple[str, ProgLab]) -> None:
    kind, pl = lab
    for name, want in KINDS[kind].items():
        assert pinned_kind(pl, name) == want, name
    pl.flush_flows()
    _verdict, _out, moved = run_counted(pl, "xdp", "default", pl.packet(VIP, 80, sport=47100, flags="S"))
    assert moved.get("new_snat") == 1, moved
    # the pinned maps (of the lab's kind) hold the flow: the conntrack entry and its reply side
    for name in ("kpr_ct", "kpr_snat"):
        with M.BpfMap.open_pinned(pl.pin / name) as m:
            assert len(list(m.keys())) == 1, name


def test_repinning_after_a_load_is_refused(lab: tuple[str, ProgLab]) -> None:
    # loaded programs hold the maps they opened: a kind pinned after them would not be measured
    with pytest.raises(RuntimeError, match="already loaded"):
        repin_flow_maps(lab[1], "hash")


@pytest.fixture(scope="module")
def array_lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(10) as pl:
        load_array_build(pl, "xdp", "default")
        yield pl


def test_the_array_builds_flows_live_in_the_arrays_and_only_there(array_lab: ProgLab) -> None:
    pl = array_lab
    pl.flush_flows()
    _v, _out, moved = run_counted(pl, "xdp", "default", pl.packet(VIP, 80, sport=47200, flags="S"))
    assert moved.get("new_snat") == 1, moved
    assert [used_slots(pl.pin, n) for n in ARRAY_MAPS] == [1, 1]
    for name in ("kpr_ct", "kpr_snat"):  # the product's maps: untouched
        with M.BpfMap.open_pinned(pl.pin / name) as m:
            assert not list(m.keys()), name
    # the flow's next packet is found there: established, the same verdict
    ack = pl.packet(VIP, 80, sport=47200)
    verdict, _out, moved = run_counted(pl, "xdp", "default", ack)
    assert moved.get("established") == 1 and "new_snat" not in moved, moved
    # the lab's flush empties the arrays: the same packet is a new flow again
    pl.flush_flows()
    assert [used_slots(pl.pin, n) for n in ARRAY_MAPS] == [0, 0]
    _v, _out, moved = run_counted(pl, "xdp", "default", ack)
    assert "established" not in moved, moved


# The benchmark's filled labs (kind:F, kpr.testing.flow_maps.fill_flow_maps): after the flush the
# maps hold F of their capacity of other flows' entries, and a new flow then meets what a node
# at that fill does. (description, lab kind, fill, counter the new flow must move, whether its
# kpr_ct and kpr_snat entries are made, whether fill entries were evicted to make room)
FILLED = [
    ("an LRU filled to capacity evicts older entries to make the new flow", "lru", 1.0, "new_snat", True, True),
    ("a hash with room takes the new flow beside the fill", "hash", 0.5, "new_snat", True, False),
    ("a preallocated hash filled to capacity refuses the flow's SNAT reply entry", "hash", 1.0,
     "drop_snat_no_port", False, False),
]


def _split(pin, name: str) -> tuple[int, int]:
    """(fill entries, other entries) in the lab's map `name`."""
    from kpr.testing.flow_maps import FILL_NET

    with M.BpfMap.open_pinned(pin / name) as m:
        keys = list(m.keys())
    fill = sum(1 for k in keys if k[12:14] in (FILL_NET[:2], bytes([FILL_NET[0], FILL_NET[1] + 1])))
    return fill, len(keys) - fill


@pytest.mark.parametrize("desc,kind,fill,counter,made,evicted", FILLED, ids=[c[0] for c in FILLED])
def test_a_filled_lab_meets_new_flows_as_a_node_at_that_fill(require_kernel: None, desc: str, kind: str, fill: float,
                                                             counter: str, made: bool, evicted: bool) -> None:
    # one CPU: an LRU's free elements sit in per-CPU lists, and a fill that migrates between
    # CPUs evicts before the map is full (130944 of 131072 entries, one CPU's 128 left behind)
    with one_cpu(), ProgLab(10) as pl:
        if kind != "lru":
            repin_flow_maps(pl, kind)
        pl.load("xdp", "default", NO_SLOTS)
        pl.fill = fill
        pl.flush_flows()
        want = {}
        for name in ("kpr_ct", "kpr_snat"):
            with M.BpfMap.open_pinned(pl.pin / name) as m:
                want[name] = int(m.info().max_entries * fill)
            assert _split(pl.pin, name) == (want[name], 0), name
        _v, _out, moved = run_counted(pl, "xdp", "default", pl.packet(VIP, 80, sport=47300, flags="S"))
        assert moved.get(counter) == 1, (desc, moved)
        filled, other = _split(pl.pin, "kpr_snat")
        assert other == int(made), desc
        assert (filled < want["kpr_snat"]) == evicted, (desc, filled)
        # the flush empties the fill and the flow, and fills again: every round starts alike
        pl.flush_flows()
        assert _split(pl.pin, "kpr_ct") == (want["kpr_ct"], 0)


def test_a_fill_outside_0_to_1_is_refused_naming_it(tmp_path) -> None:
    from kpr.testing.flow_maps import fill_flow_maps

    with pytest.raises(ValueError, match="fill fraction 1.5"):
        fill_flow_maps(tmp_path, 1.5)
