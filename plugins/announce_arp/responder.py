"""Answering ARP and neighbour solicitations for owned addresses, and announcing them.

Requests are answered here only on the interfaces in `answering`: the others are answered by
the BPF program (bpfanswer.py), and their socket only sends announcements (its filter passes
nothing; it keeps the interface in all-multicast for the program's solicited-node traffic).

One packet socket per configured interface (scapy's ``conf.L2socket``: it never sees its own
outgoing frames, so it cannot answer itself), with a kernel filter that passes only ARP
requests and neighbour solicitations for the addresses owned right now, swapped whenever
they change. Replies carry the receiving interface's MAC, as MetalLB's do.

Taking an address announces it on every interface: a gratuitous ARP request and a reply
whose target MAC is the sender's (Linux honours a gratuitous reply only in that form), or an
unsolicited neighbour advertisement with the override flag to ff02::1; repeated garpRepeat
times garpSpacing apart, and every garpInterval when set. Dropping an address takes effect
for the next request: the owned set is swapped, never edited in place.

A socket that cannot be opened or fails is reported (``health``) and reopened with backoff.
"""

from __future__ import annotations

import fcntl
import heapq
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from kpr.bus import Backoff

log = logging.getLogger(__name__)

# ARP requests, and ICMPv6 type 135 (neighbour solicitation; ND messages carry no
# extension headers, so the ICMPv6 header follows the 40-byte IPv6 header).
FILTER = "(arp and arp[6:2] = 1) or (icmp6 and ip6[40] = 135)"
# Matches no frame: the filter while this node owns nothing.
NOTHING = "less 1"
DLT_EN10MB = 1


def filter_for(owned: frozenset[str] | set[str]) -> str:
    """A kernel filter passing only requests for the owned addresses.

    Requests for addresses this node does not own (most ARP traffic on a segment) then never
    wake Python, so an ARP storm cannot starve the heartbeat threads. Ownership is still
    checked per request in Python: the filter only has to be a superset.
    """
    v4 = sorted(a for a in owned if ":" not in a)
    v6 = sorted(a for a in owned if ":" in a)
    parts = []
    if v4:
        parts.append("(arp and arp[6:2] = 1 and (" + " or ".join(f"arp dst host {a}" for a in v4) + "))")
    if v6:
        targets = []
        for a in v6:
            words = ipaddress.IPv6Address(a).packed
            # The solicitation's target address: ICMPv6 offset 8, IPv6 payload offset 48.
            targets.append("(" + " and ".join(f"ip6[{48 + 4 * i}:4] = 0x{words[4 * i:4 * i + 4].hex()}" for i in range(4)) + ")")
        parts.append("(icmp6 and ip6[40] = 135 and (" + " or ".join(targets) + "))")
    return " or ".join(parts) or NOTHING


def attach_filter(sock: socket.socket, expr: str) -> None:
    """Compile with libpcap for Ethernet (no interface lookup) and swap it in atomically."""
    from scapy.arch.common import compile_filter, free_filter
    from scapy.data import SO_ATTACH_FILTER
    from scapy.libs.structures import sock_fprog

    bp = compile_filter(expr, linktype=DLT_EN10MB)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, sock_fprog(bp.bf_len, bp.bf_insns))
    finally:
        free_filter(bp)

SIOCGIFHWADDR = 0x8927
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_ALLMULTI = 2
BROADCAST = "ff:ff:ff:ff:ff:ff"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"


