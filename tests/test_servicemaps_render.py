"""Rendering of the service map writer, without root: a Service in, map entries out.

The common frontend (every backend active, no local traffic policy) is packed by a fast path;
it must render exactly what the general path renders, fresh and against a previous state
(slot order kept), and the entries must decode to the service.
"""

import random
import struct

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ALGORITHM_ANNOTATION, ServiceMapWriter


def _writer(general: bool = False) -> ServiceMapWriter:
    """A writer that is never opened (rendering needs no maps); `general`: the fast path off."""
    w = ServiceMapWriter("/nonexistent/kpr-render-test")
    if general:
        def via_scopes(out, g, prev, fe, fk, flags, maglev, bids):  # noqa: ANN001, ANN202
            w._render_scopes(out, g, prev, fe, fk, flags, maglev, dict(zip(map(id, fe.backends), bids)), True)

        w._render_simple = via_scopes  # type: ignore[method-assign]
    return w


def _service(rnd: random.Random, i: int, n_backends: int | None = None, **fe_kw: object) -> Service:
    n = rnd.randrange(0, 12) if n_backends is None else n_backends
    v6 = rnd.random() < 0.3
    pool = [f"fd00::{rnd.randrange(1, 40):x}" if v6 else f"10.0.{rnd.randrange(0, 3)}.{rnd.randrange(1, 40)}" for _ in range(n)]
    bes = tuple(Backend(a, rnd.choice((80, 8080)), local=rnd.random() < 0.3) for a in pool)
    kind = rnd.choice((FrontendType.CLUSTER_IP, FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP))
    vip = f"fd01::{i:x}" if v6 else f"10.96.0.{i}"
    fe = Frontend(kind, vip, 80, rnd.choice((Protocol.TCP, Protocol.UDP)), bes, **fe_kw)  # type: ignore[arg-type]
    ann = ((ALGORITHM_ANNOTATION, "maglev"),) if rnd.random() < 0.2 else ()
    return Service(ServiceKey("t", f"s{i}"), (fe,), annotations=ann)


def _picture(groups: dict) -> dict:
    return {
        fk: (g.rev_nat, g.revnat, g.packed_svc(), g.n_svc, g.order_of(0), g.order_of(1),
             tuple(g.backends), dict(g.maglev), g.srcrange, g.owner, g.base, g.span, g.slot_vals)
        for fk, g in groups.items()
    }


def _render_both(fast: ServiceMapWriter, general: ServiceMapWriter, svc: Service) -> tuple[dict, dict]:
    a, b = fast._render(svc), general._render(svc)
    assert fast._pending_vals == general._pending_vals
    return _picture(a), _picture(b)


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_renders_what_the_general_path_renders(seed):
    rnd = random.Random(seed)
    fast, general = _writer(), _writer(general=True)
    for i in range(1, 60):
        extra: dict[str, object] = {"affinity_timeout": 30} if rnd.random() < 0.2 else {}
        if rnd.random() < 0.1:
            extra["source_ranges"] = ("192.0.2.0/24", "2001:db8::/64")
        if rnd.random() < 0.1:  # set on any type: only some types have a local scope
            extra["external_local" if rnd.random() < 0.5 else "internal_local"] = True
        svc = _service(rnd, i, **extra)
        pa, pb = _render_both(fast, general, svc)
        assert pa == pb, svc
        # as if applied: the next render keeps slot order against these groups
        for w in (fast, general):
            w._groups.update(w._render(svc))
            w._begin()
        changed = Service(svc.key, (Frontend(svc.frontends[0].type, svc.frontends[0].address, 80,
                                             svc.frontends[0].protocol, _service(rnd, i).frontends[0].backends[:5]
                                             + svc.frontends[0].backends[2:]),), annotations=svc.annotations)
        pa, pb = _render_both(fast, general, changed)
        assert pa == pb, changed


