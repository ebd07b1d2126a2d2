"""The prototype frontend table (issue 14 item 6; its C: kpr/testing/fe_table.h): filled from a
kpr_svc map by benchmarks/bench_nodeport_scale.py --fe-table, to measure what a
one-line-per-frontend layout buys a new flow to a cold frontend before the service writer has
such a layout. No agent program is built with it: `load_fe_build` compiles a build of its own
(the header pasted before the plugin's entry file, replacing lib/lb.h's kpr_lb_svc_get)."""

from __future__ import annotations

import os
import struct
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from kpr.bpf import abi

FE_HEADER = Path(__file__).with_name("fe_table.h")
FE_MAP = "kpr_fe_bench"


@lru_cache(maxsize=1)
def _abi() -> abi.Abi:
    # lib/*.h (kpr_svc_key, kpr_svc_val) and this header: its struct and sizes' one definition
    a = abi.Abi()
    a._parse(FE_HEADER)
    return a


FE_MAX = _abi().value("KPR_FE_BENCH_MAX")  # lines (a power of two)
FE_PROBES = _abi().value("KPR_FE_BENCH_PROBES")  # lines tried from a key's hash on
FE_LINE = _abi().struct_of("kpr_fe_line").size  # kpr_svc_key, kpr_svc_val, padding: one cache line


def fe_hash(key: bytes) -> int:
    """fe_table.h kpr_fe_hash: the key's six 32-bit words (as the CPU reads them) mixed."""
    m = 0xFFFFFFFF
    h = 0
    for (w,) in struct.iter_unpack("<I", key):
        h = ((h ^ w) * 0x9E3779B1) & m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def fill_fe_table(pin: Path, svc: Any) -> int:
    """Copy kpr_svc map `svc`'s service entries (slot 0) into a new kpr_fe_bench array pinned
    in `pin` (an existing one is replaced), probing linearly as kpr_lb_svc_get reads it; returns
    the longest probe run used. An entry with no free line within the probes is refused."""
    from kpr.bpf import maps as M

    lines: dict[int, bytes] = {}
    longest = 0
    for k, v in svc.items():
        if M.SvcKey.from_buffer_copy(k).slot:
            continue
        h = fe_hash(k)
        for i in range(FE_PROBES):
            idx = (h + i) & (FE_MAX - 1)
            if idx not in lines:
                lines[idx] = (k + v).ljust(FE_LINE, b"\0")
                longest = max(longest, i + 1)
                break
        else:
            raise RuntimeError(f"{FE_MAP}: a frontend found no free line within {FE_PROBES} probes")
    spec = M.MapSpec(FE_MAP, M.BPF_MAP_TYPE_ARRAY, 4, FE_LINE, FE_MAX, "", M.BPF_F_MMAPABLE)
    (pin / FE_MAP).unlink(missing_ok=True)
    with M.BpfMap.create(spec) as fe:
        fe.pin(pin / FE_MAP)
        if lines:
            fe.store(dict(sorted(lines.items())))
    return longest


def load_fe_build(lab: Any, hook: str, name: str, cflags: list[str] | tuple[str, ...] = ()) -> Any:
    """Compile and load into `lab` (kpr.testing.nodeport_bench.ProgLab) a build of the hook's
    entry file that finds frontends in kpr_fe_bench (fill it first: bcc would create an empty
    one). The entry file is the plugin's own, pasted after this header."""
    from kpr.plugins.tc_nodeport import datapath as TD
    from kpr.plugins.xdp_nodeport import datapath as XD

    entry = (XD.Datapath if hook == "xdp" else TD.Datapath).SOURCE.resolve()
    fd, path = tempfile.mkstemp(prefix="kpr_fe_", suffix=".c")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f'#include "{FE_HEADER.resolve()}"\n#include "{entry}"\n')
        return lab.load(hook, name, cflags, source=Path(path))
    finally:
        os.unlink(path)
