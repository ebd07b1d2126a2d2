"""`kpr cleanup`: detach what kpr attached and remove what it pinned, and nothing else.

Plugins record each attachment with `record_attachment()` as they make it. The registry is
a pinned BPF map, `kpr_attach`, under the pin dir: bpffs holds only pins, directories and
symlinks (no regular files), and keeping the registry next to the pins means it lives and
dies with them. Each record is a small JSON document:

  tc:     {"ifname", "ifindex", "direction": "ingress"|"egress", "netns": path or ""}
  xdp:    {"ifname", "ifindex", "netns"}
  cgroup: {"cgroup": path, "attach_type": bcc BPFAttachType name or number}

plus the program's name and, when known, its id.

Cleanup first detaches and unpins every BPF link pinned under `<pin>/links` (kpr.bpf.links:
how kpr attaches wherever the kernel allows). Then, at every hook the registry names (a
cgroup and attach type; a device's clsact filters, tcx hooks and XDP), it removes each
program whose name carries kpr's prefix (kpr.bpf.links.KPR_PROG_PREFIXES: kpr_*, socklb's
sklb*): those attached the old way, and orphans an older run left there (a killed agent's
second set, a link pinned somewhere else), through the link that holds them when there is
one. Another owner's program at the same hook is never touched, nor any hook kpr did not
record. It then looks again and fails (CleanupError, `kpr cleanup` exits non-zero) when a
program it should have removed is still attached. A netns is identified by path and inode: a
recreated namespace at the same path is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import links as L
from . import maps as M

log = logging.getLogger(__name__)

__all__ = [
    "CleanupError",
    "attachments",
    "cleanup",
    "forget_attachment",
    "record_attachment",
    "scratch_bpffs",
    "scratch_pin_dir",
]

REGISTRY = "kpr_attach"  # pin name of the attachment registry map
RECORD_SIZE = 1024  # bytes per JSON record (value size of kpr_attach)
REGISTRY_MAX = 1024  # records; plenty for devices x directions x hooks
KINDS = ("tc", "xdp", "cgroup")
_REGISTRY_SPEC = M.MapSpec(REGISTRY, M.BPF_MAP_TYPE_HASH, 4, RECORD_SIZE, REGISTRY_MAX)

_TC_PARENTS = {"ingress": "ingress", "egress": "egress"}
_XDP_MODES = {1: "xdpdrv", 2: "xdpgeneric", 3: "xdpoffload"}


class CleanupError(RuntimeError):
    """Some things could not be removed; `removed` lists what was, `errors` what was not."""

    def __init__(self, removed: list[str], errors: list[str]) -> None:
        self.removed = removed
        self.errors = errors
        super().__init__("cleanup incomplete:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------- registry


def _open_registry(pin_path: Path, create: bool) -> M.BpfMap | None:
    path = Path(pin_path) / REGISTRY
    if path.exists():
        m = M.BpfMap.open_pinned(path)
        M.check_compatible(m, _REGISTRY_SPEC, path)
        return m
    if not create:
        return None
    Path(pin_path).mkdir(parents=True, exist_ok=True)
    m = M.BpfMap.create(_REGISTRY_SPEC)
    try:
        m.pin(path)
    except FileExistsError:  # another process created it first
        m.close()
        return _open_registry(pin_path, create=False)
    return m


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino if path else 0


def _normalise(kind: str, target: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"attachment kind must be one of {KINDS}, got {kind!r}")
    t = dict(target)
    if kind in ("tc", "xdp"):
        if not t.get("ifname"):
            raise ValueError(f"{kind} attachment needs target ifname")
        t.setdefault("ifindex", 0)
        t["netns"] = str(t.get("netns") or "")
        if kind == "tc":
            if t.get("direction") not in _TC_PARENTS:
                raise ValueError("tc attachment needs direction ingress or egress")
    else:
        if not t.get("cgroup"):
            raise ValueError("cgroup attachment needs target cgroup (a cgroup v2 directory)")
        t["cgroup"] = str(t["cgroup"])
        at = t.get("attach_type")
        if isinstance(at, str):
            from .loader import attach_type_value

            t["attach_type_name"] = at
            t["attach_type"] = attach_type_value(at)
        elif not isinstance(at, int):
            raise ValueError("cgroup attachment needs attach_type (BPFAttachType name or number)")
    return t


def _identity(rec: Mapping[str, Any]) -> tuple:
    t = rec["target"]
    if rec["kind"] == "cgroup":
        where: tuple = (t["cgroup"], t["attach_type"])
    else:
        where = (t["netns"], t["ifname"], t.get("direction", ""))
    return (rec["kind"], where, rec["prog_name"])


def record_attachment(
    pin_path: Path | str, kind: str, target: Mapping[str, Any], prog_name: str, *, prog_id: int = 0
) -> int:
    """Remember that kpr attached `prog_name` (id `prog_id`) at `target`; returns the record id.

    Recording the same hook and program name again replaces the old record (a restarted
    agent re-attaches with a new program id).
    """
    t = _normalise(kind, target)
    rec: dict[str, Any] = {"kind": kind, "target": t, "prog_name": prog_name, "prog_id": int(prog_id)}
    if kind in ("tc", "xdp") and t["netns"]:
        rec["netns_inode"] = _netns_inode(t["netns"])
    raw = json.dumps(rec, separators=(",", ":"), sort_keys=True).encode()
    if len(raw) >= RECORD_SIZE:
        raise ValueError(f"attachment record longer than {RECORD_SIZE} bytes")
    m = _open_registry(Path(pin_path), create=True)
    assert m is not None
    with m:
        existing = _read(m)
        ident = _identity(rec)
        rid = next((i for i, r in existing.items() if _identity(r) == ident), None)
        if rid is None:
            rid = max(existing, default=0) + 1
        m.update(M.U32.pack(rid), raw.ljust(RECORD_SIZE, b"\x00"))
    log.info("event=attachment_recorded id=%d kind=%s prog=%s target=%s", rid, kind, prog_name, t)
    return rid


def forget_attachment(pin_path: Path | str, record_id: int) -> None:
    """Drop a record (the plugin detached the program itself)."""
    m = _open_registry(Path(pin_path), create=False)
    if m is not None:
        with m:
            m.delete(M.U32.pack(record_id))


def _read(m: M.BpfMap) -> dict[int, dict[str, Any]]:
    out = {}
    for k, v in m.items():
        try:
            out[M.U32.unpack(k)[0]] = json.loads(v.rstrip(b"\x00"))
        except ValueError:
            log.warning("event=attachment_record_unreadable key=%s", k.hex())
    return out


def attachments(pin_path: Path | str) -> list[dict[str, Any]]:
    """Every recorded attachment, each with its record "id"."""
    m = _open_registry(Path(pin_path), create=False)
    if m is None:
        return []
    with m:
        return [dict(r, id=i) for i, r in sorted(_read(m).items())]


# ---------------------------------------------------------------------- detaching


def _in_netns(netns: str, argv: list[str]) -> list[str]:
    return (["nsenter", f"--net={netns}"] if netns else []) + argv


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    log.debug("event=cmd argv=%s", argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _where(t: Mapping[str, Any]) -> str:
    return f"{t['ifname']}" + (f" (netns {t['netns']})" if t["netns"] else "")


def _netns_gone(rec: Mapping[str, Any]) -> str | None:
    """Why the record's netns is not the one it was recorded in, or None when it is."""
    netns = rec["target"]["netns"]
    if not netns:
        return None
    try:
        ino = _netns_inode(netns)
    except OSError:
        return f"netns {netns} is gone"
    if rec.get("netns_inode") and ino != rec["netns_inode"]:
        return f"netns {netns} is a different namespace now"
    return None