def test_entries_decode_to_the_service():
    w = _writer()
    bes = tuple(Backend(f"10.1.0.{j}", 8080) for j in (5, 3, 9))
    svc = Service(ServiceKey("t", "a"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.1", 80, Protocol.TCP, bes, affinity_timeout=7),))
    (fk, g), = w._render(svc).items()
    assert fk == M.addr_to_bytes("10.96.0.1") + (80).to_bytes(2, "big") + bytes((6,))
    heads_k, heads_v = g.packed_svc()
    assert g.n_svc == 1  # one kpr_svc entry per frontend scope: the slots are in kpr_slots
    key = struct.Struct("=19sBHH")
    assert [key.unpack(heads_k)] == [(fk, M.SCOPE_EXTERNAL, 0, 0)]
    base, count, term, rev_nat, flags, aff = M.SVC_VAL.unpack(heads_v)
    # new slot values: a range of 3 is wanted, taken once the service is accepted
    assert (base, count, term, aff) == (0, 3, 0, 7) and (g.base, g.span) == (0, 3)
    assert w._place({fk: g}) is None
    # the first range of an empty kpr_slots: index 0 stays unused
    assert (g.base, M.SVC_VAL.unpack(g.packed_svc()[1])[0]) == (1, 1)
    assert flags == M.SVC_F_CLUSTER_IP | M.SVC_F_AFFINITY
    assert rev_nat == g.rev_nat and g.revnat == fk + b"\0"
    vals_u = [M.SLOT.unpack(g.slot_vals[i : i + 8]) for i in range(0, len(g.slot_vals), 8)]
    assert len(vals_u) == 3 and all(v[1] == M.BACKEND_ACTIVE for v in vals_u)
    ids = [v[0] for v in vals_u]
    assert ids == sorted(ids) and tuple(ids) == g.backends
    by_id = {bid: M.bytes_to_addr(w._pending_vals[bid][:16]) for bid in ids}
    assert sorted(by_id.values()) == ["10.1.0.3", "10.1.0.5", "10.1.0.9"]


def test_terminating_and_local_take_the_general_path_and_say_so():
    w = _writer()
    bes = (Backend("10.1.0.1", 80), Backend("10.1.0.2", 80, state=BackendState.TERMINATING))
    svc = Service(ServiceKey("t", "b"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.2", 80, Protocol.TCP, bes),))
    (g,) = w._render(svc).values()
    _hk, hv = g.packed_svc()
    assert M.SVC_VAL.unpack(hv)[1:3] == (1, 1)  # one selectable, one terminating
    states = [M.SLOT.unpack(g.slot_vals[i : i + 8])[1] for i in range(0, len(g.slot_vals), 8)]
    assert states == [M.BACKEND_ACTIVE, M.BACKEND_TERMINATING]


def test_bad_backend_address_is_a_clear_error():
    w = _writer()
    svc = Service(ServiceKey("t", "c"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.3", 80, Protocol.TCP,
                                                  (Backend("10.1.0.300", 80),)),))
    with pytest.raises(ValueError, match="10.1.0.300"):
        w._render(svc)


def test_new_ids_stay_below_the_array_and_skip_ids_in_use():
    """kpr_backend is an array: once the counter reaches its end, new ids start again from 1
    and skip any in use."""
    w = _writer()
    top = w.limits["kpr_backend"]
    w._backend_vals[2] = bytes(24)
    w._backend_vals[top] = bytes(24)
    w._next_backend = top + 1
    svc = Service(ServiceKey("t", "w"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.4", 80, Protocol.TCP,
                                                  tuple(Backend(f"10.1.0.{j}", 80) for j in (1, 2, 3))),))
    (g,) = w._render(svc).values()
    assert g.backends == (1, 3, 4)
    (g,) = w._render(Service(ServiceKey("t", "x"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.5", 80, Protocol.TCP,
                                                             (Backend("10.1.0.9", 80),)),))).values()
    assert g.backends == (5,)


def test_freed_ids_are_taken_oldest_first_once_the_counter_is_at_the_end():
    from collections import deque

    w = _writer()
    w._next_backend = w.limits["kpr_backend"] + 1
    w._free_ids = deque([7, 3, 9])  # freed in this order
    w._backend_vals[3] = bytes(24)  # taken again meanwhile (adopted): skipped
    got = []
    for j in range(3):
        svc = Service(ServiceKey("t", f"f{j}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.1.{j}", 80, Protocol.TCP,
                                                           (Backend(f"10.1.1.{j}", 80),)),))
        (g,) = w._render(svc).values()
        got.append(g.backends)
    assert got[:2] == [(7,), (9,)]
    # none left: an id past the array, which the writer refuses (never written)
    assert got[2][0] > w.limits["kpr_backend"] and w._place(w._render(svc)) == ("kpr_backend", 1, w.limits["kpr_backend"] - 1)


