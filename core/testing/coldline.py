"""What one dependent read of a cold cache line costs on this machine now, measured the way the
NodePort programs meet it: a BPF program chasing a random cycle through a 16 MiB array map
(vmalloc'd 4 KiB pages like every map's memory), one line per step, run with BPF_PROG_TEST_RUN.

A new flow's cost is mostly such reads (hash buckets and elements of kpr_ct, kpr_snat, the LRU
lists, the service maps), an established packet's mostly cached lines; so a new-flow figure
taken on another day is comparable only beside this one (issue 14: the same code measured
756-834 ns above bare one session and 1700-1950 the next, established packets unchanged).
"""

from __future__ import annotations

import random
import statistics

LINES = 1 << 18  # 64-byte lines: 16 MiB, well past the last-level cache and the TLBs' reach
STEPS = 32  # dependent reads per run

SRC = r"""
struct cl_line { __u32 next; __u32 pad[15]; };
BPF_ARRAY(cl_chase, struct cl_line, %(lines)d);
BPF_ARRAY(cl_pos, __u32, 1);

int cl_run(struct xdp_md *ctx)
{
	__u32 zero = 0, i, *p = cl_pos.lookup(&zero);
	struct cl_line *l;

	if (!p)
		return XDP_ABORTED;
	i = *p;
#pragma unroll
	for (int k = 0; k < %(steps)d; k++) {
		l = cl_chase.lookup(&i);
		if (!l)
			return XDP_ABORTED;
		i = l->next;
	}
	*p = i;
	return XDP_TX;
}
"""


class ColdLine:
    """The probe, compiled and filled once; `ns()` measures (median of `rounds` runs)."""

    def __init__(self, seed: int = 1) -> None:
        from kpr.bpf.loader import compile_and_load, load_prog

        self.bpf = compile_and_load(SRC % {"lines": LINES, "steps": STEPS}, name="coldline")
        try:
            self.fd = load_prog(self.bpf, "cl_run", "XDP").fd
            order = list(range(LINES))
            random.Random(seed).shuffle(order)
            chase = self.bpf[b"cl_chase"]
            for a, b in zip(order, order[1:] + order[:1]):  # one cycle through every line
                v = chase.Leaf()
                v.next = b
                chase[chase.Key(a)] = v
        except BaseException:
            self.bpf.cleanup()
            raise

    def ns(self, rounds: int = 7, repeat: int = 2000) -> float:
        """ns per dependent cold read (the run's fixed cost, a few ns, spread over STEPS)."""
        from kpr.testing.prog_run import test_run

        return statistics.median(test_run(self.fd, bytes(64), repeat=repeat).duration_ns / STEPS for _ in range(rounds))

    def close(self) -> None:
        self.bpf.cleanup()


def cold_line_ns() -> float:
    """One measurement with a probe made for it."""
    probe = ColdLine()
    try:
        return probe.ns()
    finally:
        probe.close()
