"""The xdp_nodeport plugin: NodePort/LoadBalancer/ExternalIP load balancing in XDP.

The same C code base as tc_nodeport (core/bpf/lib/nodeport.h), compiled for XDP
(bpf/xdp_nodeport.c over ctx/xdp.h), attached to every device in node.devices: native
(driver) mode, generic as a fallback (xdpMode: native | generic | auto). Loading and attaching
is kpr.nodeport.agent.NodePortAgent's; services, node facts, the NodePort maps, conntrack GC
and healthCheckNodePort are the core's NodePort facility's (kpr_requires "nodeport"), one per
node whichever NodePort plugins run. Its status counts its own program's packets
(kpr_np_xstats, kpr_np_xfwd), not tc_nodeport's.

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
    program translates them; without it, status and the log say so). XDP_REDIRECT goes only to
    the external devices the program runs on; anything routed elsewhere (a pod's veth, whose
    peer runs no XDP; a bridge; an overlay) goes to the kernel's stack, counted by reason
    (kpr_np_fwd): requests to local pods translated, source-NATed flows untranslated, for
    tc_nodeport behind XDP to carry on.
  - XDP_TX / redirect out of a veth reaches the peer only if the peer has an XDP program, and
    a veth hands XDP packets whose checksum the sender left to offload (CHECKSUM_PARTIAL):
    redirected as frames, they arrive with a bad checksum. Packets from a real wire carry full
    checksums; the tests turn transmit checksum offload off on their senders.
  - enabled together with tc_nodeport on one node (the way to serve local backends): XDP takes
    every packet first and serves what it can, tc_nodeport's programs behind it deliver to
    local backends and translate their replies; one facility writes the maps both read, with
    each service's own mode (XDP source-NATs whatever the mode), one collector sweeps
    conntrack, one listener serves each healthCheckNodePort.

Attachment: an XDP BPF link pinned at <bpf.pinPath>/links/xdp_nodeport/<device>/xdp
(kpr.bpf.links) keeps the program on the device while no agent runs; the next agent adopts
it and switches it to its new program (BPF_LINK_UPDATE), so there is never a gap nor a second
copy. An XDP link cannot take the place of a program attached the old way, so moving from an
earlier version's attachment detaches that first (a gap of a few milliseconds, once). A
changed xdpMode (native/generic) re-creates the link (a gap, likewise). Without XDP links
(kernel < 5.9, KPR_BPF_LINKS=off or =xdp) the program is attached through netlink as before,
which also outlives the process and is replaced in place by the next agent.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.bpf import links
from kpr.bpf import maps as M
from kpr.context import PluginContext
from kpr.model import PluginStatus
from kpr.nodeport.agent import Attached, NodePortAgent
from kpr.nodeport.datapath import TC_EGRESS
from kpr.nodeport.netns import DeviceFacts

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


def _kpr_progs(present: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return [p for p in present if p[2].startswith(KPR_PREFIX)]


def _attach_link(ifname: str, fn: Any, want: str, pin: Path) -> tuple[str, int, str] | None:
    """Through a pinned XDP link: (mode, link fd, action), or None when the kernel has no XDP
    links (the caller attaches the old way)."""
    idx = socket.if_nametoindex(ifname)
    prog_id = M.prog_info(fn.fd).id
    held = links.links_of_progs()
    # kpr's program attached without a link (an earlier version, the fallback) blocks a link
    for m, pid, _n in _kpr_progs(xdp_programs(ifname)):
        if not any(li.kind == "xdp" for li in held.get(pid, [])):
            _set_off(ifname, m)
            log.info("event=xdp_old_attachment_removed dev=%s mode=%s prog_id=%d", ifname, m, pid)
    if pin.exists():
        now = xdp_programs(ifname)
        mode_now = next((m for m, _i, n in now if n.startswith(KPR_PREFIX)), None)
        if want != "auto" and mode_now is not None and mode_now != want:
            links.release(pin)  # another mode asked for: a new link
            log.info("event=xdp_mode_changed dev=%s old=%s new=%s", ifname, mode_now, want)
    tries = ["native", "generic"] if want == "auto" else [want]
    errors, unsupported = [], 0
    for mode in tries:
        try:
            lfd, action, _li = links.ensure(pin, fn.fd, links.Hook.xdp(idx, FLAGS[mode]))
        except links.LinkUnsupported as exc:
            unsupported += 1
            errors.append(f"{mode}: {exc}")
            continue
        except OSError as exc:
            errors.append(f"{mode}: {exc}")
            continue
        got = next((m for m, i, _n in xdp_programs(ifname) if i == prog_id), None)
        if got is None:
            os.close(lfd)
            errors.append(f"{mode}: not attached after attaching it")
            continue
        log.info("event=xdp_attached dev=%s prog=%s mode=%s link=%s", ifname, fn.name.decode(), got, action)
        return got, lfd, action
    if unsupported == len(tries):
        return None
    raise XdpAttachError(errno.EOPNOTSUPP, f"attaching XDP to {ifname}: " + "; ".join(errors))


def attach(ifname: str, fn: Any, want: str, link_dir: Path | None = None) -> tuple[str, int, str]:
    """Attach bcc function `fn` to `ifname` (want: native | generic | auto), replacing kpr's own
    program, never another owner's. Returns (mode, link fd or -1, action)."""
    from bcc import BPF

    present = xdp_programs(ifname)
    foreign = [n or f"id {i}" for _m, i, n in present if not n.startswith(KPR_PREFIX)]
    if foreign:
        raise XdpAttachError(errno.EBUSY, f"{ifname} has another owner's XDP program ({', '.join(foreign)}): not replaced")
    if link_dir is not None:
        pin = link_dir / links.device_pin_name(ifname) / "xdp"
        if pin.exists() or links.enabled("xdp"):
            got = _attach_link(ifname, fn, want, pin)
            if got is not None:
                return got
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
        log.info("event=xdp_attached dev=%s prog=%s mode=%s link=none", ifname, fn.name.decode(), mode)
        return mode, -1, "attached"
    raise XdpAttachError(errno.EOPNOTSUPP, f"attaching XDP to {ifname}: " + "; ".join(errors))