def test_two_new_backends_never_share_the_counters_last_id():
    """The counter hands out kpr_backend's last id to one new backend and runs out: the next
    new backend of the same frontend must not get that id again from the queue of free ids
    (it is not in the table yet, only pending): it gets an id past the array, refused."""
    w = ServiceMapWriter("/nonexistent/kpr-render-test", sizes={"kpr_backend": 8})
    top = w.limits["kpr_backend"]  # 7: ids 1..7
    for bid in range(1, top):
        w._backend_vals[bid] = bytes(24)
    w._next_backend = top
    svc = Service(ServiceKey("t", "last"), (Frontend(FrontendType.CLUSTER_IP, "10.96.2.1", 80, Protocol.TCP,
                                                     (Backend("10.1.2.1", 80), Backend("10.1.2.2", 80))),))
    groups = w._render(svc)
    (g,) = groups.values()
    assert len(set(g.backends)) == 2, g.backends
    assert top in g.backends and max(g.backends) > top
    assert w._place(groups)[:2] == ("kpr_backend", 1)


def test_more_backends_than_a_service_entry_counts_is_a_clear_error():
    """kpr_svc_val's count is a u16: a scope of 65536 backends is refused by name, not with
    struct's 'ushort format requires ...'."""
    bes = tuple(Backend(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 80) for i in range(65536))
    svc = Service(ServiceKey("t", "huge"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.9", 80, Protocol.TCP, bes),))
    for general in (False, True):
        with pytest.raises(ValueError, match=r"10.96.0.9:80/TCP: 65536 backends in one scope, more than the 65535"):
            _writer(general)._render(svc)


def test_backend_ids_carry_the_generation_of_their_index():
    """id = gen << 24 | index (lib/maps.h): round trip, the last generation's ids still a u32,
    and the generation after the last is 0."""
    for index, gen in ((1, 0), (5, 3), (M.BACKEND_INDEX_MASK, M.BACKEND_GENS - 1)):
        assert M.backend_index(M.backend_id(index, gen)) == (index, gen)
    assert M.backend_id(7, 0) == 7  # generation 0: the id is the index (ids written before generations)
    assert M.backend_id(M.BACKEND_INDEX_MASK, M.BACKEND_GENS - 1) == 0xFFFFFFFF
    value = M.with_backend_gen(bytes(M.BACKEND.size), 0x123456)
    assert len(value) == M.BACKEND.size and M.backend_gen(value) == 0x123456 and value[20] == 0  # flags untouched
    w = _writer()
    w._set_gens({3: M.BACKEND_GENS - 1, 4: 2})
    assert w._next_gens([3, 4, 5]) == [0, 3, 1]


@pytest.mark.parametrize("general", [False, True], ids=["fast", "general"])
def test_rendered_slots_maglev_and_values_carry_the_generation(general):
    """An index in its third generation: kpr_slots and the Maglev input name it by its id with
    the generation; the kpr_backend value stores the generation (kpr_lb_backend compares)."""
    w = _writer(general)
    w._set_gens({1: 2})
    svc = Service(ServiceKey("t", "gen"), (Frontend(FrontendType.CLUSTER_IP, "10.96.9.1", 80, Protocol.TCP,
                                                    (Backend("10.1.9.1", 80), Backend("10.1.9.2", 80))),),
                  annotations=((ALGORITHM_ANNOTATION, "maglev"),))
    g, = w._render(svc).values()
    assert list(g.order_of(0)) == [1, 2]  # the writer's own ids: indexes
    words = struct.unpack(f"={len(g.slot_vals) // 4}I", g.slot_vals)
    assert sorted(words[0::2]) == [2, 2 << 24 | 1]
    assert sorted(bid for _, bid in g.maglev[0]) == [2, 2 << 24 | 1]
    assert M.backend_gen(w._pending_vals[1]) == 2 and M.backend_gen(w._pending_vals[2]) == 0


def test_usual_slot_values_are_not_kept_but_made_again_equal():
    """A group whose slots are its order's ids, every one active, of generation 0 keeps no
    slot values (_Group.slot_vals makes them again: the same bytes); one whose ids carry a
    generation keeps them (made again from its order, they would lose it)."""
    svc = Service(ServiceKey("t", "usual"), (Frontend(FrontendType.CLUSTER_IP, "10.96.9.2", 80, Protocol.TCP,
                                                      (Backend("10.1.9.4", 80), Backend("10.1.9.3", 80))),))
    w = _writer()
    g, = w._render(svc).values()
    assert g._sv is None and g.n_slots == 2
    assert g.slot_vals == M.SLOT.pack(1, M.BACKEND_ACTIVE) + M.SLOT.pack(2, M.BACKEND_ACTIVE)
    assert g.same_slots(g) and g.backends == (1, 2)
    w = _writer()
    w._set_gens({2: 1})
    g, = w._render(svc).values()
    assert g._sv is not None and g.slot_vals == M.SLOT.pack(1, M.BACKEND_ACTIVE) + M.SLOT.pack(1 << 24 | 2, M.BACKEND_ACTIVE)
