"""Backend ids once kpr_backend's id counter is at the array's end: the id freed longest ago
is taken first (established flows in conntrack may still name one freed a moment ago), also
when the ids were freed before the first one was needed and across the periodic check().

Writer only (no program is compiled); each test in its own scratch pin dir.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.bpf.cleanup import scratch_pin_dir
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel


@pytest.fixture
def pin_path() -> Iterator[Path]:
    with scratch_pin_dir() as pin:
        yield pin
    assert not pin.exists()


def _svc(i: int) -> Service:
    return Service(ServiceKey("reuse", f"s{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.6.{i}", 80, Protocol.TCP,
                                                           (Backend(f"10.1.6.{i}", 8080),)),))


@pytest.mark.parametrize("check_between", [False, True], ids=["no-check", "check"])
def test_the_id_freed_longest_ago_is_taken_first(pin_path: Path, check_between: bool) -> None:
    with ServiceMapWriter(pin_path, sizes={"kpr_backend": 8}) as w:  # an array: ids 1..7
        assert w.apply_batch([("sync", None)] + [("upsert", _svc(i)) for i in range(1, 8)]) == {}
        assert sorted(w.backend_ids().values()) == list(range(1, 8))  # the counter is at the end
        for i in (5, 2, 6):  # freed in this order
            assert w.apply_batch([("delete", ServiceKey("reuse", f"s{i}"))]) == {}
        if check_between:
            assert w.check() == 0  # nothing to repair; the shadow is rebuilt from the maps
        got = []
        for i in (11, 12, 13):
            assert w.apply_batch([("upsert", _svc(i))]) == {}
            got.append(w.backend_ids()[f"10.1.6.{i}:8080/TCP"])
        assert got == [5, 2, 6]
        # none left: refused by name, nothing written
        assert w.apply_batch([("upsert", _svc(14))]) == {}
        assert w.refused[ServiceKey("reuse", "s14")].map == "kpr_backend"
        assert "10.1.6.14:8080/TCP" not in w.backend_ids()
