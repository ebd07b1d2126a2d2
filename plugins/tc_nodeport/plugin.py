"""The tc_nodeport plugin: north-south load balancing in tc BPF on the node's external devices.

It loads the NodePort programs (datapath.py: bpf/tc_nodeport.c over core/bpf/lib/nodeport.h)
and attaches them to clsact ingress and egress of every device in node.devices (attach.py).
Everything else (services, node facts, conntrack GC, healthCheckNodePort, status) is the
shared kpr.nodeport.agent.NodePortAgent, which the xdp_nodeport plugin uses too.

The shared service maps are the core's ServiceMapWriter's (kpr_requires "servicemaps"): it
follows the bus on its own worker and this plugin never writes them.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.nodeport.agent import (  # noqa: F401 (re-exported: tests and tools name them here)
    ALGORITHM_ANNOTATION,
    MODE_ANNOTATION,
    NodePortAgent,
    _AgentNetns,
    _Attached,
    _device_facts,
    _service_state,
    _SvcState,
)

from . import attach as A
from . import datapath as D
from .config import TcNodePortConfig

log = logging.getLogger(__name__)


class TcNodePort(NodePortAgent):
    """Instantiated once per agent by the plugin manager."""

    NAME = "tc_nodeport"

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
            maglev_size=maglev_size,
        )

    # ------------------------------------------------------------------ devices

    def _detach_one(self, ifname: str, direction: str) -> None:
        from pyroute2 import IPRoute

        def run() -> int:
            with IPRoute() as ipr:
                return A.detach(ipr, ifname, direction, (D.INGRESS if direction == "ingress" else D.EGRESS,))

        assert self._netns is not None
        self._netns(run)

    def _attach_devices(self, devices: tuple[str, ...], facts: dict[str, tuple[int, str | None, str | None]]) -> None:
        from pyroute2 import IPRoute

        from kpr.bpf.cleanup import record_attachment

        cfg, dp, pin = self.cfg, self.datapath, self.pin
        assert cfg is not None and dp is not None and pin is not None and self._netns is not None
        self._detach_unlisted(devices)
        progs = {"ingress": D.INGRESS, "egress": D.EGRESS}
        ids = {d: dp.prog_id(p) for d, p in progs.items()}

        def run() -> tuple[dict[tuple[str, str], A.Filter], dict[str, str], dict[str, list[str]]]:
            done, failed, ahead = {}, {}, {}
            with IPRoute() as ipr:
                for dev in devices:
                    if dev not in facts:
                        failed[dev] = "no such device in the agent's network namespace"
                        continue
                    try:
                        for direction, prog in progs.items():
                            done[(dev, direction)] = A.attach(ipr, dev, direction, dp.fd(prog), prog, cfg.tc_priority)
                        ahead[dev] = sorted(set(A.foreign_ahead(ipr, dev, "ingress") + A.foreign_ahead(ipr, dev, "egress")))
                    except OSError as exc:
                        failed[dev] = str(exc)
            return done, failed, ahead

        done, failed, ahead = self._netns(run)
        for (dev, direction), f in done.items():
            rid = record_attachment(
                pin,
                "tc",
                {"ifname": dev, "ifindex": f.ifindex, "direction": direction, "netns": self._netns_path},
                progs[direction],
                prog_id=ids[direction],
            )
            self._attached[(dev, direction)] = _Attached(dev, f.ifindex, direction, progs[direction], f.pref, rid)
        for dev, why in failed.items():
            self._c.attach_errors += 1
            self._note_error(f"{dev}: {why}")
            log.error("event=nodeport_attach_failed dev=%s error=%s", dev, why)
        self._device_errors = failed
        self._foreign_ahead = {d: a for d, a in ahead.items() if a}
        for dev, names in self._foreign_ahead.items():
            log.warning("event=nodeport_foreign_filters_first dev=%s filters=%s", dev, ",".join(names))
