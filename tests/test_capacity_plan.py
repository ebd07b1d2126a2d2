"""The writer's capacity arithmetic, without a kernel: entries per map, the first map a
change would overflow, and a full sync's plan (services in key order, each whole or refused)."""

from __future__ import annotations

import pytest

from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import Refusal, ServiceMapWriter, _Group, first_overflow, group_entries

CIP, NP, LB = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER
LIMITS = {"kpr_svc": 10, "kpr_slots": 20, "kpr_backend": 4, "kpr_revnat": 3, "kpr_srcrange": 2, "kpr_maglev": 1}


def group(
    svc: int, *, revnat: bool = True, srcrange: int = 0, maglev: int = 0, backends: tuple[int, ...] = (), span: int = 0
) -> _Group:
    g = _Group(1, None, revnat=b"x" if revnat else b"")
    g.svc = {bytes([i]): b"" for i in range(svc)}
    g.span = span
    g.srcrange = frozenset(bytes([i]) for i in range(srcrange))
    g.maglev = {i: () for i in range(maglev)}
    g.backends = frozenset(backends)
    return g


def test_group_entries_count_each_map():
    got = group_entries([group(3, srcrange=2, maglev=1, span=12), group(1, revnat=False, span=3)])
    assert got == {"kpr_svc": 4, "kpr_slots": 15, "kpr_backend": 0, "kpr_revnat": 1, "kpr_srcrange": 2, "kpr_maglev": 1}
    assert group_entries([]) == dict.fromkeys(got, 0)


@pytest.mark.parametrize(
    "current, delta, want",
    [
        ({"kpr_svc": 5}, {"kpr_svc": 5}, None),  # exactly full fits
        ({"kpr_svc": 5}, {"kpr_svc": 6}, ("kpr_svc", 6, 5)),
        ({"kpr_svc": 12}, {"kpr_svc": -1}, None),  # over-full (strays) but shrinking: let through
        ({"kpr_svc": 12}, {"kpr_svc": 0, "kpr_backend": 1}, None),
        ({"kpr_backend": 4}, {"kpr_svc": 1, "kpr_backend": 1}, ("kpr_backend", 1, 0)),
        # the first map in SERVICE_MAPS order is named
        ({}, {"kpr_revnat": 9, "kpr_svc": 11}, ("kpr_svc", 11, 10)),
        ({"kpr_slots": 18}, {"kpr_backend": 5, "kpr_slots": 3}, ("kpr_slots", 3, 2)),
    ],
)
def test_first_overflow(current, delta, want):
    assert first_overflow(current, delta, LIMITS) == want


def svc(name: str, vip: str, backends: int, frontends: int = 1) -> Service:
    bes = tuple(Backend(f"10.1.{hash(name) % 200}.{i}", 80) for i in range(backends))
    fes = tuple(Frontend(CIP, f"{vip}{i}", 80, Protocol.TCP, bes) for i in range(frontends))
    return Service(ServiceKey("default", name), fes)


def test_plan_takes_services_in_key_order_and_refuses_the_one_that_does_not_fit():
    # kpr_svc: one entry per frontend
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_svc": 3, "kpr_backend": 100})
    a = svc("a", "10.96.0.1", 2)  # 1 entry
    b = svc("b", "10.96.1.", 2, frontends=3)  # 3 entries: does not fit after a
    c = svc("c", "10.96.0.3", 3)  # 1 entry
    desired = w._plan([a, b, c], old={})
    assert sorted(g.owner.name for g in desired.values()) == ["a", "c"]
    assert sum(len(g.svc) for g in desired.values()) == 2
    r = w.refused[b.key]
    assert (r.map, r.need, r.free, r.max_entries) == ("kpr_svc", 3, 2, 3)
    assert "bpf.mapSizes.kprSvc" in r.text() and "last good state" in r.text()
    assert w.refusals == 1


def test_plan_refuses_what_kpr_slots_cannot_hold():
    # kpr_slots: 10 entries, index 0 unused; ranges of 2 (a), 3 x 3 (b), 3 (c)
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_slots": 10, "kpr_backend": 100})
    a = svc("a", "10.96.0.1", 2)
    b = svc("b", "10.96.1.", 3, frontends=3)
    c = svc("c", "10.96.0.3", 3)
    desired = w._plan([a, b, c], old={})
    assert sorted(g.owner.name for g in desired.values()) == ["a", "c"]
    r = w.refused[b.key]
    assert (r.map, r.need, r.free, r.max_entries) == ("kpr_slots", 9, 7, 9)
    assert "bpf.mapSizes.kprSlots" in r.text()
    # the accepted ranges were taken, one after the other, and nothing else
    assert sorted((g.base, g.span) for g in desired.values()) == [(1, 2), (3, 3)]
    assert w._slots.used == 5


def test_backends_shared_between_services_count_once():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_backend": 3})  # an array: ids 1 and 2
    bes = (Backend("10.1.0.1", 80), Backend("10.1.0.2", 80))
    one = Service(ServiceKey("x", "one"), (Frontend(CIP, "10.96.0.1", 80, Protocol.TCP, bes),))
    two = Service(ServiceKey("x", "two"), (Frontend(CIP, "10.96.0.2", 80, Protocol.TCP, bes),))
    three = Service(ServiceKey("x", "three"), (Frontend(CIP, "10.96.0.3", 80, Protocol.TCP, (Backend("10.1.0.3", 80),)),))
    desired = w._plan([one, three, two], old={})
    assert sorted(g.owner.name for g in desired.values()) == ["one", "two"]
    assert w.refused[three.key].map == "kpr_backend"


def test_a_service_delta_counts_what_it_gives_back():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_slots": 7})
    old = w._render(svc("a", "10.96.0.1", 4))  # a range of 4
    w._forget_render()
    # Growing to a range of 6 fits 6 free slots; to 8 does not.
    assert w._refusal({fk: None for fk in old}, w._render(svc("a", "10.96.0.1", 5))) is None
    w._forget_render()
    r = w._refusal({}, w._render(svc("a", "10.96.0.1", 7)))
    assert isinstance(r, Refusal) and (r.map, r.need, r.free) == ("kpr_slots", 8, 6)


def test_a_service_that_cannot_be_rendered_is_skipped_alone():
    w = ServiceMapWriter("/nonexistent")
    bad = Service(ServiceKey("default", "bad"), (Frontend(CIP, "not-an-address", 80, Protocol.TCP, ()),))
    good = svc("good", "10.96.0.7", 1)
    desired = w._plan([bad, good], old={})
    assert [g.owner.name for g in desired.values()] == ["good"]
    assert w.errors == 1


def test_a_refused_service_keeps_its_old_groups_and_waits_only_for_its_growth():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_svc": 2})
    old = w._render(svc("a", "10.96.5.", 2))  # 10.96.5.0: 1 entry, as the maps hold it
    w._forget_render()
    big = svc("a", "10.96.5.", 2, frontends=3)  # 10.96.5.0-2: 3 entries
    desired = w._plan([big], old=old)
    assert desired == old and all(desired[fk] is old[fk] for fk in old), "the last good state stays as it is"
    assert all(g.owner == big.key for g in desired.values())
    assert dict(w.refused[big.key].delta)["kpr_svc"] == 2, "tried again once 2 more entries fit"
