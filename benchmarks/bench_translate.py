"""Time kpr.translate on a large synthetic cluster.

10,000 ClusterIP services with one port each, every one backed by one EndpointSlice of
10 endpoints. Measures validate_object over every object and translate_service over
every service, once with cold address caches (an agent's first sync) and once warm (a
resync, where the same addresses come back). Run: python benchmarks/bench_translate.py
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

from kpr import translate
from kpr.model import NodeInfo

NODE = NodeInfo("node-0", ("192.168.0.10", "fd00:192::10"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pod_address(n: int) -> str:
    """The n-th address of a pod range starting at 10.128.0.0."""
    return f"10.{128 + (n >> 16)}.{(n >> 8) & 0xFF}.{n & 0xFF}"


def make_cluster(services: int, endpoints: int) -> list[tuple[dict, dict]]:
    """(Service, EndpointSlice) pairs; every address is distinct, as in a real cluster."""
    cluster = []
    for i in range(services):
        name = f"svc-{i}"
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": f"10.96.{i >> 8}.{i & 0xFF}",
                "clusterIPs": [f"10.96.{i >> 8}.{i & 0xFF}"],
                "ipFamilies": ["IPv4"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                "sessionAffinity": "None",
            },
        }
        base = i * endpoints
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-abcde",
                "namespace": "bench",
                "labels": {translate.SERVICE_NAME_LABEL: name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [pod_address(base + j)],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": f"node-{(base + j) % 100}",
                    "zone": f"zone-{j % 3}",
                }
                for j in range(endpoints)
            ],
        }
        cluster.append((svc, slice_))
    return cluster


def run_translate(cluster: list[tuple[dict, dict]]) -> None:
    for svc, slice_ in cluster:
        translate.translate_service(svc, [slice_], None, NODE)


def run_validate(cluster: list[tuple[dict, dict]]) -> None:
    for svc, slice_ in cluster:
        translate.validate_object(svc)
        translate.validate_object(slice_)


def measure(
    fn: Callable[[list], None], cluster: list, cold: bool, repeat: int
) -> tuple[float, float, float]:
    """(best wall, median wall, best CPU) seconds over `repeat` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        if cold:
            translate.clear_caches()
        else:
            fn(cluster)  # fill the caches, as a resync finds them
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        fn(cluster)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), statistics.median(walls), min(cpus)


def report(label: str, count: int, unit: str, figures: tuple[float, float, float]) -> None:
    best, median, cpu = figures
    print(
        f"  {label:44s} best {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms"
        f"  cpu {cpu * 1e3:6.0f} ms  ({best / count * 1e6:4.1f} us/{unit})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    cluster = make_cluster(args.services, args.endpoints)
    print(f"cpu:    {cpu_model()} ({os.cpu_count()} cpus)")
    print(f"python: {platform.python_implementation()} {platform.python_version()}")
    print(
        f"input:  {args.services} services x {args.endpoints} endpoints (one EndpointSlice each),"
        f" {args.services * args.endpoints} backends; best/median of {args.repeat}"
    )
    n_objects, n_services = 2 * len(cluster), len(cluster)
    print("validate_object, every Service and EndpointSlice:")
    report(
        "cold address cache (first sync)",
        n_objects,
        "object",
        measure(run_validate, cluster, True, args.repeat),
    )
    report(
        "warm address cache (resync)",
        n_objects,
        "object",
        measure(run_validate, cluster, False, args.repeat),
    )
    print("translate_service, every Service with its slice:")
    report(
        "cold caches (first sync)",
        n_services,
        "service",
        measure(run_translate, cluster, True, args.repeat),
    )
    report(
        "warm caches (resync)",
        n_services,
        "service",
        measure(run_translate, cluster, False, args.repeat),
    )
    report_memory(cluster)


def report_memory(cluster: list[tuple[dict, dict]]) -> None:
    """What the model of every service holds, against the manifests it came from."""
    import gc
    import tracemalloc

    gc.collect()
    translate.clear_caches()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    model = [translate.translate_service(svc, [slice_], None, NODE) for svc, slice_ in cluster]
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    copies = [copy.deepcopy(pair) for pair in cluster]
    manifests = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print("memory (tracemalloc):")
    print(
        f"  model of {len(model)} services            {(held - base) / 2**20:7.1f} MiB"
        f"  ({(held - base) / len(model):.0f} B/service, peak {(peak - base) / 2**20:.1f} MiB)"
    )
    print(f"  the manifests as dicts (baseline)       {manifests / 2**20:7.1f} MiB  ratio model/manifests {(held - base) / manifests:.2f}x")
    del copies


if __name__ == "__main__":
    main()