def _ours(name: str | None) -> bool:
    return bool(name) and str(name).startswith(L.KPR_PROG_PREFIXES)


def _via_links(prog_id: int, kind: str, held: dict[int, list[L.LinkInfo]] | None = None) -> list[L.LinkInfo]:
    held = L.links_of_progs() if held is None else held
    return [li for li in held.get(prog_id, []) if li.kind == kind]


def _tcx(rec: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Detach kpr's tcx programs at the recorded device and direction; (done, still attached)."""
    import socket

    t = rec["target"]
    at = L.ATTACH_TCX_INGRESS if t["direction"] == "ingress" else L.ATTACH_TCX_EGRESS

    def ids() -> list[tuple[int, str]]:
        try:
            idx = socket.if_nametoindex(t["ifname"])
        except OSError:
            return []
        try:
            return [(pid, L.prog_name(pid) or "") for pid in L.query(idx, at)]
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no tcx on this kernel
                return []
            raise

    done = []
    held = None
    for pid, name in L.run_in_netns(t["netns"], ids):
        if not _ours(name):
            continue
        held = L.links_of_progs() if held is None else held
        for li in _via_links(pid, "tcx", held):
            if L.detach_link_id(li.id):
                done.append(f"detached tcx {t['direction']} {name} (prog id {pid}, link {li.id}) from {_where(t)}")
    left = [f"tcx {t['direction']} {name} (prog id {pid}) on {_where(t)}" for pid, name in L.run_in_netns(t["netns"], ids)
            if _ours(name)]
    return done, left


def _detach_tc(rec: Mapping[str, Any]) -> list[str]:
    t = rec["target"]
    gone = _netns_gone(rec)
    if gone:
        return [f"skipped tc {t['direction']} {rec['prog_name']} on {t['ifname']}: {gone}"]
    res = _run(_in_netns(t["netns"], ["tc", "-j", "filter", "show", "dev", t["ifname"], t["direction"]]))
    if res.returncode != 0:
        if "Cannot find device" in res.stderr:
            return [f"skipped tc {t['direction']} {rec['prog_name']} on {_where(t)}: device is gone"]
        raise OSError(f"tc filter show dev {t['ifname']} {t['direction']}: {res.stderr.strip()}")
    done = []
    for f in json.loads(res.stdout or "[]"):
        opts = f.get("options") or {}
        if f.get("kind") != "bpf" or "handle" not in opts:
            continue
        prog = opts.get("prog") or {}
        ours = _ours(opts.get("bpf_name")) or (rec.get("prog_id") and prog.get("id") == rec["prog_id"])
        if not ours:
            continue
        argv = ["tc", "filter", "del", "dev", t["ifname"], t["direction"], "protocol", f.get("protocol", "all"),
                "pref", str(f["pref"]), "handle", str(opts["handle"]), "bpf"]
        dres = _run(_in_netns(t["netns"], argv))
        if dres.returncode != 0:
            raise OSError(f"{' '.join(argv)}: {dres.stderr.strip()}")
        done.append(f"detached tc {t['direction']} filter {opts.get('bpf_name', '?')} (prog id {prog.get('id', '?')}) "
                    f"from {_where(t)}")
    tcx_done, left = _tcx(rec)
    done += tcx_done
    res = _run(_in_netns(t["netns"], ["tc", "-j", "filter", "show", "dev", t["ifname"], t["direction"]]))
    if res.returncode == 0:
        for f in json.loads(res.stdout or "[]"):
            opts = f.get("options") or {}
            if f.get("kind") == "bpf" and "handle" in opts and _ours(opts.get("bpf_name")):
                left.append(f"tc {t['direction']} filter {opts.get('bpf_name')} on {_where(t)}")
    if left:
        raise OSError(errno.EBUSY, "still attached: " + ", ".join(left))
    return done


def _detach_xdp(rec: Mapping[str, Any]) -> list[str]:
    t = rec["target"]
    gone = _netns_gone(rec)
    if gone:
        return [f"skipped xdp {rec['prog_name']} on {t['ifname']}: {gone}"]
    res = _run(_in_netns(t["netns"], ["ip", "-j", "-d", "link", "show", "dev", t["ifname"]]))
    if res.returncode != 0:
        if "does not exist" in res.stderr or "Cannot find device" in res.stderr:
            return [f"skipped xdp {rec['prog_name']} on {_where(t)}: device is gone"]
        raise OSError(f"ip link show {t['ifname']}: {res.stderr.strip()}")
    def progs() -> list[dict[str, Any]]:
        res = _run(_in_netns(t["netns"], ["ip", "-j", "-d", "link", "show", "dev", t["ifname"]]))
        links = json.loads(res.stdout or "[]") if res.returncode == 0 else []
        xdp = (links[0] if links else {}).get("xdp") or {}
        return [a for a in (xdp.get("attached") or ([xdp] if xdp.get("prog") else []))]

    done = []
    for att in progs():
        prog = att.get("prog") or {}
        ours = (rec.get("prog_id") and prog.get("id") == rec["prog_id"]) or _ours(prog.get("name"))
        mode = _XDP_MODES.get(att.get("mode"))
        if not ours or mode is None:
            continue
        via = _via_links(int(prog.get("id", 0)), "xdp")
        if via:
            for li in via:
                L.detach_link_id(li.id)
            done.append(f"detached xdp {prog.get('name')} (prog id {prog.get('id')}, {mode}, link "
                        f"{','.join(str(li.id) for li in via)}) from {_where(t)}")
            continue
        argv = ["ip", "link", "set", "dev", t["ifname"], mode, "off"]
        dres = _run(_in_netns(t["netns"], argv))
        if dres.returncode != 0:
            raise OSError(f"{' '.join(argv)}: {dres.stderr.strip()}")
        done.append(f"detached xdp {prog.get('name')} (prog id {prog.get('id')}, {mode}) from {_where(t)}")
    left = [f"xdp {(a.get('prog') or {}).get('name')} on {_where(t)}" for a in progs()
            if _ours((a.get("prog") or {}).get("name"))]
    if left:
        raise OSError(errno.EBUSY, "still attached: " + ", ".join(left))
    return done


def _detach_cgroup(rec: Mapping[str, Any]) -> list[str]:
    t = rec["target"]
    lib = M.libbpf()
    try:
        cg_fd = os.open(t["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return [f"skipped cgroup {rec['prog_name']} on {t['cgroup']}: cgroup is gone"]
    done = []
    at = t.get("attach_type_name", t["attach_type"])
    held = None
    try:
        for pid in L.query(cg_fd, t["attach_type"]):
            try:
                pfd = M.check_rc(lib.bpf_prog_get_fd_by_id(pid), f"bpf_prog_get_fd_by_id {pid}")
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise
            try:
                name = M.prog_info(pfd).name.decode()
                # kpr's name at a hook kpr recorded: the recorded program, or an orphan of an
                # older run (a killed agent's second set)
                if not (pid == rec.get("prog_id") or _ours(name)):
                    continue
                held = L.links_of_progs() if held is None else held
                via = _via_links(pid, "cgroup", held)
                if via:
                    for li in via:
                        L.detach_link_id(li.id)
                    how = f"link {','.join(str(li.id) for li in via)}"
                else:
                    rc = lib.bpf_prog_detach2(pfd, cg_fd, t["attach_type"])
                    if rc < 0 and -rc == errno.ENOENT:
                        continue  # detached meanwhile
                    M.check_rc(rc, f"bpf_prog_detach2 {name}")
                    how = "attach"
                done.append(f"detached cgroup {at} program {name} (prog id {pid}, {how}) from {t['cgroup']}")
            finally:
                os.close(pfd)
        left = [f"cgroup {at} {L.prog_name(pid)} (prog id {pid}) on {t['cgroup']}"
                for pid in L.query(cg_fd, t["attach_type"]) if pid == rec.get("prog_id") or _ours(L.prog_name(pid))]
    finally:
        os.close(cg_fd)
    if left:
        raise OSError(errno.EBUSY, "still attached: " + ", ".join(left))
    return done


_DETACH = {"tc": _detach_tc, "xdp": _detach_xdp, "cgroup": _detach_cgroup}


# ---------------------------------------------------------------------- cleanup


def _refuse_unsafe(pin_path: Path) -> None:
    from .fs import find_mounts

    mounts = find_mounts("bpf")
    real = pin_path.resolve()
    if real in mounts:
        raise ValueError(f"refusing to clean {pin_path}: it is a bpffs mount point, not kpr's own directory")
    if not any(m in real.parents for m in mounts):
        raise ValueError(f"refusing to clean {pin_path}: not inside a bpffs")


def cleanup(pin_path: Path | str) -> list[str]:
    """Detach every recorded attachment, then remove every pin under pin_path and the directory.

    Returns one line per thing removed (or skipped, with the reason). Raises CleanupError,
    after doing everything it could, when something could not be removed.
    """
    pin_path = Path(pin_path)
    if not pin_path.exists():
        return []
    _refuse_unsafe(pin_path)
    removed: list[str] = []
    errors: list[str] = []
    try:
        removed.extend(L.sweep(pin_path / L.LINKS_DIR, lambda _p, _li: False))
    except OSError as exc:
        errors.append(f"links under {pin_path / L.LINKS_DIR}: {exc}")
    seen: set[tuple] = set()
    for rec in attachments(pin_path):
        hook = _identity(rec)[:2]
        if hook in seen:  # one pass per hook removes every kpr program there
            continue
        seen.add(hook)
        try:
            removed.extend(_DETACH[rec["kind"]](rec))
        except (OSError, KeyError, ValueError, subprocess.SubprocessError) as exc:
            errors.append(f"{rec.get('kind')} {rec.get('prog_name')} at {rec.get('target')}: {exc}")
    if errors:
        # Keep the registry (and the pins) so a second run can finish the job.
        raise CleanupError(removed, errors)
    for root, dirs, files in os.walk(pin_path, topdown=False):
        for name in files:
            p = Path(root) / name
            try:
                p.unlink()
                removed.append(f"removed pin {p}")
            except OSError as exc:
                errors.append(f"unlink {p}: {exc.strerror}")
        for name in dirs:
            p = Path(root) / name
            try:
                if p.is_symlink():  # os.walk lists links to directories here; they are not ours to follow
                    p.unlink()
                    removed.append(f"removed symlink {p}")
                    continue
                p.rmdir()
                removed.append(f"removed directory {p}")
            except OSError as exc:
                errors.append(f"rmdir {p}: {exc.strerror}")
    try:
        pin_path.rmdir()
        removed.append(f"removed directory {pin_path}")
    except OSError as exc:
        errors.append(f"rmdir {pin_path}: {exc.strerror}")
    for line in removed:
        log.info("event=cleanup_removed what=%r", line)
    if errors:
        raise CleanupError(removed, errors)
    return removed


# umount2 flag: detach the mount now; the kernel frees it when the last holder lets go.
MNT_DETACH = 2


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT blocked inside the block, delivered at its end: a handler that raises
    (the benchmarks' exit_on_sigterm, Ctrl-C) cannot land between a mount and the code that
    undoes it, nor inside the undoing."""
    import signal

    held = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def scratch_bpffs(prefix: str = "kpr-test") -> Iterator[Path]:
    """A bpffs mounted on a fresh temporary directory (/tmp/<prefix>-bpffs-*), unmounted and the
    directory removed on exit however the block ends, by the creating process only.

    The unmount is lazy (MNT_DETACH): a plain one fails (EBUSY) while anything holds the mount,
    e.g. a process whose working directory or an open file is in it (a shell, a reader of the
    pins at that moment), and left the mount and its directory behind for good. Detached, it
    leaves the tree at once and the directory can go; the kernel frees the bpffs (and whatever
    was still pinned there) when its last holder lets go.
    """
    from .fs import _mount

    creator = os.getpid()
    mnt: Path | None = None
    try:
        with _signals_held():  # (nothing raised by a signal between the mount and `finally`)
            mnt = Path(tempfile.mkdtemp(prefix=f"{prefix}-bpffs-"))
            _mount("bpf", mnt, "bpf")
        yield mnt
    finally:
        # a forked child (pyroute2 does netns work in one) unwinding its copy of the stack
        # must not unmount its parent's live bpffs
        if mnt is not None and os.getpid() == creator:
            with _signals_held():
                _drop_scratch_bpffs(mnt)


def _drop_scratch_bpffs(mnt: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(str(mnt).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # (EINVAL: not mounted, the mount itself failed)
            log.error("event=scratch_bpffs_umount_failed path=%s errno=%d", mnt, err)
            return
    try:
        mnt.rmdir()
    except OSError as exc:
        log.error("event=scratch_bpffs_rmdir_failed path=%s error=%r", mnt, exc.strerror)


@contextlib.contextmanager
def scratch_pin_dir(prefix: str = "kpr-test") -> Iterator[Path]:
    """A fresh, unique pin dir for tests and benchmarks, cleaned up (detached, unpinned) on exit.

    It is made in /sys/fs/bpf when that is a bpffs (e.g. /sys/fs/bpf/kpr-test-1a2b3c4d);
    otherwise in a private bpffs (scratch_bpffs) unmounted afterwards, so nothing is left on
    the machine either way, even when the block ends by an error or a TERM. Concurrent runs
    never share a private mount.
    """
    from .fs import DEFAULT_BPFFS, find_mounts

    with contextlib.ExitStack() as stack:
        # Only the system's bpffs is shared: any other mount (another run's scratch mount, a
        # demo's) may be unmounted by its owner while we use it.
        if DEFAULT_BPFFS in find_mounts("bpf"):
            base = DEFAULT_BPFFS
        else:
            base = stack.enter_context(scratch_bpffs(prefix))
        pin = base / f"{prefix}-{secrets.token_hex(4)}"
        creator = os.getpid()
        try:
            yield pin
        finally:
            # Only the creating process cleans up: a forked child (pyroute2 does netns work in
            # one) unwinding its copy of the stack would detach and unpin its parent's live pins.
            # A TERM is held until it is done (a raise inside left pins in the system's bpffs).
            if os.getpid() == creator:
                with _signals_held():
                    cleanup(pin)
