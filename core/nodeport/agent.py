"""What the NodePort plugins (tc_nodeport, xdp_nodeport) share: `NodePortAgent`.

A plugin subclasses it with its config schema, its build of the programs (_new_datapath) and
how it attaches them to every device in node.devices (_attach_devices, _detach_one). The agent
loads the NodePort programs (datapath.py) and keeps its own maps in step with services and
node facts: announced addresses (dropped unless a frontend takes the packet), per-service
modes, node addresses and per-device SNAT addresses. A collector thread expires conntrack
state (gc.py); flows whose backend left are cleared when the service changes. Services with
externalTrafficPolicy=Local get their healthCheckNodePort served (healthcheck.py).

The programs pick the forwarding helper by what the egress device is (a pod's veth, a bridge,
an overlay device, ...): a kpr.netdevs.DeviceWatcher on the agent's namespace keeps the
data path's kpr_np_devkind map current as links come and go, with no setting to make.

The shared service maps are the core's ServiceMapWriter's (kpr_requires "servicemaps"): it
follows the bus on its own worker and this plugin never writes them.

Attachments outlive the agent: each plugin attaches through BPF links pinned under
<bpf.pinPath>/links/<plugin>/<device>/ (kpr.bpf.links; tcx for tc, XDP links for XDP) where
the kernel has them, and otherwise the old way; a starting agent adopts what is pinned
(switching it to its new programs atomically), and takes kpr's programs off devices no longer
in node.devices, whether this process attached them or an earlier run (the registry of
kpr.bpf.cleanup names them). Stop leaves everything attached unless keepAttachedOnStop is false.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kpr import hookimpl
from kpr.bpf import maps as M
from kpr.bpf.links import device_pin_name
from kpr.context import PluginContext
from kpr.model import BackendState, FrontendType, NodeInfo, PluginStatus, Protocol, Service, ServiceKey
from kpr.netdevs import DeviceWatcher, NetDev

from . import datapath as D
from .config import NodePortSection
from .gc import BackendSet, Collector
from .healthcheck import HealthChecks

log = logging.getLogger(__name__)

T = TypeVar("T")

# Per-service override of plugins.<nodeport plugin>.mode: snat, dsr or hybrid.
MODE_ANNOTATION = "service.kpr.io/lb-mode"
# The writer's per-service algorithm annotation (kpr.servicemaps.ALGORITHM_ANNOTATION); read
# here only to tell annotated services apart when checking the writer's default.
ALGORITHM_ANNOTATION = "service.kpr.io/lb-algorithm"

EXTERNAL_TYPES = (FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP, FrontendType.HOST_PORT)
ANNOUNCED_TYPES = (FrontendType.LOAD_BALANCER, FrontendType.EXTERNAL_IP)
WRITER_WAIT_SECONDS = 1.0  # how long a purge waits for the writer to stop offering removed backends

FeKey = tuple[bytes, int, int]  # (address16, port in network order, protocol number)


# ---------------------------------------------------------------------- network namespace



class _AgentNetns:
    """Runs callables in the network namespace the agent started in, whichever thread calls.

    Attaching filters and listening sockets act on the calling thread's namespace; bus
    workers and test threads may be elsewhere.
    """

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.ino = os.fstat(self.fd).st_ino

    def here(self) -> bool:
        return os.stat("/proc/thread-self/ns/net").st_ino == self.ino

    def __call__(self, fn: Callable[[], T]) -> T:
        from kpr.bpf.links import run_in_netns

        if self.here():
            return fn()
        return run_in_netns(self.fd, fn)

    def path(self) -> str:
        """A path naming the namespace for `kpr cleanup` ("" for the host's own)."""
        try:
            if os.stat("/proc/1/ns/net").st_ino == self.ino:
                return ""
        except OSError:
            pass
        netns_dir = Path("/run/netns")
        if netns_dir.is_dir():
            for p in sorted(netns_dir.iterdir()):
                try:
                    if os.stat(p).st_ino == self.ino:
                        return str(p)
                except OSError:
                    continue
        return ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _device_facts(devices: tuple[str, ...]) -> tuple[dict[str, tuple[int, str | None, str | None]], list[str], list[str]]:
    """(name -> (ifindex, first global IPv4, first global IPv6), missing names, every global address)."""
    from pyroute2 import IPRoute

    facts: dict[str, tuple[int, str | None, str | None]] = {}
    missing: list[str] = []
    every: list[str] = []
    with IPRoute() as ipr:
        for dev in devices:
            found = ipr.link_lookup(ifname=dev)
            if not found:
                missing.append(dev)
                continue
            v4 = v6 = None
            for msg in ipr.get_addr(index=found[0]):
                ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                if ip.is_link_local or ip.is_loopback:
                    continue
                every.append(str(ip))
                if ip.version == 4 and v4 is None:
                    v4 = str(ip)
                elif ip.version == 6 and v6 is None:
                    v6 = str(ip)
            facts[dev] = (int(found[0]), v4, v6)
    return facts, missing, every


# ---------------------------------------------------------------------- per-service state


@dataclass(frozen=True)
class _SvcState:
    # External frontends -> every backend their flows may use (terminating ones keep flows).
    frontends: dict[FeKey, BackendSet]
    # NodePort (port, protocol) -> backends: flows to any node address match by port.
    nodeports: dict[tuple[int, int], BackendSet]
    # Announced addresses (LoadBalancer, ExternalIP).
    vips: frozenset[str]
    # Frontends with a mode of their own: (address, port, protocol number) -> mode.
    modes: dict[tuple[str, int, int], str]
    # healthCheckNodePort (0: none) and the local ready endpoints it reports.
    hc_port: int
    local_endpoints: int
    # Whether the service names its algorithm (the writer's default does not apply to it).
    algorithm_annotated: bool


def _service_state(service: Service, default_mode: str) -> tuple[_SvcState, str]:
    """The service's state and, when its mode annotation is invalid, why."""
    ann = service.annotation_map
    mode_ann = ann.get(MODE_ANNOTATION, "")
    problem = ""
    mode = ""
    if mode_ann:
        if mode_ann in D.MODES:
            mode = mode_ann
        else:
            problem = f"{service.key}: {MODE_ANNOTATION}={mode_ann!r} is not one of snat, dsr, hybrid; using {default_mode}"
    frontends: dict[FeKey, set[tuple[bytes, int]]] = {}
    nodeports: dict[tuple[int, int], set[tuple[bytes, int]]] = {}
    vips: set[str] = set()
    modes: dict[tuple[str, int, int], str] = {}
    hc_port = 0
    local: set[tuple[str, int]] = set()
    for fe in service.frontends:
        if fe.type not in EXTERNAL_TYPES or fe.protocol not in (Protocol.TCP, Protocol.UDP):
            continue
        proto = fe.protocol.number
        port_n = M.htons(fe.port)
        bes = {(M.addr_to_bytes(b.address), M.htons(b.port)) for b in fe.backends}
        frontends.setdefault((M.addr_to_bytes(fe.address), port_n, proto), set()).update(bes)
        if fe.type is FrontendType.NODE_PORT:
            nodeports.setdefault((port_n, proto), set()).update(bes)
        if fe.type in ANNOUNCED_TYPES:
            vips.add(fe.address)
        if mode and mode != default_mode:
            modes[(fe.address, fe.port, proto)] = mode
            if fe.type is FrontendType.NODE_PORT:
                modes[("0.0.0.0" if fe.family == 4 else "::", fe.port, proto)] = mode
        if fe.health_check_node_port:
            hc_port = fe.health_check_node_port
            local.update((b.address, b.port) for b in fe.backends if b.local and b.state is BackendState.ACTIVE)
    state = _SvcState(
        frontends={k: frozenset(v) for k, v in frontends.items()},
        nodeports={k: frozenset(v) for k, v in nodeports.items()},
        vips=frozenset(vips),
        modes=modes,
        hc_port=hc_port,
        local_endpoints=len({a for a, _p in local}),
        algorithm_annotated=ALGORITHM_ANNOTATION in ann,
    )
    return state, problem


@dataclass
class _Attached:
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
    purges: int = 0
    errors: list[str] = field(default_factory=list)


class NodePortAgent:
    """Base of the NodePort plugins; instantiated once per agent by the plugin manager."""

    NAME = "nodeport"  # the plugin's name, for messages

    def __init__(self) -> None:
        self.cfg: Any = None
        self.context: PluginContext | None = None
        self.pin: Path | None = None
        self.datapath: D.Datapath | None = None
        self.collector: Collector | None = None
        self.health: HealthChecks | None = None
        self.netdevs: DeviceWatcher | None = None
        self._devices: dict[int, NetDev] = {}
        self._netns: _AgentNetns | None = None
        self._netns_path = ""
        self._lock = threading.RLock()
        self._attached: dict[tuple[str, str], _Attached] = {}
        self._device_errors: dict[str, str] = {}
        self._foreign_ahead: dict[str, list[str]] = {}
        self._services: dict[ServiceKey, _SvcState] = {}
        self._fe_index: dict[FeKey, dict[ServiceKey, BackendSet]] = {}
        self._np_index: dict[tuple[int, int], dict[ServiceKey, BackendSet]] = {}
        self._ports_written: set[tuple[int, int]] | None = None  # kpr_np_ports as last written
        self._node_addrs: set[str] = set()
        self._snat_addrs: set[bytes] = set()
        self._mode_problems: dict[ServiceKey, str] = {}
        self._writer: D.WriterSettings | None = None
        self._writer_checked = 0.0
        self._algo_seen: dict[str, int] = {}
        self._c = _Counters()
        self._synced = False
        # More compiler flags for _new_datapath (tests build a changed program, as an upgrade brings).
        self.extra_cflags: list[str] = []

    # ------------------------------------------------------------------ configuration

    @hookimpl
    def kpr_requires(self) -> list[str]:
        return ["servicemaps"]

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
        from kpr.bpf import fs

        cfg, pin = self.cfg, self.pin
        assert cfg is not None and pin is not None, "kpr_configure first"
        real = pin.resolve()
        if not any(m == real or m in real.parents for m in fs.find_mounts("bpf")):
            raise OSError(f"bpf.pinPath {pin} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")
        try:
            self._netns = _AgentNetns()
            self._netns_path = self._netns.path()
            self._writer = D.writer_settings(pin)
            self._writer_checked = time.monotonic()
            # the tables' real size decides where the program looks, whatever was asked for
            datapath = self._new_datapath(cfg, self._writer.maglev_size or M.MAGLEV_DEFAULT_SIZE)
            datapath.sizes = context.config.bpf.map_size_overrides()
            # a restart with the same build keeps the programs the first device's links run
            first = context.node.devices[:1]
            self._ports_written = None
            self.datapath = datapath.load({
                entry: self._link_dir() / device_pin_name(first[0]) / hook
                for entry, hook in zip(datapath.ENTRIES, datapath.LINK_HOOKS)
            } if first else None)
            self.health = HealthChecks(self._netns, cfg.health_check_address)
            # before any attachment: the programs must know the pods' devices from their first packet
            watcher = DeviceWatcher(self._on_devices)
            self.netdevs = self._netns(watcher.start)
            self._sync_node(context.node)
            self.collector = Collector(
                self.datapath.maps, self._allowed, lambda: set(self._snat_addrs), cfg.gc_interval,
                after_pass=self._check_algorithm,
            )
            self.collector.start()
        except BaseException:
            self._teardown(detach=True)
            raise
        for what in self._not_honoured():
            log.warning("event=nodeport_config_not_honoured %s", what)
        log.info(
            "event=nodeport_started devices=%s mode=%s netns=%s attached=%d",
            ",".join(context.node.devices) or "-", cfg.mode, self._netns_path or "host", len(self._attached),
        )

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        keep = bool(self.cfg and self.cfg.keep_attached_on_stop)
        self._teardown(detach=not keep)
        log.info("event=nodeport_stopped detached=%s", not keep)

    def _teardown(self, *, detach: bool) -> None:
        from kpr.bpf.cleanup import forget_attachment

        errors = []
        if self.netdevs is not None:
            self.netdevs.stop()
            self.netdevs = None
        if self.collector is not None:
            self.collector.stop()
            self.collector = None
        if self.health is not None:
            self.health.close()
            self.health = None
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

    def _detach_unlisted(self, devices: tuple[str, ...]) -> None:
        """Take kpr's programs off devices no longer in node.devices, and forget their records:
        this process's attachments, an earlier run's (recorded in the registry, in this
        agent's namespace) and links pinned for such devices."""
        from kpr.bpf import links
        from kpr.bpf.cleanup import attachments, forget_attachment

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
        names = self._record_names()
        for rec in attachments(self.pin):
            t = rec["target"]
            if (rec["kind"] != self.RECORD_KIND or rec["prog_name"] not in names or t["ifname"] in devices
                    or t.get("netns", "") != self._netns_path):
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

    def _attach_devices(self, devices: tuple[str, ...], facts: dict[str, tuple[int, str | None, str | None]]) -> None:
        """Attach to `devices` (facts: name -> (ifindex, IPv4, IPv6)), detach from those no longer
        listed; fill self._attached, self._device_errors (and self._foreign_ahead)."""
        raise NotImplementedError

    def _new_datapath(self, cfg: Any, maglev_size: int) -> D.Datapath:
        """The plugin's build of the programs (not loaded yet)."""
        raise NotImplementedError

    def _device_details(self, attached: list[_Attached], devices: list[str]) -> dict[str, Any]:
        return {dev: {a.direction: (a.pref or a.how) for a in attached if a.ifname == dev} for dev in devices}

    def _sync_node(self, node: NodeInfo) -> None:
        """Device SNAT addresses, node addresses, announced addresses; attach to node.devices."""
        assert self.datapath is not None and self._netns is not None
        with self._lock:
            facts, missing, every = self._netns(lambda: _device_facts(node.devices))
            if missing:
                log.error("event=nodeport_devices_missing devices=%s", ",".join(missing))
            default4 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 4), None)
            default6 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 6), None)
            default4 = default4 or next((f[1] for f in facts.values() if f[1]), None)
            default6 = default6 or next((f[2] for f in facts.values() if f[2]), None)
            self.datapath.set_devices({idx: (v4, v6) for idx, v4, v6 in facts.values()}, (default4, default6))
            self._node_addrs = set(node.addresses) | set(every)
            self.datapath.set_node_addresses(self._node_addrs)
            snat = {a for _i, v4, v6 in facts.values() for a in (v4, v6) if a} | {a for a in (default4, default6) if a}
            self._snat_addrs = {M.addr_to_bytes(a) for a in snat}
            self._write_vips()
            self._write_ports()
            self._attach_devices(tuple(node.devices), facts)
            if not self._device_errors:  # every entry is this build's now: earlier builds' stages go
                self.datapath.drop_other_generations()

    def _on_devices(self, devices: dict[int, NetDev]) -> None:
        """The watcher's view of the namespace's links, into kpr_np_devkind (watcher thread)."""
        self._devices = devices
        dp = self.datapath
        if dp is None:
            return
        try:
            written, removed = dp.set_device_kinds({i: d.kind for i, d in devices.items()})
        except (OSError, KeyError) as exc:  # stopping under our feet: the next start writes it all
            log.debug("event=nodeport_devkinds_unwritten error=%r", exc)
            return
        if written or removed:
            log.debug("event=nodeport_devkinds devices=%d written=%d removed=%d", len(devices), written, removed)

    def _device_kinds(self) -> dict[str, Any]:
        """For status: how many links of each kind, and the kind of each external device."""
        devs = list(self._devices.values())
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

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        if self.datapath is None:
            return
        self._sync_node(node)

    # ------------------------------------------------------------------ services

    def _write_vips(self) -> None:
        assert self.datapath is not None
        vips = set().union(*(s.vips for s in self._services.values())) - self._node_addrs
        self.datapath.set_vips(vips)

    def _write_ports(self) -> None:
        """The frontend ports the programs' fast exit lets through (kpr_np_ports), when they changed.
        Until the initial sync completes, ports are only added: a restarted agent knows few
        services yet, and the programs running meanwhile must keep balancing the others."""
        assert self.datapath is not None
        ports = {(M.htons(port_n), proto) for _a, port_n, proto in self._fe_index}  # (htons swaps back)
        if ports != self._ports_written:
            self.datapath.set_frontend_ports(ports, keep=not self._synced)
            self._ports_written = ports

    def _write_modes(self) -> None:
        assert self.datapath is not None
        modes: dict[tuple[str, int, int], str] = {}
        for s in self._services.values():
            modes.update(s.modes)
        self.datapath.set_modes(modes)

    def _index(self, key: ServiceKey, old: _SvcState | None, new: _SvcState | None) -> None:
        for index, attr in ((self._fe_index, "frontends"), (self._np_index, "nodeports")):
            for k in getattr(old, attr, {}) if old else {}:
                owners = index.get(k)
                if owners is not None:
                    owners.pop(key, None)
                    if not owners:
                        del index[k]
            for k, bes in (getattr(new, attr) if new else {}).items():
                index.setdefault(k, {})[key] = bes

    def _allowed(self, daddr: bytes, dport: int, proto: int) -> BackendSet | None:
        """Backends flows to this frontend may use now (None: not a frontend this plugin knows)."""
        owners = self._fe_index.get((daddr, dport, proto))
        if owners is None:
            owners = self._np_index.get((dport, proto))  # a NodePort dialled at any node address
        if owners is None:
            return None
        return frozenset().union(*owners.values())

    @hookimpl
    def kpr_service_upsert(self, service: Service) -> None:
        cfg = self.cfg
        assert cfg is not None
        with self._lock:
            new, problem = _service_state(service, cfg.mode)
            if problem:
                if self._mode_problems.get(service.key) != problem:
                    log.warning("event=nodeport_bad_mode_annotation %s", problem)
                self._mode_problems[service.key] = problem
            else:
                self._mode_problems.pop(service.key, None)
            old = self._services.get(service.key)
            if old == new:
                return
            self._services[service.key] = new
            self._index(service.key, old, new)
            if self.datapath is not None:
                self._write_ports()
                if old is None or old.vips != new.vips:
                    self._write_vips()
                if old is None or old.modes != new.modes:
                    self._write_modes()
            self._health(service.key, old, new)
            if old is not None:
                removed = {k: bes - new.frontends.get(k, frozenset()) for k, bes in old.frontends.items()}
                self._purge(service.key, {k: v for k, v in removed.items() if v})

    @hookimpl
    def kpr_service_delete(self, key: ServiceKey) -> None:
        with self._lock:
            self._mode_problems.pop(key, None)
            old = self._services.pop(key, None)
            if old is None:
                return
            self._index(key, old, None)
            if self.datapath is not None:
                self._write_ports()
                if old.vips:
                    self._write_vips()
                if old.modes:
                    self._write_modes()
            self._health(key, old, None)
            self._purge(key, {k: v for k, v in old.frontends.items() if v})

    @hookimpl
    def kpr_sync_complete(self) -> None:
        # Flows pinned to backends that left while no agent ran: the same rule as for a change.
        self._synced = True
        with self._lock:
            if self.datapath is not None:
                self._ports_written = None
                self._write_ports()  # now exactly the services' ports
        if self.collector is not None:
            res = self.collector.run(stale_only=True)
            if res.stale:
                log.info("event=nodeport_stale_flows_cleared at=sync_complete count=%d", res.stale)
        self._check_algorithm()

    def _health(self, key: ServiceKey, old: _SvcState | None, new: _SvcState | None) -> None:
        if self.health is None or self.cfg is None:
            return
        if old is not None and old.hc_port and (new is None or new.hc_port != old.hc_port):
            self.health.remove(old.hc_port)
        if new is not None and new.hc_port and self.cfg.health_check:
            self.health.set(new.hc_port, key, new.local_endpoints)

    def _purge(self, key: ServiceKey, removed: dict[FeKey, BackendSet]) -> None:
        """Clear the non-TCP flows (and their SNAT ports and reverse entries) of backends that left."""
        removed = {k: v for k, v in removed.items() if k[2] != 6}  # TCP flows end on their own (RST)
        if not removed or self.collector is None:
            return
        self._wait_writer(removed)
        fes = set(removed)
        ports = {(k[1], k[2]) for k in removed}
        res = self.collector.run(stale_only=True, only=lambda a, p, pr: (a, p, pr) in fes or (p, pr) in ports)
        self._c.purges += 1
        if res.stale:
            log.info("event=nodeport_stale_flows_cleared service=%s count=%d", key, res.stale)

    def _wait_writer(self, removed: dict[FeKey, BackendSet]) -> None:
        """Wait (bounded) until the shared maps stop offering the removed backends: the writer
        follows the bus on its own worker, and a flow it still sends there would survive the purge."""
        dp = self.datapath
        if dp is None:
            return
        svc, backends = dp.maps["kpr_svc"], dp.maps["kpr_backend"]
        deadline = time.monotonic() + WRITER_WAIT_SECONDS
        while True:
            if not any(self._offered(svc, backends, fe, bes) for fe, bes in removed.items()):
                return
            if time.monotonic() > deadline:
                log.info("event=nodeport_writer_wait_timeout seconds=%.1f", WRITER_WAIT_SECONDS)
                return
            time.sleep(0.02)

    @staticmethod
    def _offered(svc: M.BpfMap, backends: M.BpfMap, fe: FeKey, bes: BackendSet) -> bool:
        addr, port, proto = fe
        raw = svc.lookup(M.SVC_KEY.pack(addr, port, proto, M.SCOPE_EXTERNAL, 0, 0))
        if raw is None:
            return False
        _bid, count, term, _rn, _fl, _aff = M.SVC_VAL.unpack(raw)
        for slot in range(1, count + term + 1):
            sv = svc.lookup(M.SVC_KEY.pack(addr, port, proto, M.SCOPE_EXTERNAL, slot, 0))
            bv = backends.lookup(M.U32.pack(M.SVC_VAL.unpack(sv)[0])) if sv else None
            if bv is not None and (bv[:16], M.BACKEND.unpack(bv)[1]) in bes:
                return True
        return False

    # ------------------------------------------------------------------ the writer's settings

    def _check_algorithm(self) -> None:
        """Which algorithm the writer gives services that do not name one (sampled from kpr_svc)."""
        dp = self.datapath
        if dp is None:
            return
        seen: dict[str, int] = {}
        with self._lock:
            sample = [s for s in self._services.values() if not s.algorithm_annotated and s.frontends][:20]
        for s in sample:
            addr, port, proto = next(iter(s.frontends))
            raw = dp.maps["kpr_svc"].lookup(M.SVC_KEY.pack(addr, port, proto, M.SCOPE_EXTERNAL, 0, 0))
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
        cfg = self.cfg
        assert cfg is not None
        ws = self._writer_settings()
        out: dict[str, dict[str, Any]] = {}
        have_ct = ws.conntrack_size if ws else None
        out["conntrackSize"] = {
            "configured": cfg.conntrack_size,
            "kpr_ct": have_ct,
            "kpr_np_rev": (self.datapath.own_sizes().get(D.REV_MAP) if self.datapath else None),
            "honoured": have_ct == cfg.conntrack_size if have_ct else None,
        }
        have_m = ws.maglev_size if ws else None
        out["maglevTableSize"] = {
            "configured": cfg.maglev_table_size,
            "tables": have_m,
            "honoured": (have_m == cfg.maglev_table_size) if have_m else None,
        }
        seen = self._algo_seen
        effective = None if not seen else (next(iter(seen)) if len(seen) == 1 else "mixed")
        out["algorithm"] = {
            "configured": cfg.algorithm,
            "effective": effective,
            "honoured": (effective == cfg.algorithm) if effective else None,
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

    def _note_error(self, text: str) -> None:
        log.warning("event=nodeport_error error=%s", text)
        self._c.errors = (self._c.errors + [text])[-10:]

    @hookimpl
    def kpr_status(self) -> PluginStatus:
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
        not_honoured = self._not_honoured() if cfg is not None and dp is not None else []
        counters["config_not_honoured"] = float(len(not_honoured))

        wanted = tuple(self.context.node.devices) if self.context else ()
        watching = self.netdevs is not None and self.netdevs.running
        healthy = (dp is not None and bool(wanted) and not self._device_errors and set(wanted) <= set(devices)
                   and watching)
        if dp is None:
            msg = "not started"
        elif not wanted:
            msg = "no devices (node.devices is empty): nothing attached"
        else:
            msg = f"{len(devices)}/{len(wanted)} devices, mode {cfg.mode if cfg else '?'}"
            if self._device_errors:
                msg += "; failed: " + ", ".join(f"{d} ({w})" for d, w in sorted(self._device_errors.items()))
        if dp is not None and not watching:
            msg += "; links no longer followed (device watcher stopped): new pods' devices go through the stack"
        if not_honoured:
            msg += f"; {len(not_honoured)} setting(s) not honoured by the service map writer"
        if self._mode_problems:
            msg += f"; {len(self._mode_problems)} service(s) with an invalid {MODE_ANNOTATION}"
        if self.health is not None and self.health.errors:
            msg += f"; {len(self.health.errors)} health check port(s) not listening"
        details: dict[str, object] = {
            "mode": cfg.mode if cfg else None,
            "devices": self._device_details(attached, devices),
            "deviceErrors": dict(self._device_errors),
            "foreignFiltersFirst": dict(self._foreign_ahead),
            "netns": self._netns_path or "host",
            "writer": self.writer_check() if cfg is not None and dp is not None else {},
            "notHonoured": not_honoured,
            "healthChecks": hc,
            "healthCheckErrors": dict(self.health.errors) if self.health is not None else {},
            "modeAnnotationProblems": sorted(self._mode_problems.values()),
            "mapSizes": dp.own_sizes() if dp is not None else {},
            "deviceKinds": self._device_kinds(),
            "errors": list(self._c.errors),
        }
        return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)
