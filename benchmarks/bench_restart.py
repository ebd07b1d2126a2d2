"""Agent restarts under traffic: failed connections and the longest gap in service per kind of
restart, with the data path left attached on stop (pinned BPF links, the default) against
detaching on stop (keepAttachedOnStop: false, kpr's behaviour before links).

The real `kpr run` runs in a namespace this script makes (tests/kernel/socklb_env.py's
AgentRig) and is restarted `--rounds` times each way: SIGTERM then start, SIGKILL then start,
and (links kept) an upgrade: SIGTERM, then a start whose config changes a compile flag
(socklb_env.UPGRADE_KEYS), so the new agent loads other programs into the same links. A
"none" row is the same load with no restart at all (windows of socklb_env.IDLE_WINDOW s): the
gaps the client shows on its own on this machine, the floor of every other row. Meanwhile a
client (socklb_env.LOAD) opens a new TCP connection every `--gap` seconds (each reads the
backend's greeting) and holds one more connection, echoing a byte every `--gap`:

- socklb: a pod in the hooks' child cgroup dials a ClusterIP;
- tc_nodeport: an external client dials a NodePort on node1 (a local and a remote backend,
  tests/kernel/tc_nodeport_env.py's topology).

Per restart, from the moment the signal is sent until 0.3 s after the new agent is ready:
failed connections, the longest time without a successful connect starting ("gap"; 10 ms is
the load's own spacing) and the slowest successful connect. Attempts start on their own clock
whatever the others do, so with no failure a gap is the client itself starting late: a CPU
busy elsewhere (the new agent's start, other processes), not a service outage; "load %" is
the attempts the client managed to start in the window against one per gap. Figures are
medians over rounds; the load average is printed with them. With detach on stop, a SIGKILL
leaves the links pinned as well (nothing runs to detach them), so its row equals the
default's; the agent before links attached a second copy there instead (issue 11).

    .venv/bin/python benchmarks/bench_restart.py [--rounds 3] [--gap 0.01] [--paths socklb,tc_nodeport] [--no-detach]
"""

from __future__ import annotations

import argparse
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
from tc_nodeport_env import NODES, NP_RESTART_PORT, nodeport_restart_rig  # noqa: E402

KINDS = ("none", "SIGTERM", "SIGKILL", "upgrade")  # with links kept; detach on stop: the two signals


def run(path: str, keep: bool, rounds: int, gap: float) -> dict:
    if path == "socklb":
        rig_cm, target = restart_rig("kpr-bench-rs", keep_attached=keep), (RESTART_IP, 80)
    else:
        rig_cm, target = nodeport_restart_rig("kpr-bench-np", keep_attached=keep), (NODES["node1"]["addr"], NP_RESTART_PORT)
    kinds = KINDS if keep else ("SIGTERM", "SIGKILL")
    with rig_cm as rig:
        if path != "socklb":
            rig.upgrade_with(UPGRADE_KEYS[path])
        rig.start()
        t_begin = time.monotonic()
        res, windows = restarts_under_load(rig, *target, rounds=rounds, gap=gap, kinds=kinds)
        t_end = time.monotonic()
        rig.stop(signal.SIGTERM)
    out: dict = {"attempts": res["attempts"], "rate": res["attempts"] / (t_end - t_begin), "held": res["held"], "kinds": {}}

    def inside(t: float, w: Window) -> bool:
        return w.start <= t <= w.end

    for name in kinds:
        rows = [w for w in windows if w.kind == name]
        out["kinds"][name] = {
            "failed": [sum(1 for t, _e in res["failed"] if inside(t, w)) for w in rows],
            "gap_ms": [longest_gap(res["ok"], w.start, w.end) * 1e3 for w in rows],
            "slowest_ms": [slowest(res["ok"], w.start, w.end) * 1e3 for w in rows],
            "ready_s": [w.ready for w in rows],
            # attempts the client managed to start in the window, against one per gap
            "load_pct": [100.0 * (sum(1 for t, _d in res["ok"] if inside(t, w))
                                  + sum(1 for t, _e in res["failed"] if inside(t, w))) / ((w.end - w.start) / gap)
                         for w in rows],
            "errors": sorted({e for t, e in res["failed"] if any(inside(t, w) for w in rows)}),
        }
    out["failed_outside"] = sum(1 for t, _e in res["failed"] if not any(inside(t, w) for w in windows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.01)
    ap.add_argument("--paths", default="socklb,tc_nodeport")
    ap.add_argument("--detach", action=argparse.BooleanOptionalAction, default=True,
                    help="also the rows with detach on stop (kpr before links)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, cgroups, BPF)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"load: a new TCP connection every {args.gap * 1e3:.0f} ms plus one held connection echoing every "
          f"{args.gap * 1e3:.0f} ms; {args.rounds} restarts of each kind per row; medians over restarts\n")
    head = (f"{'path':<12} {'on stop':<14} {'restart':<8} {'failed':>7} {'max':>5} {'gap ms':>8} {'max':>8} "
            f"{'slowest ms':>11} {'ready s':>8} {'load %':>7}  errors")
    print(head)
    print("-" * len(head))
    summary = []
    for path in args.paths.split(","):
        for keep in (True, False) if args.detach else (True,):
            r = run(path, keep, args.rounds, args.gap)
            mode = "stay attached" if keep else "detach (old)"
            for kind, k in r["kinds"].items():
                print(f"{path:<12} {mode:<14} {kind:<8} {statistics.median(k['failed']):>7.0f} {max(k['failed']):>5} "
                      f"{statistics.median(k['gap_ms']):>8.1f} {max(k['gap_ms']):>8.1f} "
                      f"{statistics.median(k['slowest_ms']):>11.1f} {statistics.median(k['ready_s']):>8.2f} "
                      f"{statistics.median(k['load_pct']):>7.0f}  "
                      f"{','.join(k['errors']) or '-'}")
            held = "unbroken" if not r["held"]["error"] else f"broken: {r['held']['error']}"
            summary.append(f"{path}, {mode}: {r['attempts']} connections at {r['rate']:.0f}/s, held connection {held} "
                           f"({r['held']['echoes']} echoes), failures outside restarts: {r['failed_outside']}")
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
