"""Where a new flow spread over many frontends pays more than one spread over a few (issue 14,
item 6: "flat with scale"): the spread-flow case of bench_xdp_nodeport.py / bench_tc_nodeport.py
(new SNAT flows, each to the next filler frontend) measured by builds that stop after each
lookup of the new-flow path (lib/nodeport.h KPR_NP_BENCH_STOP: 9 conntrack miss, 10 service
entry, 11 backend pick, 2 counters, 4 tail call and stage, 5 FIB lookup, 6 SNAT port and
conntrack entry and rewrite, 0 the full program), in two labs open at once (few and many
services: each its own namespace and pinned service maps written by the core's writer), every
(lab, build) pair measured in turn, round by round, so both scales see the same load.

Reported per stop: cumulative ns above the lab's bare program by the wrapper method (repeat=N,
kpr.testing.nodeport_bench), the step from the stop before, and the step's growth from the few
to the many frontends: which lookups go cold at scale. The last line is the issue's ratio (the
full program's wrapper figure, incl. the wrapper, many / few), the same quantity
bench_xdp_nodeport.py's "new flows over N vs M frontends" line reports, measured side by side.

    .venv/bin/python benchmarks/bench_nodeport_scale.py [--hook xdp] [--services 10,50000]
        [--runs 4000] [--rounds 7] [--stops 9,10,11,2,4,5,6,0] [--cflags=-DX=1,...] [--stride 40009]
        [--no-warm]

--cflags adds a twin of every build with these flags too (labels "cflags" for the full one,
"stopN+cflags"), their own table, and each twin's paired difference round by round (builds
measured in turn, the order reversed every other round): a switch compared stage by stage, side by side
(`--cflags=-DKPR_LB_FE=0`: frontends from kpr_svc only, not from their kpr_fe lines;
`--cflags=-DKPR_LB_FE_IDS=0`: backend ids from kpr_slots, not from the frontend's line).
--no-warm skips caching every filler backend's next hop before measuring (ProgLab.warm_next_hops;
otherwise a frontend first reached by a stop build, which returns before caching, takes the FIB
lookup in every build that follows: stops 5 and 6 then time another path in the big lab).
--stride N visits the frontends in a scattered order (frontend n * N % fillers; default 1: the
order the writer wrote them, whose kpr_svc elements, slot ranges and backends lie one after the
other in memory, so the CPU's prefetchers hide misses a real node's traffic would take).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from kpr.testing.nodeport_bench import ProgLab, bare, cases, exit_on_sigterm, measure

STOP_LABELS = {
    9: "conntrack miss",
    10: "service entry (kpr_fe, kpr_svc)",
    11: "backend pick (kpr_slots, kpr_backend)",
    2: "path counters",
    3: "(conntrack entry: local/DSR only)",
    4: "tail call, stage re-parse",
    5: "FIB lookup",
    6: "SNAT port, conntrack entry, rewrite",
    0: "full program (next-hop cache, redirect)",
}


def label(stop: int, variant: str) -> str:
    """A build's name: stop N's (variant "+cflags": its twin with the flags), the full program's."""
    return (f"stop{stop}" + variant) if stop else ("cflags" if variant else "default")


