"""What each network device of a namespace is, and a watcher that keeps that current.

Forwarding helpers depend on the egress device: `bpf_redirect_peer` only works into a veth or
netkit whose peer lives in another namespace (anything else is dropped by the kernel after the
program returned, unseen), `bpf_redirect_neigh` needs a device the neighbour subsystem serves,
and XDP_REDIRECT into a veth needs an XDP program on its peer. Data paths ask this module what a
device is instead of guessing from its name.

Kinds (the same values as KPR_DEV_* in core/bpf/lib/devkind.h; a root-free test checks both):
- VETH_PEER: a veth whose peer is in another namespace (a pod's host-side device).
- NETKIT: a netkit device (its peer is in the pod by construction).
- BRIDGE: a Linux bridge (cni0); its ports keep their own kind and carry `master`.
- OVERLAY: an encapsulating device, with or without a MAC: vxlan, geneve, gre/gretap, ipip,
  sit, ip6tnl, erspan, wireguard, ... An encapsulating device is OVERLAY even when it has no
  MAC (ipip, wireguard): what matters for forwarding is that it encapsulates.
- PHYSICAL: any other Ethernet device with a MAC: NICs, macvlan/ipvlan, bond, vlan, dummy, tap.
- VETH_LOCAL: a veth whose peer is in the same namespace (a host-local pair).
- L3: any other device without an Ethernet header: loopback, tun, raw IP devices.
- UNKNOWN: what none of the above describes (for example an InfiniBand link).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .netlinkwatch import RTMGRP_LINK, Closed, EventSocket, netns_path, stop_watch

log = logging.getLogger(__name__)

__all__ = ["DevKind", "NetDev", "classify", "DeviceWatcher"]

ARPHRD_ETHER = 1
# Quiet time that ends a burst of link events before the watcher looks again (creating a veth
# pair, a pod's setup, a CNI's bridge port: several messages within a few milliseconds).
COALESCE_SECONDS = 0.02
STOP_SECONDS = 2.0
START_SECONDS = 10.0
RETRY_SECONDS = 1.0  # a dump that failed is tried again after this long, events or not

OVERLAY_KINDS = frozenset({
    "vxlan", "geneve", "bareudp", "gtp", "gre", "gretap", "ip6gre", "ip6gretap", "erspan", "ip6erspan",
    "ipip", "sit", "ip6tnl", "vti", "vti6", "xfrm", "wireguard", "amt",
})


class DevKind(enum.IntEnum):
    UNKNOWN = 0
    VETH_PEER = 1
    NETKIT = 2
    BRIDGE = 3
    OVERLAY = 4
    PHYSICAL = 5
    VETH_LOCAL = 6
    L3 = 7


@dataclass(frozen=True)
class NetDev:
    ifindex: int
    name: str
    kind: DevKind
    master: int | None  # the master device's ifindex: the bridge, for a bridge port
    mac: bytes | None  # 6 bytes for an Ethernet device, else None


def _kind_of(link_kind: str | None, arphrd: int, mac: bytes | None, peer_netnsid: int | None) -> DevKind:
    if link_kind == "veth":
        return DevKind.VETH_PEER if peer_netnsid is not None else DevKind.VETH_LOCAL
    if link_kind == "netkit":
        return DevKind.NETKIT
    if link_kind == "bridge":
        return DevKind.BRIDGE
    if link_kind in OVERLAY_KINDS:
        return DevKind.OVERLAY
    if arphrd == ARPHRD_ETHER and mac is not None:
        return DevKind.PHYSICAL
    if arphrd in _L3_ARPHRD:  # loopback, tun, raw IP devices: no Ethernet header to write
        return DevKind.L3
    return DevKind.UNKNOWN


# ARPHRD_LOOPBACK, ARPHRD_NONE, ARPHRD_TUNNEL, ARPHRD_TUNNEL6, ARPHRD_SIT, ARPHRD_IPGRE, ARPHRD_PPP,
# ARPHRD_RAWIP
_L3_ARPHRD = frozenset({772, 0xFFFE, 768, 769, 776, 778, 512, 519})


def _netdev(msg: Any) -> NetDev:
    raw_mac = msg.get_attr("IFLA_ADDRESS")
    arphrd = int(msg["ifi_type"])
    mac = None
    if raw_mac and arphrd == ARPHRD_ETHER:
        b = bytes.fromhex(raw_mac.replace(":", ""))
        mac = b if len(b) == 6 else None
    link_kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    # The kernel names the peer's namespace (allocating an id if needed) only when it differs.
    kind = _kind_of(link_kind, arphrd, mac, msg.get_attr("IFLA_LINK_NETNSID"))
    master = msg.get_attr("IFLA_MASTER")
    return NetDev(
        ifindex=int(msg["index"]), name=str(msg.get_attr("IFLA_IFNAME")), kind=kind,
        master=int(master) if master else None, mac=mac,
    )


def _dump(ipr: Any) -> dict[int, NetDev]:
    out: dict[int, NetDev] = {}
    for msg in ipr.get_links():
        dev = _netdev(msg)
        out[dev.ifindex] = dev
    return out


def _iproute(netns: str | None) -> Any:
    from pyroute2 import IPRoute

    # flags=0: pyroute2 would otherwise create a namespace that does not exist
    return IPRoute(netns=netns_path(netns), flags=0) if netns else IPRoute()


def classify(netns: str | None = None) -> dict[int, NetDev]:
    """Every link of a namespace (a name under /run/netns or a path; None: the calling
    thread's own), by ifindex."""
    with _iproute(netns) as ipr:
        return _dump(ipr)


class DeviceWatcher:
    """Keeps `devices` (ifindex -> NetDev) current for one namespace and calls `on_change` with
    the full dict after each change (a burst of link events gives one call).

    start() opens the netlink sockets in the caller's thread (so None means the namespace the
    caller is in), takes the first dump and calls on_change once with it before returning.
    on_change runs on the watcher's thread afterwards; an exception in it is logged and the
    watcher carries on. stop() is bounded.
    """

    def __init__(self, on_change: Callable[[dict[int, NetDev]], None], netns: str | None = None) -> None:
        self.on_change = on_change
        self.netns = netns
        self.devices: dict[int, NetDev] = {}
        self.errors = 0  # dumps or callbacks that failed
        self.changes = 0  # on_change calls
        self._events: EventSocket | None = None
        self._ipr: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> DeviceWatcher:
        if self._thread is not None:
            raise RuntimeError("DeviceWatcher already started")
        # Subscribe before the first dump: a link that appears in between is seen by both.
        self._events = EventSocket(RTMGRP_LINK, self.netns, name="netdevs")
        self._stopping.clear()
        ready = threading.Event()
        failure: list[BaseException] = []
        # The thread inherits the caller's namespace (None) and owns the dumping socket:
        # pyroute2's sync sockets belong to the thread that made them.
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name=f"kpr-netdevs-{self.netns or 'self'}", daemon=True,
        )
        self._thread.start()
        if not ready.wait(START_SECONDS) or failure:
            self.stop()
            why = repr(failure[0]) if failure else f"no first dump within {START_SECONDS}s"
            raise OSError(f"DeviceWatcher netns={self.netns or 'self'}: {why}")
        log.info("event=netdevs_watching netns=%s devices=%d", self.netns or "self", len(self.devices))
        return self

    def stop(self) -> None:
        self._stopping.set()
        if stop_watch(self._events, self._thread, STOP_SECONDS, "netdevs"):
            self._events, self._thread = None, None

    @property
    def running(self) -> bool:
        """Whether the watcher still follows events (False before start, after stop, or when its
        thread ended on an error: `devices` is then as of its last dump)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def _refresh(self, first: bool = False) -> bool:
        """Dump and report a change; False when the dump failed."""
        try:
            current = _dump(self._ipr)
        except Exception as exc:
            if first:
                raise
            self.errors += 1
            log.warning("event=netdevs_dump_failed error=%r retry_seconds=%.1f", exc, RETRY_SECONDS)
            return False
        if current == self.devices and not first:
            return True
        self.devices = current
        self.changes += 1
        try:
            self.on_change(dict(current))
        except Exception:
            self.errors += 1
            log.exception("event=netdevs_callback_failed")
        return True

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            self._ipr = _iproute(self.netns)
            self._refresh(first=True)
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            self._watch()
        finally:
            if self._ipr is not None:
                try:
                    self._ipr.close()
                except Exception as exc:  # closing must not end the thread with a traceback
                    log.debug("event=netdevs_close_error error=%r", exc)
                self._ipr = None

    def _watch(self) -> None:
        ev = self._events
        assert ev is not None
        retry = False  # the last dump failed: look again after RETRY_SECONDS
        while not self._stopping.is_set():
            try:
                got = ev.wait(RETRY_SECONDS if retry else None)
                if got == "stop":
                    return
                if got == "events":
                    # coalesce: the burst ends by quiet time, not by its length
                    ev.settle(COALESCE_SECONDS)
            except Closed:
                return
            if not self._stopping.is_set():
                retry = not self._refresh()
