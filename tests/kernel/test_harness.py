"""Self-tests of kpr.testing: BPF_PROG_TEST_RUN cases, namespace topologies, child cgroups."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.testing import prog_run
from kpr.testing.cgroup import child_cgroup, popen_in_cgroup, run_in_cgroup
from kpr.testing.netns import Topology, netns_exists
from kpr.testing.prog_run import (
    TC_ACT_OK,
    TC_ACT_SHOT,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    Case,
    checksum_problems,
    run_cases,
    test_run,
)
from kpr.testing.waiting import wait_for
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

pytestmark = pytest.mark.kernel

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"

# Reflects IP frames back out of the interface (MACs swapped), drops an experimental
# EtherType, passes the rest.
XDP_REFLECT = textwrap.dedent(
    """
    #include <linux/if_ether.h>

    int xdp_reflect(struct xdp_md *ctx) {
        void *data = (void *)(long)ctx->data;
        void *end = (void *)(long)ctx->data_end;
        struct ethhdr *eth = data;
        unsigned char tmp[ETH_ALEN];

        if ((void *)(eth + 1) > end)
            return XDP_ABORTED;
        if (eth->h_proto == htons(0x88b5))
            return XDP_DROP;
        if (eth->h_proto != htons(ETH_P_IP) && eth->h_proto != htons(ETH_P_IPV6))
            return XDP_PASS;
        __builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
        __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
        __builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
        return XDP_TX;
    }
    """
)

# DNAT 10.96.0.1 -> 10.244.1.5 for UDP with checksum fix-ups (unless BROKEN_CSUM), drop
# UDP to 10.96.0.2, leave the rest alone. Also returns skb->mark for the ctx test.
TC_DNAT = textwrap.dedent(
    """
    #include <linux/if_ether.h>
    #include <linux/in.h>
    #include <linux/ip.h>
    #include <linux/udp.h>
    #include <linux/pkt_cls.h>

    #define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
    #define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
    #define UDP_CSUM_OFF (ETH_HLEN + sizeof(struct iphdr) + offsetof(struct udphdr, check))

    int tc_dnat(struct __sk_buff *skb) {
        void *data = (void *)(long)skb->data;
        void *end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        struct iphdr *ip = data + sizeof(*eth);
        __be32 old_addr, new_addr = htonl(0x0af40105);

        if ((void *)(ip + 1) > end || eth->h_proto != htons(ETH_P_IP))
            return TC_ACT_OK;
        if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
            return TC_ACT_OK;
        if (ip->daddr == htonl(0x0a600002))
            return TC_ACT_SHOT;
        if (ip->daddr != htonl(0x0a600001))
            return TC_ACT_OK;
        old_addr = ip->daddr;
    #ifndef BROKEN_CSUM
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_addr, new_addr, BPF_F_PSEUDO_HDR | sizeof(new_addr));
        bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr));
    #endif
        bpf_skb_store_bytes(skb, IP_DST_OFF, &new_addr, sizeof(new_addr), 0);
        return TC_ACT_OK;
    }

    int tc_mark(struct __sk_buff *skb) {
        return skb->mark;
    }
    """
)


@pytest.fixture(scope="module")
def xdp_reflect(kernel_headers: Path) -> Iterator[int]:
    with compile_and_load(XDP_REFLECT, name="xdp_reflect.c") as bpf:
        yield load_prog(bpf, "xdp_reflect", "XDP").fd


@pytest.fixture(scope="module")
def tc_dnat(kernel_headers: Path) -> Iterator[Any]:
    with compile_and_load(TC_DNAT, name="tc_dnat.c") as bpf:
        yield bpf


def _swapped(pkt: Any) -> Any:
    out = pkt.copy()
    out[Ether].src, out[Ether].dst = pkt[Ether].dst, pkt[Ether].src
    return out


# ---------------------------------------------------------------- BPF_PROG_TEST_RUN


def test_xdp_cases_verdicts_and_rewritten_output(xdp_reflect: int) -> None:
    eth = Ether(src=MAC_A, dst=MAC_B)
    tcp4 = eth / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="S")
    udp6 = eth / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5353, dport=53) / Raw(b"q" * 20)
    icmp4 = eth / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP() / Raw(b"ping")
    icmp6 = eth / IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest()
    arp = Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")
    experimental = Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / Raw(b"x" * 46)

    results = run_cases(
        xdp_reflect,
        [
            Case("a TCP SYN over IPv4 goes back out with the MACs swapped", tcp4, XDP_TX, _swapped(tcp4)),
            Case("a UDP datagram over IPv6 goes back out with the MACs swapped", udp6, XDP_TX, _swapped(udp6)),
            Case("an ICMP echo goes back out with the MACs swapped", icmp4, XDP_TX, _swapped(icmp4)),
            Case(
                "an ICMPv6 echo goes back towards its sender",
                icmp6,
                XDP_TX,
                lambda out: out[Ether].dst == MAC_A and out[Ether].src == MAC_B and out.haslayer(ICMPv6EchoRequest),
            ),
            Case("ARP is left to the kernel, untouched", arp, XDP_PASS, arp),
            Case("the experimental EtherType is dropped", experimental, XDP_DROP),
        ],
        kind="xdp",
    )
    assert [r.retval for r in results] == [XDP_TX, XDP_TX, XDP_TX, XDP_TX, XDP_PASS, XDP_DROP]


def test_run_cases_reports_every_failing_case(xdp_reflect: int) -> None:
    pkt = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"abc")
    with pytest.raises(AssertionError) as err:
        run_cases(
            xdp_reflect,
            [
                Case("passes", pkt, XDP_TX, _swapped(pkt)),
                Case("wrong verdict expected", pkt, XDP_PASS),
                Case("wrong output expected", pkt, XDP_TX, pkt),
                Case("check that returns False", pkt, XDP_TX, lambda out: False),
                Case("check that asserts", pkt, XDP_TX, lambda out: _assert(out[IP].ttl == 1, "ttl is not 1")),
            ],
            kind="xdp",
        )
    msg = str(err.value)
    assert "4 of 5 cases failed" in msg
    assert "case 0" not in msg
    assert "wrong verdict expected" in msg and "verdict XDP_TX, expected XDP_PASS" in msg
    assert "wrong output expected" in msg and "first difference at byte 5" in msg
    assert "returned False" in msg
    assert "ttl is not 1" in msg


def _assert(cond: bool, message: str) -> None:
    assert cond, message


def test_tc_cases_rewrite_with_valid_checksums(tc_dnat: Any) -> None:
    fd = load_prog(tc_dnat, "tc_dnat", "SCHED_CLS").fd
    eth = Ether(src=MAC_A, dst=MAC_B)
    to_svc = eth / IP(src="10.0.0.1", dst="10.96.0.1") / UDP(sport=1234, dport=53) / Raw(b"query")
    to_pod = eth / IP(src="10.0.0.1", dst="10.244.1.5") / UDP(sport=1234, dport=53) / Raw(b"query")
    blocked = eth / IP(src="10.0.0.1", dst="10.96.0.2") / UDP(sport=1234, dport=53)
    tcp = eth / IP(src="10.0.0.1", dst="10.96.0.1") / TCP(dport=53)
    run_cases(
        fd,
        [
            Case("UDP to the service address is sent to the pod with fixed checksums", to_svc, TC_ACT_OK, to_pod),
            Case("UDP to the blocked address is dropped", blocked, TC_ACT_SHOT),
            Case("TCP is not translated", tcp, TC_ACT_OK, tcp),
        ],
        kind="tc",
    )


def test_tc_stale_checksums_are_caught(kernel_headers: Path) -> None:
    # The same DNAT without the checksum fix-ups: the harness must notice.
    with compile_and_load(TC_DNAT, cflags=["-DBROKEN_CSUM"], name="tc_dnat_broken.c") as bpf:
        fd = load_prog(bpf, "tc_dnat", "SCHED_CLS").fd
        pkt = Ether() / IP(src="10.0.0.1", dst="10.96.0.1") / UDP(sport=1, dport=53) / Raw(b"x")
        with pytest.raises(AssertionError) as err:
            run_cases(fd, [Case("DNAT forgetting checksums", pkt, TC_ACT_OK, lambda out: out[IP].dst == "10.244.1.5")])
    msg = str(err.value)
    assert "IPv4 header checksum" in msg
    assert "UDP checksum" in msg


def test_tc_ctx_in_and_out(tc_dnat: Any) -> None:
    fd = load_prog(tc_dnat, "tc_mark", "SCHED_CLS").fd
    pkt = bytes(Ether() / IP() / UDP())
    # struct __sk_buff starts len, pkt_type, mark: only mark (and a few later fields) may be set.
    ctx = struct.pack("=III", 0, 0, 0x2A)
    res = test_run(fd, pkt, ctx=ctx)
    assert res.retval == 0x2A
    assert res.ctx_out is not None and struct.unpack_from("=I", res.ctx_out, 8)[0] == 0x2A


def test_repeat_reports_kernel_duration(xdp_reflect: int) -> None:
    pkt = bytes(Ether(src=MAC_A, dst=MAC_B) / IP() / TCP())
    res = test_run(xdp_reflect, pkt, repeat=2000)
    assert res.retval == XDP_TX
    assert 0 < res.duration_ns < 1_000_000


def test_test_run_shares_kpr_bpf_maps_libbpf_binding(xdp_reflect: int) -> None:
    # One definition of the opts struct and of the library's signatures: a second one
    # (prog_run's own, as before) would not take the other's struct, and could drift from it.
    import ctypes

    from kpr.bpf import maps as M

    fn = M.libbpf().bpf_prog_test_run_opts
    assert fn.argtypes == [ctypes.c_int, ctypes.POINTER(M.ProgTestRunOpts)]
    pkt = bytes(Ether(src=MAC_A, dst=MAC_B) / IP() / TCP())
    buf = ctypes.create_string_buffer(pkt, len(pkt))
    opts = M.ProgTestRunOpts(sz=ctypes.sizeof(M.ProgTestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                             data_size_in=len(pkt), repeat=1)
    assert fn(xdp_reflect, ctypes.byref(opts)) == 0
    assert opts.retval == XDP_TX == test_run(xdp_reflect, pkt).retval


def test_test_run_rejects_a_bad_fd() -> None:
    with pytest.raises(OSError):
        test_run(-1, bytes(64))


def test_checksum_checker_covers_tunnels_and_icmp_errors() -> None:
    inner = Ether() / IP(src="10.1.0.1", dst="10.1.0.2") / TCP(dport=80)
    vxlan = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(dport=4789) / Raw(b"\x08" + bytes(7)) / inner)
    assert checksum_problems(vxlan) == []
    broken = bytearray(vxlan)
    broken[-3] ^= 0xFF  # inside the inner TCP header
    problems = checksum_problems(bytes(broken))
    assert any(p.startswith("TCP checksum") for p in problems) and any(p.startswith("UDP checksum") for p in problems)

    quoted = IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=53, dport=1234)
    icmp_err = Ether() / IP(src="10.0.0.3", dst="10.0.0.2") / ICMP(type=3, code=3) / Raw(bytes(quoted)[:28])
    assert checksum_problems(bytes(icmp_err)) == []
    zero_udp6 = checksum_problems(bytes(Ether() / IPv6() / UDP(chksum=0)))
    assert zero_udp6 == ["UDP over IPv6 with zero checksum at offset 60"]
    assert checksum_problems(bytes(Ether() / IPv6() / UDP(chksum=0)), allow_zero_udp6=True) == []
    assert checksum_problems(bytes(Ether() / IP() / UDP(chksum=0))) == []
    assert prog_run.verdict_name(2, "tc") == "TC_ACT_SHOT"
    assert prog_run.verdict_name(0xFFFFFFFF, "tc") == "TC_ACT_UNSPEC"


# ---------------------------------------------------------------- topologies


def test_two_nodes_ping_and_teardown() -> None:
    with Topology() as topo:
        topo.add_node("n1")
        topo.add_node("n2")
        link = topo.link("n1", "n2", ["10.99.0.1/24", "fd99::1/64"], ["10.99.0.2/24", "fd99::2/64"])
        names = [topo.netns_name("n1"), topo.netns_name("n2")]
        assert all(netns_exists(n) for n in names)
        assert link.if_a == "eth0" and link.if_b == "eth0"
        topo.run("n1", "ping -c1 -W2 10.99.0.2")
        topo.run("n2", ["ping", "-6", "-c1", "-W2", "fd99::1"])
        assert topo["n1"].run("cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
        assert topo.mac("n1", "eth0").count(":") == 5
        assert topo.ifindex("n2", "eth0") > 1
    assert not any(netns_exists(n) for n in names)


def test_pods_across_nodes_and_an_external_client() -> None:
    with Topology() as topo:
        for n in ("n1", "n2"):
            topo.add_node(n)
        topo.link("n1", "n2", ["10.99.0.1/24", "fd99::1/64"], ["10.99.0.2/24", "fd99::2/64"])
        topo.add_pod("n1", "p1", "10.244.1.2", ip6="fd44:1::2")
        topo.add_pod("n1", "p2", "10.244.1.3")
        topo.add_pod("n2", "p3", "10.244.2.2", ip6="fd44:2::2")
        topo.add_route("n1", "10.244.2.0/24", "10.99.0.2")
        topo.add_route("n2", "10.244.1.0/24", "10.99.0.1")
        topo.add_route("n1", "fd44:2::/64", "fd99::2")
        topo.add_route("n2", "fd44:1::/64", "fd99::1")
        topo.add_external("client")
        topo.link("client", "n1", "192.0.2.10/24", "192.0.2.1/24")
        topo.add_route("client", "10.244.0.0/16", "192.0.2.1")
        topo.add_route("n2", "192.0.2.0/24", "10.99.0.1")

        # The client has no default route: nothing it sends can leave the topology.
        assert "default" not in topo.run("client", "ip route").stdout
        topo.run("p1", "ping -c1 -W2 10.244.1.3")  # same node
        topo.run("p1", "ping -c1 -W2 10.244.2.2")  # across nodes
        topo.run("p1", "ping -6 -c1 -W2 fd44:2::2")
        topo.run("client", "ping -c1 -W2 10.244.2.2")

        server = topo.popen("p3", "sleep 300")
        assert server.poll() is None
        names = [ns.netns for ns in topo.namespaces.values()]
        assert all(len(i) <= 15 for ns in topo.namespaces.values() for i in ns.ifaces)
    assert server.poll() is not None, "background commands stop at teardown"
    assert not any(netns_exists(n) for n in names)


def test_teardown_happens_when_the_test_fails() -> None:
    topo = Topology()
    with pytest.raises(RuntimeError, match="boom"), topo:
        topo.add_node("n1")
        topo["n1"].popen(["sleep", "300"])
        name = topo.netns_name("n1")
        raise RuntimeError("boom")
    assert not netns_exists(name)


def test_in_netns_switches_and_returns(topology: Topology) -> None:
    import socket

    host = {n for _, n in socket.if_nameindex()}
    topology.add_node("n1")
    topology.add_external("c")
    topology.link("n1", "c", ifname_a="kpr-probe0")
    with topology["n1"].enter():
        inside = {n for _, n in socket.if_nameindex()}
    assert inside == {"lo", "kpr-probe0"}
    assert {n for _, n in socket.if_nameindex()} == host


def test_command_failure_shows_output(topology: Topology) -> None:
    topology.add_external("c")
    with pytest.raises(Exception) as err:
        topology.run("c", "echo to-stderr >&2; exit 3")
    assert "to-stderr" in str(err.value)
    assert "exit status 3" in str(err.value)


def test_a_forked_child_leaves_its_parents_topology_alone(topology: Topology) -> None:
    """pyroute2 does netns work in forked children; one that unwinds its copy of the test's
    stack (a raising signal handler) or exits through atexit closes its copy of the topology:
    the parent's namespaces and veths must survive that."""
    from kpr.testing import netns as kt_netns

    topology.add_node("n1")
    topology.add_external("c")
    topology.link("n1", "c", "10.99.0.1/24", "10.99.0.2/24")
    pid = os.fork()
    if pid == 0:  # the child: close as an unwinding would, then as atexit would; never return into pytest
        try:
            topology.close()
            kt_netns._close_all_at_exit()
        finally:
            os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert all(netns_exists(ns.netns) for ns in topology.namespaces.values())
    topology.run("c", "ping -c1 -W2 10.99.0.1")


