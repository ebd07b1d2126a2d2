"""Service map writer benchmarks (not a test): prints timings and the ratios that matter.

    sudo .venv/bin/python benchmarks/bench_servicemaps.py [--quick] [--reps N] [--no-iptables]

In one run, every service a ClusterIP with 10 backends of its own (the shape of issue 13's
figures), medians of --reps runs:

1. Full sync of 10k and 50k services into empty maps, against Cilium's published 50k
   services in 708 ms (also with 1% of the services NodePorts or with a terminating backend);
   then a restart over them: open (adopting the maps) and the full sync of the same services; beside it kube-proxy's shape of the same 10k services loaded with
   `iptables-restore` into a scratch network namespace (never the host's tables).
2. Full sync of 10k batched vs one element at a time (what the batch syscalls buy).
3. 1000 new services applied (one upsert each, as the bus delivers them) on top of 0, 10k
   and 50k services: should cost the same whatever is already there.
4. One service change (a backend more, then back) with 100 vs 50k services in the maps.
5. Shrinking the maps from 50k services to 10 with a full sync.
6. Maglev table build per service.

Ends with the summary lines `full sync 10000: N ms` and `full sync 50000: N ms`. Each writer
uses its own scratch pin dir (kpr.bpf.cleanup.scratch_pin_dir), removed afterwards; the
namespace is this run's own (kpr.testing.netns.Topology), removed afterwards.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from kpr.bpf.cleanup import scratch_pin_dir
from kpr.bpf.maglev import DEFAULT_SIZE, build_table
from kpr.bpf.maps import addr_to_bytes
from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter
from kpr.servicemaps.slots import size_class

CILIUM_50K_MS = 708.0  # Cilium's load-balancer control plane: 50,000 services in 708 ms
GOAL_10K_MS = 150.0
BACKENDS = 10


def _svc(i: int, backends: int = BACKENDS, extra: int = 0) -> Service:
    """Service number i: VIP and backends of its own (addresses unique up to 2^20 services)."""
    bes = tuple(
        Backend(f"10.{64 + (i * backends + j) // 65536}.{(i * backends + j) // 256 % 256}.{(i * backends + j) % 256}", 8080)
        for j in range(backends + extra)
    )
    vip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return Service(ServiceKey("bench", f"svc-{i}"), (Frontend(FrontendType.CLUSTER_IP, vip, 80, Protocol.TCP, bes),))


def services(n: int, backends: int = BACKENDS, start: int = 0) -> list[Service]:
    return [_svc(i, backends) for i in range(start, start + n)]


def mixed_services(n: int) -> list[Service]:
    """services(n) with 1% of another kind, as real clusters hold: every 200th a NodePort
    (its own port on a node address, and its wildcard entry), every 200th (offset 100) a
    ClusterIP with one backend terminating."""
    out = services(n)
    for i in range(0, n, 100):
        fe = out[i].frontends[0]
        if i % 200 == 0:
            fe = Frontend(FrontendType.NODE_PORT, "192.0.2.1", 30000 + i // 200 % 2768, Protocol.TCP, fe.backends)
        else:
            fe = Frontend(fe.type, fe.address, fe.port, fe.protocol,
                          (*fe.backends[1:], replace(fe.backends[0], state=BackendState.TERMINATING)))
        out[i] = Service(out[i].key, (fe,))
    return out


def sizes_for(n: int, backends: int = BACKENDS) -> dict[str, int]:
    # one kpr_svc entry per service; its backend slots in a kpr_slots range of a size class
    # (12 for 10), and room for the ranges the benchmark's changes take beside them
    return {
        "kpr_svc": n + 1024, "kpr_slots": (n + 2048) * size_class(backends + 1), "kpr_backend": n * backends + 1024,
        "kpr_revnat": n + 1024,
    }


@contextmanager
def writer(n: int, **kw: object) -> Iterator[ServiceMapWriter]:
    """An open writer on maps of their own, sized for n services."""
    with scratch_pin_dir("kpr-bench") as pin:
        with ServiceMapWriter(pin, sizes=sizes_for(n), create_datapath_maps=False, **kw) as w:  # type: ignore[arg-type]
            yield w


def timed(fn: Callable[[], object]) -> float:
    return timed_cpu(fn)[0]


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn: CPU time (this process, kernel time in its syscalls included)
    says what the code costs when other helpers' load stretches the wall clock."""
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def full_sync(n: int, reps: int, batch: bool = True, general: bool = False, mixed: bool = False) -> tuple[float, dict]:
    """Median seconds of a full sync of n services into empty maps; its median CPU seconds and
    the syscall figures of the last run in the dict. general: service by service, as a full
    sync over maps already holding services is written (the list-at-a-time path for empty
    maps, kpr.servicemaps.bulk, turned off). mixed: 1% of the services of another kind
    (mixed_services)."""
    svcs = mixed_services(n) if mixed else services(n)
    times, cpu, info = [], [], {}
    for _ in range(reps):
        addr_to_bytes.cache_clear()  # every run converts its addresses from scratch
        with writer(n, batch=batch) as w:
            if general:
                w._bulk_sync = lambda _services: None  # type: ignore[method-assign]
            wall, c = timed_cpu(lambda: w.full_sync(svcs))
            times.append(wall)
            cpu.append(c)
            ops = w.ops().values()
            info = {
                "syscalls": sum(o["syscalls"] for o in ops),
                "syscall_s": sum(o["syscall_ns"] for o in ops) / 1e9,
                "entries": sum(w.entry_counts().values()),
            }
    info["cpu_s"] = statistics.median(cpu)
    return statistics.median(times), info


