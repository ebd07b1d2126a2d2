"""The agent's memory and time to ready as the number of services grows.

For each size (0, 1k, 10k and 20k Services, each with one EndpointSlice of 10 endpoints, as
JSON manifests of 100 services per file, or YAML with --format yaml; every endpoint its own
address unless --shared-addresses) a `kpr run` process is started with the socklb plugin
(on a child cgroup nothing runs in, pins in a scratch dir) and the core's service map writer,
fed by the files source. Measured:

- ready: from starting the process to the agent reporting ready (every plugin synced, the
  BPF maps written), and the agent's CPU time until then (which a busy machine inflates less).
  Ready is heard as systemd would (READY=1 on $NOTIFY_SOCKET), not by polling the API: a
  status request reads the kernel maps back (kpr.readback), which would be measured too;
  the API is asked once, after the measurements, that every service is there;
- the critical path to ready, from the agent's own log (info level, millisecond stamps, from
  starting the process): configuration read (`agent.node`), socklb's BPF compile (from
  `build_compile_needed` to `socklb_started`), the files source started, the store synced
  (read, check, allocate, translate: the source's one thread), the service map writer's
  initial sync written, the last plugin given the initial state (`memory.settled` follows
  it), ready; and each thread's CPU time at ready (the main thread, then the others by CPU:
  the source's, the writer stage's, socklb's worker). Wall time to ready is what a user sees;
  on this VM two busy threads do not run faster than one (see the README), so it follows CPU;
- steps the agent times itself (from its log): the files source's read-ahead, wall and CPU (it
  reads, checks and packs the manifests on a thread of its own while the plugins start, and
  its log lines wait for the first pass, as a BPF compile captures fd 2; that thread has
  ended by ready, so its CPU is in the process's, not in the per-thread list); the CPU and
  peak RSS (VmHWM) of its worker process (kpr.sources.files_worker), which reads files while
  that thread takes what it sent; the first pass, and its worker's CPU and peak RSS when the
  pass ran without read-ahead (the agent runs it while the plugins start when a core is idle);
  the writer's initial sync. The agent reaps the worker before ready, so the worker's CPU is
  in the agent's CPU to ready (the reaped children's cutime and cstime are added to the
  agent's own from /proc/<pid>/stat);
- VmRSS at ready, VmRSS 2 s later (steady) and VmHWM (the peak) of the agent process;
- the same as ratios and differences against the 0-service agent: the goal of issue 11 is
  steady RSS at 20k services at most 100 MB above the empty agent's, ready in under 3 s.

With --trace, each agent runs in-process under tracemalloc instead (`--child`, started by
this script) and prints, at ready, VmRSS at each step (start, plugins started, ready) and the
Python heap by the kpr module that allocated it; tracemalloc slows the agent, so ready time
and RSS from a traced run are not comparable with the untraced ones. Root needed (BPF).

With --cold, a second agent per size is started after SIGTERM and `kpr cleanup` (a reboot:
nothing pinned, the state directory with its program cache kept), reported as its own row.

KPR_BENCH_LOGS=<dir> keeps each agent's log there (agent-<size>[-restart|-cold].log);
KPR_BENCH_PYSPY=<dir> attaches py-spy (the venv's) to each agent at once, 6 s of samples of
every thread (idle ones too) as <size>[-restart|-cold].txt (it misses the first 0.3 s or so).

    .venv/bin/python benchmarks/bench_agent_memory.py [--sizes 0,1000,10000,20000] [--trace] [--format yaml] [--cold]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_files_source import cpu_model  # noqa: E402
from bench_kubernetes_source import PER_FILE, objects, write_files  # noqa: E402

from kpr import api as kapi  # noqa: E402
from kpr.bpf.cleanup import scratch_pin_dir  # noqa: E402
from kpr.testing.cgroup import child_cgroup  # noqa: E402

SETTLE = 2.0
# Files and lines listed by --trace (--top).
TOP = int(os.environ.get("KPR_BENCH_TOP", "10"))


def proc_status(pid: int | str) -> dict[str, float]:
    """VmRSS and VmHWM in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of the children it has reaped (the files
    source's read-ahead worker, which the agent waits for before ready): unlike wall time,
    not inflated by a busy machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# Log events on the way to ready, in order: (label, event in the agent's log line).
PHASES = (
    ("config", "agent.node "),
    ("compile", "event=build_compile_needed"),
    ("attached", "event=socklb_started"),
    ("source", "files.start "),
    ("store", "store.synced "),
    ("writer", "event=servicemaps_initial_sync"),
    ("plugins", "memory.settled "),
    ("ready", "agent.ready "),
)


def phases(log_text: str, started: float) -> dict[str, float]:
    """Seconds from `started` (time.time()) to the first log line of each PHASES event."""
    import datetime

    out: dict[str, float] = {}
    for line in log_text.splitlines():
        for label, event in PHASES:
            if label not in out and event in line:
                with contextlib.suppress(ValueError):
                    at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    out[label] = at - started
    return {label: out[label] for label, _ in PHASES if label in out}


# Durations the agent logs itself: (label, event, the key=value field to read, its unit's seconds).
STEP_FIELDS = (
    ("read-ahead", "files.preloaded ", "ms", 0.001),
    ("read-ahead CPU", "files.preloaded ", "cpu_ms", 0.001),
    ("read-ahead worker CPU", "files.preloaded ", "worker_cpu_ms", 0.001),
    ("read-ahead worker peak MB", "files.preloaded ", "worker_peak_mb", 1.0),
    ("first pass's worker", "files.read_with_worker ", "ms", 0.001),
    ("first pass's worker CPU", "files.read_with_worker ", "worker_cpu_ms", 0.001),
    ("first pass's worker peak MB", "files.read_with_worker ", "worker_peak_mb", 1.0),
    ("first pass", "files.scan ", "ms", 0.001),
    ("writer's initial sync", "event=servicemaps_initial_sync ", "seconds", 1.0),
    # The files source's gate for its worker (1 started, 0 not) and the load it saw.
    ("worker chosen", "files.worker on=", "on", 1.0),
    ("worker's gate load", "files.worker on=", "load", 1.0),
)


def steps(log_text: str) -> dict[str, float]:
    """Seconds of each STEP_FIELDS step, from the first log line of its event."""
    out: dict[str, float] = {}
    for line in log_text.splitlines():
        for label, event, key, unit in STEP_FIELDS:
            if label in out or event not in line:
                continue
            for part in line.split():
                if part.startswith(key + "="):
                    value = part.split("=", 1)[1]
                    with contextlib.suppress(ValueError):
                        out[label] = float({"yes": "1", "no": "0"}.get(value, value)) * unit
    return out


def thread_cpu(pid: int) -> list[float]:
    """CPU seconds of each thread of a process: the main thread first, the rest by CPU."""
    tick = os.sysconf("SC_CLK_TCK")
    main, rest = 0.0, []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick
            if int(task.name) == pid:
                main = cpu
            else:
                rest.append(cpu)
    return [main] + sorted(rest, reverse=True)


def write_yaml_files(d: Path, objs: list[list[dict]]) -> None:
    """The same objects as write_files, as multi-document YAML files."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    for f in range(0, len(objs), PER_FILE):
        docs = [o for pair in objs[f : f + PER_FILE] for o in pair]
        (d / f"{f // PER_FILE:04d}.yaml").write_text(yaml.dump_all(docs, Dumper=dumper, sort_keys=False))


def unique_addresses(objs: list[list[dict]]) -> list[list[dict]]:
    """Every endpoint its own address, as pods have (from 10.244.0.1 up, a /14 for 200k).

    The shared generator (bench_files_source.manifests) cycles through 64,000 addresses, so
    at 20k services x 10 each address served about three services: fewer distinct strings and
    backends than a cluster of that size has (measured at 20k: +28 MB steady RSS, +62 MB peak
    and 0.6 s of CPU less than with unique addresses)."""
    n = 0
    for _svc, es in objs:
        for ep in es["endpoints"]:
            n += 1
            ep["addresses"] = [f"10.{244 + n // 65536}.{n // 256 % 256}.{n % 256}"]
    return objs


def write_config(tmp: Path, n: int, pin: Path, cg: Path, fmt: str = "json", shared: bool = False) -> Path:
    manifests_dir = tmp / f"m-{n}"
    manifests_dir.mkdir()
    objs = objects(n) if shared else unique_addresses(objects(n))
    (write_yaml_files if fmt == "yaml" else write_files)(manifests_dir, objs)
    cfg = tmp / f"kpr-{n}.yaml"
    cfg.write_text(
        f"""
node: {{name: node0, addresses: [192.168.0.10], devices: [lo]}}
source: {{kind: files, path: {manifests_dir}, statePath: {tmp}/alloc-{n}.json}}
service: {{clusterCIDR: [10.96.0.0/12]}}
bpf: {{pinPath: {pin}, mapSizes: {{kprSvc: 262144, kprBackend: 262144}}}}
api: {{socket: {tmp}/kpr-{n}.sock}}
metrics: {{address: ""}}
log: {{level: info}}
agent: {{stateDir: {tmp}/state-{n}, shutdownTimeout: 10}}
plugins:
  socklb: {{enabled: true, cgroupPath: {cg}}}
"""
    )
    return cfg


def wait_notified(proc: subprocess.Popen, notify: socket.socket, deadline: float, log_name: str) -> None:
    """Until the agent sends READY=1 to its notify socket (as it tells systemd)."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited; see {log_name}")
        notify.settimeout(0.05)
        with contextlib.suppress(TimeoutError):
            if b"READY=1" in notify.recv(4096):
                return
    raise RuntimeError(f"the agent was not ready in time; see {log_name}")


