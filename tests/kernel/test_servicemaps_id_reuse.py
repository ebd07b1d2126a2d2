"""Backend ids once kpr_backend's id counter is at the array's end: the id freed longest ago
is taken first (established flows in conntrack may still name one freed a moment ago), also
when the ids were freed before the first one was needed and across the periodic check().

Writer only (no program is compiled); each test in its own scratch pin dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel


def _svc(i: int) -> Service:
    return Service(ServiceKey("reuse", f"s{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.6.{i}", 80, Protocol.TCP,
                                                           (Backend(f"10.1.6.{i}", 8080),)),))


@pytest.mark.parametrize("check_between", [False, True], ids=["no-check", "check"])
def test_the_id_freed_longest_ago_is_taken_first(pin_dir: Path, check_between: bool) -> None:
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 8}) as w:  # an array: ids 1..7
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
        # the same indexes, each in its next generation (ids that flows of the freed backends
        # hold no longer name them: lib/lb.h kpr_lb_backend)
        assert [M.backend_index(b) for b in got] == [(5, 1), (2, 1), (6, 1)]
        # none left: refused by name, nothing written
        assert w.apply_batch([("upsert", _svc(14))]) == {}
        assert w.refused[ServiceKey("reuse", "s14")].map == "kpr_backend"
        assert "10.1.6.14:8080/TCP" not in w.backend_ids()


def test_a_service_that_fails_to_render_leaves_no_id_behind(pin_dir: Path) -> None:
    """A render that fails part way (a bad backend address in the second frontend) has taken
    ids for the backends before it; they must be forgotten, or the backend keeps an id that
    is later handed to another backend: both would then share one kpr_backend entry."""
    def one(name: str, addr: str, vip: str) -> Service:
        return Service(ServiceKey("reuse", name), (Frontend(FrontendType.CLUSTER_IP, vip, 80, Protocol.TCP,
                                                            (Backend(addr, 8080),)),))

    bad = Service(ServiceKey("reuse", "bad"), (
        Frontend(FrontendType.CLUSTER_IP, "10.96.6.100", 80, Protocol.TCP, (Backend("10.1.5.1", 8080),)),
        Frontend(FrontendType.CLUSTER_IP, "10.96.6.101", 80, Protocol.TCP,
                 (Backend("10.1.5.2", 8080), Backend("10.1.5.300", 8080))),
    ))
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:  # an array: ids 1..3
        assert w.apply_batch([("sync", None)]) == {}
        with pytest.raises(ValueError, match="10.1.5.300"):
            w.upsert(bad)
        for name, addr, vip in (("a", "10.1.5.3", "10.96.6.102"), ("b", "10.1.5.4", "10.96.6.103"),
                                ("c", "10.1.5.1", "10.96.6.104")):
            w.upsert(one(name, addr, vip))
        read = w.read_back()["frontends"]
        assert [read[f"10.96.6.{i}:80/TCP external"]["backends"] for i in (102, 103, 104)] == [
            ["10.1.5.3:8080"], ["10.1.5.4:8080"], ["10.1.5.1:8080"]
        ]
        assert sorted(w.backend_ids().values()) == [1, 2, 3]


def _entry(pin_dir: Path, index: int) -> bytes:
    with M.BpfMap.open_pinned(pin_dir / "kpr_backend") as m:
        raw = m.lookup(M.U32.pack(index))
    assert raw is not None
    return raw


def _kernel_ids(w: ServiceMapWriter, vip: str) -> list[int]:
    return w.read_back()["frontends"][f"{vip}:80/TCP external"]["backend_ids"]


def test_an_index_given_again_takes_the_next_generation_also_after_a_restart(pin_dir: Path) -> None:
    """Freed, an index's zero entry keeps the generation its next backend takes; a writer that
    adopts the maps (a restart) continues from the stored generations, so it never hands out
    again an id that conntrack may still hold for a deleted backend."""
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:  # an array: indexes 1..3
        assert w.apply_batch([("sync", None)] + [("upsert", _svc(i)) for i in range(1, 4)]) == {}
        assert w.backend_ids()["10.1.6.2:8080/TCP"] == 2  # generation 0: the id is the index
        assert w.apply_batch([("delete", ServiceKey("reuse", "s2"))]) == {}
        freed = _entry(pin_dir, 2)
        assert freed[18] == 0 and M.backend_gen(freed) == 1  # no backend; the next generation kept
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:  # adopts the pinned maps
        # (re-delivered, then sync complete: what the agent's initial state does)
        assert w.apply_batch([("upsert", _svc(i)) for i in (1, 3, 4)] + [("sync", None)]) == {}
        bid = w.backend_ids()["10.1.6.4:8080/TCP"]
        assert M.backend_index(bid) == (2, 1) and bid == 1 << 24 | 2
        assert _kernel_ids(w, "10.96.6.4") == [bid]  # what the programs read in kpr_slots
        assert M.backend_gen(_entry(pin_dir, 2)) == 1 and _entry(pin_dir, 2)[18] == 6
        assert w.check() == 0  # the generation is part of the desired state: nothing to repair
        assert w.apply_batch([("delete", ServiceKey("reuse", "s4"))]) == {}
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:
        assert w.apply_batch([("upsert", _svc(i)) for i in (1, 3, 5)] + [("sync", None)]) == {}
        assert w.backend_ids()["10.1.6.5:8080/TCP"] == 2 << 24 | 2
        assert _kernel_ids(w, "10.96.6.5") == [2 << 24 | 2]
        # a restart that adopts a live entry keeps its id (the slots and flows name it)
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:
        assert w.backend_ids()["10.1.6.5:8080/TCP"] == 2 << 24 | 2
        assert w.apply_batch([("upsert", _svc(i)) for i in (1, 3, 5)] + [("sync", None)]) == {}
        assert _kernel_ids(w, "10.96.6.5") == [2 << 24 | 2]


def test_a_backend_deleted_while_a_map_is_tight_is_freed_in_the_shadow_too(pin_dir: Path) -> None:
    """A change that would not fit beside what it replaces deletes first (ApplyMixin's tight
    path: kpr_revnat full here). The backends it deletes must leave the writer's shadow as
    well: kept there, the backend's id stayed taken with its old generation while the kernel's
    entry was zeroed, so the backend, re-added, was never written (its service pointed at an
    empty entry) and its index never took the next generation."""
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 8, "kpr_revnat": 3}) as w:
        assert w.apply_batch([("sync", None)] + [("upsert", _svc(i)) for i in range(1, 4)]) == {}
        # s2 moves to another address and backend: one upsert (its old frontend goes)
        moved = Service(ServiceKey("reuse", "s2"), (Frontend(FrontendType.CLUSTER_IP, "10.96.6.4", 80, Protocol.TCP,
                                                             (Backend("10.1.6.4", 8080),)),))
        assert w.apply_batch([("upsert", moved)]) == {}
        assert "10.1.6.2:8080/TCP" not in w.backend_ids()
        assert M.backend_gen(_entry(pin_dir, 2)) == 1 and _entry(pin_dir, 2)[18] == 0
        assert w.check() == 0
        assert w.apply_batch([("upsert", _svc(2))]) == {}
        read = w.read_back()["frontends"]
        assert read["10.96.6.2:80/TCP external"]["backends"] == ["10.1.6.2:8080"]
        assert w.check() == 0


def test_an_entry_a_repair_frees_keeps_its_next_generation(pin_dir: Path) -> None:
    """check() deletes a backend entry nothing wants (one written by hand, or by another
    writer): programs may hold its id, so its index's next backend must take the next
    generation, as after any other delete. The repair restored the desired state's
    generations afterwards and lost that bump: the next backend at the index got the freed
    entry's id again."""
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:  # an array: indexes 1..3
        assert w.apply_batch([("sync", None)] + [("upsert", _svc(i)) for i in (1, 2)]) == {}
        stray = M.addr_to_bytes("10.1.6.9") + (8080).to_bytes(2, "big") + bytes((6, 0, 0, 0, 0, 0))
        with M.BpfMap.open_pinned(pin_dir / "kpr_backend") as m:
            m.update(M.U32.pack(3), stray)  # id 3 (generation 0) in the kernel's eyes
        assert w.check() == 1
        assert M.backend_gen(_entry(pin_dir, 3)) == 1 and _entry(pin_dir, 3)[18] == 0
        assert w.apply_batch([("upsert", _svc(3))]) == {}
        assert w.backend_ids()["10.1.6.3:8080/TCP"] == 1 << 24 | 3
        assert _kernel_ids(w, "10.96.6.3") == [1 << 24 | 3]
        assert w.check() == 0