def restart(n: int, general: bool = False, mixed: bool = False) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of a restart over maps holding n services: open() adopting them,
    then the full sync of the same services (nothing to write). general: as before the
    adopted groups were compared list at a time (every service rendered and diffed, the
    maps read again by the full sync)."""
    svcs = mixed_services(n) if mixed else services(n)
    with scratch_pin_dir("kpr-bench") as pin:
        with ServiceMapWriter(pin, sizes=sizes_for(n), create_datapath_maps=False) as w:
            w.full_sync(svcs)
        gc.collect()
        w = ServiceMapWriter(pin, sizes=sizes_for(n), create_datapath_maps=False)
        out = {"open": timed_cpu(w.open)}
        try:
            if general:
                w._sync_adopted = lambda _services: False  # type: ignore[method-assign]
                w._as_read = False
            out["sync"] = timed_cpu(lambda: w.full_sync(svcs))
            assert sum(o["update"] + o["delete"] for o in w.ops().values()) == 0
        finally:
            w.close()
    return out


def add_1000(base: int, reps: int, compact: bool = False) -> tuple[float, float]:
    """Median (wall, CPU) seconds to upsert 1000 new services, one at a time, on top of `base`
    services; after one round not counted (its first touches of freshly filled maps and
    tables cost more than any later round's). `compact`: the backend identities moved into the
    compact table after the sync and between rounds, as an agent's checker thread does
    (bench_servicemaps_ids.py)."""
    new = services(1000, start=base)
    times, cpu = [], []
    with writer(base + 1000) as w:
        w.full_sync(services(base))
        if compact:
            w.compact_ids()
        for i in range(reps + 1):
            wall, c = timed_cpu(lambda: [w.upsert(s) for s in new])
            if i:
                times.append(wall)
                cpu.append(c)
            for s in new:
                w.delete(s.key)
            if compact:
                w.compact_ids()  # (what the checker thread does between rounds: nothing waits)
    return statistics.median(times), statistics.median(cpu)


def one_change(n: int, reps: int, compact: bool = False) -> float:
    """Median seconds of one upsert changing a service (a backend more, then back) among n;
    `compact` as for add_1000."""
    svcs = services(n)
    a, b = svcs[0], _svc(0, extra=1)
    times = []
    with writer(n + 1) as w:
        w.full_sync(svcs)
        if compact:
            w.compact_ids()
        gc.collect()
        for i in range(reps):
            t = time.perf_counter()
            w.upsert(b if i % 2 == 0 else a)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def shrink(n: int, to: int, reps: int) -> float:
    """Median seconds of a full sync of `to` services over maps holding n."""
    svcs = services(n)
    times = []
    for _ in range(reps):
        with writer(n) as w:
            w.full_sync(svcs)
            times.append(timed(lambda: w.full_sync(svcs[:to])))
    return statistics.median(times)


def kube_proxy_rules(n: int, backends: int = BACKENDS) -> str:
    """iptables-restore input shaped like kube-proxy's (iptables mode) for the same services:
    KUBE-SERVICES jumps per ClusterIP, a KUBE-SVC chain per service with the masquerade mark and
    one statistic-random jump per endpoint, a KUBE-SEP chain per endpoint with its DNAT."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    rules = [
        "-A PREROUTING -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment kubernetes-postrouting-rules -j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
    ]
    for s in services(n, backends):
        fe = s.frontends[0]
        name = f"{s.key.namespace}/{s.key.name}:http"
        svc_chain = f"KUBE-SVC-{s.key.name.upper().replace('-', '')[:20]}"
        chains.append(f":{svc_chain} - [0:0]")
        rules.append(
            f'-A KUBE-SERVICES -d {fe.address}/32 -p tcp -m comment --comment "{name} cluster IP" '
            f"-m tcp --dport {fe.port} -j {svc_chain}"
        )
        rules.append(
            f'-A {svc_chain} ! -s 10.244.0.0/16 -d {fe.address}/32 -p tcp -m comment --comment "{name} cluster IP" '
            f"-m tcp --dport {fe.port} -j KUBE-MARK-MASQ"
        )
        for j, b in enumerate(fe.backends):
            sep = f"KUBE-SEP-{s.key.name.upper().replace('-', '')[:14]}E{j}"
            chains.append(f":{sep} - [0:0]")
            left = len(fe.backends) - j
            stat = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(f'-A {svc_chain} -m comment --comment "{name} -> {b.address}:{b.port}" {stat}-j {sep}')
            rules.append(f'-A {sep} -s {b.address}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp -j DNAT --to-destination {b.address}:{b.port}')
    return "\n".join(["*nat", *chains, *rules, "COMMIT"]) + "\n"