# ---------------------------------------------------------------- cgroups


def test_child_cgroup_runs_a_command_and_is_removed() -> None:
    with child_cgroup("kpr-harness") as cg:
        assert cg.is_dir() and cg.name.startswith("kpr-harness-")
        out = run_in_cgroup(cg, "cat /proc/self/cgroup").stdout
        assert f"0::/{cg.name}" in out.splitlines()
        sleeper = popen_in_cgroup(cg, ["sleep", "300"])
    assert not cg.exists()
    assert sleeper.wait(timeout=5) is not None, "processes left in the cgroup are killed"


def test_a_forked_child_unwinding_leaves_its_parents_cgroup_and_bpffs_alone() -> None:
    from kpr.testing.bpffs import private_bpffs

    parent = os.getpid()
    try:
        with child_cgroup("kpr-harness") as cg, private_bpffs("kpr-harness") as mnt:
            sleeper = popen_in_cgroup(cg, ["sleep", "300"])
            wait_for(lambda: str(sleeper.pid) in (cg / "cgroup.procs").read_text().split(), what="the sleeper in the cgroup")
            pid = os.fork()
            if pid == 0:
                raise SystemExit(143)  # the child unwinds the test's stack, as a raising signal handler did
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            assert cg.is_dir() and sleeper.poll() is None and os.path.ismount(mnt)
    finally:
        if os.getpid() != parent:  # the child, whatever its unwinding raised: never back into pytest
            os._exit(0)
    assert not cg.exists() and not mnt.exists(), "the parent still removes them"


