"""xdp_nodeport: the per-packet cost of its XDP program (the XDP build of lib/nodeport.h) with
BPF_PROG_TEST_RUN, against a bare `return XDP_TX` program in the same run, by the restoring
wrapper method (repeat=N, ns above the bare program) and by repeat=1 calls (ratio to bare):
established and new flows to a remote backend (SNAT) and a local one, traffic for no service,
new flows spread over every frontend at each scale, a per-stage table (builds stopping after
each stage) and the optimisation switches on and off. The program's counters after every case
show which path ran. Shared with bench_tc_nodeport.py: kpr.testing.nodeport_bench.

    .venv/bin/python benchmarks/bench_xdp_nodeport.py [--runs 20000] [--rounds 5] [--services 10,10000,50000]
"""

from __future__ import annotations

import argparse
import platform
import sys

from kpr.testing.nodeport_bench import run_suite, uptime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20000, help="runs per case and method")
    ap.add_argument("--rounds", type=int, default=5, help="wrapper rounds per case (median)")
    ap.add_argument("--services", default="10,10000,50000", help="service counts; the first is the main table's")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage builds")
    ap.add_argument("--no-switches", action="store_true", help="skip the optimisation switches")
    args = ap.parse_args()
    scales = [int(x) for x in args.services.split(",")]
    print(f"== xdp_nodeport: BPF_PROG_TEST_RUN, {args.runs} runs per case (kernel {platform.release()}); {uptime()}")
    summary = run_suite("xdp", runs=args.runs, rounds=args.rounds, scales=scales, stages=not args.no_stages,
                        switches=not args.no_switches)
    print(f"\n{uptime()}")
    for line in summary.values():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
