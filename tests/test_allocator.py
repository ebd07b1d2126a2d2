"""Allocator: ClusterIPs and nodePorts as the API server would hand them out, kept across restarts."""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
from pathlib import Path

import pytest

from kpr.allocator import AllocationError, Allocator
from kpr.config import PortRange

RANGE = PortRange(first=30000, last=32767)


def svc(name: str, ns: str = "default", **spec) -> dict:
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP"}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def alloc(tmp_path: Path, cidrs=("10.96.0.0/16",), rng: PortRange = RANGE, name: str = "alloc.json") -> Allocator:
    return Allocator(tmp_path / "state" / name, list(cidrs), rng)


def write_state(tmp_path: Path, services: dict) -> None:
    """A state file as alloc() reads it."""
    path = tmp_path / "state" / "alloc.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"version": 1, "services": services}))


def node_ports(obj: dict) -> list[int | None]:
    return [p.get("nodePort") for p in obj["spec"]["ports"]]


# --- ClusterIPs --------------------------------------------------------------------------


def test_cluster_ip_from_ipv4_cidr(tmp_path):
    a = alloc(tmp_path)
    raw = svc("web")
    out = a.allocate(raw).obj
    ip = out["spec"]["clusterIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/16")
    assert ip not in ("10.96.0.0", "10.96.0.1", "10.96.255.255")
    assert out["spec"]["clusterIPs"] == [ip]
    assert out["spec"]["ipFamilies"] == ["IPv4"]
    assert out["spec"]["ipFamilyPolicy"] == "SingleStack"
    # The manifest's own dict is left alone: the source compares against it.
    assert "clusterIP" not in raw["spec"]


def test_cluster_ip_ipv6_only_when_asked(tmp_path):
    a = alloc(tmp_path, cidrs=("10.96.0.0/16", "fd00:10:96::/112"))
    out = a.allocate(svc("v6", ipFamilies=["IPv6"])).obj
    assert ipaddress.ip_address(out["spec"]["clusterIP"]) in ipaddress.ip_network("fd00:10:96::/112")
    assert out["spec"]["ipFamilies"] == ["IPv6"]
    # A service without ipFamilies gets the first configured family.
    out4 = a.allocate(svc("plain")).obj
    assert ipaddress.ip_address(out4["spec"]["clusterIP"]).version == 4


def test_ipv6_primary_when_listed_first(tmp_path):
    a = alloc(tmp_path, cidrs=("fd00:10:96::/112", "10.96.0.0/16"))
    out = a.allocate(svc("web")).obj
    assert ipaddress.ip_address(out["spec"]["clusterIP"]).version == 6


