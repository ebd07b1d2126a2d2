"""The kubernetes source against the files source, in one run, through the real agent.

For each size (100 and 10,000 Services, each with one EndpointSlice of 10 endpoints) and each
source, a `kpr run` process is started with the socklb plugin (on a child cgroup nothing
runs in) and the core's service map writer, fed either from a manifests directory or from the
test API server (kpr.testing.apiserver, in this process) holding the same objects. Measured:

- ready: from starting the process to the agent reporting ready (every plugin synced, the
  BPF maps written), and the store's own sync time (source start to initial state);
- peak RSS of the agent process (VmHWM);
- change latency: a Service's port changed at the source (an update at the API server, or a
  manifest file rewritten), until the new frontend is in the pinned kpr_svc map, polled
  every 0.5 ms; p50 and p99 over the changes.

The baseline is the files source on the same objects in the same run; its change latency is
dominated by its poll interval (source.pollInterval, 0.5 s by default). Root needed (BPF).

    .venv/bin/python benchmarks/bench_kubernetes_source.py [--sizes 100,10000] [--changes 50]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_files_source import cpu_model, manifests  # noqa: E402

from kpr import api as kapi  # noqa: E402
from kpr.bpf import maps as M  # noqa: E402
from kpr.bpf.cleanup import scratch_pin_dir  # noqa: E402
from kpr.testing.apiserver import KubeApiServer  # noqa: E402
from kpr.testing.cgroup import child_cgroup  # noqa: E402

ENDPOINTS = 10
PER_FILE = 100


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def objects(n: int) -> list[list[dict]]:
    """[service, slice] per service, with explicit ClusterIPs so both sources agree."""
    out = []
    for i in range(n):
        svc, es = manifests(i, ENDPOINTS)
        svc["spec"].pop("type", None)  # ClusterIP only: no nodePort allocation to differ
        svc["spec"]["clusterIP"] = cluster_ip(i)
        out.append([svc, es])
    return out


def svc_key(ip: str, port: int) -> bytes:
    return M.SVC_KEY.pack(M.addr_to_bytes(ip), M.htons(port), 6, M.SCOPE_EXTERNAL, 0, 0)


def write_files(d: Path, objs: list[list[dict]]) -> None:
    for f in range(0, len(objs), PER_FILE):
        items = [o for pair in objs[f : f + PER_FILE] for o in pair]
        (d / f"{f // PER_FILE:04d}.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(kind: str, n: int, changes: int, tmp: Path, api: KubeApiServer | None, objs: list[list[dict]]) -> dict:
    manifests_dir = tmp / f"m-{kind}-{n}"
    manifests_dir.mkdir()
    if kind == "files":
        write_files(manifests_dir, objs)
        source = f"{{kind: files, path: {manifests_dir}, statePath: {tmp}/alloc-{n}.json}}"
    else:
        assert api is not None
        source = f'{{kind: kubernetes, apiServer: "{api.url}", tokenFile: {api.token_file}, caFile: {api.ca_file}}}'
    with scratch_pin_dir("kpr-bench-k8s") as pin, child_cgroup("kpr-bench-k8s") as cg:
        cfg = tmp / f"kpr-{kind}-{n}.yaml"
        cfg.write_text(
            f"""
node: {{name: node0, addresses: [192.168.0.10], devices: [lo]}}
source: {source}
service: {{clusterCIDR: [10.96.0.0/12]}}
bpf: {{pinPath: {pin}, mapSizes: {{kprSvc: 262144, kprBackend: 262144}}}}
api: {{socket: {tmp}/kpr-{kind}-{n}.sock}}
metrics: {{address: ""}}
agent: {{stateDir: {tmp}/state-{kind}-{n}, shutdownTimeout: 10}}
plugins:
  socklb: {{enabled: true, cgroupPath: {cg}}}
"""
        )
        sock = tmp / f"kpr-{kind}-{n}.sock"
        log = open(tmp / f"agent-{kind}-{n}.log", "w")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "kpr.cli", "run", "--config", str(cfg)], stderr=log)
        try:
            status = None
            while time.perf_counter() - t0 < 300:
                if proc.poll() is not None:
                    raise RuntimeError(f"the agent exited; see {log.name}")
                try:
                    status = kapi.get(sock, "/v1/status")
                    if status.get("ready"):
                        break
                except kapi.ApiError:
                    pass
                time.sleep(0.01)
            ready = time.perf_counter() - t0
            assert status and status["ready"], "not ready in 300 s"
            assert status["services"] == n, status["services"]
            svc_map = M.BpfMap.open_pinned(pin / "kpr_svc")
            lat = []
            try:
                for k in range(changes):
                    i = (k * 7919) % n
                    port = 2000 + k
                    svc = objs[i][0]
                    svc["spec"]["ports"][0]["port"] = port
                    key = svc_key(cluster_ip(i), port)
                    t = time.perf_counter()
                    if kind == "files":
                        f = i // PER_FILE
                        write_files_one(manifests_dir, objs, f)
                    else:
                        cur = api.get("Service", svc["metadata"]["namespace"], svc["metadata"]["name"])
                        cur["spec"]["ports"][0]["port"] = port
                        api.update(cur)
                    while svc_map.lookup(key) is None:
                        if time.perf_counter() - t > 10:
                            raise RuntimeError(f"change {k} not in the map after 10 s")
                        time.sleep(0.0005)
                    lat.append(time.perf_counter() - t)
            finally:
                svc_map.close()
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            subprocess.run([sys.executable, "-m", "kpr.cli", "cleanup", "--config", str(cfg)], capture_output=True)
            log.close()
    lat.sort()
    return {
        "ready": ready,
        "sync": status["source"]["syncSeconds"],
        "rss": rss,
        "p50": statistics.median(lat) * 1000,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
    }


def write_files_one(d: Path, objs: list[list[dict]], f: int) -> None:
    items = [o for pair in objs[f * PER_FILE : (f + 1) * PER_FILE] for o in pair]
    tmpf = d / f".{f:04d}.json.tmp"
    tmpf.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    os.rename(tmpf, d / f"{f:04d}.json")  # atomic, as editors and ConfigMaps do


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,10000")
    ap.add_argument("--changes", type=int, default=50)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (BPF maps, a child cgroup)", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; agent = `kpr run` with socklb + the service map writer")
    print(f"{'services':>8} {'source':<10} {'ready s':>8} {'sync s':>7} {'peak RSS MB':>11} {'change p50 ms':>13} {'p99 ms':>7}")
    with tempfile.TemporaryDirectory(prefix="kpr-bench-k8s-") as tmpd:
        tmp = Path(tmpd)
        for n in sizes:
            for kind in ("files", "kubernetes"):
                objs = objects(n)
                if kind == "kubernetes":
                    with KubeApiServer() as api:
                        api.apply_many(o for pair in objs for o in pair)
                        r = run(kind, n, args.changes, tmp, api, objs)
                else:
                    r = run(kind, n, args.changes, tmp, None, objs)
                print(f"{n:>8} {kind:<10} {r['ready']:>8.2f} {r['sync']:>7.2f} {r['rss']:>11.0f} {r['p50']:>13.1f} {r['p99']:>7.1f}", flush=True)
    print("ready: process start to every plugin synced; sync: source start to the store's initial state;")
    print(f"change: a Service's port changed at the source until the new frontend is in kpr_svc ({args.changes} changes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
