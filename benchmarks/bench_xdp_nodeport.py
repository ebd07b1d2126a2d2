"""xdp_nodeport: the per-packet cost of its XDP program (the XDP build of lib/nodeport.h) with
BPF_PROG_TEST_RUN, against a bare `return XDP_TX` program in the same run, by the restoring
wrapper method (repeat=N, ns above the bare program) and by repeat=1 calls (ratio to bare):
established and new flows to a remote backend (SNAT) and a local one, traffic for no service,
new flows spread over every frontend at each scale, a per-stage table (builds stopping after
each stage) and the optimisation switches on and off. The program's counters after every case
show which path ran. Beside them, a reference load balancer of Katran's shape (kpr's own code,
kpr.testing.reference_lb; --no-reference skips it) measured the same way in the same run, so issue
14's "at or below Katran's cost" is judged on this machine. Shared with bench_tc_nodeport.py: kpr.testing.nodeport_bench.

    .venv/bin/python benchmarks/bench_xdp_nodeport.py [--runs 20000] [--prog-rounds 5] [--services 10,10000,50000]
"""

from __future__ import annotations

import argparse
import sys

from kpr.testing.nodeport_bench import add_arguments, print_summary, run_from_args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the Katran-shaped reference load balancer's rows (kpr.testing.reference_lb)")
    print_summary(run_from_args("xdp", ap.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
