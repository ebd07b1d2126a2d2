"""The pinned maps read back: what the data path holds, decoded, and how it differs from the
desired state.

`DatapathMaps` opens the maps under a pin path (bpf.pinPath) read-only and answers the same
lookups the programs make (lib/lb.h): the service entry of a frontend and scope, a slot's
backend (kpr_slots at the entry's slot_base), a scope's Maglev table, the source ranges LPM, an affinity entry, a conntrack entry.
`kpr explain` decides with these; `frontends()` decodes everything for
`kpr service list --datapath`.

A backend's state (active, terminating) is per service: it is read from the service's slot
(after `count` always terminating; within, the slot's flags), never from kpr_backend, which
every service listing the pod port shares. Slots are kpr_slots[slot_base + i - 1]; kpr_svc
entries with a slot other than 0 are an older kpr's per-slot layout, shown as stray slots
until the writer sweeps them.

`differences(writer)` compares the kernel maps with the service map writer's accepted state
entry by entry (not only by count) and repairs nothing: `kpr status` shows the result as
`maps: in sync` or the number of differences and the first few. The writer's own check()
repairs on its period; this answers "does the kernel hold what kpr thinks, right now".
"""

from __future__ import annotations

import logging
import struct
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bpf import abi
from .bpf import maps as M
from .nodeport import datapath as ND

log = logging.getLogger(__name__)

__all__ = ["DatapathMaps", "Decoded", "SvcEntry", "decode_maps", "differences", "frontend_type", "now_ns", "slot_state"]

_PORT = struct.Struct("=H")
# Offsets into kpr_svc_key (lib/maps.h via kpr.bpf.abi). A frontend is the key up to its scope
# (address, port, protocol): the bytes kpr_revnat's values and kpr_backend's entries begin with
# too (checked below), so one text form serves all three.
_SVC_OFF = {f.name: f.offset for f in abi.struct_of("kpr_svc_key").fields}
_FE_LEN, _SCOPE, _SLOT = _SVC_OFF["scope"], _SVC_OFF["scope"], _SVC_OFF["slot"]
_FE_PORT, _FE_PROTO = _SVC_OFF["port"], _SVC_OFF["proto"]
_BACKEND_RESERVED = next(f.offset for f in abi.struct_of("kpr_backend").fields if f.name == "reserved")


def _check_frontend_heads() -> None:
    want = {k: _SVC_OFF[k] for k in ("addr", "port", "proto")}
    for name in ("kpr_revnat", "kpr_backend"):
        head = {f.name: f.offset for f in abi.struct_of(name).fields if f.name in want}
        if head != want:
            raise abi.AbiError(f"{name} no longer begins with kpr_svc_key's address, port and protocol: {head}")


_check_frontend_heads()
# Keys and values as lib/conntrack.h and lib/maps.h define them (kpr.bpf.abi): the conntrack
# key, entry and directions the NodePort data path's (made once, there), the affinity key/value here.
_CT_KEY, _CT_ENTRY, _CT_DIR_ORIGINAL, _CT_DIR_REPLY = ND.CT_KEY, ND.CT_ENTRY, ND.CT_DIR_ORIGINAL, ND.CT_DIR_REPLY
_AFF_KEY = abi.packer("kpr_affinity_key", skip=("pad",))  # client, rev_nat, netns
_AFF_VAL = abi.packer("kpr_affinity_val")  # last_used, backend_id, slot
_TYPE_BITS = (
    (M.SVC_F_CLUSTER_IP, "ClusterIP"),
    (M.SVC_F_NODE_PORT, "NodePort"),
    (M.SVC_F_EXTERNAL_IP, "ExternalIP"),
    (M.SVC_F_LOAD_BALANCER, "LoadBalancer"),
    (M.SVC_F_HOST_PORT, "HostPort"),
)
SCOPE_NAMES = {M.SCOPE_EXTERNAL: "external", M.SCOPE_INTERNAL: "internal"}
STATE_NAMES = {M.BACKEND_ACTIVE: "active", M.BACKEND_TERMINATING: "terminating"}
# Maps programs other than the writer own; read when present (the plugin that pins them is on).
OPTIONAL_MAPS = ("kpr_affinity", "kpr_ct", "kpr_np_ct_slots", "kpr_snat", "kpr_snat_slots", "kpr_np_nodeaddr",
                 "kpr_np_vip", "kpr_sock_hostaddr")


