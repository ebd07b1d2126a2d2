"""lb_ipam's allocator, pools, slot tables and config: pure logic, no source, no kernel."""

from __future__ import annotations

import ipaddress
import random

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpr.plugins.lb_ipam.allocator import LbAllocator, Result
from kpr.plugins.lb_ipam.config import DEFAULT_CLASS, LbIpamConfig
from kpr.plugins.lb_ipam.pools import AddressSpace, jump_hash
from kpr.plugins.lb_ipam.table import SlotTable
from kpr.selectors import LabelSelectorConfig


def config(*pools: dict, **more) -> LbIpamConfig:
    return LbIpamConfig.model_validate({"pools": list(pools), **more})


def pool(name: str = "public", addresses: list[str] | None = None, **more) -> dict:
    return {"name": name, "addresses": addresses or ["203.0.113.0/24"], **more}


def svc(name: str, ns: str = "default", ports: tuple[int, ...] = (80,), annotations: dict | None = None,
        labels: dict | None = None, created: str | None = None, status_ips: tuple[str, ...] = (), **spec) -> dict:
    spec.setdefault("type", "LoadBalancer")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ports", [{"port": p, "protocol": "TCP"} for p in ports])
    meta: dict = {"name": name, "namespace": ns, "annotations": annotations or {}, "labels": labels or {}}
    if created:
        meta["creationTimestamp"] = created
    obj = {"kind": "Service", "metadata": meta, "spec": spec}
    if status_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in status_ips]}}
    return obj


def allocator(*pools: dict, use_status: bool = False, **more) -> LbAllocator:
    cfg = config(*(pools or (pool(),)), **more)
    return LbAllocator(cfg.pools, cfg.load_balancer_class, use_status=use_status)


def ips(a: LbAllocator) -> dict[str, tuple[str, ...]]:
    return {k: r.ips for k, r in a.results.items()}


# --- basics ---------------------------------------------------------------------------------


def test_a_service_without_an_address_gets_one_from_the_pool():
    a = allocator(pool(addresses=["203.0.113.16/28"]))
    changed = a.update([svc("web")])
    ip = changed["default/web"].ips[0]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("203.0.113.16/28")
    assert a.usage() == {"public": {"used": 1, "free": 15, "waiting": 0}}


def test_only_load_balancers_of_no_class_or_the_configured_one():
    a = allocator(load_balancer_class="example.com/mine")
    a.update([
        svc("plain"),
        svc("mine", loadBalancerClass="example.com/mine"),
        svc("theirs", loadBalancerClass="example.com/other"),
        svc("cluster", type="ClusterIP"),
    ])
    assert a.results["default/plain"].ips and a.results["default/mine"].ips
    assert a.results["default/theirs"] == Result(ignored="loadBalancerClass example.com/other is not example.com/mine")
    assert not a.results["default/cluster"].ips and a.results["default/cluster"].ignored


def test_the_default_class():
    a = allocator()
    a.update([svc("x", loadBalancerClass=DEFAULT_CLASS)])
    assert a.results["default/x"].ips


def test_type_change_and_delete_release_the_address():
    a = allocator(pool(addresses=["203.0.113.0/30"]))
    a.update([svc("a")])
    assert a.usage()["public"]["used"] == 1
    changed = a.update([svc("a", type="ClusterIP")])
    assert changed["default/a"].ips == ()
    assert a.usage()["public"]["used"] == 0
    a.update([svc("b")])
    changed = a.update([], ["default/b"])
    assert changed == {"default/b": Result()}
    assert a.usage()["public"]["used"] == 0


# --- determinism ----------------------------------------------------------------------------


def test_same_manifests_same_addresses_whatever_the_order():
    services = [svc(f"s{i}") for i in range(60)]
    first = allocator(pool(addresses=["203.0.113.0/26"]))
    first.update(services)
    for seed in range(5):
        shuffled = services[:]
        random.Random(seed).shuffle(shuffled)
        other = allocator(pool(addresses=["203.0.113.0/26"]))
        # One by one, as a node that saw them arrive over time.
        for s in shuffled:
            other.update([s])
        assert ips(other) == ips(first)


