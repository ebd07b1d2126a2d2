"""The host_routing plugin: eBPF host routing between the external devices and local pods.

It loads the programs (datapath.py over core/bpf/lib/host_routing.h), learns the local pods
and the devices they sit behind (discovery.py: the host's routes and links through
kpr.netdevs, and the pod addresses the source delivers) and keeps the programs attached
where they belong: ingress of every external device, ingress and egress of every pod's
host-side device. A watcher thread (watcher.py) re-syncs on every link or route change.

Attachments are tcx links pinned at <bpf.pinPath>/links/host_routing/<device>/<direction>
(kpr.bpf.links; a dot in a device's name escaped, as bpffs refuses it: flannel.1, eth0.100):
a restarted agent adopts them and switches them to its new programs atomically; links of
devices that went away are swept; `kpr cleanup` removes them all.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.context import PluginContext
from kpr.model import NodeInfo, PluginStatus

from . import datapath as D
from .config import HostRoutingConfig
from .discovery import Plan, Route, plan
from .watcher import Watcher

log = logging.getLogger(__name__)

NAME = "host_routing"


def probe_helpers(peer: bool, neigh: bool) -> tuple[D.Helpers, dict[str, bool]]:
    """The helpers to build with: config, then what this kernel offers."""
    from kpr.bpf.probes import have_helpers

    found = have_helpers(["redirect_peer", "redirect_neigh"])
    return D.Helpers(peer=peer and found["redirect_peer"], neigh=neigh and found["redirect_neigh"]), found


def read_routes(ipr: Any) -> list[Route]:
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=254):
            oif = msg.get_attr("RTA_OIF")
            dst = msg.get_attr("RTA_DST")
            if oif is None or dst is None or msg.get("type") != 1:  # unicast routes only
                continue
            out.append(Route(str(dst), int(msg.get("dst_len")), int(oif)))
    return out


def route_oif(ipr: Any, addr: str) -> int | None:
    try:
        msgs = ipr.route("get", dst=addr)
    except Exception as exc:  # NetlinkError: unreachable
        log.debug("event=host_routing_route_get_failed addr=%s error=%r", addr, exc)
        return None
    for msg in msgs:
        if msg.get("type") != 1:  # local, unreachable, ...
            return None
        oif = msg.get_attr("RTA_OIF")
        return int(oif) if oif is not None else None
    return None


class HostRouting:
    """Instantiated once per agent by the plugin manager."""

    def __init__(self) -> None:
        self.cfg: HostRoutingConfig | None = None
        self.context: PluginContext | None = None
        self.pin: Path | None = None
        self.datapath: D.Datapath | None = None
        self.helpers: D.Helpers | None = None
        self.probed: dict[str, bool] = {}
        self.watcher: Watcher | None = None
        self.nexthops: Any = None  # kpr.nexthops.Subscription: invalidates kpr_hr_out
        self.plan = Plan()
        self.attached: dict[tuple[str, str], str] = {}  # (ifname, direction) -> program
        self.errors: dict[str, str] = {}
        self.source_pods: frozenset[str] = frozenset()
        self.syncs = 0
        self._lock = threading.RLock()
        # More compiler flags (tests build changed programs, as an upgrade brings).
        self.extra_cflags: list[str] = []

    # ------------------------------------------------------------------ configuration

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return HostRoutingConfig

    @hookimpl
    def kpr_requires(self) -> list[str]:
        # the per-packet service path reads the shared service maps and conntrack; kpr_hr_out is
        # told of route and neighbour changes by the namespace's shared next-hop watcher
        return ["servicemaps", "nexthops"]

    @hookimpl
    def kpr_configure(self, config: HostRoutingConfig, context: PluginContext) -> None:
        self.cfg = config
        self.context = context
        self.pin = Path(context.config.bpf.pin_path)
        if not self._external():
            log.warning("event=host_routing_no_devices effect=pods_only hint='set node.devices or plugins.host_routing.devices'")

    def _external(self) -> tuple[str, ...]:
        assert self.cfg is not None and self.context is not None
        return tuple(self.cfg.devices or self.context.node.devices)

    def _link_dir(self) -> Path:
        from kpr.bpf import links

        assert self.pin is not None
        return self.pin / links.LINKS_DIR / NAME

    # ------------------------------------------------------------------ start / stop

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        from kpr.bpf import fs

        cfg, pin = self.cfg, self.pin
        assert cfg is not None and pin is not None, "kpr_configure first"
        real = pin.resolve()
        if not any(m == real or m in real.parents for m in fs.find_mounts("bpf")):
            raise OSError(f"bpf.pinPath {pin} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")
        self.helpers, self.probed = probe_helpers(cfg.redirect_peer, cfg.redirect_neigh)
        for helper, want, have in (("bpf_redirect_peer", cfg.redirect_peer, self.probed["redirect_peer"]),
                                   ("bpf_redirect_neigh", cfg.redirect_neigh, self.probed["redirect_neigh"])):
            if want and not have:
                log.warning("event=host_routing_helper_missing helper=%s effect=fallback", helper)
        dp = D.Datapath(pin, self.helpers, cluster_ip=cfg.cluster_ip, max_pods=cfg.max_pods,
                        extra_cflags=self.extra_cflags)
        dp.sizes = context.config.bpf.map_size_overrides()
        self.datapath = dp.load()
        try:
            self._sync("start")  # in the agent's namespace: the caller's
            self.watcher = Watcher(self._sync, cfg.resync_interval).start()
            self._watch_next_hops()
        except BaseException:
            self._teardown(detach=True)
            raise
        log.info("event=host_routing_started to_pod=%s to_netdev=%s cluster_ip=%s external=%s pods=%d",
                 self.helpers.to_pod, self.helpers.to_netdev, cfg.cluster_ip, ",".join(self.plan.external) or "-",
                 len(self.plan.pods))

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        keep = bool(self.cfg and self.cfg.keep_attached_on_stop)
        self._teardown(detach=not keep)
        log.info("event=host_routing_stopped detached=%s", not keep)

    def _teardown(self, *, detach: bool) -> None:
        from kpr.bpf import links

        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.nexthops is not None:
            self.nexthops.close()
            self.nexthops = None
        with self._lock:
            if detach and self.pin is not None:
                for line in links.sweep(self._link_dir(), lambda _p, _li: False):
                    log.info("event=host_routing_detached what=%r", line)
                self.attached.clear()
            if self.datapath is not None:
                # programs that stay attached without an agent must not trust remembered routes
                self.datapath.disarm_out()
                self.datapath.close()
                self.datapath = None

    # ------------------------------------------------------------------ events

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        if self.watcher is not None:
            self.watcher.kick()  # devices may have changed; the watcher's thread is in the agent's namespace

    @hookimpl
    def kpr_pods_changed(self, pods: Mapping[str, tuple[str, ...]]) -> None:
        self.set_source_pods(a for ips in pods.values() for a in ips)

    def set_source_pods(self, addresses: Iterable[str]) -> None:
        """Pod addresses of this node from the source (Pod objects); a sync follows."""
        addrs = frozenset(str(ipaddress.ip_address(a)) for a in addresses)
        with self._lock:
            if addrs == self.source_pods:
                return
            self.source_pods = addrs
        if self.watcher is not None:
            self.watcher.kick()

    # ------------------------------------------------------------------ sync

    def _sync(self, why: str) -> None:
        """Links, routes and source pods -> maps and attachments. Runs in the agent's namespace."""
        from pyroute2 import IPRoute

        from kpr import netdevs

        dp, cfg = self.datapath, self.cfg
        assert dp is not None and cfg is not None
        with self._lock:
            devs = netdevs.classify()
            with IPRoute() as ipr:
                routes = read_routes(ipr)
                src = {a: route_oif(ipr, a) for a in self.source_pods}
            p = plan(devs, routes, src, self._external())
            # the pinned kpr_hr_pods' size: an earlier run's map, adopted, may hold fewer than maxPods
            most = min(cfg.max_pods, dp.pods_capacity)
            if len(p.pods) > most:
                log.error("event=host_routing_too_many_pods pods=%d max=%d effect=rest_to_stack", len(p.pods), most)
                p.pods = dict(sorted(p.pods.items())[:most])
            # devices first: a pod entry must never point at a device the program does not know
            dp.set_devices(p.devices)
            self._attach(p)
            try:
                up, gone = dp.set_pods(p.pods)
            finally:
                # whatever changed (an MTU, a device, a route), the programs ask the FIB afresh;
                # the generation first, right after kpr_hr_pods (a remembered route out of the
                # node is used without a kpr_hr_pods lookup in builds without per-packet
                # services), and also when the write failed half way: what it did change must
                # not be served from entries remembered before it
                dp.bump_out_generation()
            dp.flush_next_hops()
            if p.missing and p.missing != self.plan.missing:
                log.error("event=host_routing_devices_missing devices=%s", ",".join(p.missing))
            if up or gone or why == "start":
                log.info("event=host_routing_synced reason=%s pods=%d added_or_changed=%d removed=%d pod_devices=%d",
                         why, len(p.pods), up, gone, len(p.pod_devices))
            self.plan = p
            self.syncs += 1

    def _watch_next_hops(self) -> None:
        """Routes of pods' packets leaving the node are remembered (kpr_hr_out) until a route or
        a neighbour changes: the namespace's shared kpr.nexthops watcher tells (the agent's
        namespace: the caller's), the one the NodePort facility subscribes to as well."""
        from kpr import nexthops

        dp = self.datapath
        assert dp is not None
        if dp.out_generation_armable():
            self.nexthops = nexthops.subscribe(self._bump_out, NAME)

    def _bump_out(self) -> None:
        dp = self.datapath
        if dp is not None:
            dp.bump_out_generation()

    def _attach(self, p: Plan) -> None:
        from kpr.bpf import links

        dp, cfg = self.datapath, self.cfg
        assert dp is not None and cfg is not None
        want: dict[tuple[str, str], tuple[int, str]] = {}
        for name, idx in p.external.items():
            want[(name, "ingress")] = (idx, D.FROM_NETDEV)
        for name, idx in p.pod_devices.items():
            want[(name, "ingress")] = (idx, D.FROM_POD)
            if cfg.cluster_ip:
                want[(name, "egress")] = (idx, D.TO_POD)
        root = self._link_dir()
        errors: dict[str, str] = {}
        attached: dict[tuple[str, str], str] = {}
        for (name, direction), (idx, prog) in sorted(want.items()):
            try:
                fd, action, _li = links.ensure(root / links.device_pin_name(name) / direction, dp.fd(prog),
                                               links.Hook.tcx(idx, direction))
                os.close(fd)
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # gone since the dump; the next event syncs again
                    continue
                errors[f"{name} {direction}"] = str(exc)
                log.error("event=host_routing_attach_failed dev=%s direction=%s error=%s", name, direction, exc)
                continue
            attached[(name, direction)] = prog
            if action != "adopted" or (name, direction) not in self.attached:
                log.info("event=host_routing_attached dev=%s direction=%s prog=%s action=%s", name, direction, prog, action)
        keep = {(links.device_pin_name(n), d) for n, d in attached}  # pin paths: bpffs refuses dots (flannel.1)
        for line in links.sweep(root, lambda pin, li: (pin.parent.name, pin.name) in keep and not li.defunct):
            log.info("event=host_routing_link_swept what=%r", line)
        self.attached = attached
        self.errors = errors

    # ------------------------------------------------------------------ status

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        dp, h, cfg = self.datapath, self.helpers, self.cfg
        try:
            stats = dp.stats() if dp is not None else {}
        except Exception as exc:  # stopping under our feet; status must not fail for it
            log.debug("event=host_routing_stats_unreadable error=%r", exc)
            stats = {}
        p = self.plan
        counters: dict[str, float] = {k: float(v) for k, v in stats.items()}
        counters["passed_to_stack_total"] = float(sum(stats.get(k, 0) for k in D.PASS_STATS))
        counters["pods"] = float(len(p.pods))
        counters["pod_devices"] = float(len(p.pod_devices))
        counters["syncs"] = float(self.syncs)
        counters["attach_errors"] = float(len(self.errors))
        w = self.watcher
        counters["sync_errors"] = float(w.errors if w else 0)
        nh = self.nexthops
        counters["out_route_invalidations"] = float(nh.invalidations if nh else 0)
        healthy = dp is not None and not self.errors and not p.missing
        if dp is None or h is None:
            msg = "not started"
        else:
            msg = (f"{len(p.pods)} pods on {len(p.pod_devices)} devices, {len(p.external)} external; "
                   f"to pods: {h.to_pod}, out: {h.to_netdev}")
            if p.missing:
                msg += "; missing devices: " + ", ".join(p.missing)
            if self.errors:
                msg += f"; {len(self.errors)} attach error(s)"
        details: dict[str, object] = {
            "helpers": {
                "toPod": h.to_pod if h else None,
                "toNetdev": h.to_netdev if h else None,
                "kernelHas": {f"bpf_{k}": v for k, v in self.probed.items()},
                "configured": {"redirectPeer": cfg.redirect_peer, "redirectNeigh": cfg.redirect_neigh} if cfg else {},
            },
            "clusterIP": bool(cfg and cfg.cluster_ip),
            "external": dict(p.external),
            "missingDevices": list(p.missing),
            "podDevices": dict(p.pod_devices),
            "pods": {a: {"ifindex": i, "learnedFrom": p.origin.get(a, "?")} for a, i in sorted(p.pods.items())},
            "sourcePodsNotLocal": list(p.not_local),
            "attached": {f"{n} {d}": prog for (n, d), prog in sorted(self.attached.items())},
            "errors": dict(self.errors),
        }
        return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)
