"""A full sync into empty maps takes the list-at-a-time path (kpr.servicemaps.bulk) when every
service is the common kind, and leaves exactly what the general path, service by service,
leaves: the same map contents and the same shadow, so later changes behave the same.

Writer only (no program is compiled); each test in its own scratch pin dir.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel


def _services(seed: int, n: int = 60) -> list[Service]:
    """Common services with what the bulk path must get right: backends shared between
    services and listed twice in one, IPv6, other ports and protocols, node-local backends,
    affinity, no backends at all; keys not in order."""
    rnd = random.Random(seed)
    out = []
    for i in rnd.sample(range(n), n):
        v6 = rnd.random() < 0.2
        pool = [f"fd00::{rnd.randrange(1, 90):x}" if v6 else f"10.1.{rnd.randrange(0, 2)}.{rnd.randrange(1, 90)}"
                for _ in range(rnd.randrange(0, 9))]
        port = rnd.choice((8080, 8080, 9090))
        bes = tuple(Backend(a, port if rnd.random() < 0.8 else 7070, local=rnd.random() < 0.2) for a in pool)
        proto = rnd.choice((Protocol.TCP, Protocol.TCP, Protocol.UDP))
        kind = rnd.choice((FrontendType.CLUSTER_IP, FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP))
        vip = f"fd01::{i + 1:x}" if v6 else f"10.96.7.{i + 1}"
        aff = 30 if rnd.random() < 0.2 else 0
        out.append(Service(ServiceKey(f"ns{i % 3}", f"s{i}"), (Frontend(kind, vip, 80, proto, bes, affinity_timeout=aff),)))
    return out


def _picture(w: ServiceMapWriter) -> dict:
    """The maps as read back and the writer's whole shadow."""
    groups = {
        fk: (g.rev_nat, g.revnat, g.packed_svc(), g.n_svc, g.order_of(0), g.order_of(1), tuple(g.backends),
             dict(g.maglev), g.srcrange, g.owner, g.base, g.span, g.slot_vals)
        for fk, g in w._groups.items()
    }
    slots = w._slots
    return {
        "maps": w.read_back(),
        "kernel_counts": w.kernel_counts(),
        "entry_counts": w.entry_counts(),
        "groups": groups,
        "by_service": {k: tuple(sorted(v)) for k, v in w._by_service.items()},
        "backend_ids": dict(w._backend_ids),
        "backend_vals": dict(w._backend_vals.items()),
        "backend_refs": dict(w._backend_refs.items()),
        "revnat": (dict(w._revnat_ids), set(w._revnat_used), w._next_revnat),
        "next_backend": w._next_backend,
        "count": dict(w._count),
        "slots": (slots.top, slots.used, dict(slots.live), slots.held),
        "refused": dict(w.refused), "conflicts": dict(w.conflicts), "errors": w.errors,
    }


def _general(w: ServiceMapWriter) -> ServiceMapWriter:
    w._bulk_sync = lambda services: False  # type: ignore[method-assign]
    return w


def _sync_both(
    pin_dir: Path, services: list[Service], bulk: bool, **kw: object
) -> tuple[ServiceMapWriter, ServiceMapWriter]:
    """Writers a (as built) and b (general path only), each after a full sync of `services`;
    asserts whether a's took the bulk path."""
    a = ServiceMapWriter(pin_dir / "bulk", create_datapath_maps=False, **kw).open()  # type: ignore[arg-type]
    b = _general(ServiceMapWriter(pin_dir / "general", create_datapath_maps=False, **kw).open())  # type: ignore[arg-type]
    took: list[bool] = []
    real = a._bulk_sync
    a._bulk_sync = lambda svcs: took.append(real(svcs)) or took[-1]  # type: ignore[method-assign]
    a.full_sync(services)
    del a._bulk_sync
    b.full_sync(services)
    assert took == [bulk]
    return a, b


