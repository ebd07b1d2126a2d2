"""The monitor's cost on the decision the socket hooks take (lib/sock.h's kpr_sock_xlate, the
code path that emits `kpr monitor` events), measured the way bench_tc_nodeport.py measures
the per-packet path: BPF_PROG_TEST_RUN, one call per run (repeat=1), kernel-measured
duration, ratios to a bare `return XDP_PASS` program measured the same way.

Variants, in one run, taken in turn round by round so a busy machine slows them alike:
  - bare                         return XDP_PASS
  - without the monitor          the decision built with -DKPR_MON=0 (no maps, no check)
  - monitor off                  built with the monitor, nobody listening (kpr_mon_cfg.on 0)
  - on, nobody reading           a listener registered but not reading: the ring fills, then
                                 every event is a failed reserve counted as lost
  - on, with a reader            a thread drains the ring (kpr.monitor.Monitor.poll)
The decision is a ClusterIP translation (service lookup, random pick, backend lookup): one
event per call when the monitor is on. Each figure is the median over rounds of the round's
mean; the spread of the build without the monitor across rounds is the noise the off switch
is compared with. Everything runs on maps in a private pin directory.

Then the same on the tc NodePort program (kpr.testing.nodeport_bench's lab and methods, as
bench_tc_nodeport.py: the restoring wrapper with repeat=N, ns above bare; and repeat=1, x bare):
a new flow to a local backend (one event per packet when on) and an established flow (no
event: the check is not even reached), without the monitor, off, on unread, on with a reader.

    .venv/bin/python benchmarks/bench_monitor.py [--runs 20000] [--rounds 7] [--tc-runs 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from kpr.bpf import abi  # noqa: E402
from kpr.bpf import maps as M  # noqa: E402
from kpr.bpf.cleanup import scratch_pin_dir  # noqa: E402
from kpr.bpf.loader import compile_and_load, load_prog  # noqa: E402
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey  # noqa: E402
from kpr.monitor import MonCfg, Monitor  # noqa: E402
from kpr.servicemaps import ServiceMapWriter  # noqa: E402
from kpr.testing.prog_run import test_run  # noqa: E402

# The decision of the connect/sendmsg hooks on a struct kpr_sock_req (as tests/kernel/test_socklb.py's
# decider): input the request, output the verdict.
DECIDE = r"""
#include "lib/sock.h"