def test_stable_across_a_restart():
    services = [svc(f"s{i}") for i in range(30)]
    before = allocator()
    before.update(services)
    after = allocator()  # a restarted agent: nothing but the manifests
    after.update(services)
    assert ips(after) == ips(before)


def test_an_older_service_keeps_its_address_when_a_newer_one_hashes_onto_it():
    # Full pool of 4: every new service collides. Dated services are never moved by newer ones.
    a = allocator(pool(addresses=["203.0.113.0/30"]))
    a.update([svc(f"old{i}", created=f"2024-01-0{i + 1}T00:00:00Z") for i in range(3)])
    before = ips(a)
    a.update([svc("new", created="2025-01-01T00:00:00Z")])
    assert {k: v for k, v in ips(a).items() if k != "default/new"} == before
    assert a.results["default/new"].ips


def test_deleting_from_a_collision_chain_is_the_documented_move():
    # Agreement wins over stability: the layout after a delete is the one a fresh node builds.
    services = [svc(f"s{i}") for i in range(14)]
    a = allocator(pool(addresses=["203.0.113.0/28"]))
    a.update(services)
    a.update([], ["default/s3"])
    fresh = allocator(pool(addresses=["203.0.113.0/28"]))
    fresh.update([s for s in services if s["metadata"]["name"] != "s3"])
    assert ips(a) == {k: v for k, v in ips(fresh).items()}


# --- requests -------------------------------------------------------------------------------


def test_requested_addresses_are_pinned_and_moved_services_get_another():
    # A sparse pool: the moved service finds a free slot at once, displacing nobody.
    a = allocator(pool(addresses=["203.0.113.0/24"]))
    a.update([svc(f"s{i}") for i in range(10)])
    holder = next(k for k, v in ips(a).items() if v)
    taken = a.results[holder].ips[0]
    changed = a.update([svc("pinned", loadBalancerIP=taken)])
    assert changed["default/pinned"].ips == (taken,)
    # The automatic holder moved elsewhere, and only it (plus the new one) changed.
    assert set(changed) == {"default/pinned", holder}
    assert changed[holder].ips and changed[holder].ips[0] != taken


def test_the_ips_annotation_and_its_conflicts():
    a = allocator(pool(addresses=["203.0.113.0/28", "2001:db8::/120"]))
    a.update([svc("a", annotations={"lbipam.kpr.io/ips": "203.0.113.5"}, created="2024-01-01T00:00:00Z")])
    assert a.results["default/a"].ips == ("203.0.113.5",)
    changed = a.update([svc("b", annotations={"lbipam.kpr.io/ips": "203.0.113.5"}, created="2024-02-01T00:00:00Z")])
    assert "taken" in changed["default/b"].problem and "default/a" in changed["default/b"].problem
    # Nothing already allocated changed.
    assert a.results["default/a"].ips == ("203.0.113.5",)
    # Freed: the refused one gets it as soon as the holder goes.
    changed = a.update([], ["default/a"])
    assert changed["default/b"].ips == ("203.0.113.5",)


@pytest.mark.parametrize("request_, problem", [
    ({"loadBalancerIP": "198.51.100.1"}, "requested address 198.51.100.1 is in no pool"),
    ({"annotations": {"lbipam.kpr.io/ips": "not-an-ip"}}, "not an IP address"),
    ({"annotations": {"lbipam.kpr.io/ips": "203.0.113.1,203.0.113.2"}}, "at most one address per family"),
    ({"annotations": {"lbipam.kpr.io/pool": "nope"}}, "names no configured pool: 'nope'"),
    ({"annotations": {"lbipam.kpr.io/ips": "2001:db8::1"}}, "is IPv6, the service's ipFamilies are ['IPv4']"),
])
def test_bad_requests_are_refused_with_the_reason(request_, problem):
    a = allocator(pool(addresses=["203.0.113.0/28", "2001:db8::/120"]))
    a.update([svc("ok")])
    before = ips(a)
    changed = a.update([svc("bad", **request_)])
    assert problem in changed["default/bad"].problem
    assert changed["default/bad"].ips == ()
    assert {k: v for k, v in ips(a).items() if k != "default/bad"} == before


