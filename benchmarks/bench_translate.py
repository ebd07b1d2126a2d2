"""Time kpr.translate on a large synthetic cluster.

10,000 ClusterIP services with one port each, every one backed by one EndpointSlice of
10 endpoints. Measures validate_object over every object and translate_service over
every service, once with cold address caches (an agent's first sync) and once warm (a
resync, where the same addresses come back). Run: python benchmarks/bench_translate.py
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

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
                    "addresses": [f"10.{128 + ((base + j) >> 16)}.{((base + j) >> 8) & 0xFF}.{(base + j) & 0xFF}"],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": f"node-{(base + j) % 100}",
                    "zone": f"zone-{j % 3}",
                }
                for j in range(endpoints)
            ],
        }
        cluster.append((svc, slice_))
    return cluster


def run_translate(cluster: list[tuple[dict, dict]]) -> float:
    start = time.perf_counter()
    for svc, slice_ in cluster:
        translate.translate_service(svc, [slice_], None, NODE)
    return time.perf_counter() - start


def run_validate(cluster: list[tuple[dict, dict]]) -> float:
    start = time.perf_counter()
    for svc, slice_ in cluster:
        translate.validate_object(svc)
        translate.validate_object(slice_)
    return time.perf_counter() - start


def timed(fn, cluster, cold: bool, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        if cold:
            translate.clear_caches()
        else:
            fn(cluster)  # fill the caches
        gc.collect()
        times.append(fn(cluster))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cluster = make_cluster(args.services, args.endpoints)
    objects = 2 * len(cluster)
    backends = args.services * args.endpoints
    print(f"cpu:    {cpu_model()}")
    print(f"python: {platform.python_implementation()} {platform.python_version()}")
    print(f"input:  {args.services} services x {args.endpoints} endpoints (one slice each), {backends} backends")
    for label, fn, count in (
        ("validate_object (all objects)", run_validate, objects),
        ("translate_service (all services)", run_translate, args.services),
    ):
        for cold in (True, False):
            times = timed(fn, cluster, cold, args.repeat)
            best, median = min(times), statistics.median(times)
            print(
                f"{label:34s} {'cold' if cold else 'warm'}: best {best * 1e3:7.1f} ms,"
                f" median {median * 1e3:7.1f} ms ({best / count * 1e6:5.1f} us/object)"
            )


if __name__ == "__main__":
    main()
