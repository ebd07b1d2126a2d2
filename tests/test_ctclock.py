"""kpr.bpf.ctclock: the conntrack clock as the collector reads it (the programs' side, agreement
with a real build: tests/kernel/test_tc_nodeport_prog.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kpr.bpf import abi, ctclock


def test_the_tick_and_initial_jiffies_are_the_kernels() -> None:
    # TICK_NSEC = (NSEC_PER_SEC + HZ/2) / HZ; INITIAL_JIFFIES = (unsigned int)(-300 * HZ)
    assert [ctclock.tick_nsec(hz) for hz in (100, 250, 300, 1000)] == [10_000_000, 4_000_000, 3_333_333, 1_000_000]
    assert ctclock.initial_jiffies(250) == 2**32 - 75_000
    assert ctclock.initial_jiffies(1000) == 2**32 - 300_000
    assert ctclock.INITIAL_JIFFIES_S == abi.value("KPR_CT_INITIAL_JIFFIES_S") == 300


def test_config_hz_is_read_from_the_kernel_config() -> None:
    assert ctclock._config_hz("CONFIG_HZ_250=y\nCONFIG_HZ=250\n") == 250
    assert ctclock._config_hz("# CONFIG_HZ is not set\n") is None


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """HZ 250, and /proc/timer_list showing jiffies 1000 ticks past INITIAL_JIFFIES while
    CLOCK_MONOTONIC read 4.3 s: jiffies run 0.3 s behind it."""
    k = {"ktime": 4_300_000_000, "jiffies": ctclock.initial_jiffies(250) + 1000}
    ctclock._offset_ns.cache_clear()
    monkeypatch.setattr(ctclock, "kernel_hz", lambda: 250)
    monkeypatch.setattr(ctclock, "_read_timer_list", lambda: (k["ktime"], k["jiffies"]))
    yield k
    ctclock._offset_ns.cache_clear()


def test_now_is_monotonic_moved_by_the_jiffies_offset(fake_kernel: dict[str, int]) -> None:
    before = time.monotonic_ns()
    now = ctclock.now_ns(jiffies=True)
    after = time.monotonic_ns()
    assert before - 300_000_000 <= now <= after - 300_000_000
    # the offset is read once: a later timer_list does not move it
    fake_kernel["jiffies"] += 10**6
    assert ctclock.now_ns(jiffies=True) - time.monotonic_ns() == pytest.approx(-300_000_000, abs=50_000_000)


def test_the_coarse_build_reads_monotonic(fake_kernel: dict[str, int]) -> None:
    before = time.monotonic_ns()
    assert before <= ctclock.now_ns(jiffies=False) <= time.monotonic_ns()
    assert ctclock.cflags(jiffies=False) == []
    assert ctclock.cflags(jiffies=True) == ["-DKPR_HZ=250"]


def test_an_unreadable_timer_list_leaves_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable() -> tuple[int, int]:
        raise PermissionError("/proc/timer_list")

    ctclock._offset_ns.cache_clear()
    monkeypatch.setattr(ctclock, "kernel_hz", lambda: 250)
    monkeypatch.setattr(ctclock, "_read_timer_list", unreadable)
    try:
        before = time.monotonic_ns()
        assert before <= ctclock.now_ns(jiffies=True) <= time.monotonic_ns()
    finally:
        ctclock._offset_ns.cache_clear()


def test_every_build_writing_conntrack_gets_the_collectors_clock() -> None:
    """host_routing writes kpr_ct too (per-packet ClusterIP): its build once lacked the kernel's
    HZ, so its flows were stamped on the coarse clock while NodePort's were on jiffies. The
    flag now comes with the maps' own flags, which every such build uses."""
    from kpr.bpf import maps as M
    from kpr.plugins.host_routing.datapath import Datapath as HostRoutingDatapath, Helpers

    want = ctclock.cflags()
    assert want and set(want) <= set(M.cflags("/sys/fs/bpf/kpr-x"))
    assert set(want) <= set(HostRoutingDatapath("/sys/fs/bpf/kpr-x", Helpers(peer=True, neigh=True)).cflags())