# bpf_ktime_get_coarse_ns() reads CLOCK_MONOTONIC_COARSE (6 on Linux; Python names it only sometimes).
_CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)


def now_ns() -> int:
    """kpr_now() as the programs see it (the coarse monotonic clock; lib/common.h)."""
    return time.clock_gettime_ns(_CLOCK_MONOTONIC_COARSE)


def frontend_type(flags: int) -> str:
    return next((name for bit, name in _TYPE_BITS if flags & bit), "?")


@dataclass(frozen=True)
class SvcEntry:
    """Slot 0 of one frontend scope (struct kpr_svc_val), with the key it was found under."""

    addr: bytes  # as stored (v4-mapped); the wildcard for the address-0 NodePort entry
    port: int  # host order
    proto: int
    scope: int
    count: int
    terminating: int
    rev_nat: int
    flags: int
    affinity_timeout: int
    slot_base: int = 0  # kpr_slots index of slot 1 (0: no slots)

    @property
    def address(self) -> str:
        return M.bytes_to_addr(self.addr)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def flag_names(self) -> list[str]:
        return sorted(n for bit, n in M.SVC_FLAG_NAMES.items() if self.flags & bit)

    @property
    def algorithm(self) -> str:
        return "maglev" if self.flags & M.SVC_F_MAGLEV else "random"


@dataclass
class Decoded:
    """The service maps' contents, decoded once (decode_maps); the writer's read_back() and
    DatapathMaps.frontends() shape it for their callers."""

    # backend id (as slots, Maglev tables and conntrack name it: with its generation, see
    # M.backend_id) -> address, port, protocol, local (no state: that is per service, in the slots)
    backends: dict[int, dict[str, Any]]
    # rev-NAT index -> "addr:port/PROTO" of the frontend replies come from
    revnat: dict[int, str]
    # rev-NAT index -> source ranges as "addr/len"
    ranges: dict[int, list[str]]
    # (frontend key: addr16 + port + proto, scope) -> slot -> value tuple: slot 0 the kpr_svc
    # value, slot i (1..count+terminating) (backend id, 0, 0, rev_nat, state flags, 0) from kpr_slots
    slots: dict[tuple[bytes, int], dict[int, tuple]]
    # (rev-NAT index, scope) -> the Maglev table's backend ids
    maglev: dict[tuple[int, int], list[int]]
    # (frontend key, scope) -> slots of an older kpr's per-slot kpr_svc entries (until swept)
    legacy: dict[tuple[bytes, int], list[int]]


def decode_maps(maps: dict[str, M.BpfMap]) -> Decoded:
    """Read and decode every service map (batch lookups; Maglev tables through their ids)."""
    backends: dict[int, dict[str, Any]] = {}
    for bid, v in M.backend_ids(maps["kpr_backend"]):
        backends[bid] = _backend_dict(v)
    revnat = {M.U32.unpack(k)[0]: _fk_text(v[:_FE_LEN]) for k, v in maps["kpr_revnat"].items()}
    ranges: dict[int, list[str]] = {}
    for k, _v in maps["kpr_srcrange"].items():
        plen, rev_nat, addr = M.SRCRANGE_KEY.unpack(k)
        ranges.setdefault(rev_nat, []).append(_range_text(plen, addr))
    slots: dict[tuple[bytes, int], dict[int, tuple]] = {}
    legacy: dict[tuple[bytes, int], list[int]] = {}
    arr = b""
    for k, v in sorted(maps["kpr_svc"].items()):
        entry = slots.setdefault((k[:_FE_LEN], k[_SCOPE]), {})
        slot = _PORT.unpack_from(k, _SLOT)[0]
        if slot:
            legacy.setdefault((k[:_FE_LEN], k[_SCOPE]), []).append(slot)
            continue
        head = entry[0] = M.SVC_VAL.unpack(v)
        base, count, term, rev_nat = head[:4]
        if base and count + term:
            arr = arr or maps["kpr_slots"].array_values()
            for i in range(count + term):
                if (base + i + 1) * 8 <= len(arr):
                    bid, flags = M.SLOT.unpack_from(arr, (base + i) * 8)
                    entry[i + 1] = (bid, 0, 0, rev_nat, flags, 0)
    maglev: dict[tuple[int, int], list[int]] = {}
    outer = maps["kpr_maglev"]
    for k in list(outer.keys()):
        raw = outer.lookup(k)
        if raw is None:
            continue
        with M.BpfMap.from_id(M.U32.unpack(raw)[0]) as inner:
            items = sorted(inner.items(), key=lambda kv: M.U32.unpack(kv[0])[0])
        maglev[M.MAGLEV_KEY.unpack(k)] = list(array("I", b"".join(v for _, v in items)))
    return Decoded(backends, revnat, ranges, slots, maglev, legacy)


