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
        "slots": (slots.limit, slots.top, slots.used, dict(slots.live), slots.held),
        "limits": dict(w.limits),
        "refused": dict(w.refused), "conflicts": dict(w.conflicts), "errors": w.errors,
    }


def _served(w: ServiceMapWriter) -> dict:
    """What the maps serve and the shadow's meaning, without the ids a sync hands out (a mixed
    sync numbers the common services before the others, the general path in key order): per
    frontend its flags, backends by name, rev-NAT entry naming the frontend itself, Maglev
    shares, source ranges; the backend values; per service its frontends; per backend its
    references; the counts; refusals and conflicts. Ids must still agree between the maps
    and the shadow: check() finds nothing to repair."""
    maps = w.read_back()
    frontends = {}
    for label, f in maps["frontends"].items():
        f = dict(f)
        f["revnat_names"] = maps["revnat"].get(f.pop("rev_nat", None))
        f["backend_ids"] = sorted(maps["backends"][i]["address"] for i in f["backend_ids"])
        frontends[label] = f
    vals = w._backend_vals
    return {
        "frontends": frontends,
        "backends": sorted(sorted(b.items()) for b in maps["backends"].values()),
        "revnat": sorted(maps["revnat"].values()),
        "kernel_counts": w.kernel_counts(),
        "entry_counts": w.entry_counts(),
        "by_service": {k: tuple(sorted(v)) for k, v in w._by_service.items()},
        "owners": {fk: g.owner for fk, g in w._groups.items()},
        "refs": {vals[i][:19]: n for i, n in w._backend_refs.items()},
        "backend_keys": sorted(w._backend_ids),
        "shadow_vals": sorted(v[:19] + v[19:] for v in dict(vals.items()).values()),
        "count": dict(w._count),
        "slots_used": w._slots.used,
        "refused": dict(w.refused), "conflicts": dict(w.conflicts), "errors": w.errors,
        "repairs": w.check(),
    }


def _general(w: ServiceMapWriter) -> ServiceMapWriter:
    w._bulk_sync = lambda services: None  # type: ignore[method-assign]
    w._sync_adopted = lambda services: False  # type: ignore[method-assign]
    return w


def _sync_both(
    pin_dir: Path, services: list[Service], bulk: bool, **kw: object
) -> tuple[ServiceMapWriter, ServiceMapWriter]:
    """Writers a (as built) and b (general path only), each after a full sync of `services`;
    asserts whether a's took the bulk path."""
    a = ServiceMapWriter(pin_dir / "bulk", create_datapath_maps=False, **kw).open()  # type: ignore[arg-type]
    b = _general(ServiceMapWriter(pin_dir / "general", create_datapath_maps=False, **kw).open())  # type: ignore[arg-type]
    took: list[list[Service] | None] = []
    real = a._bulk_sync
    a._bulk_sync = lambda svcs: took.append(real(svcs)) or took[-1]  # type: ignore[method-assign]
    a.full_sync(services)
    del a._bulk_sync
    b.full_sync(services)
    assert [t is not None for t in took] == [bulk]
    a.others = took[0]  # type: ignore[attr-defined]  (the services left to the general path)
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


def test_every_backend_once_some_node_local(pin_dir: Path) -> None:
    """IPv4 backends each listed once, some node-local (their kpr_backend values' flags set in
    the joined values, not value by value): the same maps and shadow as the general path."""
    rnd = random.Random(7)
    services = [
        Service(ServiceKey("ns", f"u{i}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.9.{i + 1}", 80, Protocol.TCP, tuple(
            Backend(f"10.2.{i}.{j + 1}", 8080, local=rnd.random() < 0.3) for j in range(rnd.randrange(1, 6)))),))
        for i in range(40)
    ]
    assert any(b.local for s in services for b in s.frontends[0].backends)
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        assert _picture(a) == _picture(b)
        assert a.check() == 0
    finally:
        a.close()
        b.close()


