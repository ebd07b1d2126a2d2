"""The benchmark lab (kpr.testing.nodeport_bench.ProgLab) leaves nothing behind when a build is
refused, also when the refusal ends the run by a TERM: no bpffs mount and no directory of its
scratch pin dir (kpr.bpf.cleanup.scratch_pin_dir, a private bpffs on /tmp/<prefix>-bpffs-*
where /sys/fs/bpf is none). Shown while a process holds the lab's bpffs (its working directory
in the pin dir, as a shell or a reader of the pins has at the moment the lab ends): a plain
unmount then failed (EBUSY) and the mount and its directory stayed for good."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kpr.bpf.fs import DEFAULT_BPFFS, find_mounts

pytestmark = pytest.mark.kernel

# compiles, and the verifier refuses: the benchmarks' stop point read through a null pointer
REFUSED = ["-DKPR_NP_BENCH_STOP=(*(volatile int *)0)"]


def _holder(pin: Path) -> subprocess.Popen:
    """A process whose working directory is the lab's pin dir (so its bpffs is busy) until killed."""
    return subprocess.Popen(["sleep", "600"], cwd=pin)


def _left(pin: Path) -> list[str]:
    """What of the lab's scratch pin dir remains: its directory, and its private mount's."""
    base = pin.parent
    out = [str(pin)] if pin.exists() else []
    if base != DEFAULT_BPFFS:
        out += [f"mount {base}"] if base in find_mounts("bpf") else []
        out += [str(base)] if base.exists() else []
    return out


def _undo(pin: Path) -> None:
    """A failing run's leftovers, this lab's only (the exact mount it made)."""
    base = pin.parent
    if base != DEFAULT_BPFFS and base in find_mounts("bpf"):
        ctypes.CDLL(None, use_errno=True).umount2(str(base).encode(), 2)  # MNT_DETACH
    if base != DEFAULT_BPFFS and base.exists():
        os.rmdir(base)


def test_a_refused_build_leaves_no_mount_and_no_directory(require_kernel: None) -> None:
    from kpr.bpf.loader import BPFError
    from kpr.testing.nodeport_bench import ProgLab

    lab = ProgLab(2)
    holder = None
    try:
        with pytest.raises(BPFError, match="verifier rejected"):
            with lab:
                holder = _holder(lab.pin)
                lab.load("xdp", "refused", REFUSED)
        assert not _left(lab.pin), _left(lab.pin)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        if hasattr(lab, "pin"):
            _undo(lab.pin)


CHILD = textwrap.dedent("""
    import sys
    from kpr.testing.nodeport_bench import ProgLab, exit_on_sigterm
    exit_on_sigterm()  # as the benchmarks do
    with ProgLab(2) as lab:
        print(lab.pin, flush=True)
        sys.stdin.readline()  # the test's holder is in place
        while True:  # refused every time, until the TERM
            try:
                lab.load("xdp", "refused", sys.argv[1:])
            except Exception:
                pass
""")


def test_a_term_during_refused_builds_leaves_no_mount_and_no_directory(require_kernel: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, *REFUSED], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    holder = None
    pin = None
    try:
        pin = Path(child.stdout.readline().strip())
        assert pin.is_dir(), f"the child's lab did not start: {pin}"
        holder = _holder(pin)
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(3)  # inside a compile or the verifier's refusal (either: the lab unwinds)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=120) == 143
        assert not _left(pin), _left(pin)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if holder is not None:
            holder.kill()
            holder.wait()
        if pin is not None and pin.parent.name.startswith("kpr-npbench-bpffs-"):
            _undo(pin)
