"""Shared pieces of the socklb kernel tests and benchmark: a node-with-pods topology with
kpr.testing.echo's servers and client, and a running socklb plugin driven with the service
map writer by kpr.testing.harness (services directly, or Kubernetes objects through the
agent's object store); the restart rig (`kpr run` under load).

Layout: one "node" namespace (the host, as far as the plugin is concerned: its netns cookie
is the host's) holding node addresses 10.77.0.1 and fd77::1 on lo; pods be1..be3 run a
server answering with their name on TCP and UDP port 8080 (dual-stack); pod "cli" is the
client. Clients always run inside a test namespace AND the child cgroup the programs are
attached to.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kpr import api
from kpr.bpf.cleanup import cleanup
from kpr.model import Backend, BackendState, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.plugins.socklb.plugin import SockLB
from kpr.servicemaps import ServiceMapWriter
from kpr.testing import echo
from kpr.testing.echo import CLIENT_PRELUDE, PY, Running, answers, start_running
from kpr.testing.agent import AgentConfig, kpr_argv, kpr_cleanup, lab_scratch, stop_agent_process
from kpr.testing.harness import PluginHarness, plugin_context, start_plugin
from kpr.testing.netns import Topology
from kpr.testing.waiting import wait_for

__all__ = ["PY", "answers"]

NODE4, NODE6 = "10.77.0.1", "fd77::1"
NODE = NodeInfo("node1", addresses=(NODE4, NODE6))  # the node facts the plugin and the store get
PODS = {"be1": ("10.244.0.11", "fd44::11"), "be2": ("10.244.0.12", "fd44::12"), "be3": ("10.244.0.13", "fd44::13")}
CLIENT4, CLIENT6 = "10.244.0.100", "fd44::100"
PORT = 8080

# Backends answer with their name only (kpr.testing.echo with peer=False): the socket LB
# translates in the client's own connect(), so the backend sees the client's address anyway.
# CLIENT (kpr.testing.echo's) runs tcp/udp/udpconn/bind/hold; see that module.
SERVER, CLIENT = echo.SERVER, echo.CLIENT


# Load for restart tests and bench_restart.py: a new TCP connection every GAP seconds to
# HOST:PORT, each on its own thread (it reads the backend's name line; 1 s timeout), and one
# long-lived connection that echoes a
# byte every GAP. On stdin EOF it prints one JSON summary: attempts, failures (time, errno),
# the successful connects (start time, CLOCK_MONOTONIC as the caller's, and duration) and how
# the long-lived connection fared.
LOAD = CLIENT_PRELUDE + r"""
import errno, json, socket, sys, threading, time
host, port, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
stop = threading.Event()
ok, failed = [], []
held = {"echoes": 0, "error": ""}
def one():
    t0 = time.monotonic()
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        greeting(s)
        ok.append([t0, time.monotonic() - t0])
    except OSError as e:
        failed.append([t0, err(e)])
    finally:
        s.close()
def churn():
    # one attempt per tick whatever the others do: an outage costs one failure per tick
    nxt = time.monotonic()
    while not stop.is_set():
        threading.Thread(target=one, daemon=True).start()
        nxt += gap
        time.sleep(max(0.0, nxt - time.monotonic()))
def hold():
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.settimeout(2)
        greeting(s)
        while not stop.is_set():
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise ConnectionResetError(errno.ECONNRESET, "no echo")
            held["echoes"] += 1
            time.sleep(gap)
    except OSError as e:
        held["error"] = err(e)
