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

    .venv/bin/python benchmarks/bench_monitor.py [--runs 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

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
REQ = struct.Struct("=16sHBBIQQ")  # struct kpr_sock_req
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20000, help="test runs per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
