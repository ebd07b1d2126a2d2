"""`kpr explain --via socket` against the socket hooks (topology in socklb_env.py): ClusterIP,
internalTrafficPolicy Local, no backends (refused, as connect() is), source ranges (left to
the per-packet path), and a frontend the tc path would not take."""

from __future__ import annotations

import pytest

from kpr.explain import explain, parse_target
from kpr.model import FrontendType, Protocol

from socklb_env import PODS, Env, answers, be, service
from socklb_env import clean_env, socklb  # noqa: F401 - the fixtures `env` and `socklb`

pytestmark = pytest.mark.kernel

CIP, LB = FrontendType.CLUSTER_IP, FrontendType.LOAD_BALANCER
TCP = Protocol.TCP
NAME = {v4: name for name, (v4, _) in PODS.items()}



def _sock(env: Env, target: str) -> dict:
    return explain(env.pin, parse_target(target), via="socket")


def test_cluster_ip_through_the_socket_hook(env: Env) -> None:
    env.apply(service("one", [(CIP, "10.96.1.10", 80)], [be("be2")], protocols=(TCP,)))
    r = _sock(env, "10.96.1.10:80")
    assert r["hook"].startswith("socket") and r["service"]["type"] == "ClusterIP"
    assert r["verdict"] == "forward" and NAME[r["backend"]["address"]] == "be2"
    assert answers(env.client("tcp", "10.96.1.10", 80, 3)) == ["be2"] * 3
    # tc/XDP do not take a ClusterIP: said so, not guessed.
    r = explain(env.pin, parse_target("10.96.1.10:80"), via="device", device="eth0")
    assert r["verdict"] == "pass"


def test_internal_traffic_policy_local_uses_the_internal_scope(env: Env) -> None:
    backends = [be("be1", local=True), be("be2", local=False), be("be3", local=False)]
    env.apply(service("itp", [(CIP, "10.96.1.11", 80)], backends, protocols=(TCP,), internal_local=True))
    r = _sock(env, "10.96.1.11:80")
    assert r["service"]["scope"] == "internal" and r["service"]["trafficPolicy"] == "Local"
    assert [NAME[b["address"]] for b in r["backends"]] == ["be1"] and NAME[r["backend"]["address"]] == "be1"
    assert answers(env.client("tcp", "10.96.1.11", 80, 4)) == ["be1"] * 4


def test_no_backend_is_refused_as_connect_is(env: Env) -> None:
    env.apply(service("none", [(CIP, "10.96.1.12", 80)], [], protocols=(TCP,)))
    r = _sock(env, "10.96.1.12:80")
    assert (r["verdict"], r["reason"]) == ("refuse", "no_backend")
    assert [row.get("error") for row in env.client("tcp", "10.96.1.12", 80, 1)] == ["ECONNREFUSED"]
    assert env.plugin.kpr_status().counters["no_backend"] >= 1  # the counter of that reason


def test_source_ranges_are_left_to_the_packet_path(env: Env) -> None:
    env.apply(service("lb", [(LB, "10.96.1.13", 80)], [be("be1")], protocols=(TCP,), source_ranges=("10.0.0.0/8",)))
    r = _sock(env, "10.96.1.13:80")
    assert (r["verdict"], r["reason"]) == ("pass", "skip_source_ranges")
    assert r["sourceRanges"]["ranges"] == ["10.0.0.0/8"]


def test_without_via_a_cluster_ip_goes_through_the_socket_hooks(env: Env) -> None:
    env.apply(service("auto", [(CIP, "10.96.1.14", 80)], [be("be3")], protocols=(TCP,)))
    r = explain(env.pin, parse_target("10.96.1.14:80"))
    assert r["hook"].startswith("socket") and NAME[r["backend"]["address"]] == "be3"