threads = [threading.Thread(target=f, daemon=True) for f in (churn, hold)]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join(5)
time.sleep(1.2)  # attempts in flight end (1 s timeout)
print(json.dumps({"attempts": len(ok) + len(failed), "ok": ok, "failed": failed, "held": held}), flush=True)
"""


def build_topology(topo: Topology) -> None:
    topo.add_node("node")
    topo.run("node", f"ip addr add {NODE4}/32 dev lo && ip -6 addr add {NODE6}/128 dev lo nodad")
    for name, (ip4, ip6) in PODS.items():
        topo.add_pod("node", name, ip4, ip6=ip6)
    topo.add_pod("node", "cli", CLIENT4, ip6=CLIENT6)
    for name in PODS:
        echo.start_echo(topo[name], name, PORT, peer=False)


def be(name: str, *, v6: bool = False, state: BackendState = BackendState.ACTIVE, local: bool = True) -> Backend:
    return Backend(PODS[name][1 if v6 else 0], PORT, state=state, node_name="node1" if local else "node2", local=local)


def service(
    name: str,
    frontends: list[tuple[FrontendType, str, int]],
    backends: list[Backend],
    protocols: tuple[Protocol, ...] = (Protocol.TCP, Protocol.UDP),
    annotations: tuple[tuple[str, str], ...] = (),
    **fe_kw: Any,
) -> Service:
    fes = tuple(
        Frontend(t, addr, port, proto, backends=tuple(backends), **fe_kw)
        for t, addr, port in frontends
        for proto in protocols
    )
    return Service(ServiceKey("default", name), fes, annotations=annotations)


class Env(PluginHarness):
    """socklb plugins on the node namespace against one writer (kpr.testing.harness: `apply`,
    `delete`, `feed`, `clear` dispatch as the bus does), clients in the topology's pods
    inside the hooks' child cgroup."""

    def __init__(self, topo: Topology, pin: Path, writer: ServiceMapWriter | None, cgroup: Path) -> None:
        super().__init__(NODE, pin, writer=writer, netns=topo["node"])
        self.topo, self.cgroup = topo, cgroup
        self.abandoned: list[SockLB] = []

    @property
    def plugin(self) -> SockLB:
        return self.plugins[0]

    def client(self, *args: Any, ns: str = "cli", cgroup: Path | None = None, timeout: float = 60) -> list[dict]:
        return echo.client(self.topo[ns], *args, cgroup=cgroup or self.cgroup, timeout=timeout)

    def start_plugin(self, cgroup: Path, *, extra_cflags: Iterable[str] = (), **cfg: Any) -> SockLB:
        return self.start(_socklb(extra_cflags), {"cgroupPath": str(cgroup), **cfg}, name="socklb")

    def stop_plugin(self, plugin: SockLB) -> None:
        self.stop(plugin)

    def abandon(self, plugin: SockLB) -> None:
        """What SIGKILL leaves: the plugin gets no stop; its hooks stay as they are. (Its
        file descriptors are closed at the end of the test, as the kernel closes a killed
        process's.)"""
        self.forget(plugin)
        self.abandoned.append(plugin)


def _socklb(extra_cflags: Iterable[str]) -> SockLB:
    plugin = SockLB()
    plugin.extra_cflags = list(extra_cflags)  # a changed program, as an upgrade brings
    return plugin


def start_socklb(topo: Topology, pin: Path, cgroup: Path, *, extra_cflags: Iterable[str] = (), **cfg: Any) -> SockLB:
    """configure + start a SockLB whose host is the topology's node namespace."""
    ctx = plugin_context("socklb", NODE, pin)
    return start_plugin(_socklb(extra_cflags), {"cgroupPath": str(cgroup), **cfg}, ctx, netns=topo["node"])


@contextlib.contextmanager
def running(name: str = "kpr-socklb", **cfg: Any) -> Iterator[Env]:
    """The whole set-up: a private bpffs, the topology with its servers, a child cgroup, the
    writer and one plugin on that cgroup; all stopped and removed afterwards, even on failure."""
    with contextlib.ExitStack() as stack:
        mnt, topo, cg, _ = lab_scratch(stack, name)
        build_topology(topo)
        pin = mnt / "kpr"
        # Stop leaves the hooks attached (pinned links): `kpr cleanup` takes them off before
        # the cgroups go.
        stack.callback(cleanup, pin)
        env = Env(topo, pin, None, cg)
        stack.callback(env.close)  # running plugins stopped, the writer closed
        env.open_writer()
        stack.callback(lambda: [p._teardown(detach=False) for p in env.abandoned])
        env.start_plugin(cg, **cfg)
        yield env


