"""Benchmark labs whose flow maps (kpr_ct, kpr_snat) are of another kind than the product's LRU
(benchmarks/bench_nodeport_flowmaps.py): what a preallocated hash or per-CPU LRU lists would
cost a new NodePort flow, measured beside the LRU in one run before anything in the product
changes. Not a product feature: the writer pins both maps as kpr.bpf.maps.SPECS says (LRU)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from typing import Any

from kpr.bpf import maps as M

log = logging.getLogger(__name__)

BPF_F_NO_COMMON_LRU = 1 << 1  # uapi/linux/bpf.h: an LRU list per CPU instead of one shared

# kind -> {map name: (map type, map flags)} in place of the writer's LRU maps; "lru": none.
KINDS: dict[str, dict[str, tuple[int, int]]] = {
    "lru": {},
    "hash": {"kpr_ct": (M.BPF_MAP_TYPE_HASH, 0), "kpr_snat": (M.BPF_MAP_TYPE_HASH, 0)},
    "hash-ct": {"kpr_ct": (M.BPF_MAP_TYPE_HASH, 0)},
    "hash-snat": {"kpr_snat": (M.BPF_MAP_TYPE_HASH, 0)},
    "percpu-lru": {
        "kpr_ct": (M.BPF_MAP_TYPE_LRU_HASH, BPF_F_NO_COMMON_LRU),
        "kpr_snat": (M.BPF_MAP_TYPE_LRU_HASH, BPF_F_NO_COMMON_LRU),
    },
}


def repin_flow_maps(lab: Any, kind: str) -> None:
    """Pin maps of `kind` in place of the lab's kpr_ct and kpr_snat (same sizes), before any
    program of the lab is loaded: programs open their maps by pin path (bcc), so every build
    loaded afterwards uses these. The writer keeps its descriptors of the LRU maps (it writes
    no flows)."""
    if lab.builds:
        raise RuntimeError("repin_flow_maps: builds already loaded hold the writer's maps")
    for name, (mtype, flags) in KINDS[kind].items():
        spec = dataclasses.replace(M.SPECS[name], type=mtype, flags=flags)
        new = M.BpfMap.create(spec)
        lab._stack.callback(new.close)
        tmp = lab.pin / f"{name}_{kind.replace('-', '_')}"
        new.pin(tmp)
        os.rename(tmp, lab.pin / name)  # bpffs renames atomically over the writer's pin
        log.info("event=flow_map_repinned map=%s kind=%s type=%d flags=%d", name, kind, mtype, flags)


def pinned_kind(lab: Any, name: str) -> tuple[int, int]:
    """(type, flags) of the map pinned as `name` in the lab."""
    with M.BpfMap.open_pinned(lab.pin / name) as m:
        info = m.info()
        return info.type, info.map_flags


FILL_NET = bytes([198, 18, 0, 0])  # 198.18.0.0/15 (RFC 2544 benchmarking, 131072 addresses): no lab address is in it


def _fill_addr(i: int) -> bytes:
    """The `i`-th filler address (198.18.0.0 + i) as the maps hold an IPv4 address (IPv4-mapped
    IPv6, 16 bytes): the source of every filler entry."""
    return bytes(10) + b"\xff\xff" + (int.from_bytes(FILL_NET, "big") + i).to_bytes(4, "big")


def fill_flow_maps(pin: Any, fraction: float) -> dict[str, int]:
    """Fill kpr_ct and kpr_snat (pinned under `pin`) to `fraction` of their capacity with entries
    of flows no packet of the benchmark names (source 198.18.x.y, every field but the last-seen
    stamp zero), so a new flow's conntrack miss walks bucket chains and its inserts meet a map
    as full as a busy node's: an LRU at 1.0 evicts on every insert; a preallocated hash at 1.0
    refuses them. Returns the entries written per map."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fill fraction {fraction}: not within 0..1")
    out = {}
    for name in ("kpr_ct", "kpr_snat"):
        with M.BpfMap.open_pinned(pin / name) as m:
            info = m.info()
            n = int(info.max_entries * fraction)
            keys = [_fill_addr(i).ljust(info.key_size, b"\0") for i in range(n)]
            m.update_many(keys, [bytes(info.value_size)] * n)
            out[name] = n
    out["kpr_snat_slots"] = fill_snat_slots(pin, out["kpr_snat"])
    from kpr.bpf.slots import SlotTable
    from kpr.nodeport import datapath as D

    if (pin / D.CT_SLOTS_MAP).exists():
        # NodePort's conntrack slots (KPR_NP_CT_SLOTS) held at the same share, at random
        # places (seeded: every round alike; their keys the fillers', never at their own hash:
        # no packet looks them up), so a new flow's probes meet held slots as on a node that
        # full: one probe finds its slot held at `fraction`, two adjacent ones both held at
        # about its square (an even spread would leave every other slot free: never both)
        with SlotTable.open(pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            n = int(t.slots * fraction)
            for i, idx in enumerate(random.Random(n).sample(range(t.slots), n)):
                key = _fill_addr(i).ljust(t.key_size, b"\0")
                t.put(idx, 1, key, bytes(t.val_size))
            out[D.CT_SLOTS_MAP] = n
    log.info("event=flow_maps_filled fraction=%s kpr_ct=%d kpr_snat=%d kpr_snat_slots=%d", fraction, out["kpr_ct"],
             out["kpr_snat"], out["kpr_snat_slots"])
    return out


def fill_snat_slots(pin: Any, n: int) -> int:
    """Hold `n` slots of kpr_snat_slots (pinned under `pin`, when there) with reply keys of flows no
    packet names (source 198.18.x.y), each at the first free probe of its hash as a program's claim
    puts it, stamped now: a new flow's probes meet a table that full. Returns the slots held."""
    from kpr.bpf import ctclock
    from kpr.bpf.slots import SlotTable
    from kpr.nodeport import datapath as D

    path = pin / D.SNAT_SLOTS_MAP
    if not n or not path.exists():
        return 0
    with SlotTable.open(path, D.SNAT_SLOT) as t:
        stamp = ctclock.now_ns() | 1
        held = 0
        for i in range(min(n, t.slots)):
            key = D.CT_KEY.pack(_fill_addr(i % 131072), bytes(16), i // 131072, 0, 6, D.CT_DIR_REPLY, 0)
            idx = t.first_free(key, D.SNAT_SLOT_PROBES)
            if idx is not None:
                t.put(idx, stamp, key, bytes(t.val_size))
                held += 1
        return held