def test_pool_annotation_namespaces_selector_and_auto_assign():
    a = allocator(
        pool("default-pool", ["203.0.113.0/28"]),
        pool("team", ["198.51.100.0/28"], namespaces=["team"]),
        pool("labelled", ["192.0.2.0/28"], serviceSelector={"matchLabels": {"tier": "edge"}}, autoAssign=False),
    )
    a.update([
        svc("plain"),
        svc("named", annotations={"lbipam.kpr.io/pool": "team"}, ns="team"),
        svc("wrong-ns", annotations={"lbipam.kpr.io/pool": "team"}),
        svc("edge", labels={"tier": "edge"}, annotations={"lbipam.kpr.io/pool": "labelled"}),
        svc("edge-auto", labels={"tier": "edge"}),
        svc("pinned-manual", labels={"tier": "edge"}, loadBalancerIP="192.0.2.3"),
    ])
    r = a.results
    assert r["default/plain"].ips[0].startswith("203.0.113.")
    assert r["team/named"].ips[0].startswith("198.51.100.")
    assert "pool team does not serve this service" in r["default/wrong-ns"].problem
    assert r["default/edge"].ips[0].startswith("192.0.2.")
    # autoAssign false: only for services that ask.
    assert r["default/edge-auto"].ips[0].startswith("203.0.113.")
    assert r["default/pinned-manual"].ips == ("192.0.2.3",)


