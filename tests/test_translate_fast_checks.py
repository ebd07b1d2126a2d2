"""Checks that a full sync runs for every object take a short way for well-formed input
(translate._parse_service_port, the ClusterIPs' field paths made only for a message): for
any input, the outcome must be the checking way's, the same value or the same error."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kpr import translate
from kpr.model import InvalidObject

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}}

odd = st.one_of(st.none(), st.booleans(), st.just(""), st.just([]), st.just({}), st.floats(allow_nan=False))
port_number = st.one_of(st.integers(-1, 65537), st.sampled_from([0, 1, 80, 65535, 65536]), odd)
port = st.one_of(
    odd,
    st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.sampled_from(["", "http", "dns"]), odd),
        "protocol": st.one_of(st.sampled_from(["", "TCP", "UDP", "SCTP", "tcp", "ICMP"]), odd),
        "port": port_number,
        "nodePort": port_number,
        "targetPort": st.one_of(port_number, st.sampled_from(["", "http"])),
    }),
)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except InvalidObject as e:
        return ("error", str(e))


@settings(max_examples=600, deadline=None)
@given(port, st.integers(0, 3))
def test_service_port_short_way_is_the_checking_way(value, i):
    assert _outcome(translate._parse_service_port, SERVICE, value, i) == _outcome(
        translate._checked_service_port, SERVICE, value, i
    )


texts = st.one_of(st.sampled_from(["10.96.0.10", "10.96.0.11", "010.96.0.10", "10.97.0.1", "127.0.0.1", "None", "", "fd00::1", "x"]), odd)


@settings(max_examples=400, deadline=None)
@given(texts, st.one_of(st.none(), st.lists(texts, max_size=3)))
def test_cluster_ip_errors_name_the_field(cluster_ip, cluster_ips):
    spec = {"clusterIP": cluster_ip, **({"clusterIPs": cluster_ips} if cluster_ips is not None else {})}
    rules = translate.AddressRules(("10.96.0.0/16",))
    got = _outcome(translate._parse_cluster_ips, SERVICE, spec, rules)
    if got[0] == "ok":
        # Each address as parsing it alone gives, in order.
        given_texts = cluster_ips or ([cluster_ip] if cluster_ip and cluster_ip != "None" else [])
        assert got[1] == tuple(translate._ip(t) for t in given_texts if t != "None")
    else:
        field = got[1].split(": ")[1]
        assert field.startswith(("spec.clusterIP", "spec.clusterIPs["))


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.none(), texts), st.one_of(st.none(), st.lists(texts, max_size=3)))
def test_cluster_ips_short_ways_are_the_checking_way(cluster_ip, cluster_ips):
    """Both fields, one of them or none: the inline shapes read what the checking way reads
    (the same addresses, or the same error)."""
    spec = {k: v for k, v in (("clusterIP", cluster_ip), ("clusterIPs", cluster_ips)) if v is not None}
    rules = translate.AddressRules(("10.96.0.0/16",))
    assert _outcome(translate._parse_cluster_ips, SERVICE, spec, rules) == _outcome(
        translate._checked_cluster_ips, SERVICE, spec, rules
    )


def test_cluster_ip_error_messages():
    rules = translate.AddressRules(("10.96.0.0/16",))
    cases = [
        ("x", None, "spec.clusterIP: 'x' is not an IP address"),
        ("10.96.0.10", ["10.96.0.10", "y"], "spec.clusterIPs[1]: 'y' is not an IP address"),
        ("10.97.0.1", None, "spec.clusterIP: 10.97.0.1 is not in service.clusterCIDR 10.96.0.0/16"),
        ("10.97.0.1", ["10.97.0.1"], "spec.clusterIPs[0]: 10.97.0.1 is not in service.clusterCIDR 10.96.0.0/16"),
        ("", ["127.0.0.1"], "spec.clusterIPs[0]: 127.0.0.1 is a loopback address"),
    ]
    for ip, ips, message in cases:
        spec = {"clusterIP": ip, **({"clusterIPs": ips} if ips is not None else {})}
        assert _outcome(translate._parse_cluster_ips, SERVICE, spec, rules) == ("error", f"Service shop/web: {message}")


ODD_VALUES = [None, True, False, "", [], {}, 1.5, -1, 0, 1, 80, 65535, 65536, "http", "TCP", "UDP", "SCTP", "tcp", "ICMP"]


def test_service_port_one_field_off_at_a_time():
    """A well-formed port with one field set to each value in turn (or left out): the
    edges of every check, which random dicts seldom reach all at once."""
    valid = {"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080, "targetPort": 8080}
    for field in valid:
        for value in [*ODD_VALUES, "absent"]:
            port = {k: v for k, v in valid.items() if k != field}
            if value != "absent":
                port[field] = value
            assert _outcome(translate._parse_service_port, SERVICE, port, 0) == _outcome(
                translate._checked_service_port, SERVICE, port, 0
            ), (field, value)


common_spec = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Other"]), odd),
    "clusterIP": texts,
    "clusterIPs": st.lists(texts, max_size=2),
    "ipFamilies": st.lists(st.sampled_from(["IPv4", "IPv6", "IPv5"]), max_size=2),
    "ipFamilyPolicy": st.one_of(st.sampled_from(["SingleStack", "RequireDualStack", "Single"]), odd),
    "ports": st.lists(port, max_size=2),
    "selector": st.just({"app": "web"}),
})


@settings(max_examples=500, deadline=None)
@given(common_spec, st.sampled_from([None, {}, {"a": "b"}]))
def test_service_without_rare_fields_reads_as_with_them_absent(spec, annotations):
    """A spec none of whose later fields (translate._RARE_SPEC_FIELDS) is there takes a short
    way: it must read as the same spec with each of them written as null, which the checking
    way reads as absent (the same value, or the same error)."""
    rules = translate.AddressRules(("10.96.0.0/16",))
    meta = {**SERVICE["metadata"], **({"annotations": annotations} if annotations is not None else {})}
    short = {**SERVICE, "metadata": meta, "spec": spec}
    checking = {**short, "spec": {**spec, **dict.fromkeys(translate._RARE_SPEC_FIELDS)}}
    assert _outcome(translate._parse_service, short, rules) == _outcome(translate._parse_service, checking, rules)


SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-1", "namespace": "shop"},
         "addressType": "IPv4", "endpoints": []}


@settings(max_examples=600, deadline=None)
@given(port, st.integers(0, 2))
def test_slice_port_short_way_is_the_checking_way(value, i):
    obj = {**SLICE, "ports": [{"port": 80}] * i + [value]}
    got = _outcome(lambda: translate._parse_slice(obj).ports[i])
    assert got == _outcome(translate._checked_slice_port, obj, value, i)
    if got[0] == "ok":  # the same types too (a name kept by the model, the protocol's member)
        assert [type(x) for x in got[1]] == [str, translate.Protocol, int]


def test_slice_port_one_field_off_at_a_time():
    """As for a Service's ports: each field of a well-formed slice port set to each edge value."""
    valid = {"name": "http", "protocol": "TCP", "port": 8080}
    for field in valid:
        for value in [*ODD_VALUES, "absent"]:
            port = {k: v for k, v in valid.items() if k != field}
            if value != "absent":
                port[field] = value
            obj = {**SLICE, "ports": [port]}
            got = _outcome(lambda: translate._parse_slice(obj).ports[0])
            assert got == _outcome(translate._checked_slice_port, obj, port, 0), (field, value)


