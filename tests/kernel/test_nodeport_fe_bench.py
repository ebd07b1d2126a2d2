"""The prototype frontend table (kpr/testing/fe_table.h, benchmarks/bench_nodeport_scale.py
--fe-table): a build with it finds frontends in kpr_fe_bench, filled from kpr_svc by
kpr.testing.fe_table, and only there, so the benchmark's figure for it is the table's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.testing.fe_table import FE_LINE, FE_MAP, FE_MAX, fe_hash, fill_fe_table, load_fe_build
from kpr.testing.nodeport_bench import VIP, ProgLab
from kpr.testing.nodeport_runs import run_counted

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(40) as pl:
        assert fill_fe_table(pl.pin, pl.writer.maps["kpr_svc"]) >= 1
        load_fe_build(pl, "xdp", "fe")
        yield pl


def test_the_hash_spreads_frontends() -> None:
    # the benchmark's filler frontends differ in one address byte: they must not pile up
    from kpr.bpf import maps as M

    keys = [M.SVC_KEY.pack(bytes(10) + b"\xff\xff" + bytes((10, 200, i >> 8, i & 255)), 80, 6, 0, 0, 0)
            for i in range(4096)]
    assert len({fe_hash(k) & (FE_MAX - 1) for k in keys}) > 3900


def test_frontends_are_found_in_the_table_and_only_there(lab: ProgLab) -> None:
    from kpr.bpf import maps as M

    verdict, _out, moved = run_counted(lab, "xdp", "fe", lab.packet(VIP, 80, sport=47000, flags="S"))
    assert moved.get("new_snat") == 1, moved
    # the table's lines cleared, kpr_svc unchanged: the build no longer sees the service
    with M.BpfMap.open_pinned(lab.pin / FE_MAP) as fe:
        fe.store({i: bytes(FE_LINE) for i in range(FE_MAX)})
    verdict2, _out, moved2 = run_counted(lab, "xdp", "fe", lab.packet(VIP, 80, sport=47001, flags="S"))
    assert "new_snat" not in moved2 and verdict2 != verdict, (verdict2, moved2)
