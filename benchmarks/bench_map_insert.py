"""What one insert of a new flow costs in each map kind the conntrack entry could live in
(issue 14: a new SNAT flow pays its kpr_ct and kpr_snat inserts; is an LRU the expensive part?).

An XDP program run with BPF_PROG_TEST_RUN (repeat=N) builds a new key from a counter (a
40-byte key and a 40-byte value, kpr_ct's sizes) and inserts it; the same program without the
update (its lookup, which misses, kept) runs beside it, so the difference is the insert alone.
Maps of 131072 entries (kpr_ct's default), emptied before every round as the NodePort
benchmark's rounds empty theirs; one row keeps its LRU full instead (filled once, then every
insert evicts), as a busy node's conntrack is. Kinds, rounds interleaved, medians:

  lru_hash                      what kpr_ct and kpr_snat are
  lru_hash BPF_F_NO_COMMON_LRU  per-CPU LRU lists (a CPU evicts only from its own share)
  hash, preallocated            no eviction: full means refused, a collector must delete
  hash, BPF_F_NO_PREALLOC       elements allocated per insert

    .venv/bin/python benchmarks/bench_map_insert.py [--runs 4000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from kpr.testing.prog_run import test_run

MAX = 131072
KINDS = {
    "lru_hash (kpr_ct, kpr_snat today)": ('"lru_hash"', "0", False),
    "lru_hash, full: every insert evicts": ('"lru_hash"', "0", True),
    "lru_hash BPF_F_NO_COMMON_LRU": ('"lru_hash"', "BPF_F_NO_COMMON_LRU", False),
    "hash, preallocated": ('"hash"', "0", False),
    "hash, BPF_F_NO_PREALLOC": ('"hash"', "BPF_F_NO_PREALLOC", False),
}

SRC = r"""
struct k { __u32 w[10]; };
struct v { __u64 a; __u32 b[8]; };
BPF_ARRAY(ctr, __u32, 1);
"""

PROG = r"""
BPF_F_TABLE(%(type)s, struct k, struct v, m_%(i)d, %(max)d, %(flags)s);
int ins_%(i)d(struct xdp_md *ctx)
{
	__u32 zero = 0, *n = ctr.lookup(&zero);
	struct k key = {};
	struct v val = {};

	if (!n)
		return XDP_ABORTED;
	*n += 1;
	key.w[0] = *n; // a new key per run (0x80000000 and up: never a key the fill wrote)
	key.w[1] = 0x80000000;
	val.a = *n;
	if (m_%(i)d.lookup(&key))
		return XDP_DROP;
	if (UPDATE)
		m_%(i)d.update(&key, &val);
	return XDP_TX;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4000, help="inserts per round (the NodePort benchmark's round: 4000)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    from kpr.bpf.loader import compile_and_load, load_prog

    text = SRC + "".join(PROG % {"i": i, "type": t, "flags": f, "max": MAX} for i, (t, f, _full) in enumerate(KINDS.values()))
    with_update = compile_and_load(text, cflags=["-DUPDATE=1"], name="bench_map_insert")
    without = compile_and_load(text, cflags=["-DUPDATE=0"], name="bench_map_insert_lookup")
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one CPU: per-CPU LRU lists stay one list
        jobs = []
        for i, (name, (_t, _f, full)) in enumerate(KINDS.items()):
            fi = load_prog(with_update, f"ins_{i}", "XDP").fd
            fn = load_prog(without, f"ins_{i}", "XDP").fd
            maps = (with_update[f"m_{i}".encode()], without[f"m_{i}".encode()])
            if full:
                for m in maps:  # filled once, with keys the programs never make
                    for j in range(MAX):
                        key = m.Key()
                        key.w[0], key.w[1] = j, 1
                        m[key] = m.Leaf()
            jobs.append((name, fi, fn, maps, full))
        pkt = bytes(64)
        got: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in KINDS}
        load0 = open("/proc/loadavg").read().split()[:3]
        for _r in range(args.rounds):
            for name, fi, fn, maps, full in jobs:
                if not full:
                    for m in maps:
                        m.clear()
                got[name][0].append(test_run(fi, pkt, repeat=args.runs).duration_ns)
                got[name][1].append(test_run(fn, pkt, repeat=args.runs).duration_ns)
        load1 = open("/proc/loadavg").read().split()[:3]
    finally:
        with_update.cleanup()
        without.cleanup()
    print(f"== map insert: {args.runs} runs x {args.rounds} rounds, interleaved, median ns per run; "
          f"{MAX} entries, 40 B key / 40 B value; load {' '.join(load0)} -> {' '.join(load1)}")
    print(f"  {'map kind':40s} {'insert':>7s} {'lookup only':>12s} {'the insert':>11s}")
    for name, (ins, look) in got.items():
        a, b = statistics.median(ins), statistics.median(look)
        print(f"  {name:40s} {a:7.1f} {b:12.1f} {a - b:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