@settings(max_examples=800, deadline=None)
@given(st.one_of(texts, st.just("absent")), st.one_of(st.just("absent"), st.lists(texts, max_size=2), odd))
def test_cluster_ips_short_way_is_the_checking_way(cluster_ip, cluster_ips):
    spec = {k: v for k, v in (("clusterIP", cluster_ip), ("clusterIPs", cluster_ips)) if v != "absent"}
    rules = translate.AddressRules(("10.96.0.0/16",))
    assert _outcome(translate._parse_cluster_ips, SERVICE, spec, rules) == _outcome(
        translate._checked_cluster_ips, SERVICE, spec, rules
    )


def test_cluster_ips_short_way_edges():
    """The usual shapes and each way out of them, one at a time."""
    rules = translate.AddressRules(("10.96.0.0/16",))
    for spec in [{}, {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}, {"clusterIP": "10.96.0.10"},
                 {"clusterIPs": ["10.96.0.10"]}, {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.11"]},
                 {"clusterIP": "10.97.0.1", "clusterIPs": ["10.97.0.1"]}, {"clusterIP": "10.96.0.0", "clusterIPs": ["10.96.0.0"]},
                 {"clusterIP": "None", "clusterIPs": ["None"]}, {"clusterIP": "", "clusterIPs": [""]},
                 {"clusterIP": "x", "clusterIPs": ["x"]}, {"clusterIP": "127.0.0.1", "clusterIPs": ["127.0.0.1"]},
                 {"clusterIP": None, "clusterIPs": None}, {"clusterIP": "10.96.0.10", "clusterIPs": ("10.96.0.10",)}]:
        assert _outcome(translate._parse_cluster_ips, SERVICE, spec, rules) == _outcome(
            translate._checked_cluster_ips, SERVICE, spec, rules
        ), spec


families = st.lists(st.one_of(st.sampled_from(["IPv4", "IPv6", "IPv5"]), odd), max_size=2)
parsed_ips = st.lists(st.sampled_from([translate._ip("10.96.0.10"), translate._ip("fd00::10")]), max_size=2).map(tuple)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.just("absent"), families, odd), parsed_ips)
def test_families_short_way_is_the_checking_way(names, cluster_ips):
    spec = {} if names == "absent" else {"ipFamilies": names}
    assert _outcome(translate._parse_families, SERVICE, spec, cluster_ips) == _outcome(
        translate._checked_families, SERVICE, spec, cluster_ips
    )
    for names in (["IPv4"], ["IPv6"], ["IPv5"], [None], "IPv4", ["IPv4", "IPv6"]):
        spec = {"ipFamilies": names}
        assert _outcome(translate._parse_families, SERVICE, spec, cluster_ips) == _outcome(
            translate._checked_families, SERVICE, spec, cluster_ips
        ), names
