"""What the NodePort plugins (tc_nodeport, xdp_nodeport) share: `NodePortAgent`, the base of
a plugin that loads one build of the NodePort programs and attaches it.

A plugin subclasses it with its config schema, its build of the programs (_new_datapath) and
how it attaches them to every device in node.devices (_attach_devices, _detach_one). The
state both builds read (the NodePort maps, conntrack GC, healthCheckNodePort) is the NodePort
facility's (facility.py, kpr_requires "nodeport"); the service maps are the core's
ServiceMapWriter's (kpr_requires "servicemaps"). A plugin's status counts its own build's
packets only: each build has its own stats maps.

Attachments outlive the agent: each plugin attaches through BPF links pinned under
<bpf.pinPath>/links/<plugin>/<device>/ (kpr.bpf.links; tcx for tc, XDP links for XDP) where
the kernel has them, and otherwise the old way; a starting agent adopts what is pinned
(switching it to its new programs atomically), and takes kpr's programs off devices no longer
in node.devices, whether this process attached them or an earlier run (the registry of
kpr.bpf.cleanup names them). Stop leaves everything attached unless keepAttachedOnStop is false.

The plugin works with the facility running on its bpf.pinPath in this process, which the
plugin manager starts ahead of it (kpr_requires); so does kpr.testing.harness, which runs a
plugin outside an agent the same way: the plugin has no other mode.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr import hookimpl
from kpr.bpf import maps as M
from kpr.bpf import progcache
from kpr.bpf.links import device_pin_name
from kpr.context import PluginContext
from kpr.model import NodeInfo, PluginStatus

from . import datapath as D
from . import facility as F
from .config import NodePortSection
from .netns import AgentNetns, DeviceFacts, device_facts

log = logging.getLogger(__name__)


@dataclass
class Attached:
    """One program at one hook of a device, as a plugin attached it."""

    ifname: str
    ifindex: int
    direction: str
    prog: str
    pref: int  # clsact filter priority (0: not a clsact filter)
    record_id: int
    # "tcx", "clsact", "xdp-link" or "xdp"; the pinned link and its fd while the agent runs
    how: str = ""
    link_pin: Path | None = None
    link_fd: int = -1
    action: str = ""  # created | adopted | updated | replaced | added


@dataclass
class _Counters:
    attach_errors: int = 0
    errors: list[str] = field(default_factory=list)


class NodePortAgent:
    """Base of the NodePort plugins; instantiated once per agent by the plugin manager."""

    NAME = "nodeport"  # the plugin's name, for messages

    def __init__(self) -> None:
        self.cfg: Any = None
        self.context: PluginContext | None = None
        self.pin: Path | None = None
        self.datapath: D.Datapath | None = None
        # The NodePort facility this plugin's programs work with (the agent's, started first).
        self.nodeport: F.NodePortFacility | None = None
        self._netns: AgentNetns | None = None
        self._netns_path = ""
        self._lock = threading.RLock()
        self._attached: dict[tuple[str, str], Attached] = {}
        self._device_errors: dict[str, str] = {}
        self._foreign_ahead: dict[str, list[str]] = {}
        self._c = _Counters()
        # More compiler flags for _new_datapath (tests build a changed program, as an upgrade brings).
        self.extra_cflags: list[str] = []

    # ------------------------------------------------------------------ configuration

    @hookimpl
    def kpr_requires(self) -> list[str]:
        return ["servicemaps", F.NAME]

    @hookimpl
    def kpr_configure(self, config: NodePortSection, context: PluginContext) -> None:
        self.cfg = config
        self.context = context
        self.pin = Path(context.config.bpf.pin_path)
        if not context.node.devices:
            log.warning("event=nodeport_no_devices effect=nothing_attached hint='set node.devices'")

    # ------------------------------------------------------------------ start / stop

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        cfg, pin = self.cfg, self.pin
        assert cfg is not None and pin is not None, "kpr_configure first"
        try:
            self.nodeport = F.running(pin)
            if self.nodeport is None:
                raise RuntimeError(
                    f"no NodePort facility runs on bpf.pinPath {pin} in this process: {self.NAME} requires "
                    f"{F.NAME!r} (kpr_requires), which the agent's plugin manager (or kpr.testing.harness) starts first"
                )
            self._netns = AgentNetns()
            self._netns_path = self._netns.path()
            # the tables' real size decides where the program looks, whatever was asked for
            maglev = D.writer_settings(pin).maglev_size or M.MAGLEV_DEFAULT_SIZE
            datapath = self._new_datapath(cfg, maglev)
            datapath.sizes = context.config.bpf.map_size_overrides()
            datapath.program_cache = progcache.for_config(context.config)  # a start with nothing to adopt
            # a restart with the same build keeps the programs the first device's links run
            first = context.node.devices[:1]
            self.datapath = datapath.load({
                entry: self._link_dir() / device_pin_name(first[0]) / hook
                for entry, hook in zip(datapath.ENTRIES, datapath.LINK_HOOKS)
            } if first else None)
            self._sync_node(context.node)
        except BaseException:
            self._teardown(detach=True)
            raise
        log.info(
            "event=nodeport_started plugin=%s devices=%s mode=%s netns=%s attached=%d",
            self.NAME, ",".join(context.node.devices) or "-", cfg.mode, self._netns_path or "host", len(self._attached),
        )

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        keep = bool(self.cfg and self.cfg.keep_attached_on_stop)
        self._teardown(detach=not keep)
        log.info("event=nodeport_stopped plugin=%s detached=%s", self.NAME, not keep)

    def _teardown(self, *, detach: bool) -> None:
        from kpr.bpf.cleanup import forget_attachment

        errors = []
        with self._lock:
            if detach and self._attached:
                for (ifname, direction), a in list(self._attached.items()):
                    try:
                        self._detach_one(ifname, direction)
                        if a.record_id and self.pin is not None:
                            forget_attachment(self.pin, a.record_id)
                    except OSError as exc:
                        errors.append(f"{ifname} {direction}: {exc}")
            for a in self._attached.values():
                if a.link_fd >= 0:  # the pin holds the link
                    os.close(a.link_fd)
                    a.link_fd = -1
            self._attached.clear()
            if self.datapath is not None:
                self.datapath.close()
                self.datapath = None
            if self._netns is not None:
                self._netns.close()
                self._netns = None
        self.nodeport = None  # the agent's: it stops it after every plugin
        if errors:
            raise OSError(f"{self.NAME} teardown: " + "; ".join(errors))

    # ------------------------------------------------------------------ devices

    def _detach_one(self, ifname: str, direction: str) -> None:
        """Take kpr's program off one hook of a device (in the agent's namespace)."""
        raise NotImplementedError

    # The registry kind of this plugin's attachments (kpr.bpf.cleanup) and its program names.
    RECORD_KIND = "tc"

    def _record_names(self) -> tuple[str, ...]:
        dp = self.datapath
        return tuple(dp.ENTRIES) if dp is not None else ()

    def _link_dir(self) -> Path:
        from kpr.bpf import links

        assert self.pin is not None
        return self.pin / links.LINKS_DIR / self.NAME

    def _recorded(self, kind: str, names: tuple[str, ...]) -> list[dict[str, Any]]:
        """kpr's attachment records on this pin (kpr.bpf.cleanup) of programs `names` at hooks
        of `kind`, in this agent's namespace, whichever plugin or run made them."""
        from kpr.bpf.cleanup import attachments

        assert self.pin is not None
        return [r for r in attachments(self.pin) if r["kind"] == kind and r["prog_name"] in names
                and r["target"].get("netns", "") == self._netns_path]

    def _detach_unlisted(self, devices: tuple[str, ...]) -> None:
        """Take kpr's programs off devices no longer in node.devices, and forget their records:
        this process's attachments, an earlier run's (recorded in the registry, in this
        agent's namespace) and links pinned for such devices."""
        from kpr.bpf import links
        from kpr.bpf.cleanup import forget_attachment

        for (ifname, direction), a in list(self._attached.items()):
            if ifname in devices:
                continue
            try:
                self._detach_one(ifname, direction)
                if a.record_id:
                    forget_attachment(self.pin, a.record_id)
            except OSError as exc:
                self._note_error(f"detaching from {ifname}: {exc}")
            if a.link_fd >= 0:
                os.close(a.link_fd)
            del self._attached[(ifname, direction)]
        for rec in self._recorded(self.RECORD_KIND, self._record_names()):
            t = rec["target"]
            if t["ifname"] in devices:
                continue
            try:
                self._detach_one(t["ifname"], t.get("direction", "xdp"))
                forget_attachment(self.pin, rec["id"])
                log.info("event=nodeport_unlisted_detached dev=%s prog=%s", t["ifname"], rec["prog_name"])
            except OSError as exc:
                self._note_error(f"detaching an earlier run's program from {t['ifname']}: {exc}")
        root = self._link_dir()
        pinned_as = {device_pin_name(d) for d in devices}
        for line in links.sweep(root, lambda p, li: p.parent.name in pinned_as and not li.defunct):
            log.info("event=nodeport_link_swept what=%r", line)

    def _attach_devices(self, devices: tuple[str, ...], facts: DeviceFacts) -> None:
        """Attach to `devices` (facts: name -> (ifindex, IPv4, IPv6)), detach from those no longer
        listed; fill self._attached, self._device_errors (and self._foreign_ahead)."""
        raise NotImplementedError

    def _new_datapath(self, cfg: Any, maglev_size: int) -> D.Datapath:
        """The plugin's build of the programs (not loaded yet)."""
        raise NotImplementedError

    def _device_details(self, attached: list[Attached], devices: list[str]) -> dict[str, Any]:
        return {dev: {a.direction: (a.pref or a.how) for a in attached if a.ifname == dev} for dev in devices}

    def _sync_node(self, node: NodeInfo) -> None:
        """Attach to node.devices (and detach from devices no longer listed)."""
        assert self.datapath is not None and self._netns is not None
        with self._lock:
            facts, missing, _every = self._netns(lambda: device_facts(node.devices))
            if missing:
                log.error("event=nodeport_devices_missing plugin=%s devices=%s", self.NAME, ",".join(missing))
            self._attach_devices(tuple(node.devices), facts)
            self.datapath.open_ct_gate("attached")  # (see Datapath.open_ct_gate)
            if not self._device_errors:  # every entry is this build's now: earlier builds' stages go
                self.datapath.drop_other_generations()

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        if self.datapath is not None:
            self._sync_node(node)

    # ------------------------------------------------------------------ status

    def _note_error(self, text: str) -> None:
        log.warning("event=nodeport_error plugin=%s error=%s", self.NAME, text)
        self._c.errors = (self._c.errors + [text])[-10:]

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        """This plugin's attachments and its own build's packet counters (the shared state's
        status is the facility's, `nodeport` in `kpr status`)."""
        cfg = self.cfg
        dp = self.datapath
        try:
            stats = dp.stats() if dp is not None else {}
        except Exception as exc:  # stopping under our feet; status must not fail for it
            log.debug("event=nodeport_stats_unreadable error=%r", exc)
            stats = {}
        counters: dict[str, float] = {k: float(v) for k, v in stats.items()}
        counters["drops_total"] = float(sum(stats.get(k, 0) for k in D.DROP_STATS))
        # packets a redirect helper could not take, handed to the kernel instead (by reason in fwd_stack_*)
        counters["given_up_total"] = float(sum(stats.get(k, 0) for k in D.GIVEN_UP_STATS))
        # snapshots: status must not wait for a bus worker holding the lock, nor trip over it
        attached = list(self._attached.values())
        devices = sorted({a.ifname for a in attached})
        counters["devices_attached"] = float(len(devices))
        counters["attach_errors"] = float(self._c.attach_errors)
        wanted = tuple(self.context.node.devices) if self.context else ()
        fac = self.nodeport
        shared_up = fac is not None and fac.tables is not None
        healthy = dp is not None and bool(wanted) and not self._device_errors and set(wanted) <= set(devices) and shared_up
        if dp is None:
            msg = "not started"
        elif not wanted:
            msg = "no devices (node.devices is empty): nothing attached"
        else:
            msg = f"{len(devices)}/{len(wanted)} devices, mode {cfg.mode if cfg else '?'}"
            if self._device_errors:
                msg += "; failed: " + ", ".join(f"{d} ({w})" for d, w in sorted(self._device_errors.items()))
        if dp is not None and not shared_up:
            msg += "; the NodePort facility is not running"
        details: dict[str, object] = {
            "mode": cfg.mode if cfg else None,
            "devices": self._device_details(attached, devices),
            "deviceErrors": dict(self._device_errors),
            "foreignFiltersFirst": dict(self._foreign_ahead),
            "netns": self._netns_path or "host",
            "statsMaps": [dp.STATS_MAP, dp.FWD_MAP] if dp is not None else [],
            "build": dp.build if dp is not None else None,  # compiled, cached (kpr.bpf.progcache) or adopted
            # false: the tc build infers the checksum state (a fallback kept by restarts, or no
            # kfunc); null for XDP, which has no skb
            "kernctx": dp.reads_csum_state if dp is not None else None,
            "facility": F.NAME if fac is not None else None,
            "errors": list(self._c.errors),
        }
        return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)