def paired(off: list[float], on: list[float]) -> str:
    """The differences on - off of rounds measured in turn, as "median (q1 / q3), faster in k of n":
    a build's share of the load's drift cancels round by round, where two medians taken over
    the same rounds still differ by it (labs of one process differed by up to 70 ns)."""
    d = [b - a for a, b in zip(off, on)]
    q = statistics.quantiles(d, n=4) if len(d) > 1 else [d[0]] * 3
    return f"{statistics.median(d):+.0f} ns ({q[0]:+.0f} / {q[2]:+.0f}), faster in {sum(x < 0 for x in d)} of {len(d)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", default="xdp", choices=("xdp", "tc"))
    ap.add_argument("--services", default="10,50000", help="two service counts: few,many")
    ap.add_argument("--runs", type=int, default=4000, help="wrapper runs per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds, every (lab, build) in turn; median")
    ap.add_argument("--stops", default="9,10,11,2,4,5,6,0", help="KPR_NP_BENCH_STOP builds (0: the full program)")
    ap.add_argument("--cflags", default="", help="comma-separated -D flags of a twin of every build")
    ap.add_argument("--stride", type=int, default=1,
                    help="spread flows visit frontend n * stride %% fillers (1: in the order written; "
                         "a large prime such as 40009: scattered, as a real node's traffic is)")
    ap.add_argument("--no-warm", dest="warm", action="store_false",
                    help="do not cache every filler backend's next hop first")
    a = ap.parse_args()
    exit_on_sigterm()  # (a killed run removes its labs)
    few, many = (int(x) for x in a.services.split(","))
    stops = [int(x) for x in a.stops.split(",")]
    # stop 0 is the default build itself (measure() sets flows up with "default")
    builds = {f"stop{s}" if s else "default": [f"-DKPR_NP_BENCH_STOP={s}", "-DKPR_NP_EST_INLINE=0"] if s else []
              for s in stops}
    if a.cflags:
        builds.update({("cflags" if n == "default" else f"{n}+cflags"): f + a.cflags.split(",")
                       for n, f in list(builds.items())})
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    pr = lambda *x: print(*x, flush=True)  # noqa: E731
    pr(f"== {a.hook} new flows spread over {few - 2} vs {many - 2} frontends (stride {a.stride}); {time.strftime('%H:%M:%S')} UTC; "
       f"load {open('/proc/loadavg').read().split()[:3]}")
    with ProgLab(few, a.stride) as lf, ProgLab(many, a.stride) as lm:
        labs = {few: lf, many: lm}
        t0 = time.perf_counter()
        for lab in labs.values():
            lab.load(a.hook, "default")
            for name, flags in builds.items():
                if name != "default":
                    lab.load(a.hook, name, flags)
        pr(f"  {len(builds)} builds x 2 labs loaded in {time.perf_counter() - t0:.0f} s "
           f"(service maps written: {lf.sync_s:.1f} s, {lm.sync_s:.1f} s)")
        if a.warm:
            for lab in labs.values():
                lab.warm_next_hops(a.hook)  # (after every load: a load starts a new next-hop generation)
        got: dict[tuple[int, str], list[float]] = {}
        moved: dict[tuple[int, str], int] = {}
        bares: dict[int, list[float]] = {n: [] for n in labs}
        for r in range(a.rounds):
            for n, lab in labs.items():
                bares[n].append(bare(lab, a.hook, a.runs, 1).wrapper)
                spread = [c for c in cases(lab, a.hook) if c.spread][0]
                # every other round in the reverse order: a twin's paired difference then carries
                # no "measured second" share
                for name in (list(builds) if r % 2 == 0 else list(builds)[::-1]):
                    m = measure(lab, a.hook, name, spread, a.runs, 1, single=False)
                    got.setdefault((n, name), []).append(m.wrapper)
                    moved[(n, name)] = moved.get((n, name), 0) + m.counted.get("new_snat", 0)
        b = {n: statistics.median(v) for n, v in bares.items()}
        w = {k: statistics.median(v) for k, v in got.items()}
        pr(f"  bare (wrapper ns): {few}: {b[few]:.1f}, {many}: {b[many]:.1f}")
        for variant in ("", "+cflags") if a.cflags else ("",):
            if variant:
                pr(f"  with {a.cflags}:")
            pr(f"  {'up to and including':44s} {'few':>7s} {'step':>6s} {'many':>7s} {'step':>6s} {'step grows':>10s}")
            prev = {few: 0.0, many: 0.0}
            for s in stops:
                cells = []
                for n in (few, many):
                    x = w[(n, label(s, variant))] - b[n]
                    cells += [f"{x:7.0f}", f"{x - prev[n]:+6.0f}"]
                grow = (w[(many, label(s, variant))] - b[many] - prev[many]) - (w[(few, label(s, variant))] - b[few] - prev[few])
                pr(f"  {STOP_LABELS.get(s, str(s)):44s} {' '.join(cells)} {grow:+10.0f}")
                prev = {n: w[(n, label(s, variant))] - b[n] for n in labs}
        if a.cflags:
            pr("  paired, round by round (the twin with the flags minus its build without; median, quartiles, rounds faster):")
            for s in stops:
                cells = []
                for n in (few, many):
                    cells.append(f"{n}: {paired(got[(n, label(s, ''))], got[(n, label(s, '+cflags'))])}")
                pr(f"  {STOP_LABELS.get(s, str(s)):44s} {'; '.join(cells)}")
        for name in [x for x in ("default", "cflags") if x in builds]:
            # the path: every run of the full builds counted as a new SNAT flow
            proof = ", ".join(f"{n}: new_snat+{moved[(n, name)]}" for n in (few, many))
            flags = " ".join(builds[name]) or "default"
            pr(f"  {name} ({flags}; {proof} of {a.rounds * a.runs} runs each)")
            pr(f"  {name}: new flows over {many - 2} vs {few - 2} frontends: "
               f"{w[(many, name)] / w[(few, name)]:.2f} x (wrapper, incl. the wrapper; "
               f"{w[(few, name)] - b[few]:.0f} / {w[(many, name)] - b[many]:.0f} ns above bare)")
    pr(f"  load at the end {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