class DatapathMaps:
    """The maps pinned under one pin path, opened for reading (close() or use `with`)."""

    def __init__(self, pin_path: Path | str) -> None:
        self.pin_path = Path(pin_path)
        self.maps: dict[str, M.BpfMap] = {}
        missing = [n for n in M.SERVICE_MAPS if not (self.pin_path / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"no kpr service maps under {self.pin_path} (missing {', '.join(missing)}): is the agent "
                "running with this bpf.pinPath?"
            )
        try:
            for name in M.SERVICE_MAPS + OPTIONAL_MAPS:
                if (self.pin_path / name).exists():
                    self.maps[name] = M.BpfMap.open_pinned(self.pin_path / name)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}

    def __enter__(self) -> "DatapathMaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        return name in self.maps

    # -- the lookups lib/lb.h makes

    def service(self, addr: bytes, port: int, proto: int, scope: int) -> SvcEntry | None:
        raw = self.maps["kpr_svc"].lookup(M.SVC_KEY.pack(addr, M.htons(port), proto, scope, 0, 0))
        if raw is None:
            return None
        base, count, term, rev_nat, flags, aff = M.SVC_VAL.unpack(raw)
        return SvcEntry(addr, port, proto, scope, count, term, rev_nat, flags, aff, base)

    def _slot(self, e: SvcEntry, slot: int) -> tuple[int, int] | None:
        """(backend id, state flags) of slot `slot` (1-based), as kpr_lb_slot_backend reads it."""
        if not e.slot_base:
            return None
        # u32 arithmetic, as the programs do it (a hand-edited slot_base near 2^32 wraps)
        raw = self.maps["kpr_slots"].lookup(M.U32.pack((e.slot_base + slot - 1) & 0xFFFFFFFF))
        return M.SLOT.unpack(raw) if raw is not None else None

    def slot_backend(self, e: SvcEntry, slot: int) -> int:
        got = self._slot(e, slot)
        return got[0] if got is not None else 0

    def slots(self, e: SvcEntry) -> list[int]:
        """Backend ids of slots 1..count+terminating (0 where a slot is missing)."""
        return [self.slot_backend(e, i) for i in range(1, e.count + e.terminating + 1)]

    def members(self, e: SvcEntry) -> list[dict[str, Any]]:
        """The backends of slots 1..count+terminating, each with its slot and its state in this
        service (slot_state); slots whose backend entry is missing are left out."""
        out = []
        for i in range(1, e.count + e.terminating + 1):
            got = self._slot(e, i)
            if got is None:
                continue
            bid, flags = got
            b = self.backend(bid)
            if b is not None:
                out.append(dict(b, slot=i, state=slot_state(i, e.count, flags)))
        return out

    def backend(self, bid: int) -> dict[str, Any] | None:
        """The shared backend entry (no state: see members())."""
        m = self.maps["kpr_backend"]
        if getattr(m, "type", None) == M.BPF_MAP_TYPE_ARRAY:
            # kpr_lb_backend(): the entry at the id's index, if it holds the id's generation
            index, gen = M.backend_index(bid)
            raw = m.lookup(M.U32.pack(index))
            if raw is not None and M.backend_gen(raw) != gen:
                raw = None
        else:
            raw = m.lookup(M.U32.pack(bid))
        # an array: a zero entry (protocol 0) is no backend
        return None if raw is None or not raw[M.Backend.proto.offset] else dict(id=bid, **_backend_dict(raw))

    def maglev_table(self, rev_nat: int, scope: int) -> M.BpfMap | None:
        """The scope's inner Maglev array (caller closes it), or None when there is none."""
        raw = self.maps["kpr_maglev"].lookup(M.MAGLEV_KEY.pack(rev_nat, scope))
        return M.BpfMap.from_id(M.U32.unpack(raw)[0]) if raw is not None else None

    def maglev_pick(self, e: SvcEntry, flow_hash: int) -> tuple[int, int, int] | None:
        """(backend id, table slot, table size) lb.h reads for a flow hash; None without a table."""
        table = self.maglev_table(e.rev_nat, e.scope)
        if table is None:
            return None
        with table:
            size = table.info().max_entries
            idx = flow_hash % size
            raw = table.lookup(M.U32.pack(idx))
        return (M.U32.unpack(raw)[0] if raw else 0), idx, size

    def source_allowed(self, rev_nat: int, client: bytes) -> bool:
        """kpr_lb_src_allowed(): an LPM lookup of the full-length key finds the longest match."""
        return self.maps["kpr_srcrange"].lookup(M.SRCRANGE_KEY.pack(32 + 128, rev_nat, client)) is not None

    def source_ranges(self, rev_nat: int) -> list[str]:
        keys = (M.SRCRANGE_KEY.unpack(k) for k, _v in self.maps["kpr_srcrange"].items())
        return sorted(_range_text(plen, addr) for plen, rn, addr in keys if rn == rev_nat)

    def affinity(self, client: bytes, rev_nat: int, netns: bool = False) -> tuple[int, int, int] | None:
        """(last_used ns, backend id, slot) of an affinity entry, or None."""
        m = self.maps.get("kpr_affinity")
        if m is None:
            return None
        raw = m.lookup(_AFF_KEY.pack(client, rev_nat, 1 if netns else 0))
        return _AFF_VAL.unpack(raw) if raw is not None else None

    def conntrack(self, saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int) -> dict[str, Any] | None:
        """The per-packet path's conntrack entry of a flow (original direction), or None; "map"
        says where: NodePort's slot table (KPR_NP_CT_SLOTS builds, looked in first, as the
        programs do) or kpr_ct."""
        from kpr.bpf.slots import SlotTable
        from kpr.nodeport.gc import ct_timeout, now_ns

        key = _CT_KEY.pack(saddr, daddr, M.htons(sport), M.htons(dport), proto, _CT_DIR_ORIGINAL, 0)
        raw, where = None, ""
        slots = self.maps.get(ND.CT_SLOTS_MAP)
        if slots is not None:
            t = SlotTable(slots, ND.CT_SLOT)
            try:
                for idx in t.probes(key, ND.CT_PROBES):  # the first live entry of the key, as the programs take it
                    stamp, k, v = t.read(idx)
                    if stamp and k == key:
                        f = _CT_ENTRY.unpack(v)
                        if now_ns() - f[0] <= ct_timeout(f[3], proto):  # (an expired one they read past)
                            raw, where = v, ND.CT_SLOTS_MAP
                            break
            finally:
                t.close()
        m = self.maps.get("kpr_ct")
        if raw is None and m is not None:
            raw, where = m.lookup(key), "kpr_ct"
        if raw is None:
            return None
        last, bid, rev_nat, flags, _tf, _pad, nat_port, _pad2, nat_addr = _CT_ENTRY.unpack(raw)
        return {"last_seen": last, "backend_id": bid, "rev_nat": rev_nat, "flags": flags,
                "nat_port": M.ntohs(nat_port), "nat_addr": nat_addr, "map": where}

    def snat_reply(self, backend: bytes, bport: int, nat: bytes, nat_port: int, proto: int) -> str | None:
        """Where the programs find the replies (backend -> SNAT address:port) of a source-NATed
        flow: "kpr_snat_slots" (a slot, as the programs look first), "kpr_snat" (a reverse entry),
        or None (none: its replies are not translated)."""
        from kpr.bpf.slots import SlotTable

        key = _CT_KEY.pack(backend, nat, M.htons(bport), M.htons(nat_port), proto, _CT_DIR_REPLY, 0)
        slots = self.maps.get(ND.SNAT_SLOTS_MAP)
        if slots is not None:
            with SlotTable(slots, ND.SNAT_SLOT) as table:
                if table.find(key, ND.SNAT_SLOT_PROBES) is not None:
                    return ND.SNAT_SLOTS_MAP
        rev = self.maps.get("kpr_snat")
        if rev is not None and rev.lookup(key):
            return "kpr_snat"
        return None

    def is_node_address(self, addr: bytes, hook: str) -> bool:
        """Whether the hook's program takes `addr` for one of this node's addresses (the
        wildcard NodePort entry then applies): kpr_np_nodeaddr (tc/XDP), kpr_sock_hostaddr."""
        m = self.maps.get("kpr_sock_hostaddr" if hook == "socket" else "kpr_np_nodeaddr")
        return m is not None and m.lookup(addr) is not None

    def is_announced(self, addr: bytes) -> bool:
        """Whether tc/XDP drop traffic to `addr` that no frontend takes (kpr_np_vip: the
        LoadBalancer and External IPs the node announces)."""
        m = self.maps.get("kpr_np_vip")
        return m is not None and m.lookup(addr) is not None

    # -- the whole picture

    def frontends(self) -> list[dict[str, Any]]:
        """One object per frontend (address, port, protocol) as the maps hold it: the shape of
        `kpr service list --json` rows (backends of the external scope, as clients outside
        the node get them), plus what only the maps know (scopes, flags, rev-NAT index, slot
        order, algorithm, affinity, source ranges, Maglev shares)."""
        d = decode_maps(self.maps)
        backends = {bid: dict(b, id=bid) for bid, b in d.backends.items()}
        ranges, entries = d.ranges, d.slots
        shares: dict[tuple[int, int], dict[int, int]] = {}
        for key, table in d.maglev.items():
            counts: dict[int, int] = {}
            for bid in table:
                counts[bid] = counts.get(bid, 0) + 1
            shares[key] = counts
        rows: dict[bytes, dict[str, Any]] = {}
        for (fk, scope), slots in sorted(entries.items()):
            addr = M.bytes_to_addr(fk[:_FE_PORT])
            port = M.ntohs(_PORT.unpack_from(fk, _FE_PORT)[0])
            proto = M.PROTO_NAMES.get(fk[_FE_PROTO], str(fk[_FE_PROTO]))
            row = rows.setdefault(
                fk, {"service": "", "type": "?", "address": addr, "port": port, "protocol": proto, "backends": [], "scopes": {}}
            )
            head = slots.get(0)
            sname = SCOPE_NAMES.get(scope, str(scope))
            stray = d.legacy.get((fk, scope), [])
            if head is None:
                row["scopes"][sname] = {"error": "backend slots without a service entry (slot 0)", "slots": stray}
                continue
            _, count, term, rev_nat, flags, aff = head
            def show(i: int) -> dict[str, Any]:
                bid, _c, _t, _r, sflags, _a = slots.get(i, (0, 0, 0, 0, 0, 0))
                b = backends.get(bid)
                if b is None:
                    return {"id": bid, "address": "?", "port": 0, "state": "missing", "local": False}
                return dict(b, state=slot_state(i, count, sflags))

            listed = [show(i) for i in range(1, count + term + 1)]
            entry: dict[str, Any] = {
                "revNat": rev_nat,
                "flags": sorted(n for bit, n in M.SVC_FLAG_NAMES.items() if flags & bit),
                "algorithm": "maglev" if flags & M.SVC_F_MAGLEV else "random",
                "local": bool(flags & M.SVC_F_LOCAL_SCOPE),
                "affinityTimeout": aff,
                "sourceRanges": sorted(ranges.get(rev_nat, [])) if flags & M.SVC_F_SOURCE_RANGES else [],
                "backends": listed,
                "straySlots": stray,
            }
            table = shares.get((rev_nat, scope))
            if table is not None:
                entry["maglev"] = {f"{_label(backends.get(b))}": n for b, n in sorted(table.items())}
            row["scopes"][sname] = entry
            if scope == M.SCOPE_EXTERNAL:
                row["type"] = frontend_type(flags)
                row["backends"] = [{"address": b["address"], "port": b["port"], "state": b["state"]} for b in listed]
                row["revNat"] = rev_nat
                row["algorithm"] = entry["algorithm"]
                row["affinityTimeout"] = aff
                row["sourceRanges"] = entry["sourceRanges"]
                row["wildcard"] = bool(flags & M.SVC_F_WILDCARD)
        return [rows[fk] for fk in sorted(rows, key=lambda fk: (rows[fk]["address"], rows[fk]["port"], rows[fk]["protocol"]))]

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """(entries, max_entries) of every map opened: conntrack and NAT fill included
        (kpr_slots, an array: the slots the service entries use, in their ranges' size classes)."""
        from .servicemaps.reconcile import slots_in_use

        svc: list[tuple[bytes, bytes]] = []  # kpr_svc's entries, dumped once for both counts

        def used(name: str, m: M.BpfMap) -> int:
            if name in ("kpr_svc", "kpr_slots"):
                if not svc:
                    svc.extend(self.maps["kpr_svc"].items())
                return len(svc) if name == "kpr_svc" else slots_in_use(svc)
            return len(M.backend_items(m)) if name == "kpr_backend" else m.count()

        return {name: (used(name, m), m.info().max_entries) for name, m in self.maps.items()}


