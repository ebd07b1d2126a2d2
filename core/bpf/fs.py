"""bpffs and cgroup2 mounts, found or made the way Cilium does at start-up.

Pinned maps need a bpffs, socket-LB programs need a cgroup v2 hierarchy. Hosts with
cgroup v1 (or hybrid, as here: v2 at /sys/fs/cgroup/unified) and hosts that never
mounted bpffs are common, so we reuse what is mounted and mount only when nothing is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BPFFS = Path("/sys/fs/bpf")
DEFAULT_CGROUP2 = Path("/run/kpr/cgroupv2")
MOUNTS_FILE = Path("/proc/self/mounts")

__all__ = [
    "DEFAULT_BPFFS",
    "DEFAULT_CGROUP2",
    "Mount",
    "MountError",
    "ensure_bpffs",
    "ensure_cgroup2",
    "find_mounts",
    "mount_bpffs_for_pins",
    "mounts",
    "on_bpffs",
]


class MountError(OSError):
    pass


@dataclass(frozen=True)
class Mount:
    source: str
    target: Path
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal.
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts(mounts_file: Path = MOUNTS_FILE) -> list[Mount]:
    result: list[Mount] = []
    for line in mounts_file.read_text().splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        result.append(Mount(_unescape(parts[0]), Path(_unescape(parts[1])), parts[2], parts[3]))
    return result


def find_mounts(fstype: str, mounts_file: Path = MOUNTS_FILE) -> list[Path]:
    return [m.target for m in mounts(mounts_file) if m.fstype == fstype]


def _mount(source: str, target: Path, fstype: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    rc = libc.mount(source.encode(), str(target).encode(), fstype.encode(), ctypes.c_ulong(0), None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def _ensure(fstype: str, source: str, path: Path, reuse_existing: bool, mounts_file: Path) -> Path:
    path = Path(path)
    found = find_mounts(fstype, mounts_file)
    resolved = path.resolve() if path.exists() else path
    if resolved in found or path in found:
        return path
    if reuse_existing and found:
        log.debug("event=mount_reused fstype=%s mount=%s wanted=%s", fstype, found[0], path)
        return found[0]
    path.mkdir(parents=True, exist_ok=True)
    _mount(source, path, fstype)
    log.info("event=mounted fstype=%s mount=%s", fstype, path)
    return path


def ensure_bpffs(
    path: str | Path = DEFAULT_BPFFS, *, reuse_existing: bool = True, mounts_file: Path = MOUNTS_FILE
) -> Path:
    """Return a bpffs mount point, mounting one at `path` when none is mounted.

    With reuse_existing=False, `path` itself must be (or becomes) a bpffs.
    """
    return _ensure("bpf", "bpf", Path(path), reuse_existing, mounts_file)


def ensure_cgroup2(
    path: str | Path = DEFAULT_CGROUP2, *, reuse_existing: bool = True, mounts_file: Path = MOUNTS_FILE
) -> Path:
    """Return a cgroup v2 mount point, mounting the unified hierarchy at `path` when none is mounted."""
    return _ensure("cgroup2", "none", Path(path), reuse_existing, mounts_file)


def on_bpffs(path: str | Path, mounts_file: Path = MOUNTS_FILE) -> bool:
    """Whether `path` (its links resolved as far as it exists) is a bpffs mount or under one."""
    real = Path(os.path.realpath(path))
    return any(m == real or m in real.parents for m in find_mounts("bpf", mounts_file))


def mount_bpffs_for_pins(pin_path: str | Path) -> Path | None:
    """As Cilium does: with no bpffs under the pin path, mount one where it belongs; the mount
    point made, or None when the pin path is on a bpffs already.

    Pins under the standard /sys/fs/bpf get bpffs mounted there; any other pin path gets one
    mounted on its parent directory (which hides what that directory held: a pin directory
    that was a plain directory there is made anew inside the bpffs). The one rule, for the
    agent's setup (kpr.daemon: before any plugin, so the directory it locks is the one the
    pins go to) and the service map writer's start. Two processes at it at once take turns
    (an flock on the directory mounted on) and the second finds the first's mount: never a
    second bpffs stacked over the first, each process pinning into its own.
    """
    pin_path = Path(pin_path)
    target = Path(os.path.realpath(pin_path))
    if on_bpffs(target):
        return None
    where = DEFAULT_BPFFS if DEFAULT_BPFFS in target.parents else target.parent
    where.mkdir(parents=True, exist_ok=True)
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (the lock goes with the fd: closed below)
        if on_bpffs(target):
            return None
        ensure_bpffs(where, reuse_existing=False)
    finally:
        os.close(fd)
    log.info("event=bpffs_mounted_for_pins mount=%s pin_path=%s", where, pin_path)
    return where
