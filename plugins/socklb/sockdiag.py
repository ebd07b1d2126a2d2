"""Network namespaces by cookie, and destroying sockets in them (sock_diag, as `ss -K` does).

The socket programs remember each translated socket's netns cookie; to terminate sockets
connected to a removed backend the agent must find that namespace (among /run/netns and
every process's /proc/<pid>/ns/net), enter it, list the sockets connected to the backend
and send SOCK_DESTROY for those whose cookie the programs recorded. Namespace work runs in
a throwaway thread: setns() moves only the calling thread, and a thread that ends cannot
leave the agent in the wrong namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

SO_NETNS_COOKIE = 71  # getsockopt: the socket's netns cookie (Linux 5.14+)
CLONE_NEWNET = 0x40000000
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID_LEN = 48  # struct inet_diag_sockid: sport, dport, src[4], dst[4], if, cookie[2]
_MSG_HEAD = 4  # inet_diag_msg: family, state, timer, retrans, then the sockid
_ALL_STATES = 0xFFFFFFFF
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"

T = TypeVar("T")


class DestroyUnsupported(OSError):
    """The kernel cannot destroy sockets (no CONFIG_INET_DIAG_DESTROY)."""


# ---------------------------------------------------------------- namespaces


def current_netns_cookie() -> int:
    """Netns cookie of the calling thread's network namespace (what bpf_get_netns_cookie returns)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def run_in_netns(ns_path: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread that has joined the network namespace at ns_path."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    t = threading.Thread(target=target, name="kpr-socklb-netns", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def netns_candidates() -> Iterator[Path]:
    """Every network namespace reachable by path, each once: named ones, then processes'."""
    seen: set[tuple[int, int]] = set()
    named = sorted(Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else []
    procs = (Path("/proc") / p / "ns" / "net" for p in os.listdir("/proc") if p.isdigit())
    for path in (*named, *procs):
        try:
            st = os.stat(path)
        except OSError:  # the process exited, or a stale name
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        yield path


def find_netns(cookies: Iterable[int]) -> dict[int, Path]:
    """Paths of the namespaces with these cookies (those found; a namespace may be gone)."""
    wanted = set(cookies)
    found: dict[int, Path] = {}
    for path in netns_candidates():
        if not wanted - set(found):
            break
        try:
            cookie = run_in_netns(path, current_netns_cookie)
        except OSError:
            continue
        if cookie in wanted:
            found[cookie] = path
    return found


# ---------------------------------------------------------------- sock_diag


@dataclass(frozen=True)
class DiagSocket:
    family: int
    protocol: int
    sockid: bytes  # the raw inet_diag_sockid, echoed back to destroy exactly this socket
    dst: bytes  # peer address, 16 bytes as the BPF maps store it (IPv4 v4-mapped)
    dport: int  # peer port, host order
    cookie: int


def _addr16(family: int, raw: bytes) -> bytes:
    return _V4_PREFIX + raw[:4] if family == socket.AF_INET else raw[:16]


def _request(msg_type: int, flags: int, family: int, protocol: int, sockid: bytes, seq: int) -> bytes:
    body = _REQ_HEAD.pack(family, protocol, 0, 0, _ALL_STATES) + sockid
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _messages(sock: socket.socket, seq: int) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, payload) of each reply to request `seq`, until DONE or an ACK/error."""
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            length, mtype, flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < _NLMSGHDR.size:
                return
            payload = data[off + _NLMSGHDR.size : off + length]
            off += (length + 3) & ~3
            if mseq != seq:
                continue
            yield mtype, flags, payload
            if mtype in (NLMSG_DONE, NLMSG_ERROR):
                return


class DumpInterrupted(OSError):
    """The kernel's list changed while a multi-part dump was read (NLM_F_DUMP_INTR): the
    parts after the change may miss or repeat entries. Raised once every reply was handed on."""


def _dump(sock: socket.socket, request: bytes, seq: int, what: str) -> Iterator[tuple[int, bytes]]:
    """Send a dump request; (type, payload) of each reply that is neither DONE nor an error.
    An error (in NLMSG_ERROR or DONE) raises OSError naming `what`; a dump the kernel marked
    interrupted raises DumpInterrupted at its end."""
    sock.send(request)
    interrupted = False
    for mtype, flags, payload in _messages(sock, seq):
        interrupted |= bool(flags & NLM_F_DUMP_INTR)  # DONE can carry it too
        if mtype in (NLMSG_ERROR, NLMSG_DONE):
            # A dump that fails once under way (or cannot start: no diag handler for the
            # protocol) ends with DONE carrying the error, not with NLMSG_ERROR.
            err = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
            if err:
                raise OSError(err, f"{what}: {os.strerror(err)}")
        else:
            yield mtype, payload
    if interrupted:
        raise DumpInterrupted(errno.EINTR, f"{what}: interrupted by a change (NLM_F_DUMP_INTR)")


def dump(family: int, protocol: int) -> list[DiagSocket]:
    """Sockets of one family and protocol in the calling thread's namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        request = _request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, protocol, bytes(_SOCKID_LEN), 1)
        out = []
        for mtype, payload in _dump(s, request, 1, "sock_diag dump"):
            if mtype != SOCK_DIAG_BY_FAMILY or len(payload) < _MSG_HEAD + _SOCKID_LEN:
                continue
            sid = payload[_MSG_HEAD : _MSG_HEAD + _SOCKID_LEN]
            lo, hi = struct.unpack_from("=II", sid, 40)
            out.append(
                DiagSocket(
                    family=payload[0],
                    protocol=protocol,
                    sockid=sid,
                    dst=_addr16(payload[0], sid[20:36]),
                    dport=struct.unpack_from("!H", sid, 2)[0],
                    cookie=lo | (hi << 32),
                )
            )
        return out


RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
# An address added or removed while a dump is read spoils it; a few reads again get past a
# burst of changes (as pyroute2's poll), the last one is used whatever it says.
_DUMP_ATTEMPTS = 5


def interface_addresses() -> list[str]:
    """The local address of every address entry on every interface of the calling thread's
    namespace, both families, as `ip addr` lists them (an RTM_GETADDR dump: importing pyroute2
    for this took 0.1 s of CPU on the way to ready)."""
    head = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    request = _NLMSGHDR.pack(_NLMSGHDR.size + len(head), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 3, 0) + head
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        for attempt in range(1, _DUMP_ATTEMPTS + 1):
            out: list[str] = []
            try:
                for mtype, payload in _dump(s, request, 3, "RTM_GETADDR dump"):
                    if mtype == RTM_NEWADDR and (addr := _local_address(payload)):
                        out.append(addr)
                return out
            except DumpInterrupted:
                log.debug("event=ifaddr_dump_interrupted attempt=%d", attempt)
        log.warning("event=ifaddr_dump_interrupted attempts=%d using=last (an address may be missing or gone)", attempt)
        return out


def _local_address(payload: bytes) -> str | None:
    """The address an RTM_NEWADDR message is about, as text (None: another family)."""
    if len(payload) < _IFADDRMSG.size or payload[0] not in (socket.AF_INET, socket.AF_INET6):
        return None
    # IFA_LOCAL is the host's own address; IFA_ADDRESS is the same one, except on a
    # point-to-point address, where it is the peer's (ip addr's "peer").
    found: dict[int, bytes] = {}
    off = _IFADDRMSG.size
    while off + _RTATTR.size <= len(payload):
        length, atype = _RTATTR.unpack_from(payload, off)
        if length < _RTATTR.size:
            break
        if atype in (IFA_LOCAL, IFA_ADDRESS):
            found[atype] = payload[off + _RTATTR.size : off + length]
        off += (length + 3) & ~3
    raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    return socket.inet_ntop(payload[0], raw) if raw else None


def destroy(sk: DiagSocket) -> None:
    """SOCK_DESTROY one socket (calling thread's namespace). ENOENT: it was gone already."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.send(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, sk.family, sk.protocol, sk.sockid, 2))
        for mtype, _flags, payload in _messages(s, 2):
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                if err in (errno.EOPNOTSUPP, errno.ENOTSUP, 524):
                    raise DestroyUnsupported(err, "the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)")
                if err and err != errno.ENOENT:
                    raise OSError(err, f"SOCK_DESTROY: {os.strerror(err)}")
                return


def destroy_unsupported() -> str:
    """Why SOCK_DESTROY cannot work here ("" when it can): a destroy that matches no socket
    answers ENOENT when the kernel supports it, EOPNOTSUPP when not."""
    try:
        destroy(DiagSocket(socket.AF_INET, socket.IPPROTO_TCP, bytes(_SOCKID_LEN), bytes(16), 0, 0))
    except DestroyUnsupported as exc:
        return str(exc)
    except OSError as exc:
        return f"SOCK_DESTROY refused: {exc}"
    return ""


@dataclass(frozen=True)
class Target:
    """Sockets to destroy in one namespace: connected to addr:port, with one of these cookies."""

    protocol: int  # IPPROTO_TCP / IPPROTO_UDP
    addr: bytes  # 16 bytes, IPv4 v4-mapped
    port: int  # host order
    cookies: frozenset[int]


def destroy_in_current_netns(targets: Iterable[Target]) -> int:
    """Destroy the targets' sockets here; returns how many were destroyed."""
    targets = list(targets)
    done = 0
    for proto in sorted({t.protocol for t in targets}):
        mine = [t for t in targets if t.protocol == proto]
        families = [socket.AF_INET6]
        if any(t.addr.startswith(_V4_PREFIX) for t in mine):
            families.insert(0, socket.AF_INET)  # dual-stack AF_INET6 sockets reach IPv4 peers too
        for fam in families:
            for sk in dump(fam, proto):
                if any(sk.dst == t.addr and sk.dport == t.port and sk.cookie in t.cookies for t in mine):
                    destroy(sk)
                    done += 1
    return done
