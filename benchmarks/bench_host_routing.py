"""host_routing: TCP_RR and throughput between an external client and a pod, through the host's
stack (the legacy path, with a kube-proxy-shaped iptables rule set in place), with
bpf_redirect_neigh only (pods reached by bpf_redirect out of their host-side veth), and with
bpf_redirect_neigh + bpf_redirect_peer, in one run on one topology (tests/kernel/host_routing_env.py:
client netns -- node netns -- pod netns over veths, the pod on a /32 route).

  TCP_RR: one TCP connection, 1-byte request, 1-byte response, as many as fit in --seconds;
          transactions per second. A small C client/server (compiled here with cc; a Python
          loop when there is no compiler) so the path, not the interpreter, is measured; the
          client is pinned to CPU 0 and the server to --server-cpu (taskset; CPU 0 too by default),
          both under SCHED_FIFO (chrt; --no-rt turns it off) so other work on a shared machine
          does not decide the figures (the kernel's RT throttling still leaves that CPU 5%).
  TCP_STREAM: iperf3, client -> pod, --seconds; Gbit/s received.

The legacy path is the node's stack as a kube-proxy node has it (--legacy kube-proxy, the
default since 2026-12-05): the chains kube-proxy in iptables mode (1.28-1.31) and the kubelet
install, rule for rule (iptables_rules): nat PREROUTING/OUTPUT -> KUBE-SERVICES (--rules
ClusterIP services of one endpoint each, with their KUBE-MARK-MASQ rules, then the NodePort
jump), POSTROUTING -> KUBE-POSTROUTING (MASQUERADE --random-fully); filter INPUT, OUTPUT and
FORWARD with their jumps (FORWARD: KUBE-PROXY-FIREWALL, KUBE-FORWARD, KUBE-SERVICES,
KUBE-EXTERNAL-SERVICES, three of them on `--ctstate NEW`), KUBE-FORWARD (INVALID drop,
masquerade mark accept, RELATED,ESTABLISHED accept), KUBE-FIREWALL; the empty canary chains.
Its conntrack matches make the node's namespace track every flow (nf_conntrack at PREROUTING,
confirmed at POSTROUTING), as on a kube-proxy node. The first method's set (--legacy v1,
iptables_rules_v1) had FORWARD jump to KUBE-FORWARD and KUBE-SERVICES only, no INPUT/OUTPUT
chains and no masquerade marks in the service chains: lighter than a kube-proxy node by two
conntrack-state matches and some comment matches per forwarded packet, about 3% of legacy's
TCP_RR here (2026-12-05, back to back: 121k tps with v1, 117k with kube-proxy; neigh+peer
paired 1.27x against 1.31-1.32x). --legacy none: the bare stack. After each run
the bench reads the FORWARD hook's packet count (the KUBE-FORWARD jump's counter): the proof
that the legacy runs went through netfilter and the plugin's did not, in either direction.

Placement (--placement): one-cpu (the default, and the first method): the RR client, the pod's
servers and every RR packet's processing on CPU 0, so a transaction costs the CPU work of the
whole path once (two TCP stacks, two context switches, the node's forwarding) and nothing
else; iperf3's client and server on CPU 0 too (the first method left the client to the
scheduler: under other work its CPU, not the path, decided the figure, which scattered from
0.84x to 1.14x of legacy between runs; pinned, neigh+peer was 1.13x of legacy, 6 pairs in
a row each above, 2026-12-05, load 5.4-6.5). Two machines would instead run the client and its receive on one CPU and the node, the
pod and its receive on another; two-machines does that: the client on CPU 0, the servers on
--server-cpu (1), the node's eth0 receive steered there by RPS and the client's eth0 receive
to CPU 0 (a veth's receive otherwise runs on the sending CPU), so each transaction crosses CPUs
twice, as a request and a reply cross the wire. On a VM (this machine: 2 vCPUs) a cross-CPU
wakeup of a halted vCPU costs tens of microseconds of hypervisor work, several times the whole
path, and neither path changes it: two-machines then measures mostly that (2026-12-05: about
20k tps against 120-170k on one CPU, neigh+peer 1.05x pooled, 1.08x paired), so one-cpu stays the default;
on bare metal two-machines is the closer picture.

The variants are measured in turn within each round, with a legacy run before the first and
after each plugin variant, each round starting one variant later than the last (so none always
runs right after the same other). Figures are medians over --rounds (legacy's over all its runs:
the pooled ratio), and beside them each variant's ratio to the mean of the legacy runs right
before and after it, median over the rounds (the paired ratio: the load of other work on the
machine drifts over a round and hits a variant and its neighbouring legacy runs alike, so this
one is the robust figure under load). Unless --issue-only, more variants in the same rounds switch one
build-time cut of lib/host_routing.h off or on against neigh+peer: the route out of the node
looked up per packet (KPR_HR_OUT_CACHE=0) or its MACs remembered too and sent by bpf_redirect
(=2; the default 1 remembers the next hop and still sends by bpf_redirect_neigh), the pod's
address looked up in kpr_hr_pods before its remembered route (KPR_HR_CACHE_FIRST=0), and per-packet
ClusterIP on (the plugin's default; the bench's traffic has no service) with and without the
conntrack gate (KPR_HR_CT_GATE=0). The load average is printed before and after. The plugin's counters
are read after each BPF run to prove which helper carried the packets.

    .venv/bin/python benchmarks/bench_host_routing.py [--rounds 5] [--seconds 3] [--rules 1000]
        [--variants "n+p MACs" ...] [--legacy kube-proxy|v1|none] [--placement one-cpu|two-machines]

Ends with one line: `TCP_RR neigh+peer vs legacy: R x (paired: P x)`.

`--prog-cost` measures the programs alone instead: BPF_PROG_TEST_RUN on the prog tests' lab
(host_routing_env.prog_lab, one per build of PROG_BUILDS: the default and each switch), one
packet per call (a redirect or NAT would otherwise see its own output), the kernel-measured
time per packet of each decision minus a bare tc program's, builds and cases interleaved
within each round, medians over --rounds. The kernel's own redirect work is not in it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from host_routing_env import PODS, PY, Rig, delta, rig  # noqa: E402

POD = "p1"
RR_PORT, IPERF_PORT = 7001, 5201

RR_C = r"""
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int one = 1, zero = 0; char b;
    if (argc == 3 && !strcmp(argv[1], "server")) {
        int s = socket(AF_INET6, SOCK_STREAM, 0);
        struct sockaddr_in6 a = {0};
        a.sin6_family = AF_INET6; a.sin6_port = htons(atoi(argv[2]));
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
        if (bind(s, (void *)&a, sizeof(a)) || listen(s, 16)) { perror("bind/listen"); return 1; }
        printf("ready\n"); fflush(stdout);
        for (;;) {
            int c = accept(s, 0, 0);
            if (c < 0) continue;
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            while (recv(c, &b, 1, 0) == 1 && send(c, &b, 1, 0) == 1) {}
            close(c);
        }
    }
    if (argc == 5 && !strcmp(argv[1], "client")) {
        struct addrinfo *ai, hints = {0};
        hints.ai_socktype = SOCK_STREAM;
        if (getaddrinfo(argv[2], argv[3], &hints, &ai)) { fprintf(stderr, "resolve\n"); return 1; }
        int s = socket(ai->ai_family, SOCK_STREAM, 0);
        if (connect(s, ai->ai_addr, ai->ai_addrlen)) { perror("connect"); return 1; }
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        double secs = atof(argv[4]), t0 = now(), t; long n = 0;
        b = 'x';
        do {
            for (int i = 0; i < 100; i++) {
                if (send(s, &b, 1, 0) != 1 || recv(s, &b, 1, 0) != 1) { perror("rr"); return 1; }
            }
            n += 100;
            t = now();
        } while (t - t0 < secs);
        printf("{\"tps\": %.1f, \"n\": %ld}\n", n / (t - t0), n);
        return 0;
    }
    fprintf(stderr, "usage: rr server PORT | rr client HOST PORT SECONDS\n");
    return 2;
}
"""

# The same loop in Python, for machines without a C compiler (slower: the interpreter then
# takes a larger share of each transaction, which shrinks every ratio).
RR_PY = r"""
import json, socket, sys, time
if sys.argv[1] == "server":
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[2]))); s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (d := c.recv(1)) and c.send(d) == 1:
            pass
        c.close()
