"""How long a service change takes to reach a BGP router through announce_bgp.

An in-process agent (files source on a temp manifests directory) runs the announce_bgp plugin
with its ExaBGP in a node namespace; bird2 runs in a router namespace linked by a veth (both
made by kpr.testing.netns, removed at the end). Times, from the moment a manifest file is
written (or removed):

- `to plugin`: until the plugin hands the change to its speaker (files source poll + store
  + bus: the agent's share);
- `acked`: until ExaBGP acknowledged the command;
- `at bird`: until `birdc show route` shows the route present / gone (end to end).

Then a bulk run: N LoadBalancer services in one file, until bird has all N routes, and until
all are gone after the file is removed. Goal: a single change end to end under 1 s.

    .venv/bin/python benchmarks/bench_announce_bgp.py [--rounds 10] [--bulk 500] [--poll 0.1] [--format json]

Needs root, bird2 and ExaBGP 5 (the venv's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from kpr.config import parse_config
from kpr.daemon import Agent
from kpr.testing.netns import Topology

NODE_IP, RTR_IP = "10.99.0.1", "10.99.0.2"

SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec:
  type: LoadBalancer
  ports: [{{port: 80, targetPort: 8080}}]
status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [10.244.0.9], nodeName: node1}}]
"""

BIRD = """
router id 10.99.0.2;
protocol device {}
protocol bgp node1 {
  local 10.99.0.2 as 64500;
  neighbor 10.99.0.1 as 64512;
  hold time 9;
  passive on;
  error wait time 1, 2;
  ipv4 { import all; export none; };
}
"""


def birdc(sock: Path, *args: str) -> str:
    return subprocess.run(["birdc", "-s", str(sock), *args], capture_output=True, text=True, timeout=10).stdout


def route_present(sock: Path, prefix: str) -> bool:
    return prefix in birdc(sock, "show", "route", prefix)


def route_count(sock: Path) -> int:
    # "N of N routes for N networks in table master4"
    for line in birdc(sock, "show", "route", "count").splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == "of" and parts[0].isdigit():
            return int(parts[0])
    return 0