def slot_state(slot: int, count: int, flags: int) -> str:
    """A backend's state in one service from its slot (1-based) and the slot's flags: after
    `count` terminating (kept for existing flows); within, what the flags say (terminating
    there: a KEP-1669 fallback, no ready backend in the scope)."""
    if slot > count:
        return "terminating"
    return STATE_NAMES.get(flags, str(flags))


def _backend_dict(raw: bytes) -> dict[str, Any]:
    """A kpr_backend value decoded (its reserved byte, once a shared state, ignored)."""
    addr, port, proto, _reserved, flags = M.BACKEND.unpack(raw)
    return {
        "address": M.bytes_to_addr(addr),
        "port": M.ntohs(port),
        "protocol": M.PROTO_NAMES.get(proto, str(proto)),
        "local": bool(flags & M.BACKEND_F_LOCAL),
    }


def _range_text(plen: int, addr: bytes) -> str:
    """A kpr_srcrange key's prefix as "addr/len" (IPv4 lengths without the mapped /96)."""
    a = M.bytes_to_addr(addr)
    return f"{a}/{plen - 32 - (96 if '.' in a else 0)}"


def _label(b: dict[str, Any] | None) -> str:
    if b is None:
        return "?"
    return f"[{b['address']}]:{b['port']}" if ":" in b["address"] else f"{b['address']}:{b['port']}"


