"""How long the files source takes to read a big manifests directory.

Writes N services and N EndpointSlices (10 endpoints each) into F files in a temp dir, then
times: the initial full scan into a counting sink (parse, validate, allocate, diff), the
translation of every service (kpr.translate.translate_service), an idle poll, a pass after
one file changed, a restart on the saved allocations, and the whole initial sync as the
agent does it (source into the real ObjectStore: read, validate, allocate, index, translate,
with a publisher that only counts), and the same split as the agent splits it (the read-ahead
its plugins' start overlaps, then the first pass). Wall and CPU time per step (CPU is what a
busy machine inflates less).

    .venv/bin/python benchmarks/bench_files_source.py [--services 10000] [--files 100] [--format json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kpr import memory
from kpr.allocator import Allocator
from kpr.config import PortRange
from kpr.model import NodeInfo
from kpr.sources.files import FilesSource
from kpr.store import ObjectStore

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class CountingSink:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.upserts = 0
        self.deletes = 0
        self.errors: dict[str, str] = {}
        self.synced_at: float | None = None

    def apply(self, upserts: list[dict], deletes: list[tuple[str, str, str]]) -> None:
        self.upserts += len(upserts)
        self.deletes += len(deletes)
        for ref in deletes:
            self.objects.pop(ref, None)
        for o in upserts:
            o = memory.unpack(o)  # the source hands objects packed
            m = o["metadata"]
            self.objects[(o["kind"], m["namespace"], m["name"])] = o

    def synced(self) -> None:
        self.synced_at = time.perf_counter()

    def report_error(self, origin: str, reason: str) -> None:
        self.errors[origin] = reason

    def clear_error(self, origin: str) -> None:
        self.errors.pop(origin, None)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def manifests(i: int, endpoints: int) -> list[dict]:
    ns = f"ns{i % 50}"
    name = f"svc{i}"
    spec: dict = {
        "selector": {"app": name},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    if i % 10 == 0:
        spec["type"] = "NodePort"  # 10%: exercises nodePort allocation
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}
    eps = [
        {
            "addresses": [f"10.244.{(i * endpoints + j) // 250 % 256}.{(i * endpoints + j) % 250 + 1}"],
            "conditions": {"ready": True},
            "nodeName": f"node{j % 5}",
        }
        for j in range(endpoints)
    ]
    es = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-abcde", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }
    return [svc, es]


class CountingPublisher:
    def __init__(self) -> None:
        self.upserts = 0

    def upsert(self, service) -> None:
        self.upserts += 1

    def delete(self, key) -> None:
        pass

    def sync_complete(self) -> None:
        pass


def timed(label: str, fn, results: list[tuple[str, float, float]]):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    results.append((label, time.perf_counter() - t0, time.process_time() - c0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--format", choices=("yaml", "json"), default="yaml",
                    help="yaml: multi-document files; json: one kind: List per file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kpr-bench-") as tmp:
        root = Path(tmp)
        d = root / "services.d"
        d.mkdir()
        per_file = -(-args.services // args.files)
        t0 = time.perf_counter()
        total_bytes = 0
        for f in range(args.files):
            docs = [doc for i in range(f * per_file, min((f + 1) * per_file, args.services)) for doc in manifests(i, args.endpoints)]
            if args.format == "json":
                text = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
            else:
                text = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)
            (d / f"{f:03d}.{args.format}").write_text(text)
            total_bytes += len(text)
        gen = time.perf_counter() - t0

        results: list[tuple[str, float, float]] = []
        state = root / "state" / "allocations.json"
        rng = PortRange(first=30000, last=32767)
        src = FilesSource(d, Allocator(state, ["10.96.0.0/12"], rng))
        sink = CountingSink()
        timed("initial scan (parse+validate+allocate+diff)", lambda: src.scan_once(sink), results)
        if sink.errors:
            print("errors:", list(sink.errors.items())[:3], file=sys.stderr)
            return 1
        assert sink.upserts == 2 * args.services, sink.upserts

        translated = None
        try:
            from kpr import translate
            from kpr.model import NodeInfo
        except ImportError:
            translate = None
        if translate is not None:
            node = NodeInfo(name="node0", addresses=("192.168.0.10",))
            slices: dict[tuple[str, str], list[dict]] = {}
            for (kind, ns, _), o in sink.objects.items():
                if kind == "EndpointSlice":
                    slices.setdefault((ns, o["metadata"]["labels"]["kubernetes.io/service-name"]), []).append(o)
            svcs = [o for (kind, _, _), o in sink.objects.items() if kind == "Service"]

            def translate_all() -> int:
                n = 0
                for o in svcs:
                    m = o["metadata"]
                    s = translate.translate_service(o, slices.get((m["namespace"], m["name"]), []), None, node)
                    n += len(s.frontends) if s else 0
                return n

            translated = timed("translate all services", translate_all, results)

        timed("idle poll (nothing changed)", lambda: src.scan_once(sink), results)
        victim = d / f"042.{args.format}"
        old = '"nodeName": "node1"' if args.format == "json" else "nodeName: node1"
        victim.write_text(victim.read_text().replace(old, old.replace("node1", "node9")))
        before = sink.upserts
        timed("pass after one file changed", lambda: src.scan_once(sink), results)
        changed = sink.upserts - before

        src2 = FilesSource(d, Allocator(state, ["10.96.0.0/12"], rng))
        sink2 = CountingSink()
        timed("restart: initial scan with saved allocations", lambda: src2.scan_once(sink2), results)
        same = all(
            sink2.objects[r]["spec"] == o["spec"] for r, o in sink.objects.items() if r[0] == "Service"
        )

        src3 = FilesSource(d, Allocator(root / "state3" / "allocations.json", ["10.96.0.0/12"], rng))
        pub = CountingPublisher()
        store = ObjectStore(NodeInfo(name="node0", addresses=("192.168.0.10",)), pub, cluster_cidrs=["10.96.0.0/12"])
        timed("initial sync into the store (read..translate)", lambda: src3.scan_once(store), results)
        assert pub.upserts == args.services and not store.errors, (pub.upserts, list(store.errors.items())[:3])

        # As the agent does it: read-ahead while the plugins start, then the first pass.
        src4 = FilesSource(d, Allocator(root / "state4" / "allocations.json", ["10.96.0.0/12"], rng))
        pub4 = CountingPublisher()
        store4 = ObjectStore(NodeInfo(name="node0", addresses=("192.168.0.10",)), pub4, cluster_cidrs=["10.96.0.0/12"])

        def read_ahead() -> None:
            src4.preload()
            src4._preload_thread.join()

        timed("  read-ahead (FilesSource.preload)", read_ahead, results)
        timed("  then the first pass into the store", lambda: src4.scan_once(store4), results)
        assert pub4.upserts == args.services and not store4.errors

    print(f"cpu: {cpu_model()} ({platform.python_implementation()} {platform.python_version()}, "
          f"libyaml={'yes' if yaml.__with_libyaml__ else 'no'})")
    print(f"input: {args.services} services + {args.services} EndpointSlices x {args.endpoints} endpoints "
          f"in {args.files} {args.format} files, {total_bytes / 1e6:.1f} MB (generated in {gen:.1f}s)")
    print(f"  {'':<48} {'wall':>9}    {'cpu':>9}")
    for label, dt, cpu in results:
        print(f"  {label:<48} {dt * 1000:9.1f} ms {cpu * 1000:9.1f} ms")
    initial = results[0][1]
    print(f"  initial scan rate: {2 * args.services / initial:,.0f} objects/s")
    if translated is not None:
        print(f"  frontends after translation: {translated}")
    print(f"  objects re-sent after one file changed: {changed}")
    print(f"  allocations identical after restart: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
