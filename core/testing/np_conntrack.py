"""NodePort's conntrack entries wherever the build put them: a slot of kpr_np_ct_slots
(KPR_NP_CT_SLOTS builds) or kpr_ct (builds without slots, a flow whose
probes were all held, a flow an older build began). Tests read a flow's entry here, never
kpr_ct alone, so they hold in either build; kpr.readback's DatapathMaps.conntrack answers
`kpr explain`'s question (the one live entry the programs take), this one a test's (every
entry, expired ones too, and a write back into the place it was read from)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kpr.bpf import maps as M


@dataclass(frozen=True)
class CtEntry:
    where: str  # kpr.nodeport.datapath.CT_SLOTS_MAP or "kpr_ct"
    key: tuple  # D.CT_KEY's fields
    val: tuple  # D.CT_ENTRY's fields
    idx: int | None = None  # the slot (kpr_np_ct_slots); None: kpr_ct
    stamp: int = 0  # the slot's claim stamp (kept by write)


def ct_entries(pin: Path, match: Callable[[tuple], bool] | None = None) -> list[CtEntry]:
    """Every conntrack entry under `pin` whose key fields `match` accepts (all without it): the
    held slots of kpr_np_ct_slots (when pinned), then kpr_ct's entries."""
    from kpr.bpf.slots import SlotTable
    from kpr.nodeport import datapath as D

    out = []
    if (pin / D.CT_SLOTS_MAP).exists():
        with SlotTable.open(pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            for idx, stamp, k, v in t.held():
                if any(k):  # (a claimed slot whose key is not written yet names no flow)
                    out.append(CtEntry(D.CT_SLOTS_MAP, D.CT_KEY.unpack(k), D.CT_ENTRY.unpack(v), idx, stamp))
    with M.BpfMap.open_pinned(pin / "kpr_ct") as m:
        out += [CtEntry("kpr_ct", D.CT_KEY.unpack(k), D.CT_ENTRY.unpack(v)) for k, v in m.items()]
    return [e for e in out if match is None or match(e.key)]


def ct_of_client(pin: Path, client: bytes, cport: int, proto: int) -> list[CtEntry]:
    """The conntrack entries naming `client`:`cport` (either direction) of `proto`."""
    port = M.htons(cport)
    return ct_entries(pin, lambda k: k[4] == proto and ((k[0] == client and k[2] == port)
                                                        or (k[1] == client and k[3] == port)))


def ct_write(pin: Path, e: CtEntry, val: tuple, stamp: int | None = None) -> None:
    """Write `val` (D.CT_ENTRY's fields) into the entry `e` was read from: its slot (claim
    stamp kept, or `stamp`: a flow made to look old must look claimed long ago too, as the
    collector never expires a slot younger than its grace period) or kpr_ct (no stamp)."""
    from kpr.bpf.slots import SlotTable
    from kpr.nodeport import datapath as D

    key, raw = D.CT_KEY.pack(*e.key), D.CT_ENTRY.pack(*val)
    if e.idx is None:
        with M.BpfMap.open_pinned(pin / "kpr_ct") as m:
            m.update(key, raw)
        return
    with SlotTable.open(pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
        t.put(e.idx, stamp or e.stamp, key, raw)
