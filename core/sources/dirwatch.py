"""Wake the files source when its directory changes: inotify, or plain polling where inotify
cannot see every change.

inotify reports only what this kernel sees: on a network filesystem (NFS, CIFS, FUSE, 9p,
Ceph, ...) a change made by another machine produces no event, so there the watcher refuses
to start and the source polls as before. `DirWatcher.wait()` returns as soon as a change that
can be read in full happened (a file closed after writing, renamed into the directory,
removed, a symlink swapped as a ConfigMap volume does) and keeps reading for a few
milliseconds more, so a burst (`kubectl`-style rewrites of many files, a `git checkout`)
becomes one pass. A file still open for writing is never a reason to scan; `busy()` names
such files so the pass leaves their last good state alone until they are closed.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Filesystems whose changes can come from elsewhere, unseen by this kernel's inotify.
REMOTE_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre", "gpfs", "ocfs2",
     "gfs2", "virtiofs", "davfs", "sshfs"}
)
# After the first event, further events within this long extend the pass's wait (a burst).
COALESCE_MS = 5
# ...but the pass never waits longer than this for a burst to end.
COALESCE_MAX_S = 0.05
# A name that was written to but never closed (a hard link, a writer holding the file
# open) stops counting as being written after this long.
BUSY_EXPIRY_S = 10.0


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path`, from /proc/self/mountinfo ("" if unknown)."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mnt = fields[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, right.split()[0] if right.split() else ""
    return kind


def _remote(kind: str) -> bool:
    return kind in REMOTE_FS or kind.startswith("fuse")


class WatchUnavailable(OSError):
    """inotify cannot be used for this directory; the message says why."""


class DirWatcher:
    """inotify on one directory (not its subdirectories: the source reads only its own files)."""

    def __init__(self, path: Path, ignored: Callable[[str], bool] = lambda name: False):
        self.path = Path(path)
        # Names the source never reads (editor swap files, a tool's temporary file before
        # its rename): their events wake nothing.
        self._ignored = ignored
        try:
            from inotify_simple import INotify, flags
        except ImportError as e:  # pragma: no cover - a dependency in pyproject.toml
            raise WatchUnavailable(errno.ENOSYS, f"inotify_simple is not installed ({e})") from None
        kind = fs_type(self.path)
        if _remote(kind):
            raise WatchUnavailable(errno.EOPNOTSUPP, f"{kind} filesystem: changes made elsewhere raise no inotify event")
        self._flags = flags
        # Completed writes, renames and removals; IN_CREATE and IN_MODIFY only to learn which
        # files are being written (a scan must not read them yet).
        self._mask = (
            flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.CREATE | flags.ATTRIB
            | flags.MODIFY | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR
        )
        self._inotify = INotify()
        try:
            self._inotify.add_watch(str(self.path), self._mask)
        except OSError as e:
            self._inotify.close()
            raise WatchUnavailable(e.errno or errno.EIO, f"inotify_add_watch: {e.strerror or e}") from None
        # stop() writes here to end a wait at once.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._busy: dict[str, float] = {}
        self.gone = False  # the directory itself was removed or moved: watch again
        self.events = 0

    def close(self) -> None:
        self._inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def interrupt(self) -> None:
        """End the current (or next) wait at once: for stopping, or for a pass now."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def busy(self) -> set[str]:
        """Names written to and not yet closed."""
        now = time.monotonic()
        for name, since in list(self._busy.items()):
            if now - since > BUSY_EXPIRY_S:
                del self._busy[name]
                log.info("files.watch_busy_expired file=%s after=%.0fs", name, now - since)
        return set(self._busy)

    def wait(self, timeout: float) -> bool:
        """Block until a change worth a pass (True) or `timeout` seconds (False); a burst is
        read whole before returning."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self._inotify.fileno(), self._wake_r], [], [], left)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)  # drained: interrupt() may come again
                except OSError:
                    pass
                return False
            if ready and self._consume(self._inotify.read(timeout=0)):
                break
        end = time.monotonic() + COALESCE_MAX_S
        while time.monotonic() < end:
            more = self._inotify.read(timeout=COALESCE_MS)
            if not more:
                break
            self._consume(more)
        return True

    def _consume(self, events: list) -> bool:
        f = self._flags
        wake = False
        for ev in events:
            self.events += 1
            mask, name = ev.mask, ev.name
            if name and self._ignored(name):
                continue
            if mask & (f.DELETE_SELF | f.MOVE_SELF | f.IGNORED):
                self.gone = True
                wake = True
                continue
            if mask & f.Q_OVERFLOW:
                self._busy.clear()
                wake = True
                continue
            if mask & f.MODIFY:
                self._busy.setdefault(name, time.monotonic())
                continue
            if mask & f.CREATE:
                try:
                    regular = os.path.isfile(self.path / name) and not os.path.islink(self.path / name)
                except OSError:
                    regular = False
                if regular:
                    # Being written; IN_CLOSE_WRITE says when it is complete.
                    self._busy.setdefault(name, time.monotonic())
                    continue
                wake = True  # a symlink or directory appears whole
                continue
            if mask & (f.CLOSE_WRITE | f.DELETE | f.MOVED_FROM | f.MOVED_TO):
                self._busy.pop(name, None)
            wake = True
        return wake