def test_a_forked_child_unwinding_leaves_its_parents_scratch_pins_alone(require_kernel: None) -> None:
    """scratch_pin_dir (the pin_dir fixture's, the labs'): a forked child unwinding its copy of
    the stack must not detach and unpin what its parent pinned there."""
    from kpr.bpf import maps as M
    from kpr.testing.bpffs import pin_map, scratch_pin_dir

    parent = os.getpid()
    spec = M.MapSpec("kpr_harness_fork", M.BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    try:
        with scratch_pin_dir("kpr-harness") as pin:
            pin_map(pin, spec.name, spec)
            pid = os.fork()
            if pid == 0:
                raise SystemExit(143)  # the child unwinds the test's stack, as a raising signal handler did
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            assert (pin / spec.name).exists(), "the parent's pin survives the child"
    finally:
        if os.getpid() != parent:  # the child, whatever its unwinding raised: never back into pytest
            os._exit(0)
    assert not pin.exists(), "the parent still removes it"


def test_cgroup_and_netns_together_with_a_connect_hook(kernel_headers: Path, topology: Topology, cgroup: Path) -> None:
    # A connect hook on the child cgroup refuses every connect: a process in the cgroup
    # is refused, the same command outside it is not. This proves the command really ran
    # in the cgroup, and in the namespace (its interfaces are the namespace's).
    from bcc import BPF, BPFAttachType

    prog = "int deny(struct bpf_sock_addr *ctx) { return 0; }\n"
    script = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        's.connect(("127.0.0.1", 9)); print("connected")'
    )
    connect = [sys.executable, "-c", script]
    topo, cg = topology, cgroup
    with compile_and_load(prog, name="deny.c") as bpf:
        topo.add_external("c")
        fn = load_prog(bpf, "deny", "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
        cg_fd = os.open(cg, os.O_RDONLY)
        try:
            BPF.attach_func(fn, cg_fd, BPFAttachType.CGROUP_INET4_CONNECT)
            try:
                inside = run_in_cgroup(cg, connect, topo["c"], check=False)
                links = run_in_cgroup(cg, "ip -o link", topo["c"]).stdout
                outside = topo.run("c", connect, check=False)
            finally:
                BPF.detach_func(fn, cg_fd, BPFAttachType.CGROUP_INET4_CONNECT)
        finally:
            os.close(cg_fd)
    assert inside.returncode != 0 and "Operation not permitted" in inside.stderr
    assert outside.returncode == 0 and "connected" in outside.stdout
    assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"]


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal
    from kpr.testing.cgroup import child_cgroup
    from kpr.testing.netns import Topology
    topo = Topology()
    topo.add_node("n1")
    topo["n1"].popen(["sleep", "300"])
    cm = child_cgroup("kpr-harness")
    cg = cm.__enter__()
    print(topo.netns_name("n1"), cg, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no atexit: as if the run was killed
    """
)


def test_sweep_removes_what_a_killed_run_left() -> None:
    from kpr.testing import cgroup as kt_cgroup
    from kpr.testing import netns as kt_netns

    res = subprocess.run([sys.executable, "-c", _KILLED_RUN], capture_output=True, text=True, timeout=60)
    netns_name, cg = res.stdout.split()
    try:
        assert netns_exists(netns_name) and Path(cg).is_dir()
        assert netns_name in kt_netns.sweep_stale()
        assert Path(cg) in kt_cgroup.sweep_stale()
    finally:
        kt_netns.sweep_stale()
        kt_cgroup.sweep_stale()
    assert not netns_exists(netns_name)
    assert not Path(cg).exists()


_KILLED_IN_ADD = textwrap.dedent(
    """
    from kpr.testing.netns import Topology
    Topology().add_node("n1")  # killed inside `ip netns add` (the slow ip below)
    """
)
# an `ip` that makes the namespace, says so, then takes its time: the run is killed meanwhile
_SLOW_IP = '#!/bin/sh\n{ip} "$@"; rc=$?\nif [ "$1 $2" = "netns add" ]; then echo "$3" > {mark}; sleep 60; fi\nexit $rc\n'


def test_sweep_removes_a_namespace_whose_run_was_killed_while_adding_it(tmp_path: Path) -> None:
    """A run killed while `ip netns add` runs (the command goes on and makes the namespace): its
    owner was recorded first, so a later sweep removes it."""
    import shutil
    import signal

    from kpr.testing import netns as kt_netns

    mark = tmp_path / "added"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ip").write_text(_SLOW_IP.format(ip=shutil.which("ip"), mark=mark))
    (bindir / "ip").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    run = subprocess.Popen([sys.executable, "-c", _KILLED_IN_ADD], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = ""
    try:
        wait_for(lambda: mark.exists() and mark.read_text().strip(), 30, "the namespace made")
        name = mark.read_text().strip()
        os.killpg(run.pid, signal.SIGKILL)  # the run and its `ip`, as a killed test run's group
        run.wait(10)
        assert netns_exists(name)
        assert name in kt_netns.sweep_stale()
        assert not netns_exists(name)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        if name and netns_exists(name):
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_sweep_drops_records_whose_writer_died_before_renaming_them() -> None:
    """A record is written under .<name>.<writer's pid> and renamed; a writer killed in between
    made nothing under it yet: the sweep drops the file (it kept the owners' directory for
    good), and leaves one whose writer lives."""
    from kpr.testing import cgroup as kt_cgroup
    from kpr.testing import netns as kt_netns

    gone = subprocess.Popen(["true"])
    gone.wait()
    made: list[Path] = []
    try:
        for kit in (kt_netns, kt_cgroup):
            kit.OWNERS_DIR.mkdir(parents=True, exist_ok=True)
            dead = kit.OWNERS_DIR / f".kpr-harness-{os.getpid()}.x.{gone.pid}"
            live = kit.OWNERS_DIR / f".kpr-harness-{os.getpid()}.y.{os.getpid()}"
            dead.write_text("")
            live.write_text("")
            made += [dead, live]
            kit.sweep_stale()
            assert not dead.exists() and live.exists()
    finally:
        for rec in made:
            rec.unlink(missing_ok=True)


def test_sweep_leaves_a_namespace_whose_owner_record_reads_empty(topology: Topology) -> None:
    """A record read while being written is empty: its owner is not known to be dead, so its
    namespace stays (it was taken for pid 0, dead, and a live run's namespace deleted)."""
    from kpr.testing import netns as kt_netns

    topology.add_external("c")
    name = topology.netns_name("c")
    rec = kt_netns.OWNERS_DIR / name
    rec.write_text("")
    try:
        assert name not in kt_netns.sweep_stale()
        assert netns_exists(name)
    finally:
        rec.write_text(f"{os.getpid()}\n")


# ---------------------------------------------------------------- the plugin harness


def test_harness_runs_a_nodeport_plugin_with_the_facility_it_requires(
    kernel_headers: Path, pin_dir: Path, topology: Topology
) -> None:
    """A NodePort plugin has no mode of its own outside an agent: it refuses to start without
    the NodePort facility; the harness starts that facility as the plugin manager does
    (kpr_requires), hands it the services through the bus (after the writer), and stops it
    after the last plugin needing it."""
    from kpr.model import Backend, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
    from kpr.nodeport import facility as F
    from kpr.plugins.tc_nodeport.plugin import TcNodePort
    from kpr.testing.harness import PluginHarness, plugin_context, start_plugin

    node = NodeInfo("node1", addresses=("10.99.0.1",), devices=("eth0",))
    svc = Service(ServiceKey("default", "np"), (Frontend(FrontendType.NODE_PORT, "10.99.0.1", 30080, Protocol.TCP,
                                                          (Backend("10.244.1.5", 8080, node_name="node2"),)),))
    pin, topo = pin_dir, topology
    topo.add_node("node1")
    topo.add_external("c")
    topo.link("node1", "c", "10.99.0.1/24", "10.99.0.2/24")
    with PluginHarness(node, pin, netns=topo["node1"]) as h:
        h.open_writer()
        with pytest.raises(RuntimeError, match="no NodePort facility runs on"):
            start_plugin(TcNodePort(), {}, plugin_context("tc_nodeport", node, pin), netns=topo["node1"])
        assert F.running(pin) is None
        h.apply(svc)  # before any plugin: the facility gets it when it starts, as in an agent
        p = h.start(TcNodePort(), {"keepAttachedOnStop": False}, name="tc_nodeport")
        fac = h.facilities["nodeport"]
        assert p.nodeport is fac and F.running(pin) is fac
        assert p.kpr_status().details["facility"] == "nodeport"
        assert svc.key in fac.book.services
        h.delete(svc.key)
        assert svc.key not in fac.book.services, "the facility's hook, through the bus"
        from kpr.bpf import maps as M
        from kpr.nodeport import datapath as ND

        with M.BpfMap.open_pinned(pin / ND.NH_MAP) as nh:
            armed = ND.NP_NH.unpack(nh.lookup(M.U32.pack(ND.NH_GEN)))[0]
        assert armed, "the facility's watcher arms the next-hop cache at start"
        h.stop(p)
        assert h.facilities == {} and F.running(pin) is None and fac.tables is None
        # programs left attached without an agent trust no cached next hop (nobody watches the
        # routes); the generation goes on from the last one at the next start
        with M.BpfMap.open_pinned(pin / ND.NH_MAP) as nh:
            gen, last = ND.NP_NH.unpack(nh.lookup(M.U32.pack(ND.NH_GEN)))[:2]
            assert gen == 0 and last >= armed
            assert ND.invalidate_next_hops(nh) == last + 1
