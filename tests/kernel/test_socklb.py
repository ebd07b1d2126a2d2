"""socklb on a real kernel: cgroup socket hooks in a child cgroup, clients in namespaces.

Most tests share one module-wide set-up (socklb_env: a node namespace with three backend
pods and a client pod, a private bpffs, the service map writer and a running plugin whose
host is the node namespace) and give each test services of its own. A service change is
"one bus dispatch": Env.apply() hands the new state to the writer and to the plugin, as the
bus does.

The decision logic also runs packet-free: BPF_PROG_TEST_RUN has no cgroup sock_addr support
(checked below), so a small XDP program feeds struct kpr_sock_req from its input bytes to
the same kpr_sock_xlate() the socket programs call, and table-driven cases check verdicts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.bpf import maps as M
from kpr.bpf.cleanup import attachments, cleanup
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import attach_type_value, compile_and_load, load_prog
from kpr.model import BackendState, FrontendType, Protocol, ServiceKey
from kpr.plugins.socklb.plugin import HOOKS, SockLB
from kpr.servicemaps import ALGORITHM_ANNOTATION, ServiceMapWriter
from kpr.testing.agent import AgentConfig, kpr_cleanup, running_agent
from kpr.testing.bpffs import private_bpffs
from kpr.testing.cgroup import popen_in_cgroup
from kpr.testing.netns import Topology
from kpr.testing.prog_run import Case, run_cases, test_run
from kpr.testing.waiting import wait_for

from socklb_env import (
    CLIENT,
    NODE4,
    NODE6,
    PODS,
    PY,
    Env,
    answers,
    be,
    build_topology,
    service,
    socklb,  # noqa: F401 - the module fixture
    start_socklb,
)

pytestmark = pytest.mark.kernel

CIP, NP, LB, EXT = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP
TCP, UDP = Protocol.TCP, Protocol.UDP
IP = {name: v4 for name, (v4, _) in PODS.items()}


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def env(socklb: Env) -> Iterator[Env]:
    """The module's shared set-up; services a test applied are deleted afterwards."""
    try:
        yield socklb
    finally:
        socklb.clear()


def prog_ids(cgroup: Path, attach_type: str) -> list[int]:
    """Programs attached to the cgroup at one hook, from the kernel (BPF_PROG_QUERY)."""
    lib = M.libbpf()
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 64)()
        cnt = ctypes.c_uint32(64)
        flags = ctypes.c_uint32(0)
        rc = lib.bpf_prog_query(fd, attach_type_value(attach_type), 0, ctypes.byref(flags), ids, ctypes.byref(cnt))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return list(ids)[: cnt.value]
    finally:
        os.close(fd)


def attached_hooks(cgroup: Path) -> dict[str, int]:
    hooks = [a for _, _, a in HOOKS] + ["CGROUP_INET4_POST_BIND", "CGROUP_INET6_POST_BIND"]
    return {a: n for a in hooks if (n := len(prog_ids(cgroup, a)))}


# ---------------------------------------------------------------- traffic through the hooks


def test_tcp_and_udp_to_a_cluster_ip_show_the_service_address(env: Env) -> None:
    env.apply(service("web", [(CIP, "10.96.0.10", 80)], [be("be1"), be("be2")]))
    before = env.plugin.stats()

    tcp = env.client("tcp", "10.96.0.10", 80, 12)
    assert set(answers(tcp)) == {"be1", "be2"}, "random selection should reach both backends in 12 tries"
    assert all(r["peer"] == ["10.96.0.10", 80] for r in tcp), "getpeername must show the ClusterIP"

    udp = env.client("udp", "10.96.0.10", 80, 12)
    assert set(answers(udp)) <= {"be1", "be2"}
    assert all(r["src"] == ["10.96.0.10", 80] for r in udp), "recvfrom's source must be the ClusterIP"

    conn = env.client("udpconn", "10.96.0.10", 80, 4)
    assert set(answers(conn)) <= {"be1", "be2"}
    assert all(r["peer"] == ["10.96.0.10", 80] for r in conn)

    after = env.plugin.stats()
    assert after["connect"] - before["connect"] == 16
    assert after["sendmsg"] - before["sendmsg"] == 12
    assert after["reverse"] - before["reverse"] >= 12 + 12 + 4


def test_without_the_hooks_the_cluster_ip_is_not_reachable(env: Env) -> None:
    # The control for every test here: the same client outside the cgroup gets nowhere.
    env.apply(service("ctl", [(CIP, "10.96.0.11", 80)], [be("be1")]))
    res = env.topo.run("cli", [PY, "-c", CLIENT, "tcp", "10.96.0.11", "80", "1"])
    row = json.loads(res.stdout)
    assert "error" in row, f"reached the ClusterIP without socket LB: {row}"


def test_nodeport_on_a_node_address_and_on_loopback(env: Env) -> None:
    env.apply(service("np", [(NP, NODE4, 30080), (NP, NODE6, 30080)], [be("be2")]))
    assert answers(env.client("tcp", NODE4, 30080, 3)) == ["be2"] * 3, "pod -> node address:NodePort"
    rows = env.client("tcp", "127.0.0.1", 30080, 3, ns="node")
    assert answers(rows) == ["be2"] * 3, "host -> loopback:NodePort via the wildcard entry"
    assert all(r["peer"] == ["127.0.0.1", 30080] for r in rows)
    assert answers(env.client("udp", NODE4, 30080, 2, ns="node")) == ["be2"] * 2
    # A pod's loopback is its own: no NodePort there.
    assert "error" in env.client("tcp", "127.0.0.1", 30080, 1)[0]


