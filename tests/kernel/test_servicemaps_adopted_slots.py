"""Groups a restart adopts from the pinned maps keep their kpr_slots values only where they
are not the usual ones (every slot active, ids of generation 0: made again from the order
when asked, _Group.slot_vals), as rendering and the bulk full sync leave fresh groups: the
same values, the same maps after the restart's full sync and check, and 2.4 MB fewer at
20k services.

Writer only (no program is compiled); each test in its own scratch pin dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel


def _svc(i: int, n: int = 2, terminating: bool = False) -> Service:
    bes = tuple(
        Backend(f"10.1.9.{10 * i + j}", 8080, state=BackendState.TERMINATING if terminating and j == 0 else BackendState.ACTIVE)
        for j in range(n)
    )
    return Service(ServiceKey("adopt", f"s{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.9.{i}", 80, Protocol.TCP, bes),))


def _slots(w: ServiceMapWriter) -> dict[bytes, bytes]:
    return {fk: g.slot_vals for fk, g in w._groups.items()}


def _kept(w: ServiceMapWriter) -> set[str]:
    """The services (by their frontend address: adopted groups have no owner yet) whose
    groups keep their slot values."""
    return {_name(fk) for fk, g in w._groups.items() if g._sv is not None}


def test_adopted_groups_keep_only_slot_values_that_are_not_the_usual_ones(pin_dir: Path) -> None:
    # s1, s2: usual; s3: a terminating backend; s5: one id in its next generation (s4's
    # backend freed, then taken again by s5)
    first = [_svc(1), _svc(2), _svc(3, terminating=True), Service(ServiceKey("adopt", "s4"), _svc(4, 1).frontends)]
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 8}) as w:  # ids 1..7, all taken: the counter ends
        assert w.apply_batch([("sync", None)] + [("upsert", s) for s in first]) == {}
        assert w.apply_batch([("delete", ServiceKey("adopt", "s4"))]) == {}
        assert w.apply_batch([("upsert", _svc(5, 1))]) == {}
        assert any(w._backend_gen or ())  # (the case exists: a generation above 0)
        want_slots, want_maps = _slots(w), w.read_back()
        assert _kept(w) == {"s3", "s5"}
        live = [_svc(1), _svc(2), _svc(3, terminating=True), _svc(5, 1)]
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 8}) as w2:  # a restart adopts them
        assert _slots(w2) == want_slots
        assert _kept(w2) == {"s3", "s5"}  # was every group before
        w2.full_sync(live)
        assert w2.read_back() == want_maps and _slots(w2) == want_slots
        assert w2.check() == 0 and w2.read_back() == want_maps
        assert _kept(w2) == {"s3", "s5"}


def test_a_groups_one_service_key_is_the_frontend_key_it_is_held_by(pin_dir: Path) -> None:
    """The usual group's one kpr_svc key (external scope) is kept as the frontend key alone,
    the object `_groups` holds the group by (_Group.set_head): 64 bytes fewer a frontend.
    What it hands out is the whole key, in the bulk full sync, rendering and a restart."""
    live = [_svc(1), _svc(2), _svc(3, terminating=True)]

    def check_heads(w: ServiceMapWriter, shared: set[str]) -> None:
        for fk, g in w._groups.items():
            keys, vals = g.packed_svc()
            assert keys == fk + bytes(5) and g.svc == {keys: vals}
        assert {n for n in _by_name(w) if _by_name(w)[n]._svc_keys is _fk_of(w, n)} == shared

    with ServiceMapWriter(pin_dir) as w:
        # (s3, with a terminating backend, is rendered by the general path: keys of its own)
        w.full_sync(live)  # the bulk full sync (empty maps)
        check_heads(w, {"s1", "s2"})
        w.upsert(_svc(4))  # rendered
        check_heads(w, {"s1", "s2", "s4"})
    with ServiceMapWriter(pin_dir) as w2:  # adopted: every one-entry external group
        check_heads(w2, {"s1", "s2", "s3", "s4"})
        w2.full_sync(live + [_svc(4)])
        assert w2.check() == 0


def _name(fk: bytes) -> str:
    return f"s{M.bytes_to_addr(fk[:16]).rsplit('.', 1)[1]}"


def _by_name(w: ServiceMapWriter) -> dict:
    return {_name(fk): g for fk, g in w._groups.items()}


def _fk_of(w: ServiceMapWriter, name: str) -> bytes:
    return next(fk for fk in w._groups if _name(fk) == name)


def _picture(g) -> dict:
    """What a group says of the maps (all but its owner, which a restart learns later)."""
    return {
        "rev_nat": g.rev_nat, "revnat": g.revnat, "svc": g.packed_svc(), "n_svc": g.n_svc,
        "order": (g.order_of(0), g.order_of(1)), "backends": g.backends, "base": g.base, "span": g.span,
        "slot_vals": g.slot_vals, "kept": g._sv is not None, "maglev": g.maglev, "srcrange": g.srcrange,
    }


def test_adopted_groups_are_the_groups_the_writer_made(pin_dir: Path) -> None:
    # The usual frontend is adopted as bulk rendering makes it (_Group.fresh, reconcile's
    # unrolled case); the others by the general case. Each must say what the writer that
    # wrote them said, and a restart's full sync and check must change nothing.
    live = [_svc(1), _svc(2, n=5), _svc(3, terminating=True), _svc(6, n=1)]
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 16}) as w:
        w.full_sync(live)  # bulk: 1, 2, 6; the general path: 3
        w.upsert(_svc(7, n=3))  # rendered
        w.upsert(Service(ServiceKey("adopt", "s8"), _svc(8, 1).frontends))
        w.delete(ServiceKey("adopt", "s8"))
        w.upsert(_svc(9, 1))  # s8's backend id again, in its next generation
        want = {_name(fk): _picture(g) for fk, g in w._groups.items()}
        maps = w.read_back()
    with ServiceMapWriter(pin_dir, sizes={"kpr_backend": 16}) as w2:
        assert {_name(fk): _picture(g) for fk, g in w2._groups.items()} == want
        w2.full_sync(live + [_svc(7, n=3), _svc(9, 1)])
        assert w2.read_back() == maps and w2.check() == 0
