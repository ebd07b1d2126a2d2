"""Child cgroups (v2) for tests of cgroup BPF hooks (socket LB's connect/sendmsg hooks).

Programs are attached to a uniquely named child cgroup, never to the root, and test
clients are moved into it; the child is removed afterwards, killing anything left in it.

A socket takes its cgroup when it is created, so the command must join the cgroup
before it starts: we join first (the shell writes its own pid into cgroup.procs) and
only then exec into the network namespace. Joining after `ip netns exec` would not do:
it remounts /sys, and the cgroup2 mount is not there any more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kpr.testing.netns import CommandFailed, _partial_record, _tidy_owners_dir, _write_record, netns_path

log = logging.getLogger(__name__)

__all__ = [
    "CgroupUnavailable",
    "child_cgroup",
    "popen_in_cgroup",
    "remove_cgroup",
    "run_in_cgroup",
    "sweep_stale",
]

_JOIN = 'echo $$ > "$0" && exec "$@"'
# Which process made each child cgroup, so a later run can remove what a killed run left.
OWNERS_DIR = Path("/run/kpr-testing/cgroup")


class CgroupUnavailable(RuntimeError):
    pass


def _cgroup2_root() -> Path:
    from kpr.bpf.probes import cgroup2_mount

    root = cgroup2_mount()
    if root is None:
        raise CgroupUnavailable("no cgroup2 hierarchy mounted (kpr.bpf.fs.ensure_cgroup2() mounts one)")
    return root


def _procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _kill_all(path: Path) -> None:
    if not _procs(path):
        return
    kill_file = path / "cgroup.kill"
    if kill_file.exists():  # kernel >= 5.14: one write kills the whole cgroup
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
    else:
        for pid in _procs(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def remove_cgroup(path: Path, *, timeout: float = 5.0) -> None:
    """Kill what runs in the cgroup (and its children), then remove it. Missing is fine."""
    path = Path(path)
    if not path.is_dir():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_cgroup(child, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        # Killed again on every round: a command started just before (popen_in_cgroup's shell
        # joins a moment after it starts) may join after the first kill.
        _kill_all(path)
        try:
            path.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError as exc:
            # Killed tasks leave the cgroup a moment after cgroup.procs looks empty.
            if exc.errno != errno.EBUSY:
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} still busy after {timeout}s (processes: {_procs(path)})") from exc
            time.sleep(0.05)
    log.info("event=cgroup_removed path=%s", path)


@contextlib.contextmanager
def child_cgroup(prefix: str = "kpr-test", *, parent: Path | None = None) -> Iterator[Path]:
    """A fresh child cgroup under the cgroup2 root (or `parent`), removed on exit."""
    root = Path(parent) if parent is not None else _cgroup2_root()
    path = root / f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    if path.resolve().parent != root.resolve():
        raise ValueError(f"bad cgroup prefix {prefix!r}")
    path.mkdir()
    log.info("event=cgroup_created path=%s", path)
    owner = OWNERS_DIR / path.name
    creator = os.getpid()
    try:
        _write_record(OWNERS_DIR, path.name, f"{creator} {path}\n")
        yield path
    finally:
        if os.getpid() == creator:  # not a forked child unwinding: the cgroup would be its parent's
            remove_cgroup(path)
            owner.unlink(missing_ok=True)
            _tidy_owners_dir(OWNERS_DIR)


def sweep_stale() -> list[Path]:
    """Remove child cgroups whose creating process is dead (a killed test run)."""
    removed: list[Path] = []
    if not OWNERS_DIR.is_dir():
        return removed
    for rec in OWNERS_DIR.iterdir():
        if _partial_record(rec):
            continue
        try:
            pid_s, path_s = rec.read_text().split(maxsplit=1)
            pid, path = int(pid_s), Path(path_s.strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # creator still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if path.is_dir() and (path / "cgroup.procs").exists():
            remove_cgroup(path)
            removed.append(path)
        rec.unlink(missing_ok=True)
    _tidy_owners_dir(OWNERS_DIR)
    if removed:
        log.warning("event=stale_cgroups_removed paths=%s", ",".join(map(str, removed)))
    return removed


def _netns_argv(netns: Any) -> list[str]:
    if netns is None:
        return []
    name = getattr(netns, "netns", netns)  # a kpr.testing.netns.Namespace, a name, or a path
    name = os.fspath(name)
    if "/" in name:
        return ["nsenter", f"--net={name}", "--"]
    if not netns_path(name).exists():
        raise FileNotFoundError(f"network namespace {name!r} not found")
    return ["ip", "netns", "exec", name]


def _argv(cgroup: Path, cmd: str | Sequence[str], netns: Any) -> list[str]:
    procs = Path(cgroup) / "cgroup.procs"
    if not procs.exists():
        raise FileNotFoundError(f"{cgroup} is not a cgroup2 directory")
    inner = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    return ["sh", "-c", _JOIN, str(procs), *_netns_argv(netns), *inner]


def run_in_cgroup(
    cgroup: Path,
    cmd: str | Sequence[str],
    netns: Any = None,
    *,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run cmd inside the cgroup and (optionally) a network namespace; a string goes through sh -c."""
    argv = _argv(cgroup, cmd, netns)
    log.debug("event=cmd cgroup=%s argv=%s", cgroup, shlex.join(argv))
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise CommandFailed(res.returncode, argv, res.stdout, res.stderr)
    return res


def popen_in_cgroup(cgroup: Path, cmd: str | Sequence[str], netns: Any = None, **kw: Any) -> subprocess.Popen[Any]:
    """Start cmd in the cgroup (and namespace) in the background; child_cgroup's exit kills it."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(_argv(cgroup, cmd, netns), **kw)
