"""A model of lib/nat.h kpr_snat_port_alloc's tries over one CPU's share of the SNAT port range
(one backend, so one bucket), against the order of tries the first version used: how many new
flows are refused when long-lived flows hold slots. Not a measurement of the datapath: the
README's issue 14 figures for the port table's refusals come from here.

  burst: K long-lived flows opened together (consecutive slots), then short flows only (each
         ended before the cursor comes round again): the share of those refused.
  scattered: each new flow long-lived with probability q; the refusal rate while the share's
         occupancy passes 25%, 50%, 75%.

Run: python benchmarks/snat_port_probe_model.py
"""

from __future__ import annotations

import random
from collections.abc import Callable

RANGE, CPUS = 4536, 2  # lib/nat.h defaults (61000-65535), this machine's possible CPUs
SHARE = RANGE // CPUS
Run = Callable[[list[bool], int, int, float], tuple[int, int]]


def consecutive(tries: int = 4) -> Run:
    """The first version: the next `tries` slots, the cursor past every slot tried."""
    def run(live: list[bool], nxt: int, n_new: int, q: float) -> tuple[int, int]:
        refused = 0
        for _ in range(n_new):
            for o in range(tries):
                pos = (nxt + o) % SHARE
                if not live[pos]:
                    live[pos] = random.random() < q
                    nxt = (pos + 1) % SHARE
                    break
            else:
                refused += 1
                nxt = (nxt + tries) % SHARE
        return refused, nxt
    return run


def near_and_far(tries: int = 4) -> Run:
    """Now: the next tries - 1 slots and one half the share ahead; the cursor past the near ones."""
    def run(live: list[bool], nxt: int, n_new: int, q: float) -> tuple[int, int]:
        refused = 0
        for _ in range(n_new):
            for o in [*range(tries - 1), SHARE // 2]:
                pos = (nxt + o) % SHARE
                if not live[pos]:
                    live[pos] = random.random() < q
                    nxt = (nxt + min(o + 1, tries - 1)) % SHARE
                    break
            else:
                refused += 1
                nxt = (nxt + tries - 1) % SHARE
        return refused, nxt
    return run


def burst(run: Run, k: int) -> float:
    live = [p < k for p in range(SHARE)]
    refused, _ = run(live, 0, 10 * SHARE, 0.0)
    return refused / (10 * SHARE)


def scattered(run: Run, q: float) -> list[float | None]:
    live, nxt, tried = [False] * SHARE, 0, 0
    marks: dict[float, list[float]] = {0.25: [], 0.5: [], 0.75: []}
    while sum(live) < 0.8 * SHARE and tried < 400 * SHARE:
        refused, nxt = run(live, nxt, 200, q)
        tried += 200
        occ = sum(live) / SHARE
        for m, rates in marks.items():
            if abs(occ - m) <= 0.02:
                rates.append(refused / 200)
    return [sum(v) / len(v) if v else None for v in marks.values()]


def main() -> None:
    for name, run in (("consecutive tries (first version)", consecutive()), ("3 near + 1 far (now)", near_and_far())):
        random.seed(1)
        b = "/".join(f"{burst(run, k):.2%}" for k in (100, 500, 1000, 1500))
        s = "; ".join(f"q={q}: " + "/".join("-" if r is None else f"{r:.1%}" for r in scattered(run, q)) for q in (0.25, 0.5))
        print(f"{name:34s} burst K=100/500/1000/1500: {b} | scattered at 25/50/75%: {s}")
    print("LRU path (16 random ports of the whole range): about occupancy^16:",
          ", ".join(f"{f:.0%}: {f ** 16:.0e}" for f in (0.25, 0.5, 0.75)))


if __name__ == "__main__":
    main()