def test_match_expressions():
    a = allocator(pool("p", ["192.0.2.0/28"], serviceSelector={"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["internal"]}]}))
    a.update([svc("x", labels={"tier": "internal"}), svc("y")])
    assert "no auto-assigning pool" in a.results["default/x"].problem
    assert a.results["default/y"].ips


# --- families -------------------------------------------------------------------------------


def test_dual_stack_gets_one_address_per_family():
    a = allocator(pool(addresses=["203.0.113.0/28", "2001:db8:100::/120"]))
    a.update([svc("d", ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="RequireDualStack")])
    v6, v4 = a.results["default/d"].ips
    assert ipaddress.ip_address(v6).version == 6 and ipaddress.ip_address(v4).version == 4


def test_single_stack_takes_the_first_family_only():
    a = allocator(pool(addresses=["203.0.113.0/28", "2001:db8:100::/120"]))
    a.update([svc("s", ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="SingleStack")])
    assert len(a.results["default/s"].ips) == 1 and ":" in a.results["default/s"].ips[0]


def test_a_family_no_pool_offers():
    a = allocator(pool(addresses=["203.0.113.0/28"]))
    a.update([
        svc("req", ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"),
        svc("pref", ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="PreferDualStack"),
    ])
    assert "has IPv6 addresses" in a.results["default/req"].problem
    assert len(a.results["default/pref"].ips) == 1


# --- sharing --------------------------------------------------------------------------------


def share(name: str, ports: tuple[int, ...], **more) -> dict:
    return svc(name, ports=ports, annotations={"lbipam.kpr.io/sharing-key": "k"}, **more)


def test_services_with_one_sharing_key_share_an_address():
    a = allocator()
    a.update([share("dns-tcp", (53,)), share("web", (80, 443))])
    assert a.results["default/dns-tcp"].ips == a.results["default/web"].ips != ()
    assert a.usage()["public"]["used"] == 1


def test_sharing_refused_when_ports_collide():
    a = allocator()
    a.update([share("a", (80,), created="2024-01-01T00:00:00Z"), share("b", (80,), created="2024-01-02T00:00:00Z")])
    assert a.results["default/a"].ips
    assert "also uses 80/TCP" in a.results["default/b"].problem


def test_sharing_with_local_traffic_policy_needs_the_same_selector():
    a = allocator()
    a.update([
        share("a", (80,), externalTrafficPolicy="Local", selector={"app": "x"}, created="2024-01-01T00:00:00Z"),
        share("b", (81,), externalTrafficPolicy="Local", selector={"app": "y"}, created="2024-01-02T00:00:00Z"),
        share("c", (82,), externalTrafficPolicy="Local", selector={"app": "x"}, created="2024-01-03T00:00:00Z"),
        share("d", (83,), created="2024-01-04T00:00:00Z"),
    ])
    assert a.results["default/c"].ips == a.results["default/a"].ips
    assert "externalTrafficPolicy Local" in a.results["default/b"].problem
    assert "externalTrafficPolicy Local" in a.results["default/d"].problem


def test_a_requested_address_is_shared_under_the_same_rules():
    a = allocator()
    a.update([
        share("a", (80,), loadBalancerIP="203.0.113.9", created="2024-01-01T00:00:00Z"),
        share("b", (443,), loadBalancerIP="203.0.113.9", created="2024-01-02T00:00:00Z"),
        svc("c", ports=(8080,), loadBalancerIP="203.0.113.9", created="2024-01-03T00:00:00Z"),
    ])
    assert a.results["default/a"].ips == a.results["default/b"].ips == ("203.0.113.9",)
    assert "no common lbipam.kpr.io/sharing-key" in a.results["default/c"].problem


def test_a_service_with_a_sharing_key_joins_the_address_its_key_requested():
    a = allocator()
    a.update([share("b", (443,)), share("c", (8080,))])
    assert a.results["default/b"].ips == a.results["default/c"].ips
    changed = a.update([share("a", (80,), loadBalancerIP="203.0.113.9")])
    # The others follow the requested address, and give theirs up.
    assert {k: r.ips for k, r in changed.items()} == {f"default/{n}": ("203.0.113.9",) for n in "abc"}
    assert a.usage()["public"]["used"] == 1
    # The request goes: they share an automatic address again.
    changed = a.update([], ["default/a"])
    assert changed["default/b"].ips == changed["default/c"].ips != ("203.0.113.9",)


def test_with_status_services_sharing_an_address_keep_sharing_it():
    # kubernetes: after the write-back every member holds the address in its status.
    a = allocator(use_status=True)
    a.update([share("a", (80,)), share("b", (443,))])
    ip = a.results["default/a"].ips
    assert a.results["default/b"].ips == ip
    changed = a.update([share("a", (80,), status_ips=ip), share("b", (443,), status_ips=ip)])
    assert changed == {}
    # A new member joins what the key holds, however the automatic group would hash now.
    changed = a.update([share("c", (8080,))])
    assert changed["default/c"].ips == ip
    assert a.usage()["public"]["used"] == 1


# --- exhaustion and pool changes ------------------------------------------------------------


def test_an_exhausted_pool_refuses_and_a_release_hands_the_address_on():
    a = allocator(pool(addresses=["203.0.113.0/30"]))
    a.update([svc(f"s{i}", created=f"2024-01-0{i + 1}T00:00:00Z") for i in range(5)])
    got = [k for k, r in a.results.items() if r.ips]
    refused = {k: r.problem for k, r in a.results.items() if r.problem}
    # The four oldest hold the four addresses; the youngest waits.
    assert sorted(got) == [f"default/s{i}" for i in range(4)]
    assert "no free IPv4 address" in refused["default/s4"]
    changed = a.update([], ["default/s1"])
    assert changed["default/s4"].ips == ips(a)["default/s4"] != ()
    assert a.usage()["public"] == {"used": 4, "free": 0, "waiting": 0}


def test_avoid_buggy_ips():
    a = allocator(pool(addresses=["203.0.113.254-203.0.114.1"], avoidBuggyIPs=True))
    a.update([svc(f"s{i}") for i in range(3)])
    assert sorted(r.ips[0] if r.ips else r.problem[:20] for r in a.results.values()) == [
        "203.0.113.254", "203.0.114.1", "pool public has no f"]


def test_growing_a_pool_at_its_end_moves_few_services():
    services = [svc(f"s{i}") for i in range(100)]
    small = allocator(pool(addresses=["10.1.0.0/22"]))
    small.update(services)
    grown = allocator(pool(addresses=["10.1.0.0/22", "10.1.4.0/22"]))
    grown.update(services)
    moved = [k for k in ips(small) if ips(small)[k] != ips(grown)[k]]
    # Jump hashing: about half go to the new half, the rest stay put (not ~all, as mod would).
    assert 20 <= len(moved) <= 80


def test_a_shrunk_pool_releases_what_it_no_longer_covers():
    services = [svc(f"s{i}") for i in range(20)]
    wide = allocator(pool(addresses=["10.1.0.0/24", "10.2.0.0/24"]), use_status=True)
    wide.update(services)
    # kubernetes: the next run sees the addresses in status; the second range is gone.
    narrow = allocator(pool(addresses=["10.1.0.0/24"]), use_status=True)
    narrow.update([svc(f"s{i}", status_ips=wide.results[f"default/s{i}"].ips) for i in range(20)])
    for k, r in narrow.results.items():
        old = wide.results[k].ips[0]
        if old.startswith("10.1."):
            assert r.ips == (old,)  # kept
        else:
            assert r.ips[0].startswith("10.1.")  # moved into what the pool still covers


# --- kubernetes: what a service holds is kept -----------------------------------------------


def test_with_status_a_held_address_is_kept_and_a_request_beats_it():
    a = allocator(use_status=True)
    a.update([svc("held", status_ips=("203.0.113.77",))])
    assert a.results["default/held"].ips == ("203.0.113.77",)
    changed = a.update([svc("wants", loadBalancerIP="203.0.113.77")])
    assert changed["default/wants"].ips == ("203.0.113.77",)
    assert changed["default/held"].ips and changed["default/held"].ips != ("203.0.113.77",)


def test_with_status_an_exhausted_pool_takes_nothing_held():
    a = allocator(pool(addresses=["203.0.113.0/30"]), use_status=True)
    held = {f"s{i}": (f"203.0.113.{i}",) for i in range(4)}
    a.update([svc(n, created="2024-06-01T00:00:00Z", status_ips=ip) for n, ip in held.items()])
    # An older service arrives: it waits, where the files rule would give it an address.
    changed = a.update([svc("older", created="2020-01-01T00:00:00Z")])
    assert list(changed) == ["default/older"] and "no free IPv4 address" in changed["default/older"].problem
    assert {k[len("default/"):]: r.ips for k, r in a.results.items() if r.ips} == held


def test_files_leave_a_manifests_own_status_alone():
    a = allocator()
    a.update([svc("own", status_ips=("198.51.100.7",))])
    assert a.results["default/own"].ignored == "status.loadBalancer.ingress is set in the manifest"


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pools, message", [
    ([pool("a", ["203.0.113.0/28"]), pool("b", ["203.0.113.8-203.0.113.20"])], "pools 'a' and 'b' overlap at 203.0.113.8-203.0.113.15"),
    ([pool("a", ["203.0.113.0/28", "203.0.113.4/30"])], "pool 'a' overlap"),
    ([pool("a"), pool("a", ["10.0.0.0/8"])], "pools[1].name: 'a' is also pools[0].name"),
    ([pool("a", ["203.0.113.1/24"])], "addresses[0] '203.0.113.1/24': not a CIDR or range"),
    ([pool("a", ["203.0.113.9-203.0.113.1"])], "the range ends before it starts"),
    ([pool("a", ["203.0.113.1-2001:db8::1"])], "cannot mix IPv4 and IPv6"),
    ([pool("Bad_Name")], "pool name must be a DNS label"),
])
def test_config_errors_name_the_problem(pools, message):
    with pytest.raises(pydantic.ValidationError) as e:
        config(*pools)
    assert message in str(e.value)


def test_config_error_names_the_key_path():
    with pytest.raises(pydantic.ValidationError) as e:
        config(pool("a", ["203.0.113.0/28"], autoAsign=True))
    assert "pools.0.autoAsign" in str(e.value)


@pytest.mark.parametrize("selector, where, message", [
    ({"matchExpressions": [{"key": "tier", "operator": "In"}]}, "pools.0.serviceSelector.matchExpressions.0", "operator In needs at least one value"),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist", "values": ["x"]}]}, "pools.0.serviceSelector.matchExpressions.0", "operator DoesNotExist takes no values"),
    ({"matchLabels": {"bad key": "x"}}, "pools.0.serviceSelector.matchLabels", "not a valid label key: 'bad key'"),
])
def test_service_selector_is_cores_label_selector(selector, where, message):
    """serviceSelector is kpr.selectors.LabelSelectorConfig (its matching: test_selectors.py)."""
    assert isinstance(config(pool("a", serviceSelector={"matchLabels": {"tier": "edge"}})).pools[0].service_selector, LabelSelectorConfig)
    with pytest.raises(pydantic.ValidationError) as e:
        config(pool("a", serviceSelector=selector))
    assert any(".".join(map(str, err["loc"])) == where and message in err["msg"] for err in e.value.errors()), e.value


# --- the slot table -------------------------------------------------------------------------


def canonical(space: AddressSpace, entries: dict[str, tuple], pins: list[int]) -> tuple[dict, set]:
    """The layout by definition: pins, then entries in priority order."""
    t = SlotTable(space, "p")
    for p in pins:
        t.pin(p)
    for id_, prio in sorted(entries.items(), key=lambda kv: (kv[1], kv[0])):
        t.add(id_, prio)
    return dict(t.where), set(t._waiting)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 15), st.integers(0, 4)),
        st.tuples(st.just("remove"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("pin"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("unpin"), st.integers(0, 11), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(1, 12), buggy=st.booleans(), steps=ops)
def test_table_layout_is_history_independent(size, buggy, steps):
    base = 0x0A0000FE if buggy else 0x0A000000
    space = AddressSpace(4, [(base, base + size - 1)], avoid_buggy=buggy)
    t = SlotTable(space, "p")
    entries: dict[str, tuple] = {}
    pins: dict[int, int] = {}
    for op, n, prio in steps:
        id_ = f"s{n}"
        slot = n % size
        if op == "add" and id_ not in entries:
            entries[id_] = (prio,)
            t.add(id_, (prio,))
        elif op == "remove" and id_ in entries:
            del entries[id_]
            t.remove(id_)
        elif op == "pin":
            pins[slot] = pins.get(slot, 0) + 1
            t.pin(slot)
        elif op == "unpin" and slot in pins:
            pins[slot] -= 1
            if not pins[slot]:
                del pins[slot]
            t.unpin(slot)
        assert (dict(t.where), set(t._waiting)) == canonical(space, entries, [p for p, c in pins.items() for _ in range(c)])
        assert not any(space.buggy(s) for s in t.where.values())


services_st = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"]),
        st.sampled_from(["default", "team"]),
        st.sampled_from([None, "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"]),
        st.sampled_from([None, "203.0.113.3", "203.0.113.5"]),
        st.sampled_from([None, "k1", "k2"]),
        st.sampled_from([80, 443]),
    ),
    unique_by=lambda t: (t[0], t[1]),
    max_size=10,
)


