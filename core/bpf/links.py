"""BPF links pinned under bpf.pinPath: attachments that outlive the agent, adopted on start.

A program attached through a BPF link stays attached for as long as the link lives; a link
pinned on bpffs lives until it is unpinned (or the bpffs goes). kpr attaches every program it
can through a link pinned at `<pinPath>/links/<plugin>/<target>/<hook>`, so the data path
keeps running on the pinned maps while no agent runs (a stop, a crash, an upgrade). On start
a plugin calls `ensure()` per hook: a link already pinned there is adopted and switched to the
newly loaded program with BPF_LINK_UPDATE (atomic: every packet or socket call sees the old or
the new program, never none, and there is never a second copy); a missing one is created and
pinned; a pinned link whose target is gone (a removed cgroup, a deleted device) is replaced.
`sweep()` detaches and unpins links for hooks or targets no longer wanted.

Kinds of hook, each with the kernel it needs:
  cgroup  BPF_LINK_TYPE_CGROUP (5.7+): socklb's socket hooks. Links always share the hook
          (like BPF_F_ALLOW_MULTI), so other owners' programs stay.
  tcx     BPF_TCX_INGRESS / BPF_TCX_EGRESS (6.6+): tc programs (BPF_PROG_TYPE_SCHED_CLS; bcc's
          load_func with expected attach type 0 is accepted). tcx programs run before classic
          tc (clsact) filters; ours is appended after other owners' tcx programs.
  xdp     BPF_XDP (5.9+): one program per device; the mode (native, generic) is the link's flags.

libbpf.so.1 (1.1 on Debian 12, through ctypes as kpr.bpf.maps does) creates, updates, pins
and opens the links; bcc 0.26 has no link API. Where the kernel refuses a link for a kind
(`LinkUnsupported`), callers fall back to the attach they used before links (cgroup
BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI, a clsact filter, a netlink XDP attach) and say so in
their status. `KPR_BPF_LINKS=off` (or a comma list of kinds: `cgroup,tcx,xdp`) in the
environment forces that fallback, for tests and for kernels whose probe is wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import maps as M

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "ATTACH_TCX_EGRESS",
    "ATTACH_TCX_INGRESS",
    "ATTACH_XDP",
    "KINDS",
    "KPR_PROG_PREFIXES",
    "LINKS_DIR",
    "Hook",
    "LinkInfo",
    "LinkUnsupported",
    "detach_link_id",
    "enabled",
    "ensure",
    "link_info",
    "links_of_progs",
    "pinned",
    "prog_name",
    "prog_tag",
    "query",
    "release",
    "run_in_netns",
    "sweep",
]

LINKS_DIR = "links"  # under bpf.pinPath: links/<plugin>/<target>/<hook>
KINDS = ("cgroup", "tcx", "xdp")
ENV = "KPR_BPF_LINKS"  # "off", or the kinds to attach without links ("cgroup,xdp")
CLONE_NEWNET = 0x40000000

# Names of kpr's programs start with one of these (socklb's sklb*, the NodePort programs'
# kpr_*); `kpr cleanup` removes such programs, and only such, from hooks kpr recorded.
KPR_PROG_PREFIXES = ("kpr_", "sklb")

# enum bpf_attach_type (uapi bpf.h) values the core needs beyond bcc's BPFAttachType (which
# stops at 6.1's list): bcc's numbers are the kernel's for the cgroup hooks.
ATTACH_XDP = 37
ATTACH_TCX_INGRESS, ATTACH_TCX_EGRESS = 46, 47
# The cgroup hooks' values by bcc's names (kernel ABI, equal to bcc's BPFAttachType: a test
# compares them), so an agent that adopts its pinned links names its hooks without importing
# bcc (kpr.bpf.loader.attach_type_value): that import maps libbcc, 63 MB of RSS.
CGROUP_ATTACH_TYPES = {
    "CGROUP_INET_INGRESS": 0, "CGROUP_INET_EGRESS": 1, "CGROUP_INET_SOCK_CREATE": 2, "CGROUP_SOCK_OPS": 3,
    "CGROUP_DEVICE": 6, "CGROUP_INET4_BIND": 8, "CGROUP_INET6_BIND": 9, "CGROUP_INET4_CONNECT": 10,
    "CGROUP_INET6_CONNECT": 11, "CGROUP_INET4_POST_BIND": 12, "CGROUP_INET6_POST_BIND": 13,
    "CGROUP_UDP4_SENDMSG": 14, "CGROUP_UDP6_SENDMSG": 15, "CGROUP_SYSCTL": 18, "CGROUP_UDP4_RECVMSG": 19,
    "CGROUP_UDP6_RECVMSG": 20, "CGROUP_GETSOCKOPT": 21, "CGROUP_SETSOCKOPT": 22, "CGROUP_INET4_GETPEERNAME": 29,
    "CGROUP_INET6_GETPEERNAME": 30, "CGROUP_INET4_GETSOCKNAME": 31, "CGROUP_INET6_GETSOCKNAME": 32,
    "CGROUP_INET_SOCK_RELEASE": 34,
}
# enum bpf_link_type.
LINK_TYPE = {"cgroup": 3, "xdp": 6, "tcx": 11}
# Errors meaning "this kernel has no link for this hook".
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, 524, errno.EPROTO)


class LinkUnsupported(OSError):
    """The kernel refused a link for this kind of hook; attach the old way instead."""


# ---------------------------------------------------------------------- libbpf


class _LinkCreateOpts(ctypes.Structure):
    # struct bpf_link_create_opts (libbpf 1.1): sz, flags, then fields kpr leaves zero.
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 52)]


class _LinkInfo(ctypes.Structure):
    # struct bpf_link_info (uapi): type, id, prog_id, then a union at offset 16 read as words.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("u", ctypes.c_uint32 * 16)]


_c_int, _c_u32, _vp, _cp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_char_p
_SIGNATURES = {
    "bpf_link_create": [_c_int, _c_int, _c_u32, ctypes.POINTER(_LinkCreateOpts)],
    "bpf_link_update": [_c_int, _c_int, _vp],
    "bpf_link_detach": [_c_int],
    "bpf_link_get_fd_by_id": [_c_u32],
    "bpf_link_get_next_id": [_c_u32, ctypes.POINTER(_c_u32)],
    "bpf_prog_get_next_id": [_c_u32, ctypes.POINTER(_c_u32)],
}
_sig_lock = threading.Lock()
_sig_done = False


def _lib() -> ctypes.CDLL:
    global _sig_done
    lib = M.libbpf()
    if not _sig_done:
        with _sig_lock:
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = ctypes.c_int
            _sig_done = True
    return lib


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says of a link: its kind, program and target."""

    id: int
    type: int
    prog_id: int
    cgroup_id: int = 0  # cgroup links (0: the cgroup is gone, the link is defunct)
    ifindex: int = 0  # tcx and xdp links (0: the device is gone)
    attach_type: int = -1

    @property
    def kind(self) -> str:
        return next((k for k, v in LINK_TYPE.items() if v == self.type), f"type{self.type}")

    @property
    def defunct(self) -> bool:
        return (self.kind == "cgroup" and not self.cgroup_id) or (self.kind in ("tcx", "xdp") and not self.ifindex)


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    M.check_rc(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd (link)")
    u = list(info.u)
    if info.type == LINK_TYPE["cgroup"]:
        return LinkInfo(info.id, info.type, info.prog_id, cgroup_id=u[0] | (u[1] << 32), attach_type=u[2])
    if info.type == LINK_TYPE["tcx"]:
        return LinkInfo(info.id, info.type, info.prog_id, ifindex=u[0], attach_type=u[1])
    if info.type == LINK_TYPE["xdp"]:
        return LinkInfo(info.id, info.type, info.prog_id, ifindex=u[0], attach_type=ATTACH_XDP)
    return LinkInfo(info.id, info.type, info.prog_id)


def _ids(getter: Callable[..., int]) -> Iterator[int]:
    cur = ctypes.c_uint32(0)
    while True:
        nxt = ctypes.c_uint32(0)
        if getter(cur.value, ctypes.byref(nxt)) < 0:
            return
        yield nxt.value
        cur = nxt


def links_of_progs() -> dict[int, list[LinkInfo]]:
    """Every link in the system, by the id of the program it holds."""
    lib = _lib()
    out: dict[int, list[LinkInfo]] = {}
    for lid in _ids(lib.bpf_link_get_next_id):
        fd = lib.bpf_link_get_fd_by_id(lid)
        if fd < 0:
            continue  # gone meanwhile
        try:
            li = link_info(fd)
        except OSError:
            continue
        finally:
            os.close(fd)
        out.setdefault(li.prog_id, []).append(li)
    return out


def prog_name(prog_id: int) -> str | None:
    """The program's name (15 characters at most), None when it is gone."""
    fd = _lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return M.prog_info(fd).name.decode(errors="replace")
    finally:
        os.close(fd)


def prog_tag(prog_id: int) -> bytes | None:
    """The program's tag (a hash of its instructions: a changed build has another), None when gone."""
    fd = _lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return bytes(M.prog_info(fd).tag)
    finally:
        os.close(fd)


def query(target: int, attach_type: int) -> list[int]:
    """Ids of the programs at one hook: `target` is a cgroup fd, or an ifindex (tcx) in the
    calling thread's network namespace. Attached with or without links alike."""
    ids = (ctypes.c_uint32 * 256)()
    cnt = ctypes.c_uint32(256)
    flags = ctypes.c_uint32(0)
    rc = _lib().bpf_prog_query(target, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt))
    if rc < 0:
        if -rc in (errno.ENOENT,):
            return []
        raise OSError(-rc, f"bpf_prog_query (attach type {attach_type}): {os.strerror(-rc)}")
    return list(ids)[: cnt.value]


