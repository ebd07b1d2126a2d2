"""What the kind of the flow maps costs a new NodePort flow (issue 14, item 4: new flows cheaper):
the product's LRU kpr_ct and kpr_snat against a preallocated hash (either or both) and LRU lists
per CPU (BPF_F_NO_COMMON_LRU), each in a lab of its own (10 services, kpr.testing.flow_maps
re-pins the two maps before any program loads), every (lab, build) pair measured in turn,
round by round, so every kind sees the same load. The same builds in every lab; only the maps
differ. Kind "array" is a layout, not a map kind: builds whose conntrack and SNAT reply sides
are slots of arrays the program indexes by its own hash (the prototype kpr/testing/ct_array.h,
kpr.testing.ct_array; one slot tried per key, so about one new flow in 60 finds its slot taken
and counts conntrack_write_failed), in a lab of its own. Every kind but the slot kinds builds without
the slot tables (-DKPR_NP_CT_SLOTS=0 -DKPR_NP_SNAT_SLOTS=0: "lru" is the product before them). Kinds
"slots" (the product's default) and "ct-slots" (conntrack slots only) are the shipped slot tables
(LRU maps as the product's; "ct-slots-1" with one probe a key, not the header's two); filled
(ct-slots:F) they hold F of their slots as well, at random places, so about F (one probe) or F
squared (two) of the new flows find their probes held and overflow into kpr_ct (ct_slot_full
counts them).

Reported per kind: the new SNAT flow (kpr.testing.nodeport_bench's case, a fresh client per
run) by builds stopping after the conntrack miss (9), after the SNAT port, conntrack entry and
rewrite (6), and the full program (0), cumulative ns above the lab's bare program by the
wrapper method; the established flow's full program; and the new flow's difference to the LRU
lab. The program's counters prove the path (new_snat per run).

Every round starts with the flow maps emptied (kpr.testing.nodeport_bench's flush), so by
default a new flow meets empty buckets and an LRU with free elements. A kind written kind:F
(lru:1, hash:0.96) is a lab whose kpr_ct and kpr_snat are then filled to F of their capacity
with other flows' entries (kpr.testing.flow_maps.fill_flow_maps): the conntrack miss walks
bucket chains and a full LRU evicts on every insert, as on a node at capacity. A hash filled
so far that a round's flows do not fit refuses them (new_snat falls short: the path line says).

    .venv/bin/python benchmarks/bench_nodeport_flowmaps.py [--hook xdp] [--kinds lru,hash,hash-ct,hash-snat,percpu-lru,array,lru:1]
        [--runs 4000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

from kpr.nodeport.datapath import NO_SLOTS
from kpr.testing.coldline import cold_line_ns
from kpr.testing.ct_array import load_array_build
from kpr.testing.flow_maps import KINDS, repin_flow_maps
from kpr.testing.nodeport_bench import ProgLab, bare, cases, measure

# stop -> column: after the conntrack miss (9); the SNAT port, conntrack entry and rewrite (6); all (0)
STOPS = {9: "ct miss", 6: "+SNAT/ct/rewrite", 0: "full"}
# layouts of the shipped build switches: kind -> the -D flags every build of its lab gets (maps: LRU)
SLOT_KINDS = {"ct-slots": ("-DKPR_NP_CT_SLOTS=1", "-DKPR_NP_SNAT_SLOTS=0"),
              "slots": ("-DKPR_NP_CT_SLOTS=1", "-DKPR_NP_SNAT_SLOTS=1"),
              "slots-syn0": ("-DKPR_NP_CT_SLOTS=1", "-DKPR_NP_SNAT_SLOTS=1", "-DKPR_NP_SYN_FIRST=0"),
              "ct-slots-1": ("-DKPR_NP_CT_SLOTS=1", "-DKPR_NP_SNAT_SLOTS=0", "-DKPR_NP_CT_PROBES=1")}  # (direct-mapped)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", default="xdp", choices=("xdp", "tc"))
    ap.add_argument("--kinds", default="lru,hash,hash-ct,hash-snat,percpu-lru,array",
                    help=f"of {', '.join(KINDS)}, array; kind:F fills kpr_ct and kpr_snat to F of their "
                         "capacity before every round (lru:1, an LRU evicting on every insert)")
    ap.add_argument("--runs", type=int, default=4000, help="wrapper runs per round and case")
    ap.add_argument("--rounds", type=int, default=7, help="rounds, every (lab, build) in turn; median")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    try:
        fills = {k: float(k.partition(":")[2] or 0) for k in kinds}  # "lru:1": the LRU lab, its maps full
    except ValueError as e:
        ap.error(f"kinds: a fill is a fraction (kind:0.96): {e}")
    base_of = {k: k.partition(":")[0] for k in kinds}
    unknown = set(base_of.values()) - set(KINDS) - {"array"} - set(SLOT_KINDS)
    if fills.get("array") or any(base_of[k] == "array" and f for k, f in fills.items()):
        ap.error("kinds: the array layout keeps its flows in maps of its own: no fill")
    if unknown or "lru" not in base_of.values() or any(not 0 <= f <= 1 for f in fills.values()):
        ap.error(f"kinds: of {', '.join(KINDS)}, lru among them (unknown: {', '.join(sorted(unknown)) or '-'})")
    builds = {f"stop{s}" if s else "default": [f"-DKPR_NP_BENCH_STOP={s}", "-DKPR_NP_EST_INLINE=0"] if s else []
              for s in STOPS}
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    pr = lambda *x: print(*x, flush=True)  # noqa: E731
    pr(f"== {a.hook} new SNAT flows by flow-map kind; {time.strftime('%H:%M:%S')} UTC; "
       f"load {open('/proc/loadavg').read().split()[:3]}; cold line {cold_line_ns():.0f} ns")
    with contextlib.ExitStack() as stack:
        labs = {}
        for k in kinds:
            lab = labs[k] = stack.enter_context(ProgLab(10))
            lab.fill = fills[k]
            for name, flags in builds.items():
                if base_of[k] == "array":
                    load_array_build(lab, a.hook, name, flags)
                elif base_of[k] in SLOT_KINDS:
                    lab.load(a.hook, name, [*flags, *SLOT_KINDS[base_of[k]]])
                else:
                    if not lab.builds:
                        repin_flow_maps(lab, base_of[k])
                    lab.load(a.hook, name, [*flags, *NO_SLOTS])  # (the map kinds: kpr_ct and kpr_snat alone)
        new: dict[tuple[str, str], list[float]] = {}
        est: dict[str, list[float]] = {k: [] for k in kinds}
        bares: dict[str, list[float]] = {k: [] for k in kinds}
        moved: dict[str, int] = {k: 0 for k in kinds}
        failed: dict[str, int] = {k: 0 for k in kinds}
        full: dict[str, int] = {k: 0 for k in kinds}  # slot kinds: new flows whose slot was held
        for _r in range(a.rounds):
            for k, lab in labs.items():
                bares[k].append(bare(lab, a.hook, a.runs, 1).wrapper)
                by_name = {c.name: c for c in cases(lab, a.hook)}
                for name in builds:
                    m = measure(lab, a.hook, name, by_name["new flow, remote backend (SNAT)"], a.runs, 1, single=False)
                    new.setdefault((k, name), []).append(m.wrapper)
                    if name == "default":
                        moved[k] += m.counted.get("new_snat", 0)
                        failed[k] += m.counted.get("conntrack_write_failed", 0)
                        full[k] += m.counted.get("ct_slot_full", 0)
                m = measure(lab, a.hook, "default", by_name["established, remote backend (SNAT)"], a.runs, 1,
                            single=False)
                est[k].append(m.wrapper)
        b = {k: statistics.median(v) for k, v in bares.items()}
        ref = next(k for k in kinds if base_of[k] == "lru")  # the first LRU lab: the "vs lru" column's base
        w = {key: statistics.median(v) - b[key[0]] for key, v in new.items()}
        pr(f"  new SNAT flow, ns above bare (wrapper, median of {a.rounds} rounds of {a.runs} runs)")
        pr(f"  {'kind':12s} " + " ".join(f"{label:>16s}" for label in STOPS.values())
           + f" {'vs lru':>8s} {'established':>12s}")
        for k in kinds:
            cells = [f"{w[(k, 'stop%d' % s if s else 'default')]:16.0f}" for s in STOPS]
            d = w[(k, "default")] - w[(ref, "default")]
            pr(f"  {k:12s} " + " ".join(cells) + f" {d:+8.0f} {statistics.median(est[k]) - b[k]:12.0f}")
        pr("  bare (wrapper ns): " + ", ".join(f"{k} {b[k]:.0f}" for k in kinds))
        pr("  path: " + ", ".join(f"{k} new_snat+{moved[k]}" + (f" conntrack_write_failed+{failed[k]}" if failed[k] else "")
                                  + (f" ct_slot_full+{full[k]}" if full[k] else "")
                                  for k in kinds) + f" of {a.rounds * a.runs} runs each")
    pr(f"  load at the end {open('/proc/loadavg').read().split()[:3]}; cold line {cold_line_ns():.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
