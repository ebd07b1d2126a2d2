"""Agent configs for tests, and agents run from them.

`AgentConfig` builds a kpr config whose every path is the test's own: the API socket, the
state directory, the files source's manifests and allocations under `work` (a tmp_path, or
`scratch_agent`'s temporary directory), the pins under `pin` (a scratch pin directory); the
metrics listener off. Two tests, or two agents of one test, never share a path.

    cfg = AgentConfig(tmp_path, pin).plugin("socklb", cgroupPath=str(cg))
    cfg.manifest("web", WEB)            # a file under cfg.manifests
    path = cfg.write()                  # kpr.yaml, for `kpr run --config` or the CLI
    with running_agent(cfg) as agent:   # the agent in this process, synced
        ...

The config is written as JSON (YAML reads it), so a test may also edit `cfg.document()`.
`NeedsMaps` is a plugin that only asks for the shared service maps, for agents whose test
reads the maps without enabling a datapath plugin.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr import hookimpl

__all__ = ["AgentConfig", "NeedsMaps", "in_agent_netns", "kpr_argv", "kpr_cli", "kpr_cleanup", "lab_scratch",
           "PIN_HOLDER", "pin_holder", "run_agent_until", "running_agent", "scratch_agent", "start_agent", "stop_agent_process"]


class NeedsMaps:
    """A plugin that only asks for the shared service maps, as the datapath plugins do: an
    agent given it (`internal_plugins={"needs": NeedsMaps()}`) runs the service map writer."""

    @hookimpl
    def kpr_requires(self) -> list[str]:
        return ["servicemaps"]


@dataclass
class AgentConfig:
    work: Path
    pin: Path | None  # None: no bpf section (an agent whose plugins pin nothing)
    node: str = "node1"
    addresses: Sequence[str] = ("192.168.50.10",)
    devices: Sequence[str] = ("lo",)
    # plugin name -> its section (camelCase keys, as in kpr.yaml); `enabled` is added
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    # more keys of the files source (pollInterval, emptyGracePeriod, a Kubernetes API server
    # for Leases...) and other top-level sections (service, bpf maps sizes...), merged last
    source: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    shutdown_timeout: float | None = 5
    # the files source's poll (a test wants changes fast); None: kpr's default
    poll_interval: float | None = 0.05

    # under `work`: the config file, the manifests directory, the API socket, the state directory
    path: Path = field(init=False)
    manifests: Path = field(init=False)
    socket: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.work = w = Path(self.work)
        self.pin = Path(self.pin) if self.pin is not None else None
        self.path, self.manifests, self.socket, self.state = w / "kpr.yaml", w / "manifests", w / "kpr.sock", w / "state"

    def plugin(self, name: str, **section: Any) -> "AgentConfig":
        """Enable plugin `name` with these keys (merged into what it has); returns self."""
        self.plugins.setdefault(name, {}).update(section)
        return self

    def manifest(self, name: str, text: str) -> Path:
        """Write one manifest file (name.yaml) for the files source, replaced by a rename: a
        running agent never reads it half written."""
        self.manifests.mkdir(parents=True, exist_ok=True)
        path = self.manifests / f"{name}.yaml"
        tmp = path.with_name(f".{name}.tmp")  # a dot file: the source ignores it
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def document(self) -> dict[str, Any]:
        agent: dict[str, Any] = {"stateDir": str(self.state)}
        if self.shutdown_timeout is not None:
            agent["shutdownTimeout"] = self.shutdown_timeout
        doc: dict[str, Any] = {
            "node": {"name": self.node, "addresses": list(self.addresses), "devices": list(self.devices)},
            "source": {"kind": "files", "path": str(self.manifests), "statePath": str(self.work / "alloc.json"),
                       **({"pollInterval": self.poll_interval} if self.poll_interval is not None else {}), **self.source},
            "api": {"socket": str(self.socket)},
            "metrics": {"address": ""},
            "agent": agent,
            "plugins": {name: {"enabled": True, **section} for name, section in self.plugins.items()},
        }
        if self.pin is not None:
            doc["bpf"] = {"pinPath": str(self.pin)}
        for key, value in self.extra.items():
            if isinstance(value, Mapping) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **copy.deepcopy(dict(value))}
            else:
                doc[key] = copy.deepcopy(value)
        if not doc["plugins"]:
            del doc["plugins"]
        return doc

    def text(self) -> str:
        return json.dumps(self.document(), indent=1)

    def write(self) -> Path:
        """kpr.yaml under `work` (and the manifests directory); returns its path."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())
        return self.path

    def parse(self) -> Any:
        """The validated KprConfig (core keys), as `kpr run` reads it."""
        from kpr.config import parse_config

        return parse_config(self.text(), str(self.path))


def kpr_argv(*args: str) -> list[str]:
    """The argv of the `kpr` command (this interpreter's kpr.cli) with `args`, for a process a
    test starts itself (`kpr run` in the background)."""
    return [sys.executable, "-m", "kpr.cli", *args]