def detach_link_id(link_id: int) -> bool:
    """BPF_LINK_DETACH by id: the program leaves its hook even while something holds the link."""
    lib = _lib()
    fd = lib.bpf_link_get_fd_by_id(link_id)
    if fd < 0:
        return False
    try:
        M.check_rc(lib.bpf_link_detach(fd), f"bpf_link_detach id {link_id}")
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- policy


def enabled(kind: str) -> bool:
    """Whether `kind` is attached through links (KPR_BPF_LINKS can turn that off)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("off", "0", "no", "false", "none"):
        return False
    return kind not in {k.strip() for k in v.split(",") if k.strip()}


def run_in_netns(netns: str | int, fn: Callable[[], T]) -> T:
    """fn() in a network namespace, on a thread of its own that enters it (the caller's
    namespace stays as it is): `netns` is a path ("" for the caller's own) or an open fd."""
    if netns == "":
        return fn()
    out: dict[str, Any] = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = netns if isinstance(netns, int) else os.open(netns, os.O_RDONLY)
        except OSError as exc:
            out["exc"] = exc
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                out["exc"] = OSError(err, f"setns into network namespace {netns}: {os.strerror(err)}")
                return
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller
            out["exc"] = exc
        finally:
            if not isinstance(netns, int):
                os.close(fd)

    t = threading.Thread(target=target, name="kpr-netns")
    t.start()
    t.join()
    if "exc" in out:
        raise out["exc"]
    return out["value"]


# ---------------------------------------------------------------------- pinned links


@dataclass(frozen=True)
class Hook:
    """Where a link goes: kind, target (a cgroup fd, or an ifindex in the caller's namespace)
    and attach type; `expect` is the target as link info reports it (cgroup id or ifindex)."""

    kind: str
    target: int
    attach_type: int
    expect: int
    flags: int = 0  # XDP mode flags

    @classmethod
    def cgroup(cls, cg_fd: int, attach_type: int) -> "Hook":
        return cls("cgroup", cg_fd, attach_type, os.fstat(cg_fd).st_ino)

    @classmethod
    def tcx(cls, ifindex: int, direction: str) -> "Hook":
        at = {"ingress": ATTACH_TCX_INGRESS, "egress": ATTACH_TCX_EGRESS}[direction]
        return cls("tcx", ifindex, at, ifindex)

    @classmethod
    def xdp(cls, ifindex: int, flags: int) -> "Hook":
        return cls("xdp", ifindex, ATTACH_XDP, ifindex, flags)

    def matches(self, li: LinkInfo) -> bool:
        if li.type != LINK_TYPE[self.kind] or li.defunct:
            return False
        if self.kind == "cgroup":
            return li.cgroup_id == self.expect and li.attach_type == self.attach_type
        if self.kind == "tcx":
            return li.ifindex == self.expect and li.attach_type == self.attach_type
        return li.ifindex == self.expect


def device_pin_name(ifname: str) -> str:
    """A device's name as a bpffs path component (links/<plugin>/<device>/): bpffs refuses
    names with a dot (EPERM), and flannel.1 or eth0.100 have one. Reversible ("%" escaped too);
    names without either are unchanged, so earlier pins stay where they were."""
    return ifname.replace("%", "%25").replace(".", "%2E")


def _open(pin: Path) -> int | None:
    fd = _lib().bpf_obj_get(str(pin).encode())
    if fd < 0:
        if -fd == errno.ENOENT:
            return None
        raise OSError(-fd, f"bpf_obj_get {pin}: {os.strerror(-fd)}")
    return fd


def _drop(fd: int, pin: Path) -> None:
    """Detach the link behind fd and remove its pin."""
    rc = _lib().bpf_link_detach(fd)
    if rc < 0 and -rc not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
        log.warning("event=link_detach_failed pin=%s error=%s", pin, os.strerror(-rc))
    with contextlib.suppress(FileNotFoundError):
        pin.unlink()


def ensure(pin: Path, prog_fd: int, hook: Hook) -> tuple[int, str, LinkInfo]:
    """Make the link pinned at `pin` run `prog_fd` at `hook`; returns (link fd, action, info).

    action: "adopted" (the pinned link already ran this program), "updated" (the pinned link
    was switched to it, atomically), "created" (no usable link was pinned). Raises
    LinkUnsupported when the kernel has no link for the hook.
    """
    lib = _lib()
    new_id = M.prog_info(prog_fd).id
    fd = _open(pin)
    if fd is not None:
        try:
            li = link_info(fd)
        except OSError:
            os.close(fd)
            raise
        if hook.matches(li):
            if li.prog_id == new_id:
                return fd, "adopted", li
            rc = lib.bpf_link_update(fd, prog_fd, None)
            if rc == 0:
                old = li.prog_id
                li = link_info(fd)
                log.info("event=link_updated pin=%s link_id=%d old_prog=%d new_prog=%d", pin, li.id, old, li.prog_id)
                return fd, "updated", li
            log.warning("event=link_update_failed pin=%s error=%s effect=replaced", pin, os.strerror(-rc))
        else:
            log.info("event=link_stale pin=%s link=%s effect=replaced", pin, li)
        _drop(fd, pin)
        os.close(fd)
    if not enabled(hook.kind):
        raise LinkUnsupported(errno.EOPNOTSUPP, f"{hook.kind} links turned off ({ENV})")
    opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=hook.flags)
    fd = lib.bpf_link_create(prog_fd, hook.target, hook.attach_type, ctypes.byref(opts))
    if fd < 0:
        err = -fd
        if err in _UNSUPPORTED:
            raise LinkUnsupported(err, f"{hook.kind} link (attach type {hook.attach_type}): {os.strerror(err)}")
        raise OSError(err, f"bpf_link_create {hook.kind} (attach type {hook.attach_type}): {os.strerror(err)}")
    try:
        pin.parent.mkdir(parents=True, exist_ok=True)
        M.check_rc(lib.bpf_obj_pin(fd, str(pin).encode()), f"bpf_obj_pin {pin}")
        li = link_info(fd)
    except BaseException:
        lib.bpf_link_detach(fd)
        os.close(fd)
        raise
    log.info("event=link_created pin=%s link_id=%d prog=%d kind=%s", pin, li.id, li.prog_id, hook.kind)
    return fd, "created", li


