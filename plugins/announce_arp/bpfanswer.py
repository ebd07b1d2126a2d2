"""ARP and neighbour solicitations answered in BPF: the tc program (bpf/arp_tc.c over
core/bpf/lib/arp.h) on every configured interface, and the maps it answers from.

The program answers at the kernel's own rate from kpr_arp_owned, (ifindex, address) -> the
interface's MAC, which `set_owned` keeps equal to what this node owns on each interface the
program is attached to. The plugin calls it before the responder announces a newly taken
address, and a dropped address is deleted in the same call: it is never answered again.

Each program is attached to tcx ingress through a BPF link pinned at
<bpf.pinPath>/links/announce_arp/<interface>/ingress (kpr.bpf.links): a restarted agent
adopts the link and switches it to its new program atomically; `kpr cleanup` removes it.
The link outlives the agent, so the program only answers while the agent vouches for its
map (kpr_arp_alive, moved forward every hold/8 seconds): a killed agent's addresses stop
being answered within `hold`, before a peer takes them over.

An interface the program cannot be attached to (no tcx links, no bcc, a verifier refusal)
is answered by the Python responder instead; `answering` and `problems` say which and why.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.bpf import abi, links
from kpr.bpf import maps as M
from kpr.bpf.loader import BPF_DIR
from kpr.bpf.percpu import possible_cpus

from .responder import interface_mac

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "bpf" / "arp_tc.c"
XDP_SOURCE = Path(__file__).resolve().parent / "bpf" / "arp_xdp.c"
PROG = "kpr_arp_tc"
XDP_PROG = "kpr_arp_xdp"
LINK_SUBDIR = "announce_arp"
OWNED_MAP, STATS_MAP, ALIVE_MAP = "kpr_arp_owned", "kpr_arp_stats", "kpr_arp_alive"
COUNTERS_H = BPF_DIR / "lib" / "arp_counters.h"

KEY = abi.packer("kpr_arp_key")  # struct kpr_arp_key (lib/arp.h): ifindex, address (v4-mapped)
VAL = abi.packer("kpr_arp_val")  # struct kpr_arp_val: MAC, pad
U64 = struct.Struct("=Q")
# Seconds before an interface the program could not be attached to is tried again.
RETRY_S = 30.0


def counter_names(path: Path = COUNTERS_H) -> tuple[str, ...]:
    """The program's counters in slot order, from the one definition C builds its enum from."""
    return abi.read_xmacro(path, "KPR_ARP_COUNTER", 1)


COUNTERS = counter_names()


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


@dataclass
class _Iface:
    name: str
    ifindex: int = 0
    mac: str = ""
    link_fd: int = -1
    link_pin: Path | None = None
    action: str = ""
    error: str = ""
    # When a failed attach is tried again (an interface recreated is tried at once).
    retry_at: float = 0.0


