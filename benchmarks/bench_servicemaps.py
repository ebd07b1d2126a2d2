"""Service map writer benchmarks (not a test): prints timings and the ratios that matter.

    sudo .venv/bin/python benchmarks/bench_servicemaps.py [--quick]

1. Full sync of 10k services x 10 backends: batched syscalls vs one element at a time.
2. One service change applied with 100 vs 10k services in the maps (should not grow).
3. Maglev table build per service (10 backends, M=16381).
4. Full sync of 50k services x 10 backends, against Cilium's published 50k services in 708 ms.

Each run uses its own scratch pin dir (kpr.bpf.cleanup.scratch_pin_dir), removed afterwards.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

from kpr.bpf.cleanup import scratch_pin_dir
from kpr.bpf.maglev import DEFAULT_SIZE, build_table
from kpr.bpf.maps import addr_to_bytes
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter

CILIUM_50K_MS = 708.0  # Cilium's load-balancer control plane: 50,000 services in 708 ms


def services(n: int, backends: int = 10, extra: int = 0) -> list[Service]:
    out = []
    for i in range(n):
        bes = tuple(
            Backend(f"10.{64 + (i * backends + j) // 65536}.{(i * backends + j) // 256 % 256}.{(i * backends + j) % 256}", 8080)
            for j in range(backends + (extra if i == 0 else 0))
        )
        vip = f"10.96.{i // 256}.{i % 256}" if i < 65536 else f"10.97.{(i - 65536) // 256}.{i % 256}"
        out.append(Service(ServiceKey("bench", f"svc-{i}"), (Frontend(FrontendType.CLUSTER_IP, vip, 80, Protocol.TCP, bes),)))
    return out


def sizes_for(n: int, backends: int) -> dict[str, int]:
    entries = n * (1 + backends)
    return {"kpr_svc": entries + 1024, "kpr_backend": n * backends + 1024, "kpr_revnat": n + 1024}


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def full_sync(n: int, backends: int, batch: bool) -> tuple[float, dict]:
    svcs = services(n, backends)
    addr_to_bytes.cache_clear()  # every run converts its addresses from scratch
    with scratch_pin_dir("kpr-bench") as pin:
        with ServiceMapWriter(pin, sizes=sizes_for(n, backends), batch=batch, create_datapath_maps=False) as w:
            t = timed(lambda: w.full_sync(svcs))
            ops = w.ops().values()
            syscalls = sum(o["syscalls"] for o in ops)
            sys_s = sum(o["syscall_ns"] for o in ops) / 1e9
            entries = sum(w.entry_counts().values())
    return t, {"syscalls": syscalls, "entries": entries, "syscall_s": sys_s}


def one_change(n: int, reps: int) -> float:
    svcs = services(n)
    with scratch_pin_dir("kpr-bench") as pin:
        with ServiceMapWriter(pin, sizes=sizes_for(n, 11), create_datapath_maps=False) as w:
            w.full_sync(svcs)
            a, b = svcs[0], services(1, extra=1)[0]  # the same service with one backend more
            times = []
            for i in range(reps):
                t = time.perf_counter()
                w.upsert(b if i % 2 == 0 else a)
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (1k / 5k services) for a smoke run")
    args = ap.parse_args()
    big, huge = (1000, 5000) if args.quick else (10_000, 50_000)

    print(f"1. full sync of {big} services x 10 backends")
    full_sync(100, 10, batch=True)  # warm-up: imports, first map creation
    tb, info_b = full_sync(big, 10, batch=True)
    to, info_o = full_sync(big, 10, batch=False)
    for label, t, info in (("batched:      ", tb, info_b), ("one at a time:", to, info_o)):
        print(
            f"   {label}    {t * 1e3:8.1f} ms total, {info['syscall_s'] * 1e3:7.1f} ms in {info['syscalls']} map "
            f"syscalls ({info['entries']} entries)"
        )
    print(f"   ratio one-at-a-time / batched: {to / tb:.2f}x total, {info_o['syscall_s'] / info_b['syscall_s']:.1f}x in syscalls")

    print(f"2. one service change (add a backend) with 100 vs {big} services in the maps")
    small = one_change(100, 1000)
    large = one_change(big, 1000)
    print(f"   at 100:           {small * 1e6:8.1f} us")
    print(f"   at {big}:{' ' * (13 - len(str(big)))}{large * 1e6:8.1f} us")
    print(f"   ratio: {large / small:.2f}x (1.0 = does not grow with the number of services)")

    print(f"3. Maglev table build, 10 backends, M={DEFAULT_SIZE}")
    bes = [(i, f"10.0.0.{i}:8080") for i in range(1, 11)]
    build_table(bes)
    mt = statistics.median(timed(lambda: build_table(bes)) for _ in range(30))
    print(f"   per service:      {mt * 1e3:8.2f} ms")

    print(f"4. full sync of {huge} services x 10 backends")
    th, info_h = full_sync(huge, 10, batch=True)
    print(f"   batched:          {th * 1e3:8.1f} ms  ({info_h['entries']} entries, {info_h['syscalls']} syscalls)")
    if huge == 50_000:
        print(f"   vs Cilium's {CILIUM_50K_MS:.0f} ms for 50k services: {th * 1e3 / CILIUM_50K_MS:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