def test_dual_stack(tmp_path):
    a = alloc(tmp_path, cidrs=("10.96.0.0/16", "fd00:10:96::/112"))
    out = a.allocate(svc("ds", ipFamilyPolicy="PreferDualStack")).obj
    v4, v6 = out["spec"]["clusterIPs"]
    assert ipaddress.ip_address(v4) in ipaddress.ip_network("10.96.0.0/16")
    assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:10:96::/112")
    assert out["spec"]["clusterIP"] == v4
    assert out["spec"]["ipFamilies"] == ["IPv4", "IPv6"]

    out = a.allocate(svc("ds6", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv6", "IPv4"])).obj
    assert [ipaddress.ip_address(i).version for i in out["spec"]["clusterIPs"]] == [6, 4]
    assert out["spec"]["ipFamilies"] == ["IPv6", "IPv4"]


def test_dual_stack_with_one_cidr(tmp_path):
    a = alloc(tmp_path, cidrs=("10.96.0.0/16",))
    out = a.allocate(svc("prefer", ipFamilyPolicy="PreferDualStack")).obj
    assert len(out["spec"]["clusterIPs"]) == 1
    with pytest.raises(AllocationError, match="RequireDualStack needs an IPv6"):
        a.allocate(svc("require", ipFamilyPolicy="RequireDualStack"))
    with pytest.raises(AllocationError, match="no IPv6 service.clusterCIDR"):
        a.allocate(svc("v6", ipFamilies=["IPv6"]))


def test_no_cidr_means_no_cluster_ip_but_node_ports(tmp_path):
    a = alloc(tmp_path, cidrs=())
    out = a.allocate(svc("np", type="NodePort")).obj
    assert "clusterIP" not in out["spec"]
    assert node_ports(out)[0] in RANGE


def test_headless_and_external_name_get_nothing(tmp_path):
    a = alloc(tmp_path)
    headless = svc("h", clusterIP="None")
    assert a.allocate(headless).obj == headless
    ext = svc("e", type="ExternalName", externalName="example.com")
    assert a.allocate(ext).obj == ext
    assert a.keys() == []


def test_skips_network_first_host_and_broadcast_and_exhausts(tmp_path):
    a = alloc(tmp_path, cidrs=("10.0.0.0/29",))
    got = {a.allocate(svc(f"s{i}")).obj["spec"]["clusterIP"] for i in range(5)}
    assert got == {f"10.0.0.{i}" for i in range(2, 7)}
    with pytest.raises(AllocationError, match=r"no free ClusterIP left in 10\.0\.0\.0/29"):
        a.allocate(svc("one-too-many"))
    # The failed service holds nothing; freeing one lets it in.
    assert a.get("default/one-too-many") is None
    a.release("default/s0")
    assert a.allocate(svc("one-too-many")).obj["spec"]["clusterIP"] in got


def test_allocation_is_deterministic(tmp_path):
    a = alloc(tmp_path, name="a.json")
    b = alloc(tmp_path, name="b.json")
    for i in range(50):
        assert a.allocate(svc(f"s{i}", type="NodePort")).obj == b.allocate(svc(f"s{i}", type="NodePort")).obj


def test_reallocating_same_service_is_stable(tmp_path):
    a = alloc(tmp_path)
    first = a.allocate(svc("web", type="NodePort")).obj
    again = a.allocate(svc("web", type="NodePort")).obj
    assert first == again
    assert not a.allocate(svc("web", type="NodePort")).displaced


# --- nodePorts ---------------------------------------------------------------------------


def test_node_ports_in_range(tmp_path):
    a = alloc(tmp_path, rng=PortRange(first=31000, last=31099))
    out = a.allocate(
        svc("np", type="NodePort", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 443}])
    ).obj
    nps = node_ports(out)
    assert all(31000 <= p <= 31099 for p in nps)
    assert len(set(nps)) == 2
    # ClusterIP services get none.
    assert node_ports(a.allocate(svc("cip")).obj) == [None]


def test_tcp_and_udp_of_one_port_share_a_node_port(tmp_path):
    a = alloc(tmp_path)
    out = a.allocate(
        svc("dns", type="NodePort", ports=[
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ])
    ).obj
    udp, tcp = node_ports(out)
    assert udp == tcp


def test_load_balancer_node_ports_and_health_check(tmp_path):
    a = alloc(tmp_path)
    out = a.allocate(svc("lb", type="LoadBalancer", externalTrafficPolicy="Local")).obj
    assert node_ports(out)[0] in RANGE
    hc = out["spec"]["healthCheckNodePort"]
    assert hc in RANGE and hc != node_ports(out)[0]
    # allocateLoadBalancerNodePorts: false keeps ports without nodePorts, the health check still gets one.
    out = a.allocate(
        svc("lb2", type="LoadBalancer", externalTrafficPolicy="Local", allocateLoadBalancerNodePorts=False)
    ).obj
    assert node_ports(out) == [None]
    assert out["spec"]["healthCheckNodePort"] in RANGE
    # Cluster policy: no health check port.
    out = a.allocate(svc("lb3", type="LoadBalancer")).obj
    assert "healthCheckNodePort" not in out["spec"]


def test_node_port_range_exhausted(tmp_path):
    a = alloc(tmp_path, rng=PortRange(first=30000, last=30002))
    for i in range(3):
        a.allocate(svc(f"s{i}", type="NodePort"))
    with pytest.raises(AllocationError, match="no free nodePort left in service.nodePortRange 30000-30002"):
        a.allocate(svc("s3", type="NodePort"))


def test_explicit_node_port_outside_range(tmp_path):
    a = alloc(tmp_path)
    with pytest.raises(AllocationError, match="outside service.nodePortRange"):
        a.allocate(svc("np", type="NodePort", ports=[{"port": 80, "nodePort": 8080}]))


# --- explicit values and conflicts --------------------------------------------------------