_ODD = [
    Frontend(FrontendType.NODE_PORT, "192.0.2.1", 30080, Protocol.TCP, (Backend("10.1.0.1", 8080),)),
    Frontend(FrontendType.CLUSTER_IP, "10.96.8.1", 80, Protocol.TCP,
             (Backend("10.1.0.1", 8080, state=BackendState.TERMINATING), Backend("10.1.0.5", 8080))),
    Frontend(FrontendType.LOAD_BALANCER, "192.0.2.2", 80, Protocol.TCP, (Backend("10.1.0.2", 8080),),
             source_ranges=("198.51.100.0/24",)),
    Frontend(FrontendType.LOAD_BALANCER, "192.0.2.3", 80, Protocol.TCP, (Backend("10.1.0.3", 8080),),
             external_local=True),
    Frontend(FrontendType.CLUSTER_IP, "10.96.8.300", 80, Protocol.TCP, (Backend("10.1.0.4", 8080),)),  # bad
    None,  # the first service's frontend again: a conflict
    "nodeport",  # a NodePort on the first service's address and port: a conflict with another kind
]
_ODD_IDS = ["nodeport", "terminating", "source-ranges", "local-policy", "bad-address", "conflict", "nodeport-conflict"]


@pytest.mark.parametrize("odd", _ODD, ids=_ODD_IDS)
def test_any_other_service_takes_the_general_path_with_the_same_result(
    pin_dir: Path, odd: Frontend | str | None
) -> None:
    """One service of another kind among common ones: the common ones still go a list at a
    time, the other (and, in a conflict, both claimants) service by service in the same sync;
    what the maps serve and the shadow mean is the general path's."""
    services = _services(7, 20)
    first = services[0].frontends[0]
    conflict = not isinstance(odd, Frontend)
    if odd == "nodeport":
        odd = Frontend(FrontendType.NODE_PORT, first.address, first.port, first.protocol, (Backend("10.1.0.1", 8080),))
    services.append(Service(ServiceKey("ns0", "odd"), (odd or first,)))  # type: ignore[arg-type]
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        others = {s.key for s in a.others}
        assert others == ({ServiceKey("ns0", "odd"), services[0].key} if conflict else {ServiceKey("ns0", "odd")})
        assert _served(a) == _served(b)
        assert a.errors + len(a.conflicts) + len(a._groups) > 0
        if conflict:
            assert a.conflicts  # (which one wins is key order's, as on the general path: in _served)
    finally:
        a.close()
        b.close()


def _mixed(seed: int, n: int = 60) -> list[Service]:
    """Common services with a few of every other kind among them (all of _ODD but the bad
    address, under other keys and addresses)."""
    rnd = random.Random(seed)
    out = _services(seed, n)
    for j, fe in enumerate(f for f in _ODD if isinstance(f, Frontend) and f.address != "10.96.8.300"):
        addr = fe.address.rsplit(".", 1)[0] + f".{200 + j}"
        out.insert(rnd.randrange(len(out)), Service(ServiceKey(f"ns{j % 3}", f"o{j}"), (
            Frontend(fe.type, addr, fe.port, fe.protocol, fe.backends, source_ranges=fe.source_ranges,
                     external_local=fe.external_local),
        )))
    # a service of two frontends sharing backends with common ones
    two = (Frontend(FrontendType.CLUSTER_IP, "10.96.9.1", 80, Protocol.TCP, (Backend("10.1.0.7", 8080),)),
           Frontend(FrontendType.CLUSTER_IP, "10.96.9.1", 443, Protocol.TCP, (Backend("10.1.0.7", 8443),)))
    out.append(Service(ServiceKey("ns1", "two"), two))
    return out