def wait(cond, timeout: float, what: str, interval: float = 0.002) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if cond():
            return time.perf_counter()
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 1),
        "p90_ms": round(pct(values, 0.9) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--bulk", type=int, default=500)
    ap.add_argument("--poll", type=float, default=0.1, help="files source pollInterval (s)")
    ap.add_argument("--format", choices=["text", "json"], default="text")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, object] = {
        "machine": {"python": platform.python_version(), "kernel": platform.release()},
        "pollInterval_s": args.poll,
    }
    with tempfile.TemporaryDirectory(prefix="kpr-bench-bgp-") as tmp, Topology() as topo:
        tmp = Path(tmp)
        topo.add_node("node")
        topo.add_router("rtr")
        topo.link("node", "rtr", [f"{NODE_IP}/24"], [f"{RTR_IP}/24"])
        (tmp / "bird.conf").write_text(BIRD)
        sock = tmp / "bird.ctl"
        topo.popen("rtr", ["bird", "-f", "-c", str(tmp / "bird.conf"), "-s", str(sock)])
        wait(lambda: sock.exists() and "BIRD" in birdc(sock, "show", "status"), 10, "bird")

        manifests = tmp / "manifests"
        manifests.mkdir()
        cfg = parse_config(
            textwrap.dedent(
                f"""
                node: {{name: node1, addresses: [{NODE_IP}], devices: [lo]}}
                source: {{kind: files, path: {manifests}, statePath: {tmp}/alloc.json, pollInterval: {args.poll}}}
                service: {{clusterCIDR: [10.96.0.0/16]}}
                api: {{socket: {tmp}/kpr.sock}}
                metrics: {{address: ""}}
                agent: {{stateDir: {tmp}/state, shutdownTimeout: 5}}
                plugins:
                  announce_bgp:
                    enabled: true
                    localASN: 64512
                    routerID: {NODE_IP}
                    netns: {topo["node"].netns}
                    peers: [{{address: {RTR_IP}, asn: 64500, holdTime: 9}}]
                """
            )
        )
        agent = Agent(cfg)
        t0 = time.perf_counter()
        agent.setup()
        try:
            plugin = agent.kpm.handle("announce_bgp").plugin
            wait(lambda: plugin.speaker is not None and plugin.speaker.peers[RTR_IP].state == "up" and plugin.speaker.synced, 30, "session up")
            results["startup_to_session_up_ms"] = round((time.perf_counter() - t0) * 1000, 1)

            # Record when the plugin hands a change to its speaker.
            handed: dict[str, float] = {}
            original = plugin.speaker.update

            def update(changes):
                now = time.perf_counter()
                for (_, prefix) in changes:
                    handed.setdefault(prefix, now)
                return original(changes)

            plugin.speaker.update = update
            sp = plugin.speaker

            rows = {"announce": {"to_plugin": [], "acked": [], "at_bird": []}, "withdraw": {"to_plugin": [], "acked": [], "at_bird": []}}
            for i in range(args.rounds):
                ip = f"10.0.101.{i + 1}"
                prefix = f"{ip}/32"
                path = manifests / f"svc-{i}.yaml"
                for kind in ("announce", "withdraw"):
                    handed.pop(prefix, None)
                    start = time.perf_counter()
                    if kind == "announce":
                        tmpf = path.with_suffix(".tmp")
                        tmpf.write_text(SERVICE.format(name=f"svc-{i}", ip=ip))
                        tmpf.rename(path)
                        acked = wait(lambda: (RTR_IP, prefix) in sp.acked, 10, f"ack {prefix}", 0.0005)
                        seen = wait(lambda: route_present(sock, prefix), 10, f"{prefix} at bird")
                    else:
                        path.unlink()
                        acked = wait(lambda: (RTR_IP, prefix) not in sp.acked and sp.in_flight() == 0, 10, f"withdraw ack {prefix}", 0.0005)
                        seen = wait(lambda: not route_present(sock, prefix), 10, f"{prefix} gone at bird")
                    rows[kind]["to_plugin"].append(handed[prefix] - start)
                    rows[kind]["acked"].append(acked - start)
                    rows[kind]["at_bird"].append(seen - start)
                    time.sleep(0.05)
            results["single_change"] = {k: {m: summary(v) for m, v in r.items()} for k, r in rows.items()}

            # Bulk: N services in one file.
            base = route_count(sock)
            text = "".join(SERVICE.format(name=f"bulk-{n}", ip=f"10.1.{n // 250}.{n % 250 + 1}") + "---\n" for n in range(args.bulk))
            start = time.perf_counter()
            (manifests / "bulk.tmp").write_text(text)
            (manifests / "bulk.tmp").rename(manifests / "bulk.yaml")
            seen = wait(lambda: route_count(sock) >= base + args.bulk, 120, "bulk routes", 0.01)
            bulk_in = seen - start
            start = time.perf_counter()
            (manifests / "bulk.yaml").unlink()
            seen = wait(lambda: route_count(sock) <= base, 120, "bulk withdrawals", 0.01)
            bulk_out = seen - start
            results["bulk"] = {
                "services": args.bulk,
                "all_at_bird_s": round(bulk_in, 3),
                "all_gone_s": round(bulk_out, 3),
                "routes_per_s_in": round(args.bulk / bulk_in),
                "routes_per_s_out": round(args.bulk / bulk_out),
            }
        finally:
            agent.shutdown()

    if args.format == "json":
        print(json.dumps(results, indent=2))
        return 0
    print(f"announce_bgp: manifest change -> route at a bird2 peer (files pollInterval {args.poll}s, {args.rounds} rounds)")
    print(f"  agent start -> session up and synced: {results['startup_to_session_up_ms']} ms")
    print(f"  {'':10} {'stage':10} {'median':>9} {'p90':>9} {'max':>9}")
    for kind, stages in results["single_change"].items():
        for stage, s in stages.items():
            print(f"  {kind:10} {stage:10} {s['median_ms']:>7} ms {s['p90_ms']:>6} ms {s['max_ms']:>6} ms")
    b = results["bulk"]
    print(f"  bulk: {b['services']} services in one file: all at bird in {b['all_at_bird_s']} s ({b['routes_per_s_in']} routes/s), "
          f"all gone {b['all_gone_s']} s after the file is removed ({b['routes_per_s_out']} routes/s)")
    worst = max(s["at_bird"]["max_ms"] for s in results["single_change"].values())
    print(f"  goal: a single change at the router under 1000 ms: {'met' if worst < 1000 else 'NOT met'} (worst {worst} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
