"""The writer's capacity arithmetic, without a kernel: entries per map, the first map a
change would overflow, and a full sync's plan (services in key order, each whole or refused)."""

from __future__ import annotations

import pytest

from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import Refusal, ServiceMapWriter, _Group, first_overflow, group_entries

CIP, NP, LB = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER
LIMITS = {"kpr_svc": 10, "kpr_backend": 4, "kpr_revnat": 3, "kpr_srcrange": 2, "kpr_maglev": 1}


def group(svc: int, *, revnat: bool = True, srcrange: int = 0, maglev: int = 0, backends: tuple[int, ...] = ()) -> _Group:
    g = _Group(1, None, revnat=b"x" if revnat else b"")
    g.svc = {bytes([i]): b"" for i in range(svc)}
    g.srcrange = frozenset(bytes([i]) for i in range(srcrange))
    g.maglev = {i: () for i in range(maglev)}
    g.backends = frozenset(backends)
    return g


def test_group_entries_count_each_map():
    got = group_entries([group(3, srcrange=2, maglev=1), group(1, revnat=False)])
    assert got == {"kpr_svc": 4, "kpr_backend": 0, "kpr_revnat": 1, "kpr_srcrange": 2, "kpr_maglev": 1}
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
    ],
)
def test_first_overflow(current, delta, want):
    assert first_overflow(current, delta, LIMITS) == want


def svc(name: str, vip: str, backends: int, frontends: int = 1) -> Service:
    bes = tuple(Backend(f"10.1.{hash(name) % 200}.{i}", 80) for i in range(backends))
    fes = tuple(Frontend(CIP, f"{vip}{i}", 80, Protocol.TCP, bes) for i in range(frontends))
    return Service(ServiceKey("default", name), fes)


def test_plan_takes_services_in_key_order_and_refuses_the_one_that_does_not_fit():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_svc": 10, "kpr_backend": 100})
    a = svc("a", "10.96.0.1", 2)  # 3 entries
    b = svc("b", "10.96.1.", 2, frontends=3)  # 9 entries: does not fit after a
    c = svc("c", "10.96.0.3", 3)  # 4 entries
    desired = w._plan([a, b, c], old={})
    assert sorted(g.owner.name for g in desired.values()) == ["a", "c"]
    assert sum(len(g.svc) for g in desired.values()) == 7
    r = w.refused[b.key]
    assert (r.map, r.need, r.free, r.max_entries) == ("kpr_svc", 9, 7, 10)
    assert "bpf.mapSizes.kprSvc" in r.text() and "last good state" in r.text()
    assert w.refusals == 1


def test_backends_shared_between_services_count_once():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_backend": 2})
    bes = (Backend("10.1.0.1", 80), Backend("10.1.0.2", 80))
    one = Service(ServiceKey("x", "one"), (Frontend(CIP, "10.96.0.1", 80, Protocol.TCP, bes),))
    two = Service(ServiceKey("x", "two"), (Frontend(CIP, "10.96.0.2", 80, Protocol.TCP, bes),))
    three = Service(ServiceKey("x", "three"), (Frontend(CIP, "10.96.0.3", 80, Protocol.TCP, (Backend("10.1.0.3", 80),)),))
    desired = w._plan([one, three, two], old={})
    assert sorted(g.owner.name for g in desired.values()) == ["one", "two"]
    assert w.refused[three.key].map == "kpr_backend"


def test_a_service_delta_counts_what_it_gives_back():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_svc": 6})
    old = w._render(svc("a", "10.96.0.1", 4))  # 5 entries
    w._forget_render()
    # Growing by one entry beside nothing else fits 6; by two does not.
    assert w._refusal({fk: None for fk in old}, w._render(svc("a", "10.96.0.1", 5))) is None
    w._forget_render()
    r = w._refusal({}, w._render(svc("a", "10.96.0.1", 6)))
    assert isinstance(r, Refusal) and (r.map, r.need, r.free) == ("kpr_svc", 7, 6)


def test_a_service_that_cannot_be_rendered_is_skipped_alone():
    w = ServiceMapWriter("/nonexistent")
    bad = Service(ServiceKey("default", "bad"), (Frontend(CIP, "not-an-address", 80, Protocol.TCP, ()),))
    good = svc("good", "10.96.0.7", 1)
    desired = w._plan([bad, good], old={})
    assert [g.owner.name for g in desired.values()] == ["good"]
    assert w.errors == 1


def test_a_refused_service_keeps_its_old_groups_and_waits_only_for_its_growth():
    w = ServiceMapWriter("/nonexistent", sizes={"kpr_svc": 8})
    old = w._render(svc("a", "10.96.5.", 2))  # 10.96.5.0: 3 entries, as the maps hold them
    w._forget_render()
    big = svc("a", "10.96.5.", 2, frontends=3)  # 10.96.5.0-2: 9 entries
    desired = w._plan([big], old=old)
    assert desired == old and all(desired[fk] is old[fk] for fk in old), "the last good state stays as it is"
    assert all(g.owner == big.key for g in desired.values())
    assert dict(w.refused[big.key].delta)["kpr_svc"] == 6, "tried again once 6 more entries fit"
