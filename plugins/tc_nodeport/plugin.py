"""The tc_nodeport plugin: north-south load balancing in tc BPF on the node's external devices.

It loads the NodePort programs (datapath.py: bpf/tc_nodeport.c over core/bpf/lib/nodeport.h)
and attaches them to clsact ingress and egress of every device in node.devices (attach.py).
Loading and attaching is kpr.nodeport.agent.NodePortAgent's, which xdp_nodeport uses too.
The state both share (services, node facts, the NodePort maps, conntrack GC,
healthCheckNodePort) is the core's NodePort facility's (kpr_requires "nodeport"), the service
maps the core's writer's (kpr_requires "servicemaps"): this plugin writes neither. Its status
counts its own programs' packets (kpr_np_stats, kpr_np_fwd).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.model import PluginStatus
from kpr.nodeport.agent import Attached, NodePortAgent
from kpr.nodeport.netns import DeviceFacts

from . import attach as A
from . import datapath as D
from .config import TcNodePortConfig

log = logging.getLogger(__name__)


class TcNodePort(NodePortAgent):
    """Instantiated once per agent by the plugin manager."""

    NAME = "tc_nodeport"

    def __init__(self) -> None:
        super().__init__()
        # Hooks attached as clsact filters instead of tcx links, and why.
        self._fallbacks: dict[tuple[str, str], str] = {}

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return TcNodePortConfig

    def _new_datapath(self, cfg: Any, maglev_size: int) -> D.Datapath:
        assert self.pin is not None
        return D.Datapath(
            self.pin,
            mode=cfg.mode,
            conntrack_size=cfg.conntrack_size,
            icmp_unreachable=cfg.icmp_unreachable,
            redirect_peer=cfg.redirect_peer,
            snat_ports=cfg.snat_ports,
            flow_slots=cfg.flow_slots,
            maglev_size=maglev_size,
            extra_cflags=self.extra_cflags,
        )

    # ------------------------------------------------------------------ devices

    def _detach_one(self, ifname: str, direction: str) -> None:
        from pyroute2 import IPRoute

        link_dir = self._link_dir()

        def run() -> int:
            with IPRoute() as ipr:
                return A.remove(ipr, link_dir, ifname, direction, D.INGRESS if direction == "ingress" else D.EGRESS)

        assert self._netns is not None
        self._netns(run)

    def _attach_devices(self, devices: tuple[str, ...], facts: DeviceFacts) -> None:
        from pyroute2 import IPRoute

        from kpr.bpf.cleanup import record_attachment

        cfg, dp, pin = self.cfg, self.datapath, self.pin
        assert cfg is not None and dp is not None and pin is not None and self._netns is not None
        self._detach_unlisted(devices)
        progs = {"ingress": D.INGRESS, "egress": D.EGRESS}
        ids = {d: dp.prog_id(p) for d, p in progs.items()}
        link_dir = self._link_dir()

        def run() -> tuple[dict[tuple[str, str], A.Placement], dict[str, str], dict[str, list[str]]]:
            done, failed, ahead = {}, {}, {}
            with IPRoute() as ipr:
                for dev in devices:
                    if dev not in facts:
                        failed[dev] = "no such device in the agent's network namespace"
                        continue
                    try:
                        for direction, prog in progs.items():
                            done[(dev, direction)] = A.place(ipr, link_dir, dev, direction, dp.fd(prog), prog,
                                                             cfg.tc_priority)
                        ahead[dev] = sorted({n for d in progs for n in (
                            A.tcx_ahead(ipr, dev, d) if done[(dev, d)].how == "tcx" else A.foreign_ahead(ipr, dev, d))})
                    except OSError as exc:
                        failed[dev] = str(exc)
            return done, failed, ahead

        done, failed, ahead = self._netns(run)
        for (dev, direction), pl in done.items():
            old = self._attached.get((dev, direction))
            if old is not None and old.link_fd >= 0:
                os.close(old.link_fd)
            rid = record_attachment(
                pin,
                "tc",
                {"ifname": dev, "ifindex": pl.ifindex, "direction": direction, "netns": self._netns_path},
                progs[direction],
                prog_id=ids[direction],
            )
            self._attached[(dev, direction)] = Attached(
                dev, pl.ifindex, direction, progs[direction], pl.pref, rid,
                how=pl.how, link_pin=pl.link_pin, link_fd=pl.link_fd, action=pl.action,
            )
            if pl.fallback:
                self._fallbacks[(dev, direction)] = pl.fallback
                log.info("event=tc_clsact_fallback dev=%s direction=%s reason=%r", dev, direction, pl.fallback)
            else:
                self._fallbacks.pop((dev, direction), None)
        for dev, why in failed.items():
            self._c.attach_errors += 1
            self._note_error(f"{dev}: {why}")
            log.error("event=nodeport_attach_failed dev=%s error=%s", dev, why)
        self._device_errors = failed
        self._foreign_ahead = {d: a for d, a in ahead.items() if a}
        for dev, names in self._foreign_ahead.items():
            log.warning("event=nodeport_foreign_filters_first dev=%s filters=%s", dev, ",".join(names))

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        st = super().kpr_status()
        details = dict(st.details)
        details["linksFallback"] = {f"{d} {r}": why for (d, r), why in sorted(self._fallbacks.items())}
        return dataclasses.replace(st, details=details)
