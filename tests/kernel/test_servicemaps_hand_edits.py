"""The writer's maps edited by hand (as with bpftool): read-back and `kpr explain` decode
what the programs would read without failing, and check() repairs it.

Writer only (no program is compiled); each test in its own scratch pin dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.explain import explain, parse_target
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.readback import DatapathMaps, differences
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel


def _svc(i: int, *addrs: str) -> Service:
    return Service(ServiceKey("edit", f"s{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.7.{i}", 80, Protocol.TCP,
                                                          tuple(Backend(a, 8080) for a in addrs)),))


def _head_key(i: int) -> bytes:
    return M.SVC_KEY.pack(M.addr_to_bytes(f"10.96.7.{i}"), M.htons(80), 6, M.SCOPE_EXTERNAL, 0, 0)


def test_a_slot_base_near_two_to_the_32_wraps_as_in_the_programs(pin_dir: Path) -> None:
    """kpr_lb_slot_backend computes slot_base + slot - 1 in u32: a hand-edited slot_base near
    2^32 wraps to the array's first indexes. Read-back and explain follow it (slot 1 is index
    2^32 - 1, past the array: backend 0; slot 2 index 0, never a slot: backend 0; slot 3
    index 1, the first frontend's first slot) instead of failing."""
    with ServiceMapWriter(pin_dir) as w:
        assert w.apply_batch([("sync", None), ("upsert", _svc(1, "10.1.7.1")), ("upsert", _svc(2, "10.1.7.2"))]) == {}
        first_id = w.backend_ids()["10.1.7.1:8080/TCP"]
        base, count, term, rev_nat, flags, aff = M.SVC_VAL.unpack(w.maps["kpr_svc"].lookup(_head_key(2)))
        assert (count, base) == (1, 2)  # ranges laid out from index 1
        w.maps["kpr_svc"].update(_head_key(2), M.SVC_VAL.pack(0xFFFFFFFF, 3, 0, rev_nat, flags, aff))
        with DatapathMaps(pin_dir) as dm:
            e = dm.service(M.addr_to_bytes("10.96.7.2"), 80, 6, M.SCOPE_EXTERNAL)
            assert e is not None and dm.slots(e) == [0, 0, first_id]
            assert [b["id"] for b in dm.members(e)] == [first_id]
        out = explain(pin_dir, parse_target("10.96.7.2:80"), via="socket")
        assert [b["address"] for b in out["backends"]] == ["10.1.7.1"]
        assert differences(w)["maps"] == {"kpr_svc": 1}
        assert w.check() >= 1 and differences(w)["count"] == 0
        assert M.SVC_VAL.unpack(w.maps["kpr_svc"].lookup(_head_key(2)))[:2] == (base, count)