def detach(ifname: str, link_dir: Path | None = None) -> int:
    """Remove kpr's XDP program (every mode, link or not) from a device; another owner's is left alone."""
    n = 0
    if link_dir is not None and links.release(link_dir / links.device_pin_name(ifname) / "xdp"):
        n += 1
    try:
        present = xdp_programs(ifname)
    except XdpAttachError:
        return n  # the device is gone, and its program with it
    held = None
    for mode, pid, name in _kpr_progs(present):
        held = links.links_of_progs() if held is None else held
        via = [li for li in held.get(pid, []) if li.kind == "xdp"]
        if via:
            for li in via:
                links.detach_link_id(li.id)
        else:
            _set_off(ifname, mode)
        n += 1
    if n:
        log.info("event=xdp_detached dev=%s count=%d", ifname, n)
    return n


def local_note(new_local: int | None, base: int,
               unserved: Callable[[], list[str] | None]) -> tuple[int, list[str] | None, int]:
    """(fresh flows to local backends, devices leaving their replies untranslated or None when
    unknown, the new baseline) from one reading of new_local (None: not counted) and the baseline
    before it. `unserved` reads the attachment registry (None: unreadable), asked only for fresh flows."""
    if new_local is None:
        return 0, [], base
    if new_local < base:  # the stats map was recreated under us
        base = new_local
    fresh = new_local - base
    devs = unserved() if fresh > 0 else []
    if devs is None:  # the registry unreadable for now: the flows stay counted, nothing said of them yet
        return fresh, None, base
    # every device served (or nothing new): the flows so far had their replies translated
    return fresh, devs, base if devs else new_local