def test_explicit_values_are_kept_and_reserved(tmp_path):
    a = alloc(tmp_path, cidrs=("10.0.0.0/29",), rng=PortRange(first=30000, last=30001))
    out = a.allocate(svc("fixed", type="NodePort", clusterIP="10.0.0.4", ports=[{"port": 80, "nodePort": 30001}])).obj
    assert out["spec"]["clusterIPs"] == ["10.0.0.4"]
    assert node_ports(out) == [30001]
    # The rest of the range goes to others, never the reserved values.
    other = a.allocate(svc("auto", type="NodePort")).obj
    assert other["spec"]["clusterIP"] != "10.0.0.4"
    assert node_ports(other) == [30000]
    with pytest.raises(AllocationError, match="no free nodePort"):
        a.allocate(svc("auto2", type="NodePort"))


def test_explicit_conflict_first_keeps_it(tmp_path):
    a = alloc(tmp_path)
    a.allocate(svc("first", type="NodePort", clusterIP="10.96.5.5", ports=[{"port": 80, "nodePort": 30080}]))
    with pytest.raises(AllocationError, match="nodePort 30080/TCP is already allocated to service default/first"):
        a.allocate(svc("second", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    with pytest.raises(AllocationError, match="clusterIP 10.96.5.5 is already allocated to service default/first"):
        a.allocate(svc("third", clusterIP="10.96.5.5"))
    assert a.get("default/first") == {
        "clusterIPs": ["10.96.5.5"], "nodePorts": {"/TCP/80": 30080}, "explicit": ["10.96.5.5", "30080/TCP"]
    }
    # Another protocol on the same number is no conflict.
    out = a.allocate(svc("udp", type="NodePort", ports=[{"port": 80, "protocol": "UDP", "nodePort": 30080}])).obj
    assert node_ports(out) == [30080]


def test_failed_allocation_leaves_previous_values(tmp_path):
    a = alloc(tmp_path)
    a.allocate(svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    before = a.allocate(svc("b", type="NodePort")).obj
    with pytest.raises(AllocationError):
        a.allocate(svc("b", type="NodePort", clusterIP="10.96.9.9", ports=[{"port": 80, "nodePort": 30080}]))
    assert a.get("default/b") == {"clusterIPs": before["spec"]["clusterIPs"], "nodePorts": {"http/TCP/80": node_ports(before)[0]}}
    # 10.96.9.9 was not kept by the failed attempt.
    assert a.allocate(svc("c", clusterIP="10.96.9.9")).obj["spec"]["clusterIP"] == "10.96.9.9"


def test_explicit_value_takes_over_an_automatic_one(tmp_path):
    a = alloc(tmp_path, cidrs=("10.0.0.0/29",), rng=PortRange(first=30000, last=30004))
    auto = a.allocate(svc("auto", type="NodePort")).obj
    ip, np = auto["spec"]["clusterIP"], node_ports(auto)[0]
    res = a.allocate(svc("pinned", type="NodePort", clusterIP=ip, ports=[{"port": 80, "nodePort": np}]))
    assert res.displaced == {"default/auto"}
    assert res.obj["spec"]["clusterIP"] == ip and node_ports(res.obj) == [np]
    moved = a.allocate(svc("auto", type="NodePort")).obj
    assert moved["spec"]["clusterIP"] != ip
    assert node_ports(moved)[0] != np


def test_mismatched_cluster_ips(tmp_path):
    a = alloc(tmp_path, cidrs=("10.96.0.0/16", "fd00::/112"))
    with pytest.raises(AllocationError, match="is not spec.clusterIPs"):
        a.allocate(svc("x", clusterIP="10.96.0.5", clusterIPs=["10.96.0.6"]))
    with pytest.raises(AllocationError, match="SingleStack allows one family"):
        a.allocate(svc("y", ipFamilyPolicy="SingleStack", ipFamilies=["IPv4", "IPv6"]))
    # One explicit address plus dual stack: the other family is allocated.
    out = a.allocate(svc("z", clusterIP="10.96.0.7", ipFamilyPolicy="PreferDualStack")).obj
    assert out["spec"]["clusterIPs"][0] == "10.96.0.7"
    assert ipaddress.ip_address(out["spec"]["clusterIPs"][1]).version == 6



def test_an_address_that_does_not_read_is_named_by_the_field_written(tmp_path):
    # validation reads a sloppy IPv4 address (leading zeros) as kube-proxy does; the allocator
    # does not, and names the field the manifest wrote
    a = alloc(tmp_path)
    with pytest.raises(AllocationError, match=r"^spec\.clusterIP: not an IP address: '010\.96\.0\.11'$"):
        a.allocate(svc("only", clusterIP="010.96.0.11"))
    with pytest.raises(AllocationError, match=r"^spec\.clusterIPs: not an IP address: '010\.96\.0\.11'$"):
        a.allocate(svc("both", clusterIP="010.96.0.11", clusterIPs=["010.96.0.11"]))
    with pytest.raises(AllocationError, match=r"^spec\.clusterIPs: not an IP address: '010\.96\.0\.11'$"):
        a.allocate(svc("listed", clusterIPs=["010.96.0.11"]))
    assert a.keys() == []

# --- persistence ---------------------------------------------------------------------------


def test_stable_across_restart_in_any_order(tmp_path):
    cidrs = ("10.96.0.0/16", "fd00:10:96::/112")
    a = alloc(tmp_path, cidrs=cidrs)
    names = [f"s{i}" for i in range(20)]
    first = {n: a.allocate(svc(n, type="LoadBalancer", externalTrafficPolicy="Local", ipFamilyPolicy="PreferDualStack")).obj for n in names}
    a.save()
    b = alloc(tmp_path, cidrs=cidrs)
    # A newcomer allocated before the old services come back must not take their values.
    newcomer = b.allocate(svc("newcomer", type="NodePort", ipFamilyPolicy="PreferDualStack")).obj
    taken = {ip for o in first.values() for ip in o["spec"]["clusterIPs"]}
    assert not set(newcomer["spec"]["clusterIPs"]) & taken
    for n in reversed(names):
        assert b.allocate(svc(n, type="LoadBalancer", externalTrafficPolicy="Local", ipFamilyPolicy="PreferDualStack")).obj == first[n]


def test_state_file_format_and_atomic_write(tmp_path):
    a = alloc(tmp_path)
    out = a.allocate(svc("web", ns="shop", type="NodePort")).obj
    assert not (tmp_path / "state").exists()  # nothing written until save
    a.save()
    path = tmp_path / "state" / "alloc.json"
    data = json.loads(path.read_text())
    assert data == {
        "version": 1,
        "services": {
            "shop/web": {"clusterIPs": out["spec"]["clusterIPs"], "nodePorts": {"http/TCP/80": node_ports(out)[0]}}
        },
    }
    assert [p.name for p in path.parent.iterdir()] == ["alloc.json"]  # no temp file left
    assert not a.dirty


def test_retain_releases_services_gone(tmp_path):
    a = alloc(tmp_path)
    a.allocate(svc("keep"))
    a.allocate(svc("gone"))
    a.save()
    b = alloc(tmp_path)
    assert b.keys() == ["default/gone", "default/keep"]
    assert b.retain(["default/keep"]) == 1
    b.save()
    assert list(json.loads((tmp_path / "state" / "alloc.json").read_text())["services"]) == ["default/keep"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 1}', '{"version": 99, "services": {}}'])
def test_corrupt_state_file_starts_empty(tmp_path, caplog, content):
    path = tmp_path / "state" / "alloc.json"
    path.parent.mkdir()
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="kpr.allocator"):
        a = alloc(tmp_path)
    assert a.keys() == []
    assert any("state_corrupt" in r.getMessage() for r in caplog.records)
    a.allocate(svc("web"))
    a.save()
    assert "default/web" in json.loads(path.read_text())["services"]


def test_bad_entries_and_out_of_range_values_are_dropped(tmp_path, caplog):
    write_state(tmp_path, {
            "default/bad": {"clusterIPs": ["not-an-ip"]},
            "default/old": {"clusterIPs": ["192.168.0.9"], "nodePorts": {"/TCP/80": 20000}},
            "default/ok": {"clusterIPs": ["10.96.0.50"], "nodePorts": {"/TCP/80": 30050}},
            "default/zdup": {"clusterIPs": ["10.96.0.50"]},
    })
    with caplog.at_level(logging.INFO, logger="kpr.allocator"):
        a = alloc(tmp_path)
    assert a.get("default/bad") is None
    assert a.get("default/old") is None  # nothing left that fits the config
    assert a.get("default/zdup") is None  # loaded after default/ok, which keeps the address
    assert a.get("default/ok") == {"clusterIPs": ["10.96.0.50"], "nodePorts": {"/TCP/80": 30050}}
    out = a.allocate(svc("ok", type="NodePort", ports=[{"port": 80}])).obj
    assert out["spec"]["clusterIP"] == "10.96.0.50" and node_ports(out) == [30050]


def test_readded_service_gets_its_old_values_back(tmp_path):
    # The preferred value comes from a hash of the service key, so deleting a service and
    # adding it back (a file moved away and back) keeps its address when still free.
    a = alloc(tmp_path)
    before = a.allocate(svc("web", type="NodePort")).obj
    a.release("default/web")
    for i in range(20):
        a.allocate(svc(f"other{i}", type="NodePort"))
    assert a.allocate(svc("web", type="NodePort")).obj == before


def test_explicit_holder_survives_restart(tmp_path):
    a = alloc(tmp_path)
    a.allocate(svc("holder", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    a.save()
    b = alloc(tmp_path)
    # The contender comes first after the restart; the holder still has the value.
    with pytest.raises(AllocationError, match="already allocated to service default/holder"):
        b.allocate(svc("contender", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    # An automatic value from before the restart is still taken over by an explicit one.
    auto = b.allocate(svc("auto", type="NodePort")).obj
    b.save()
    c = alloc(tmp_path)
    res = c.allocate(svc("pinned", type="NodePort", ports=[{"port": 80, "nodePort": node_ports(auto)[0]}]))
    assert res.displaced == {"default/auto"}


def test_explicit_marks_stay_on_their_values_when_another_value_is_taken_over(tmp_path):
    """A record keeps which of its values were written (a bit per value, by position): losing
    an automatic value to a takeover moves the positions of the ones after it, and the marks
    must follow their values, in memory and through the state file."""
    a = alloc(tmp_path)
    first = a.allocate(svc("a", type="NodePort", clusterIP="10.96.5.5", ports=[
        {"name": "x", "port": 80}, {"name": "y", "port": 81, "nodePort": 30333},
        {"name": "z", "port": 82, "nodePort": 30444}])).obj
    auto = node_ports(first)[0]
    assert a.get("default/a")["explicit"] == ["10.96.5.5", "30333/TCP", "30444/TCP"]
    res = a.allocate(svc("b", type="NodePort", ports=[{"port": 80, "nodePort": auto}]))
    assert res.displaced == {"default/a"}
    # a's automatic nodePort is gone (the first of its ports); the written ones stay marked
    assert a.get("default/a") == {"clusterIPs": ["10.96.5.5"], "nodePorts": {"y/TCP/81": 30333, "z/TCP/82": 30444},
                                  "explicit": ["10.96.5.5", "30333/TCP", "30444/TCP"]}
    assert a.get("default/b")["explicit"] == [f"{auto}/TCP"]
    a.save()
    again = alloc(tmp_path)
    assert again.get("default/a") == a.get("default/a") and again.get("default/b") == a.get("default/b")
    # still written, so a third service asking for one of them is refused, not given it
    with pytest.raises(AllocationError, match="already allocated to service default/a"):
        again.allocate(svc("c", type="NodePort", ports=[{"port": 80, "nodePort": 30444}]))


def test_state_entries_of_the_usual_shape_load_as_any_other(tmp_path, monkeypatch):
    # Allocator._load_plain takes entries of one IPv4 ClusterIP without the general path;
    # what it keeps must be what that path keeps, for every shape it may meet.
    write_state(tmp_path, {
            "a/plain": {"clusterIPs": ["10.96.0.10"]},
            "a/explicit": {"clusterIPs": ["10.96.0.11"], "explicit": ["10.96.0.11"]},
            "a/explicit-other": {"clusterIPs": ["10.96.0.12"], "explicit": ["10.96.0.99"]},
            "a/dup": {"clusterIPs": ["10.96.0.10"]},
            "a/out-of-range": {"clusterIPs": ["192.168.1.1"]},
            "a/not-canonical": {"clusterIPs": ["10.96.000.13"]},
            "a/network-address": {"clusterIPs": ["10.96.0.0"]},
            "a/v6": {"clusterIPs": ["fd00:10:96::5"]},
            "a/dual": {"clusterIPs": ["10.96.0.14", "fd00:10:96::6"]},
            "a/ports": {"clusterIPs": ["10.96.0.15"], "nodePorts": {"/TCP/80": 30050}},
            "a/lb": {"clusterIPs": ["10.96.0.16"], "loadBalancerIPs": ["192.0.2.1"]},
            "a/number": {"clusterIPs": [17]},
            "a/empty": {"clusterIPs": []},
            "a/not-a-dict": ["10.96.0.18"],
            "b/takes-explicit": {"clusterIPs": ["10.96.0.19"], "explicit": ["10.96.0.19"]},
    })
    cidrs = ("10.96.0.0/16", "fd00:10:96::/112")
    fast = alloc(tmp_path, cidrs=cidrs)
    monkeypatch.setattr(Allocator, "_load_plain", lambda self, key, entry: False)
    general = alloc(tmp_path, cidrs=cidrs)
    assert fast._records == general._records
    assert fast._ips == general._ips and fast._ports == general._ports
    assert fast._used_in_range == general._used_in_range
    assert {k: fast.get(k) for k in fast.keys()} == {k: general.get(k) for k in general.keys()}
    assert fast.get("a/explicit") == {"clusterIPs": ["10.96.0.11"], "explicit": ["10.96.0.11"]}
    # an explicit value loaded by either path still wins against a newcomer's
    with pytest.raises(AllocationError, match="already allocated to service b/takes-explicit"):
        fast.allocate(svc("c", ns="x", clusterIP="10.96.0.19"))


def test_reallocating_after_a_restart_changes_the_state_only_when_a_value_moves(tmp_path):
    specs = {
        "plain": {},
        "explicit": {"clusterIP": "10.96.3.3"},
        "nodeport": {"type": "NodePort", "ports": [{"name": "b", "port": 81, "nodePort": 30081}, {"name": "a", "port": 80}]},
        "lb": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
    }
    a = alloc(tmp_path)
    first = {n: a.allocate(svc(n, **spec)).obj for n, spec in specs.items()}
    a.set_load_balancer("default/lb", ["192.0.2.7"])
    a.save()
    b = alloc(tmp_path)
    for n, spec in specs.items():
        assert b.allocate(svc(n, **spec)).obj == first[n]
        assert not b.dirty, n
    # the same ports listed in another order: the same values and marks (at other positions
    # among the record's claims), nothing to write
    b.allocate(svc("nodeport", type="NodePort", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81, "nodePort": 30081}]))
    assert not b.dirty
    b.allocate(svc("explicit", clusterIP="10.96.3.4"))
    assert b.dirty


def test_an_explicit_mark_moved_to_another_port_is_written(tmp_path):
    # a: nodePort written, b: allocated; then a's written value goes and b's is written: the
    # explicit ports come first, so the mask is the same bit while the mark moved from a to b
    a = alloc(tmp_path)
    first = a.allocate(svc("s", type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 30001}, {"name": "b", "port": 81}]))
    b_port = next(p["nodePort"] for p in first.obj["spec"]["ports"] if p["name"] == "b")
    a.save()
    a.allocate(svc("s", type="NodePort", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81, "nodePort": b_port}]))
    assert a.dirty
    a.save()
    b = alloc(tmp_path)
    assert b.get("default/s")["explicit"] == [f"{b_port}/TCP"]
    # so after a restart b's written value is still the service's own, not taken over
    with pytest.raises(AllocationError, match="already allocated to service default/s"):
        b.allocate(svc("newcomer", type="NodePort", ports=[{"port": 90, "nodePort": b_port}]))