@pytest.fixture(scope="module")
def socklb(kernel_headers: Path) -> Iterator[Env]:
    """`running()` once per test module that asks for it (import the fixture there)."""
    from kpr.bpf.probes import cgroup2_mount

    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    with running() as env:
        yield env


# ---------------------------------------------------------------------- restarts under load

RESTART_IP = "10.96.7.20"  # the restart rig's ClusterIP (port 80 -> be1, be2 on PORT)

RESTART_MANIFESTS = f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {RESTART_IP}
  ports: [{{name: http, port: 80, targetPort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {PORT}, protocol: TCP}}]
endpoints:
  - addresses: [{PODS["be1"][0]}]
    nodeName: node1
  - addresses: [{PODS["be2"][0]}]
    nodeName: node1
"""


@dataclass
class AgentRig:
    """`kpr run` as a real process in one namespace of a topology (`agent_ns`), restarted the
    ways an operator or systemd would; `load()` starts a LOAD client in `load_ns` (and
    `load_cgroup`, if any). Its config is `agent` (kpr.testing.agent.AgentConfig: every path
    under `work`, the files source with `manifests`), or, for callers stating it as YAML,
    built from `config_text` (node, plugins and other sections) by `rig_config`."""

    topo: Topology
    pin: Path
    work: Path
    config_text: str  # "" when `agent` is given
    manifests: str
    agent_ns: str = "node"
    load_ns: str = "cli"
    load_cgroup: Path | None = None
    agent: AgentConfig | None = None
    proc: subprocess.Popen | None = None
    starts: int = 0
    # The upgrade (`upgrade_with`): the plugin whose section changes, the keys, whether applied.
    _upgrade: tuple[str, dict[str, Any], dict[str, Any]] | None = None
    _upgraded: bool = False

    def __post_init__(self) -> None:
        if self.agent is None:
            self.agent = rig_config(self.work, self.pin, self.config_text)
        assert self.agent.work == self.work and self.agent.pin == self.pin

    @property
    def config(self) -> Path:
        return self.agent.path

    def write_config(self) -> None:
        self.agent.manifest("services", self.manifests)
        self.agent.write()

    def upgrade_with(self, keys: dict[str, Any] | str) -> "AgentRig":
        """The config `upgrade()` switches to: the plugin's section (the one that sets
        keepAttachedOnStop) with `keys` ({"icmpUnreachable": False}, or as YAML) added."""
        extra = yaml.safe_load(keys) if isinstance(keys, str) else dict(keys)
        name = next(n for n, sec in self.agent.plugins.items() if "keepAttachedOnStop" in sec)
        section = self.agent.plugins[name]
        self._upgrade = (name, extra, {k: section[k] for k in extra if k in section})
        return self

    def upgrade(self) -> None:
        """The next start builds other programs: the config switches to the other variant."""
        assert self._upgrade is not None, "this rig has no second config (upgrade_with)"
        name, extra, before = self._upgrade
        section = self.agent.plugins[name]
        if self._upgraded:
            for k in extra:
                section.pop(k, None)
            section.update(before)
        else:
            section.update(extra)
        self._upgraded = not self._upgraded
        self.write_config()

    def status(self) -> dict:
        """The running agent's status (`kpr status --json`)."""
        return api.get(self.agent.socket, "/v1/status", timeout=10)

    def start(self, cpu_budget: float = 90.0, timeout: float = 240.0) -> float:
        """Start an agent and wait until it reports ready; returns the seconds that took.

        What bounds the wait is the agent's own progress, not the clock: it fails when the
        agent exits, or has used `cpu_budget` seconds of CPU (its compiles and imports take a
        few) without being ready. Readiness is not what the restart tests check, and on two
        CPUs shared with other compiles the same start takes many times longer in wall time;
        `timeout` (wall) only keeps a hung agent from outliving the test's own timeout."""
        import time

        assert self.proc is None or self.proc.poll() is not None, "an agent is running"
        self.starts += 1
        log_path = self.work / f"agent-{self.starts}.log"
        log = open(log_path, "w")
        t0 = time.monotonic()
        # nsenter, not `ip netns exec`: that remounts /sys, and the cgroup2 mount with it
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.topo[self.agent_ns].path}", *kpr_argv("run", "--config", str(self.config))],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.proc.returncode}): {log_path.read_text()[-3000:]}")
            used = cpu_seconds(self.proc.pid)
            if used > cpu_budget:
                raise TimeoutError(f"the agent used {used:.1f} s of CPU in {time.monotonic() - t0:.0f} s without "
                                   f"becoming ready: {log_path.read_text()[-3000:]}")
            # The status route asked in-process (what `kpr status` asks): a `kpr status` process
            # every 50 ms would cost the CPUs as much as the agent's own start does, and the
            # load measured meanwhile would show it.
            try:
                return bool(self.status().get("ready"))
            except api.ApiError:
                return False  # not listening yet

        wait_for(ready, timeout, "the agent to be ready", lambda: log_path.read_text()[-3000:], interval=0.05)
        return time.monotonic() - t0

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        stop_agent_process(self.proc, sig, self.work / f"agent-{self.starts}.log")

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def load(self, host: str, port: int, gap: float = 0.01) -> Running:
        """The LOAD client dialling host:port every `gap` s; `finish()` returns its summary."""
        return start_running(self.topo, self.load_ns, [PY, "-c", LOAD, host, str(port), str(gap)],
                             cgroup=self.load_cgroup, what="load client")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its waited-for children (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])  # stat fields 14-17
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def rig_config(work: Path, pin: Path, text: str) -> AgentConfig:
    """An AgentConfig (kpr.testing.agent: the test's own paths under `work`, pins under `pin`)
    with the node, plugins and other top-level sections `text` states in YAML."""
    doc = yaml.safe_load(text) or {}
    node = doc.pop("node", {})
    plugins = {n: dict(sec or {}) for n, sec in (doc.pop("plugins", None) or {}).items()}
    return AgentConfig(work, pin, node=node.get("name", "node1"), addresses=tuple(node.get("addresses", ())),
                       devices=tuple(node.get("devices", ())), plugins=plugins, extra=doc, shutdown_timeout=None)


