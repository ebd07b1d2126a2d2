"""Socket-level load balancing against dialling the backend directly, and against a
kube-proxy-like iptables DNAT rule set, all inside namespaces this script makes.

Set-up (tests/kernel/socklb_env.py): a node namespace with backend pods and a client pod; the
client runs in a child cgroup carrying the socklb hooks. Measured from the client pod:

- connect(): time per TCP connect (handshake included) to the ClusterIP through socklb, to
  the backend address directly (with and without the hooks in the path), and to a ClusterIP
  DNATed by iptables in the node namespace behind --rules other services' rules. The rules
  are loaded only while the iptables variant runs: under kube-proxy every new connection
  through the node walks them, pod-to-pod ones included.
- request/response: 1-byte round trips over one established connection per variant, in
  batches taken in turn by one process (TCP_RR-like). Socket LB translated the connection
  once at connect(), so this should be ~1.0x direct.

Variants measured in one process alternate operation by operation (connect) or batch by
batch (round trips), so a busy machine slows them alike; runs alternate round by round.
Each figure is the median over rounds of the per-round median; the ratios are what compare
across machines.

    .venv/bin/python benchmarks/bench_socklb.py [--connects 2000] [--rr 20000] [--rounds 5] [--rules 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from socklb_env import PODS, PY, running  # noqa: E402

from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey  # noqa: E402
from kpr.testing.cgroup import run_in_cgroup  # noqa: E402

CLUSTER_IP = "10.96.0.10"  # served by socklb
IPT_IP = "10.96.9.10"  # served by iptables DNAT in the node namespace
BENCH_PORT = 9000  # accept-and-close server (connect latency)
ECHO_PORT = 9001  # echo server (request/response)

# In the backend pod: a connect sink and a 1-byte echo, each on its own thread.
SERVER = r"""
import socket, sys, threading
def sink():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9000)); s.listen(4096)
    while True:
        c, _ = s.accept(); c.close()
def echo_conn(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(1)
        if not d: return
        c.sendall(d)
def echo():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9001)); s.listen(64)
    while True:
        c, _ = s.accept(); threading.Thread(target=echo_conn, args=(c,), daemon=True).start()
