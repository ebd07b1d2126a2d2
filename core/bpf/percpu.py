"""Per-CPU array maps read without bcc: a plugin that adopted its programs (kpr.bpf.builds)
has no bcc module to read its counters through."""

from __future__ import annotations

import ctypes
import errno
import functools
from pathlib import Path

from . import maps as M

__all__ = ["add_u64", "possible_cpus", "u64_sums"]


@functools.cache
def possible_cpus() -> int:
    """CPUs the kernel sizes per-CPU values for (/sys/devices/system/cpu/possible, "0-3,5")."""
    n = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def u64_sums(m: M.BpfMap, count: int) -> list[int]:
    """Slots 0..count-1 of a per-CPU array of u64, each summed over CPUs."""
    cpus = possible_cpus()
    val = (ctypes.c_uint64 * cpus)()
    lib = M.libbpf()
    out = []
    for i in range(count):
        rc = lib.bpf_map_lookup_elem(m.fd, M.U32.pack(i), val)
        if rc == -errno.ENOENT:
            out.append(0)
            continue
        M.check_rc(rc, f"lookup in {m.name}")
        out.append(sum(val))
    return out


def add_u64(src: M.BpfMap, dst: M.BpfMap, count: int) -> None:
    """Add slots 0..count-1 of per-CPU u64 array `src` into `dst`, CPU by CPU (a counter map
    replaced by a larger one keeps its sums: its slots keep their index in the new layout)."""
    cpus = possible_cpus()
    old, new = (ctypes.c_uint64 * cpus)(), (ctypes.c_uint64 * cpus)()
    lib = M.libbpf()
    for i in range(count):
        key = M.U32.pack(i)
        if lib.bpf_map_lookup_elem(src.fd, key, old) == -errno.ENOENT:
            continue
        M.check_rc(lib.bpf_map_lookup_elem(dst.fd, key, new), f"lookup in {dst.name}")
        for c in range(cpus):
            new[c] += old[c]
        M.check_rc(lib.bpf_map_update_elem(dst.fd, key, new, 0), f"update in {dst.name}")
