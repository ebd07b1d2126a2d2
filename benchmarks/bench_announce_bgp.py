"""How long a service change takes to reach a BGP router through announce_bgp.

An in-process agent (files source on a temp manifests directory) runs the announce_bgp plugin
with its ExaBGP in a node namespace; bird2 runs in a router namespace linked by a veth (both
made by kpr.testing.netns, removed at the end). Times, from the moment a manifest file is
written (or removed):

- `to plugin`: until the plugin hands the change to its speaker (files source event or poll
  + store + bus: the agent's share);
- `acked`: until ExaBGP acknowledged the command;
- `at bird`: until `birdc show route` shows the route present / gone (end to end).

Then a bulk run: N LoadBalancer services in one file, until bird has all N routes, and until
all are gone after the file is removed. Two agents run one after the other against the same
router, with the default config: the polling baseline (the files source as before it watched
its directory: inotify replaced by a stand-in that refuses, so it polls every pollInterval)
and the watching source; each also measures its idle CPU (the process's CPU time over a
window with no change). Goals: a single change at the router under 100 ms at p99, idle CPU
no higher than the baseline's.

    .venv/bin/python benchmarks/bench_announce_bgp.py [--rounds 100] [--bulk 500] [--poll S] [--idle 10] [--format json]

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
import time
from pathlib import Path

from kpr.daemon import Agent
from kpr.sources.dirwatch import DirWatcher as _WATCHER
from kpr.sources.dirwatch import WatchUnavailable
from kpr.testing.agent import AgentConfig
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
        "p99_ms": round(pct(values, 0.99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


class _PollOnly:
    """Stands in for the files source's inotify watcher in the baseline run: the source then
    polls every pollInterval, as it did before it watched the directory."""

    def __init__(self, *_args: object) -> None:
        raise WatchUnavailable(0, "baseline run: polling only, as before inotify")


def run_agent(tmp: Path, topo: Topology, sock: Path, args: argparse.Namespace, watch: bool, bulk: int) -> dict[str, object]:
    """One agent (inotify watch on, or the polling baseline) through an idle CPU window, the
    single-change rounds and (bulk > 0) the bulk run; the router keeps running between agents."""
    from kpr.sources import files as files_source

    files_source.DirWatcher = _WATCHER if watch else _PollOnly  # type: ignore[misc]
    out: dict[str, object] = {}
    manifests = tmp / "manifests"
    manifests.mkdir(parents=True)
    # A service that stays: removing a round's file must not leave the directory empty, which
    # the default config (emptyGracePeriod 60 s) does not believe for a minute.
    (manifests / "anchor.yaml").write_text(SERVICE.format(name="anchor", ip="10.0.102.1"))
    cfg = AgentConfig(tmp, None, addresses=(NODE_IP,), poll_interval=args.poll,
                      extra={"service": {"clusterCIDR": ["10.96.0.0/16"]}})
    cfg.plugin("announce_bgp", localASN=64512, routerID=NODE_IP, netns=topo["node"].netns,
               peers=[{"address": RTR_IP, "asn": 64500, "holdTime": 9}])
    agent = Agent(cfg.parse())
    t0 = time.perf_counter()
    agent.setup()
    try:
        out["watch"] = agent.status()["source"].get("watch")
        plugin = agent.kpm.handle("announce_bgp").plugin
        wait(lambda: plugin.speaker is not None and plugin.speaker.peers[RTR_IP].state == "up" and plugin.speaker.synced, 30, "session up")
        out["startup_to_session_up_ms"] = round((time.perf_counter() - t0) * 1000, 1)

        # Idle: nothing changes; the agent's threads' CPU time over the window (this thread sleeps).
        time.sleep(1.0)
        c0, w0 = time.process_time(), time.perf_counter()
        time.sleep(args.idle)
        out["idle_cpu_pct"] = round((time.process_time() - c0) / (time.perf_counter() - w0) * 100, 3)

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
            ip = f"10.0.101.{i % 250 + 1}"
            prefix = f"{ip}/32"
            path = manifests / f"svc-{i}.yaml"
            for kind in ("announce", "withdraw"):
                handed.pop(prefix, None)
                # Changes land at spread-out points of the poll cycle, as real edits do.
                time.sleep(0.05 + (i * 0.037) % 0.5)
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
        out["single_change"] = {k: {m: summary(v) for m, v in r.items()} for k, r in rows.items()}

        if bulk:
            # Bulk: N services in one file.
            base = route_count(sock)
            text = "".join(SERVICE.format(name=f"bulk-{n}", ip=f"10.1.{n // 250}.{n % 250 + 1}") + "---\n" for n in range(bulk))
            start = time.perf_counter()
            (manifests / "bulk.tmp").write_text(text)
            (manifests / "bulk.tmp").rename(manifests / "bulk.yaml")
            seen = wait(lambda: route_count(sock) >= base + bulk, 120, "bulk routes", 0.01)
            bulk_in = seen - start
            start = time.perf_counter()
            (manifests / "bulk.yaml").unlink()
            seen = wait(lambda: route_count(sock) <= base, 120, "bulk withdrawals", 0.01)
            bulk_out = seen - start
            out["bulk"] = {
                "services": bulk,
                "all_at_bird_s": round(bulk_in, 3),
                "all_gone_s": round(bulk_out, 3),
                "routes_per_s_in": round(bulk / bulk_in),
                "routes_per_s_out": round(bulk / bulk_out),
            }
    finally:
        agent.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--bulk", type=int, default=500)
    ap.add_argument("--poll", type=float, default=None, help="files source pollInterval (s); default: the config's default")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of each idle CPU window")
    ap.add_argument("--format", choices=["text", "json"], default="text")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, object] = {
        "machine": {"python": platform.python_version(), "kernel": platform.release(), "load_before": os.getloadavg()},
        "pollInterval_s": args.poll if args.poll is not None else "default",
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
        # Side by side: the polling baseline (the source as before inotify), then the watching one.
        results["baseline_poll"] = run_agent(tmp / "poll", topo, sock, args, watch=False, bulk=0)
        results["inotify"] = run_agent(tmp / "watch", topo, sock, args, watch=True, bulk=args.bulk)
    results["machine"]["load_after"] = os.getloadavg()  # type: ignore[index]

    if args.format == "json":
        print(json.dumps(results, indent=2))
        return 0
    m = results["machine"]
    print(f"announce_bgp: manifest change -> route at a bird2 peer (files pollInterval {results['pollInterval_s']}, "
          f"{args.rounds} rounds; load average before {m['load_before']}, after {m['load_after']})")
    for mode in ("baseline_poll", "inotify"):
        r = results[mode]
        print(f" {mode} (source.watch={r['watch']}): agent start -> session up and synced {r['startup_to_session_up_ms']} ms, "
              f"idle CPU {r['idle_cpu_pct']}% of a core over {args.idle:g} s")
        print(f"  {'':10} {'stage':10} {'median':>9} {'p90':>9} {'p99':>9} {'max':>9}")
        for kind, stages in r["single_change"].items():
            for stage, s in stages.items():
                print(f"  {kind:10} {stage:10} {s['median_ms']:>7} ms {s['p90_ms']:>6} ms {s['p99_ms']:>6} ms {s['max_ms']:>6} ms")
    b = results["inotify"]["bulk"]
    print(f"  bulk: {b['services']} services in one file: all at bird in {b['all_at_bird_s']} s ({b['routes_per_s_in']} routes/s), "
          f"all gone {b['all_gone_s']} s after the file is removed ({b['routes_per_s_out']} routes/s)")
    worst = max(s["at_bird"]["p99_ms"] for s in results["inotify"]["single_change"].values())
    print(f"  goal: a single change at the router under 100 ms at p99: {'met' if worst < 100 else 'NOT met'} (worst p99 {worst} ms)")
    base_cpu, cpu = results["baseline_poll"]["idle_cpu_pct"], results["inotify"]["idle_cpu_pct"]
    print(f"  goal: idle CPU no higher than the polling baseline's: {'met' if cpu <= base_cpu else 'NOT met'} ({cpu}% vs {base_cpu}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
