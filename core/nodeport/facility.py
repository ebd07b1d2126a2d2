"""The NodePort facility: the one owner of the state tc_nodeport and xdp_nodeport share.

Plugins ask for it with kpr_requires ["nodeport"] (as for "servicemaps"); the plugin manager
registers one per agent ahead of every plugin, so it starts first and stops last. It owns:
  - the maps of lib/nodeport.h both builds read (tables.py: created here, written here only):
    one frontend table, whatever hooks run, with every service's own mode (each build falls
    back to its compiled default for the rest), announced addresses, frontend ports, node
    and device addresses, the kind of every link (a kpr.netdevs.DeviceWatcher);
  - the conntrack garbage collector (gc.py), one per node, and the clearing of flows whose
    backend left when a service changes;
  - the healthCheckNodePort listeners (healthcheck.py), one per port.
The plugins only load their build of the programs, attach it, and report its own counters
(each build counts into its own stats maps).

Settings come from the enabled NodePort plugins' sections (`settings_from`): healthCheck is
on when any asks for it; keys both set (healthCheckAddress, gcInterval) must agree.

Outside an agent (tests, harnesses) kpr.testing.harness starts it the same way, ahead of the
plugins that require it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr import hookimpl
from kpr.bpf import maps as M
from kpr.context import PluginContext
from kpr.model import NodeInfo, PluginStatus, Service, ServiceKey
from kpr.netdevs import DeviceWatcher, NetDev

from . import datapath as D
from .config import NodePortSection
from .gc import BackendSet, Collector
from .healthcheck import HealthChecks
from .netns import AgentNetns, device_facts
from kpr import nexthops
from .services import MODE_ANNOTATION, FeKey, ServiceBook, SvcState, service_state
from .tables import NodePortTables

log = logging.getLogger(__name__)

NAME = "nodeport"  # the name plugins ask for with kpr_requires
SHARED_MAPS = ("kpr_ct", "kpr_snat", "kpr_backend", "kpr_svc")  # the service map writer's, read here


@dataclass(frozen=True)
class Settings:
    conntrack_size: int = 524288
    maglev_table_size: int = M.MAGLEV_DEFAULT_SIZE
    algorithm: str = "random"
    health_check: bool = True
    health_check_address: str = ""
    gc_interval: float = 10.0
    flow_slots: bool = True


def settings_from(sections: dict[str, NodePortSection]) -> Settings:
    """The facility's settings from the NodePort sections of the enabled plugins (name -> section).
    Raises ConfigError naming both keys when two sections disagree on a key the facility owns
    (the service map writer checks conntrackSize, maglevTableSize and algorithm)."""
    from kpr.config import ConfigError

    if not sections:
        return Settings()
    problems = []
    chosen: dict[str, tuple[str, Any]] = {}
    for name, s in sorted(sections.items()):
        for attr, key, applies in (("gc_interval", "gcInterval", True),
                                   ("flow_slots", "flowSlots", True),
                                   ("health_check_address", "healthCheckAddress", s.health_check)):
            if not applies:
                continue
            value = getattr(s, attr)
            if attr in chosen and chosen[attr][1] != value:
                other_key, other = chosen[attr]
                problems.append(f"plugins.{name}.{key}: {value!r} disagrees with {other_key}: {other!r} "
                                f"(one NodePort facility serves both plugins)")
            chosen.setdefault(attr, (f"plugins.{name}.{key}", value))
    if problems:
        raise ConfigError(problems)
    first = sections[sorted(sections)[0]]
    return Settings(
        conntrack_size=max(s.conntrack_size for s in sections.values()),
        maglev_table_size=first.maglev_table_size,
        algorithm=first.algorithm,
        health_check=any(s.health_check for s in sections.values()),
        health_check_address=chosen.get("health_check_address", ("", ""))[1],
        gc_interval=chosen["gc_interval"][1],
        flow_slots=chosen["flow_slots"][1],
    )


# bpf.pinPath -> the facility running on it in this process (the plugins find theirs here)
_RUNNING: dict[Path, "NodePortFacility"] = {}
_RUNNING_LOCK = threading.Lock()


def running(pin: Path) -> "NodePortFacility | None":
    with _RUNNING_LOCK:
        return _RUNNING.get(Path(pin).resolve())


class NodePortFacility:
    """One per agent (FACILITIES["nodeport"] in kpr.pluginmanager); see the module's docstring."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.context: PluginContext | None = None
        self.pin: Path | None = None
        self.tables: NodePortTables | None = None
        self.shared: dict[str, M.BpfMap] = {}
        self.collector: Collector | None = None
        self.health: HealthChecks | None = None
        self.netdevs: DeviceWatcher | None = None
        self.nexthops: nexthops.Subscription | None = None  # to the namespace's shared watcher
        self.netns: AgentNetns | None = None
        self.netns_path = ""
        self.book = ServiceBook()
        self._lock = threading.RLock()
        self.devices: dict[int, NetDev] = {}
        self._node_addrs: set[str] = set()
        self._snat_addrs: set[bytes] = set()
        self._mode_problems: dict[ServiceKey, str] = {}
        self._writer: D.WriterSettings | None = None
        self._writer_checked = 0.0
        self._algo_seen: dict[str, int] = {}
        self._synced = False
        self._purges = 0

    @classmethod
    def from_config(cls, config: Any) -> "NodePortFacility":
        """The agent's facility (kpr.pluginmanager.FACILITIES): settings from the sections of the
        enabled plugins that are NodePort sections."""
        sections = {n: s for n, s in config.plugin_sections.items() if isinstance(s, NodePortSection)}
        return cls(settings_from(sections))

    # ------------------------------------------------------------------ start / stop

    @hookimpl
    def kpr_configure(self, config: Any, context: PluginContext) -> None:
        self.context = context
        self.pin = Path(context.config.bpf.pin_path)

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        from kpr.bpf import fs

        pin = self.pin
        assert pin is not None, "kpr_configure first"
        real = pin.resolve()
        if not any(m == real or m in real.parents for m in fs.find_mounts("bpf")):
            raise OSError(f"bpf.pinPath {pin} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")
        with _RUNNING_LOCK:
            if real in _RUNNING:
                raise RuntimeError(f"a NodePort facility runs on {pin} in this process already")
            _RUNNING[real] = self
        try:
            self.netns = AgentNetns()
            self.netns_path = self.netns.path()
            self._writer = D.writer_settings(pin)
            self._writer_checked = time.monotonic()
            self.tables = NodePortTables(pin, self.settings.conntrack_size)
            for name in SHARED_MAPS:
                self.shared[name] = M.BpfMap.open_pinned(pin / name)
            self.health = HealthChecks(self.netns, self.settings.health_check_address)
            # before any program runs: they must know the pods' devices from their first packet
            self.netdevs = self.netns(DeviceWatcher(self._on_devices).start)
            # arms the programs' next-hop cache (generation bumped once) and keeps it honest; the
            # namespace's one watcher, shared with host_routing's kpr_hr_out
            self.nexthops = self.netns(lambda: nexthops.subscribe(self._invalidate_next_hops, NAME))
            self._sync_node(context.node)
            self.tables.arm()  # ports pinned by an earlier run stay until the initial sync is complete
            self.collector = self._new_collector({**self.shared, **self.tables.maps})
            self.collector.start()
        except BaseException:
            self._teardown()
            raise
        for what in self._not_honoured():
            log.warning("event=nodeport_config_not_honoured %s", what)
        log.info("event=nodeport_facility_started netns=%s", self.netns_path or "host")

    def _new_collector(self, maps: dict[str, M.BpfMap]) -> Collector:
        """The flow collector over `maps` (the shared service maps and this facility's tables), for
        builds as flowSlots says: one without slot tables never marks kpr_np_ct_gate clean."""
        return Collector(
            maps, self.book.allowed, lambda: set(self._snat_addrs), self.settings.gc_interval,
            after_pass=self._check_algorithm, ready=lambda: self._synced, pin=self.pin,
            ct_slots=self.settings.flow_slots,
        )

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        self._teardown()
        log.info("event=nodeport_facility_stopped")

    def _teardown(self) -> None:
        if self.netdevs is not None:
            self.netdevs.stop()
            self.netdevs = None
        if self.nexthops is not None:
            self.nexthops.close()
            self.nexthops = None
        if self.collector is not None:
            self.collector.stop()
            self.collector = None
        if self.health is not None:
            self.health.close()
            self.health = None
        with self._lock:
            if self.tables is not None:
                # the watcher is closed (no bump after this): programs left attached without an
                # agent look every packet's route up rather than trust next hops nobody watches
                try:
                    self.tables.disarm_next_hops()
                except OSError as e:
                    log.warning("event=nodeport_next_hops_not_disarmed error=%s", e)
                self.tables.close()
                self.tables = None
            for m in self.shared.values():
                m.close()
            self.shared.clear()
            if self.netns is not None:
                self.netns.close()
                self.netns = None
        if self.pin is not None:
            with _RUNNING_LOCK:
                if _RUNNING.get(self.pin.resolve()) is self:
                    del _RUNNING[self.pin.resolve()]

    # ------------------------------------------------------------------ node facts

    def _sync_node(self, node: NodeInfo) -> None:
        """Device SNAT addresses, node addresses, and the announced addresses they exclude."""
        assert self.tables is not None and self.netns is not None
        with self._lock:
            facts, missing, every = self.netns(lambda: device_facts(node.devices))
            if missing:
                log.error("event=nodeport_devices_missing devices=%s", ",".join(missing))
            default4 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 4), None)
            default6 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 6), None)
            default4 = default4 or next((f[1] for f in facts.values() if f[1]), None)
            default6 = default6 or next((f[2] for f in facts.values() if f[2]), None)
            self.tables.set_devices({idx: (v4, v6) for idx, v4, v6 in facts.values()}, (default4, default6))
            addrs = set(node.addresses) | set(every)
            self.tables.set_node_addresses(addrs)
            snat = {a for _i, v4, v6 in facts.values() for a in (v4, v6) if a} | {a for a in (default4, default6) if a}
            self._snat_addrs = {M.addr_to_bytes(a) for a in snat}
            if addrs != self._node_addrs:
                self._node_addrs = addrs
                if self.book.services or self._synced:  # a restart keeps what is announced until it knows
                    self.tables.set_vips(self.book.vips() - addrs)

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        if self.tables is not None:
            self._sync_node(node)

    def _invalidate_next_hops(self) -> None:
        """A route or neighbour changed (watcher thread): the programs' cached next hops go stale."""
        with self._lock:
            if self.tables is not None:
                self.tables.invalidate_next_hops()

    def _on_devices(self, devices: dict[int, NetDev]) -> None:
        """The watcher's view of the namespace's links, into kpr_np_devkind (watcher thread).
        Under the lock, as every other write of the next-hop generation: a change bumps it (a
        read, then a write), which must not interleave with another bump nor follow stop's
        disarm (the cache armed again with no watcher left to bump it)."""
        with self._lock:
            self.devices = devices
            if self.tables is None:
                return
            try:
                written, removed = self.tables.set_device_kinds({i: d.kind for i, d in devices.items()})
            except OSError as exc:
                log.debug("event=nodeport_devkinds_unwritten error=%r", exc)
                return
        if written or removed:
            log.debug("event=nodeport_devkinds devices=%d written=%d removed=%d", len(devices), written, removed)

    def device_kinds(self) -> dict[str, Any]:
        """For status: how many links of each kind, and the kind of each external device."""
        devs = list(self.devices.values())
        by_kind: dict[str, int] = {}
        for d in devs:
            by_kind[d.kind.name.lower()] = by_kind.get(d.kind.name.lower(), 0) + 1
        wanted = set(self.context.node.devices) if self.context else set()
        return {
            "links": dict(sorted(by_kind.items())),
            "external": {d.name: d.kind.name.lower() for d in devs if d.name in wanted},
            "watching": self.netdevs.running if self.netdevs is not None else False,
            "watchErrors": self.netdevs.errors if self.netdevs is not None else None,
        }

    # ------------------------------------------------------------------ services

    @hookimpl
    def kpr_service_upsert(self, service: Service) -> None:
        new, problem = service_state(service)
        with self._lock:
            if problem:
                if self._mode_problems.get(service.key) != problem:
                    log.warning("event=nodeport_bad_mode_annotation %s", problem)
                self._mode_problems[service.key] = problem
            else:
                self._mode_problems.pop(service.key, None)
            self._put(service.key, new)

    @hookimpl
    def kpr_service_delete(self, key: ServiceKey) -> None:
        with self._lock:
            self._mode_problems.pop(key, None)
            self._put(key, None)

    def _put(self, key: ServiceKey, new: SvcState | None) -> None:
        old = self.book.services.get(key)
        ch = self.book.put(key, new)
        if ch is None:
            return
        if self.tables is not None:
            self.tables.apply(ch, vip_filter=self._node_addrs, keep_ports=not self._synced)
        self._health(key, old, new)
        self._purge(key, ch.backends_removed)

    @hookimpl
    def kpr_sync_complete(self) -> None:
        # What an earlier run left (ports, announced addresses, modes of services gone while no
        # agent ran) goes; flows pinned to backends that left meanwhile: the same rule as a change.
        with self._lock:
            self._synced = True
            if self.tables is not None:
                self.tables.set_ports(self.book.ports())
                self.tables.set_vips(self.book.vips() - self._node_addrs)
                self.tables.set_modes(self.book.modes())
        if self.collector is not None:
            res = self.collector.run(stale_only=True)
            if res.stale:
                log.info("event=nodeport_stale_flows_cleared at=sync_complete count=%d", res.stale)
        self._check_algorithm()

    def _health(self, key: ServiceKey, old: SvcState | None, new: SvcState | None) -> None:
        if self.health is None:
            return
        if old is not None and old.hc_port and (new is None or new.hc_port != old.hc_port):
            self.health.remove(old.hc_port)
        if new is not None and new.hc_port and self.settings.health_check:
            self.health.set(new.hc_port, key, new.local_endpoints)

    def _purge(self, key: ServiceKey, removed: dict[FeKey, BackendSet]) -> None:
        """Clear the non-TCP flows (and their SNAT ports and reverse entries) of backends that left.
        The maps no longer offer them: the writer stage applies every change before the
        facility's worker gets it (kpr.pipeline), so a flow cleared now cannot come back."""
        removed = {k: v for k, v in removed.items() if k[2] != 6}  # TCP flows end on their own (RST)
        if not removed or self.collector is None:
            return
        fes = set(removed)
        ports = {(k[1], k[2]) for k in removed}
        res = self.collector.run(stale_only=True, only=lambda a, p, pr: (a, p, pr) in fes or (p, pr) in ports)
        self._purges += 1
        if res.stale:
            log.info("event=nodeport_stale_flows_cleared service=%s count=%d", key, res.stale)

    # ------------------------------------------------------------------ the writer's settings

    def _check_algorithm(self) -> None:
        """Which algorithm the writer gives services that do not name one (sampled from kpr_svc)."""
        svc_map = self.shared.get("kpr_svc")
        if svc_map is None:
            return
        seen: dict[str, int] = {}
        with self._lock:
            sample = [s for s in self.book.services.values() if not s.algorithm_annotated and s.frontends][:20]
        for s in sample:
            addr, port, proto = next(iter(s.frontends))
            raw = svc_map.lookup(M.SVC_KEY.pack(addr, port, proto, M.SCOPE_EXTERNAL, 0, 0))
            if raw is None:
                continue
            flags = M.SVC_VAL.unpack(raw)[4]
            name = "maglev" if flags & M.SVC_F_MAGLEV else "random"
            seen[name] = seen.get(name, 0) + 1
        self._algo_seen = seen

    def _writer_settings(self) -> D.WriterSettings | None:
        if self.pin is not None and time.monotonic() - self._writer_checked > 5:
            try:
                self._writer = D.writer_settings(self.pin)
                self._writer_checked = time.monotonic()
            except OSError as exc:
                log.debug("event=nodeport_writer_settings_unreadable error=%s", exc)
        return self._writer

    def writer_check(self) -> dict[str, dict[str, Any]]:
        """Each setting the core's writer decides: what this config asks, what the maps hold."""
        st = self.settings
        ws = self._writer_settings()
        out: dict[str, dict[str, Any]] = {}
        have_ct = ws.conntrack_size if ws else None
        rev = self.tables.maps.get(D.REV_MAP) if self.tables is not None else None
        out["conntrackSize"] = {
            "configured": st.conntrack_size,
            "kpr_ct": have_ct,
            "kpr_np_rev": rev.info().max_entries if rev is not None else None,
            "honoured": have_ct == st.conntrack_size if have_ct else None,
        }
        have_m = ws.maglev_size if ws else None
        out["maglevTableSize"] = {
            "configured": st.maglev_table_size,
            "tables": have_m,
            "honoured": (have_m == st.maglev_table_size) if have_m else None,
        }
        seen = self._algo_seen
        effective = None if not seen else (next(iter(seen)) if len(seen) == 1 else "mixed")
        out["algorithm"] = {
            "configured": st.algorithm,
            "effective": effective,
            "honoured": (effective == st.algorithm) if effective else None,
        }
        return out

    def _not_honoured(self) -> list[str]:
        out = []
        for key, v in self.writer_check().items():
            if v["honoured"] is False:
                have = {k: x for k, x in v.items() if k not in ("configured", "honoured")}
                out.append(
                    f"{key}={v['configured']} is not what the shared maps hold ({have}): they were created "
                    f"before this setting (pinned by an earlier run: `kpr cleanup` to recreate) or by a writer "
                    f"configured elsewhere"
                )
        return out

    # ------------------------------------------------------------------ status

    def own_sizes(self) -> dict[str, int]:
        """max_entries of the facility's pinned maps (a pin from an earlier run keeps its size)."""
        tables = self.tables
        return {name: m.info().max_entries for name, m in tables.maps.items()} if tables is not None else {}

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        started = self.tables is not None
        counters: dict[str, float] = {"services": float(len(self.book.services)), "purges": float(self._purges)}
        col = self.collector
        if col is not None:
            t = col.totals
            counters.update(
                conntrack_entries=float(t.ct_entries),
                reverse_entries=float(t.rev_entries),
                snat_entries=float(t.snat_entries),
                gc_runs=float(t.runs),
                gc_ct_expired=float(t.ct_expired),
                gc_reverse_expired=float(t.rev_expired),
                gc_snat_ports_freed=float(t.snat_freed),
                stale_flows_cleared=float(t.stale_flows_cleared),
                gc_errors=float(t.errors),
            )
        hc = self.health.ports() if self.health is not None else {}
        counters["health_check_listeners"] = float(len(hc))
        if self.nexthops is not None:
            counters["next_hop_invalidations"] = float(self.nexthops.invalidations)
        not_honoured = self._not_honoured() if started else []
        counters["config_not_honoured"] = float(len(not_honoured))
        watching = self.netdevs is not None and self.netdevs.running
        healthy = started and watching
        msg = f"{len(self.book.services)} services, {len(hc)} health check listeners" if started else "not started"
        if started and not watching:
            msg += "; links no longer followed (device watcher stopped): new pods' devices go through the stack"
        if not_honoured:
            msg += f"; {len(not_honoured)} setting(s) not honoured by the service map writer"
        if self._mode_problems:
            msg += f"; {len(self._mode_problems)} service(s) with an invalid {MODE_ANNOTATION}"
        if self.health is not None and self.health.errors:
            msg += f"; {len(self.health.errors)} health check port(s) not listening"
        details: dict[str, object] = {
            "netns": self.netns_path or "host",
            "settings": {"healthCheck": self.settings.health_check, "gcInterval": self.settings.gc_interval,
                         "healthCheckAddress": self.settings.health_check_address,
                         "flowSlots": self.settings.flow_slots},
            "writer": self.writer_check() if started else {},
            "notHonoured": not_honoured,
            "healthChecks": hc,
            "healthCheckErrors": dict(self.health.errors) if self.health is not None else {},
            "modeAnnotationProblems": sorted(self._mode_problems.values()),
            "mapSizes": self.own_sizes(),
            "deviceKinds": self.device_kinds(),
        }
        return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)