@pytest.mark.parametrize("seed", range(3))
def test_bulk_full_sync_leaves_what_the_general_path_leaves(pin_dir: Path, seed: int) -> None:
    services = _services(seed)
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        assert _picture(a) == _picture(b)
        # later changes behave the same on both: a service changed, one deleted, one added,
        # and a second full sync (over full maps: the general path on both)
        rnd = random.Random(seed)
        changed = services[0]
        fe = changed.frontends[0]
        more = (*fe.backends[1:], Backend("10.1.9.9", 8080), Backend("10.1.9.10", 8080, state=BackendState.TERMINATING))
        changed = Service(changed.key, (Frontend(fe.type, fe.address, fe.port, fe.protocol, more),))
        for w in (a, b):
            w.upsert(changed)
            w.delete(services[1].key)
            w.upsert(_services(seed + 100, 1)[0])
        assert _picture(a) == _picture(b)
        again = rnd.sample(services[2:], len(services) // 2)
        a.full_sync(again)
        b.full_sync(again)
        assert _picture(a) == _picture(b)
        assert a.check() == 0 == b.check()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "odd",
    [
        Frontend(FrontendType.NODE_PORT, "192.0.2.1", 30080, Protocol.TCP, (Backend("10.1.0.1", 8080),)),
        Frontend(FrontendType.CLUSTER_IP, "10.96.8.1", 80, Protocol.TCP,
                 (Backend("10.1.0.1", 8080, state=BackendState.TERMINATING),)),
        Frontend(FrontendType.LOAD_BALANCER, "192.0.2.2", 80, Protocol.TCP, (Backend("10.1.0.2", 8080),),
                 source_ranges=("198.51.100.0/24",)),
        Frontend(FrontendType.LOAD_BALANCER, "192.0.2.3", 80, Protocol.TCP, (Backend("10.1.0.3", 8080),),
                 external_local=True),
        Frontend(FrontendType.CLUSTER_IP, "10.96.8.300", 80, Protocol.TCP, (Backend("10.1.0.4", 8080),)),  # bad
        None,  # the first service's frontend again: a conflict
    ],
    ids=["nodeport", "terminating", "source-ranges", "local-policy", "bad-address", "conflict"],
)
def test_any_other_service_takes_the_general_path_with_the_same_result(pin_dir: Path, odd: Frontend | None) -> None:
    services = _services(7, 20)
    services.append(Service(ServiceKey("ns0", "odd"), (odd or services[0].frontends[0],)))
    a, b = _sync_both(pin_dir, services, bulk=False)
    try:
        assert _picture(a) == _picture(b)
        assert a.errors + len(a.conflicts) + len(a._groups) > 0
    finally:
        a.close()
        b.close()


def test_bulk_full_sync_that_does_not_fit_is_planned_service_by_service(pin_dir: Path) -> None:
    """kpr_backend too small for every service: the general path refuses the last ones by name."""
    services = _services(3, 30)
    a, b = _sync_both(pin_dir, services, bulk=False, sizes={"kpr_backend": 40})
    try:
        assert a.refused and set(a.refused) == set(b.refused)
        assert _picture(a) == _picture(b)
    finally:
        a.close()
        b.close()


def test_bulk_full_sync_keeps_generations_of_freed_entries(pin_dir: Path) -> None:
    """Maps emptied by a full sync of nothing keep the freed entries' generations: the bulk
    path's ids carry them, as the general path's do."""
    services = _services(4, 30)
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        for w in (a, b):
            w.full_sync([])
            w.full_sync(services)
        assert a.backend_ids() and all(M.backend_index(i)[1] == 1 for i in a.backend_ids().values())
        assert _picture(a) == _picture(b)
    finally:
        a.close()
        b.close()


def test_a_failed_bulk_write_is_rolled_back(pin_dir: Path) -> None:
    """kpr_svc's batch fails half way: the maps go back to empty, the ids, rev-NAT indexes and
    kpr_slots ranges taken are forgotten (the general path's rollback too: its ranges stayed
    taken before), and the retried full sync leaves what the general path leaves after the
    same failure (the backends written and deleted again keep their next generation)."""
    services = _services(5, 40)
    with ServiceMapWriter(pin_dir / "bulk", create_datapath_maps=False) as a, \
            _general(ServiceMapWriter(pin_dir / "general", create_datapath_maps=False)) as b:
        for w in (a, b):
            svc_map = w.maps["kpr_svc"]
            real = svc_map.update_blob

            def half_then_fail(keys: bytes, values: bytes, count: int, m=svc_map, real=real) -> None:
                half = count // 2
                real(keys[: half * m.key_size], values[: half * m.value_size], half)
                raise OSError("update_batch in kpr_svc: injected failure")

            svc_map.update_blob = half_then_fail  # type: ignore[method-assign]
            with pytest.raises(OSError, match="injected"):
                w.full_sync(services)
            del svc_map.update_blob
            assert (w.errors, w.rollbacks) == (1, 1)
            assert w.read_back()["frontends"] == {} and set(w.kernel_counts().values()) == {0}
            assert w._groups == {} and not w._backend_ids and not len(w._backend_vals)
            assert (w._slots.used, w._slots.live) == (0, {}) and not w._revnat_ids
        assert _picture(a) == _picture(b)
        for w in (a, b):
            w.full_sync(services)
        assert _picture(a) == _picture(b)
