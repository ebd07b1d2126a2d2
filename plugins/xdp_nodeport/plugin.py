"""The xdp_nodeport plugin: NodePort/LoadBalancer/ExternalIP load balancing in XDP.

The same C code base as tc_nodeport (core/bpf/lib/nodeport.h), compiled for XDP
(bpf/xdp_nodeport.c over ctx/xdp.h), attached to every device in node.devices: native
(driver) mode, generic as a fallback (xdpMode: native | generic | auto). Services, node facts,
conntrack GC, healthCheckNodePort and status are the shared kpr.nodeport.agent.NodePortAgent.

What XDP does here, and what it does not:
  - new flows to a remote backend: DNAT + SNAT to the node's address, sent out by the FIB
    result (bpf_redirect; to the kernel when the neighbour is not known yet); replies to
    source-NATed flows are translated back and sent to the client the same way;
  - ICMP errors about source-NATed flows are translated; frontends without a backend answer
    ICMP port unreachable (XDP_TX);
  - mode is snat only: DSR needs bpf_skb_adjust_room, which XDP lacks (the config refuses
    dsr/hybrid; services annotated service.kpr.io/lb-mode=dsr are source-NATed);
  - XDP has no egress hook: replies of backends on this node are not translated back, so a
    frontend whose backend is local works only with tc_nodeport also enabled (its egress
    program translates them). Delivery into pods is a bpf_redirect to the pod's host device
    (no bpf_redirect_peer in XDP).
  - XDP_TX / redirect out of a veth reaches the peer only if the peer has an XDP program, and
    a veth hands XDP packets whose checksum the sender left to offload (CHECKSUM_PARTIAL):
    redirected as frames, they arrive with a bad checksum. Packets from a real wire carry full
    checksums; the tests turn transmit checksum offload off on their senders.
  - enabled together with tc_nodeport on one node, both serve healthCheckNodePort: set
    healthCheck: false on one of them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import subprocess
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.model import PluginStatus
from kpr.nodeport.agent import NodePortAgent, _Attached

from . import datapath as D
from .config import XdpNodePortConfig

log = logging.getLogger(__name__)

# bcc/kernel XDP attach flags.
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# `ip -d link` mode numbers and the words `ip link set ... <word> off` takes.
IP_MODES = {1: "native", 2: "generic", 3: "offload"}
IP_WORDS = {"native": "xdpdrv", "generic": "xdpgeneric", "offload": "xdpoffload"}
KPR_PREFIX = "kpr_"


class XdpAttachError(OSError):
    """A device could not be given kpr's XDP program; the message names it."""


def xdp_programs(ifname: str) -> list[tuple[str, int, str]]:
    """(mode, prog id, prog name) of the XDP programs on a device, in the calling thread's namespace."""
    res = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", ifname], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise XdpAttachError(errno.ENODEV, f"no device {ifname!r} in this network namespace: {res.stderr.strip()}")
    links = json.loads(res.stdout or "[]")
    xdp = (links[0] if links else {}).get("xdp") or {}
    out = []
    for att in xdp.get("attached") or ([xdp] if xdp.get("prog") else []):
        prog = att.get("prog") or {}
        out.append((IP_MODES.get(att.get("mode"), "?"), int(prog.get("id", 0)), str(prog.get("name", ""))))
    return out