def pinned(directory: Path) -> dict[Path, LinkInfo]:
    """Links pinned anywhere below `directory`, with what the kernel says of each."""
    out: dict[Path, LinkInfo] = {}
    if not directory.is_dir():
        return out
    for root, _dirs, files in os.walk(directory):
        for name in files:
            p = Path(root) / name
            try:
                fd = _open(p)
            except OSError:
                continue
            if fd is None:
                continue
            try:
                out[p] = link_info(fd)
            except OSError:
                continue
            finally:
                os.close(fd)
    return out


def release(pin: Path) -> bool:
    """Detach the link pinned at `pin` and unpin it; False when nothing was pinned there."""
    fd = _open(pin)
    if fd is None:
        return False
    try:
        _drop(fd, pin)
    finally:
        os.close(fd)
    log.info("event=link_released pin=%s", pin)
    return True


def sweep(directory: Path, keep: Callable[[Path, LinkInfo], bool]) -> list[str]:
    """Detach and unpin every link below `directory` that `keep(pin, info)` refuses; then
    remove directories left empty. Returns one line per link removed."""
    done = []
    for p, li in sorted(pinned(directory).items()):
        if keep(p, li):
            continue
        release(p)
        done.append(f"detached {li.kind} link {li.id} (prog id {li.prog_id}) pinned at {p}")
    if directory.is_dir():
        for root, dirs, _files in os.walk(directory, topdown=False):
            for d in dirs:
                with contextlib.suppress(OSError):
                    (Path(root) / d).rmdir()
    return done