@pytest.mark.parametrize("seed", range(2))
def test_mixed_full_sync_serves_what_the_general_path_serves(pin_dir: Path, seed: int) -> None:
    services = _mixed(seed)
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        assert len(a.others) == 5
        assert a.kernel_counts()["kpr_srcrange"] == 1 and not a.refused and not a.errors
        assert _served(a) == _served(b)
        # later changes behave the same: an upsert, a delete, a full sync over full maps
        changed = services[3]
        fe = changed.frontends[0]
        changed = Service(changed.key, (Frontend(fe.type, fe.address, fe.port, fe.protocol,
                                                 (*fe.backends, Backend("10.1.9.9", 8080))),))
        for w in (a, b):
            w.upsert(changed)
            w.delete(services[1].key)
        assert _served(a) == _served(b)
        again = random.Random(seed).sample(services, len(services) // 2)
        a.full_sync(again)
        b.full_sync(again)
        assert _served(a) == _served(b)
    finally:
        a.close()
        b.close()


def test_mixed_full_sync_that_does_not_fit_refuses_one_service(pin_dir: Path) -> None:
    """kpr_svc one entry short: the bulk path declines (the others' entries might not fit
    after it) and the general path refuses the one service key order leaves last, by name."""
    services = _mixed(3, 30)
    with ServiceMapWriter(pin_dir / "probe", create_datapath_maps=False) as w:
        w.full_sync(services)
        total = w.entry_counts()["kpr_svc"]
    a, b = _sync_both(pin_dir, services, bulk=False, sizes={"kpr_svc": total - 1})
    try:
        assert len(a.refused) == 1 and a.refused == b.refused
        assert _picture(a) == _picture(b)
    finally:
        a.close()
        b.close()


def test_a_failed_write_of_the_others_rolls_back_the_whole_sync(pin_dir: Path) -> None:
    """The others' kpr_svc batch (after the bulk path's) fails half way: the maps go back to
    empty, the common services the bulk path wrote included (the sync is one change), and the
    retried sync serves what the general path serves after the same failure (its one batch
    failing half way; the backends written and taken out again keep their next generation)."""
    services = _mixed(5, 40)
    with ServiceMapWriter(pin_dir / "bulk", create_datapath_maps=False) as a, \
            _general(ServiceMapWriter(pin_dir / "general", create_datapath_maps=False)) as b:
        for w, fail_at in ((a, 2), (b, 1)):
            svc_map = w.maps["kpr_svc"]
            calls: list[int] = []

            def failing(keys: bytes, values: bytes, count: int, m=svc_map, real=svc_map.update_blob,
                        calls=calls, fail_at=fail_at) -> None:
                calls.append(count)
                if len(calls) == fail_at:
                    half = count // 2
                    real(keys[: half * m.key_size], values[: half * m.value_size], half)
                    raise OSError("update_batch in kpr_svc: injected failure")
                real(keys, values, count)

            svc_map.update_blob = failing  # type: ignore[method-assign]
            with pytest.raises(OSError, match="injected"):
                w.full_sync(services)
            del svc_map.update_blob
            assert len(calls) == fail_at and calls[0] > 30  # (a: the bulk path's batch, then the others')
            assert (w.errors, w.rollbacks) == (1, 1)
            assert w.read_back()["frontends"] == {} and set(w.kernel_counts().values()) == {0}
            assert w._groups == {} and not w._backend_ids and not len(w._backend_vals) and not w._revnat_ids
            assert w._slots.live == {}
        for w in (a, b):
            w.full_sync(services)
        assert _served(a) == _served(b)


def _restarted(pin_dir: Path, first: list[Service], then: list[Service]) -> tuple[ServiceMapWriter, ServiceMapWriter, list[bool]]:
    """Maps holding `first` in two pin dirs, each adopted by a new writer (as after a restart)
    and fully synced to `then`: a as built, b on the general path only. Returns whether a's
    sync claimed adopted groups list at a time (_sync_adopted) too."""
    for name in ("adopt", "general"):
        with ServiceMapWriter(pin_dir / name, create_datapath_maps=False) as w:
            w.full_sync(first)
    a = ServiceMapWriter(pin_dir / "adopt", create_datapath_maps=False).open()
    b = _general(ServiceMapWriter(pin_dir / "general", create_datapath_maps=False).open())
    assert _picture(a) == _picture(b)  # (the same maps adopted)
    took: list[bool] = []
    real = a._sync_adopted
    a._sync_adopted = lambda svcs: took.append(real(svcs)) or took[-1]  # type: ignore[method-assign]
    a.ops_before = a.ops()  # type: ignore[attr-defined]
    a.full_sync(then)
    del a._sync_adopted
    b.full_sync(then)
    return a, b, took


@pytest.mark.parametrize("mixed", [False, True], ids=["common", "mixed"])
def test_restart_full_sync_of_the_same_services_writes_nothing(pin_dir: Path, mixed: bool) -> None:
    """Adopted maps, the same services again: the common ones are claimed as they are (no
    render), nothing is written, the shadow is the general path's, exactly."""
    services = _mixed(11) if mixed else _services(11)
    a, b, took = _restarted(pin_dir, services, services)
    try:
        assert took == [True]
        assert sum(o["update"] + o["delete"] for o in a.ops().values()) == 0
        # nor read again: the shadow open() just read is the maps (a hand edit since: check()'s)
        assert {n: o["syscalls"] for n, o in a.ops().items()} == {n: o["syscalls"] for n, o in a.ops_before.items()}
        assert _picture(a) == _picture(b)
        assert a.check() == 0 == b.check()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("seed", range(2))
def test_restart_full_sync_with_changes_leaves_what_the_general_path_leaves(pin_dir: Path, seed: int) -> None:
    """Adopted maps, a full sync that changes some: a service's backends, one's node-local
    flag, one's affinity, one deleted, one added, one NodePort more, a frontend taken over by
    another service. Kept groups take no new ids, so the ids match the general path's too."""
    first = _mixed(seed + 20, 40)
    then = list(first)
    rnd = random.Random(seed)
    i, j, k, m = rnd.sample(range(len(then)), 4)
    fe = then[i].frontends[0]
    then[i] = Service(then[i].key, (Frontend(fe.type, fe.address, fe.port, fe.protocol,
                                             (*fe.backends[1:], Backend("10.1.5.5", 8080))),))
    fe = then[j].frontends[0]
    then[j] = Service(then[j].key, (Frontend(fe.type, fe.address, fe.port, fe.protocol,
                                             tuple(Backend(b.address, b.port, local=not b.local, state=b.state)
                                                   for b in fe.backends)),))
    fe = then[k].frontends[0]
    then[k] = Service(then[k].key, (Frontend(fe.type, fe.address, fe.port, fe.protocol, fe.backends,
                                             affinity_timeout=fe.affinity_timeout + 7),))
    taken_over = then[m]
    then[m] = Service(ServiceKey("ns9", "newowner"), taken_over.frontends)
    del then[0]
    added = _services(seed + 40, 2)[0]
    then.append(Service(ServiceKey("ns1", "added"), added.frontends))
    then.append(Service(ServiceKey("ns2", "np"), (
        Frontend(FrontendType.NODE_PORT, "192.0.2.9", 30999, Protocol.UDP, (Backend("10.1.0.9", 53),)),)))
    a, b, took = _restarted(pin_dir, first, then)
    try:
        assert took == [True]
        assert _picture(a) == _picture(b)
        assert a.check() == 0 == b.check()
        for w in (a, b):
            w.upsert(first[1])
            w.delete(then[2].key)
        assert _picture(a) == _picture(b)
    finally:
        a.close()
        b.close()


def test_initial_sync_through_the_writer_stage_reads_the_adopted_maps_once(pin_dir: Path) -> None:
    """A restart through the bus's writer stage: upserts collected until sync complete, then
    one full sync of the same services: nothing written and the maps not read again after
    open(); an upsert written in between (maps changed since open) makes the next full sync
    read them again."""
    services = _mixed(13, 30)
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w:
        w.full_sync(services)
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w:
        before = {n: dict(o) for n, o in w.ops().items()}
        assert w.apply_batch([("upsert", s) for s in services]) == {}
        assert w.apply_batch([("sync", None)]) == {} and w.initial_written
        assert w.ops() == before
        assert not w.refused and not w.errors and w.check() == 0
        w.upsert(services[0])
        reads = w.ops()["kpr_svc"]["syscalls"]
        w.full_sync(services)
        assert w.ops()["kpr_svc"]["syscalls"] > reads  # read again: a change was made since open()


def test_a_backend_listed_local_and_not_takes_the_last_listers_value_and_stays(pin_dir: Path) -> None:
    """One pod address listed node-local by one service and not by another (EndpointSlices
    that disagree about its nodeName: a selector-less service's hand-made slice without one,
    or a slice not yet updated after the address moved node): kpr_backend holds one value,
    the last lister's in key order (the general path's). The bulk path wrote the common
    service's and then the other's over it whatever their order, and every later full sync
    flipped it (the adopted path decides the common one against the maps first)."""
    x_local, x_remote = Backend("10.1.3.1", 8080, local=True), Backend("10.1.3.1", 8080)
    other = Service(ServiceKey("ns0", "a"), (  # a NodePort: never the common kind
        Frontend(FrontendType.NODE_PORT, "192.0.2.50", 30050, Protocol.TCP, (x_local,)),))
    common = Service(ServiceKey("ns0", "b"), (
        Frontend(FrontendType.CLUSTER_IP, "10.96.3.1", 80, Protocol.TCP, (x_remote, Backend("10.1.3.2", 8080))),))
    also = Service(ServiceKey("ns0", "c"), (  # a second common lister, agreeing with the last one
        Frontend(FrontendType.CLUSTER_IP, "10.96.3.2", 80, Protocol.TCP, (Backend("10.1.3.2", 8080, local=True),)),))
    services = [common, other, also, *_services(4, 10)]
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        def local_of(w: ServiceMapWriter, addr: str) -> bool:
            (val,) = [v for v in w.read_back()["backends"].values() if v["address"] == addr]
            return val["local"]

        assert (local_of(b, "10.1.3.1"), local_of(b, "10.1.3.2")) == (False, True)  # the last lister's
        assert _served(a) == _served(b)
        for _ in range(2):  # later full syncs of the same services: nothing moves
            before = a.ops()
            a.full_sync(services)
            assert (local_of(a, "10.1.3.1"), local_of(a, "10.1.3.2")) == (False, True)
            assert a.ops()["kpr_backend"]["update"] == before["kpr_backend"]["update"]
        assert _served(a) == _served(b)
    finally:
        a.close()
        b.close()


_BAD = [
    Frontend(FrontendType.CLUSTER_IP, "10.96.3.9\x00", 80, Protocol.TCP, (Backend("10.1.3.9", 8080),)),
    Frontend(FrontendType.CLUSTER_IP, "fd01::9\udc80", 80, Protocol.TCP, (Backend("fd00::9", 8080),)),
    Frontend(FrontendType.CLUSTER_IP, "10.96.3.9", 80, Protocol.TCP, (Backend("10.1.3.9\x00", 8080),)),
    Frontend(FrontendType.CLUSTER_IP, "10.96.3.9", 80, b"\x06", (Backend("10.1.3.9", 8080),)),  # type: ignore[arg-type]
    Frontend(FrontendType.CLUSTER_IP, "10.96.3.9", 80, b"", (Backend("10.1.3.9", 8080),)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("bad", _BAD, ids=["nul-in-frontend", "surrogate-in-frontend", "nul-in-backend",
                                           "protocol-bytes", "protocol-empty-bytes"])
def test_input_the_general_path_refuses_is_refused_beside_the_bulk_path_too(pin_dir: Path, bad: Frontend) -> None:
    """A service whose input the general path cannot render (an address inet_pton rejects
    with ValueError, not OSError; a protocol that is no Protocol) is that service's error,
    counted, as there: the bulk path raised out of the whole sync (ValueError, nothing
    synced) or wrote the service with a protocol byte the frontend never named."""
    services = [*_services(5, 10), Service(ServiceKey("ns0", "bad"), (bad,))]
    a, b = _sync_both(pin_dir, services, bulk=True)
    try:
        assert [s.key for s in a.others] == [ServiceKey("ns0", "bad")]
        assert (a.errors, b.errors) == (1, 1)
        assert _served(a) == _served(b)
        assert len(a.read_back()["frontends"]) == 10
    finally:
        a.close()
        b.close()


# --- a restart that leaves the maps unread until its initial sync (kpr.servicemaps.adopt) ---


def _unread_restart(
    pin_dir: Path, first: list[Service], edit=None, sizes: dict[str, int] | None = None
) -> tuple[ServiceMapWriter, ServiceMapWriter, list[bool]]:
    """Maps holding `first` (a bulk sync into empty maps, of these map `sizes`) in two pin
    dirs, `edit(writer)` run on each before the restart; a adopts them unread (open(read=False),
    as the agent does), b reads them at open (the path before), both with the default sizes.
    Returns whether a's first full sync took them as they are (AdoptMixin._adopt_unchanged)."""
    for name in ("unread", "read"):
        with ServiceMapWriter(pin_dir / name, create_datapath_maps=False, sizes=sizes) as w:
            w.full_sync(first)
            if edit is not None:
                edit(w)
    a = ServiceMapWriter(pin_dir / "unread", create_datapath_maps=False).open(read=False)
    b = ServiceMapWriter(pin_dir / "read", create_datapath_maps=False).open()
    took: list[bool] = []
    real = a._adopt_unchanged
    a._adopt_unchanged = lambda svcs: took.append(real(svcs)) or took[-1]  # type: ignore[method-assign]
    return a, b, took


@pytest.mark.parametrize("seed", range(3))
def test_unread_restart_of_the_same_services_takes_the_maps_as_they_are(pin_dir: Path, seed: int) -> None:
    """The same common services again: nothing written, and the shadow, the maps and every
    count exactly the read-and-diff path's."""
    services = _services(seed + 50)
    a, b, took = _unread_restart(pin_dir, services)
    try:
        for w in (a, b):
            w.full_sync(list(reversed(services)))
        assert took == [True]
        assert sum(o["update"] + o["delete"] for o in a.ops().values()) == 0
        assert _picture(a) == _picture(b)
        assert a.check() == 0 == b.check()
        # later changes behave the same
        for w in (a, b):
            w.upsert(Service(services[1].key, (Frontend(
                FrontendType.CLUSTER_IP, "10.96.9.9", 80, Protocol.TCP, (Backend("10.1.0.1", 8080), Backend("10.1.7.7", 8080))),)))
            w.delete(services[3].key)
        assert _picture(a) == _picture(b)
    finally:
        a.close()
        b.close()


def test_unread_restart_over_a_pin_of_another_size_plans_against_the_pin(pin_dir: Path) -> None:
    """kpr_slots pinned by an earlier start with another size (no bpf.mapSizes.kprSlots now:
    adopted as it is): the maps taken as they are leave the slot ranges planned against the
    pin's size, as reading them does. A range past it is refused, not written past the array."""
    services = [
        Service(ServiceKey("ns0", f"s{i:02d}"), (Frontend(FrontendType.CLUSTER_IP, f"10.96.8.{i + 1}", 80, Protocol.TCP,
                                                           tuple(Backend(f"10.2.{i}.{j + 1}", 8080) for j in range(3))),))
        for i in range(40)
    ]
    a, b, took = _unread_restart(pin_dir, services, sizes={"kpr_slots": 128})
    big = Service(ServiceKey("ns1", "big"), (Frontend(FrontendType.CLUSTER_IP, "10.96.9.1", 80, Protocol.TCP,
                                                       tuple(Backend(f"10.3.0.{j + 1}", 8080) for j in range(8))),))
    try:
        for w in (a, b):
            assert w.specs["kpr_slots"].max_entries == 128
            w.full_sync(services)
        assert took == [True]
        assert a._slots.limit == 128 == b._slots.limit
        assert _picture(a) == _picture(b)
        for w in (a, b):
            for s in services[0:30:10]:
                w.delete(s.key)
            w.upsert(big)  # (3 ranges of 3 free, none side by side, 8 past the last: refused)
        for w in (a, b):
            assert w.refused.get(big.key) is not None and w.refused[big.key].map == "kpr_slots"
            assert w.errors == 0
        assert _picture(a) == _picture(b)
        assert a.check() == 0 == b.check()
    finally:
        a.close()
        b.close()


def _stray_revnat(w: ServiceMapWriter) -> None:
    w.maps["kpr_revnat"].update(M.U32.pack(60000), bytes(20))


def _stray_slot(w: ServiceMapWriter) -> None:
    # (state active: what tells is the slot itself, past every range)
    w.maps["kpr_slots"].update(M.U32.pack(w.specs["kpr_slots"].max_entries - 1), bytes(range(1, 5)) + bytes(4))


def _generation_kept(w: ServiceMapWriter) -> None:
    # a backend freed (its zero entry keeps the generation its index's next backend takes)
    w.upsert(Service(ServiceKey("ns0", "gone-soon"), (Frontend(
        FrontendType.CLUSTER_IP, "10.96.9.8", 80, Protocol.TCP, (Backend("10.9.9.9", 8080),)),)))
    w.delete(ServiceKey("ns0", "gone-soon"))


def _hand_edited_backend(w: ServiceMapWriter) -> None:
    raw = bytearray(w.maps["kpr_backend"].lookup(M.U32.pack(3)))
    raw[16] ^= 1  # another port
    w.maps["kpr_backend"].update(M.U32.pack(3), bytes(raw))


def _hand_edited_slot(w: ServiceMapWriter) -> None:
    g = next(g for g in w._groups.values() if g.span > 1 and len(g.backends) > 1)
    a, b = w.maps["kpr_slots"].lookup(M.U32.pack(g.base)), w.maps["kpr_slots"].lookup(M.U32.pack(g.base + 1))
    w.maps["kpr_slots"].update(M.U32.pack(g.base), b)
    w.maps["kpr_slots"].update(M.U32.pack(g.base + 1), a)


def _hand_edited_svc(w: ServiceMapWriter) -> None:
    k, v = min(w.maps["kpr_svc"].items())
    w.maps["kpr_svc"].update(k, v[:-4] + M.U32.pack(M.U32.unpack(v[-4:])[0] + 5))  # (its affinity timeout)


def _stray_svc(w: ServiceMapWriter) -> None:
    k = min(w.maps["kpr_svc"].keys())
    w.maps["kpr_svc"].update(bytes(15) + b"\x63" + k[16:], M.SVC_VAL.pack(0, 0, 0, 0, 0, 0))  # (a frontend no service has)


def _stray_srcrange(w: ServiceMapWriter) -> None:
    g = next(iter(w._groups.values()))  # (a range naming a service's rev-NAT index: no service has one)
    w.maps["kpr_srcrange"].update(M.SRCRANGE_KEY.pack(32 + 96 + 8, g.rev_nat, M.addr_to_bytes("10.0.0.0")), M.U32.pack(1))


def _stray_maglev(w: ServiceMapWriter) -> None:
    t, k, v, n = w.specs["kpr_maglev"].inner
    with M.BpfMap.create(M.MapSpec("kpr_stray_in", t, k, v, n)) as inner:
        w.maps["kpr_maglev"].update(M.MAGLEV_KEY.pack(next(iter(w._groups.values())).rev_nat, 0), M.U32.pack(inner.fd))


@pytest.mark.parametrize(
    "edit",
    [_stray_revnat, _stray_slot, _generation_kept, _hand_edited_backend, _hand_edited_slot, _hand_edited_svc, _stray_svc,
     _stray_srcrange, _stray_maglev],
    ids=["stray-revnat", "stray-slot", "generation", "backend-edited", "slots-swapped", "svc-edited", "stray-svc",
         "stray-srcrange", "stray-maglev"],
)
def test_unread_restart_over_maps_that_differ_reads_and_repairs_them(pin_dir: Path, edit) -> None:
    """Maps that differ from what a bulk sync of the services writes, in any entry: not taken
    as they are; read and diffed as before, with the same result (strays removed, edits
    repaired, the freed backend's generation kept)."""
    services = _services(61)
    _read_and_diffed(
        pin_dir, services, services, edit, planned=edit not in (_generation_kept, _stray_svc, _stray_srcrange, _stray_maglev)
    )


def _read_and_diffed(pin_dir: Path, first: list[Service], then: list[Service], edit=None, planned: bool = True) -> None:
    """An unread restart over maps of `first` (edited) synced to `then` reads and diffs the
    maps (not taken as they are), with the read-at-open path's result; `planned` false: ruled
    out before the bulk sync's plan is made (holes, generations, another count of services)."""
    a, b, took = _unread_restart(pin_dir, first, edit)
    plans: list[object] = []
    real = a._bulk_plan
    a._bulk_plan = lambda svcs: plans.append(real(svcs)) or plans[-1]  # type: ignore[method-assign]
    try:
        for w in (a, b):
            w.full_sync(then)
        assert took == [False]
        assert any(p is not None for p in plans) == planned  # (the read path asks too: declined, None)
        assert _picture(a) == _picture(b)
        assert a.check() == 0 == b.check()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("change", ["one-backend", "one-less", "one-more", "mixed"])
def test_unread_restart_with_other_services_leaves_what_reading_first_leaves(pin_dir: Path, change: str) -> None:
    services = _services(62)
    then = list(services)
    if change == "one-backend":
        fe = then[5].frontends[0]
        then[5] = Service(then[5].key, (Frontend(fe.type, fe.address, fe.port, fe.protocol, (*fe.backends, Backend("10.1.6.6", 8080))),))
    elif change == "one-less":
        del then[7]
    elif change == "one-more":
        then.append(Service(ServiceKey("ns1", "more"), (Frontend(FrontendType.CLUSTER_IP, "10.96.9.7", 80, Protocol.TCP, (Backend("10.1.0.3", 8080),)),)))
    else:
        then = _mixed(62)
    _read_and_diffed(pin_dir, services, then, planned=change == "one-backend")


@pytest.mark.parametrize("kind", ["source-ranges", "terminating", "all-terminating"])
def test_unread_restart_over_services_a_bulk_sync_leaves_out_makes_no_plan(pin_dir: Path, kind: str) -> None:
    """Services the bulk sync leaves to the general path that still take one kpr_svc entry
    each (source ranges, terminating backends: the count of entries is the services'): the
    maps tell at once (kpr_srcrange not empty, a slot's state not active) that they are not a
    bulk sync's, so no plan is made; read and diffed as before."""
    services = _services(64)
    i = next(i for i, s in enumerate(services) if len(s.frontends[0].backends) > 1)
    fe = services[i].frontends[0]
    if kind == "source-ranges":
        fe = Frontend(fe.type, fe.address, fe.port, fe.protocol, fe.backends, source_ranges=("198.51.100.0/24",))
    else:
        bes = fe.backends[:1] if kind == "terminating" else ()
        bes += tuple(Backend(b.address, b.port, state=BackendState.TERMINATING) for b in fe.backends[len(bes):])
        fe = Frontend(fe.type, fe.address, fe.port, fe.protocol, bes)
    services[i] = Service(services[i].key, (fe,))
    _read_and_diffed(pin_dir, services, services, planned=False)


def test_status_before_the_initial_sync_leaves_the_maps_unread(pin_dir: Path) -> None:
    """kpr_status (every metrics scrape, `kpr status`) before the initial sync counts the
    unread maps in the kernel without reading them into the shadow: the same status as the
    read path's, and the sync still takes the maps as they are. `kpr status`'s comparison
    (kpr.readback.differences) says it has not compared them yet."""
    from kpr.readback import differences

    services = _services(65)
    a, b, took = _unread_restart(pin_dir, services)
    try:
        sa, sb = a.kpr_status(), b.kpr_status()
        assert differences(a)["error"].startswith("not read yet") and differences(b)["count"] == 0
        assert a._unread and not a._groups
        assert (sa.healthy, sa.message, sa.counters, sa.details) == (sb.healthy, sb.message, sb.counters, sb.details)
        assert sa.counters["frontends"] == len(services) and not sa.details["synced"]
        for w in (a, b):
            w.full_sync(services)
        assert took == [True]
        assert _picture(a) == _picture(b)
        sa, sb = a.kpr_status(), b.kpr_status()
        assert (sa.healthy, sa.message, sa.counters, sa.details) == (sb.healthy, sb.message, sb.counters, sb.details)
        assert differences(a) == differences(b) == {"count": 0, "first": [], "maps": {}}
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("first", ["upsert", "check"])
def test_an_operation_before_the_initial_sync_reads_the_unread_maps(pin_dir: Path, first: str) -> None:
    """Anything that needs the shadow before the initial sync reads the maps first: it sees
    (and the sync after it diffs against) what they hold, as if open() had read them."""
    services = _services(63)
    a, b, took = _unread_restart(pin_dir, services)
    try:
        for w in (a, b):
            if first == "upsert":
                w.upsert(services[4])
            else:
                assert w.check() == 0
        assert _picture(a) == _picture(b)
        for w in (a, b):
            w.full_sync(services)
        assert took == []  # (read already: the sync diffed against the shadow)
        assert _picture(a) == _picture(b)
    finally:
        a.close()
        b.close()