def longest_gap(ok: list[list[float]], start: float, end: float) -> float:
    """The longest time (s) without a successful connect starting, around [start, end]: from
    the last success before `start` (or start) to the next, and so on until `end`. A connect
    that takes long (a busy CPU while the new agent compiles) shows here too: see slowest()."""
    times = sorted(t for t, _d in ok)
    before = [t for t in times if t < start]
    inside = [t for t in times if start <= t <= end]
    after = [t for t in times if t > end]
    points = ([before[-1]] if before else [start]) + inside + ([after[0]] if after else [end])
    return max((b - a for a, b in zip(points, points[1:])), default=end - start)


def _kpr_cleanup(pin: Path, work: Path) -> None:
    """`kpr cleanup` as an operator runs it; its failure is the test's."""
    res = kpr_cleanup(pin, work)
    if res.returncode != 0:
        raise RuntimeError(f"kpr cleanup failed ({res.returncode}): {res.stderr[-2000:]}")


@contextlib.contextmanager
def restart_rig(name: str = "kpr-restart", *, keep_attached: bool = True) -> Iterator[AgentRig]:
    """socklb under restarts: the node topology, a child cgroup for the hooks and the load, a
    private bpffs and a work directory; the ClusterIP RESTART_IP:80 goes to be1 and be2. The
    agent is killed and everything it attached removed (`kpr cleanup`) afterwards."""
    with contextlib.ExitStack() as stack:
        mnt, topo, cg, work = lab_scratch(stack, name)
        build_topology(topo)
        pin = mnt / "kpr"
        stack.callback(_kpr_cleanup, pin, work)  # the agent is killed first (below)
        agent = AgentConfig(work, pin, addresses=(NODE4, NODE6), devices=("lo",), shutdown_timeout=None).plugin(
            "socklb", cgroupPath=str(cg), keepAttachedOnStop=keep_attached)
        rig = AgentRig(topo, pin, work, "", RESTART_MANIFESTS, load_cgroup=cg, agent=agent)
        # The upgrade: another reverse-NAT map size is another -D flag, so other programs (the
        # pinned map keeps its size until `kpr cleanup`: the programs are built against it).
        rig.upgrade_with(UPGRADE_KEYS["socklb"])
        rig.write_config()
        stack.callback(rig.kill)
        yield rig


