"""The prototype conntrack layout (kpr/testing/ct_array.h): builds of a
NodePort program whose flows live in arrays of slots the program indexes by its own hash, for
benchmarks/bench_nodeport_flowmaps.py --kinds array. Not a product feature: no collector, no
reply path reads it (a build with it serves new and established flows, not their replies)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from kpr.bpf import maps as M

CT_HEADER = Path(__file__).with_name("ct_array.h")
ARRAY_MAPS = ("kpr_ct_arr", "kpr_snat_arr")


def load_array_build(lab: Any, hook: str, name: str, cflags: list[str] | tuple[str, ...] = ()) -> Any:
    """Compile and load into `lab` (kpr.testing.nodeport_bench.ProgLab) a build of the hook's
    program with the prototype's conntrack (its header pasted before the plugin's entry file,
    after the hook's ctx header), and have the lab's flush empty its arrays too."""
    from kpr.bpf.inline import BPF_DIR
    from kpr.plugins.tc_nodeport import datapath as TD
    from kpr.plugins.xdp_nodeport import datapath as XD

    entry = (XD.Datapath if hook == "xdp" else TD.Datapath).SOURCE.resolve()
    ctx = BPF_DIR / "ctx" / ("xdp.h" if hook == "xdp" else "skb.h")
    fd, path = tempfile.mkstemp(prefix="kpr_ct_array_", suffix=".c")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f'#include "{ctx}"\n#include "{CT_HEADER.resolve()}"\n#include "{entry}"\n')
        dp = lab.load(hook, name, cflags, source=Path(path))
    finally:
        os.unlink(path)
    if not getattr(lab, "_ct_array_flush", False):
        flush = lab.flush_flows

        def flush_all() -> None:
            flush()
            clear_arrays(lab.pin)

        lab.flush_flows = flush_all
        lab._ct_array_flush = True
    return dp


def clear_arrays(pin: Path) -> None:
    """Every slot of the prototype's arrays free (zero), as the benchmark's flush between rounds."""
    for name in ARRAY_MAPS:
        path = pin / name
        if not path.exists():
            continue
        with M.BpfMap.open_pinned(path) as m:
            mem = m.mmap()
            mem[:] = bytes(len(mem))


def used_slots(pin: Path, name: str) -> int:
    """Slots of the prototype's array `name` in use (their `used` word non-zero)."""
    with M.BpfMap.open_pinned(pin / name) as m:
        mem = m.mmap()
        size = m.info().value_size
        return sum(1 for i in range(0, len(mem) - size + 1, size) if mem[i:i + 8] != bytes(8))
