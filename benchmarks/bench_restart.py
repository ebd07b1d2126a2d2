"""Agent restarts under traffic: failed connections and the longest gap in SERVICE per kind of
restart, with the data path left attached on stop (pinned BPF links, the default) against
detaching on stop (keepAttachedOnStop: false, kpr's behaviour before links).

The real `kpr run` runs in a namespace this script makes (tests/kernel/socklb_env.py's
AgentRig) and is restarted `--rounds` times each way: SIGTERM then start, SIGKILL then start,
and (links kept) an upgrade: SIGTERM, then a start whose config changes a compile flag
(socklb_env.UPGRADE_KEYS), so the new agent compiles and loads other programs into the same
links. A "none" row is the same load with no restart at all (windows of
socklb_env.IDLE_WINDOW s): the noise floor of every other row. Paths:

- socklb: a pod in the hooks' child cgroup dials a ClusterIP;
- tc_nodeport: an external client dials a NodePort on node1 (a local and a remote backend,
  tests/kernel/tc_nodeport_env.py's topology);
- xdp_nodeport: the same client dials the NodePort through node1's XDP program (native mode
  on its veth, two remote backends, so SNAT in XDP; the router's side has an XDP_PASS program
  so redirected frames arrive, as tests/kernel/test_xdp_nodeport.py sets it up).

How a gap in service is measured (new). A stretch of time during which a connection attempt
would fail or stall is a gap in service; a client that merely starts its attempts late is
not one. On this two-CPU machine, with the new agent compiling and other processes running,
a normal-priority client that starts a thread per attempt misses its 10 ms ticks by 15-25 ms
with no restart at all, so "the longest time without a connect starting" (the old measure)
is mostly the client's own scheduling. The probe (kpr.testing.restart_probe) is one process
at SCHED_FIFO priority (`--prio`), single-threaded with non-blocking sockets, on a fixed
10 ms schedule; it timestamps (CLOCK_MONOTONIC) each attempt's start, its completed TCP
handshake and the backend's greeting, and echoes a byte every tick on one held connection.
Per restart, from the signal until 0.3 s after the new agent is ready:
  failed       attempts that failed (1 s timeout, as before);
  connect ms   the longest handshake: a data path that stalls shows here whole;
  interval ms  the longest interval between successive completed handshakes (from the last
               one before the window to the first after): its floor is the 10 ms spacing
               itself; a stall of d shows as 10 + d;
  answer ms    the longest handshake + greeting (the backend process's scheduling too);
  echo ms      the longest echo on the held connection;
  late ms      the probe's own longest lateness starting an attempt (its jitter, measured).
An interval is the two attempts' start spacing plus the difference of their handshakes: with
handshakes under a millisecond, what an interval has over 10 ms is the probe starting late
(late ms; at SCHED_FIFO it still waits out non-preemptible kernel work on this PREEMPT_NONE
kernel, and the VM's vCPUs: up to tens of ms at load average 8-10, restart or not), a stretch
it could not look at, not a stall it saw; the "none" rows give that floor.
The old measure is kept beside it, from the old client (socklb_env.LOAD: a thread per
attempt, normal priority) running at the same time against the same service: "old gap"
(the longest time without a successful connect starting) and "old slowest" (its slowest
successful connect). Figures are medians over rounds (max beside the main ones); the load
average is printed per path. With detach on stop, a SIGKILL leaves the links pinned as well
(nothing runs to detach them), so its row equals the default's.

    .venv/bin/python benchmarks/bench_restart.py [--rounds 3] [--gap 0.01] [--prio 10]
        [--paths socklb,tc_nodeport,xdp_nodeport] [--no-detach]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from socklb_env import (  # noqa: E402
    RESTART_IP, UPGRADE_KEYS, Window, longest_gap, restart_rig, restarts_under_load, slowest,
)
from tc_nodeport_env import (  # noqa: E402
    NODES, NP_RESTART_PORT, dev_with, full_checksums, nodeport_restart_rig, peer_pass,
)

from kpr.testing.restart_probe import start_probe, window  # noqa: E402

KINDS = ("none", "SIGTERM", "SIGKILL", "upgrade")  # with links kept; detach on stop: the two signals
PATHS = ("socklb", "tc_nodeport", "xdp_nodeport")


@contextlib.contextmanager
def rig_for(path: str, keep: bool):
    """The restart rig of `path`, its upgrade set, and the address the clients dial."""
    tag = f"{os.getpid()}{'k' if keep else 'd'}"
    node1 = NODES["node1"]["addr"]
    if path == "socklb":
        with restart_rig(f"kpr-bench-rs{tag}", keep_attached=keep) as rig:
            yield rig, (RESTART_IP, 80)
    elif path == "tc_nodeport":
        with nodeport_restart_rig(f"kpr-bench-np{tag}", keep_attached=keep) as rig:
            rig.upgrade_with(UPGRADE_KEYS[path])
            yield rig, (node1, NP_RESTART_PORT)
    elif path == "xdp_nodeport":
        # Two remote backends: each sees one client's rate (100 new flows/s), as tc_nodeport's
        # remote one does. One backend would take both clients' 200/s, and a backend's SNAT ports
        # (61000-65535) are only freed by the agent's collector (every 10 s, 10 s after close):
        # past ~4000 flows in that time new flows are refused, with or without a restart.
        with nodeport_restart_rig(f"kpr-bench-xnp{tag}", keep_attached=keep, plugin="xdp_nodeport",
                                  pods=("p2a", "p2b"), section={"xdpMode": "native"}) as rig:
            rig.upgrade_with(UPGRADE_KEYS[path])
            full_checksums(rig.topo, "cl", "p2a", "p2b")
            with peer_pass(rig.topo, "rt", dev_with(rig.topo, "rt", NODES["node1"]["rt"])):
                yield rig, (node1, NP_RESTART_PORT)
    else:
        raise SystemExit(f"unknown path {path!r} (one of {', '.join(PATHS)})")


def run(path: str, keep: bool, rounds: int, gap: float, prio: int) -> dict:
    kinds = KINDS if keep else ("SIGTERM", "SIGKILL")
    loads = [os.getloadavg()[0]]
    with rig_for(path, keep) as (rig, target):
        rig.start()
        probe = start_probe(rig.topo, rig.load_ns, *target, cgroup=rig.load_cgroup, gap=gap, prio=prio)
        try:
            t_begin = time.monotonic()
            res, windows = restarts_under_load(rig, *target, rounds=rounds, gap=gap, kinds=kinds,
                                               after_start=lambda: loads.append(os.getloadavg()[0]))
            t_end = time.monotonic()
        finally:
            rec = probe.finish()
        rig.stop(signal.SIGTERM)
    loads.append(os.getloadavg()[0])
    out: dict = {"attempts": res["attempts"], "rate": res["attempts"] / (t_end - t_begin), "held": res["held"],
                 "probe": rec, "loads": loads, "kinds": {}, "windows": [w.__dict__ for w in windows], "old": res}

    def inside(t: float, w: Window) -> bool:
        return w.start <= t <= w.end

    for name in kinds:
        rows = [w for w in windows if w.kind == name]
        figs = [window(rec, w.start, w.end, gap) for w in rows]
        k = {key: [f[key] for f in figs] for key in figs[0] if key != "errors"}
        k["errors"] = sorted({e for f in figs for e in f["errors"]})
        k["old_failed"] = [sum(1 for t, _e in res["failed"] if inside(t, w)) for w in rows]
        k["old_gap_ms"] = [longest_gap(res["ok"], w.start, w.end) * 1e3 for w in rows]
        k["old_slowest_ms"] = [slowest(res["ok"], w.start, w.end) * 1e3 for w in rows]
        k["ready_s"] = [w.ready for w in rows]
        out["kinds"][name] = k
    out["failed_outside"] = sum(1 for a in rec["attempts"] if a[4] and not any(inside(a[1], w) for w in windows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.01)
    ap.add_argument("--prio", type=int, default=10, help="the probe's SCHED_FIFO priority (0: normal priority)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--detach", action=argparse.BooleanOptionalAction, default=True,
                    help="also the rows with detach on stop (kpr before links)")
    ap.add_argument("--raw", type=Path, help="also write every record (probe, old client, windows) here as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, cgroups, BPF, SCHED_FIFO)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"load: the probe (a new TCP connection every {args.gap * 1e3:.0f} ms, one held connection echoing every "
          f"tick, SCHED_FIFO {args.prio}) and the old client (the same, threads, normal priority) at once; "
          f"{args.rounds} restarts of each kind per row; failed: the sum over them, else medians (max after /)\n")
    head = (f"{'path':<12} {'on stop':<13} {'restart':<8} {'failed':>6} {'connect ms':>11} {'interval ms':>12} "
            f"{'answer ms':>10} {'echo ms':>8} {'late ms':>8} | {'old failed':>10} {'old gap ms':>11} "
            f"{'old slowest':>11} {'ready s':>7}  errors")
    print(head)
    print("-" * len(head))
    summary = []
    raw: dict = {}

    def med_max(xs: list[float], w: int) -> str:
        return f"{statistics.median(xs):.1f}/{max(xs):.1f}".rjust(w)

    for path in args.paths.split(","):
        for keep in (True, False) if args.detach else (True,):
            r = run(path, keep, args.rounds, args.gap, args.prio)
            raw[f"{path} {'keep' if keep else 'detach'}"] = r
            mode = "stay attached" if keep else "detach (old)"
            for kind, k in r["kinds"].items():
                print(f"{path:<12} {mode:<13} {kind:<8} {sum(k['failed']):>6} {med_max(k['connect_ms'], 11)} "
                      f"{med_max(k['interval_ms'], 12)} {statistics.median(k['answer_ms']):>10.1f} "
                      f"{statistics.median(k['echo_ms']):>8.1f} {max(k['late_ms']):>8.1f} | "
                      f"{sum(k['old_failed']):>10} {med_max(k['old_gap_ms'], 11)} "
                      f"{statistics.median(k['old_slowest_ms']):>11.1f} {statistics.median(k['ready_s']):>7.2f}  "
                      f"{','.join(k['errors']) or '-'}", flush=True)
            p = r["probe"]
            held = "unbroken" if not r["held"]["error"] else f"broken: {r['held']['error']}"
            pheld = "unbroken" if not p["held"] else f"broken: {p['held']}"
            summary.append(
                f"{path}, {mode}: load average {min(r['loads']):.2f}-{max(r['loads']):.2f}; probe ({p['prio']}) "
                f"{len(p['attempts'])} connections, held connection {pheld} ({len(p['echoes'])} echoes), failures "
                f"outside restarts: {r['failed_outside']}; old client {r['attempts']} at {r['rate']:.0f}/s, held "
                f"connection {held} ({r['held']['echoes']} echoes)")
    print()
    for line in summary:
        print(line)
    if args.raw:
        args.raw.write_text(json.dumps(raw))


if __name__ == "__main__":
    main()
