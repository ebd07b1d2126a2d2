"""A restart's initial sync over maps that already hold exactly its state, without reading
them into a shadow first.

An adopting restart (open(read=False), as the agent's kpr_start does) leaves the maps unread;
the first full sync then asks whether the maps hold, byte for byte, what a full sync of the
same services into empty maps writes (kpr.servicemaps.bulk: the common services, ids and
kpr_slots ranges handed out from the start, in key order), as they do after a first start
and a restart with the same manifests. If they do, the shadow is made from that plan, as the
bulk sync makes it after writing, and nothing is written: the same shadow as reading the maps
(open's _reload) and diffing the services against them gives, for about half the CPU (20k
services: 0.28 s to read, 0.2 s to diff). Anything else (a service changed, added or removed,
another kind of service, a stray or hand-edited entry, a freed backend's generation, an
older layout) and the maps are read and diffed as before; nothing was written or kept from
the attempt (reading resets the shadow).
"""

from __future__ import annotations

import logging
from array import array
from typing import Any

from ..bpf import maps as M
from ..model import Service
from .bulk import _pieces, _Plan

log = logging.getLogger("kpr.servicemaps")  # one logger for the whole writer, as before the split

# A kpr_slots value's state bytes (backend id u32, state u32): 0 (active) in every slot a bulk
# sync writes, and in the zero entries
_SLOT_STATE = range(4, 8)
assert M.SLOT.pack(0, 0xFFFFFFFF) == bytes(4) + b"\xff" * 4 and M.BACKEND_ACTIVE == 0


class AdoptMixin:
    """ServiceMapWriter's restart over unchanged maps (state: see ServiceMapWriter._reset_shadow)."""

    def _adopt_unchanged(self, services: list[Service]) -> bool:
        """With the maps unread: take the shadow a bulk sync of `services` leaves when the maps
        hold exactly what it writes (True, nothing written); False otherwise, the shadow then
        to be read from the maps (whatever the plan took is reset by that read)."""
        maps = self.maps
        be, size = maps["kpr_backend"], M.BACKEND.size
        if getattr(be, "type", None) != M.BPF_MAP_TYPE_ARRAY or be.value_size != size or size % 8:
            return False
        # First what rules the plan out cheaply (a restart over maps its agent changed since
        # its own start would pay for the plan too, 0.2 s at 20k): a bulk sync writes no
        # source range or Maglev table (a service with either keeps the kpr_svc count equal
        # to the services'), leaves its backends one run from id 1 with nothing after it
        # (changes leave holes and freed generations), every kpr_slots entry's state active
        # (a terminating backend's slot is not) and one kpr_svc entry per service.
        if any(_any_key(maps[name]) for name in ("kpr_srcrange", "kpr_maglev")):
            return False
        slots = maps["kpr_slots"]
        if getattr(slots, "type", None) != M.BPF_MAP_TYPE_ARRAY or slots.value_size != 8:
            return False
        slots_raw = slots.array_values()
        n_slots = len(slots_raw) >> 3
        if any(slots_raw[at::8].count(0) != n_slots for at in _SLOT_STATE):
            return False
        be_raw = be.array_values()
        run = M.backend_run(be, be_raw)
        if run is None or run.start != 1 or be_raw.count(0, run.stop * size) != len(be_raw) - run.stop * size:
            return False
        svc = maps["kpr_svc"].items()
        if len(svc) != len(services):
            return False
        plan = self._bulk_plan(services)
        if plan is None or plan.rest or plan.nxt != 1 or self._backend_gen is not None:
            return False
        if not _holds(maps, plan, svc, be_raw, slots_raw):
            return False
        self._bulk_take(plan)
        log.info("event=servicemaps_adopted_unchanged frontends=%d backends=%d", plan.n, plan.u)
        return True


def _holds(maps: dict[str, Any], p: _Plan, svc: list[tuple[bytes, bytes]], be_raw: bytes, slots_raw: bytes) -> bool:
    """Whether the maps hold exactly the plan's entries and nothing else of the writer's
    (`svc`: kpr_svc's items, `be_raw`, `slots_raw`: kpr_backend's and kpr_slots' values, as
    read; kpr_srcrange and kpr_maglev found empty before the plan was made)."""
    if len(svc) != p.n or dict(svc) != dict(zip(p.svc_keys, p.svc_vals)):
        return False
    rn = maps["kpr_revnat"].items()
    if len(rn) != p.n or dict(rn) != dict(zip(_pieces(array("I", p.revnats).tobytes(), 4), p.revnat_vals)):
        return False
    return _array_is(be_raw, [(p.nxt, p.be_blob)], M.BACKEND.size) and _array_is(slots_raw, p.slot_ranges, 8)


def _array_is(raw: bytes, ranges: list[tuple[int, bytes]], size: int) -> bool:
    """Whether an array map's values (`raw`, entries of `size` bytes) are these (index,
    values) ranges and zero elsewhere (index 0 included: a zero entry is no backend and no
    slot, and a freed backend's keeps its generation, which a fresh plan does not know)."""
    at = 0
    for index, vals in sorted(ranges):
        start = index * size
        end = start + len(vals)
        if start < at or end > len(raw) or raw.count(0, at, start) != start - at or raw[start:end] != vals:
            return False
        at = end
    return raw.count(0, at) == len(raw) - at


def _any_key(m: Any) -> bool:
    return next(iter(m.keys()), None) is not None