def test_entries_an_older_kpr_freed_take_generation_1_once_adopted(pin_dir: Path) -> None:
    """A kpr_backend pinned by a kpr without generations: an entry it freed is all zero, so
    generation 0, the id flows in conntrack may still hold for the backend it deleted. Once
    adopted, such an entry (below the highest id in use: the counter handed it out before)
    gives its next backend generation 1."""
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:  # an array: indexes 1..3
        assert w.apply_batch([("sync", None)] + [("upsert", _svc(i)) for i in range(1, 4)]) == {}
    with M.BpfMap.open_pinned(pin_dir / "kpr_backend") as m:
        m.update(M.U32.pack(2), bytes(m.value_size))  # as the older kpr deleted backend 2
    with M.BpfMap.open_pinned(pin_dir / "kpr_svc") as m:
        m.delete_many([k for k in m.keys() if k[:16] == M.addr_to_bytes("10.96.6.2")], batch=False)
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 4}) as w:  # adopts
        assert w.apply_batch([("upsert", _svc(i)) for i in (1, 3, 4)] + [("sync", None)]) == {}
        assert w.backend_ids()["10.1.6.4:8080/TCP"] == 1 << 24 | 2
        assert _kernel_ids(w, "10.96.6.4") == [1 << 24 | 2]
        assert w.check() == 0