int mon_decide(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct kpr_sock_req req;
	struct kpr_sock_res res = {};

	if (data + sizeof(req) > end)
		return 100;
	__builtin_memcpy(&req, data, sizeof(req));
	return kpr_sock_xlate(&req, &res);
}
"""
BARE = "int mon_bare(struct xdp_md *ctx) { return XDP_PASS; }\n"
REQ = abi.packer("kpr_sock_req")  # daddr, dport, proto, family, hook, netns, cookie
VIP = "10.96.0.10"
XLATE = 1


def request(cookie: int) -> bytes:
    return REQ.pack(M.addr_to_bytes(VIP), M.htons(80), 6, 4, 0, 2000, cookie)


def mean_ns(fd: int, packets: list[bytes]) -> float:
    total = 0
    for p in packets:
        r = test_run(fd, p)
        total += r.duration_ns
    return total / len(packets)


def set_listeners(pin: Path, on: int) -> None:
    with M.BpfMap.open_pinned(pin / "kpr_mon_cfg") as cfg:
        raw = cfg.lookup(M.U32.pack(0))
        c = MonCfg.from_buffer_copy(raw)
        c.on = on
        cfg.update(M.U32.pack(0), bytes(c))


def lost(pin: Path) -> int:
    with M.BpfMap.open_pinned(pin / "kpr_mon_cfg") as cfg:
        return MonCfg.from_buffer_copy(cfg.lookup(M.U32.pack(0))).lost


def tc_path(runs: int, rounds: int, reps: int) -> None:
    from kpr.testing import nodeport_bench as NB

    if "lib/monitor.h" not in (Path(NB.__file__).resolve().parents[1] / "bpf" / "lib" / "nodeport.h").read_text():
        print("== tc path: lib/nodeport.h emits no monitor events in this tree: skipped")
        return
    print(f"== monitor on the tc NodePort program: {runs} runs x {rounds} rounds per measurement, medians of "
          f"{reps} repetitions in rotating order")
    with NB.ProgLab(2) as lab:
        lab.load("tc", "default")
        lab.load("tc", "without", ["-DKPR_MON=0"])
        b = NB.bare(lab, "tc", runs, rounds)
        print(f"  {'case / monitor':62s} {'wrapper':>8s} {'above bare':>10s} {'repeat=1':>9s} {'x bare':>7s}")
        print(f"  {'bare':62s} {b.wrapper:8.1f} {'':>10s} {b.single:9.1f}")
        wanted = {"new flow, local backend", "established, remote backend (SNAT)"}
        labels = ("without the monitor (KPR_MON=0)", "monitor off", "monitor on, nobody reading", "monitor on, with a reader")

        def one(label: str, case: NB.Case) -> NB.Measured:
            if label == labels[0]:
                return NB.measure(lab, "tc", "without", case, runs, rounds)
            if label != labels[3]:
                set_listeners(lab.pin, 1 if label == labels[2] else 0)
                try:
                    return NB.measure(lab, "tc", "default", case, runs, rounds)
                finally:
                    set_listeners(lab.pin, 0)
            with Monitor(lab.pin) as m:
                stop = threading.Event()
                t = threading.Thread(target=lambda: [m.poll(50) for _ in iter(stop.is_set, True)])
                t.start()
                try:
                    return NB.measure(lab, "tc", "default", case, runs, rounds)
                finally:
                    stop.set()
                    t.join()

        for case in [c for c in NB.cases(lab, "tc") if c.name in wanted]:
            got: dict[str, list[NB.Measured]] = {label: [] for label in labels}
            for rep in range(reps):  # the order turns each repetition: no variant always goes first
                for label in labels[rep % 4:] + labels[: rep % 4]:
                    got[label].append(one(label, case))
            med = {label: (statistics.median(m.wrapper for m in ms), statistics.median(m.single for m in ms))
                   for label, ms in got.items()}
            for label in labels:
                w, single = med[label]
                print(f"  {case.name + ', ' + label:62s} {w:8.1f} {w - b.wrapper:10.1f} {single:9.1f} "
                      f"{single / b.single:7.2f}  {NB.proof(got[label][-1], case, 'tc')}")
            ref = [m.wrapper for m in got[labels[0]]]
            print(f"    off vs without: {med[labels[1]][0] - med[labels[0]][0]:+.1f} ns (wrapper), "
                  f"{med[labels[1]][1] / med[labels[0]][1]:.3f}x (repeat=1); the build without across "
                  f"repetitions: {min(ref):.1f}-{max(ref):.1f} ns")
        print(f"  events lost (ring full while unread): {lost(lab.pin)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20000, help="test runs per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tc-runs", type=int, default=20000, help="runs per measurement on the tc path (0: skip it)")
    ap.add_argument("--tc-reps", type=int, default=4, help="repetitions of each tc variant (order rotated)")
    args = ap.parse_args()

    load_before = os.getloadavg()
    with scratch_pin_dir("kpr-bench-monitor") as pin, ServiceMapWriter(pin) as w:
        backends = tuple(Backend(f"10.244.0.{i}", 8080) for i in range(11, 14))
        w.upsert(Service(ServiceKey("default", "web"), (Frontend(FrontendType.CLUSTER_IP, VIP, 80, Protocol.TCP, backends),)))
        flags = M.cflags(pin)
        bare_b = compile_and_load(BARE, name="mon_bare.c")
        without_b = compile_and_load(DECIDE, cflags=flags + ["-DKPR_MON=0"], name="mon_decide_without.c")
        with_b = compile_and_load(DECIDE, cflags=flags, name="mon_decide.c")
        try:
            bare = load_prog(bare_b, "mon_bare", "XDP").fd
            without = load_prog(without_b, "mon_decide", "XDP").fd
            withmon = load_prog(with_b, "mon_decide", "XDP").fd
            packets = [request(i) for i in range(args.runs)]
            assert test_run(without, packets[0]).retval == XLATE and test_run(withmon, packets[0]).retval == XLATE
            names = ["bare (return XDP_PASS)", "decision without the monitor (KPR_MON=0)", "monitor off",
                     "monitor on, nobody reading", "monitor on, with a reader"]
            per_round: dict[str, list[float]] = {n: [] for n in names}
            delivered = 0

            def run_reader(fd: int) -> float:
                nonlocal delivered
                with Monitor(pin) as m:
                    stop = threading.Event()
                    got = [0]

                    def drain() -> None:
                        while not stop.is_set():
                            got[0] += len(m.poll(50))

                    t = threading.Thread(target=drain)
                    t.start()
                    try:
                        return mean_ns(fd, packets)
                    finally:
                        stop.set()
                        t.join()
                        delivered += got[0] + len(m.poll(0))

            def with_listeners(on: int) -> float:
                set_listeners(pin, on)
                try:
                    return mean_ns(withmon, packets)
                finally:
                    set_listeners(pin, 0)

            runners = {
                names[0]: lambda: mean_ns(bare, packets),
                names[1]: lambda: mean_ns(without, packets),
                names[2]: lambda: with_listeners(0),
                names[3]: lambda: with_listeners(1),  # a listener that never reads
                names[4]: lambda: run_reader(withmon),
            }
            for r in range(args.rounds):
                # the order turns each round: no variant always runs first or after the reader
                for n in names[r % len(names):] + names[: r % len(names)]:
                    per_round[n].append(runners[n]())
            lost_events = lost(pin)
        finally:
            for b in (bare_b, without_b, with_b):
                b.cleanup()
    load_after = os.getloadavg()

    med = {n: statistics.median(v) for n, v in per_round.items()}
    base = med[names[0]]
    ref = per_round[names[1]]
    noise = (max(ref) - min(ref)) / 2
    print(f"== monitor: BPF_PROG_TEST_RUN on the socket hooks' decision (ClusterIP translation), one call per run, "
          f"{args.runs} runs x {args.rounds} rounds (kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f})")
    for n in names:
        v = per_round[n]
        d = med[n] - med[names[1]]
        vs = "" if n.startswith("bare") or n == names[1] else f"  {d:+6.1f} ns vs without"
        print(f"  {n:42s} {med[n]:7.1f} ns  {med[n] / base:5.2f}x bare  (rounds {min(v):.1f}-{max(v):.1f}){vs}")
    print(f"  noise (half the range of the build without the monitor across rounds): {noise:.1f} ns")
    off = med[names[2]] - med[names[1]]
    verdict = "within the noise" if abs(off) <= noise else ("faster, beyond the noise" if off < 0 else "OUTSIDE the noise")
    print(f"  off switch: {off:+.1f} ns vs the build without the monitor: {verdict}")
    print(f"  events: {delivered} read by the reader; {lost_events} found the ring full (the unread rounds)")
    if args.tc_runs:
        tc_path(args.tc_runs, args.rounds, args.tc_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