def wait_ready(proc: subprocess.Popen, sock: Path, deadline: float, log_name: str) -> dict:
    """The agent's status once it says ready (polled every 10 ms on its API socket)."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited; see {log_name}")
        with contextlib.suppress(kapi.ApiError):
            # A status request reads the kernel maps back: seconds at 20k services under
            # tracemalloc (--trace), past the client's default 5 s.
            status = kapi.get(sock, "/v1/status", timeout=120)
            if status.get("ready"):
                return status
        time.sleep(0.01)
    raise RuntimeError(f"the agent was not ready in time; see {log_name}")


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM and wait (SIGKILL after a minute); what the agent pinned stays for a restart."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def measure(cmd: list[str], n: int, tmp: Path, tag: str, trace: bool, report: Path) -> tuple[subprocess.Popen, dict]:
    """Start one agent and measure it up to SETTLE s after ready; returns it still running."""
    sock = tmp / f"kpr-{n}.sock"
    log_path = tmp / f"agent-{tag}.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / f"notify-{tag}.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / f"notify-{tag}.sock"))
    t0, started = time.perf_counter(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stderr=log, env=env)
    spy = None
    if os.environ.get("KPR_BENCH_PYSPY"):  # a profile of the way to ready (py-spy attached at once)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid), "--duration",
                                "6", "--threads", "--idle", "--nonblocking", "--format", "raw", "--rate", "200", "--output",
                                str(Path(os.environ["KPR_BENCH_PYSPY"]) / f"{tag}.txt")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_notified(proc, notify, t0 + 600, str(log_path))
        ready = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid)
        threads = thread_cpu(proc.pid)
        load = Path("/proc/loadavg").read_text().split()[0]
        at_ready = proc_status(proc.pid)
        time.sleep(SETTLE)
        steady = proc_status(proc.pid)
        status = wait_ready(proc, sock, time.perf_counter() + (300 if trace else 60), str(log_path))
        assert status["services"] == n, status["services"]
        if trace:
            while not report.exists() and proc.poll() is None:
                time.sleep(0.1)
    except BaseException:
        terminate(proc)
        raise
    finally:
        notify.close()
        if spy is not None:
            spy.wait()
    if os.environ.get("KPR_BENCH_LOGS"):  # keep each agent's log for a closer look
        Path(os.environ["KPR_BENCH_LOGS"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["KPR_BENCH_LOGS"]) / log_path.name).write_text(log_path.read_text())
    out = {"ready": ready, "cpu": cpu, "rss_ready": at_ready["VmRSS"], "rss": steady["VmRSS"], "hwm": steady["VmHWM"],
           "threads": threads, "load": load, "phases": phases(log_path.read_text(), started),
           "steps": steps(log_path.read_text())}
    if trace:
        out["trace"] = json.loads(report.read_text())
    return proc, out


def run(n: int, tmp: Path, trace: bool, fmt: str = "json", shared: bool = False, restart: bool = False,
        cold: bool = False) -> list[dict]:
    """The measurements of a start (and with `restart`, of a second agent started on what the
    first one left pinned after SIGTERM: socklb adopts its links without compiling; with `cold`,
    of one started after SIGTERM and `kpr cleanup`, as after a reboot: nothing pinned, the state
    directory and its program cache kept)."""
    out = []
    with scratch_pin_dir("kpr-bench-mem") as pin, child_cgroup("kpr-bench-mem") as cg:
        cfg = write_config(tmp, n, pin, cg, fmt, shared)
        report = tmp / f"trace-{n}.json"
        if trace:
            cmd = [sys.executable, __file__, "--child", str(cfg), "--report", str(report)]
        else:
            cmd = [sys.executable, "-m", "kpr.cli", "run", "--config", str(cfg)]
        proc = None
        try:
            proc, first = measure(cmd, n, tmp, f"{n}", trace, report)
            out.append(first)
            if restart:
                terminate(proc)
                report.unlink(missing_ok=True)
                proc, again = measure(cmd, n, tmp, f"{n}-restart", trace, report)
                out.append(again)
            if cold:
                terminate(proc)
                subprocess.run([sys.executable, "-m", "kpr.cli", "cleanup", "--config", str(cfg)], capture_output=True)
                report.unlink(missing_ok=True)
                proc, again = measure(cmd, n, tmp, f"{n}-cold", trace, report)
                out.append(again)
        finally:
            if proc is not None:
                terminate(proc)
            subprocess.run([sys.executable, "-m", "kpr.cli", "cleanup", "--config", str(cfg)], capture_output=True)
    return out


# --- --child: the agent in this process, under tracemalloc ---------------------------------


def _owner(filename: str) -> str:
    """core/store.py, plugins/socklb/..., or the library a frame belongs to."""
    parts = Path(filename).parts
    for anchor in ("core", "kpr", "plugins", "bcc", "json", "yaml", "pydantic", "pluggy"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return parts[-1] if parts else filename


def child(cfg_path: str, report: str) -> int:
    import gc
    import logging
    import tracemalloc

    from kpr.config import load_config
    from kpr.daemon import Agent

    logging.basicConfig(level=logging.WARNING)
    steps = {"start": proc_status("self")["VmRSS"]}
    tracemalloc.start(1)
    agent = Agent(load_config(Path(cfg_path)))
    original_start = agent.bus.start

    def bus_start() -> None:  # the plugins have been configured and started (BPF compiled)
        steps["plugins started"] = proc_status("self")["VmRSS"]
        original_start()

    agent.bus.start = bus_start  # type: ignore[method-assign]
    # Agent.run installs signal handlers, which only the main thread may do: it runs here,
    # and a thread takes the snapshot at ready.
    done = threading.Event()

    def watch() -> None:
        while not agent._ready_sent and not done.is_set():
            time.sleep(0.01)
        if done.is_set():
            return
        time.sleep(SETTLE / 2)
        gc.collect()
        steps["ready"] = proc_status("self")["VmRSS"]
        snap = tracemalloc.take_snapshot()
        by_file: dict[str, int] = {}
        by_line: dict[str, int] = {}
        for stat in snap.statistics("lineno"):
            frame = stat.traceback[0]
            owner = _owner(frame.filename)
            by_file[owner] = by_file.get(owner, 0) + stat.size
            by_line[f"{owner}:{frame.lineno}"] = stat.size
        total = sum(by_file.values())
        tmp = Path(report + ".tmp")
        tmp.write_text(json.dumps({
            "steps": steps,
            "traced_mb": total / 2**20,
            "files": sorted(by_file.items(), key=lambda x: -x[1])[:TOP],
            "lines": sorted(by_line.items(), key=lambda x: -x[1])[:TOP],
        }))
        tmp.rename(report)
        # The status request the parent makes next reads the kernel maps back: minutes at
        # 20k services while every allocation is traced.
        tracemalloc.stop()

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        return agent.run()
    finally:
        done.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,1000,10000,20000")
    ap.add_argument("--trace", action="store_true", help="tracemalloc in the agent (slower; see above)")
    ap.add_argument("--top", type=int, default=TOP, help="files and lines listed by --trace")
    ap.add_argument("--format", choices=("json", "yaml"), default="json", help="the manifests' format")
    ap.add_argument("--shared-addresses", action="store_true",
                    help="endpoint addresses as the shared generator makes them (64k distinct, each in about "
                         "three services; the figures before 2026-12-05's third round), not one per endpoint")
    ap.add_argument("--restart", action="store_true",
                    help="also measure a second agent started after SIGTERM on what the first left pinned "
                         "(socklb adopts its links: no compile)")
    ap.add_argument("--cold", action="store_true",
                    help="also measure an agent started after SIGTERM and `kpr cleanup` (a reboot: nothing pinned, "
                         "agent.stateDir and its program cache kept)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["KPR_BENCH_TOP"] = str(args.top)  # the traced child lists as many
    if args.child:
        return child(args.child, args.report)
    if os.geteuid() != 0:
        print("needs root (BPF maps, a child cgroup)", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; agent = `kpr run` with socklb + the service map writer, "
          f"files source, {args.format.upper()} manifests, endpoint addresses "
          f"{'shared (64k distinct)' if args.shared_addresses else 'one per endpoint'}; {'traced' if args.trace else 'untraced'}")
    print(f"{'services':>8} {'ready s':>8} {'cpu s':>6} {'RSS@ready MB':>12} {'RSS MB':>7} {'HWM MB':>7} "
          f"{'RSS-empty MB':>12} {'HWM-empty MB':>12} {'RSS/empty':>9} {'load':>5}")
    base: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kpr-bench-mem-") as tmpd:
        tmp = Path(tmpd)
        for n in sizes:
            kinds = ("",) + (" (restart)",) * args.restart + (" (cold, cache warm)",) * args.cold
            for kind, r in zip(kinds, run(n, tmp, args.trace, args.format, args.shared_addresses, args.restart, args.cold)):
                # A restart's baseline is the empty agent's restart (it loads no bcc/LLVM).
                base.setdefault(kind, r)
                report_row(n, kind, r, base[kind], args.trace)
    print(f"ready: wall time from process start to READY=1 (cpu: the agent's CPU time until then); RSS: VmRSS {SETTLE:.0f} s after ready (steady); "
          "HWM: VmHWM, the peak; baseline: the first size; load: 1-min load average at ready; path to ready: "
          "config read, socklb compile started, attached, files source started, store synced, writer's initial sync, "
          "last plugin synced, ready; (restart): a second agent started after SIGTERM on what the first left pinned, "
          "against the empty agent's restart; (cold, cache warm): one started after SIGTERM and kpr cleanup")
    return 0


def report_row(n: int, kind: str, r: dict, base: dict, trace: bool) -> None:
    print(f"{n:>8} {r['ready']:>8.2f} {r['cpu']:>6.2f} {r['rss_ready']:>12.0f} {r['rss']:>7.0f} {r['hwm']:>7.0f} "
          f"{r['rss'] - base['rss']:>12.0f} {r['hwm'] - base['hwm']:>12.0f} {r['rss'] / base['rss']:>9.2f} "
          f"{r['load']:>5}{kind}", flush=True)
    if r["phases"]:  # not from a traced run (its log is warnings only)
        print("         path to ready (s from start): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()), flush=True)
    if r.get("steps"):
        print("         steps (s, from the agent's log): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["steps"].items()), flush=True)
    print("         thread CPU at ready (s): main " + " ".join(f"{c:.2f}" for c in r["threads"][:1])
          + ", others " + " ".join(f"{c:.2f}" for c in r["threads"][1:] if c >= 0.01), flush=True)
    if trace:
        t = r["trace"]
        print("         RSS by step: " + ", ".join(f"{k} {v:.0f} MB" for k, v in t["steps"].items()))
        print(f"         Python heap at ready (tracemalloc): {t['traced_mb']:.1f} MB")
        for name, size in t["files"]:
            print(f"           {size / 2**20:8.1f} MB  {name}")
        for name, size in t["lines"]:
            print(f"           {size / 2**20:8.1f} MB  {name}")


if __name__ == "__main__":
    sys.exit(main())