class XdpNodePort(NodePortAgent):
    """Instantiated once per agent by the plugin manager."""

    NAME = "xdp_nodeport"

    def __init__(self) -> None:
        super().__init__()
        self._modes: dict[str, str] = {}  # device -> the XDP mode it got (native, generic)
        self._warned_unserved = False  # localBackendsUnserved logged (again once it clears and comes back)
        # new_local when the note was last clear: the stats map is pinned and outlives restarts, so
        # its lifetime count is no reason for a note; the flows since are
        self._local_base = 0
        # status runs unlocked from API threads, scrapes and the ready loop: the reading and the
        # baseline move together, or an older reading taken for a recreated map moves it back
        # (not self._lock, which status must not wait for)
        self._status_lock = threading.Lock()

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
            flow_slots=cfg.flow_slots,
            maglev_size=maglev_size,
            extra_cflags=self.extra_cflags,
        )

    # ------------------------------------------------------------------ devices

    RECORD_KIND = "xdp"

    def _detach_one(self, ifname: str, direction: str) -> None:
        assert self._netns is not None
        link_dir = self._link_dir()
        self._netns(lambda: detach(ifname, link_dir))

    def _attach_devices(self, devices: tuple[str, ...], facts: DeviceFacts) -> None:
        from kpr.bpf.cleanup import forget_attachment, record_attachment

        cfg, dp, pin = self.cfg, self.datapath, self.pin
        assert cfg is not None and dp is not None and pin is not None and self._netns is not None
        self._detach_unlisted(devices)
        fn = dp.progs[D.INGRESS]
        prog_id = dp.prog_id(D.INGRESS)

        link_dir = self._link_dir()

        def run() -> tuple[dict[str, tuple[str, int, str]], dict[str, str]]:
            done, failed = {}, {}
            for dev in devices:
                if dev not in facts:
                    failed[dev] = "no such device in the agent's network namespace"
                    continue
                try:
                    done[dev] = attach(dev, fn, cfg.xdp_mode, link_dir)
                except OSError as exc:
                    failed[dev] = str(exc)
            return done, failed

        done, failed = self._netns(run)
        for dev, (mode, link_fd, action) in done.items():
            old = self._attached.get((dev, "xdp"))
            if old is not None and old.record_id:
                forget_attachment(pin, old.record_id)
            if old is not None and old.link_fd >= 0:
                os.close(old.link_fd)
            ifindex = facts[dev][0]
            rid = record_attachment(pin, "xdp", {"ifname": dev, "ifindex": ifindex, "netns": self._netns_path},
                                    D.INGRESS, prog_id=prog_id)
            self._attached[(dev, "xdp")] = Attached(
                dev, ifindex, "xdp", D.INGRESS, 0, rid, how="xdp-link" if link_fd >= 0 else "xdp",
                link_pin=link_dir / links.device_pin_name(dev) / "xdp" if link_fd >= 0 else None, link_fd=link_fd, action=action,
            )
            self._modes[dev] = mode
            if cfg.xdp_mode == "auto" and mode == "generic":
                log.warning("event=xdp_generic_fallback dev=%s hint='the driver has no native XDP'", dev)
        for dev, why in failed.items():
            self._c.attach_errors += 1
            self._note_error(f"{dev}: {why}")
            log.error("event=nodeport_attach_failed dev=%s error=%s", dev, why)
        self._device_errors = failed

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        super().kpr_start(context)
        assert self.datapath is not None
        with self._status_lock:
            try:
                self._local_base = int(self.datapath.stats().get("new_local", 0))
            except Exception as exc:  # as kpr_status: no reading is no reason to fail (and leave attachments)
                log.debug("event=nodeport_stats_unreadable error=%r", exc)
                self._local_base = 0
            self._warned_unserved = False
        # In an agent the config lists the plugins; a harness's lists none (nothing to say then).
        # INFO: an XDP-only node without local pods is right; the status note (and its warning)
        # says so when a flow to a local backend meets it.
        if context.config.plugins and "tc_nodeport" not in context.config.enabled_plugins():
            log.info("event=xdp_nodeport_local_backends_unserved reason=tc_nodeport_disabled "
                     "hint='frontends whose backend is on this node time out: XDP DNATs to the pod, "
                     "but only tc_nodeport translates its replies back; enable tc_nodeport alongside'")

    def _unserved_local(self) -> list[str] | None:
        """Devices XDP runs on without tc_nodeport's egress program (per kpr's attachment
        records on this pin), where replies of local backends leave untranslated; None when
        the records cannot be read."""
        # tc_nodeport's egress program is the only thing that gives a local backend's replies the
        # frontend's address (XDP has no egress hook); its attachment records say where it runs
        try:
            records = self._recorded("tc", (TC_EGRESS,))
        except OSError as exc:  # the pins going under our feet; status must not fail for it
            log.debug("event=attachment_records_unreadable error=%r", exc)
            return None
        served = {r["target"].get("ifname") for r in records}
        return sorted(d for d, _k in list(self._attached) if d not in served)

    def _device_details(self, attached: list[Attached], devices: list[str]) -> dict[str, Any]:
        return {dev: {"xdp": self._modes.get(dev, "?")} for dev in devices}

    def _link_details(self) -> dict[str, Any]:
        return {a.ifname: {"link": str(a.link_pin) if a.link_pin else None, "action": a.action}
                for a in list(self._attached.values())}

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        with self._status_lock:
            return self._status()

    def _status(self) -> PluginStatus:
        st = super().kpr_status()
        generic = sorted(d for d, m in self._modes.items() if m == "generic" and (d, "xdp") in self._attached)
        if generic:
            note = f"; generic XDP on {', '.join(generic)}"
            if self.cfg is not None and self.cfg.xdp_mode == "auto":
                note += " (native XDP failed: no driver support)"
            st = dataclasses.replace(st, message=st.message + note)
        details = dict(st.details)
        details["links"] = self._link_details()
        # New flows to local backends with nothing to translate their replies: the client gets
        # the pod's address back and resets; say so, the data path alone cannot.
        counted = "new_local" in st.counters  # not when stopped or the stats unreadable
        fresh, unserved, self._local_base = local_note(
            int(st.counters["new_local"]) if counted else None, self._local_base,
            self._unserved_local if self.pin is not None else list)
        details["localBackendsUnserved"] = unserved or []
        if unserved:
            st = dataclasses.replace(st, message=st.message + (
                f"; {fresh} new flows to local backends, replies untranslated on "
                f"{', '.join(unserved)}: enable tc_nodeport alongside"))
            if not self._warned_unserved:
                self._warned_unserved = True
                log.warning("event=xdp_nodeport_local_backends_unserved devices=%s new_local=%d "
                            "hint='no tc_nodeport egress program: replies of local backends keep the pod address; "
                            "enable tc_nodeport alongside'", ",".join(unserved), fresh)
        elif unserved is not None:  # (unknown for now: no second warning when it turns out unserved still)
            self._warned_unserved = False
        return dataclasses.replace(st, details=details)
