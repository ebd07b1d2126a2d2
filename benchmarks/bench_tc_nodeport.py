"""tc_nodeport: the per-packet cost of its tc programs, and end-to-end NodePort / LoadBalancer
traffic against dialling the backend directly and against a kube-proxy-shaped iptables rule set.
Everything runs in namespaces this script makes (tests/kernel/tc_nodeport_env.py).

1. BPF_PROG_TEST_RUN on the ingress program in a lab namespace of its own
   (kpr.testing.nodeport_bench, shared with bench_xdp_nodeport.py): against a bare
   `return TC_ACT_OK`, by the restoring wrapper (repeat=N, ns above bare) and by repeat=1 calls
   (ratio to bare); established and new flows to a remote backend (SNAT) and a local one,
   traffic for no service, new flows over every frontend at 10 / 10k / 50k services, a
   per-stage table and the optimisation switches on and off (the shared table,
   kpr.testing.nodeport_bench.SWITCHES, KPR_NP_EARLY_PARSE=0 among them); the
   program's counters prove the path of every case.
2. End to end from the external client: TCP connection rate (connect, read a line, close),
   1-byte request/response over one connection, and iperf3 throughput, to
     - the pod directly (through the same nodes; kpr's programs see the packets and pass them)
     - node1's NodePort -> pod on node1 (kpr: DNAT + redirect_peer)
     - a LoadBalancer IP -> pod on node2 by SNAT, and by DSR (vs that pod directly)
     - the same through iptables DNAT in node1 shaped like kube-proxy's (KUBE-SERVICES with
       --rules decoy services, KUBE-NODEPORTS, KUBE-SVC/KUBE-SEP chains, KUBE-MARK-MASQ for
       the remote backend), with kpr's programs still attached but not serving those ports.

3. Control plane: what one service change costs the NodePort facility (the state
   tc_nodeport's programs read: frontend ports, announced addresses, modes), as blocks of 1000
   LoadBalancer services applied one service at a time on top of 0 and of 8000 services
   already known (the goal: the same cost, within 1.2x), medians over --upsert-rounds, and
   every block of a climb from 0 to 9000 (it used to grow block by block: 0.18 s to 1.98 s).

    .venv/bin/python benchmarks/bench_tc_nodeport.py [--runs 20000] [--services 10,10000,50000] [--no-e2e]
        [--connects 1000] [--rr 5000] [--rounds 3] [--upserts-only | --no-upserts] [--upsert-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from tc_nodeport_env import NODES, PODS, PY, Cluster, backends, cluster  # noqa: E402

from kpr.model import Frontend, FrontendType, Protocol, Service, ServiceKey  # noqa: E402
from kpr.plugins.tc_nodeport import datapath as D  # noqa: E402
from kpr.testing.nodeport_bench import add_arguments, print_summary, run_from_args  # noqa: E402

N1 = NODES["node1"]["addr"]
VIP_SNAT, VIP_DSR = "203.0.113.40", "203.0.113.41"
NP_KPR, NP_IPT_LOCAL, NP_IPT_REMOTE = 30080, 30091, 30092
IPERF_PORT = 5201

# Client loops, printed as one JSON line: connection rate and request/response latency.
CLIENT_BENCH = r"""
import json, socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def line(s):
    d = b""
    while not d.endswith(b"\n"):
        c = s.recv(256)
        if not c:
            raise OSError("closed")
        d += c
if mode == "crr":
    t0 = time.perf_counter()
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        line(s)
        s.close()
    dt = time.perf_counter() - t0
    print(json.dumps({"per_s": n / dt}))
else:
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line(s)
    t0 = time.perf_counter()
    for _ in range(n):
        s.sendall(b"x")
        if not s.recv(1):
            raise OSError("closed")
    dt = time.perf_counter() - t0
    print(json.dumps({"us": dt / n * 1e6}))