threading.Thread(target=sink, daemon=True).start()
threading.Thread(target=echo, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# In the client pod: targets "name=host:port" measured in turn inside one process (connects
# one each in turn; round trips in batches of 200), so load on the machine hits them alike.
CLIENT = r"""
import json, socket, statistics, struct, sys, time
mode, n, targets = sys.argv[1], int(sys.argv[2]), [t.split("=") for t in sys.argv[3:]]
targets = [(name, (hp.rsplit(":", 1)[0], int(hp.rsplit(":", 1)[1]))) for name, hp in targets]
lat = {name: [] for name, _ in targets}
pc = time.perf_counter_ns
if mode == "connect":
    linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT to exhaust ports
    for _ in range(n):
        for name, addr in targets:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            t0 = pc(); s.connect(addr); lat[name].append(pc() - t0)
            s.close()
else:
    conns = {}
    for name, addr in targets:
        c = socket.create_connection(addr)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(200):
            c.send(b"x"); c.recv(1)
        conns[name] = c
    for _ in range(max(1, n // 200)):
        for name, c in conns.items():
            out = lat[name]
            for _ in range(200):
                t0 = pc(); c.send(b"x"); c.recv(1); out.append(pc() - t0)
res = {}
for name, v in lat.items():
    v.sort()
    res[name] = {"median": statistics.median(v), "p99": v[int(len(v) * 0.99)]}
print(json.dumps(res))
"""


def iptables_rules(rules: int, backend: str) -> str:
    """iptables-restore input: `rules` decoy services, then ours, kube-proxy style."""
    lines = ["*nat", ":KPR-SERVICES - [0:0]", "-A PREROUTING -j KPR-SERVICES", "-A OUTPUT -j KPR-SERVICES"]
    for i in range(rules):
        lines.append(f"-A KPR-SERVICES -d 10.97.{i // 250}.{i % 250 + 1}/32 -p tcp --dport 80 -j DNAT --to-destination 10.244.9.9:80")
    for port, target in ((BENCH_PORT, BENCH_PORT), (ECHO_PORT, ECHO_PORT)):
        lines.append(f"-A KPR-SERVICES -d {IPT_IP}/32 -p tcp --dport {port} -j DNAT --to-destination {backend}:{target}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connects", type=int, default=2000, help="connects per variant and round")
    ap.add_argument("--rr", type=int, default=20000, help="round trips per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rules", type=int, default=1000, help="decoy services ahead of ours in the iptables set")
    ap.add_argument("--format", choices=["text", "json"], default="text")
    args = ap.parse_args()

    backend = PODS["be1"][0]
    # socklb_env's set-up (private bpffs, node with pods, child cgroup, writer, the plugin).
    with running("kpr-bench-socklb", bindProtection=False) as env:
        topo, cg = env.topo, env.cgroup
        proc = topo.popen("be1", [PY, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        svc = Service(
            ServiceKey("bench", "bench"),
            tuple(
                Frontend(FrontendType.CLUSTER_IP, CLUSTER_IP, port, Protocol.TCP, (Backend(backend, port, local=True),))
                for port in (BENCH_PORT, ECHO_PORT)
            ),
        )
        env.apply(svc)
        node_ns = topo["node"].netns

        def iptables(rules: int | None) -> subprocess.CompletedProcess[str]:
            # Loaded only while the iptables variant runs: in the node namespace every new
            # connection, DNATed or not, walks the chain, as under kube-proxy.
            text = iptables_rules(rules, backend) if rules is not None else "*nat\nCOMMIT\n"
            return subprocess.run(["ip", "netns", "exec", node_ns, "iptables-restore"], input=text,
                                  capture_output=True, text=True)

        have_ipt = iptables(args.rules).returncode == 0 and iptables(None).returncode == 0
        if not have_ipt:
            print(f"(iptables variant skipped: {iptables(args.rules).stderr.strip()})", file=sys.stderr)

        def run(mode: str, n: int, port: int, targets: dict[str, str], hooks: bool) -> dict:
            argv = [PY, "-c", CLIENT, mode, str(n), *(f"{k}={v}:{port}" for k, v in targets.items())]
            if hooks:
                return json.loads(run_in_cgroup(cg, argv, topo["cli"], timeout=900).stdout)
            return json.loads(topo.run("cli", argv, timeout=900).stdout)

        def with_rules(fn):  # noqa: ANN001, ANN202
            if not have_ipt:
                return fn()
            iptables(args.rules)
            try:
                return fn()
            finally:
                iptables(None)

        # connect: socklb and direct+hooks share one process in the cgroup (their ratio is the
        # translation's own cost); direct runs outside the cgroup; iptables with its rules loaded.
        connect_runs = [
            lambda n: run("connect", n, BENCH_PORT, {"socklb": CLUSTER_IP, "direct+hooks": backend}, True),
            lambda n: run("connect", n, BENCH_PORT, {"direct": backend}, False),
        ]
        # request/response: all on established connections in one process; the hooks are not
        # on this path any more, and the rules only matter to new connections.
        rr_targets = {"socklb": CLUSTER_IP, "direct": backend}
        if have_ipt:
            connect_runs.append(lambda n: with_rules(lambda: run("connect", n, BENCH_PORT, {"iptables": IPT_IP}, False)))
            rr_targets["iptables"] = IPT_IP
        rr_runs = [lambda n: with_rules(lambda: run("rr", n, ECHO_PORT, rr_targets, True))]
        results: dict[str, dict[str, list[dict]]] = {"connect": {}, "rr": {}}
        for mode, runs, n in (("connect", connect_runs, args.connects), ("rr", rr_runs, args.rr)):
            for r in runs:  # warm-up
                r(max(200, n // 20))
            for _ in range(args.rounds):
                for r in runs:
                    for name, row in r(n).items():
                        results[mode].setdefault(name, []).append(row)
        stats = env.plugin.stats()

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode, per in results.items():
        summary[mode] = {}
        for v, rows in per.items():
            summary[mode][v] = {
                "median_us": statistics.median(r["median"] for r in rows) / 1e3,
                "p99_us": statistics.median(r["p99"] for r in rows) / 1e3,
            }
        base = summary[mode]["direct"]["median_us"]
        for v in per:
            summary[mode][v]["ratio_vs_direct"] = summary[mode][v]["median_us"] / base
    machine = {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if args.format == "json":
        print(json.dumps({"machine": machine, "args": vars(args), "results": summary, "datapath": stats}, indent=2))
        return 0
    print(f"socklb benchmark on kernel {machine['kernel']}, {machine['cpus']} CPUs, client in a pod namespace")
    print(f"{args.rounds} rounds; connect: {args.connects} per round; request/response: {args.rr} per round; "
          f"iptables variant behind {args.rules} decoy services")
    for mode, title in (("connect", "TCP connect() (handshake included)"), ("rr", "1-byte request/response on one connection")):
        print(f"\n{title}")
        print(f"  {'variant':<14} {'median us':>10} {'p99 us':>10} {'vs direct':>10}")
        for v, row in summary[mode].items():
            print(f"  {v:<14} {row['median_us']:>10.2f} {row['p99_us']:>10.2f} {row['ratio_vs_direct']:>9.2f}x")
    c = summary["connect"]
    print(f"\nconnect, socklb / direct+hooks (same process, hook hit vs miss): "
          f"{c['socklb']['median_us'] / c['direct+hooks']['median_us']:.2f}x")
    print(f"datapath counters: connect={stats['connect']} (translations), no_backend={stats['no_backend']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