def test_an_explicit_cluster_ip_outside_the_automatic_range_survives_a_restart(tmp_path):
    # the network's first host (kube gives it to the `kubernetes` service) is outside the
    # range automatic values come from; written in a manifest it is accepted, and kept
    a = alloc(tmp_path)
    first = a.allocate(svc("kubernetes", clusterIP="10.96.0.1")).obj
    a.allocate(svc("web"))
    a.save()
    b = alloc(tmp_path)
    assert b.get("default/kubernetes") == {"clusterIPs": ["10.96.0.1"], "explicit": ["10.96.0.1"]}
    with pytest.raises(AllocationError, match="already allocated to service default/kubernetes"):
        b.allocate(svc("newcomer", clusterIP="10.96.0.1"))
    assert b.allocate(svc("kubernetes", clusterIP="10.96.0.1")).obj == first
    b.allocate(svc("web"))
    assert not b.dirty  # nothing to write again


# --- the usual shape's short way (allocate's plain path) ----------------------------------


@pytest.mark.parametrize("cidrs", [("10.96.0.0/29",), ("fd00:10:96::/125",), ("10.96.0.0/29", "fd00:10:96::/125")])
def test_plain_services_allocate_as_the_general_way(tmp_path, cidrs):
    """A ClusterIP service that leaves ClusterIP, families and policy to allocation takes a
    short way; the same manifest with its policy written (SingleStack, what allocation gives
    it) goes the general way. Both allocators must agree on every step: the values, the
    objects, errors, what is displaced, when the state changes, the state file, a restart."""
    plain, general = (alloc(tmp_path, cidrs, name=f"{side}.json") for side in ("plain", "general"))

    def both(name: str, **spec) -> None:
        outcomes = []
        for a, extra in ((plain, {}), (general, {"ipFamilyPolicy": "SingleStack"})):
            a._dirty = False
            raw = svc(name, **{**spec, **({} if "clusterIP" in spec else extra)})
            try:
                got = a.allocate(raw)
            except AllocationError as e:
                outcomes.append(("error", str(e), a.get(f"default/{name}"), a.dirty))
                continue
            out = got.obj
            assert out["spec"].pop("ipFamilyPolicy") == "SingleStack"
            assert raw["spec"].pop("ipFamilyPolicy", None) in (None, "SingleStack")
            outcomes.append((out, got.displaced, a.get(f"default/{name}"), a.dirty, sorted(a.keys())))
        assert outcomes[0] == outcomes[1]

    for i in range(5):  # /29: 5 automatic values, then the range is full
        both(f"s{i}")
    both("s5")  # no free ClusterIP left: the same error, nothing kept
    both("s2")  # again, unchanged: its value kept, the state not dirty
    taken = plain.get("default/s1")["clusterIPs"][0]
    both("explicit", clusterIP=taken)  # an explicit value displaces s1 (general way in both)
    both("s1")  # s1 again: no free value left
    plain.release("default/s3")
    general.release("default/s3")
    both("s1")  # s3's value freed: s1 takes it
    for a in (plain, general):
        a.save()
    files = [(tmp_path / "state" / f"{side}.json").read_text() for side in ("plain", "general")]
    assert files[0] == files[1]
    for side in ("plain", "general"):
        restarted = alloc(tmp_path, cidrs, name=f"{side}.json")
        assert {k: restarted.get(k) for k in restarted.keys()} == {k: plain.get(k) for k in plain.keys()}