"""


def svc(name: str, fe_type: FrontendType, addr_of: Callable[[str], str], port: int, pod: str, target: int = 8080,
        mode: str = "") -> Callable[[str], Service]:
    ann = (("service.kpr.io/lb-mode", mode),) if mode else ()

    def make(node: str) -> Service:
        bes = tuple(b.__class__(b.address, target, node_name=b.node_name, local=b.local) for b in backends(node, pod))
        return Service(ServiceKey("bench", name), (Frontend(fe_type, addr_of(node), port, Protocol.TCP, bes),), annotations=ann)

    return make


def iptables_rules(rules: int) -> str:
    """kube-proxy's shape: KUBE-SERVICES walks ClusterIPs, then KUBE-NODEPORTS for local addresses."""
    p1, p2 = PODS["p1a"][1], PODS["p2a"][1]
    out = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
           ":KUBE-MARK-MASQ - [0:0]", "-A PREROUTING -j KUBE-SERVICES", "-A POSTROUTING -j KUBE-POSTROUTING",
           "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
           "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
           "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
           "-A KUBE-POSTROUTING -j MASQUERADE"]
    for i in range(rules):
        svc_chain, sep = f"KUBE-SVC-D{i:05d}", f"KUBE-SEP-D{i:05d}"
        out += [f":{svc_chain} - [0:0]", f":{sep} - [0:0]",
                f"-A KUBE-SERVICES -d 10.97.{i // 250}.{i % 250 + 1}/32 -p tcp --dport 80 -j {svc_chain}",
                f"-A {svc_chain} -j {sep}", f"-A {sep} -p tcp -j DNAT --to-destination 10.244.9.9:80"]
    for name, port, dest, masq in (("LOCAL", NP_IPT_LOCAL, p1, False), ("REMOTE", NP_IPT_REMOTE, p2, True),
                                   ("LOCALPERF", NP_IPT_LOCAL + 100, p1, False), ("REMOTEPERF", NP_IPT_REMOTE + 100, p2, True)):
        target = IPERF_PORT if "PERF" in name else 8080
        out += [f":KUBE-SVC-{name} - [0:0]", f":KUBE-SEP-{name} - [0:0]",
                f"-A KUBE-NODEPORTS -p tcp --dport {port} -j KUBE-SVC-{name}"]
        if masq:
            out.append(f"-A KUBE-SVC-{name} -j KUBE-MARK-MASQ")
        out += [f"-A KUBE-SVC-{name} -j KUBE-SEP-{name}",
                f"-A KUBE-SEP-{name} -p tcp -j DNAT --to-destination {dest}:{target}"]
    out += ["-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS", "COMMIT"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- 2. end to end


def client_bench(c: Cluster, mode: str, host: str, port: int, n: int) -> float:
    res = c.topo.run("cl", [PY, "-c", CLIENT_BENCH, mode, host, str(port), str(n)], timeout=600)
    v = json.loads(res.stdout.strip().splitlines()[-1])
    return float(v["per_s"] if mode == "crr" else v["us"])


def iperf(c: Cluster, host: str, port: int, seconds: float) -> float:
    # whole seconds: iperf3 reads -t as an integer, and 0 means "forever"
    secs = str(max(1, round(seconds)))
    res = c.topo.run("cl", ["iperf3", "-c", host, "-p", str(port), "-t", secs, "-J"], timeout=120, check=False)
    if res.returncode != 0:
        return float("nan")
    return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def end_to_end(args: argparse.Namespace) -> None:
    with cluster(second_device=False, conntrack_size=65536) as c:
        c.apply(svc("np", FrontendType.NODE_PORT, lambda n: NODES[n]["addr"], NP_KPR, "p1a"))
        c.apply(svc("snat", FrontendType.LOAD_BALANCER, lambda n: VIP_SNAT, 80, "p2a"))
        c.apply(svc("dsr", FrontendType.LOAD_BALANCER, lambda n: VIP_DSR, 80, "p2a", mode="dsr"))
        c.apply(svc("np-perf", FrontendType.NODE_PORT, lambda n: NODES[n]["addr"], NP_KPR + 100, "p1a", target=IPERF_PORT))
        c.apply(svc("snat-perf", FrontendType.LOAD_BALANCER, lambda n: VIP_SNAT, IPERF_PORT, "p2a", target=IPERF_PORT))
        c.apply(svc("dsr-perf", FrontendType.LOAD_BALANCER, lambda n: VIP_DSR, IPERF_PORT, "p2a", target=IPERF_PORT, mode="dsr"))
        for pod in ("p1a", "p2a"):
            c.topo.popen(pod, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        ipt = subprocess.run(["ip", "netns", "exec", c.topo["node1"].netns, "iptables-restore"], input=iptables_rules(args.rules),
                             capture_output=True, text=True)
        have_ipt = ipt.returncode == 0
        if not have_ipt:
            print(f"(iptables variants skipped: {ipt.stderr.strip()})", file=sys.stderr)
        time.sleep(0.5)

        p1, p2 = PODS["p1a"][1], PODS["p2a"][1]
        targets: dict[str, tuple[str, int, int]] = {  # name -> (host, port, iperf port)
            "direct to pod on node1": (p1, 8080, IPERF_PORT),
            "NodePort -> node1 pod (kpr)": (N1, NP_KPR, NP_KPR + 100),
            "direct to pod on node2": (p2, 8080, IPERF_PORT),
            "LB IP -> node2 pod, SNAT (kpr)": (VIP_SNAT, 80, IPERF_PORT),
            "LB IP -> node2 pod, DSR (kpr)": (VIP_DSR, 80, IPERF_PORT),
        }
        if have_ipt:
            targets["NodePort -> node1 pod (iptables)"] = (N1, NP_IPT_LOCAL, NP_IPT_LOCAL + 100)
            targets["NodePort -> node2 pod (iptables, masq)"] = (N1, NP_IPT_REMOTE, NP_IPT_REMOTE + 100)
        crr: dict[str, list[float]] = {k: [] for k in targets}
        rr: dict[str, list[float]] = {k: [] for k in targets}
        bw: dict[str, list[float]] = {k: [] for k in targets}
        # a short unrecorded pass first: neighbour entries, page cache, Python start-up
        for name, (host, port, pport) in targets.items():
            client_bench(c, "crr", host, port, 20)
            iperf(c, host, pport, 1)
        for _ in range(args.rounds):
            for name, (host, port, pport) in targets.items():
                crr[name].append(client_bench(c, "crr", host, port, args.connects))
                rr[name].append(client_bench(c, "rr", host, port, args.rr))
                bw[name].append(iperf(c, host, pport, args.iperf_seconds))
        med = statistics.median
        base = {"node1": "direct to pod on node1", "node2": "direct to pod on node2"}
        print(f"\n== end to end from the external client ({args.rounds} rounds, medians; iptables behind "
              f"{args.rules} decoy services)")
        print(f"  {'path':40s} {'conn/s':>9s} {'ratio':>6s} {'RR us':>8s} {'ratio':>6s} {'Gbit/s':>7s} {'ratio':>6s}")
        for name in targets:
            ref = base["node2"] if ("node2" in name) else base["node1"]
            c_, r_, b_ = med(crr[name]), med(rr[name]), med(bw[name])
            print(f"  {name:40s} {c_:9.0f} {c_ / med(crr[ref]):6.2f} {r_:8.1f} {r_ / med(rr[ref]):6.2f} "
                  f"{b_:7.2f} {b_ / med(bw[ref]):6.2f}")
        st = c.stats("node1")
        print(f"\n  node1 counters: new_local={st['new_local']} new_snat={st['new_snat']} new_dsr={st['new_dsr']} "
              f"established={st['established']} drops={sum(st[k] for k in D.DROP_STATS)}")


def _lb_block(first: int, n: int) -> list[Service]:
    """n LoadBalancer services, each its own announced address (198.18.0.0/15) on port 80."""
    out = []
    for i in range(first, first + n):
        vip = f"198.18.{i >> 8 & 0xFF}.{i & 0xFF}" if i < 65536 else f"198.19.{i >> 8 & 0xFF}.{i & 0xFF}"
        be = backends("node1", "p1a")
        fe = Frontend(FrontendType.LOAD_BALANCER, vip, 80, Protocol.TCP, be)
        out.append(Service(ServiceKey("bench", f"lb{i}"), (fe,)))
    return out


def upserts(args: argparse.Namespace) -> None:
    """Part 3: one service change at a time into a NodePort facility of its own (scratch bpffs,
    a namespace of its own; the service map writer's maps exist, no program is loaded: the
    facility's share of an upsert is what is measured)."""
    import logging

    from kpr.bpf.cleanup import scratch_pin_dir
    from kpr.config import KprConfig
    from kpr.context import PluginContext
    from kpr.model import NodeInfo
    from kpr.nodeport.facility import NodePortFacility, Settings
    from kpr.servicemaps import ServiceMapWriter
    from kpr.testing.netns import Topology
    from kpr.testing.nodeport_bench import uptime

    block = 1000

    def timed(fac: NodePortFacility, services: list[Service]) -> float:
        t0 = time.perf_counter()
        for sv in services:
            fac.kpr_service_upsert(sv)
        return time.perf_counter() - t0

    print(f"== NodePort facility: per-service upserts, blocks of {block} LoadBalancer services; {uptime()}")
    with scratch_pin_dir("kpr-bench-npfac") as pin, Topology() as topo:
        topo.add_node("n")
        writer = ServiceMapWriter(pin).open()
        ctx = PluginContext(name="nodeport", node=NodeInfo("n", addresses=("10.0.1.10",), devices=()),
                            log=logging.getLogger("kpr.nodeport"),
                            config=KprConfig.model_validate({"bpf": {"pinPath": str(pin)}}), state_dir=pin)
        fac = NodePortFacility(Settings(conntrack_size=131072))  # the writer's default kpr_ct size
        fac.kpr_configure(None, ctx)
        try:
            with topo["n"].enter():
                fac.kpr_start(ctx)
            fac.kpr_sync_complete()
            base = _lb_block(0, 8000)
            extra = _lb_block(8000, block)
            timed(fac, extra)  # warm-up, not counted (first map inserts, allocations)
            for sv in extra:
                fac.kpr_service_delete(sv.key)
            on0, on8k = [], []
            for _ in range(args.upsert_rounds):
                on0.append(timed(fac, extra))  # nothing else known
                for sv in extra:
                    fac.kpr_service_delete(sv.key)
                timed(fac, base)
                on8k.append(timed(fac, extra))  # 8000 known
                for sv in base + extra:
                    fac.kpr_service_delete(sv.key)
            m0, m8 = statistics.median(on0), statistics.median(on8k)
            print(f"  1000 on top of 0:    median {m0 * 1000:7.1f} ms  (runs: {', '.join(f'{x * 1000:.0f}' for x in on0)})")
            print(f"  1000 on top of 8000: median {m8 * 1000:7.1f} ms  (runs: {', '.join(f'{x * 1000:.0f}' for x in on8k)})")
            print(f"  ratio 8000/0: {m8 / m0:.2f} (goal: within 1.2)")
            climb = [timed(fac, _lb_block(i * block, block)) for i in range(9)]
            print("  climb 0 -> 9000, each block: " + ", ".join(f"{x:.3f} s" for x in climb))
            print(f"  after: {uptime()}")
        finally:
            fac.kpr_stop(ctx)
            writer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--no-e2e", action="store_true", help="only the BPF_PROG_TEST_RUN part")
    ap.add_argument("--connects", type=int, default=1000, help="TCP connections per variant per round")
    ap.add_argument("--rr", type=int, default=5000, help="1-byte round trips per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iperf-seconds", type=int, default=2)
    ap.add_argument("--rules", type=int, default=1000, help="decoy services in the iptables rule set")
    ap.add_argument("--upserts-only", action="store_true", help="only part 3, the per-service upsert cost")
    ap.add_argument("--upsert-rounds", type=int, default=5, help="rounds of part 3 (medians over them)")
    ap.add_argument("--no-upserts", action="store_true", help="skip part 3 (the per-packet figures alone)")
    args = ap.parse_args()

    if not args.no_upserts:
        upserts(args)
    if args.upserts_only:
        return 0
    summary = run_from_args("tc", args)
    if not args.no_e2e:
        end_to_end(args)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