def _set_off(ifname: str, mode: str) -> None:
    res = subprocess.run(["ip", "link", "set", "dev", ifname, IP_WORDS.get(mode, "xdp"), "off"],
                         capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise XdpAttachError(errno.EIO, f"detaching XDP ({mode}) from {ifname}: {res.stderr.strip()}")


def attach(ifname: str, fn: Any, want: str) -> str:
    """Attach bcc function `fn` to `ifname` (want: native | generic | auto), replacing kpr's own
    program, never another owner's. Returns the mode it got."""
    from bcc import BPF

    present = xdp_programs(ifname)
    foreign = [n or f"id {i}" for _m, i, n in present if not n.startswith(KPR_PREFIX)]
    if foreign:
        raise XdpAttachError(errno.EBUSY, f"{ifname} has another owner's XDP program ({', '.join(foreign)}): not replaced")
    tries = ["native", "generic"] if want == "auto" else [want]
    errors = []
    for mode in tries:
        # one device holds native or generic XDP, not both: ours in the other mode goes first
        for m, _i, _n in xdp_programs(ifname):
            if m != mode:
                _set_off(ifname, m)
        try:
            BPF.attach_xdp(ifname.encode(), fn, FLAGS[mode])  # bcc wants bytes
        except Exception as exc:
            errors.append(f"{mode}: {exc}")
            continue
        now = xdp_programs(ifname)
        if not any(m == mode and n == fn.name.decode()[:15] for m, _i, n in now):
            errors.append(f"{mode}: not attached after attaching it ({now})")
            continue
        log.info("event=xdp_attached dev=%s prog=%s mode=%s", ifname, fn.name.decode(), mode)
        return mode
    raise XdpAttachError(errno.EOPNOTSUPP, f"attaching XDP to {ifname}: " + "; ".join(errors))


def detach(ifname: str) -> int:
    """Remove kpr's XDP program (every mode) from a device; another owner's is left alone."""
    try:
        present = xdp_programs(ifname)
    except XdpAttachError:
        return 0  # the device is gone, and its program with it
    n = 0
    for mode, _i, name in present:
        if name.startswith(KPR_PREFIX):
            _set_off(ifname, mode)
            n += 1
    if n:
        log.info("event=xdp_detached dev=%s count=%d", ifname, n)
    return n


class XdpNodePort(NodePortAgent):
    """Instantiated once per agent by the plugin manager."""

    NAME = "xdp_nodeport"

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return XdpNodePortConfig

    def _new_datapath(self, cfg: Any, maglev_size: int) -> D.Datapath:
        assert self.pin is not None
        return D.Datapath(
            self.pin,
            mode="snat",
            conntrack_size=cfg.conntrack_size,
            icmp_unreachable=cfg.icmp_unreachable,
            snat_ports=cfg.snat_ports,
            maglev_size=maglev_size,
        )

    # ------------------------------------------------------------------ devices

    def _detach_one(self, ifname: str, direction: str) -> None:
        assert self._netns is not None
        self._netns(lambda: detach(ifname))

    def _attach_devices(self, devices: tuple[str, ...], facts: dict[str, tuple[int, str | None, str | None]]) -> None:
        from kpr.bpf.cleanup import forget_attachment, record_attachment

        cfg, dp, pin = self.cfg, self.datapath, self.pin
        assert cfg is not None and dp is not None and pin is not None and self._netns is not None
        self._detach_unlisted(devices)
        fn = dp.progs[D.INGRESS]
        prog_id = dp.prog_id(D.INGRESS)

        def run() -> tuple[dict[str, str], dict[str, str]]:
            done, failed = {}, {}
            for dev in devices:
                if dev not in facts:
                    failed[dev] = "no such device in the agent's network namespace"
                    continue
                try:
                    done[dev] = attach(dev, fn, cfg.xdp_mode)
                except OSError as exc:
                    failed[dev] = str(exc)
            return done, failed

        done, failed = self._netns(run)
        for dev, mode in done.items():
            old = self._attached.get((dev, "xdp"))
            if old is not None and old.record_id:
                forget_attachment(pin, old.record_id)
            ifindex = facts[dev][0]
            rid = record_attachment(pin, "xdp", {"ifname": dev, "ifindex": ifindex, "netns": self._netns_path},
                                    D.INGRESS, prog_id=prog_id)
            self._attached[(dev, "xdp")] = _Attached(dev, ifindex, "xdp", D.INGRESS, 0, rid)
            self._modes[dev] = mode
            if cfg.xdp_mode == "auto" and mode == "generic":
                log.warning("event=xdp_generic_fallback dev=%s hint='the driver has no native XDP'", dev)
        for dev, why in failed.items():
            self._c.attach_errors += 1
            self._note_error(f"{dev}: {why}")
            log.error("event=nodeport_attach_failed dev=%s error=%s", dev, why)
        self._device_errors = failed

    def _device_details(self, attached: list[_Attached], devices: list[str]) -> dict[str, Any]:
        return {dev: {"xdp": self._modes.get(dev, "?")} for dev in devices}

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        st = super().kpr_status()
        generic = sorted(d for d, m in self._modes.items() if m == "generic" and (d, "xdp") in self._attached)
        if generic:
            note = f"; generic XDP on {', '.join(generic)}"
            if self.cfg is not None and self.cfg.xdp_mode == "auto":
                note += " (native XDP failed: no driver support)"
            st = dataclasses.replace(st, message=st.message + note)
        return st

    @property
    def _modes(self) -> dict[str, str]:
        m = self.__dict__.get("_xdp_modes")
        if m is None:
            m = self.__dict__["_xdp_modes"] = {}
        return m