@settings(max_examples=150, deadline=None)
@given(services=services_st, order=st.randoms(use_true_random=False))
def test_allocation_is_order_independent(services, order):
    objs = []
    for name, ns, created, ip, key, port in services:
        s = svc(name, ns=ns, ports=(port,), created=created,
                annotations={"lbipam.kpr.io/sharing-key": key} if key else {})
        if ip:
            s["spec"]["loadBalancerIP"] = ip
        objs.append(s)
    at_once = allocator(pool(addresses=["203.0.113.0/29"]))
    at_once.update(objs)
    one_by_one = allocator(pool(addresses=["203.0.113.0/29"]))
    shuffled = objs[:]
    order.shuffle(shuffled)
    # Some arrive, go and come back: only the final set may matter.
    for s in shuffled:
        one_by_one.update([s])
    for s in shuffled[: len(shuffled) // 2]:
        one_by_one.update([], [f"{s['metadata']['namespace']}/{s['metadata']['name']}"])
    for s in shuffled[: len(shuffled) // 2]:
        one_by_one.update([s])
    assert one_by_one.results == at_once.results


def test_jump_hash_spreads_and_is_stable():
    homes = [jump_hash(k * 7919, 1000) for k in range(5000)]
    assert all(0 <= h < 1000 for h in homes)
    assert len(set(homes)) > 900
    assert [jump_hash(k * 7919, 1000) for k in range(50)] == homes[:50]