def test_node_address_changes_reach_the_nodeport_lookup(env: Env) -> None:
    from kpr.model import NodeInfo

    env.apply(service("np2", [(NP, NODE4, 30081)], [be("be1")], protocols=(TCP,)))
    assert "error" in env.client("tcp", "10.77.0.2", 30081, 1)[0], "not a node address yet"
    try:
        env.plugin.kpr_node_changed(NodeInfo("node1", addresses=(NODE4, NODE6, "10.77.0.2")))
        assert answers(env.client("tcp", "10.77.0.2", 30081, 2)) == ["be1"] * 2
        assert "10.77.0.2" in env.plugin.kpr_status().details["hostAddresses"]
    finally:
        env.plugin.kpr_node_changed(NodeInfo("node1", addresses=(NODE4, NODE6)))
    assert "error" in env.client("tcp", "10.77.0.2", 30081, 1)[0], "the address is gone again"


def test_external_ip_local_only_for_pods_and_load_balancer_ip(env: Env) -> None:
    env.apply(service("ext", [(EXT, NODE4, 8443), (EXT, "203.0.113.7", 80)], [be("be1")], protocols=(TCP,)))
    env.apply(service("lb", [(LB, "198.51.100.5", 80)], [be("be3")], protocols=(TCP,)))
    before = env.plugin.stats()["skip_external_ip"]

    assert answers(env.client("tcp", NODE4, 8443, 2)) == ["be1"] * 2, "a node-local ExternalIP serves pods"
    rows = env.client("tcp", "203.0.113.7", 80, 1)
    assert "error" in rows[0], f"a pod's traffic to a foreign ExternalIP must not be captured: {rows}"
    assert env.plugin.stats()["skip_external_ip"] == before + 1
    assert answers(env.client("tcp", "203.0.113.7", 80, 2, ns="node")) == ["be1"] * 2, "the host is served"

    rows = env.client("tcp", "198.51.100.5", 80, 2)
    assert answers(rows) == ["be3"] * 2
    assert rows[0]["peer"] == ["198.51.100.5", 80]


def test_ipv6_and_v4_mapped_on_dual_stack_sockets(env: Env) -> None:
    env.apply(service("web6", [(CIP, "fd96::10", 80)], [be("be1", v6=True)]))
    env.apply(service("web4", [(CIP, "10.96.0.12", 80)], [be("be2")]))

    rows = env.client("tcp", "fd96::10", 80, 2)
    assert answers(rows) == ["be1", "be1"]
    assert rows[0]["peer"] == ["fd96::10", 80]
    rows = env.client("udp", "fd96::10", 80, 2)
    assert answers(rows) == ["be1", "be1"] and rows[0]["src"] == ["fd96::10", 80]

    # An AF_INET6 socket dialling the IPv4 ClusterIP as ::ffff:10.96.0.12.
    rows = env.client("tcp", "::ffff:10.96.0.12", 80, 2, "-6")
    assert answers(rows) == ["be2", "be2"]
    assert rows[0]["peer"] == ["::ffff:10.96.0.12", 80]
    rows = env.client("udp", "::ffff:10.96.0.12", 80, 2, "-6")
    assert answers(rows) == ["be2", "be2"] and rows[0]["src"] == ["::ffff:10.96.0.12", 80]
    rows = env.client("tcp", NODE6, 30099, 1)
    assert "error" in rows[0]  # no such NodePort: v6 node address misses cleanly


def test_session_affinity_sticks_then_expires(env: Env) -> None:
    backends = [be("be1"), be("be2"), be("be3")]
    env.apply(service("aff", [(CIP, "10.96.0.13", 80)], backends, protocols=(TCP,), affinity_timeout=1))
    first = answers(env.client("tcp", "10.96.0.13", 80, 10))
    assert len(set(first)) == 1, f"affinity must stick within the timeout: {first}"
    # After each expiry the pick is random again: 8 expiries landing on one backend by
    # chance is 1 in 2187.
    later = answers(env.client("tcp", "10.96.0.13", 80, 8, "gap=1.3", timeout=60))
    assert len(set(later)) > 1, f"affinity never expired: {later}"


def test_internal_traffic_policy_local_picks_node_local_backends(env: Env) -> None:
    backends = [be("be1", local=True), be("be2", local=False), be("be3", local=False)]
    env.apply(service("itp", [(CIP, "10.96.0.14", 80)], backends, internal_local=True))
    assert answers(env.client("tcp", "10.96.0.14", 80, 12)) == ["be1"] * 12
    env.apply(service("itp-off", [(CIP, "10.96.0.15", 80)], backends))
    assert len(set(answers(env.client("tcp", "10.96.0.15", 80, 12)))) > 1


def test_terminating_backends_are_never_picked(env: Env) -> None:
    backends = [be("be1"), be("be2", state=BackendState.TERMINATING), be("be3", state=BackendState.TERMINATING)]
    env.apply(service("term", [(CIP, "10.96.0.16", 80)], backends))
    assert answers(env.client("tcp", "10.96.0.16", 80, 15)) == ["be1"] * 15