def iptables_restore(n: int) -> float | str:
    """Seconds iptables-restore takes to load kube-proxy's rules for n services into a scratch
    netns; a string saying why it could not run."""
    from kpr.testing.netns import Topology

    text = kube_proxy_rules(n)
    with Topology(f"kb{os.getpid() % 100000}") as topo:
        ns = topo.add_namespace("ipt").netns
        t = time.perf_counter()
        r = subprocess.run(["ip", "netns", "exec", ns, "iptables-restore"], input=text, capture_output=True, text=True)
        took = time.perf_counter() - t
    if r.returncode != 0:
        return f"iptables-restore failed: {r.stderr.strip()[:200]}"
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (1k / 5k services) for a smoke run")
    ap.add_argument("--reps", type=int, default=3, help="runs per figure (medians)")
    ap.add_argument("--no-iptables", action="store_true", help="skip the kube-proxy iptables-restore comparison")
    args = ap.parse_args()
    big, huge = (1000, 5000) if args.quick else (10_000, 50_000)
    reps = max(1, args.reps)
    print(f"start: {load()}, {os.cpu_count()} CPUs; medians of {reps} runs")

    full_sync(100, 1)  # warm-up: imports, first map creation
    print(f"1. full sync of N services x {BACKENDS} backends into empty maps (beside it, interleaved: the same "
          "written service by service, as over maps already holding services)")
    sync: dict[int, float] = {}
    mixed: dict[int, tuple] = {}
    kinds = {"": {}, " (1% other kinds)": {"mixed": True}, " (service by service)": {"general": True},
             " (1% other kinds, service by service)": {"mixed": True, "general": True}}
    for n in (big, huge):
        runs: dict[str, list[tuple[float, dict]]] = {k: [] for k in kinds}
        for _ in range(reps):  # one of each in turn: all see the same load
            for kind, kw in kinds.items():
                runs[kind].append(full_sync(n, 1, **kw))
        med = {
            kind: (statistics.median(r[0] for r in rs), statistics.median(r[1]["cpu_s"] for r in rs), rs[-1][1])
            for kind, rs in runs.items()
        }
        sync[n] = med[""][0]
        mixed[n] = med[" (1% other kinds)"]
        for kind, (t, c, info) in med.items():
            vs = f"; {t / med[''][0]:.2f}x, CPU {c / med[''][1]:.2f}x" if kind else ""
            print(
                f"   {n:6d} services{kind}: {t * 1e3:8.1f} ms, CPU {c * 1e3:7.1f} ms"
                f"  ({info['entries']} entries, {info['syscalls']} syscalls, {info['syscall_s'] * 1e3:.1f} ms in them){vs}"
            )
        print(f"   ({load()})")
    if not args.no_iptables:
        ipt = iptables_restore(big)
        if isinstance(ipt, str):
            print(f"   kube-proxy iptables-restore of {big}: skipped ({ipt})")
        else:
            print(f"   kube-proxy iptables-restore of the same {big} services: {ipt * 1e3:8.1f} ms "
                  f"({ipt / sync[big]:.0f}x the writer's full sync)")
    goal = huge == 50_000
    if goal:
        print(f"   50k vs Cilium's {CILIUM_50K_MS:.0f} ms: {sync[huge] * 1e3 / CILIUM_50K_MS:.2f}x; "
              f"10k vs the goal {GOAL_10K_MS:.0f} ms: {sync[big] * 1e3 / GOAL_10K_MS:.2f}x")

    print(f"1b. restart over maps holding N services: open (adopt) + full sync of the same (nothing to write); "
          "beside it, interleaved, the same before the list-at-a-time comparison")
    for n in (big, huge):
        for mixed_kind in (False, True):
            rr: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(reps):
                for general in (False, True):
                    rr[general].append(restart(n, general=general, mixed=mixed_kind))
            med = {g: {k: tuple(statistics.median(r[k][x] for r in rs) for x in (0, 1)) for k in ("open", "sync")}
                   for g, rs in rr.items()}
            for general, m in med.items():
                tot = m["open"][1] + m["sync"][1]
                base = med[False]["open"][1] + med[False]["sync"][1]
                print(f"   {n:6d}{' (1% other kinds)' if mixed_kind else ''}{' before' if general else ''}: open "
                      f"{m['open'][0] * 1e3:7.1f} ms (CPU {m['open'][1] * 1e3:7.1f}), full sync {m['sync'][0] * 1e3:7.1f} ms "
                      f"(CPU {m['sync'][1] * 1e3:7.1f}); CPU in all {tot * 1e3:7.1f} ms"
                      + (f" ({tot / base:.2f}x)" if general else ""))
    print(f"   ({load()})")

    print(f"2. full sync of {big}: batched vs one element at a time")
    to, info_o = full_sync(big, 1, batch=False)
    print(f"   one at a time: {to * 1e3:8.1f} ms ({info_o['syscalls']} syscalls); {to / sync[big]:.1f}x batched")

    print("3. 1000 new services (one upsert each) on top of N")
    add = {base: add_1000(base, reps) for base in (0, big, huge)}
    adds = {base: t for base, (t, _c) in add.items()}
    for base, (t, c) in add.items():
        print(f"   on top of {base:6d}: {t * 1e3:8.1f} ms ({t / adds[0]:.2f}x on top of 0), "
              f"CPU {c * 1e3:7.1f} ms ({c / add[0][1]:.2f}x)")

    print(f"4. one service change with 100 vs {huge} services in the maps")
    small, large = one_change(100, 1000), one_change(huge, 1000)
    print(f"   at 100: {small * 1e6:8.1f} us; at {huge}: {large * 1e6:8.1f} us; ratio {large / small:.2f}x")

    print(f"5. shrinking from {huge} services to 10 (a full sync of 10)")
    sh = shrink(huge, 10, reps)
    print(f"   {sh * 1e3:8.1f} ms")

    print(f"6. Maglev table build, 10 backends, M={DEFAULT_SIZE}")
    bes = [(i, f"10.0.0.{i}:8080") for i in range(1, 11)]
    build_table(bes)
    mt = statistics.median(timed(lambda: build_table(bes)) for _ in range(30))
    print(f"   per service: {mt * 1e3:8.2f} ms")

    print(f"end: {load()}")
    add_ratio = adds[huge] / adds[0]
    chg_ratio = large / small
    print(f"goals: +1000 on top of {huge} {add_ratio:.2f}x of on top of 0, CPU {add[huge][1] / add[0][1]:.2f}x (goal 1.2x); "
          f"one change at {huge} {chg_ratio:.2f}x of at 100 (goal 1.2x)")
    print(f"full sync {big}: {sync[big] * 1e3:.0f} ms")
    print(f"full sync {huge}: {sync[huge] * 1e3:.0f} ms")
    for n in (big, huge):
        print(f"full sync {n} with 1% other kinds: {mixed[n][0] * 1e3:.0f} ms, CPU {mixed[n][1] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