class BpfAnswerer:
    def __init__(self, interfaces: list[str], pin_path: Path, *, hold: float = 0.5, hook: str = "tc"):
        # hook "xdp" loads the XDP build of the same code (tests and benchmarks); only the tc
        # build is attached.
        self.hook = hook
        self.pin_path = Path(pin_path)
        self.hold = hold
        self.ifaces = {name: _Iface(name) for name in interfaces}
        self.load_error = ""
        self._bpf: Any = None
        self._fn: Any = None
        self._owned_map: M.BpfMap | None = None
        self._stats_map: M.BpfMap | None = None
        self._alive_map: M.BpfMap | None = None
        self._ncpu = 1
        self._owned: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def link_dir(self) -> Path:
        return self.pin_path / links.LINKS_DIR / LINK_SUBDIR

    def load(self) -> bool:
        """Compile and load the program; False (load_error says why) when it cannot be."""
        from kpr.bpf.loader import compile_and_load, load_prog

        source, prog, ptype = (XDP_SOURCE, XDP_PROG, "XDP") if self.hook == "xdp" else (SOURCE, PROG, "SCHED_CLS")
        try:
            self._bpf = compile_and_load(source)
            self._fn = load_prog(self._bpf, prog, ptype)
        except Exception as e:  # no bcc, no headers, a verifier refusal: Python answers
            self.load_error = f"cannot load {prog}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("event=arp_bpf_load_failed error=%s", self.load_error)
            return False
        self._ncpu = possible_cpus()
        self._owned_map = self._wrap(OWNED_MAP, KEY.size, VAL.size)
        self._stats_map = self._wrap(STATS_MAP, 4, 8 * len(COUNTERS) * self._ncpu)
        self._alive_map = self._wrap(ALIVE_MAP, 4, 8)
        self._vouch()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive, name="kpr-arp-bpf-alive", daemon=True)
        self._thread.start()
        return True

    def _wrap(self, name: str, key_size: int, value_size: int) -> M.BpfMap:
        table = self._bpf[name.encode()]
        # bcc owns the fd: these wrappers are never closed.
        return M.BpfMap(table.map_fd, name, key_size, value_size, 0)

    def attach_all(self) -> dict[str, str]:
        """Attach (or adopt) on every interface not attached yet; interface -> problem."""
        if self._fn is None:
            return {n: self.load_error for n in self.ifaces}
        out = {}
        for port in self.ifaces.values():
            if port.link_fd < 0:
                self._attach(port)
            if port.error:
                out[port.name] = port.error
        return out

    @property
    def fd(self) -> int:
        return int(self._fn.fd)

    def bind(self, ifname: str) -> None:
        """Answer on `ifname` (its ifindex and MAC read in the calling thread's netns) from
        the map, without attaching anything: what attaching does first, and what tests of
        the program alone use."""
        port = self.ifaces[ifname]
        port.ifindex = socket.if_nametoindex(port.name)
        port.mac = interface_mac(port.name)
        # The map first: a link adopted from an earlier agent switches to a program that
        # already answers for what this node owns.
        with self._lock:
            self._sync_map()

    def _attach(self, port: _Iface) -> None:
        from kpr.bpf.cleanup import record_attachment

        try:
            self.bind(port.name)
            pin = self.link_dir / links.device_pin_name(port.name) / "ingress"
            fd, action, li = links.ensure(pin, self._fn.fd, links.Hook.tcx(port.ifindex, "ingress"))
        except links.LinkUnsupported as e:
            port.error = f"no tcx link for the BPF answers ({e.strerror or e}); answered in Python"
        except OSError as e:
            port.error = f"attaching {PROG}: {e.strerror or e}; answered in Python"
        else:
            port.link_fd, port.link_pin, port.action, port.error = fd, pin, action, ""
            try:
                record_attachment(self.pin_path, "tc", {"ifname": port.name, "ifindex": port.ifindex,
                                                        "direction": "ingress", "netns": ""},
                                  PROG, prog_id=li.prog_id)
            except OSError as e:  # cleanup then finds it through the link pin alone
                log.warning("event=arp_bpf_record_failed interface=%s error=%s", port.name, e)
            with self._lock:
                self._sync_map()
            log.info("event=arp_bpf_attached interface=%s ifindex=%d mac=%s action=%s link_id=%d",
                     port.name, port.ifindex, port.mac, action, li.id)
            return
        port.ifindex = 0
        port.retry_at = time.monotonic() + RETRY_S
        log.warning("event=arp_bpf_not_attached interface=%s reason=%s retry_in=%.0fs", port.name, port.error, RETRY_S)

    def refresh(self) -> bool:
        """Follow interfaces that were recreated (new ifindex) or changed MAC, and retry
        failed ones; True when which interfaces BPF answers on changed."""
        if self._fn is None:
            return False
        changed = False
        for port in self.ifaces.values():
            try:
                idx, mac = socket.if_nametoindex(port.name), interface_mac(port.name)
            except OSError:
                idx, mac = 0, ""
            if port.link_fd >= 0 and (idx != port.ifindex or mac != port.mac):
                log.info("event=arp_bpf_interface_changed interface=%s ifindex=%d->%d mac=%s->%s",
                         port.name, port.ifindex, idx, port.mac, mac)
                os.close(port.link_fd)
                port.link_fd, port.ifindex, port.retry_at = -1, 0, 0.0
                port.error = "interface gone" if not idx else ""
                changed = True
            if port.link_fd < 0 and idx and time.monotonic() >= port.retry_at:
                self._attach(port)
                changed = changed or port.link_fd >= 0
        if changed:
            with self._lock:
                self._sync_map()
        return changed

    def stop(self) -> None:
        """Stop answering (the map emptied, the agent no longer vouching); the links stay
        pinned for the next agent, `kpr cleanup` removes them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._fn is None:
            return
        self.set_owned(frozenset())
        try:
            assert self._alive_map is not None
            self._alive_map.update(M.U32.pack(0), U64.pack(0))
        except OSError as e:
            log.warning("event=arp_bpf_unvouch_failed error=%s", e)
        for port in self.ifaces.values():
            if port.link_fd >= 0:
                os.close(port.link_fd)
                port.link_fd = -1

    # --- what is answered ----------------------------------------------------------------

    def answering(self) -> set[str]:
        """Interfaces the program answers on now."""
        return {p.name for p in self.ifaces.values() if p.link_fd >= 0}

    def set_owned(self, addresses: frozenset[str] | set[str]) -> None:
        with self._lock:
            self._owned = frozenset(addresses)
            self._sync_map()

    def _sync_map(self) -> None:
        m = self._owned_map
        if m is None:
            return
        want = {}
        for port in self.ifaces.values():
            if port.ifindex and port.mac:
                val = VAL.pack(mac_bytes(port.mac), 0)
                for addr in self._owned:
                    want[KEY.pack(port.ifindex, M.addr_to_bytes(addr))] = val
        have = {k: m.lookup(k) for k in list(m.keys())}
        # Deletions first: a lost address stops being answered before anything else changes.
        for k in have.keys() - want.keys():
            m.delete(k)
        for k, v in want.items():
            if have.get(k) != v:
                m.update(k, v)
        assert self._stats_map is not None
        zero = bytes(self._stats_map.value_size)
        for port in self.ifaces.values():
            if port.ifindex and self._stats_map.lookup(M.U32.pack(port.ifindex)) is None:
                self._stats_map.update(M.U32.pack(port.ifindex), zero)

    def _vouch(self) -> None:
        assert self._alive_map is not None
        until = time.monotonic_ns() + int(self.hold * 1e9)
        self._alive_map.update(M.U32.pack(0), U64.pack(until))

    def _keepalive(self) -> None:
        while not self._stop.wait(self.hold / 8):
            try:
                self._vouch()
            except OSError as e:
                log.warning("event=arp_bpf_vouch_failed error=%s", e)

    # --- observation ---------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        """interface -> counter -> value, summed over CPUs, for interfaces answered in BPF."""
        m = self._stats_map
        out: dict[str, dict[str, int]] = {}
        if m is None:
            return out
        n = len(COUNTERS)
        for port in self.ifaces.values():
            if not port.ifindex:
                continue
            try:
                raw = m.lookup(M.U32.pack(port.ifindex))
            except OSError:
                raw = None
            if raw is None:
                continue
            vals = struct.unpack(f"={n * self._ncpu}Q", raw)
            out[port.name] = {name: sum(vals[c * n + i] for c in range(self._ncpu)) for i, name in enumerate(COUNTERS)}
        return out

    def details(self) -> dict[str, dict[str, object]]:
        return {
            p.name: {"ifindex": p.ifindex, "mac": p.mac, "link": str(p.link_pin) if p.link_fd >= 0 else "",
                     "action": p.action, "error": p.error}
            for p in self.ifaces.values()
        }


__all__ = ["COUNTERS", "BpfAnswerer", "counter_names"]