def kpr_cli(*args: str, netns: Any = None, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    """The `kpr` command (kpr_argv) with `args`, in `netns` (a Namespace) when given; its
    output captured as text."""
    argv = kpr_argv(*args)
    if netns is not None:
        return netns.run(argv, check=check, timeout=timeout)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def lab_scratch(stack: contextlib.ExitStack, name: str) -> tuple[Path, Any, Path, Path]:
    """What a real agent's lab needs, each entered on `stack` so it goes even on failure: a
    private bpffs (the agent runs in a namespace, where /sys/fs/bpf is not the test's), the
    namespaces' Topology, a child cgroup for the hooks and a work directory; returned as
    (bpffs mount, topology, cgroup, work directory)."""
    from kpr.testing.bpffs import private_bpffs
    from kpr.testing.cgroup import child_cgroup
    from kpr.testing.netns import Topology

    mnt = stack.enter_context(private_bpffs(name))
    topo = stack.enter_context(Topology())
    cg = stack.enter_context(child_cgroup(name))
    wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{name}-")))
    return mnt, topo, cg, wd


def kpr_cleanup(pin: Path, work: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`kpr cleanup` of what an agent pinned under `pin` (a config naming only the pin
    directory is written to `work`), as an operator runs it; `args`: more of its arguments
    (`--force`). `kw`: kpr_cli's."""
    cfg = Path(work) / "kpr-cleanup.yaml"
    cfg.write_text(json.dumps({"bpf": {"pinPath": str(pin)}}))
    return kpr_cli("cleanup", "--config", str(cfg), *args, **kw)


# Another process holding a pin path as a running agent does (kpr.bpf.pinlock), until its
# stdin closes (or it is killed): argv[1] the path; prints "held" once it holds it.
PIN_HOLDER = """
import sys
from kpr.bpf import pinlock
assert pinlock.hold(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def pin_holder(path: Path | str) -> subprocess.Popen:
    """A process (PIN_HOLDER) holding the pin directory `path`, returned once it holds it;
    the caller ends it (kill, or close its stdin) and waits for it."""
    p = subprocess.Popen([sys.executable, "-c", PIN_HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n", f"the holder of {path} did not hold it"
    return p


def stop_agent_process(proc: subprocess.Popen, sig: int, log: Path, timeout: float = 30.0) -> int:
    """Send `sig` to a `kpr run` process and wait for it to exit; its exit code. One that has
    not exited after `timeout` seconds fails with every thread's stack (the agent writes them
    to its log on SIGUSR1, kpr.cli) and the log's tail: what it was stuck in."""
    import signal
    import time

    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        tail = Path(log).read_text(errors="replace")[-12000:] if Path(log).exists() else "(no log)"
        raise AssertionError(
            f"the agent (pid {proc.pid}) had not exited {timeout:.0f} s after signal {sig}; its log ends:\n{tail}"
        ) from None


@contextlib.contextmanager
def scratch_agent(prefix: str = "kpr-test", **kw: Any) -> Iterator[AgentConfig]:
    """An AgentConfig on a fresh temporary work directory and a scratch pin directory, both
    removed (the pins detached) afterwards. `kw`: AgentConfig's fields."""
    from kpr.testing.bpffs import scratch_pin_dir

    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as work, scratch_pin_dir(prefix) as pin:
        yield AgentConfig(Path(work), pin, **kw)


def start_agent(
    config: Any, *, internal_plugins: Mapping[str, Any] | None = None, timeout: float = 15.0, netns: Any = None
) -> Any:
    """A kpr Agent in this process, set up and synced (its bus has delivered the source's
    first state to every plugin). `config`: an AgentConfig or a parsed KprConfig;
    `internal_plugins`: plugin objects to load beside the installed ones, by name; `netns`
    (a kpr.testing.netns Namespace, a name or a path): the node's namespace the agent runs in
    (set up there: the threads it starts then stay in it). Shut it down there too
    (`in_agent_netns(netns)`, as running_agent does): shutdown() stops the plugins in threads
    of its own, which start in the caller's namespace."""
    from kpr.daemon import Agent
    from kpr.testing.waiting import wait_for

    if isinstance(config, AgentConfig):
        config.write()
        config = config.parse()
    agent = Agent(config, internal_plugins=dict(internal_plugins or {}))
    with in_agent_netns(netns):
        agent.setup()
    try:
        wait_for(agent.bus.synced, timeout, "the agent to sync")
    except BaseException:
        with in_agent_netns(netns):
            agent.shutdown()
        raise
    return agent


def in_agent_netns(netns: Any) -> contextlib.AbstractContextManager[None]:
    """The calling thread in `netns` (start_agent's) for a block; None: where it is."""
    from kpr.testing.netns import in_netns

    ns = getattr(netns, "path", netns)
    return in_netns(ns) if ns is not None else contextlib.nullcontext()


@contextlib.contextmanager
def running_agent(config: Any, **kw: Any) -> Iterator[Any]:
    """start_agent for a block; the agent shuts down at its end (in its namespace: its plugins'
    kpr_stop run there as their kpr_start did), and a failing shutdown (exit code not 0) fails
    the test."""
    agent = start_agent(config, **kw)
    try:
        yield agent
    finally:
        with in_agent_netns(kw.get("netns")):
            rc = agent.shutdown()
    assert rc == 0, f"the agent's shutdown returned {rc}"


def run_agent_until(agent: Any, done: Any, what: str, timeout: float = 30.0) -> int:
    """Agent.run in this thread (its signal handlers need the main thread) until `done()`
    holds (waited for by another thread, which then asks the agent to stop); run()'s exit code."""
    import threading

    from kpr.testing.waiting import wait_for

    failed: list[BaseException] = []

    def watch() -> None:
        try:
            wait_for(done, timeout=timeout, what=what)
        except BaseException as e:  # noqa: BLE001 - raised in the test's thread below
            failed.append(e)
        finally:
            agent.request_stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code = agent.run()
    finally:
        watcher.join()
    if failed:
        raise failed[0]
    return code
