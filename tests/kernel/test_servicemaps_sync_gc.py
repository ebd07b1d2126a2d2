"""A full sync keeps the cyclic collector off until it ends, whatever other threads' pauses do
(kpr.memory.paused counts them: the files source's pass, ending in the middle of the agent's
initial sync, turned the collector back on there when the writer used gc.disable()), and
freezes the shadow it leaves (the model's fate too: out of later collections' walks)."""

from __future__ import annotations

import gc
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
            frozen = gc.get_freeze_count()
            w.full_sync(_services(200))
            assert len(w._groups) == 200
            assert seen == [False]
            assert gc.isenabled()
            group = next(iter(w._groups.values()))
            assert gc.get_freeze_count() > frozen and not any(group is o for o in gc.get_objects())
        finally:
            gc.unfreeze()
            if not was:
                gc.disable()
