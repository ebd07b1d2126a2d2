"""The NodePort benchmarks' repeat=1 estimator (kpr.testing.nodeport_bench.clock_tick, tick_median).

BPF_PROG_TEST_RUN reports each call's ktime_get_ns difference; on this VM that clock steps 10
ns, so a call of true length 10k + f ns reads 10k or 10(k + 1) (the second with odds f/10) and the
plain median of a block sits on a step. The cases are readings drawn that way from known true
lengths (a fixed seed, no kernel): the estimator must land within a ns of the true median where
the plain median is up to half a step off, and find the step itself. Root-free."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from kpr.testing.nodeport_bench import clock_tick, tick_median


def readings(true_ns: float, n: int = 2000, *, step: int = 10, jitter: float = 1.5, seed: int = 7) -> list[int]:
    """What a clock of `step` ns reads for calls of about `true_ns`: each call starts at a random
    phase of the step; the clock's scaling adds its 1 ns now and then (90, 91, 100, 101, ...)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        length = rnd.gauss(true_ns, jitter)
        phase = rnd.random() * step
        d = int(math.floor((length + phase) / step) * step)
        out.append(d + (1 if rnd.random() < 0.15 else 0))
    return out


@pytest.mark.parametrize("true_ns", [90.0, 95.0, 103.0, 105.0, 108.0, 250.0])
def test_the_interpolated_median_follows_the_true_length_between_steps(true_ns: float) -> None:
    ds = readings(true_ns)
    assert abs(tick_median(ds, 10) - true_ns) < 1.0
    # the plain median is the nearer step: off by up to half of one (the method's old reading)
    assert statistics.median(ds) % 10 in (0, 0.5, 1)


def test_a_ratio_resolves_within_a_step() -> None:
    """1.15x of a 90 ns call (103.5 ns) and 1.25x (112.5): the plain medians give 1.11x / 1.22x or
    the next step up; the interpolated ones tell them apart by what they are."""
    bare = tick_median(readings(90.0, seed=1), 10)
    low = tick_median(readings(103.5, seed=2), 10) / bare
    high = tick_median(readings(112.5, seed=3), 10) / bare
    assert abs(low - 1.15) < 0.02 and abs(high - 1.25) < 0.02


@pytest.mark.parametrize(("ds", "tick"), [
    (readings(90.0), 10),
    (readings(230.0, jitter=20), 10),
    (readings(90.0, step=20, seed=3), 20),
    ([110, 111, 120, 121, 100, 101] * 300, 10),
    # a clock of a ns: no step
    ([random.Random(5).randint(80, 140) for _ in range(5000)], 1),
    # one value only (cannot tell a step from it): no step, the plain median
    ([90] * 100, 1),
    # one step's readings (20, 21) and a few off its grid (45, fewer than the 0.5% forgiven): the
    # off-grid readings are no second step of 20 or 10, nor three readings one of 5
    ([20] * 700 + [21] * 300 + [45] * 3, 1),
    # ... while as many on a second step as the grid forgives off it make one
    ([20] * 700 + [21] * 300 + [40] * 6, 20),
])
def test_clock_tick(ds: list[int], tick: int) -> None:
    assert clock_tick(ds) == tick


def test_tick_one_is_the_plain_median() -> None:
    ds = [random.Random(9).randint(80, 140) for _ in range(1001)]
    assert tick_median(ds, 1) == statistics.median(ds)