host, port, secs = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n, t0 = 0, time.perf_counter()
while True:
    for _ in range(100):
        s.send(b"x"); s.recv(1)
    n += 100
    t = time.perf_counter()
    if t - t0 >= secs:
        break
print(json.dumps({"tps": n / (t - t0), "n": n}))
"""


def rr_command(work: Path) -> tuple[list[str], str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        src, out = work / "rr.c", work / "rr"
        src.write_text(RR_C)
        res = subprocess.run([cc, "-O2", "-o", str(out), str(src)], capture_output=True, text=True)
        if res.returncode == 0:
            return [str(out)], "C"
        print(f"(cc failed, Python RR loop instead: {res.stderr.strip()[:200]})", file=sys.stderr)
    return [PY, "-c", RR_PY], "Python"


def iptables_rules_v1(rules: int) -> str:
    """The rule set of the benchmark's first method (--legacy v1): kube-proxy's nat chains and
    its filter KUBE-FORWARD, but FORWARD jumping only to KUBE-FORWARD and KUBE-SERVICES, no
    INPUT/OUTPUT chains, no masquerade marks in the service chains."""
    out = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
           ":KUBE-MARK-MASQ - [0:0]", "-A PREROUTING -m comment --comment kubernetes -j KUBE-SERVICES",
           "-A OUTPUT -j KUBE-SERVICES", "-A POSTROUTING -j KUBE-POSTROUTING",
           "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
           "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
           "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0", "-A KUBE-POSTROUTING -j MASQUERADE"]
    for i in range(rules):
        svc, sep = f"KUBE-SVC-D{i:05d}", f"KUBE-SEP-D{i:05d}"
        out += [f":{svc} - [0:0]", f":{sep} - [0:0]",
                f"-A KUBE-SERVICES -d 10.97.{i // 250}.{i % 250 + 1}/32 -p tcp --dport 80 -j {svc}",
                f"-A {svc} -j {sep}", f"-A {sep} -p tcp -j DNAT --to-destination 10.244.200.9:80"]
    out += ["-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS", "COMMIT",
            "*filter", ":KUBE-FORWARD - [0:0]", ":KUBE-SERVICES - [0:0]",
            "-A FORWARD -m comment --comment kubernetes -j KUBE-FORWARD",
            "-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT",
            "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "COMMIT"]
    return "\n".join(out) + "\n"


POD_CIDR = "10.244.0.0/16"  # the cluster CIDR kube-proxy is given (--cluster-cidr): the pods' /32s are in it


def iptables_rules(rules: int) -> str:
    """What kube-proxy in iptables mode (1.28-1.31) and the kubelet leave in a node's namespace,
    chain for chain, with `rules` ClusterIP services of one endpoint each (decoys: the bench's
    traffic is pod traffic, no service). What a forwarded packet of an established flow meets:
    conntrack (nf_conntrack_in at PREROUTING, confirm at POSTROUTING), nat's hooks (a new flow
    walks PREROUTING -> KUBE-SERVICES, 1000 rules, and POSTROUTING -> KUBE-POSTROUTING; later
    packets take the flow's NAT from conntrack), filter FORWARD: KUBE-PROXY-FIREWALL (ctstate NEW),
    KUBE-FORWARD (INVALID drop, masquerade mark, RELATED,ESTABLISHED accept)."""
    svc_comment = "-m comment --comment \"bench/decoy-{i}:http cluster IP\""
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
           ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-KUBELET-CANARY - [0:0]",
           ":KUBE-PROXY-CANARY - [0:0]",
           "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
           "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
           "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
           "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
           "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
           "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
           "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" "
           "-j MASQUERADE --random-fully"]
    for i in range(rules):
        svc, sep = f"KUBE-SVC-D{i:05d}", f"KUBE-SEP-D{i:05d}"
        cip, ep = f"10.97.{i // 250}.{i % 250 + 1}", f"10.244.{200 + i // 250}.{i % 250 + 1}"
        c = svc_comment.format(i=i)
        nat += [f":{svc} - [0:0]", f":{sep} - [0:0]",
                f"-A KUBE-SERVICES -d {cip}/32 -p tcp {c} -m tcp --dport 80 -j {svc}",
                f"-A {svc} ! -s {POD_CIDR} -d {cip}/32 -p tcp {c} -m tcp --dport 80 -j KUBE-MARK-MASQ",
                f"-A {svc} {c} -j {sep}",
                f"-A {sep} -s {ep}/32 {c} -j KUBE-MARK-MASQ",
                f"-A {sep} -p tcp {c} -m tcp -j DNAT --to-destination {ep}:8080"]
    nat += ["-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last "
            "rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS", "COMMIT"]
    new = "-m conntrack --ctstate NEW"
    filt = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
            ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FIREWALL - [0:0]", ":KUBE-FORWARD - [0:0]",
            ":KUBE-KUBELET-CANARY - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-CANARY - [0:0]",
            ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-SERVICES - [0:0]",
            f"-A INPUT {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
            f"-A INPUT {new} -m comment --comment \"kubernetes externally-visible service portals\" "
            "-j KUBE-EXTERNAL-SERVICES",
            "-A INPUT -j KUBE-FIREWALL",
            f"-A FORWARD {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            f"-A FORWARD {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            f"-A FORWARD {new} -m comment --comment \"kubernetes externally-visible service portals\" "
            "-j KUBE-EXTERNAL-SERVICES",
            f"-A OUTPUT {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            f"-A OUTPUT {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A OUTPUT -j KUBE-FIREWALL",
            "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet "
            "connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 "
            "-j ACCEPT",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack "
            "--ctstate RELATED,ESTABLISHED -j ACCEPT", "COMMIT"]
    mangle = ["*mangle", ":KUBE-KUBELET-CANARY - [0:0]", ":KUBE-PROXY-CANARY - [0:0]", "COMMIT"]
    return "\n".join(mangle + nat + filt) + "\n"


RULE_SETS = {"kube-proxy": iptables_rules, "v1": iptables_rules_v1}


def forwarded(r: Rig) -> int:
    """Packets the node's netfilter FORWARD hook has seen (the counter of its unconditional jump
    to KUBE-FORWARD, which every packet the stack forwards meets): proof of which path carried a
    run; -1 without that rule (--legacy none)."""
    res = r.topo.run("node", ["iptables", "-w", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n"], check=False)
    for line in res.stdout.splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == "KUBE-FORWARD" and f[0].isdigit():
            return int(f[0])
    return -1


CLIENT_CPU = "0"


def steer_rx(r: Rig, ns: str, dev: str, cpu: int) -> None:
    """RPS: the packets `dev` receives are processed on `cpu`, as a NIC's interrupt would hand
    them to the receiving machine's CPU (a veth's receive otherwise runs on the sender's CPU)."""
    r.topo.run(ns, ["sh", "-c", f"echo {1 << cpu:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus"])


