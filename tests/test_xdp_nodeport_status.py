"""xdp_nodeport's localBackendsUnserved baseline (new_local when the note was last clear) and the
kernctx status detail, without root: the baseline decision is a pure function of one reading and
the baseline before it; status calls from several threads take their readings in turn."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.bpf import kernctx
from kpr.plugins.tc_nodeport import datapath as TD
from kpr.plugins.xdp_nodeport import datapath as XD
from kpr.plugins.xdp_nodeport.plugin import XdpNodePort


def note(new_local: int | None, base: int, unserved: list[str] | None) -> tuple[int, list[str] | None, int]:
    from kpr.plugins.xdp_nodeport.plugin import local_note

    return local_note(new_local, base, lambda: unserved)


def test_flows_on_an_unserved_device_keep_the_baseline() -> None:
    assert note(12, 10, ["eth0"]) == (2, ["eth0"], 10)


def test_served_flows_move_the_baseline_up() -> None:
    assert note(12, 10, []) == (2, [], 12)


def test_a_reading_below_the_baseline_is_a_recreated_map() -> None:
    assert note(3, 10, ["eth0"]) == (0, [], 3)


def test_no_reading_moves_nothing() -> None:
    assert note(None, 10, ["eth0"]) == (0, [], 10)


def test_an_unreadable_registry_keeps_the_flows_for_the_next_status() -> None:
    # a transient error must not take the flows so far for served ones
    assert note(12, 10, None) == (2, None, 10)
    assert note(12, 10, ["eth0"]) == (2, ["eth0"], 10)


class Readings:
    """The plugin's stats source for this test: each stats() call takes the next new_local."""

    STATS_MAP, FWD_MAP = XD.STATS_MAP, XD.FWD_MAP
    reads_csum_state = None
    kernctx = True
    build = "compiled"  # as a Datapath says after loading (status reports it)

    def __init__(self, values: list[int]) -> None:
        self.values = iter(values)

    def stats(self) -> dict[str, int]:
        return {"new_local": next(self.values)}


def test_concurrent_status_calls_take_their_readings_in_turn(tmp_path: Path) -> None:
    """A reads 10 and is still deciding when B reads 12 and (all served) moves the baseline to 12:
    A must not then move it back to 10 (which would report B's served flows as unserved)."""
    p = XdpNodePort()
    p.pin = tmp_path
    p.datapath = Readings([10, 12, 12])  # type: ignore[assignment]
    a_deciding, go = threading.Event(), threading.Event()

    def a_served() -> list[str]:
        a_deciding.set()
        go.wait(30)
        return []

    answers = iter([a_served, lambda: [], lambda: ["eth0"]])
    p._unserved_local = lambda: next(answers)()  # type: ignore[method-assign]
    a = threading.Thread(target=p.kpr_status)
    a.start()
    assert a_deciding.wait(30)
    b = threading.Thread(target=p.kpr_status)
    b.start()
    b.join(1)  # without the lock B is done by now; with it, it waits for A
    go.set()
    a.join(30)
    b.join(30)
    assert not a.is_alive() and not b.is_alive()
    st = p.kpr_status()  # 12 again, now unserved: nothing new since the served 12
    assert st.details["localBackendsUnserved"] == [], st


@pytest.fixture
def no_kfunc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(kernctx, "cflags", lambda: ())
    yield


def test_the_kernctx_detail_is_false_for_a_tc_build_without_the_kfunc(tmp_path: Path, no_kfunc: None) -> None:
    assert TD.Datapath(tmp_path).reads_csum_state is False


def test_the_kernctx_detail_is_none_for_xdp(tmp_path: Path) -> None:
    assert XD.Datapath(tmp_path).reads_csum_state is None