@dataclass
class Window:
    """One restart: the signal's name, when it was sent, until SETTLE after ready, and how long
    the new agent took to be ready."""

    kind: str
    start: float
    end: float
    ready: float


SETTLE = 0.3  # seconds after a restarted agent is ready that still count to its restart


# Config keys whose change rebuilds a plugin's programs (another -D flag): the upgrades.
UPGRADE_KEYS: dict[str, dict[str, Any]] = {"socklb": {"reverseNatMapSize": 131072},
                                           "tc_nodeport": {"icmpUnreachable": False},
                                           "xdp_nodeport": {"icmpUnreachable": False}}
RESTART_KINDS = ("SIGTERM", "SIGKILL")  # "upgrade": SIGTERM, then a start with other BPF code
IDLE_WINDOW = 1.5  # seconds of a "none" window: no restart, the load's own gaps (a baseline)


def restarts_under_load(
    rig: AgentRig, host: str, port: int, *, rounds: int = 1, gap: float = 0.01,
    after_stop: Any = None, after_start: Any = None, kinds: tuple[str, ...] = RESTART_KINDS,
) -> tuple[dict, list[Window]]:
    """With a LOAD client on host:port, restart the rig's (running) agent `rounds` times each
    of `kinds`: SIGTERM + start, SIGKILL + start, "upgrade" (SIGTERM, rig.upgrade(), start),
    "none" (no restart: IDLE_WINDOW seconds of the load alone, its own gaps as a baseline);
    `after_stop()` / `after_start()` check the node in between. Returns the load's summary and
    the restarts' windows."""
    import signal
    import time

    load = rig.load(host, port, gap=gap)
    windows: list[Window] = []
    try:
        time.sleep(0.5)
        for _ in range(rounds):
            for kind in kinds:
                t0 = time.monotonic()
                if kind == "none":
                    time.sleep(IDLE_WINDOW + SETTLE)
                    windows.append(Window(kind, t0, time.monotonic(), 0.0))
                    time.sleep(0.2)
                    continue
                rig.stop(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
                if kind == "upgrade":
                    rig.upgrade()
                if after_stop is not None:
                    after_stop()
                ready = rig.start()
                time.sleep(SETTLE)
                windows.append(Window(kind, t0, time.monotonic(), ready))
                if after_start is not None:
                    after_start()
                time.sleep(0.2)
    finally:
        res = load.finish()
    return res, windows


def assert_no_loss(res: dict, windows: list[Window]) -> None:
    """No failed connection, the held one unbroken; prints each restart's gap."""
    assert res["attempts"] > 100
    assert res["failed"] == [], res["failed"][:10]
    assert not res["held"]["error"] and res["held"]["echoes"] > 100, res["held"]
    for w in windows:
        print(f"{w.kind}: longest gap {longest_gap(res['ok'], w.start, w.end) * 1e3:.1f} ms, "
              f"slowest connect {slowest(res['ok'], w.start, w.end) * 1e3:.1f} ms, ready in {w.ready:.2f} s")


def slowest(ok: list[list[float]], start: float, end: float) -> float:
    """The longest successful connect (s) that started within [start, end]."""
    return max((d for t, d in ok if start <= t <= end), default=0.0)


@pytest.fixture(name="env")
def clean_env(socklb: Env) -> Iterator[Env]:
    """`socklb` for one test: the services it applied are deleted afterwards (import both)."""
    try:
        yield socklb
    finally:
        socklb.clear()
