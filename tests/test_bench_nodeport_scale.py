"""benchmarks/bench_nodeport_scale.py's paired report: the difference of two builds measured in
turn, round by round (its own arithmetic; the kernel run is tests/kernel/test_nodeport_scale_bench.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nodeport_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_nodeport_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_reports_the_median_of_the_round_by_round_differences_not_of_the_medians() -> None:
    # the rounds drift by 100 ns together: the medians differ by 10, every round's pair by -10
    off = [500.0, 600.0, 700.0, 800.0, 900.0]
    on = [490.0, 590.0, 690.0, 790.0, 890.0]
    assert _bench().paired(off, on) == "-10 ns (-10 / -10), faster in 5 of 5"


def test_paired_counts_the_rounds_the_flags_made_faster() -> None:
    assert _bench().paired([100.0, 100.0, 100.0, 100.0], [90.0, 130.0, 80.0, 100.0]).endswith("faster in 2 of 4")


def test_paired_takes_a_single_round() -> None:
    assert _bench().paired([100.0], [120.0]) == "+20 ns (+20 / +20), faster in 0 of 1"


def test_a_builds_label_names_its_stop_and_twin() -> None:
    label = _bench().label
    assert (label(0, ""), label(0, "+cflags"), label(9, ""), label(9, "+cflags")) == (
        "default", "cflags", "stop9", "stop9+cflags")
