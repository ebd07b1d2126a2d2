"""A full sync keeps the cyclic collector off until it ends, whatever other threads' pauses do
(kpr.memory.paused counts them: the files source's pass, ending in the middle of the agent's
initial sync, turned the collector back on there when the writer used gc.disable()), and
freezes nothing for its own sake: a freeze takes the whole process's heap, the caller's garbage
cycles with it (the agent's settle once it is ready freezes what survives, kpr.memory.settle)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from kpr import memory
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel


def _services(n: int) -> list[Service]:
    return [
        Service(ServiceKey("ns", f"s{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.{i // 250}.{i % 250 + 1}", 80,
                                                      Protocol.TCP, (Backend(f"10.1.{i // 250}.{i % 250 + 1}", 8080),)),))
        for i in range(n)
    ]


def test_another_pause_ending_leaves_the_collector_off_during_the_sync(pin_dir: Path) -> None:
    seen: list[bool] = []
    other = memory.paused()  # as another thread's pause, begun before the sync
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 4096, "kpr_backend": 4096}, frontend_table=False) as w:
        common = w._common

        def common_then_other_ends(services):  # (the other pause ends in the middle of the sync)
            other.__exit__(None, None, None)
            seen.append(gc.isenabled())
            return common(services)

        w._common = common_then_other_ends  # type: ignore[method-assign]
        was = gc.isenabled()
        gc.enable()
        try:
            other.__enter__()
            w.full_sync(_services(200))
            assert len(w._groups) == 200
            assert seen == [False]
            assert gc.isenabled()
        finally:
            if not was:
                gc.disable()


class _Node:
    pass


def test_a_full_sync_leaves_the_callers_cycles_to_the_collector(pin_dir: Path) -> None:
    was = gc.isenabled()
    gc.enable()
    frozen = gc.get_freeze_count()
    try:
        with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 4096, "kpr_backend": 4096}, frontend_table=False) as w:
            a, b = _Node(), _Node()
            a.other, b.other = b, a  # a cycle the caller made, nothing to do with the writer
            alive = weakref.ref(a)
            del a, b
            w.full_sync(_services(20))
            assert gc.get_freeze_count() == frozen
            gc.collect()
            assert alive() is None, "the caller's cycle was frozen"
    finally:
        if gc.get_freeze_count() != frozen:
            gc.unfreeze()  # (a failed run's freeze: later tests' cycles collected again)
        if not was:
            gc.disable()
