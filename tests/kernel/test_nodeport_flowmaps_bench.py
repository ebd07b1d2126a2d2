"""The flow-map labs of benchmarks/bench_nodeport_flowmaps.py (kpr.testing.flow_maps): the
programs of a re-pinned lab write their flows into the maps of that kind and only there, so the
benchmark's figure for a kind is that kind's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from kpr.bpf import maps as M
from kpr.testing.flow_maps import KINDS, pinned_kind, repin_flow_maps
from kpr.testing.nodeport_bench import VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", params=["hash", "percpu-lru"])
def lab(request: pytest.FixtureRequest, require_kernel: None) -> Iterator[tuple[str, ProgLab]]:
    with ProgLab(10) as pl:
        repin_flow_maps(pl, request.param)
        pl.load("xdp", "default")
        yield request.param, pl


def _syn(lab: ProgLab, sport: int) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:02", dst=lab.mac) / IP(src="192.0.2.50", dst=VIP)
                 / TCP(sport=sport, dport=80, flags="S"))


def test_a_new_flow_lands_in_the_maps_of_the_labs_kind(lab: tuple[str, ProgLab]) -> None:
    kind, pl = lab
    for name, want in KINDS[kind].items():
        assert pinned_kind(pl, name) == want, name
    pl.flush_flows()
    _verdict, _out, moved = run_counted(pl, "xdp", "default", _syn(pl, 47100))
    assert moved.get("new_snat") == 1, moved
    # the pinned maps (of the lab's kind) hold the flow: the conntrack entry and its reply side
    for name in ("kpr_ct", "kpr_snat"):
        with M.BpfMap.open_pinned(pl.pin / name) as m:
            assert len(list(m.keys())) == 1, name


def test_repinning_after_a_load_is_refused(lab: tuple[str, ProgLab]) -> None:
    # loaded programs hold the maps they opened: a kind pinned after them would not be measured
    with pytest.raises(RuntimeError, match="already loaded"):
        repin_flow_maps(lab[1], "hash")
