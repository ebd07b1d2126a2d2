"""Time lb_ipam's allocator: is one allocation as cheap at 10k services as at 0?

- full: allocating 10,000 LoadBalancer services (one batch, as at start-up) from a /16 pool;
- one new service (allocate, then delete) with 0 and with 10,000 already allocated, the
  ratio being the point (goal: 1.0, i.e. no step scans the allocated addresses);
- one requested (pinned) address over an automatic holder at 0 and at 10,000;
- the same with a sharing key (groups of 4 services);
- the new service at 10,000 in a /12 (the same count at 1/16 the fill), which separates
  the cost of the count (should be none) from that of the fill (longer probe runs: a /16
  holding 10k is 15% full);
- end to end with the files source: 10,000 LoadBalancer services in one manifest until every
  one reaches the sink with its address, at a first start (one pass, lb_ipam decides and
  writes, a second pass delivers) and a restart (the allocation state holds them), against
  the same source delivering the services without lb_ipam.

Medians of single changes, the two sides interleaved in one process. Run:
python benchmarks/bench_lb_ipam.py [--services 10000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from kpr import memory
from kpr.allocator import Allocator
from kpr.config import PortRange
from kpr.plugins.lb_ipam.plugin import LbIpam
from kpr.sources.files import FilesSource

from kpr.plugins.lb_ipam.allocator import LbAllocator
from kpr.plugins.lb_ipam.config import LbIpamConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_files_source import cpu_model  # noqa: E402

POOL = {"name": "bench", "addresses": ["10.200.0.0/16"]}


def service(i: int, name: str = "", sharing: bool = False, ip: str = "") -> dict:
    meta: dict = {"name": name or f"svc-{i}", "namespace": "bench"}
    if sharing:
        meta["annotations"] = {"lbipam.kpr.io/sharing-key": f"group-{i // 4}"}
    spec: dict = {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ports": [{"port": 80 + i % 4, "protocol": "TCP"}]}
    if ip:
        spec["loadBalancerIP"] = ip
    return {"kind": "Service", "metadata": meta, "spec": spec}


def allocator(cidr: str = "10.200.0.0/16") -> LbAllocator:
    cfg = LbIpamConfig.model_validate({"pools": [{**POOL, "addresses": [cidr]}]})
    return LbAllocator(cfg.pools, cfg.load_balancer_class)


def filled(n: int, sharing: bool = False, cidr: str = "10.200.0.0/16") -> LbAllocator:
    a = allocator(cidr)
    a.update([service(i, sharing=sharing) for i in range(n)])
    return a


def new_service(r: int, sharing: bool = False) -> dict:
    return service(1_000_000 + r, name=f"new-{r}", sharing=sharing)


def pinned_service(r: int, sharing: bool = False) -> dict:
    # Addresses spread over the pool: some are free, some held by an automatic service.
    return service(2_000_000 + r, name=f"pin-{r}", ip=f"10.200.{(r * 37) % 256}.{(r * 11) % 256}")


def timed(a: LbAllocator, obj: dict) -> float:
    """Seconds for one change and its undo: the service added, then deleted."""
    started = time.perf_counter()
    a.update([obj])
    a.update([], [f"bench/{obj['metadata']['name']}"])
    return time.perf_counter() - started


class _Sink:
    """Counts services delivered, and those with a LoadBalancer address."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: set[str] = set()
        self.with_address: set[str] = set()

    def apply(self, upserts: list, deletes: list) -> None:
        with self.lock:
            for obj in upserts:
                obj = memory.unpack(obj)
                name = obj["metadata"]["name"]
                self.services.add(name)
                if ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress"):
                    self.with_address.add(name)

    def synced(self) -> None:
        pass

    def report_error(self, origin: str, reason: str) -> None:
        raise SystemExit(f"source error {origin}: {reason[:200]}")

    def clear_error(self, origin: str) -> None:
        pass


