"""A NodePort agent's cold start: time to ready and RSS of `kpr run` with tc_nodeport (and
socklb) enabled, started after `kpr cleanup` (what a reboot leaves: nothing pinned, the state
directory kept), its program cache warm, against the same start compiling (the cache emptied).

The agent runs in node1's namespace of tests/kernel/tc_nodeport_env.py's topology on eth0
(nodeport_restart_rig: one NodePort service, a local and a remote pod), socklb on a child
cgroup. Each round starts every kind once, in an order that rotates per round: "compile" (the
state directory's bpf-cache moved aside for it: every program compiled, as a first start), and
"cached" (the cache the previous start wrote). With --base PATH (a worktree of another commit,
run through KPR_WT as the guide's worktree method), "cached (base)": that tree's agent after
kpr cleanup with its own cache warm. Measured per start: wall time from the process's start to
status ready (polled every 50 ms), its CPU time then, VmRSS at ready and VmHWM (the peak), and
the build each plugin reports (status details.build). Medians over --rounds; load printed.

    .venv/bin/python benchmarks/bench_nodeport_cold.py [--rounds 3] [--base /tmp/wt-main] [--no-socklb]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from socklb_env import _kpr_cleanup, cpu_seconds  # noqa: E402
from tc_nodeport_env import nodeport_restart_rig  # noqa: E402

from kpr.bpf.progcache import CACHE_DIR  # noqa: E402
from kpr.testing.cgroup import child_cgroup  # noqa: E402

PLUGINS = ("tc_nodeport", "socklb")


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def one_start(rig, kind: str, tree: str | None) -> dict:
    """Start the agent of `tree` (None: this one), measure it at ready, stop it, kpr cleanup."""
    cache = rig.agent.state / CACHE_DIR
    kept = cache.with_name(f"{CACHE_DIR}.kept")
    if kind == "compile":  # no entries; the other kinds' are put back afterwards
        with contextlib.suppress(FileNotFoundError):
            cache.rename(kept)
    try:
        return _measured(rig, tree)
    finally:
        if kind == "compile":
            shutil.rmtree(cache, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                kept.rename(cache)


def _measured(rig, tree: str | None) -> dict:
    env_before = os.environ.get("KPR_WT")
    if tree is not None:
        os.environ["KPR_WT"] = tree
    try:
        ready = rig.start()
    finally:
        if env_before is None:
            os.environ.pop("KPR_WT", None)
        else:
            os.environ["KPR_WT"] = env_before
    pid = rig.proc.pid
    mem, cpu = vm(pid), cpu_seconds(pid)
    plugins = rig.status()["plugins"]
    builds = {p: plugins[p]["details"].get("build") for p in PLUGINS if p in plugins}
    rig.stop(signal.SIGTERM)
    _kpr_cleanup(rig.pin, rig.work)
    return {"ready": ready, "cpu": cpu, "rss": mem["VmRSS"] / 1024, "hwm": mem["VmHWM"] / 1024, "builds": builds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", help="a worktree of another commit: its cached start too")
    ap.add_argument("--no-socklb", action="store_true", help="tc_nodeport alone")
    args = ap.parse_args()
    kinds = [("compile", None), ("cached", None)] + ([("cached (base)", args.base)] if args.base else [])
    rows: dict[str, list[dict]] = {k: [] for k, _t in kinds}
    loads = []
    with contextlib.ExitStack() as stack:
        rig = stack.enter_context(nodeport_restart_rig(f"kpr-bench-npcold{os.getpid()}"))
        if not args.no_socklb:
            cg = stack.enter_context(child_cgroup(f"kpr-bench-npcold{os.getpid()}"))
            rig.agent.plugin("socklb", cgroupPath=str(cg), keepAttachedOnStop=False)
            rig.write_config()
        stack.callback(_kpr_cleanup, rig.pin, rig.work)
        for tree in {t for _k, t in kinds}:  # each tree's cache warm before the first round
            one_start(rig, "warm", tree)
        for r in range(args.rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind, tree in order:
                row = one_start(rig, kind, tree)
                rows[kind].append(row)
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1} {kind:14s} ready {row['ready']:.2f} s cpu {row['cpu']:.2f} s "
                      f"rss {row['rss']:.0f} MB hwm {row['hwm']:.0f} MB builds {row['builds']}", flush=True)
    print(f"\nmedians over {args.rounds} rounds (load average {min(loads):.1f}-{max(loads):.1f}), "
          f"plugins: {'tc_nodeport' if args.no_socklb else 'tc_nodeport + socklb'}")
    print(f"{'kind':16s} {'ready s':>8s} {'cpu s':>7s} {'RSS MB':>7s} {'HWM MB':>7s}")
    for kind, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("ready", "cpu", "rss", "hwm")}
        print(f"{kind:16s} {med['ready']:8.2f} {med['cpu']:7.2f} {med['rss']:7.0f} {med['hwm']:7.0f}")


if __name__ == "__main__":
    main()