def test_maglev_services_spread_over_active_backends(env: Env) -> None:
    backends = [be("be1"), be("be2"), be("be3", state=BackendState.TERMINATING)]
    svc = service("mag", [(CIP, "10.96.0.17", 80)], backends, protocols=(TCP,), annotations=((ALGORITHM_ANNOTATION, "maglev"),))
    env.apply(svc)
    read = env.writer.read_back()["frontends"]
    assert "maglev" in read["10.96.0.17:80/TCP external"]["flags"]
    got = answers(env.client("tcp", "10.96.0.17", 80, 16))
    assert set(got) == {"be1", "be2"}


def test_a_service_without_backends_refuses_at_once(env: Env) -> None:
    env.apply(service("empty", [(CIP, "10.96.0.18", 80)], []))
    rows = env.client("tcp", "10.96.0.18", 80, 2)
    assert [r.get("error") for r in rows] == ["ECONNREFUSED"] * 2
    # Refused by the hook, not after a lost SYN: TCP's first retransmission waits 1 s, so a
    # refusal that came from the network (or none, then a timeout) takes at least that long.
    # (No tighter bound: a loaded CI machine deschedules the client for hundreds of ms.)
    assert all(r["ms"] < 1000 for r in rows), f"the refusal must not wait for a retransmission: {rows}"
    rows = env.client("udp", "10.96.0.18", 80, 1)
    assert rows[0].get("error") == "ECONNREFUSED"
    rows = env.client("tcp", "::ffff:10.96.0.18", 80, 1, "-6")
    assert rows[0].get("error") == "ECONNREFUSED"


def test_backend_changes_reach_the_next_connection(env: Env) -> None:
    env.apply(service("chg", [(CIP, "10.96.0.19", 80)], [be("be1")]))
    assert answers(env.client("tcp", "10.96.0.19", 80, 3)) == ["be1"] * 3
    env.apply(service("chg", [(CIP, "10.96.0.19", 80)], [be("be2")]))
    assert answers(env.client("tcp", "10.96.0.19", 80, 3)) == ["be2"] * 3
    env.apply(service("chg", [(CIP, "10.96.0.19", 80)], [be("be2"), be("be3")]))
    assert set(answers(env.client("tcp", "10.96.0.19", 80, 12))) == {"be2", "be3"}
    env.apply(service("chg", [(CIP, "10.96.0.19", 80)], []))
    assert env.client("tcp", "10.96.0.19", 80, 1)[0].get("error") == "ECONNREFUSED"