def test_state_file_lines_of_plain_records_as_json_writes_them(tmp_path):
    """save() writes a record of one ClusterIP without json.dumps: each line must be what
    json.dumps makes of the record, for the usual shape and the others beside it."""
    a = alloc(tmp_path, cidrs=("10.96.0.0/16", "fd00:10:96::/112"))
    a.allocate(svc("auto"))
    a.allocate(svc("explicit", clusterIP="10.96.7.7"))
    a.allocate(svc("v6", ipFamilies=["IPv6"]))
    a.allocate(svc("dual", ipFamilyPolicy="RequireDualStack"))
    a.allocate(svc("np", type="NodePort"))
    a.allocate(svc("np-explicit", type="NodePort", clusterIP="10.96.8.8",
                   ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30555}]))
    a.allocate(svc("quoted\"name"))
    a.save()
    text = (tmp_path / "state" / "alloc.json").read_text()
    lines = [line.rstrip(",") for line in text.splitlines() if line.startswith("  ")]
    assert lines == [f"  {json.dumps(k)}: {json.dumps(a.get(k))}" for k in a.keys()]
    assert json.loads(text)["services"] == {k: a.get(k) for k in a.keys()}


# --- a written ClusterIP's short way (allocate's _allocate_written) -------------------------

from hypothesis import example, given, settings, strategies as st  # noqa: E402

