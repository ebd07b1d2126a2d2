"""The agent: wires config, plugins, bus, source, API and metrics, and runs until told to stop.

As kopf does: signal handlers only set a flag; shutdown is bounded by agent.shutdownTimeout
(a watchdog ends the process if a plugin hangs); a periodic level-based resync re-delivers
every service so plugins can repair drift between their state and the desired one.

A plugin is stopped only once its bus worker has left the hook it was in (or the wait for it
ran out, which the agent logs as plugin.stop_busy); a stop after a failed start is bounded by
the same timeout.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__, memory, sdnotify
from .bpf import fs, pinlock
from .api import ApiServer
from .bus import Backoff, EventBus
from .config import KprConfig
from .metrics import Metrics
from .model import NodeInfo, PluginStatus
from .node import detect, missing_devices
from .pipeline import WRITER_FACILITY
from .pluginmanager import KprPluginManager, PluginError, PluginHandle, build_plugin_manager, make_contexts
from .store import ObjectStore

log = logging.getLogger(__name__)


def make_source(config: KprConfig, node_name: str = "", on_node: Callable[[dict | None], None] | None = None):
    kind = config.source.kind
    if kind == "files":
        from .allocator import Allocator
        from .sources.files import FilesSource

        allocator = Allocator(config.source.state_path, list(config.service.cluster_cidr), config.service.port_range)
        src = config.source
        return FilesSource(
            src.path,
            allocator,
            poll_interval=src.poll_interval,
            empty_grace_period=src.empty_grace_period,
            max_file_size=src.max_file_size,
        )
    if kind == "kubernetes":
        from .sources.kubernetes import KubernetesSource

        return KubernetesSource(config.source, node_name or config.node.name, config.service.proxy_name, on_node=on_node)
    raise PluginError(f"source.kind: {kind!r} is not available in this build (use files or kubernetes)")


def _os_reason(e: OSError, path: Path | str) -> str:
    """An OSError's reason for a message that names `path` already (its strerror, and the file
    it was about when that is another)."""
    why = e.strerror or str(e)
    return f"{why} ({e.filename})" if e.filename is not None and str(e.filename) != str(path) else why


def spare_core(busy: int = 0) -> tuple[bool, float, int]:
    """(whether a CPU this process may run on is idle, the 1-minute load average, those
    CPUs): the load average leaves at least one of them free beside `busy` more that the
    caller will keep busy (the files source's worker counts a BPF compile beside it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False, float("nan"), cpus
    return load < cpus - 1 - busy, load, cpus


def compile_expected(config: KprConfig) -> bool:
    """Whether the plugins' start will likely compile BPF: not when an agent left its builds
    pinned (a restart adopts them: kpr.bpf.builds), nor when the program cache holds an entry
    (a start after a reboot loads it: kpr.bpf.progcache). A guess, from what is on disk: an
    entry of another build (an upgrade) still compiles. No plugin enabled: nothing to compile
    (which enabled plugin builds BPF its code alone knows)."""
    if not config.enabled_plugins():
        return False
    from .bpf.progcache import compile_likely

    return compile_likely(config)


# The attribute by which a plugin's object (or a core facility's) says that its kpr_start
# neither reads nor watches the source (PluginContext.source, status_writer()): the agent then
# runs the source's first pass while the plugins start (see Agent.setup).
STARTS_WITHOUT_SOURCE = "starts_without_source"

# The attribute by which a plugin's object (or a core facility's) says, once configured, that
# its kpr_start leaves this process's GIL to others: it is short, or its long work runs in
# another process (socklb's compile in kpr.bpf.compile_child). The first pass then runs beside
# the plugins' start even with no idle core: the two share the CPUs both need anyway, but no
# longer stretch each other through the GIL (the load gate's reason, measured with the compile
# in the agent).
STARTS_OFF_THE_GIL = "starts_off_the_gil"

# How often the agent looks whether it is ready, until it is (then every 0.2 s for metrics).
READY_POLL = 0.05
# How long the bus's settle waits for READY=1 (kpr.bus settle_after): setup()'s end is a few
# ms after the bus hands the initial state over; a plugin not in place longer than this does
# not keep the heap unsettled. (The wait is in a thread of the bus's own: no plugin's worker
# waits with it.)
SETTLE_WAIT = 1.0

# The GIL's switch interval while the source's first pass runs beside the plugins' start,
# until ready, or until both have ended when that comes first (Python's default: 5 ms). The
# pass holds the GIL for seconds; a plugin's start beside it (socklb attaching its 10 links
# once the compile child is done) gives the GIL up at every syscall and waited up to the
# interval to take it back, each time: on a quiet 2-core VM at 20k services the attach took
# 0.5 s of wall beside the pass (50-100 ms a link) and 1 ms a link after it, and ended with
# the pass, on the path to ready. At 0.5 ms it ends 20-40 ms after the compile
# (bench_agent_memory.py: README, issue 11). The pass loses nothing: a switch happens only
# when another thread waits for the GIL.
START_SWITCH_INTERVAL = 0.0005

ZONE_LABEL = "topology.kubernetes.io/zone"
# The label before Kubernetes 1.17; still set by some installers.
OLD_ZONE_LABEL = "failure-domain.beta.kubernetes.io/zone"


def node_object_facts(node: dict | None) -> tuple[tuple[str, ...], str]:
    """(InternalIP and ExternalIP addresses, zone) from a Node object; empty when absent."""
    if not isinstance(node, dict):
        return (), ""
    addresses: list[str] = []
    status = node.get("status") if isinstance(node.get("status"), dict) else {}
    for a in status.get("addresses") or ():
        if not isinstance(a, dict) or a.get("type") not in ("InternalIP", "ExternalIP"):
            continue
        try:
            text = str(ipaddress.ip_address(str(a.get("address", ""))))
        except ValueError:
            log.warning("node.bad_address address=%r", a.get("address"))
            continue
        if text not in addresses:
            addresses.append(text)
    meta = node.get("metadata") if isinstance(node.get("metadata"), dict) else {}
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    zone = labels.get(ZONE_LABEL) or labels.get(OLD_ZONE_LABEL) or ""
    return tuple(addresses), zone if isinstance(zone, str) else ""


class Agent:
    def __init__(
        self,
        config: KprConfig,
        *,
        internal_plugins: dict[str, Any] | None = None,
        backoff: Backoff | None = None,
        source_first: bool | None = None,
    ):
        """`source_first`: run the source's first pass while the plugins start when they
        allow it (True), only then and when a core is idle (None; see setup), or never (False)."""
        self.config = config
        self._source_first_wanted = source_first
        self._internal = internal_plugins or {}
        self._backoff = backoff
        self._stop = threading.Event()
        self._signalled = 0  # the signal that asked the agent to stop (_on_signal)
        self.kpm: KprPluginManager | None = None
        self.handles: list[PluginHandle] = []
        self._started: list[PluginHandle] = []
        self.metrics = Metrics()
        # Set to wake the main loop (to stop, or to look at readiness again).
        self._wake = threading.Event()
        # Set once READY=1 is out, or once stopping begins: the bus settles the heap after it
        # (with the first pass beside the plugins' start, the bus hands the initial state over
        # before setup() ends and READY=1 comes from the main thread: 15-40 ms later at 20k
        # services when the settle went first).
        self._settle_gate = threading.Event()
        self.bus = EventBus(
            backoff=backoff, on_event=self.metrics.on_event, settle_memory=True, on_synced=self._on_plugins_synced,
            settle_after=self._settle_gate, settle_wait=SETTLE_WAIT,
        )
        self._ready_lock = threading.Lock()
        self.node: NodeInfo = NodeInfo(name=config.node.name)
        self.store: ObjectStore | None = None
        self.source = None
        self.api: ApiServer | None = None
        self._ready_sent = False
        # The switch interval before the start shortened it (_short_switches), until ready or
        # until the plugins' start loop has ended and the first pass is done (_switches_back).
        self._switch_before: float | None = None
        self._starts_done = False
        self._pass_done = False
        # Readiness waits for setup() to end (the local API listening) and is never sent once
        # stopping has begun (STOPPING=1 is the last word); both under _ready_lock.
        self._setup_done = False
        self._stopping = False
        # Why the agent stopped itself (run() then ends non-zero), e.g. READY=1 not sent.
        self._failure = ""
        self._next_node_check = 0.0
        # Node facts from the API server's Node object (kubernetes source): addresses and zone.
        self._api_node: tuple[tuple[str, ...], str] = ((), "")
        self._node_lock = threading.Lock()
        self.started_at = time.time()

    # --- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the running agent to stop (from another thread; signals go to _on_signal)."""
        self._stop.set()
        self._wake.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # The SIGTERM/SIGINT handler: only a plain assignment. Python runs a handler in the
        # main thread between two bytecodes, which can be inside the main loop's
        # self._wake.wait() while it holds the Event's own lock; Event.set() there waits
        # for that lock forever (an agent that never exited on SIGTERM, seen in CI). The
        # main loop reads the flag after each wait (at most its period later).
        self._signalled = signum

    def setup(self) -> None:
        """Everything up to serving: plugins configured and started, bus, store, API, metrics, source."""
        cfg = self.config
        # One agent per pin path (kpr.bpf.pinlock): refused before anything is made or
        # attached, so a second agent leaves the first's maps, links and handed pins alone.
        self._hold_pin_path()
        self.node = self._node_facts()
        missing = missing_devices(self.node.devices)
        if missing:
            raise PluginError(f"node.devices: no such device on this host: {', '.join(missing)}")
        log.info("agent.node name=%s addresses=%s devices=%s", self.node.name, ",".join(self.node.addresses), ",".join(self.node.devices))
        # The source is made (and its connection settings checked) before any plugin
        # attaches: a source that cannot work must not leave programs behind it.
        self.source = make_source(cfg, self.node.name, on_node=self._on_node_object)
        prepare = getattr(self.source, "prepare", None)
        if callable(prepare):
            try:
                prepare()
            except Exception as e:
                raise PluginError(f"source: {e}") from e
        with memory.paused(freeze=True):  # (the plugins' imports: see kpr.cli)
            self.kpm = build_plugin_manager(cfg, internal=self._internal)
        self.handles = self.kpm.handles
        make_contexts(self.kpm, cfg, self.node)
        for h in self.handles:
            h.context.source = self.source
        for h in self.handles:
            try:
                h.call("kpr_configure", config=h.section, context=h.context)
            except Exception as e:
                raise PluginError(f"plugin {h.name}: configure failed: {type(e).__name__}: {e}") from e
        # The service map writer is the bus's writer stage, not a plugin with a worker: every
        # change reaches the maps before any plugin (kpr.pipeline).
        writer = self.kpm.facility(WRITER_FACILITY)
        if writer is not None:
            self.bus.set_writer(writer.name, writer.plugin)
        for h in self.handles:
            if h is not writer:
                self.bus.add_plugin(h.name, h.call)
        # The source's first pass (at 20k services the longest step to ready) runs while the
        # plugins start, when no plugin's start needs the source (STARTS_WITHOUT_SOURCE) and a
        # core is idle: the store's events wait in the bus's queues; the plugins' workers
        # start only once every plugin has started, so nothing reaches a plugin earlier than
        # before (the writer stage starts with the writer: below). A plugin that watches the source from its start (lb_ipam registers for
        # Service status) must be in place before the first pass, so with one the pass
        # follows the plugins' start. On a busy node the pass and the start stretch each other
        # (measured on a 2-core VM at load 6-8: socklb's compile and attach 3 -> 8.5 s of
        # wall, ready later than one after the other), as the read-ahead found.
        # With every start off the GIL (a first start's compile in a child process) the pass
        # goes early whatever the load: on a 2-core VM at load 1-2.5 a first start at 20k
        # services was ready in 3.7-5.2 s with it, 5.2-8.0 s after the start (3 pairs).
        wanted, load, why = self._source_first_wanted, float("nan"), "asked"
        early = wanted is not False and self._source_first()
        if wanted is not False and not early:
            why = "a_start_needs_the_source"
        if early and wanted is None:
            early, load, _cpus = spare_core()
            why = "idle_core" if early else "busy"
            if not early and self._starts_off_the_gil():
                early, why = True, "starts_off_the_gil"
        log.info("source.first_pass_early on=%s load=%.2f why=%s", "yes" if early else "no", load, why)
        # Asked only when the files source weighs a worker (the check imports kpr.bpf.progcache).
        self.source.compile_beside = lambda: compile_expected(cfg)
        if early:
            self._short_switches()
            self._start_source()
        else:
            self._read_ahead()
        if writer is not None:
            self._make_pin_path()
        for h in self.handles:
            try:
                h.call("kpr_start", context=h.context)
            except Exception as e:
                self.bus.request_stop()  # (a writer stage started early leaves its step first)
                self._stop_plugins(time.monotonic() + cfg.agent.shutdown_timeout)
                raise PluginError(f"plugin {h.name}: start failed: {type(e).__name__}: {e}") from e
            self._started.append(h)
            log.info("plugin.started plugin=%s dist=%s", h.name, h.info.dist)
            # A plugin may have made the pin directory (with no service map writer, nothing
            # made it before), or another in its place: held as it is now (pinlock.hold locks
            # a directory that changed anew, and is a look only for the one it holds).
            self._hold_pin_path()
            if early and h is writer:
                # With the pass beside the plugins' start, the writer stage starts with the
                # writer (it starts first): a pass that ends before the last plugin has
                # attached has its initial state written meanwhile (on a quiet 2-core VM at
                # 20k services the pass ended 0.1 s before socklb's attach, and the writer's
                # initial sync then took 0.3-0.4 s). No plugin gets anything before every
                # plugin has started (the workers start in bus.start()), nor does readiness.
                self.bus.start_stage()
        self._starts_done = True
        self._switches_back()
        self.bus.start()
        self.metrics.attach_agent(self)
        self.api = ApiServer(cfg.api.socket, self)
        self.api.start()
        if cfg.metrics.address:
            self.metrics.serve(cfg.metrics.address)
        # setup() counts as done before the source starts: a first pass that ends, and a bus
        # worker that hands its state over, while setup() is still on its way out then sends
        # READY=1 itself, before the bus settles the heap (before, it found setup() unfinished
        # and READY=1 waited for the settle and the main thread).
        with self._ready_lock:
            self._setup_done = True
        if not early:
            self._start_source()
        # A bus worker that handed over the initial state during setup left READY=1 to this.
        self._check_ready()

    def _hold_pin_path(self) -> bool:
        """Hold bpf.pinPath for this agent (kpr.bpf.pinlock); False while it does not exist.
        PluginError naming the path and the other agent's pid when another agent holds it,
        or the path and the reason when it cannot be held (a regular file, no permission, a
        loop of links): a clean message from `kpr run`, not a traceback."""
        pin = self.config.bpf.pin_path
        try:
            return pinlock.hold(pin)
        except pinlock.PinPathBusy as e:
            raise PluginError(str(e)) from e
        except OSError as e:
            raise PluginError(f"bpf.pinPath {pin}: {_os_reason(e, pin)} (it must be a directory on a bpffs, or not exist yet)") from e

    def _make_pin_path(self) -> None:
        """With the service map writer (plugins pin), before any plugin starts: bpffs mounted
        when missing, by the writer's own rule (kpr.bpf.fs.mount_bpffs_for_pins), the pin
        directory made, and held. A pin path that was a plain directory with no bpffs was
        held at the start of setup(), then the mount on its parent hid it and the pins went
        to a new directory in the bpffs that nobody held (a second agent was let in there);
        and two agents starting at once on a missing pin directory both started. Held again
        here, the lock is the new directory's, before anything is pinned in it."""
        pin = Path(self.config.bpf.pin_path)
        try:
            fs.mount_bpffs_for_pins(pin)
            pin.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PluginError(f"bpf.pinPath {pin}: {_os_reason(e, pin)}") from e
        self._hold_pin_path()

    def _short_switches(self) -> None:
        """START_SWITCH_INTERVAL until ready (or the shutdown), unless someone set a shorter one."""
        before = sys.getswitchinterval()
        if before > START_SWITCH_INTERVAL and self._switch_before is None:
            self._switch_before = before
            sys.setswitchinterval(START_SWITCH_INTERVAL)

    def _restore_switches(self) -> None:
        before, self._switch_before = self._switch_before, None
        if before is not None:
            sys.setswitchinterval(before)

    def _switches_back(self) -> None:
        """The interval from before the start once the plugins' start loop has ended and the
        first pass is done, whichever is later, when ready did not come first: the short one is
        for the two side by side, not for an agent that does not get ready (a plugin never in
        place would have kept it for good)."""
        with self._ready_lock:
            if self._starts_done and self._pass_done:
                self._restore_switches()

    def _source_first(self) -> bool:
        """Whether every plugin's kpr_start may run beside the source's first pass: it has
        none, or its object says STARTS_WITHOUT_SOURCE (it neither reads nor watches the
        source when it starts)."""
        return all(
            not h.implements("kpr_start") or getattr(h.plugin, STARTS_WITHOUT_SOURCE, False) is True
            for h in self.handles
        )

    def _starts_off_the_gil(self) -> bool:
        """Whether every plugin's kpr_start leaves the GIL free: it has none, or its object
        says STARTS_OFF_THE_GIL (asked after kpr_configure: socklb knows then where it compiles)."""
        return all(
            not h.implements("kpr_start") or getattr(h.plugin, STARTS_OFF_THE_GIL, False) is True
            for h in self.handles
        )

    def _read_ahead(self) -> None:
        # A source that can read ahead does so while the plugins start (their BPF compile
        # leaves the GIL free, and reading the manifests was the longest step after it), when
        # a core is idle: on a busy node the two stretch each other and ready comes no
        # sooner (measured on a 2-core VM at load 1-5: the compile took up to 4x as long).
        preload = getattr(self.source, "preload", None)
        if callable(preload):
            spare, load, cpus = spare_core()
            log.info("source.read_ahead on=%s load=%.2f cpus=%d", "yes" if spare else "no", load, cpus)
            if spare:
                preload()

    def _start_source(self) -> None:
        cfg = self.config
        self.store = ObjectStore(
            self.node,
            self.bus,
            proxy_name=cfg.service.proxy_name,
            on_synced=self._on_synced,
            cluster_cidrs=cfg.service.cluster_cidr,
            origin_of=getattr(self.source, "origin_of", None),
        )
        self.source.start(self.store)

    def _on_synced(self, seconds: float) -> None:
        self.metrics.sync_duration.set(seconds)
        self._pass_done = True
        self._switches_back()

    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT; returns the exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.setup()
            except Exception:
                self.shutdown()
                raise
            log.info("agent.running version=%s", __version__)
            next_resync = time.monotonic() + self.config.agent.resync_interval
            # Until ready, looked at more often: the wait is part of the time to ready.
            while not self._signalled:
                self._wake.wait(0.2 if self._ready_sent else READY_POLL)
                self._wake.clear()  # (before the look: a wake-up during it is not lost)
                if self._stop.is_set():
                    break
                self._tick()
                if self.config.agent.resync_interval and time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self.config.agent.resync_interval
                    if self.store.is_synced:
                        self.bus.resync(self.store.snapshot())
            log.info("agent.stopping signal=%s failure=%s", signal.Signals(self._signalled).name if self._signalled else "-", self._failure or "-")
            code = self.shutdown()
            return 1 if self._failure else code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _tick(self) -> None:
        n_services, n_frontends, n_backends = self.store.counts()
        self.metrics.services.set(n_services)
        self.metrics.frontends.set(n_frontends)
        self.metrics.backends.set(n_backends)
        self.metrics.source_errors.set(len(self.store.errors))
        self._check_ready()
        self._check_node()

    def _on_plugins_synced(self) -> None:
        # On the bus worker that handed over the last of the initial state, before the bus
        # settles the heap: readiness is looked at here, at once. Woken instead, the main loop
        # looked while that settle (the writer's 200k backend identities moved, a collection)
        # held the GIL: 15-40 ms more to READY=1 at 20k services.
        self._check_ready()
        self._wake.set()

    def _check_ready(self) -> None:
        """Send READY=1 once: setup() done, the store synced, every plugin's worker handed the
        initial state, and every plugin says it is in place (_plugins_synced); never once
        stopping has begun. From the main loop, the end of setup() or a bus worker
        (_on_plugins_synced)."""
        if self._ready_sent or self.store is None or not self._setup_done or self._stopping:
            return
        # (the plugins' statuses looked at outside the lock: shutdown takes it)
        if not (self.store.is_synced and self.bus.synced() and self._plugins_synced()):
            return
        with self._ready_lock:
            if self._ready_sent or self._stopping:
                return
            self._ready_sent = True
            self._restore_switches()
            log.info("agent.ready services=%d", self.store.counts()[0])
            # (under the lock: shutdown's STOPPING=1 waits for a READY=1 on its way)
            if not self._notify("READY=1\nSTATUS=synced"):
                # The agent's failure, not a plugin's (this can run on a bus worker). systemd
                # never hears it is ready and would end the unit at its start timeout: the
                # agent stops itself now, through shutdown, and run() ends non-zero (before,
                # the exception left run() from its main loop, skipping the shutdown).
                self._failure = "ready_notify"
                self.request_stop()
        self._settle_gate.set()  # (READY=1 is out: the bus may settle the heap now)

    @staticmethod
    def _notify(message: str) -> bool:
        """sdnotify.notify, False (logged) when $NOTIFY_SOCKET is set but cannot be reached."""
        try:
            sdnotify.notify(message)
        except OSError as e:
            log.error("agent.notify_failed message=%s error=%r", message.split("\n", 1)[0], e)
            return False
        return True

    def _plugins_synced(self) -> bool:
        """False while a plugin's status says its initial state is not in place yet
        (details.synced false: the service map writer until its initial sync is written)."""
        writer = self.kpm.facility(WRITER_FACILITY) if self.kpm is not None else None
        for h in self.handles:
            if h is writer and hasattr(h.plugin, "initial_written"):
                # The writer's status counts every map's entries in the kernel (0.1-0.2 s at
                # 20k services, on the way to ready); its synced is this flag.
                if not h.plugin.initial_written:
                    return False
            elif self._status_of(h).details.get("synced", True) is False:
                return False
        return True

    def _node_facts(self) -> NodeInfo:
        """Configured facts win, then the Node object's (addresses, zone), then detection."""
        node = detect(self.config.node)
        api_addresses, zone = self._api_node
        if api_addresses and not self.config.node.addresses:
            node = dataclasses.replace(node, addresses=api_addresses)
        if zone and not node.zone:
            node = dataclasses.replace(node, zone=zone)
        return node

    def _on_node_object(self, obj: dict | None) -> None:
        # Runs on the source's thread, before the services this change affects.
        facts = node_object_facts(obj)
        if facts == self._api_node:
            return
        self._api_node = facts
        log.info("node.object addresses=%s zone=%s", ",".join(facts[0]) or "-", facts[1] or "-")
        self._check_node(force=True)

    def _check_node(self, force: bool = False) -> None:
        # Only detected facts can change; configured ones are fixed.
        cfg = self.config.node
        if cfg.addresses and cfg.devices and not force:
            return
        now = time.monotonic()
        if now < self._next_node_check and not force:
            return
        self._next_node_check = now + 5.0
        with self._node_lock:
            node = self._node_facts()
            if node == self.node:
                return
            log.info("node.changed addresses=%s devices=%s zone=%s", ",".join(node.addresses), ",".join(node.devices), node.zone or "-")
            self.node = node
            for h in self.handles:
                h.context.node = node
            self.bus.node_changed(node)
            if self.store is not None:
                self.store.set_node(node)

    def shutdown(self) -> int:
        """Bounded: a watchdog ends the process if stopping takes longer than shutdownTimeout."""
        timeout = self.config.agent.shutdown_timeout
        watchdog = threading.Timer(timeout + 1.0, self._overrun)
        watchdog.daemon = True
        watchdog.start()
        with self._ready_lock:  # (a READY=1 on its way goes out first)
            self._stopping = True
            self._restore_switches()  # (never ready: a start that failed)
        self._settle_gate.set()  # (READY=1 never comes now: a bus worker waiting goes on)
        self._notify("STOPPING=1")
        start = time.monotonic()
        deadline = start + timeout
        clean = False
        try:
            if self.source is not None:
                self.source.stop()
            self.bus.request_stop()
            # A settle that waited for READY=1 goes on now (the gate is set): it ends before
            # the plugins, the writer among them, stop.
            if not self.bus.join_settle(start + 0.75 * timeout - time.monotonic()):
                log.error("agent.settle_overran: stopping the plugins anyway")
            # Workers finish the hook they are in; a plugin's kpr_stop waits for its own
            # worker up to three quarters of the timeout, and has the rest.
            clean = self._stop_plugins(deadline, workers_until=start + 0.75 * timeout)
            kube = next((h.context.kube for h in self.handles if h.context is not None and h.context.kube), None)
            if kube is not None:
                kube.close()
            if self.api is not None:
                self.api.close()
            self.metrics.close()
        finally:
            # (the plugins are stopped, or the stop failed on the way: either way another agent
            # may start; a hold kept by a stop that raised kept every later agent out)
            pinlock.release(self.config.bpf.pin_path)
            watchdog.cancel()
        log.info("agent.stopped clean=%s", clean)
        return 0 if clean else 1

    def _stop_plugins(self, deadline: float, workers_until: float | None = None) -> bool:
        """Stop started plugins in reverse order, each once its bus worker left its hook
        (waiting until `workers_until`, default the deadline); False when a worker or a
        kpr_stop overran."""
        clean = True
        for h in reversed(self._started):
            if not self._wait_worker(h, deadline if workers_until is None else workers_until):
                clean = False
            t = threading.Thread(target=self._stop_one, args=(h,), name=f"kpr-stop-{h.name}", daemon=True)
            t.start()
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                log.error("plugin.stop_timeout plugin=%s", h.name)
                clean = False
        self._started = []
        return clean

    def _wait_worker(self, h: PluginHandle, until: float) -> bool:
        """Wait until the plugin's bus worker has left its hook; False when it is still inside."""
        if self.bus.join(h.name, 0):
            return True
        hook = self.bus.busy_hook(h.name) or "-"
        log.info("plugin.stop_waiting plugin=%s hook=%s", h.name, hook)
        if self.bus.join(h.name, until - time.monotonic()):
            return True
        log.error(
            "plugin.stop_busy plugin=%s hook=%s: its worker is still in the hook at the shutdown deadline; stopping it anyway",
            h.name, self.bus.busy_hook(h.name) or hook,
        )
        return False

    @staticmethod
    def _stop_one(h: PluginHandle) -> None:
        try:
            h.call("kpr_stop", context=h.context)
            log.info("plugin.stopped plugin=%s", h.name)
        except Exception as e:
            log.error("plugin.stop_failed plugin=%s error=%r", h.name, e, exc_info=True)

    def _overrun(self) -> None:
        log.error("agent.shutdown_timeout seconds=%.1f: exiting anyway", self.config.agent.shutdown_timeout)
        logging.shutdown()
        os._exit(1)

    # --- observation ---------------------------------------------------------------------

    def plugin_statuses(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for h in self.handles:
            delivery = self.bus.stats_of(h.name)
            st = self._status_of(h)
            entry: dict[str, Any] = {
                "healthy": st.healthy,
                "message": st.message,
                "counters": dict(st.counters),
                "details": st.details,
                "dist": h.info.dist,
            }
            if delivery is not None:
                s, pending = delivery
                entry["bus"] = {
                    "delivered": s.delivered,
                    "errors": s.errors,
                    "retries": s.retries,
                    "pending": pending,
                    "synced": s.synced,
                    "lastError": s.last_error,
                    "failing": dict(s.failing),
                }
                if self.bus.stage is not None and self.bus.stage.name == h.name:
                    # The writer stage: the generation the maps hold (what plugins were handed).
                    entry["bus"]["generation"] = self.bus.stage.generation
                if s.failing:
                    entry["healthy"] = False
            out[h.name] = entry
        return out

    @staticmethod
    def _status_of(h: PluginHandle) -> PluginStatus:
        try:
            results = [r for r in h.call("kpr_status") if r is not None]
            st = results[0] if results else PluginStatus()
            return PluginStatus(**st) if isinstance(st, dict) else st
        except Exception as e:
            return PluginStatus(healthy=False, message=f"status failed: {type(e).__name__}: {e}")

    def status(self) -> dict[str, Any]:
        n_services, n_frontends, n_backends = self.store.counts() if self.store else (0, 0, 0)
        source: dict[str, Any] = {"kind": self.config.source.kind}
        if self.config.source.kind == "files":
            source["path"] = str(self.config.source.path)
        source.update(
            synced=bool(self.store and self.store.is_synced),
            syncSeconds=self.store.sync_duration if self.store else None,
            errors=dict(self.store.errors) if self.store else {},
            warnings=dict(self.store.warnings) if self.store else {},
        )
        extra = getattr(self.source, "status", None)
        if callable(extra):
            source.update(extra())
        return {
            "version": __version__,
            "node": {
                "name": self.node.name,
                "addresses": list(self.node.addresses),
                "devices": list(self.node.devices),
                "zone": self.node.zone,
            },
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "source": source,
            "services": n_services,
            "frontends": n_frontends,
            "backends": n_backends,
            "ready": self._ready_sent,
            "plugins": self.plugin_statuses(),
        }