def join_services(datapath: list[dict[str, Any]], desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Name each decoded frontend after the desired-state row (frontend_rows) with the same
    address, port and protocol; a wildcard NodePort entry after a NodePort row with its port."""
    by_fe = {(r["address"], r["port"], r["protocol"]): r for r in desired}
    by_np = {(r["port"], r["protocol"]): r for r in desired if r["type"] == "NodePort"}
    for row in datapath:
        want = by_fe.get((row["address"], row["port"], row["protocol"]))
        if want is None and row.get("wildcard"):
            want = by_np.get((row["port"], row["protocol"]))
        row["service"] = want["service"] if want else "(not in the desired state)"
        row["state"] = want.get("state", "served") if want else "stray"
    return datapath


# ---------------------------------------------------------------------- differences


def _fk_text(key: bytes) -> str:
    addr = M.bytes_to_addr(key[:_FE_PORT])
    host = f"[{addr}]" if ":" in addr else addr
    proto = key[_FE_PROTO]
    return f"{host}:{M.ntohs(_PORT.unpack_from(key, _FE_PORT)[0])}/{M.PROTO_NAMES.get(proto, str(proto))}"


def _describe(name: str, key: bytes) -> str:
    if name == "kpr_svc":
        slot, scope = _PORT.unpack_from(key, _SLOT)[0], key[_SCOPE]
        return f"{_fk_text(key)} {SCOPE_NAMES.get(scope, scope)}" + (f" slot {slot}" if slot else "")
    if name in ("kpr_backend", "kpr_revnat", "kpr_slots"):
        if name == "kpr_slots":
            return f"index {M.U32.unpack(key)[0]}"
        return f"id {M.U32.unpack(key)[0]}"
    if name == "kpr_maglev":
        rev_nat, scope = M.MAGLEV_KEY.unpack(key)
        return f"rev-NAT {rev_nat} {SCOPE_NAMES.get(scope, scope)}"
    if name == "kpr_srcrange":
        plen, rev_nat, addr = M.SRCRANGE_KEY.unpack(key)
        return f"rev-NAT {rev_nat} {_range_text(plen, addr)}"
    return key.hex()


def _desired_entries(writer: Any) -> dict[str, dict[bytes, bytes | None]]:
    """The writer's accepted state per map (value None: only the key is compared). Reads the
    writer's shadow, under its lock: the frontend groups and the backends they use."""
    want: dict[str, dict[bytes, bytes | None]] = {n: {} for n in M.SERVICE_MAPS}
    used: set[int] = set()
    for k in writer._legacy:
        want["kpr_svc"][k] = None  # an older kpr's slot entries, expected until swept
    for g in writer._groups.values():
        want["kpr_svc"].update(g.svc)
        if g.base:
            want["kpr_slots"].update(
                zip(map(M.U32.pack, range(g.base, g.base + (len(g.slot_vals) >> 3))), map(bytes, _chunks(g.slot_vals, 8)))
            )
        if g.revnat:
            want["kpr_revnat"][M.U32.pack(g.rev_nat)] = g.revnat
        for k in g.srcrange:
            want["kpr_srcrange"][k] = None
        for scope in g.maglev:
            want["kpr_maglev"][M.MAGLEV_KEY.pack(g.rev_nat, scope)] = None
        used.update(g.backends)
    vals = writer._backend_vals
    for bid in used:
        if bid in vals:
            want["kpr_backend"][M.U32.pack(bid)] = vals[bid]
    return want


def differences(writer: Any, limit: int = 5) -> dict[str, Any]:
    """Entry-by-entry comparison of the kernel maps with the writer's accepted state:
    {"count": n, "first": [up to `limit` descriptions], "maps": {name: n}}. Repairs nothing."""
    with writer._lock:
        if not writer.maps:
            return {"count": 0, "first": [], "maps": {}, "error": "maps not open"}
        if writer._unread:
            # A restart's maps before its initial sync: no state accepted yet to compare them
            # with, and reading them here (`kpr status`, a readiness probe) would make the sync
            # read and diff them instead of taking them as they are (kpr.servicemaps.adopt).
            return {"count": 0, "first": [], "maps": {}, "error": "not read yet (a restart's maps, until the initial sync)"}
        want = _desired_entries(writer)
        have: dict[str, dict[bytes, bytes]] = {}
        for name in M.SERVICE_MAPS:
            m = writer.maps[name]
            if name == "kpr_slots":
                # an array holds every index: compare the ones the service entries use
                arr = m.array_values()
                have[name] = {k: arr[i * 8 : i * 8 + 8] for k, i in zip(want[name], map(_index, want[name]))}
                continue
            if name == "kpr_backend":  # an array: its non-zero entries
                have[name] = {M.U32.pack(i): v for i, v in M.backend_items(m)}
                continue
            have[name] = dict(m.items()) if name != "kpr_maglev" else {k: b"" for k in m.keys()}
    first: list[str] = []
    per_map: dict[str, int] = {}
    for name in M.SERVICE_MAPS:
        w, h = want[name], have[name]
        found = []
        for k in w.keys() - h.keys():
            found.append(f"{name} {_describe(name, k)}: missing from the kernel")
        for k in h.keys() - w.keys():
            found.append(f"{name} {_describe(name, k)}: in the kernel, not desired")
        for k in w.keys() & h.keys():
            if w[k] is not None and w[k] != h[k]:
                found.append(f"{name} {_describe(name, k)}: kernel value {_value_text(name, h[k])}, desired {_value_text(name, w[k])}")
        if found:
            per_map[name] = len(found)
            first.extend(sorted(found)[: max(0, limit - len(first))])
    return {"count": sum(per_map.values()), "first": first, "maps": per_map}


def _index(key: bytes) -> int:
    return M.U32.unpack(key)[0]


def _chunks(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _value_text(name: str, raw: bytes) -> str:
    if name == "kpr_svc":
        base, count, term, rev_nat, flags, aff = M.SVC_VAL.unpack(raw)
        return f"(slots at {base}, count {count}, terminating {term}, rev-NAT {rev_nat}, flags {flags:#x})"
    if name == "kpr_slots":
        bid, flags = M.SLOT.unpack(raw)
        return f"(backend {bid}, state {STATE_NAMES.get(flags, flags)})"
    if name == "kpr_backend":
        b = _backend_dict(raw)
        reserved = raw[_BACKEND_RESERVED]
        return f"({_label(b)}{' local' if b['local'] else ''}{'' if reserved == 0 else f', reserved {reserved}'})"
    if name == "kpr_revnat":
        return _fk_text(raw[:_FE_LEN])
    return raw.hex()