def pinned(cpu: str, rt: bool) -> list[str]:
    """taskset (and chrt, when asked and present) in front of a command."""
    out = ["taskset", "-c", cpu]
    if rt and shutil.which("chrt"):
        out = ["chrt", "-f", "10", *out]
    return out


def rr(r: Rig, cmd: list[str], host: str, seconds: float, rt: bool) -> float:
    res = r.topo.run("cl", [*pinned(CLIENT_CPU, rt), *cmd, "client", host, str(RR_PORT), str(seconds)],
                     timeout=seconds + 30)
    return float(json.loads(res.stdout.strip().splitlines()[-1])["tps"])


def iperf(r: Rig, host: str, seconds: float) -> float:
    secs = str(max(1, round(seconds)))  # iperf3 reads -t as whole seconds; 0 is "forever"
    # pinned to the client's CPU, not SCHED_FIFO: next to its server at the same priority on
    # one CPU it could spin while the server waits for the CPU
    res = r.topo.run("cl", [*pinned(CLIENT_CPU, False), "iperf3", "-c", host, "-p", str(IPERF_PORT),
                            "-t", secs, "-J"], timeout=seconds + 60)
    return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


# name -> (plugin config, more compiler flags); None: no plugin, the host's stack with the iptables
# rule set. The first three are the issue's; the rest switch one build-time cut off (or on) in the
# same run. clusterIP is off unless a variant says otherwise (the bench's traffic has no service).
VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]] | None] = {
    "legacy": None,
    "neigh": ({"redirectPeer": False, "redirectNeigh": True}, ()),
    "neigh+peer": ({"redirectPeer": True, "redirectNeigh": True}, ()),
}
MORE_VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]] | None] = {
    "n+p FIB/pkt": ({"redirectPeer": True, "redirectNeigh": True}, ("-DKPR_HR_OUT_CACHE=0",)),
    "n+p MACs": ({"redirectPeer": True, "redirectNeigh": True}, ("-DKPR_HR_OUT_CACHE=2",)),
    "n+p pods/pkt": ({"redirectPeer": True, "redirectNeigh": True}, ("-DKPR_HR_CACHE_FIRST=0",)),
    "n+p clusterIP": ({"redirectPeer": True, "redirectNeigh": True, "clusterIP": True}, ()),
    "n+p cIP CT/pkt": ({"redirectPeer": True, "redirectNeigh": True, "clusterIP": True}, ("-DKPR_HR_CT_GATE=0",)),
}