def interface_mac(ifname: str) -> str:
    """The interface's MAC, read in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        data = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
    return ":".join(f"{b:02x}" for b in data[18:24])


def interface_up(ifname: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        data = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("256s", ifname.encode()[:15]))
    return bool(struct.unpack_from("H", data, 16)[0] & IFF_UP)


def missing_interfaces(names: list[str]) -> list[str]:
    out = []
    for name in names:
        try:
            socket.if_nametoindex(name)
        except OSError:
            out.append(name)
    return out


def garp_frames(address: str, mac: str) -> list[bytes]:
    """What announces ``address`` at ``mac``: GARP request and reply, or an unsolicited NA."""
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import ARP, Ether

    if ipaddress.ip_address(address).version == 4:
        request = Ether(dst=BROADCAST, src=mac) / ARP(op=1, hwsrc=mac, psrc=address, hwdst="00:00:00:00:00:00", pdst=address)
        reply = Ether(dst=BROADCAST, src=mac) / ARP(op=2, hwsrc=mac, psrc=address, hwdst=mac, pdst=address)
        return [bytes(request), bytes(reply)]
    na = (
        Ether(dst=ALL_NODES_MAC, src=mac)
        / IPv6(src=address, dst=ALL_NODES, hlim=255)
        / ICMPv6ND_NA(tgt=address, R=0, S=0, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=mac)
    )
    return [bytes(na)]


@dataclass(frozen=True)
class Request:
    """What a received frame asks: kind "arp" or "ns" for requests we may answer,
    "gratuitous" (someone announcing ``target`` itself), or "ignored"."""

    kind: str
    target: str = ""
    # Who asked: where the reply goes.
    src_mac: str = ""
    src_ip: str = ""


IGNORED = Request("ignored")


def classify(frame: bytes, mac: str) -> Request:
    from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
    from scapy.layers.l2 import ARP, Ether

    pkt = Ether(frame)
    if pkt.src == mac:
        return IGNORED
    arp = pkt.getlayer(ARP)
    if arp is not None:
        if arp.op != 1:
            return IGNORED
        kind = "gratuitous" if arp.psrc == arp.pdst else "arp"
        return Request(kind, arp.pdst, arp.hwsrc, arp.psrc)
    ns = pkt.getlayer(ICMPv6ND_NS)
    ip6 = pkt.getlayer(IPv6)
    # RFC 4861 7.1.1: a solicitation that crossed a router (hop limit below 255) is not for us.
    if ns is None or ip6 is None or ip6.hlim != 255:
        return IGNORED
    target = str(ipaddress.ip_address(ns.tgt))
    kind = "gratuitous" if ip6.src == target else "ns"
    return Request(kind, target, pkt.src, ip6.src)


def build_reply(req: Request, mac: str) -> bytes:
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import ARP, Ether

    if req.kind == "arp":
        return bytes(Ether(dst=req.src_mac, src=mac) / ARP(op=2, hwsrc=mac, psrc=req.target, hwdst=req.src_mac, pdst=req.src_ip))
    if req.src_ip == "::":
        # Duplicate address detection: defend the address to all nodes (RFC 4861 7.2.4).
        dst_ip, dst_mac, solicited = ALL_NODES, ALL_NODES_MAC, 0
    else:
        dst_ip, dst_mac, solicited = req.src_ip, req.src_mac, 1
    return bytes(
        Ether(dst=dst_mac, src=mac)
        / IPv6(src=req.target, dst=dst_ip, hlim=255)
        / ICMPv6ND_NA(tgt=req.target, R=0, S=solicited, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=mac)
    )


class Answerer:
    """Replies for one interface, remembering recent requests.

    Routers and hosts repeat byte-identical requests (the same asker, the same target), and
    scapy takes hundreds of microseconds to dissect a frame and build a reply; the cache
    keeps a busy segment from costing that per request. Ownership is checked on every
    request, never cached.
    """

    def __init__(self, mac: str, size: int = 4096):
        self.mac = mac
        self.size = size
        self._cache: OrderedDict[bytes, list] = OrderedDict()

    def answer(self, frame: bytes, owned: frozenset[str]) -> tuple[str, bytes | None, str]:
        """(kind, reply or None, target); kinds: "arp"/"na" answered, "not_owned",
        "gratuitous" (a conflict when we own the target), "ignored"."""
        entry = self._cache.get(frame)
        if entry is None:
            entry = [classify(frame, self.mac), None]
            self._cache[frame] = entry
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(frame)
        req: Request = entry[0]
        if req.kind == "ignored":
            return "ignored", None, ""
        if req.kind == "gratuitous":
            # Another node announcing: a conflict only if we think the address is ours.
            return ("gratuitous" if req.target in owned else "ignored"), None, req.target
        if req.target not in owned:
            return "not_owned", None, req.target
        if entry[1] is None:
            entry[1] = build_reply(req, self.mac)
        return ("arp" if req.kind == "arp" else "na"), entry[1], req.target


@dataclass
class _Port:
    ifname: str
    sock: object | None = None
    mac: str = ""
    answerer: Answerer | None = None
    error: str = ""
    attempt: int = 0
    retry_at: float = 0.0
    thread: threading.Thread | None = None


@dataclass(order=True)
class _Due:
    at: float
    address: str = field(compare=False)
    left: int = field(compare=False)
    ifname: str | None = field(compare=False, default=None)


class Responder:
    def __init__(
        self,
        interfaces: list[str],
        *,
        garp_repeat: int = 3,
        garp_spacing: float = 0.5,
        garp_interval: float = 0.0,
        backoff: Backoff | None = None,
    ):
        self.ports = {name: _Port(name) for name in interfaces}
        # Interfaces whose requests Python answers; the others are answered in BPF, and their
        # socket only announces (its filter passes nothing).
        self.answering: frozenset[str] = frozenset(interfaces)
        self.garp_repeat = garp_repeat
        self.garp_spacing = garp_spacing
        self.garp_interval = garp_interval
        self._backoff = backoff or Backoff(0.2, 10.0)
        self._owned: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._due: list[_Due] = []
        self._due_cv = threading.Condition(self._lock)
        self._next_periodic = float("inf")
        self.counters: Counter[str] = Counter()
        self._last_conflict_log = float("-inf")
        self._announcer: threading.Thread | None = None

    # --- control -------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        for port in self.ports.values():
            port.thread = threading.Thread(target=self._serve, args=(port,), name=f"kpr-arp-{port.ifname}", daemon=True)
            port.thread.start()
        self._announcer = threading.Thread(target=self._announce_loop, name="kpr-arp-garp", daemon=True)
        self._announcer.start()

    def stop(self) -> None:
        self.set_owned(set())
        self._stop.set()
        with self._due_cv:
            self._due_cv.notify_all()
        for port in self.ports.values():
            if port.thread is not None:
                port.thread.join(timeout=2)
        if self._announcer is not None:
            self._announcer.join(timeout=2)
        for port in self.ports.values():
            self._close(port)

    @property
    def owned(self) -> frozenset[str]:
        return self._owned

    def set_owned(self, addresses: set[str] | frozenset[str]) -> tuple[set[str], set[str]]:
        """Answer for exactly these addresses from now on; announce the new ones.

        Returns (taken, dropped).
        """
        new = frozenset(addresses)
        with self._lock:
            old = self._owned
            # Swapped whole: a responder thread reads one consistent set per request.
            self._owned = new
            if new != old:
                for port in self.ports.values():
                    try:
                        self._refilter(port)
                    except Exception as e:  # the socket closed under us; reopening refilters
                        log.debug("event=refilter_failed interface=%s error=%r", port.ifname, e)
            taken = set(addresses) - old
            dropped = old - set(addresses)
            now = time.monotonic()
            for addr in sorted(taken):
                heapq.heappush(self._due, _Due(now, addr, self.garp_repeat))
            if self.garp_interval and self._next_periodic == float("inf"):
                self._next_periodic = now + self.garp_interval
            self._due_cv.notify_all()
        for addr in sorted(taken):
            log.info("event=address_taken address=%s", addr)
        for addr in sorted(dropped):
            log.info("event=address_dropped address=%s", addr)
        return taken, dropped

    def answer_on(self, interfaces: set[str] | frozenset[str]) -> None:
        """Answer requests in Python on exactly these interfaces (the rest only announce)."""
        with self._lock:
            new = frozenset(interfaces) & frozenset(self.ports)
            if new == self.answering:
                return
            self.answering = new
            for port in self.ports.values():
                try:
                    self._refilter(port)
                except Exception as e:
                    log.debug("event=refilter_failed interface=%s error=%r", port.ifname, e)
        log.info("event=python_answers interfaces=%s", ",".join(sorted(new)) or "-")

    def health(self) -> tuple[bool, str, dict[str, object]]:
        problems = [f"interface {p.ifname}: {p.error}" for p in self.ports.values() if p.error]
        details = {p.ifname: {"mac": p.mac, "open": p.sock is not None, "error": p.error} for p in self.ports.values()}
        return (not problems, "; ".join(problems), details)

    # --- answering -----------------------------------------------------------------------

    def _open(self, port: _Port) -> None:
        import scapy.arch  # noqa: F401 - sets conf.L2socket for this platform
        import scapy.layers.inet6  # noqa: F401 - registers the link types the socket decodes
        import scapy.layers.l2  # noqa: F401
        from scapy.config import conf

        # promisc off: broadcast ARP needs no promiscuous mode, and all-multicast (below)
        # brings solicited-node multicast without taking in every unicast frame (a BPF
        # answerer on the interface needs it as much).
        # The filter goes on before the socket is bound, so not one frame slips past it...
        sock = conf.L2socket(iface=port.ifname, promisc=False, filter=filter_for(self._owned if port.ifname in self.answering else frozenset()))
        try:
            index = socket.if_nametoindex(port.ifname)
            mreq = struct.pack("IHH8s", index, PACKET_MR_ALLMULTI, 0, b"")
            sock.ins.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            port.mac = interface_mac(port.ifname)
            port.answerer = Answerer(port.mac)
            # ...and again under the lock set_owned holds while it swaps the owned set and
            # refilters, so the filter is never one change behind.
            with self._lock:
                self._refilter(port, sock)
                port.sock = sock
        except Exception:
            sock.close()
            raise

    def _refilter(self, port: _Port, sock=None) -> None:
        sock = sock or port.sock
        if sock is None:
            return
        owned = self._owned if port.ifname in self.answering else frozenset()
        expr = filter_for(owned)
        try:
            attach_filter(sock.ins, expr)
        except Exception as e:  # e.g. too many addresses for one BPF program
            log.warning("event=owned_filter_failed interface=%s addresses=%d error=%s; using the generic filter", port.ifname, len(owned), e)
            attach_filter(sock.ins, FILTER)

    def _close(self, port: _Port) -> None:
        sock, port.sock = port.sock, None
        if sock is not None:
            try:
                sock.close()
            except Exception:
                pass

    def _fail(self, port: _Port, what: str, err: BaseException) -> None:
        self._close(port)
        port.attempt += 1
        delay = self._backoff.delay(port.attempt)
        port.retry_at = time.monotonic() + delay
        message = f"{what}: {type(err).__name__}: {err}; retrying in {delay:.1f}s"
        if message != port.error:
            log.error("event=responder_unhealthy interface=%s reason=%s", port.ifname, message)
        port.error = message
        self.counters["socket_errors"] += 1

    def _serve(self, port: _Port) -> None:
        while not self._stop.is_set():
            if port.sock is None:
                if time.monotonic() < port.retry_at:
                    self._stop.wait(min(0.2, port.retry_at - time.monotonic()))
                    continue
                try:
                    if not interface_up(port.ifname):
                        raise OSError("interface is down")
                    self._open(port)
                except Exception as e:  # scapy raises its own types for filter problems
                    self._fail(port, "cannot open packet socket", e)
                    continue
                recovered = bool(port.error)
                port.error, port.attempt = "", 0
                log.info("event=responder_listening interface=%s mac=%s recovered=%s", port.ifname, port.mac, recovered)
                # Announcements due while the socket was closed were skipped (and another
                # node may have been announcing meanwhile): announce what we own now.
                self._schedule_all(port.ifname)
            try:
                ready, _, _ = select.select([port.sock.ins], [], [], 0.2)
                if not ready:
                    if not interface_up(port.ifname):
                        raise OSError("interface went down")
                    continue
                _cls, frame, _ts = port.sock.recv_raw()
            except Exception as e:
                self._fail(port, "receive failed", e)
                continue
            if frame is None:  # our own outgoing frame
                continue
            if port.ifname not in self.answering:
                continue  # queued before the filter changed: BPF answers it
            try:
                kind, reply, target = port.answerer.answer(frame, self._owned)
            except Exception as e:  # a malformed frame must not stop the responder
                self.counters["malformed"] += 1
                log.debug("event=frame_unparsable interface=%s error=%r", port.ifname, e)
                continue
            self.counters[kind] += 1
            if kind == "gratuitous":
                self._conflict(port, target, frame)
            if reply is None:
                continue
            try:
                port.sock.outs.send(reply)
            except OSError as e:
                self.counters["send_errors"] += 1
                self._fail(port, "send failed", e)

    def _conflict(self, port: _Port, target: str, frame: bytes) -> None:
        now = time.monotonic()
        if now - self._last_conflict_log > 5.0:
            self._last_conflict_log = now
            src = ":".join(f"{b:02x}" for b in frame[6:12])
            log.warning("event=address_conflict address=%s interface=%s other_mac=%s", target, port.ifname, src)

    # --- announcing ----------------------------------------------------------------------

    def _schedule_all(self, ifname: str | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            for addr in sorted(self._owned):
                heapq.heappush(self._due, _Due(now, addr, self.garp_repeat, ifname))
            self._due_cv.notify_all()

    def _announce_loop(self) -> None:
        while not self._stop.is_set():
            with self._due_cv:
                now = time.monotonic()
                if self._next_periodic <= now:
                    self._next_periodic = now + self.garp_interval
                    for addr in sorted(self._owned):
                        heapq.heappush(self._due, _Due(now, addr, 1))
                if not self._due or self._due[0].at > now:
                    wake = min(self._due[0].at if self._due else float("inf"), self._next_periodic)
                    self._due_cv.wait(None if wake == float("inf") else max(0.0, wake - now))
                    continue
                item = heapq.heappop(self._due)
                owned = item.address in self._owned
                if owned and item.left > 1:
                    heapq.heappush(self._due, _Due(now + self.garp_spacing, item.address, item.left - 1, item.ifname))
            if owned:
                self._announce(item.address, item.ifname)

    def _announce(self, address: str, ifname: str | None) -> None:
        for port in self.ports.values():
            if ifname is not None and port.ifname != ifname:
                continue
            sock = port.sock
            if sock is None:
                continue
            try:
                for frame in garp_frames(address, port.mac):
                    sock.outs.send(frame)
                    self.counters["garp_sent"] += 1
            except OSError as e:
                self.counters["send_errors"] += 1
                log.warning("event=garp_send_failed interface=%s address=%s error=%s", port.ifname, address, e)
