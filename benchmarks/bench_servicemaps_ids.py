"""The writer's backend identity table (kpr.idtables.KeyIds) in its two states, side by side.

    sudo .venv/bin/python benchmarks/bench_servicemaps_ids.py [--reps N] [--sizes 10000,50000]

In an agent, the backend identities a full sync (or any change) adds go into the table's
dict first and the checker thread moves them into the compact table half a second later
(ServiceMapWriter.compact_ids: about a hundred bytes per backend fewer). bench_servicemaps.py
runs writers without that thread, so its changes on top of N services look identities up in
the dict alone, as before the table existed; this measures the same changes on top of N
services whose identities have been moved, as an agent's are, interleaved with the dict-only
state (medians of --reps; wall and CPU, with the load):

1. the move itself after a full sync of N services (what the checker thread spends once);
2. 1000 new services (one upsert each) on top of 0 and of N (issue 13: within 1.2x);
3. one service change (a backend more, then back) at 100 and at N services (within 1.2x);
4. the writer's Python heap after the full sync (tracemalloc of the identity table alone is
   not separable: the heap difference of the move is printed).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_servicemaps import add_1000, load, one_change, services, timed_cpu, writer  # noqa: E402


def move(n: int) -> tuple[float, float]:
    """(wall s, CPU s) of moving n services' identities into the compact table."""
    svcs = services(n)
    with writer(n) as w:
        w.full_sync(svcs)
        return timed_cpu(w.compact_ids)


def heap_moved(n: int) -> float:
    svcs = services(n)
    with writer(n) as w:
        tracemalloc.start()
        w.full_sync(svcs)
        gc.collect()
        a = tracemalloc.get_traced_memory()[0]
        w.compact_ids()
        gc.collect()
        b = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    return (a - b) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="10000,50000")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"start: {load()}; medians of {args.reps}")
    print("1. moving the identities into the compact table after a full sync (once, checker thread)")
    for n in sizes:
        wall, c = move(n)
        print(f"   {n:6d} services ({10 * n} backends): {wall * 1000:7.1f} ms, CPU {c * 1000:7.1f} ms   ({load()})")
    print("2. 1000 new services, one upsert each, on top of N: dict only | moved (as in an agent)")
    base = {m: add_1000(0, args.reps, m) for m in (False, True)}
    for n in [0] + sizes:
        row = []
        for m in (False, True):
            wall, c = base[m] if n == 0 else add_1000(n, args.reps, m)
            row.append(f"{wall * 1000:6.1f} ms ({wall / base[m][0]:.2f}x), CPU {c * 1000:6.1f} ms ({c / base[m][1]:.2f}x)")
        print(f"   on top of {n:6d}: " + " | ".join(row) + f"   ({load()})")
    print("3. one service change at 100 and at N: dict only | moved")
    reps = max(args.reps * 20, 21)
    at100 = {m: one_change(100, reps, m) for m in (False, True)}
    for n in sizes:
        got = {m: one_change(n, reps, m) for m in (False, True)}
        row = [f"{got[m] * 1e6:6.1f} us ({got[m] / at100[m]:.2f}x of {at100[m] * 1e6:.1f} us at 100)" for m in (False, True)]
        print(f"   at {n:6d}: " + " | ".join(row) + f"   ({load()})")
    print("4. Python heap given back by the move (tracemalloc)")
    for n in sizes:
        print(f"   {n:6d} services: {heap_moved(n):6.1f} MB")
    print(f"end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
