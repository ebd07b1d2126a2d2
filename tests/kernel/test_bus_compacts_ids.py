"""An agent's bus moves the service map writer's new backend identities into its compact
table (ServiceMapWriter.compact_ids) once every plugin has the initial state, before it
settles the process's memory: what the move frees is then given back by the settle, not
left behind by the writer's checker thread half a second later.

Writer only (no program is compiled), in a scratch pin dir; the bus synchronous, with no
checker thread (kpr_start is not called): nothing else moves the identities.
"""

from __future__ import annotations

import pytest

from kpr import memory
from kpr.bus import EventBus
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.bpffs import scratch_pin_dir

pytestmark = pytest.mark.kernel


def _service(i: int) -> Service:
    bes = tuple(Backend(f"10.8.{i}.{j}", 8080) for j in range(1, 5))
    return Service(ServiceKey("bus-compact", f"s{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.8.{i}", 80, Protocol.TCP, bes),))


@pytest.mark.parametrize("settle", [True, False])
def test_the_writers_identities_are_compacted_before_the_settle(
    settle: bool, monkeypatch: pytest.MonkeyPatch, require_kernel: None
) -> None:
    # (the real settle freezes every object of the test process: recorded instead, with how
    # many identities still waited in the writer's dict at that moment)
    at_settle: list[int] = []
    with scratch_pin_dir("kpr-t") as pin:
        with ServiceMapWriter(pin, create_datapath_maps=False) as w:
            monkeypatch.setattr(memory, "settle", lambda: at_settle.append(w._backend_ids.pending()))
            monkeypatch.setattr(memory, "trim", lambda: None)
            bus = EventBus(settle_memory=settle, synchronous=True)
            got: list[str] = []
            bus.add_plugin("p", lambda hook, **kw: got.append(hook))
            bus.set_writer("servicemaps", w)
            bus.start()
            for i in range(1, 11):
                bus.upsert(_service(i))
            bus.sync_complete()
            assert bus.synced() and "kpr_sync_complete" in got
            assert len(w.backend_ids()) == 40
            if settle:
                assert at_settle == [0]
                assert w._backend_ids.pending() == 0
            else:  # a test's bus tends no memory: the identities wait for the checker thread
                assert at_settle == []
                assert w._backend_ids.pending() == 40