# The /28's edges: .0 (network) and .1 outside the automatic range, .2-.14 in it, .15
# (broadcast) outside, .16 outside the network.
_WRITTEN = ["10.96.0.0", "10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.9", "10.96.0.15", "10.96.0.16", "10.96.0.010",
            "10.97.0.1", "fd00:10:96::5", "None", "", "nonsense"]
_LISTED = {"same": lambda ip: [ip], "other": lambda ip: [ip, "fd00:10:96::7"], "bad": lambda ip: "10.96.0.2",
           "differs": lambda ip: ["10.96.0.3"]}
# ipFamilies and ipFamilyPolicy as written; the last of the single-stack ones is what
# `kubectl get -o yaml` exports.
_FAMILIES = [{}, {"ipFamilies": ["IPv4"]}, {"ipFamilyPolicy": "SingleStack"},
             {"ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}, {"ipFamilyPolicy": "PreferDualStack"},
             {"ipFamilyPolicy": "RequireDualStack"}, {"ipFamilies": ["IPv6"]},
             {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}]
_STEP = st.tuples(
    st.sampled_from(["release", "restart", "allocate", "allocate", "allocate", "allocate", "allocate"]),
    st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from(_WRITTEN + [None]),  # clusterIP (None: left out)
    st.sampled_from(["none", *_LISTED]),  # clusterIPs
    st.sampled_from(["ClusterIP", None, "NodePort"]),
    st.sampled_from(range(len(_FAMILIES))),
)
_CIDRS = [("10.96.0.0/28",), ("10.96.0.0/28", "fd00:10:96::/124"), ("fd00:10:96::/124",)]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_STEP, max_size=20), cidrs=st.sampled_from(_CIDRS))
# a written ClusterIP and an IPv6 one allocated beside it, then the same ClusterIP alone:
# the IPv6 claim goes
@example(steps=[("allocate", "a", "10.96.0.9", "none", None, 4),
                ("allocate", "a", "10.96.0.9", "none", None, 0)], cidrs=_CIDRS[1])
