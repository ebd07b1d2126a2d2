"""One agent per bpf.pinPath: an exclusive flock on the pin directory while the agent owns it.

What an agent does under its pin path assumes no other agent works there: its service maps'
writer owns their content, and a pin named `kpr-child-<pid>-*` whose pid is no compile child of
this process is an earlier agent's, swept at the next load (kpr.bpf.progcache.sweep_handed). A
second agent on the same pin path would rewrite the first's maps and remove the pins the first's
compile child just handed over. So the agent takes an exclusive, non-blocking `flock` on the pin
directory itself (bpffs holds no regular file to lock; a directory's fd locks as well), held
for the life of the process (the lock goes with the process however it ends: no stale lock
after a kill), and a second agent is refused with the path and the holder's pid (from
/proc/locks; "pid unknown" when the holder is in another pid namespace, another container's
agent: /proc/locks leaves out, or shows as pid 0, the locks of processes this one cannot see).
The lock is the process's: any number of holds by one process are one. `kpr cleanup` takes the
same hold for its run (kpr.cli): it refuses a pin path a live agent holds (it would take the
agent's programs, maps and attachments from under it), and an agent starting meanwhile is
refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["PinPathBusy", "held", "hold", "holder_pids", "release"]

LOCKS_FILE = "/proc/locks"


class PinPathBusy(RuntimeError):
    """Another process (another agent) holds the pin path; the message names it and its pid."""

    def __init__(self, path: Path | str, pids: list[int]) -> None:
        # `holder`: who holds it, for a message of the caller's own (`kpr cleanup`'s refusal)
        self.holder = f"pid {', '.join(map(str, pids))}" if pids else "pid unknown"
        super().__init__(
            f"bpf.pinPath {path} is in use by another kpr agent ({self.holder}): one agent per pin path; "
            "stop that agent or give this one another bpf.pinPath"
        )
        self.path, self.pids = Path(path), pids


# Pin directories this process holds: path as given -> its fd (locked).
_held: dict[str, int] = {}
_lock = threading.Lock()


def hold(pin_path: Path | str) -> bool:
    """Take the exclusive flock on the pin directory `pin_path` for this process (once: later
    calls find it held). True when held; False when the directory is not there yet (nothing
    of anyone's in it: the caller holds it once made); PinPathBusy when another process holds
    it."""
    key = str(pin_path)
    try:
        fd = os.open(pin_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    with _lock:
        had = _held.get(key)
        if had is not None:
            if _same_live_dir(had, fd):
                os.close(fd)
                return True
            os.close(_held.pop(key))  # removed (kpr cleanup) and made again: lock the new one
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if any(_same_live_dir(h, fd) for h in _held.values()):
                os.close(fd)  # held already, under another name (a link to it)
                return True
            st = os.fstat(fd)
            os.close(fd)
            raise PinPathBusy(pin_path, holder_pids(st)) from None
        except BaseException:
            os.close(fd)
            raise
        _held[key] = fd
    log.info("event=pin_path_held path=%s pid=%d", pin_path, os.getpid())
    return True


def held(pin_path: Path | str) -> bool:
    """Whether this process holds the pin directory `pin_path` (the one there now)."""
    try:
        fd = os.open(pin_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with _lock:
            return any(_same_live_dir(h, fd) for h in _held.values())
    finally:
        os.close(fd)


def release(pin_path: Path | str | None = None) -> None:
    """Give up the hold on `pin_path` (every hold with None): the agent's stop."""
    with _lock:
        for key in [str(pin_path)] if pin_path is not None else list(_held):
            fd = _held.pop(key, None)
            if fd is not None:
                os.close(fd)  # (the flock goes with its only fd)


def holder_pids(st: os.stat_result, locks_file: str = LOCKS_FILE) -> list[int]:
    """The pids /proc/locks gives for the flocks on the file of `st` (empty when unreadable;
    a holder this pid namespace cannot see is left out, or shown as pid 0: not counted)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    try:
        with open(locks_file) as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 2115 00:30:868768 0 EOF"; a waiter's line has "->"
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want and parts[4].isdigit():
                    if int(parts[4]):
                        pids.append(int(parts[4]))
    except OSError:
        pass
    return pids


def _same_live_dir(held: int, fd: int) -> bool:
    a, b = os.fstat(held), os.fstat(fd)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink > 0
