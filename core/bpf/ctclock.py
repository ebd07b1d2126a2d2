"""The conntrack clock (lib/conntrack.h kpr_ct_now()) as Python reads it.

kpr_ct's last_seen, kpr_np_rev's last_seen and kpr_snat's created are stamped by the programs
with kpr_ct_now(): with KPR_CT_CLOCK_JIFFIES (the default) and the kernel's HZ passed at build
time (`cflags()`), `(bpf_jiffies64() - INITIAL_JIFFIES) * TICK_NSEC`, otherwise kpr_now() (the
coarse CLOCK_MONOTONIC). Collectors compare those stamps with `now_ns()`, the same clock:
CLOCK_MONOTONIC plus the offset between the two time bases (jiffies start a few hundred ms
after CLOCK_MONOTONIC's zero), measured once from /proc/timer_list, which shows both.

The switch, INITIAL_JIFFIES and the tick are lib/conntrack.h's (read through kpr.bpf.abi; the
tick is the kernel's TICK_NSEC formula, as the header computes it).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import time
from pathlib import Path

from kpr.bpf import abi

log = logging.getLogger(__name__)

JIFFIES = bool(abi.value("KPR_CT_CLOCK_JIFFIES"))  # the header's default
INITIAL_JIFFIES_S = abi.value("KPR_CT_INITIAL_JIFFIES_S")
HZ_CHOICES = (100, 250, 300, 1000)  # the kernel's CONFIG_HZ_* choices
TIMER_LIST = Path("/proc/timer_list")


def tick_nsec(hz: int) -> int:
    """The kernel's TICK_NSEC for `hz` (KPR_CT_TICK_NSEC)."""
    return (10**9 + hz // 2) // hz


def initial_jiffies(hz: int) -> int:
    """The kernel's INITIAL_JIFFIES (KPR_CT_INITIAL_JIFFIES): -300 s of jiffies as a 32-bit value."""
    return (-INITIAL_JIFFIES_S * hz) & 0xFFFFFFFF


def _config_hz(text: str) -> int | None:
    m = re.search(r"^CONFIG_HZ=(\d+)$", text, re.M)
    return int(m[1]) if m else None


def _read_timer_list() -> tuple[int, int]:
    """(ktime ns, jiffies) from one read of /proc/timer_list (root only)."""
    text = TIMER_LIST.read_text()
    now = re.search(r"^now at (\d+) nsecs$", text, re.M)
    jif = re.search(r"^jiffies: (\d+)$", text, re.M)
    if not now or not jif:
        raise OSError(f"{TIMER_LIST}: no 'now at' or 'jiffies:' line")
    return int(now[1]), int(jif[1])


@functools.cache
def kernel_hz() -> int:
    """The running kernel's CONFIG_HZ: from its config (/proc/config.gz, /boot/config-<release>),
    else measured from /proc/timer_list over 0.2 s (the nearest of the kernel's choices);
    0 when neither can be read (the programs then stamp with kpr_now())."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        try:
            raw = path.read_bytes()
            hz = _config_hz((gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace"))
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if hz:
            return hz
    try:
        t0, j0 = _read_timer_list()
        time.sleep(0.2)
        t1, j1 = _read_timer_list()
    except OSError as e:
        log.warning("event=ct_clock_hz_unknown error=%s fallback=kpr_now", e)
        return 0
    measured = (j1 - j0) * 10**9 / max(1, t1 - t0)
    return min(HZ_CHOICES, key=lambda hz: abs(hz - measured))


def cflags(jiffies: bool = JIFFIES) -> list[str]:
    """The -D flags a build including lib/conntrack.h needs for the jiffies clock (none when
    the HZ is unknown or the clock is off: kpr_ct_now() is kpr_now() then)."""
    hz = kernel_hz() if jiffies else 0
    return [f"-DKPR_HZ={hz}"] if hz else []


@functools.cache
def _offset_ns(hz: int) -> int:
    """kpr_ct_now() minus CLOCK_MONOTONIC on the jiffies clock (constant for the boot, within a
    tick); 0 when /proc/timer_list cannot be read (stamps then look up to the boot's offset,
    a few hundred ms, older than they are)."""
    try:
        ktime, jif = _read_timer_list()
    except OSError as e:
        log.warning("event=ct_clock_offset_unknown error=%s offset_ns=0", e)
        return 0
    return (jif - initial_jiffies(hz)) * tick_nsec(hz) - ktime


def now_ns(jiffies: bool = JIFFIES) -> int:
    """Now on the clock the programs' conntrack stamps use (a build with `jiffies` on or off)."""
    hz = kernel_hz() if jiffies else 0
    if not hz:
        # kpr_now(): the coarse clock runs up to a tick behind CLOCK_MONOTONIC
        return time.monotonic_ns()
    return time.monotonic_ns() + _offset_ns(hz)