def test_written_cluster_ips_allocate_as_the_general_way(tmp_path_factory, steps, cidrs):
    """A ClusterIP service whose manifest writes one canonical IPv4 ClusterIP nobody else holds
    takes a short way; an allocator with that way turned off takes the general one. Both must
    agree on every step: the object, what is displaced, errors, the records, the claims and the
    range counts, when the state changes, the state file, and what a restart reads back."""
    tmp = tmp_path_factory.mktemp("written")

    def start() -> tuple[Allocator, Allocator]:
        fast, general = (Allocator(tmp / f"{side}.json", list(cidrs), RANGE) for side in ("fast", "general"))
        general._allocate_written = lambda *args: None  # type: ignore[method-assign]
        return fast, general

    def saved() -> None:
        fast.save(force=True)
        general.save(force=True)
        assert (tmp / "fast.json").read_text() == (tmp / "general.json").read_text()

    def persisted(a: Allocator) -> dict:
        # A service whose every value was taken over keeps an empty record in memory until
        # it is allocated again; the state file leaves it out.
        return {k: a.get(k) for k in a.keys() if a.get(k)}

    fast, general = start()
    manifests: dict[str, dict] = {}  # name -> the spec its manifest writes now
    for op, name, ip, listed, stype, extra in steps:
        if op == "restart":
            saved()
            restarted = start()
            for old, new in zip((fast, general), restarted):
                assert persisted(new) == persisted(old)
            fast, general = restarted
            continue
        if op == "release":
            manifests.pop(name, None)
            for a in (fast, general):
                a._dirty = False
                a.release(f"default/{name}")
            assert fast.dirty == general.dirty
            continue
        spec: dict = dict(_FAMILIES[extra])
        if stype:
            spec["type"] = stype
        if ip is not None:
            spec["clusterIP"] = ip
            if listed != "none":
                spec["clusterIPs"] = _LISTED[listed](ip)
        manifests[name] = spec
        # The service, then each one it takes a value from, allocated again with its manifest,
        # as the files source does (FilesSource._resolve).
        queue, visits = [name], {name: 1}
        while queue:
            moved = queue.pop(0)
            outcomes = []
            for a in (fast, general):
                a._dirty = False
                try:
                    got = a.allocate(svc(moved, **copy.deepcopy(manifests[moved])))
                    outcomes.append((got.obj, got.displaced, a.dirty))
                except AllocationError as e:
                    outcomes.append(("error", str(e), a.dirty))
            assert outcomes[0] == outcomes[1]
            for key in sorted(outcomes[0][1]) if outcomes[0][0] != "error" else ():
                other = key.partition("/")[2]
                visits[other] = visits.get(other, 0) + 1
                if other in manifests and other not in queue and visits[other] <= 3:
                    queue.append(other)
            assert fast._records == general._records
            assert fast._ips == general._ips and fast._ports == general._ports
            assert fast._used_in_range == general._used_in_range
            assert {k: fast.get(k) for k in fast.keys()} == {k: general.get(k) for k in general.keys()}
    saved()
    assert persisted(start()[0]) == persisted(fast)