def probes(a: LbAllocator, make, sharing: bool, reps: int = 2000) -> float:
    """Slots the tables looked at per change (add + delete), on average: the work itself,
    free of the machine's noise."""
    before = sum(t.probes for t in a.tables.values())
    for r in range(reps):
        timed(a, make(5_000_000 + r, sharing))
    return (sum(t.probes for t in a.tables.values()) - before) / reps


def files_end_to_end(n: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-lb-ipam-"))
    (base / "m").mkdir()
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": "bench"},
         "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": False, "ipFamilies": ["IPv4"],
                  "ports": [{"port": 80, "protocol": "TCP"}]}}
        for i in range(n)
    ]
    (base / "m" / "svc.yaml").write_text(yaml.safe_dump_all(docs))

    def run(with_plugin: bool, state: str) -> float:
        alloc = Allocator(base / state, ["10.96.0.0/12"], PortRange(first=30000, last=32767))
        source = FilesSource(base / "m", alloc, poll_interval=0.05)
        sink = _Sink()
        plugin = None
        started = time.perf_counter()
        if with_plugin:
            plugin = LbIpam()
            plugin.config = LbIpamConfig.model_validate({"pools": [POOL]})
            plugin.start(source)
        source.start(sink)
        done = (lambda: len(sink.with_address) == n) if with_plugin else (lambda: len(sink.services) == n)
        while not done():
            time.sleep(0.005)
        took = time.perf_counter() - started
        if plugin is not None:
            plugin.stop()
        source.stop()
        return took

    try:
        without = run(False, "plain.json")
        first = run(True, "lb.json")
        restart = run(True, "lb.json")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"files source, {n} LoadBalancer services until all delivered: without lb_ipam {without:.2f}s; "
          f"with lb_ipam, first start {first:.2f}s ({first / without:.2f}x), restart {restart:.2f}s ({restart / without:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    n = args.services
    print(f"cpu: {cpu_model()} x{os.cpu_count()}, load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"pool /16 (65,536 addresses), {n} services, {args.rounds * args.reps} timed changes per case and side, medians")

    full = []
    for _ in range(max(3, args.rounds // 3)):
        started = time.perf_counter()
        filled(n)
        full.append(time.perf_counter() - started)
    t_full = statistics.median(full)
    print(f"allocate {n} in one batch: {t_full * 1000:.0f} ms ({t_full / n * 1e6:.1f} us per service)")

    empty, big = allocator(), filled(n)
    empty_s, big_s = filled(0, sharing=True), filled(n, sharing=True)
    sparse = filled(n, cidr="10.192.0.0/12")
    rows = {"new service": ([], []), "pinned address": ([], []), "new service, sharing key": ([], []),
            "new service, /12 pool": ([], [])}
    cases = {
        "new service": (empty, big, new_service, False),
        "pinned address": (empty, big, pinned_service, False),
        "new service, sharing key": (empty_s, big_s, new_service, True),
        "new service, /12 pool": (empty, sparse, new_service, False),
    }
    for r in range(args.rounds * args.reps):
        # Each change timed alone and the two sides interleaved: a burst of load from
        # elsewhere hits single samples, which the median ignores, and both sides alike.
        for what, (at0, atn, make, sharing) in cases.items():
            rows[what][0].append(timed(at0, make(r, sharing)))
            rows[what][1].append(timed(atn, make(r, sharing)))
    print(f"{'one change (add + delete)':28} {'at 0':>10} {'at ' + str(n):>10} {'ratio':>7}   slots probed per change")
    for what, (at0, atn) in rows.items():
        m0, mn = statistics.median(at0), statistics.median(atn)
        a0, an = cases[what][0], cases[what][1]
        p0, pn = probes(a0, cases[what][2], cases[what][3]), probes(an, cases[what][2], cases[what][3])
        print(f"{what:28} {m0 * 1e6:8.1f}us {mn * 1e6:8.1f}us {mn / m0:7.2f}   {p0:.2f} vs {pn:.2f}")
    files_end_to_end(n)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