class Held:
    """A client holding one connection, driven over stdin: `peer` prints getpeername, `wait`
    blocks until the socket is closed or destroyed (or 20 s)."""

    def __init__(self, env: Env, cgroup: Path, host: str, port: int, proto: str) -> None:
        self.proc = popen_in_cgroup(
            cgroup, [PY, "-c", CLIENT, "hold", host, str(port), proto], env.topo["cli"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.first = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"client exited: rc={self.proc.poll()}"
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


def test_stale_reverse_nat_is_dropped_when_the_backend_leaves(env: Env) -> None:
    env.apply(service("stale", [(CIP, "10.96.0.20", 80)], [be("be1")], protocols=(TCP,)))
    held = Held(env, env.cgroup, "10.96.0.20", 80, "tcp")
    try:
        assert held.first == {"peer": ["10.96.0.20", 80], "answer": "be1"}
        env.apply(service("stale", [(CIP, "10.96.0.20", 80)], [be("be2")], protocols=(TCP,)))
        # Without terminateConnections the connection lives on, to its real peer.
        assert held.ask("peer") == {"peer": [IP["be1"], 8080]}
    finally:
        held.close()


def test_sync_complete_drops_entries_of_backends_that_left_while_down(env: Env, cgroup: Path) -> None:
    svc = lambda backend: service("sync", [(CIP, "10.96.0.23", 80)], [be(backend)], protocols=(TCP,))  # noqa: E731
    env.apply(svc("be1"))
    held = Held(env, env.cgroup, "10.96.0.23", 80, "tcp")
    try:
        assert held.first == {"peer": ["10.96.0.23", 80], "answer": "be1"}
        # A restarted agent: a fresh plugin sees be1 gone without ever having seen it.
        cg = cgroup
        plugin = env.start_plugin(cg, bindProtection=False)
        try:
            with only(env, plugin):
                env.apply(svc("be2"))
                assert held.ask("peer") == {"peer": ["10.96.0.23", 80]}, "one delivery alone drops nothing"
                plugin.kpr_sync_complete()
            assert held.ask("peer") == {"peer": [IP["be1"], 8080]}
            assert plugin.kpr_status().counters["revnat_dropped"] >= 1
        finally:
            env.stop_plugin(plugin)
    finally:
        held.close()


@contextlib.contextmanager
def only(env: Env, plugin: SockLB) -> Iterator[None]:
    """Deliver service events to one plugin instance only (they share the reverse-NAT map)."""
    with env.only(plugin):
        yield


def test_terminate_connections_destroys_sockets_of_removed_backends(env: Env, cgroup: Path) -> None:
    cg = cgroup
    plugin = env.start_plugin(cg, terminateConnections=True, bindProtection=False)
    try:
        with only(env, plugin):
            env.apply(service("kill", [(CIP, "10.96.0.21", 80)], [be("be1")]))
            tcp = Held(env, cg, "10.96.0.21", 80, "tcp")
            udp = Held(env, cg, "10.96.0.21", 80, "udp")
            other = Held(env, cg, "10.96.0.21", 80, "tcp")
            try:
                assert tcp.first["answer"] == udp.first["answer"] == "be1"
                env.apply(service("kill", [(CIP, "10.96.0.21", 80)], [be("be2")]))
                t = tcp.ask("wait")
                u = udp.ask("wait")
                assert t["event"] == "error" and t["error"] == "ECONNABORTED", t
                assert u["event"] == "error" and u["error"] == "ECONNABORTED", u
                assert t["after"] < 2 and u["after"] < 2
                assert plugin.kpr_status().counters["sockets_destroyed"] >= 3
                # a fresh connection lands on the backend that is left
                assert answers(env.client("tcp", "10.96.0.21", 80, 3, cgroup=cg)) == ["be2"] * 3
            finally:
                for h in (tcp, udp, other):
                    h.close()
        status = plugin.kpr_status()
        assert status.details["terminateConnections"] == {"enabled": True, "supported": True, "reason": ""}
    finally:
        env.stop_plugin(plugin)


# ---------------------------------------------------------------- bind protection, host-only


def test_bind_protection_refuses_nodeport_and_frontends_on_the_host(env: Env) -> None:
    env.apply(service("bind", [(NP, NODE4, 30090), (NP, NODE6, 30090)], [be("be1")], protocols=(TCP,)))
    env.apply(service("bindext", [(EXT, NODE4, 8444)], [be("be1")], protocols=(UDP,)))
    host = lambda *a: env.client("bind", *a, ns="node")[0]  # noqa: E731
    for addr in ("0.0.0.0", NODE4, "127.0.0.1", "::", NODE6):
        assert host(addr, 30090, "tcp").get("error") == "EADDRINUSE", addr
    assert host(NODE4, 8444, "udp").get("error") == "EADDRINUSE"
    assert host("0.0.0.0", 30091, "tcp").get("ok"), "a port no NodePort uses is free"
    assert host("0.0.0.0", 30090, "udp").get("ok"), "the NodePort is TCP only"
    assert env.client("bind", "0.0.0.0", 30090, "tcp")[0].get("ok"), "pods bind what they like"
    assert env.plugin.stats()["bind_refused"] >= 6


def test_host_namespace_only_and_bind_protection_off(env: Env, cgroup: Path) -> None:
    env.apply(service("hostonly", [(CIP, "10.96.0.22", 80), (NP, NODE4, 30092)], [be("be3")], protocols=(TCP,)))
    cg = cgroup
    plugin = env.start_plugin(cg, hostNamespaceOnly=True, bindProtection=False)
    try:
        assert "CGROUP_INET4_POST_BIND" not in attached_hooks(cg)
        before = plugin.stats()["skip_not_host"]
        rows = env.client("tcp", "10.96.0.22", 80, 1, cgroup=cg)
        assert "error" in rows[0], f"a pod's socket must be left to the per-packet path: {rows}"
        assert plugin.stats()["skip_not_host"] > before
        assert answers(env.client("tcp", "10.96.0.22", 80, 2, ns="node", cgroup=cg)) == ["be3"] * 2
        assert env.client("bind", "0.0.0.0", 30092, "tcp", ns="node", cgroup=cg)[0].get("ok")
    finally:
        env.stop_plugin(plugin)
    # and the default plugin refuses the same bind
    assert env.client("bind", "0.0.0.0", 30092, "tcp", ns="node")[0].get("error") == "EADDRINUSE"


# ---------------------------------------------------------------- attachments


ALL_HOOKS = [h for _, _, h in HOOKS] + ["CGROUP_INET4_POST_BIND", "CGROUP_INET6_POST_BIND"]


def hook_progs(cgroup: Path) -> dict[str, list[int]]:
    """Program ids at each of socklb's hooks on the cgroup."""
    return {a: prog_ids(cgroup, a) for a in ALL_HOOKS if prog_ids(cgroup, a)}


def bpftool_cgroup(cgroup: Path) -> list[dict]:
    """`bpftool cgroup show` of the cgroup (the programs attached there, links included)."""
    res = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout or "[]")


def link_ids(plugin: SockLB) -> dict[str, int]:
    from kpr.bpf import links

    return {a.attach_type: links.link_info(a.link_fd).id for a in plugin._attached}


def map_ids(plugin: SockLB) -> dict[str, int]:
    return {name: m.id for name, m in plugin._maps.items()}


def prog_tags(ids: list[int]) -> set[bytes | None]:
    from kpr.bpf.links import prog_tag

    return {prog_tag(pid) for pid in ids}


def test_stop_leaves_the_hooks_and_new_instances_adopt_them(env: Env, cgroup: Path) -> None:
    """Stop, a killed agent (no stop) and an upgrade (changed program text): one program per
    hook throughout, the same links and maps, the ClusterIP served all along."""
    env.apply(service("adopt", [(CIP, "10.96.0.40", 80)], [be("be1")], protocols=(TCP,)))
    cg = cgroup
    serve = lambda: answers(env.client("tcp", "10.96.0.40", 80, 2, cgroup=cg)) == ["be1"] * 2  # noqa: E731
    p1 = env.start_plugin(cg)
    progs = hook_progs(cg)
    assert {a: len(ids) for a, ids in progs.items()} == {a: 1 for a in ALL_HOOKS}
    status = p1.kpr_status()
    assert status.healthy and status.counters["hooks_attached"] == 10
    assert {v["action"] for v in status.details["links"].values()} == {"created"}
    assert status.details["build"] == "compiled"
    assert not status.details["linksFallback"]
    recorded = [r for r in attachments(env.pin) if r["target"]["cgroup"] == str(cg)]
    assert len(recorded) == 10
    links1, maps1 = link_ids(p1), map_ids(p1)
    assert len(set(links1.values())) == 10
    assert len(bpftool_cgroup(cg)) == 10
    assert serve()

    env.stop_plugin(p1)  # SIGTERM
    assert hook_progs(cg) == progs, "stop leaves the programs attached"
    assert serve(), "served while no agent runs"

    p2 = env.start_plugin(cg)  # the next agent, the same build: the links' programs kept, no compile
    assert hook_progs(cg) == progs
    assert p2.kpr_status().details["build"] == "adopted"
    assert {v["action"] for v in p2.kpr_status().details["links"].values()} == {"adopted"}
    assert link_ids(p2) == links1 and map_ids(p2) == maps1
    assert serve()

    env.abandon(p2)  # SIGKILL: no stop
    p3 = env.start_plugin(cg)
    now = hook_progs(cg)
    assert {a: len(ids) for a, ids in now.items()} == {a: 1 for a in ALL_HOOKS}, "never a second copy"
    assert link_ids(p3) == links1 and map_ids(p3) == maps1
    assert len(bpftool_cgroup(cg)) == 10
    assert serve()

    before = prog_tags([i for ids in now.values() for i in ids])
    env.abandon(p3)  # an upgrade: changed program text
    # (refusals without bpf_set_retval: a different program, the same maps)
    p4 = env.start_plugin(cg, extra_cflags=["-UKPR_SOCK_HAVE_SET_RETVAL", "-DKPR_SOCK_HAVE_SET_RETVAL=0"])
    upgraded = hook_progs(cg)
    assert {a: len(ids) for a, ids in upgraded.items()} == {a: 1 for a in ALL_HOOKS}
    assert link_ids(p4) == links1 and map_ids(p4) == maps1
    assert {v["action"] for v in p4.kpr_status().details["links"].values()} == {"updated"}
    assert p4.kpr_status().details["build"] == "compiled"
    assert serve()
    assert prog_tags(upgraded["CGROUP_INET4_CONNECT"]) - before, "the upgrade runs the changed program"

    # bindProtection off: the post_bind links go, the rest stay
    env.abandon(p4)
    p5 = env.start_plugin(cg, bindProtection=False)
    assert set(hook_progs(cg)) == {h for _, _, h in HOOKS}
    mine = env.pin / "links" / "socklb" / f"cgroup-{os.stat(cg).st_ino}"
    assert sorted(p.name for p in mine.iterdir()) == sorted(h.lower() for _, _, h in HOOKS)

    # keepAttachedOnStop: false detaches, as before links
    p5.cfg = p5.cfg.model_copy(update={"keep_attached_on_stop": False})
    env.stop_plugin(p5)
    assert hook_progs(cg) == {}, "keepAttachedOnStop false detaches"
    assert not [r for r in attachments(env.pin) if r["target"]["cgroup"] == str(cg)], "records forgotten"
    assert (env.pin / "kpr_sock_revnat").exists(), "pinned maps outlive the agent"


def test_without_links_the_fallback_keeps_one_copy(env: Env, cgroup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KPR_BPF_LINKS=off: the old attach (BPF_F_ALLOW_MULTI), still one copy per hook across a
    stop and a kill, and the ClusterIP served while no agent runs."""
    monkeypatch.setenv("KPR_BPF_LINKS", "cgroup")
    env.apply(service("fallback", [(CIP, "10.96.0.41", 80)], [be("be2")], protocols=(TCP,)))
    cg = cgroup
    serve = lambda: answers(env.client("tcp", "10.96.0.41", 80, 2, cgroup=cg)) == ["be2"] * 2  # noqa: E731
    p1 = env.start_plugin(cg)
    st = p1.kpr_status()
    assert st.details["linksFallback"] and "without BPF links" in st.message
    assert {v["action"] for v in st.details["links"].values()} == {"attached"}
    assert not (env.pin / "links" / "socklb" / f"cgroup-{os.stat(cg).st_ino}").exists()
    first = hook_progs(cg)
    assert {a: len(ids) for a, ids in first.items()} == {a: 1 for a in ALL_HOOKS}
    env.stop_plugin(p1)
    assert hook_progs(cg) == first and serve()
    p2 = env.start_plugin(cg)
    env.abandon(p2)
    p3 = env.start_plugin(cg)
    now = hook_progs(cg)
    assert {a: len(ids) for a, ids in now.items()} == {a: 1 for a in ALL_HOOKS}, "never a second copy"
    assert all(now[a] != first[a] for a in ALL_HOOKS), "the new programs replaced the old"
    assert serve()
    # the fallback's programs move to links as soon as links are allowed again
    monkeypatch.delenv("KPR_BPF_LINKS")
    env.abandon(p3)
    p4 = env.start_plugin(cg)
    assert {v["action"] for v in p4.kpr_status().details["links"].values()} == {"created"}
    assert {a: len(ids) for a, ids in hook_progs(cg).items()} == {a: 1 for a in ALL_HOOKS}
    assert serve()
    p4.cfg = p4.cfg.model_copy(update={"keep_attached_on_stop": False})
    env.stop_plugin(p4)
    assert hook_progs(cg) == {}


def test_kpr_cleanup_detaches_what_a_killed_agent_left(
    kernel_headers: Path, tmp_path: Path, bpffs: Path, topology: Topology, cgroup: Path
) -> None:
    # A plugin that never stopped (the agent was killed), plus an orphan of an older run
    # (a second copy attached the old way) and another owner's program at the same hook:
    # `kpr cleanup` removes kpr's, leaves the other owner's, and exits 0.
    from bcc import BPF

    mnt, topo, cg = bpffs, topology, cgroup
    topo.add_node("node")
    pin = mnt / "kpr"
    extra = compile_and_load("int sklb4_connect(struct bpf_sock_addr *c) { return 1; }\n"
                             "int foreign(struct bpf_sock_addr *c) { return 1; }\n")
    plugin = None
    try:
        with ServiceMapWriter(pin):
            plugin = start_socklb(topo, pin, cg)
        at = attach_type_value("CGROUP_INET4_CONNECT")
        cg_fd = os.open(cg, os.O_RDONLY)
        try:
            for name in ("sklb4_connect", "foreign"):
                fn = load_prog(extra, name, "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
                BPF.attach_func(fn, cg_fd, at, 1 << 1)
        finally:
            os.close(cg_fd)
        assert len(prog_ids(cg, "CGROUP_INET4_CONNECT")) == 3
        assert sum(len(v) for v in hook_progs(cg).values()) == 12
        res = kpr_cleanup(pin, tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("detached cgroup link") == 10, res.stdout
        assert res.stdout.count("detached cgroup") == 11, res.stdout
        left = hook_progs(cg)
        assert list(left) == ["CGROUP_INET4_CONNECT"] and len(left["CGROUP_INET4_CONNECT"]) == 1
        fd = M.check_rc(M.libbpf().bpf_prog_get_fd_by_id(left["CGROUP_INET4_CONNECT"][0]), "prog")
        try:
            assert M.prog_info(fd).name == b"foreign", "another owner's program stays"
        finally:
            os.close(fd)
        assert not pin.exists()
    finally:
        if plugin is not None:
            with contextlib.suppress(OSError):
                plugin._teardown()
        extra.cleanup()


def test_cleanup_fails_when_a_program_stays_attached(
    kernel_headers: Path, monkeypatch: pytest.MonkeyPatch, bpffs: Path, topology: Topology, cgroup: Path
) -> None:
    from kpr.bpf import cleanup as C
    from kpr.bpf import links

    mnt, topo, cg = bpffs, topology, cgroup
    topo.add_node("node")
    pin = mnt / "kpr"
    with ServiceMapWriter(pin):
        plugin = start_socklb(topo, pin, cg)
    plugin._teardown(detach=False)
    # links that refuse to go, as a detach the kernel refused would
    monkeypatch.setattr(links, "sweep", lambda d, keep: [])
    monkeypatch.setattr(links, "detach_link_id", lambda i: False)
    with pytest.raises(C.CleanupError) as err:
        C.cleanup(pin)
    assert "still attached" in str(err.value) and "sklb4_connect" in str(err.value)
    assert pin.exists(), "the registry stays for a second run"
    monkeypatch.undo()
    C.cleanup(pin)
    assert hook_progs(cg) == {} and not pin.exists()


def test_agent_end_to_end_with_the_files_source(
    kernel_headers: Path, tmp_path: Path, bpffs: Path, topology: Topology, cgroup: Path
) -> None:
    """A real in-process agent (files source, bus, writer facility, socklb) serving a pod."""
    from kpr.testing import manifests as k8s

    build_topology(topology)
    cfg = AgentConfig(tmp_path, bpffs / "kpr", addresses=(NODE4, NODE6), devices=("lo",),
                      extra={"service": {"clusterCIDR": ["10.96.0.0/16"]}})

    def publish(ip: str) -> None:
        cfg.manifest("web", k8s.yaml_docs(k8s.service("web", cluster_ip="10.96.7.10", port_name="http"),
                                          k8s.endpoint_slice("web", [ip], port_name="http")))

    publish(IP["be1"])
    env = Env(topology, cfg.pin, None, cgroup)  # type: ignore[arg-type]
    # Disabled: nothing is attached.
    with running_agent(cfg.plugin("socklb", enabled=False, cgroupPath=str(cgroup)), netns=topology["node"]):
        assert attached_hooks(cgroup) == {}

    with running_agent(cfg.plugin("socklb", enabled=True), netns=topology["node"]) as agent:  # the node is its host
        assert len(attached_hooks(cgroup)) == 10
        assert answers(env.client("tcp", "10.96.7.10", 80, 3)) == ["be1"] * 3
        publish(IP["be2"])
        wait_for(lambda: answers(env.client("tcp", "10.96.7.10", 80, 1)) == ["be2"], 10,
                 "the endpoint change to reach the socket hooks")
        status = agent.plugin_statuses()["socklb"]
        assert status["healthy"], status
    assert len(attached_hooks(cgroup)) == 10, "shutdown leaves the hooks (keepAttachedOnStop)"
    cleanup(cfg.pin)
    assert attached_hooks(cgroup) == {}, "`kpr cleanup` removes them"


# ---------------------------------------------------------------- decision logic, packet-free

DECIDE = r"""
#include "lib/sock.h"

// Input: struct kpr_sock_req; output: struct kpr_sock_res written after it; verdict returned.
int sock_decide(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct kpr_sock_req req;
	struct kpr_sock_res res = {};
	int verdict;

	if (data + sizeof(req) + sizeof(res) > end)
		return 100;
	__builtin_memcpy(&req, data, sizeof(req));
	verdict = kpr_sock_xlate(&req, &res);
	__builtin_memcpy(data + sizeof(req), &res, sizeof(res));
	return verdict;
}
"""

PASS, XLATE, REJECT = 0, 1, 2
HOST, POD = 1000, 2000  # netns cookies: the host's is compiled in
REQ = "=16sHBBIQQ"  # struct kpr_sock_req


def req(addr: str, port: int, proto: int = socket.IPPROTO_TCP, netns: int = POD, cookie: int = 7) -> bytes:
    raw = M.addr_to_bytes(addr)
    fam = 4 if raw[:12] == b"\x00" * 10 + b"\xff\xff" else 6
    import struct

    return struct.pack(REQ, raw, socket.htons(port), proto, fam, 0, netns, cookie) + bytes(32)


def to(*backends: str) -> Any:
    """Output check: the result names one of these backends (address:port)."""
    import struct

    def check(pkt: Any) -> None:
        raw = bytes(pkt)[40:72]
        addr, port = raw[:16], struct.unpack_from("=H", raw, 16)[0]
        got = f"{M.bytes_to_addr(addr)}:{socket.ntohs(port)}"
        assert got in backends, f"backend {got}, expected one of {backends}"

    return check


def decide_cases() -> list[Case]:
    b1, b2, b3 = (f"{IP[n]}:8080" for n in ("be1", "be2", "be3"))
    c = lambda d, r, v, out=None: Case(d, r, v, output=out, check_checksums=False)  # noqa: E731
    cases = [
        c("ClusterIP -> an active backend", req("10.96.0.10", 80), XLATE, to(b1, b2)),
        c("not a service", req("10.96.0.99", 80), PASS),
        c("ClusterIP, other port", req("10.96.0.10", 81), PASS),
        c("ClusterIP, UDP not served", req("10.96.0.10", 80, socket.IPPROTO_UDP), PASS),
        c("no backends: reject", req("10.96.0.11", 80), REJECT),
        c("NodePort at a node address, pod", req(NODE4, 30080), XLATE, to(b1)),
        c("NodePort at loopback, host", req("127.0.0.1", 30080, netns=HOST), XLATE, to(b1)),
        c("NodePort at loopback, pod: its own loopback", req("127.0.0.1", 30080), PASS),
        c("NodePort port at a foreign address", req("10.0.0.9", 30080), PASS),
        c("foreign ExternalIP, pod (CVE-2020-8554)", req("203.0.113.7", 80), PASS),
        c("foreign ExternalIP, host", req("203.0.113.7", 80, netns=HOST), XLATE, to(b2)),
        c("node-local ExternalIP, pod", req(NODE4, 8443), XLATE, to(b2)),
        c("LoadBalancer IP", req("198.51.100.5", 80), XLATE, to(b3)),
        c("LoadBalancer with source ranges: packet path", req("198.51.100.6", 80), PASS),
        c("IPv6 ClusterIP", req("fd96::10", 80), XLATE, to("fd44::11:8080")),
        c("v6 frontend, v4 backend: left alone", req("fd96::20", 80), PASS),
    ]
    cases += [c(f"iTP=Local, try {i}", req("10.96.0.12", 80, cookie=i), XLATE, to(b1)) for i in range(20)]
    cases += [c(f"terminating never picked, try {i}", req("10.96.0.10", 80, cookie=i), XLATE, to(b1, b2)) for i in range(30)]
    return cases


@pytest.fixture(scope="module")
def decide_maps(kernel_headers: Path) -> Iterator[tuple[Path, ServiceMapWriter]]:
    with private_bpffs("kpr-socklb-decide") as mnt:
        pin = mnt / "kpr"
        with ServiceMapWriter(pin) as w:
            b1, b2, b3 = be("be1"), be("be2", local=False), be("be3")
            b3t = be("be3", state=BackendState.TERMINATING)
            w.upsert(service("web", [(CIP, "10.96.0.10", 80)], [b1, b2, b3t], protocols=(TCP,)))
            w.upsert(service("empty", [(CIP, "10.96.0.11", 80)], []))
            w.upsert(service("itp", [(CIP, "10.96.0.12", 80)], [b1, b2], internal_local=True))
            w.upsert(service("np", [(NP, NODE4, 30080)], [b1], protocols=(TCP,)))
            w.upsert(service("ext", [(EXT, "203.0.113.7", 80), (EXT, NODE4, 8443)], [b2], protocols=(TCP,)))
            w.upsert(service("lb", [(LB, "198.51.100.5", 80)], [b3], protocols=(TCP,)))
            w.upsert(service("lbsr", [(LB, "198.51.100.6", 80)], [b3], protocols=(TCP,), source_ranges=("192.0.2.0/24",)))
            w.upsert(service("v6", [(CIP, "fd96::10", 80)], [be("be1", v6=True)], protocols=(TCP,)))
            w.upsert(service("mixed", [(CIP, "fd96::20", 80)], [b1], protocols=(TCP,)))
            yield pin, w


def load_decider(pin: Path, host_only: bool = False) -> tuple[Any, int]:
    flags = M.cflags(pin) + [f"-DKPR_SOCK_HOST_NETNS={HOST}ULL", f"-DKPR_SOCK_HOST_ONLY={int(host_only)}"]
    bpf = compile_and_load(inline_includes(DECIDE), cflags=flags, name="sock_decide.c")
    fn = load_prog(bpf, "sock_decide", "XDP")
    with M.BpfMap.open_pinned(pin / "kpr_sock_hostaddr") as hostaddr:
        hostaddr.update(M.addr_to_bytes(NODE4), M.U32.pack(1))
    return bpf, fn.fd


def test_cgroup_sock_addr_programs_have_no_test_run(kernel_headers: Path) -> None:
    # Why the decision test below goes through an XDP wrapper.
    bpf = compile_and_load("int c(struct bpf_sock_addr *ctx) { return 1; }", name="c.c")
    try:
        fn = load_prog(bpf, "c", "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
        try:
            test_run(fn.fd, bytes(64))
        except OSError as exc:
            assert exc.errno in (524, errno.EOPNOTSUPP, errno.EINVAL), exc
        else:
            pytest.skip("this kernel runs cgroup sock_addr programs under BPF_PROG_TEST_RUN: the wrapper is optional")
    finally:
        bpf.cleanup()


def test_decision_logic_table(decide_maps: tuple[Path, ServiceMapWriter]) -> None:
    pin, _ = decide_maps
    bpf, fd = load_decider(pin)
    try:
        before = sum(bpf[b"kpr_sock_stats"][bpf[b"kpr_sock_stats"].Key(6)])
        run_cases(fd, decide_cases())
        after = sum(bpf[b"kpr_sock_stats"][bpf[b"kpr_sock_stats"].Key(6)])
        assert after - before == 1, "one foreign ExternalIP refusal counted"
    finally:
        bpf.cleanup()


def test_decision_logic_host_namespace_only(decide_maps: tuple[Path, ServiceMapWriter]) -> None:
    pin, _ = decide_maps
    bpf, fd = load_decider(pin, host_only=True)
    try:
        b1, b2 = f"{IP['be1']}:8080", f"{IP['be2']}:8080"
        run_cases(
            fd,
            [
                Case("pod socket: untouched", req("10.96.0.10", 80), PASS, check_checksums=False),
                Case("pod socket, no backends: untouched too", req("10.96.0.11", 80), PASS, check_checksums=False),
                Case("host socket", req("10.96.0.10", 80, netns=HOST), XLATE, output=to(b1, b2), check_checksums=False),
            ],
        )
    finally:
        bpf.cleanup()


def test_decision_logic_affinity_is_per_netns(decide_maps: tuple[Path, ServiceMapWriter]) -> None:
    pin, w = decide_maps
    w.upsert(service("aff", [(CIP, "10.96.0.30", 80)], [be("be1"), be("be2"), be("be3")], protocols=(TCP,), affinity_timeout=60))
    bpf, fd = load_decider(pin)
    try:
        def pick(netns: int, cookie: int) -> bytes:
            res = test_run(fd, req("10.96.0.30", 80, netns=netns, cookie=cookie))
            assert res.retval == XLATE
            return res.data_out[40:56]

        picks = {netns: {pick(netns, c) for c in range(10)} for netns in range(3000, 3012)}
        assert all(len(p) == 1 for p in picks.values()), "one netns sticks to one backend"
        assert len({next(iter(p)) for p in picks.values()}) > 1, "12 namespaces should not all share a backend"
    finally:
        bpf.cleanup()
        w.delete(ServiceKey("default", "aff"))


# ---------------------------------------------------------------- restarts under traffic


def test_agent_restarts_under_traffic_lose_no_connection(kernel_headers: Path) -> None:
    """`kpr run` as a real process; a pod opens a connection to a ClusterIP every 10 ms and
    holds one more. SIGTERM + start and SIGKILL + start: no failed connection, the long-lived
    one unbroken, one program per hook, the same pinned maps."""
    import signal

    from socklb_env import RESTART_IP, assert_no_loss, restart_rig, restarts_under_load

    with restart_rig("kpr-socklb-rs") as rig:
        rig.start()
        with M.BpfMap.open_pinned(rig.pin / "kpr_svc") as m:
            map_id = m.id

        def stays() -> None:
            assert len(attached_hooks(rig.load_cgroup)) == 10, "the hooks stay while no agent runs"

        def one_each() -> None:
            assert {a: len(prog_ids(rig.load_cgroup, a)) for a in ALL_HOOKS} == {a: 1 for a in ALL_HOOKS}

        res, windows = restarts_under_load(rig, RESTART_IP, 80, after_stop=stays, after_start=one_each)
        with M.BpfMap.open_pinned(rig.pin / "kpr_svc") as m:
            assert m.id == map_id, "the same maps"
        assert_no_loss(res, windows)
        rig.stop(signal.SIGTERM)
