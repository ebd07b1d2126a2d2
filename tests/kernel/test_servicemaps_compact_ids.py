"""The writer's backend identity table (kpr.idtables.KeyIds) once its entries have moved
into the compact table: the same random changes, full syncs, checks, hand edits repaired and
restarts applied to two writers side by side, one moving new identities into the table
after every operation (_compact_in_op), one never (what a writer without a checker thread
does, all in the table's dict as the plain dict was), give the same maps, the same ids and
the same shadow. The agent's writer moves them from its checker thread, shortly after a
change (HooksMixin.compact_ids).

Writer only (no program is compiled); each writer in its own scratch pin dir.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.bpffs import scratch_pin_dir

pytestmark = pytest.mark.kernel


def _service(rng: random.Random, i: int) -> Service:
    # backends drawn from a small pool: services share pod addresses, ids are freed and reused
    bes = tuple(
        Backend(f"10.7.{rng.randrange(0, 3)}.{rng.randrange(1, 40)}", rng.choice((8080, 8443)),
                state=BackendState.TERMINATING if rng.random() < 0.05 else BackendState.ACTIVE,
                local=rng.random() < 0.1)
        for _ in range(rng.randrange(0, 12))
    )
    kind = rng.choice((FrontendType.CLUSTER_IP, FrontendType.CLUSTER_IP, FrontendType.NODE_PORT))
    fes = [Frontend(kind, f"10.96.7.{i}", 80 if kind is FrontendType.CLUSTER_IP else 30000 + i, Protocol.TCP, bes)]
    if rng.random() < 0.2:
        fes.append(Frontend(FrontendType.EXTERNAL_IP, f"192.0.2.{i}", 80, Protocol.TCP, bes))
    return Service(ServiceKey("compact", f"s{i}"), tuple(fes))


def _state(w: ServiceMapWriter) -> tuple:
    return (
        w.read_back(), w.backend_ids(), dict(w._backend_ids.items()), dict(w._backend_vals.items()),
        dict(w._backend_refs.items()), w._next_backend, sorted(w.refused),
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_compacted_identities_change_nothing_the_writer_does(seed: int, require_kernel: None) -> None:
    rng = random.Random(seed)
    with scratch_pin_dir("kpr-t") as pin_a, scratch_pin_dir("kpr-t") as pin_b:
        pins = (pin_a, pin_b)
        sizes = {"kpr_backend": 96}  # ids run out and freed ones are taken again
        writers = [ServiceMapWriter(p, sizes=sizes).open() for p in pins]
        writers[0]._compact_in_op = True
        try:
            live: dict[int, Service] = {}
            compacted = 0
            for step in range(120):
                op = rng.random()
                if op < 0.55:
                    i = rng.randrange(1, 30)
                    live[i] = _service(rng, i)
                    batch = [("upsert", live[i])]
                elif op < 0.75 and live:
                    i = rng.choice(sorted(live))
                    del live[i]
                    batch = [("delete", ServiceKey("compact", f"s{i}"))]
                elif op < 0.85:
                    batch = [("sync", None)]
                else:
                    batch = []
                if batch:
                    got = [w.apply_batch(batch) for w in writers]
                    assert got[0].keys() == got[1].keys()
                elif op < 0.9:
                    assert writers[0].full_sync(list(live.values())) is None
                    writers[1].full_sync(list(live.values()))
                elif op < 0.95:
                    # a hand edit (a backend entry zeroed) that check() repairs in both
                    for w, p in zip(writers, pins):
                        ids = sorted(w._backend_vals.keys())
                        if ids:
                            with M.BpfMap.open_pinned(p / "kpr_backend") as m:
                                m.update(M.U32.pack(ids[len(ids) // 2]), bytes(M.BACKEND.size))
                    assert writers[0].check() == writers[1].check()
                else:
                    # a restart: both adopt their pinned maps, then get their services again
                    for w in writers:
                        w.close()
                    writers = [ServiceMapWriter(p, sizes=sizes).open() for p in pins]
                    writers[0]._compact_in_op = True
                    for w in writers:
                        w.apply_batch([("upsert", s) for s in live.values()] + [("sync", None)])
                a, b = (_state(w) for w in writers)
                assert a == b, f"step {step}"
                compacted = max(compacted, writers[0]._backend_ids._live)
                assert writers[0]._backend_ids.pending() <= len(writers[0]._backend_vals._far)
                assert writers[1]._backend_ids._live == 0  # never moved: the dict alone
            assert compacted > 20  # the compact table was in use
        finally:
            for w in writers:
                w.close()


def test_a_restart_over_high_backend_ids_moves_their_identities_into_the_table(require_kernel: None) -> None:
    """After churn the backends a restart adopts may all have ids far above the low ones
    (freed long ago): IdBytes keeps their values in its dict. Their identities still move
    into the compact table, and the writer goes on using them (before, none moved: every
    operation scheduled a compaction that moved nothing)."""
    bes = tuple(Backend(f"10.8.0.{i}", 8080) for i in range(1, 41))

    def svc_of(backends: tuple[Backend, ...]) -> Service:
        fe = Frontend(FrontendType.CLUSTER_IP, "10.96.8.1", 80, Protocol.TCP, backends)
        return Service(ServiceKey("compact", "high"), (fe,))

    svc = svc_of(bes)
    sizes = {"kpr_backend": 66_100}
    with scratch_pin_dir("kpr-t") as pin:
        w = ServiceMapWriter(pin, sizes=sizes).open()
        try:
            w._next_backend = 66_000  # (what long churn leaves: the counter high, the low ids freed)
            w.full_sync([svc])
            before = w.backend_ids()
        finally:
            w.close()
        assert min(before.values()) >= 66_000
        w = ServiceMapWriter(pin, sizes=sizes).open()
        try:
            assert w._backend_vals._far  # the case: values kept in IdBytes's dict
            assert w.compact_ids() == 40 and w._backend_ids.pending() == 0
            w.full_sync([svc])
            assert w.backend_ids() == before  # the same ids, found in the table
            w.upsert(svc_of(bes[1:] + (Backend("10.8.1.1", 8080),)))  # one backend out, one new in
            ids = w.backend_ids()
            assert {k: v for k, v in ids.items() if k in before} == {k: v for k, v in before.items() if k in ids}
            assert "10.8.0.1:8080/tcp" not in ids and len(ids) == 40
            assert dict(w._backend_ids.items()) == {v[:19]: bid for bid, v in w._backend_vals.items()}
        finally:
            w.close()


def test_a_restart_over_many_high_backend_ids_keeps_their_values_in_the_arrays(require_kernel: None) -> None:
    """Many backends adopted at ids far above the low ones (the low ones freed long ago) go
    into the id tables' arrays (a few bytes per id up to the highest), not their dicts (about
    two hundred bytes per id): restarts and every check() (it re-reads the maps) adopt them."""
    n = 24_000  # (a quarter of the ids up to the highest: dense enough for the arrays)
    bes = [Backend(f"10.{9 + i // 65536}.{i // 256 % 256}.{i % 256}", 8080) for i in range(n)]
    fes = [
        Frontend(FrontendType.CLUSTER_IP, f"10.96.9.{j + 1}", 80, Protocol.TCP, tuple(bes[j * 100 : (j + 1) * 100]))
        for j in range(n // 100)
    ]
    svcs = [Service(ServiceKey("compact", f"many{j}"), (fe,)) for j, fe in enumerate(fes)]
    sizes = {"kpr_backend": 66_000 + n + 100}
    with scratch_pin_dir("kpr-t") as pin:
        w = ServiceMapWriter(pin, sizes=sizes).open()
        try:
            w._next_backend = 66_000  # (what long churn leaves: the counter high, the low ids freed)
            w.full_sync(svcs)
            before = w.backend_ids()
            assert min(before.values()) >= 66_000
            w.check()  # re-reads the maps
            assert not w._backend_vals._far and not w._backend_refs._far
        finally:
            w.close()
        w = ServiceMapWriter(pin, sizes=sizes).open()
        try:
            assert not w._backend_vals._far and not w._backend_refs._far
            assert len(w._backend_vals) == n and w.backend_ids() == before
            assert w.compact_ids() == n
            w.full_sync(svcs)
            assert w.backend_ids() == before
        finally:
            w.close()


def test_a_check_that_finds_the_backends_as_they_were_keeps_the_compact_table(require_kernel: None) -> None:
    """check() re-reads the maps; backends as the shadow had them keep their identities in
    the compact table (before, a dict of all of them was made and moved again at every
    check), also after a value edited by hand was repaired (the maps then hold the shadow's
    values again: the identities made from them would be the same)."""
    bes = tuple(Backend(f"10.8.2.{i}", 8080) for i in range(1, 41))
    svc = Service(ServiceKey("compact", "check"), (Frontend(FrontendType.CLUSTER_IP, "10.96.8.2", 80, Protocol.TCP, bes),))
    with scratch_pin_dir("kpr-t") as pin:
        with ServiceMapWriter(pin) as w:
            w.full_sync([svc])
            assert w.compact_ids() == 40
            table = w._backend_ids
            want = w.backend_ids()
            assert w.check() == 0
            assert w._backend_ids is table and table.pending() == 0 and table._vals is w._backend_vals
            assert w.backend_ids() == want
            assert dict(table.items()) == {v[:19]: bid for bid, v in w._backend_vals.items()}
            # a backend's value edited by hand: repaired
            bid = want["10.8.2.1:8080/TCP"]
            m = w.maps["kpr_backend"]
            key = M.U32.pack(bid)
            m.update(key, bytes(M.BACKEND.size))
            assert w.check() > 0
            assert m.lookup(key) == w._backend_vals[bid]
            assert w._backend_ids is table and table._vals is w._backend_vals
            assert w.backend_ids() == want
            assert dict(w._backend_ids.items()) == {v[:19]: bid for bid, v in w._backend_vals.items()}