BARE = "int kpr_t_bare(struct __sk_buff *skb) { return -1; }"  # TC_ACT_UNSPEC, nothing read


def prog_cost(args: argparse.Namespace) -> int:
    """ns per packet of each decision above a bare tc program (BPF_PROG_TEST_RUN)."""
    from host_routing_env import prog_lab
    from kpr.bpf.loader import compile_and_load
    from kpr.testing.netns import in_netns
    from kpr.testing.prog_run import test_run

    load_before = os.getloadavg()
    builds = dict(PROG_BUILDS) if not args.cflags else {"as built with " + " ".join(args.cflags): tuple(args.cflags)}
    bare = compile_and_load(BARE, name="hr-bare")
    ns: dict[str, dict[str, list[float]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            labs = {b: stack.enter_context(prog_lab(f"kpr-bench-hr-prog{i}", extra_cflags=cf))
                    for i, (b, cf) in enumerate(builds.items())}
            runs = {b: lab_cases(lab, bare) for b, lab in labs.items()}
            ns = {b: {k: [] for k in cases} for b, cases in runs.items()}
            for b, lab in labs.items():
                lab.dp.bump_out_generation()  # armed, as the agent's watcher does at start
                with in_netns(lab.topo["hr"].path):
                    for name, (counter, fd, dev, frame) in runs[b].items():  # warm up; flows and routes get remembered
                        test_run(fd, frame, ctx=lab.ctx(dev))
                        before = lab.dp.stats()
                        test_run(fd, frame, ctx=lab.ctx(dev))
                        moved = delta(before, lab.dp.stats())
                        if counter and not all(moved.get(c) == 1 for c in counter.split("+")):
                            print(f"(a switch decides otherwise, or not measuring what it says: {b}: {name}: "
                                  f"{counter} expected, moved: {moved})", file=sys.stderr)
            for _ in range(args.rounds):  # builds and cases interleaved within each round
                for b, lab in labs.items():
                    with in_netns(lab.topo["hr"].path):
                        for name, (_counter, fd, dev, frame) in runs[b].items():
                            ctx = lab.ctx(dev)
                            ns[b][name].append(sum(test_run(fd, frame, ctx=ctx).duration_ns
                                                   for _ in range(args.calls)) / args.calls)
    finally:
        bare.cleanup()
    load_after = os.getloadavg()
    med = {b: {k: statistics.median(v) for k, v in cases.items()} for b, cases in ns.items()}
    print(f"\n== host_routing programs, BPF_PROG_TEST_RUN ({platform.release()}, {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds x {args.calls} calls per case, builds and cases interleaved, medians; "
          f"ns per packet above a bare tc program)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    names = list(builds)
    for i, b in enumerate(names):
        print(f"  [{i}] {b}: {' '.join(builds[b]) or 'default flags'}")
    print(f"  {'case':<36} " + " ".join(f"{f'[{i}]':>6}" for i in range(len(names))))
    for case in next(iter(med.values())):
        if case == "bare tc program":
            continue
        print(f"  {case:<36} " + " ".join(f"{med[b][case] - med[b]['bare tc program']:>6.0f}" for b in names))
    print("  bare tc program itself: " + ", ".join(f"[{i}] {med[b]['bare tc program']:.0f} ns" for i, b in enumerate(names)))
    return 0


# Builds --prog-cost compares in one run (a switch off at a time against the default build).
PROG_BUILDS: dict[str, tuple[str, ...]] = {
    "default": (),
    "FIB lookup per packet out of the node (KPR_HR_OUT_CACHE=0)": ("-DKPR_HR_OUT_CACHE=0",),
    "MACs remembered too, bpf_redirect (KPR_HR_OUT_CACHE=2)": ("-DKPR_HR_OUT_CACHE=2",),
    "conntrack looked up for every TCP/UDP packet (KPR_HR_CT_GATE=0)": ("-DKPR_HR_CT_GATE=0",),
    "no per-packet ClusterIP (KPR_HR_CLUSTER_IP=0)": ("-DKPR_HR_CLUSTER_IP=0",),
    "no per-packet ClusterIP, kpr_hr_pods before kpr_hr_out (KPR_HR_CACHE_FIRST=0)": (
        "-DKPR_HR_CLUSTER_IP=0", "-DKPR_HR_CACHE_FIRST=0"),
}


def lab_cases(lab: Any, bare: Any) -> dict[str, tuple[str, int, int, bytes]]:
    """--prog-cost's cases on one lab: name -> (the counters that prove the default build's
    decision, joined by +; program fd; device; frame)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    from host_routing_env import CIP, FAR4, MAC_OUT, MAC_POD, NODE4, OUT4, OUT6, POD4, POD6, REMOTE4
    from kpr.bpf.loader import load_prog
    from kpr.plugins.host_routing import datapath as D

    out, pod = Ether(src=MAC_OUT, dst=lab.mac), Ether(src=MAC_POD, dst=lab.lxc_mac)

    def tcp(src: str, dst: str, sport: int = 40000, dport: int = 8080, v6: bool = False) -> Any:
        l3 = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
        return l3 / TCP(sport=sport, dport=dport, flags="A") / Raw(b"x" * 32)

    ext, frm = lab.dp.fd(D.FROM_NETDEV), lab.dp.fd(D.FROM_POD)
    cases = {
        "bare tc program": ("", int(load_prog(bare, "kpr_t_bare", "SCHED_CLS").fd), lab.eth0, out / IP()),
        "outside -> node (not a pod)": ("pass_not_pod", ext, lab.eth0, out / tcp(OUT4, NODE4)),
        "outside -> pod, v4 (peer)": ("redirect_peer", ext, lab.eth0, out / tcp(OUT4, POD4)),
        "outside -> pod, v6 (peer)": ("redirect_peer", ext, lab.eth0, out / tcp(OUT6, POD6, v6=True)),
        "pod -> outside (neigh)": ("redirect_neigh+out_route_cached", frm, lab.lxc, pod / tcp(POD4, FAR4)),
        "pod -> other node's pod (overlay)": ("redirect_neigh_overlay+out_route_cached", frm, lab.lxc,
                                              pod / tcp(POD4, REMOTE4)),
        "pod -> ClusterIP, tracked": ("service_established", frm, lab.lxc, pod / tcp(POD4, CIP, 41000, 80)),
        "ClusterIP reply -> pod": ("service_revnat", ext, lab.eth0, out / tcp(FAR4, POD4, 8080, 41000)),
    }
    return {k: (c, fd, dev, bytes(f)) for k, (c, fd, dev, f) in cases.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="per TCP_RR and per iperf3 run")
    ap.add_argument("--rules", type=int, default=1000, help="decoy services in the iptables rule set")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    ap.add_argument("--issue-only", action="store_true",
                    help="only the issue's three variants (legacy, neigh, neigh+peer), not the build switches")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="only these variants (legacy and neigh+peer are always measured)")
    ap.add_argument("--no-rt", dest="rt", action="store_false", help="no SCHED_FIFO for the RR and iperf3 processes")
    ap.add_argument("--placement", choices=("one-cpu", "two-machines"), default="one-cpu",
                    help="one-cpu (default): client, pod's servers and every receive on CPU 0 (the path's CPU "
                         "work per transaction); two-machines: the client and its receive on CPU 0, the node's "
                         "receive and the pod's servers on --server-cpu, as on two machines (see the docstring)")
    ap.add_argument("--server-cpu", default=None,
                    help="CPU of the pod's servers (and, two-machines, of the node's receive); default 0 for "
                         "one-cpu, 1 for two-machines")
    ap.add_argument("--legacy", choices=tuple(RULE_SETS) + ("none",), default="kube-proxy",
                    help="the iptables rule set in the node's namespace: kube-proxy (default: kube-proxy's and "
                         "the kubelet's chains), v1 (the first method's lighter set), none")
    ap.add_argument("--prog-cost", action="store_true", help="only the programs' cost per packet (BPF_PROG_TEST_RUN)")
    ap.add_argument("--calls", type=int, default=5000, help="--prog-cost: packets per case and round")
    ap.add_argument("--cflags", nargs="*", default=[], help="--prog-cost: more compiler flags (a variant to compare)")
    args = ap.parse_args()
    if args.prog_cost:
        return prog_cost(args)
    two_machines = args.placement == "two-machines"
    if args.server_cpu is None:
        args.server_cpu = "1" if two_machines and (os.cpu_count() or 1) > 1 else "0"
    if two_machines and args.server_cpu == CLIENT_CPU:
        ap.error("--placement two-machines needs --server-cpu other than the client's CPU 0")

    load_before = os.getloadavg()
    variants = {**VARIANTS, **({} if args.issue_only else MORE_VARIANTS)}
    if args.variants:
        known = {**VARIANTS, **MORE_VARIANTS}
        unknown = [n for n in args.variants if n not in known]
        if unknown:
            ap.error(f"--variants: unknown {unknown} (known: {', '.join(known)})")
        variants = {n: known[n] for n in ["legacy", "neigh+peer", *args.variants] if n in known}
    results: dict[str, dict[str, list[float]]] = {v: {"tps": [], "gbps": []} for v in variants}
    # each plugin variant's figure over the mean of the legacy runs right before and after it
    paired: dict[str, dict[str, list[float]]] = {v: {"tps": [], "gbps": []} for v in variants if v != "legacy"}
    proof: dict[str, dict[str, int]] = {}
    fwd_by: dict[str, int] = {}  # packets through the node's FORWARD hook in each variant's last run
    host = PODS[POD][0]
    with tempfile.TemporaryDirectory(prefix="kpr-bench-hr-") as work, rig(pods=(POD,), prefix="kpr-bench-hr") as r:
        cmd, impl = rr_command(Path(work))
        srv = r.topo.popen(POD, [*pinned(args.server_cpu, args.rt), *cmd, "server", str(RR_PORT)], stdout=subprocess.PIPE, text=True)
        if srv.stdout.readline().strip() != "ready":
            raise RuntimeError("RR server did not start")
        r.topo.popen(POD, [*pinned(args.server_cpu, False), "iperf3", "-s", "-p", str(IPERF_PORT)])
        if two_machines:  # each "machine" receives on its own CPU: the node (and its pod) on the server's
            steer_rx(r, "node", "eth0", int(args.server_cpu))
            steer_rx(r, "cl", "eth0", int(CLIENT_CPU))
        if args.legacy != "none":
            ipt = r.topo.run("node", ["iptables-restore"], input=RULE_SETS[args.legacy](args.rules), check=False)
            if ipt.returncode != 0:
                print(f"(iptables rule set not installed: {ipt.stderr.strip()[:200]})", file=sys.stderr)
        time.sleep(0.5)
        def measure(name: str) -> tuple[float, float]:
            fwd = forwarded(r)
            tps, gbps = rr(r, cmd, host, args.seconds, args.rt), iperf(r, host, args.seconds)
            results[name]["tps"].append(tps)
            results[name]["gbps"].append(gbps)
            fwd_by[name] = forwarded(r) - fwd if fwd >= 0 else -1
            return tps, gbps

        for rnd in range(args.rounds):
            names = [n for n in variants if n != "legacy"]
            # legacy between every two plugin variants, so each is compared with the legacy runs
            # right before and after it (drift and other work on the machine hit both alike);
            # each round starts one variant later: no variant always follows the same one
            prev = measure("legacy")
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                v = variants[name]
                assert v is not None
                r.extra_cflags = list(v[1])
                r.start(**{"keepAttachedOnStop": False, "clusterIP": False, **v[0]})
                before = r.stats()
                tps, gbps = measure(name)
                proof[name] = delta(before, r.stats())
                r.stop()
                after = measure("legacy")
                paired[name]["tps"].append(tps / statistics.mean((prev[0], after[0])))
                paired[name]["gbps"].append(gbps / statistics.mean((prev[1], after[1])))
                prev = after
            print(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f}): " + ", ".join(
                f"{n} {results[n]['tps'][-1]:.0f} tps {results[n]['gbps'][-1]:.2f} Gbit/s"
                + (f" ({paired[n]['tps'][-1]:.3f}x)" if n in paired else "") for n in variants), file=sys.stderr)
    load_after = os.getloadavg()

    med = {n: {k: statistics.median(v) for k, v in res.items()} for n, res in results.items()}
    base = med["legacy"]
    print(f"\n== host_routing: external client -> pod {host} over veths ({platform.release()}, "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.seconds:g} s, medians; RR loop in {impl}"
          f"{', SCHED_FIFO' if args.rt and shutil.which('chrt') else ''}; "
          f"placement {args.placement}: client CPU {CLIENT_CPU}, pod's servers CPU {args.server_cpu}; "
          f"iptables: {args.legacy}" + (f", {args.rules} decoy services)" if args.legacy != "none" else ")"))
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    for n, v in variants.items():
        if v is not None and (v[1] or len(v[0]) > 2):
            print(f"  {n}: {v[0]} {' '.join(v[1])}")
    print(f"  {'variant':<14} {'TCP_RR tps':>11} {'vs legacy':>10} {'iperf3 Gbit/s':>14} {'vs legacy':>10}")
    for n, m in med.items():
        print(f"  {n:<14} {m['tps']:>11.0f} {m['tps'] / base['tps']:>9.2f}x {m['gbps']:>14.2f} "
              f"{m['gbps'] / base['gbps']:>9.2f}x")
    print("  over the legacy runs right before and after, median of rounds: TCP_RR " + ", ".join(
        f"{n} {statistics.median(x['tps']):.3f}x" for n, x in paired.items()) + "; iperf3 " + ", ".join(
        f"{n} {statistics.median(x['gbps']):.3f}x" for n, x in paired.items()))
    for n, d in proof.items():
        shown = {k: v for k, v in d.items()
                 if k in ("redirect_peer", "redirect", "redirect_neigh", "pass_neigh_off", "out_route_cached",
                           "redirect_out")}
        print(f"  counters, last {n} round: {shown}")
    print("  packets through the node's netfilter FORWARD hook, last run of each (TCP_RR + iperf3): " + ", ".join(
        f"{n} {c}" for n, c in fwd_by.items()))
    if args.json:
        print(json.dumps({"results": results, "paired": paired, "medians": med, "proof": proof}))
    print(f"TCP_RR neigh+peer vs legacy: {med['neigh+peer']['tps'] / base['tps']:.2f} x "
          f"(paired: {statistics.median(paired['neigh+peer']['tps']):.2f} x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
