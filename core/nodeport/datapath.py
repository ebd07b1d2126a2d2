"""The NodePort programs (an entry file over core/bpf/lib/nodeport.h: tc_nodeport.c for tc,
xdp_nodeport.c for XDP) and the maps they share with the plugins.

`Datapath` compiles and loads the entry programs and their stages, fills the stage program
array, and writes the plugin-owned maps (devices, the kind of every link, node addresses,
announced addresses, per-frontend modes). Its counters are kpr_np_stats (STATS, named
from the KPR_NP_ST_* defines of lib/nodeport.h in slot order) and kpr_np_fwd (FWD_STATS, from
the KPR_NP_FWD_* defines: how packets left, why one was handed to the stack, by egress device
kind). The plugins subclass it with their entry file, program names, program type and stage
array. Constants and struct packers here are read from lib/nodeport.h, lib/conntrack.h and
lib/nat.h (kpr.bpf.abi); tests/kernel/test_tc_nodeport_prog.py checks them against bcc's view.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.bpf import abi, kernctx
from kpr.servicemaps import fetable
from kpr.bpf import maps as M
from kpr.bpf.inline import BPF_DIR
from kpr.bpf.slots import SlotTable
from kpr.netdevs import DevKind

log = logging.getLogger(__name__)

# Stage programs of the tc build, in KPR_NP_CALL_* slot order (lib/nodeport.h): kpr_np_<call>.
CALLS = tuple(f"kpr_np_{n}" for n in abi.counters("KPR_NP_CALL_", names={"NO_BACKEND": "nobackend"}))
# kpr_np_stats slots in KPR_NP_ST_* order (lib/nodeport.h, via kpr.bpf.abi). A counter is
# named by its C suffix in lower case; these published names (status, metrics, kpr.drops,
# `kpr monitor` reasons) differ from their C suffix. A new KPR_NP_ST_* needs nothing here.
STATS_NAMES = {
    "ICMP_XLATED": "icmp_translated",
    "DROP_NO_LOCAL": "drop_no_local_backend",
    "DROP_SRC_RANGE": "drop_source_range",
    "DROP_VIP": "drop_vip_unserved",
    "DROP_SNAT_PORT": "drop_snat_no_port",
    "DROP_NAT": "drop_nat_failed",
    "DROP_DSR": "drop_dsr_failed",
    "DROP_DSR_BAD": "drop_dsr_unknown_frontend",
    "DROP_NO_REV": "drop_no_reverse_entry",
    "DROP_NO_SNAT_ADDR": "drop_no_snat_address",
    "FRAGMENT": "fragments",
    "FIB_PASS": "fib_to_kernel",
    "CT_FAILED": "conntrack_write_failed",
    "ICMP_LIMITED": "icmp_rate_limited",
    "TAIL_MISSING": "tail_call_missing",
    "REV_STALE": "reverse_entry_stale",
}
STATS = abi.counters("KPR_NP_ST_", names=STATS_NAMES)


def _fwd_names() -> dict[int, str]:
    """kpr_np_fwd slot -> counter name, from the KPR_NP_FWD_* defines (one definition):
    fwd_<reason> for how packets left or why they were given up on, egress_<kind> per
    KPR_DEV_* kind of egress device."""
    skip = ("BY_KIND", "CACHED_BY_KIND", "MAX")
    names = {slot: f"fwd_{reason.lower()}" for reason, slot in abi.group("KPR_NP_FWD_", exclude=skip).items()}
    base = abi.value("KPR_NP_FWD_BY_KIND")
    names.update({base + k.value: f"egress_{k.name.lower()}" for k in DevKind})
    return names


def _fwd_cached_slots() -> dict[int, str]:
    """kpr_np_fwd slot -> the egress_<kind> it adds to: KPR_NP_FWD_CACHED_BY_KIND + kind counts
    a redirect to a cached next hop out of a device of that kind, the programs' one increment
    for what the reader reports as fwd_redirect, egress_<kind> and fwd_nh_cached (issue 14)."""
    base = abi.value("KPR_NP_FWD_CACHED_BY_KIND")
    return {base + k.value: f"egress_{k.name.lower()}" for k in DevKind}


NODEPORT_H = BPF_DIR / "lib" / "nodeport.h"
# kpr_np_fwd slots: how packets left, by reason and by egress device kind.
FWD_STATS = _fwd_names()
FWD_CACHED = _fwd_cached_slots()  # not reported themselves: stats() adds them into FWD_STATS names
FWD_SLOTS = abi.value("KPR_NP_FWD_MAX")  # kpr_np_fwd's max_entries (a smaller pin is replaced)
DROP_STATS = tuple(s for s in STATS if s.startswith("drop_")) + tuple(
    n for n in FWD_STATS.values() if n.startswith("fwd_drop_")
)
# Reasons a packet was handed to the kernel's stack instead of a redirect helper.
GIVEN_UP_STATS = tuple(n for n in FWD_STATS.values() if n.startswith("fwd_stack_")) + ("fib_to_kernel",)

MODES = {name.lower(): v for name, v in abi.group("KPR_NP_MODE_").items()}  # snat, dsr, hybrid
MODE_NAMES = {v: k for k, v in MODES.items()}

# Plugin-owned pinned maps (lib/nodeport.h).
REV_MAP, FE_MAP, VIP_MAP, NODEADDR_MAP, DEV_MAP = "kpr_np_rev", "kpr_np_fe", "kpr_np_vip", "kpr_np_nodeaddr", "kpr_np_dev"
DEVKIND_MAP = "kpr_np_devkind"
PORTS_MAP = "kpr_np_ports"
UNSERVED_MAP = "kpr_np_unserved"  # kpr_np_ports' port words inverted once armed: what the prefilter reads
NOMODE_MAP = "kpr_np_nomode"  # a bit per port no kpr_np_fe key has: the programs skip that lookup
SNAT_SLOTS_MAP = "kpr_snat_slots"  # new SNAT flows' reverse entries (lib/nat.h, kpr.bpf.slots; slot struct SNAT_SLOT)
SNAT_SLOT = "kpr_snat_slot"
SNAT_SLOT_PROBES = abi.value("KPR_SNAT_SLOT_PROBES")  # slots from a reply key's hash on, as the programs probe
SNAT_GATE_MAP = "kpr_snat_gate"  # whether kpr_snat may hold reverse entries (snat_gate_* below)
NH_MAP = "kpr_np_nh"  # next hops cached per backend (KPR_NP_NH_CACHE); key NH_GEN: the generation
# NodePort's conntrack entries in slots (KPR_NP_CT_SLOTS builds only: pinned by their compile),
# read and freed by kpr.bpf.slots; the gate says whether kpr_ct may hold NodePort entries.
CT_SLOTS_MAP, CT_SLOT, CT_GATE_MAP = "kpr_np_ct_slots", "kpr_np_ct_slot", "kpr_np_ct_gate"
CT_SLOTS_ON = bool(abi.value("KPR_NP_CT_SLOTS"))  # the header's default (a -D flag overrides it per build)
SNAT_SLOTS_ON = bool(abi.value("KPR_NP_SNAT_SLOTS"))  # lib/nat.h's default, likewise
# The -D flags of a build without them (config flowSlots: false): NodePort's flows in kpr_ct and kpr_snat alone
NO_SLOTS = ("-DKPR_NP_CT_SLOTS=0", "-DKPR_NP_SNAT_SLOTS=0")
CT_PROBES = abi.value("KPR_NP_CT_PROBES")
# The tc build's entry programs (tc shows these names): xdp_nodeport reads tc_nodeport's attachment
# records of TC_EGRESS, the only program that translates a local backend's replies.
TC_INGRESS, TC_EGRESS = "kpr_np_ingress", "kpr_np_egress"
# Counters: each build has its own pair (lib/nodeport.h KPR_NP_PIN_STATS, KPR_NP_PIN_FWD), so
# with tc and XDP on one node each plugin's status counts its own program's packets only.
STATS_MAP, FWD_MAP = "kpr_np_stats", "kpr_np_fwd"  # the tc build's; XDP: kpr_np_xstats, kpr_np_xfwd
OWN_MAPS = (REV_MAP, FE_MAP, VIP_MAP, NODEADDR_MAP, DEV_MAP, DEVKIND_MAP, PORTS_MAP, UNSERVED_MAP, NOMODE_MAP)
# kpr_np_ports (lib/nodeport.h): 64 ports per word, TCP words then UDP words, then the armed word.
PORTS_ARMED = abi.value("KPR_NP_PORTS_ARMED")
VIP_BITS = abi.value("KPR_NP_VIP_BITS")  # then VIP_WORDS words: a bit per announced address at vip_hash()
VIP_WORDS = abi.value("KPR_NP_VIP_WORDS")
VIP_HASH_MASK = abi.value("KPR_NP_VIP_HASH_MASK")  # vip_hash's values
UNSERVED_WORDS = abi.value("KPR_NP_UNSERVED_WORDS")  # kpr_np_unserved: one per port word of kpr_np_ports
NOMODE_WORDS = abi.value("KPR_NP_NOMODE_WORDS")  # kpr_np_nomode: indexed as kpr_np_unserved
_WORD_MASK = (1 << 64) - 1


def unserved_word(port_word: int, armed: bool) -> int:
    """A kpr_np_unserved word from its kpr_np_ports port word: inverted once armed, zero before
    (nothing leaves early)."""
    return ~port_word & _WORD_MASK if armed else 0


def unserved_words(port_words: Mapping[int, int], armed: bool) -> dict[int, int]:
    """All of kpr_np_unserved from kpr_np_ports' port words (absent: zero)."""
    return {i: unserved_word(port_words.get(i, 0), armed) for i in range(UNSERVED_WORDS)}
_PORT_PROTO_BASE = {6: 0, 17: abi.value("KPR_NP_PORT_WORDS_UDP")}  # (TCP's words first)


def port_bit(port: int, proto: int) -> tuple[int, int] | None:
    """(word, bit) of a port (host order) in kpr_np_ports' port words, kpr_np_unserved and
    kpr_np_nomode; None for protocols other than TCP and UDP (the programs never skip for them)."""
    base = _PORT_PROTO_BASE.get(proto)
    if base is None:
        return None
    return base | port >> 6, 1 << (port & 63)


def mode_key_port(key: bytes) -> tuple[int, int]:
    """(port in host order, protocol) of a packed kpr_np_fe key."""
    _addr, port, proto = NP_FE_KEY.unpack(key)
    return M.ntohs(port), proto


def nomode_words(ports: Iterable[tuple[int, int]], words: Iterable[int] = range(NOMODE_WORDS)) -> dict[int, int]:
    """kpr_np_nomode words `words`: every bit set but those of `ports` ((port, protocol) that
    kpr_np_fe has a key of, or may have)."""
    out = dict.fromkeys(words, _WORD_MASK)
    for port, proto in ports:
        pb = port_bit(port, proto)
        if pb is not None and pb[0] in out:
            out[pb[0]] &= ~pb[1]
    return out

# --- struct packers, read from lib/nodeport.h, lib/conntrack.h and lib/nat.h -----------------
# ("=" native order, no padding; ports as stored, network order; fields positionally in header
# order, pads included unless skipped: tests/test_abi.py pins the lists callers rely on)

CT_KEY = abi.packer("kpr_ct_key")  # saddr, daddr, sport, dport, proto, dir, pad
CT_ENTRY = abi.packer("kpr_ct_entry")  # last_seen, backend_id, rev_nat, flags, tcp_flags, pad, nat_port, pad2, nat_addr
NAT_ENTRY = abi.packer("kpr_nat_entry")  # addr, port, fe_port, pad2, created, fe_addr
SNAT_GATE = abi.packer("kpr_snat_gate")  # overflows, clean
NP_REV = abi.packer("kpr_np_rev")  # addr, port, flags, pad, last_seen
CT_GATE = abi.packer("kpr_np_ct_gate")  # overflows, clean
NP_FE_KEY = abi.packer("kpr_np_fe_key", skip=("pad",))  # addr, port, proto
NP_FE = abi.packer("kpr_np_fe", skip=("pad",))  # mode
NP_DEV = abi.packer("kpr_np_dev")  # addr4, addr6, flags, pad
NP_NH = abi.packer("kpr_np_nh")  # gen, ifindex, smac, dmac, kind, nat4, pad, addr
NH_GEN = abi.value("KPR_NP_NH_GEN")

CT_DIR_ORIGINAL, CT_DIR_REPLY = abi.value("KPR_CT_DIR_ORIGINAL"), abi.value("KPR_CT_DIR_REPLY")
CT_F_SEEN_REPLY, CT_F_CLOSING, CT_F_NODE_PORT, CT_F_SNAT, CT_F_DSR, CT_F_LOCAL = (
    abi.value(f"KPR_CT_F_{n}") for n in ("SEEN_REPLY", "CLOSING", "NODE_PORT", "SNAT", "DSR", "LOCAL")
)
REV_F_DSR, REV_F_CLOSING = abi.value("KPR_NP_REV_F_DSR"), abi.value("KPR_NP_REV_F_CLOSING")
CT_DIR_OFF = next(f.offset for f in abi.struct_of("kpr_ct_key").fields if f.name == "dir")
SNAT_PORT_MIN, SNAT_PORT_MAX = abi.value("KPR_SNAT_PORT_MIN"), abi.value("KPR_SNAT_PORT_MAX")  # lib/nat.h defaults

_ZERO16 = bytes(16)


def _gate_overflows(m: M.BpfMap, packer: struct.Struct) -> int:
    mem = m.mmap()
    try:
        return packer.unpack_from(mem)[0]
    finally:
        mem.release()


def _gate_clean(m: M.BpfMap, name: str, overflows: int) -> None:
    # only the clean word, in the map's memory (the programs add to the other)
    mem = m.mmap()
    try:
        off = abi.struct_of(name).fields[1].offset
        mem[off : off + 8] = struct.pack("=Q", overflows + 1)
    finally:
        mem.release()


def snat_gate_overflows(m: M.BpfMap) -> int:
    """kpr_snat_gate's count of kpr_snat inserts, read before a collector's look at kpr_snat."""
    return _gate_overflows(m, SNAT_GATE)


def snat_gate_clean(m: M.BpfMap, overflows: int) -> None:
    """Tell the programs kpr_snat holds no reverse entry (a claim of a slot then skips its look
    there): `overflows` is what snat_gate_overflows read before kpr_snat was found so; an insert
    since has raised the count, and the gate stays shut."""
    _gate_clean(m, "kpr_snat_gate", overflows)


def ct_gate_overflows(m: M.BpfMap) -> int:
    """kpr_np_ct_gate's count of NodePort writes to kpr_ct, read before a sweep of kpr_ct."""
    return _gate_overflows(m, CT_GATE)


def ct_gate_clean(m: M.BpfMap, overflows: int) -> None:
    """Tell the programs kpr_ct holds no NodePort entry (a slot miss then skips kpr_ct):
    `overflows` is what ct_gate_overflows read before the sweep that found none; a write since
    has raised the count, and the gate stays open."""
    _gate_clean(m, "kpr_np_ct_gate", overflows)


def _gate_open(m: M.BpfMap, packer: struct.Struct) -> None:
    # overflows moved on by two, as a program's counted write moves it, so that a collector's
    # pass that began before cannot mark the gate clean. (Not an atomic add: a program's add
    # lost to it still leaves the count past any value a collector read before.)
    mem = m.mmap()
    try:
        overflows = packer.unpack_from(mem)[0]
        mem[0:8] = struct.pack("=Q", overflows + 2)
    finally:
        mem.release()


def ct_gate_open(m: M.BpfMap) -> None:
    """Open the gate (the programs read kpr_ct after a slot miss again); see _gate_open."""
    _gate_open(m, CT_GATE)


# The home slots' gates (lib/nodeport.h struct kpr_np_ct_slot: lru_adds, lru_clean), by byte offset.
CT_HOME_ADDS, CT_HOME_CLEAN = (next(f.offset for f in abi.struct_of(CT_SLOT).fields if f.name == n)
                               for n in ("lru_adds", "lru_clean"))


def ct_home(t: SlotTable, key: bytes) -> int:
    """The home slot (first probe) of an ORIGINAL conntrack key: the one whose gate words cover it."""
    return t.probes(key, 1)[0]


def ct_homes_adds(t: SlotTable) -> list[int]:
    """Every home slot's count of kpr_ct writes (lru_adds), read before a sweep of kpr_ct."""
    return t.column(CT_HOME_ADDS)


def ct_homes_clean(t: SlotTable, adds: list[int], held: set[int]) -> None:
    """After a sweep of kpr_ct: each home slot in `held` (a NodePort entry of a key homed there is
    still in kpr_ct) open (lru_clean 0: never lru_adds + 1), every other marked clean with the
    count ct_homes_adds read before the sweep; a write since has moved lru_adds past it, and that
    home stays open (the rule of ct_gate_clean, per slot)."""
    t.set_column(CT_HOME_CLEAN, [0 if i in held else (a + 1) & 0xFFFFFFFFFFFFFFFF for i, a in enumerate(adds)])


def ct_homes_open(t: SlotTable) -> None:
    """Open every home slot's gate: lru_adds moved on by two (see _gate_open: not atomic, and a
    program's add lost to it still leaves the count past any a collector read before)."""
    t.set_column(CT_HOME_ADDS, [(a + 2) & 0xFFFFFFFFFFFFFFFF for a in t.column(CT_HOME_ADDS)])


def ct_homes_mark_clean(t: SlotTable) -> None:
    """Every home slot marked clean as it is (a table just cleared, kpr_ct emptied: tests and
    benchmarks' flush between rounds)."""
    ct_homes_clean(t, ct_homes_adds(t), set())


def snat_gate_open(m: M.BpfMap) -> None:
    """Shut kpr_snat_gate (a slot claim looks in kpr_snat again until a collector's pass finds no
    reverse entry there); see _gate_open."""
    _gate_open(m, SNAT_GATE)


def vip_hash(addr16: bytes) -> int:
    """lib/nodeport.h kpr_np_vip_hash(): the 32-bit words as the program loads them (native order)."""
    w0, w1, w2, w3 = struct.unpack("=4I", addr16)
    h = w0 ^ w1 ^ w2 ^ w3
    return (h ^ (h >> 16)) & VIP_HASH_MASK


def invalidate_next_hops(m: M.BpfMap) -> int:
    """Bump kpr_np_nh's generation (never to 0, which turns caching off): every next hop the
    programs cached is looked up again. Returns the new generation. After a disarm it goes on
    from the last one (kept in the generation entry's ifindex, which the programs do not read):
    starting again from 1 would make entries cached in an earlier generation 1 current again."""
    gen = _last_next_hop_gen(m) % 0xFFFFFFFF + 1
    _set_next_hop_gen(m, gen, 0)
    return gen


def devices_changed(m: M.BpfMap, written: int, removed: int) -> None:
    """kpr_np_dev or kpr_np_devkind changed (`written` or `removed` entries): a cached next hop
    keeps the kind and external-ness its device had when it was cached, and an IPv4 backend's
    SNAT address (the established local and inline SNAT paths, and a new SNAT flow, read them
    from kpr_np_nh, not the device maps), so the generation is bumped. A disarmed cache
    (generation 0) is left off: bumping would turn it on."""
    if (written or removed) and _gen_in_force(m):
        invalidate_next_hops(m)


def _gen_in_force(m: M.BpfMap) -> int:
    raw = m.lookup(M.U32.pack(NH_GEN))
    return NP_NH.unpack(raw)[0] if raw is not None else 0


def disarm_next_hops(m: M.BpfMap) -> None:
    """Turn the programs' next-hop cache off (generation 0: a FIB lookup per packet), as the
    agent stops: programs left attached without an agent have no watcher to tell them of route
    or neighbour changes. The last generation is kept for the next bump."""
    _set_next_hop_gen(m, 0, _last_next_hop_gen(m))


def _last_next_hop_gen(m: M.BpfMap) -> int:
    """The generation in force, or the one in force when the cache was disarmed."""
    raw = m.lookup(M.U32.pack(NH_GEN))
    gen, last = NP_NH.unpack(raw)[:2] if raw is not None else (0, 0)
    return max(gen, last)


def _set_next_hop_gen(m: M.BpfMap, gen: int, last: int) -> None:
    m.update(M.U32.pack(NH_GEN), NP_NH.pack(gen, last, bytes(6), bytes(6), 0, 0, 0, _ZERO16))


def _set_array_words(m: M.BpfMap, words: Mapping[int, int]) -> None:
    """Words of a u64 array map as given, where they differ (indexes past the map's end skipped)."""
    have = dict(m.items())
    n = m.info().max_entries
    up = {}
    for i, w in words.items():
        k, v = M.U32.pack(i), struct.pack("=Q", w)
        if i < n and have.get(k) != v:
            up[k] = v
    if up:
        m.update_many(list(up), list(up.values()))


def _vip_words(addresses: Iterable[bytes]) -> dict[int, int]:
    """kpr_np_ports words with the bits of these announced addresses set."""
    words: dict[int, int] = {}
    for a in addresses:
        h = vip_hash(a)
        words[VIP_BITS + (h >> 6)] = words.get(VIP_BITS + (h >> 6), 0) | 1 << (h & 63)
    return words


@dataclass(frozen=True)
class WriterSettings:
    """What the maps the core's service map writer created hold: the values that matter here."""

    conntrack_size: int
    snat_size: int
    # Maglev table size of the tables present; None when there is no table to tell from.
    maglev_size: int | None


def writer_settings(pin: Path) -> WriterSettings:
    with M.BpfMap.open_pinned(pin / "kpr_ct") as ct, M.BpfMap.open_pinned(pin / "kpr_snat") as snat:
        ct_size, snat_size = ct.info().max_entries, snat.info().max_entries
    maglev = None
    path = pin / "kpr_maglev"
    if path.exists():
        with M.BpfMap.open_pinned(path) as outer:
            maglev = M.inner_max_entries(outer)
    return WriterSettings(ct_size, snat_size, maglev)


def family_of(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def sync_map(m: M.BpfMap, want: Mapping[bytes, bytes]) -> tuple[int, int]:
    """Make the map hold `want`; (written, removed). Keys no longer wanted leave first: a map
    kept full (every device of a busy node in kpr_np_devkind, pods in host_routing's
    kpr_hr_pods) would otherwise refuse each new key (E2BIG) for good. No wanted key is ever
    deleted, so the order opens no gap for the programs."""
    have = dict(m.items())
    up = {k: v for k, v in want.items() if have.get(k) != v}
    gone = [k for k in have if k not in want]
    if gone:
        m.delete_many(gone)
    if up:
        m.update_many(list(up), list(up.values()))
    return len(up), len(gone)


def sync_modes(fe: M.BpfMap, want: Mapping[bytes, bytes], nomode_for: Callable[[list[bytes]], None]) -> None:
    """kpr_np_fe made to hold exactly `want`, in kpr_np_nomode's order (one definition for the
    agent's tables and the lab's Datapath, which keep its words each their own way):
    `nomode_for(keys)` writes its words as they are with exactly these keys in kpr_np_fe, first
    with every key there or to come (a port's bit cleared before a key of it is written), then,
    after the write, with `want`'s (set once the last key of its port is gone)."""
    nomode_for([*want, *(bytes(k) for k in fe.keys())])
    sync_map(fe, want)
    nomode_for(list(want))


class DeviceMaps:
    """The writers of the node's device maps (kpr_np_dev, kpr_np_devkind, kpr_np_nodeaddr) on
    `self.maps` (pin name -> map): one definition for the agent's tables
    (kpr.nodeport.tables.NodePortTables) and the lab's Datapath, so a rule added to them (the
    next-hop generation bumped on a change) is added once."""

    maps: dict[str, M.BpfMap]

    def set_devices(self, devices: Mapping[int, tuple[str | None, str | None]], default: tuple[str | None, str | None]) -> None:
        """kpr_np_dev: ifindex -> (IPv4, IPv6) SNAT addresses; key 0 holds the node's defaults.
        A change bumps the next-hop generation (devices_changed)."""

        def val(pair: tuple[str | None, str | None]) -> bytes:
            a4 = M.addr_to_bytes(pair[0]) if pair[0] else _ZERO16
            a6 = M.addr_to_bytes(pair[1]) if pair[1] else _ZERO16
            return NP_DEV.pack(a4, a6, 0, 0)

        want = {M.U32.pack(idx): val(pair) for idx, pair in devices.items()}
        want[M.U32.pack(0)] = val(default)
        devices_changed(self.maps[NH_MAP], *sync_map(self.maps[DEV_MAP], want))

    def set_device_kinds(self, kinds: Mapping[int, int]) -> tuple[int, int]:
        """kpr_np_devkind: ifindex -> KPR_DEV_* (kpr.netdevs.DevKind) of every link of the node's
        namespace; (written, removed). A change bumps the next-hop generation (devices_changed)."""
        done = sync_map(self.maps[DEVKIND_MAP], {M.U32.pack(i): M.U32.pack(int(k)) for i, k in kinds.items()})
        devices_changed(self.maps[NH_MAP], *done)
        return done

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        sync_map(self.maps[NODEADDR_MAP], {M.addr_to_bytes(a): M.U32.pack(1) for a in addresses})


class Datapath(DeviceMaps):
    """The loaded programs of one agent, and handles on the maps they use.

    Subclasses name the entry file (SOURCE), the entry programs (ENTRIES), the stage programs
    in KPR_NP_CALL_* order (CALLS; "" for a slot the build leaves empty), the program type
    and the stage program array.
    """

    SOURCE: Path
    ENTRIES: tuple[str, ...] = ()
    CALLS: tuple[str, ...] = CALLS
    PROG_TYPE = "SCHED_CLS"
    CALLS_MAP = "kpr_np_calls"
    # This build's counters (pin names).
    STATS_MAP, FWD_MAP = STATS_MAP, FWD_MAP
    # The link pinned per device for each entry (links/<plugin>/<device>/<hook>), in ENTRIES order.
    LINK_HOOKS: tuple[str, ...] = ("ingress", "egress")

    def __init__(
        self,
        pin: Path | str,
        *,
        mode: str = "snat",
        conntrack_size: int = 524288,
        icmp_unreachable: bool = True,
        redirect_peer: bool = True,
        maglev_size: int = M.MAGLEV_DEFAULT_SIZE,
        snat_ports: tuple[int, int] = (SNAT_PORT_MIN, SNAT_PORT_MAX),
        flow_slots: bool = True,
        extra_cflags: Iterable[str] = (),
    ) -> None:
        self.pin = Path(pin)
        self.mode = mode
        self.conntrack_size = conntrack_size
        self.icmp_unreachable = icmp_unreachable
        self.redirect_peer = redirect_peer
        self.maglev_size = maglev_size
        self.snat_ports = snat_ports
        self.flow_slots = flow_slots  # false: no slot tables (flowSlots), whatever the headers' default
        self.extra_cflags = list(extra_cflags)
        # This build's own stage array (lib/nodeport.h KPR_NP_CALLS_PIN): the entries it
        # replaces keep their own stages until the switch; drop_other_generations() then
        # unpins the arrays of earlier builds (load() names the adopted build's, if adopted).
        self.calls_pin = f"{self.CALLS_MAP}_{secrets.token_hex(4)}"  # bpffs refuses dots in names
        self.build = ""  # "compiled"; "cached": from program_cache; "adopted": the pinned links ran this build already
        # kpr.bpf.progcache.ProgramCache: a start with no links to adopt loads an earlier compile from it
        self.program_cache: Any = None
        # bpf.mapSizes overrides: the programs must declare the pinned maps as the writer made them.
        self.sizes: dict[str, int] = {}
        self.bpf: Any = None
        self.progs: dict[str, Any] = {}
        self.maps: dict[str, M.BpfMap] = {}
        # The tc entry reads the skb's checksum state through a kfunc (kpr.bpf.kernctx); off
        # after a kernel refused that build (load(): the state is then inferred, lib/csum.h).
        self.kernctx = True

    @property
    def reads_csum_state(self) -> bool | None:
        """Whether the loaded tc build reads the skb's checksum state (False: it infers it, a
        fallback or a kernel without the kfunc; None for an XDP build, which has no skb)."""
        return self.kernctx and bool(kernctx.cflags())

    def cflags(self) -> list[str]:
        return M.cflags(self.pin, self.sizes, maglev_size=self.maglev_size) + [
            f"-DKPR_NP_MODE={MODES[self.mode]}",
            f"-DKPR_NP_REV_MAX={self.conntrack_size}",
            f"-DKPR_NP_ICMP_UNREACH={int(self.icmp_unreachable)}",
            f"-DKPR_NP_PEER={int(self.redirect_peer)}",
            f"-DKPR_SNAT_PORT_MIN={self.snat_ports[0]}",
            f"-DKPR_SNAT_PORT_MAX={self.snat_ports[1]}",
            f'-DKPR_NP_CALLS_PIN="{self.calls_pin}"',
            *(kernctx.cflags() if self.kernctx else ()),  # tc: the skb's checksum state (XDP builds ignore them)
            # no kpr_fe copy where the writer keeps none (kpr.servicemaps.fetable): no probe of an empty table
            *(() if fetable.supported() else ("-DKPR_LB_FE=0",)),
            *(() if self.flow_slots else NO_SLOTS),
            *self.extra_cflags,
        ]

    def _switch(self, name: str, default: bool) -> bool:
        """A build switch's value in this build: the last -D flag naming it, else the header's default."""
        on = default
        for f in self.cflags():
            if f.startswith(f"-D{name}="):
                on = bool(int(f.split("=", 1)[1]))
        return on

    def ct_slots(self) -> bool:
        """Whether this build keeps NodePort's conntrack in slots (lib/nodeport.h KPR_NP_CT_SLOTS)."""
        return self._switch("KPR_NP_CT_SLOTS", CT_SLOTS_ON)

    def snat_slots(self) -> bool:
        """Whether this build puts a new SNAT flow's reply side in kpr_snat_slots (lib/nat.h
        KPR_NP_SNAT_SLOTS; the slot is taken only with KPR_NP_SNAT_IN_CT and KPR_NP_NEW_NH)."""
        return (self._switch("KPR_NP_SNAT_SLOTS", SNAT_SLOTS_ON)
                and self._switch("KPR_NP_SNAT_IN_CT", bool(abi.value("KPR_NP_SNAT_IN_CT")))
                and self._switch("KPR_NP_NEW_NH", bool(abi.value("KPR_NP_NEW_NH"))))

    def load(self, links_of: Mapping[str, Path] | None = None) -> "Datapath":
        """Compile, load every program, fill the stage array, open the plugin's maps. When the
        links pinned at `links_of` (entry program -> link pin) already run this build, their
        programs are taken as they are instead (kpr.bpf.builds: no compile; their stages are
        in this build's pinned stage array already)."""
        from kpr.bpf import builds
        from kpr.bpf.inline import inline_includes
        source = self.SOURCE
        text = inline_includes(source.read_text(), [source.parent], label=str(source))
        # The digest covers every flag but the stage array's own name. A compile always pins a
        # fresh array (__init__'s name), even for a build that runs already: stages of a new
        # compile read its own per-CPU state map, which the running entries never fill, so
        # they must never reach them (SYNs were lost that way until the entries switched).
        digest = self._digest(text)
        candidates = [digest]
        if links_of and self.kernctx and kernctx.cflags():
            # the build without the checksum-state read, which a kernel that refused the read
            # runs (the fallback below): adopted too, or every restart there would compile
            self.kernctx = False
            candidates.append(self._digest(text))
            self.kernctx = True
        found = builds.adopt(self.pin, candidates, links_of) if links_of else None
        try:
            if found is not None:
                self.progs.update(found[1])
                self.build = "adopted"
                if found[0] != digest:
                    self.kernctx = False  # the build without the read runs
                    if self.reads_csum_state is not None:  # (XDP builds ignore the read's flags: nothing missed)
                        # an earlier start's fallback, perhaps a transient failure, kept until the build changes
                        log.warning("event=kernctx_fallback_adopted prog=%s hint='the running build infers the "
                                    "checksum state (an earlier start could not load the read); kept until kpr "
                                    "cleanup, a kernel, bcc, kpr or config change'", self.ENTRIES[0])
                # keep the adopted entries' array when earlier builds' arrays are unpinned
                used = set(builds.map_ids(self.fd(self.ENTRIES[0])))
                for p in self.pin.glob(f"{self.CALLS_MAP}_*"):
                    with M.BpfMap.open_pinned(p) as m:
                        if m.id in used:
                            self.calls_pin = p.name
            else:
                # a smaller counter pin moves aside for the compile (bcc would adopt it as it
                # is) and comes back if the compile or load fails: the old programs keep
                # running and counting into it, and pin readers keep finding it
                aside = self.set_aside_old_counters()
                try:
                    self._cached_fallback(text)
                    try:
                        self._compile(text, source)
                    except Exception as e:
                        if not (self.kernctx and kernctx.cflags()):
                            raise
                        # A kernel whose JIT cannot call kfuncs, or a compiler that kept a value
                        # in r0-r5 across the call (ctx/skb.h ctx_csum_state): the same programs
                        # without the read serve as well (each rewrite infers the state).
                        log.warning("event=kernctx_fallback error=%r; the checksum state is inferred", str(e)[:300])
                        self.kernctx = False
                        self._drop_compiled()
                        self._compile(text, source)
                    digest = self._digest(text)
                    with M.BpfMap.open_pinned(self.pin / self.calls_pin) as table:  # (no bcc: a cached load has none)
                        slots = [i for i, name in enumerate(self.CALLS) if name]
                        table.update_many([M.U32.pack(i) for i in slots],
                                          [M.U32.pack(self.fd(self.CALLS[i])) for i in slots], batch=False)
                    builds.record(self.pin, digest, [self.prog_id(n) for n in self.ENTRIES])
                except BaseException:
                    self._drop_compiled()  # (bcc's maps go with it; the new pins are replaced below)
                    self.restore_old_counters(aside)
                    raise
                self.carry_old_counters(aside)
            for name in OWN_MAPS + ("kpr_ct", "kpr_snat", "kpr_backend", "kpr_svc"):
                self.maps[name] = M.BpfMap.open_pinned(self.pin / name)
            for name in (self.STATS_MAP, self.FWD_MAP, NH_MAP, SNAT_SLOTS_MAP, SNAT_GATE_MAP):
                self.maps[name] = M.BpfMap.open_pinned(self.pin / name)
            for name in (CT_SLOTS_MAP, CT_GATE_MAP):  # (a KPR_NP_CT_SLOTS build's, or one's before it)
                if (self.pin / name).exists():
                    self.maps[name] = M.BpfMap.open_pinned(self.pin / name)
            self.open_ct_gate("load")
        except BaseException:
            self.close()
            raise
        log.info(
            "event=nodeport_loaded mode=%s conntrack_size=%d maglev_size=%d programs=%d build=%s",
            self.mode, self.conntrack_size, self.maglev_size, len(self.progs), self.build,
        )
        return self

    def open_ct_gate(self, why: str) -> None:
        """Open kpr_np_ct_gate, when pinned, and shut kpr_snat_gate (below), whatever this build
        and whatever kpr_ct holds now: at load (before this build's programs run) and again once they replaced the old ones
        everywhere (the agent, after attaching). Between the two, either build may be a build
        without slots writing kpr_ct unmarked (it never moves the gate), while the other reads
        kpr_ct only through the gate; the second open makes the collector's next sweep, which
        sees those entries, the first that may mark it clean again."""
        gate = self.maps.get(CT_GATE_MAP)
        if gate is not None:
            ct_gate_open(gate)
            log.info("event=nodeport_ct_gate_opened reason=%s", why)
        table = self.maps.get(CT_SLOTS_MAP)
        if table is not None:  # the home slots' gates likewise: either gate shut skips kpr_ct
            with SlotTable(table, CT_SLOT) as t:
                ct_homes_open(t)
        # kpr_snat_gate likewise (README issue 14, H1's SNAT slots reviewed, item 5): an older
        # kpr's programs (without the gate's count) may have put even ports into kpr_snat
        # uncounted after a collector marked it clean. Always, not after a dump of kpr_snat: the
        # next pass that finds no reverse entry there marks it clean again.
        snat = self.maps.get(SNAT_GATE_MAP)
        if snat is not None:
            snat_gate_open(snat)
            log.info("event=nodeport_snat_gate_shut reason=%s", why)

    def _digest(self, text: str) -> str:
        """The build's digest: every flag but the stage array's own name (see load())."""
        from kpr.bpf import builds

        fresh, self.calls_pin = self.calls_pin, self.CALLS_MAP
        try:
            return builds.digest(text, self.cflags())
        finally:
            self.calls_pin = fresh

    def _programs(self) -> list[tuple[str, str, None]]:
        return [(name, self.PROG_TYPE, None) for name in (*self.ENTRIES, *(c for c in self.CALLS if c))]

    def _compile(self, text: str, source: Path) -> None:
        """Compile and load, or load an earlier compile from program_cache (kpr.bpf.progcache:
        the stage array is made anew under this build's calls_pin, filled by load())."""
        from kpr.bpf.loader import load_prog
        from kpr.bpf.progcache import CachedModule, load_programs

        self.bpf = load_programs(text, self._programs(), cflags=self.cflags(), name=str(source),
                                 cache=self.program_cache, fresh_pins={self.calls_pin: self.CALLS_MAP})
        self.build = "cached" if isinstance(self.bpf, CachedModule) else "compiled"
        for name, ptype, _a in self._programs():
            self.progs[name] = load_prog(self.bpf, name, ptype)

    def _cached_fallback(self, text: str) -> None:
        """Load the build without the checksum-state read when the cache holds it and not the
        build with it: a kernel that refused the read did so at an earlier start (as with
        adopted links: kept until a kernel, bcc, kpr or config change)."""
        from kpr.bpf.progcache import has_entry

        if self.program_cache is None or not (self.kernctx and kernctx.cflags()):
            return
        fresh = {self.calls_pin: self.CALLS_MAP}

        def cached() -> bool:
            return has_entry(text, self._programs(), cflags=self.cflags(), name=str(self.SOURCE),
                             cache=self.program_cache, fresh_pins=fresh)

        if cached():
            return
        self.kernctx = False
        if not cached():
            self.kernctx = True
        elif self.reads_csum_state is not None:
            log.warning("event=kernctx_fallback_cached prog=%s hint='the cached build infers the checksum state "
                        "(an earlier start could not load the read)'", self.ENTRIES[0])

    def _drop_compiled(self) -> None:
        self.progs.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    COUNTERS_ASIDE = "_before_upgrade"  # suffix of a counter pin set aside during a compile

    def _counter_maps(self) -> tuple[tuple[str, int], ...]:
        return ((self.FWD_MAP, FWD_SLOTS), (self.STATS_MAP, len(STATS)))

    def set_aside_old_counters(self) -> list[tuple[str, int]]:
        """Move this build's kpr_np_fwd (kpr_np_stats) aside when an older kpr pinned it with
        fewer slots, so the compile pins one of KPR_NP_FWD_MAX (KPR_NP_ST_MAX): bcc would adopt
        the old pin as it is, and every increment past its end (the per-kind cached-send
        slots, a new counter) would be lost without a word. Returns (map, old slots) of each
        moved; restore_old_counters() puts them back (a failed compile),
        carry_old_counters() adds their sums into the new maps and unpins them."""
        aside = []
        for name, want in self._counter_maps():
            path, kept = self.pin / name, self.pin / (name + self.COUNTERS_ASIDE)
            if kept.exists():  # a start that died between the move and its end
                if path.exists():
                    kept.unlink()
                else:
                    os.replace(kept, path)
            try:
                with M.BpfMap.open_pinned(path) as m:
                    slots = m.info().max_entries
            except FileNotFoundError:
                continue
            if slots >= want:
                continue
            os.replace(path, kept)  # (bpffs renames pins; the map and its users stay)
            aside.append((name, slots))
        return aside

    def restore_old_counters(self, aside: list[tuple[str, int]]) -> None:
        """Put the pins set_aside_old_counters() moved back (over any pin the failed compile made)."""
        for name, _slots in aside:
            os.replace(self.pin / (name + self.COUNTERS_ASIDE), self.pin / name)
            log.warning("event=nodeport_counters_kept map=%s reason=load_failed", self.pin / name)

    def carry_old_counters(self, aside: list[tuple[str, int]]) -> None:
        """Add the per-CPU sums of the moved pins into this build's new counter maps (the old
        counters keep their slot index: new ones are appended) and unpin the old maps.
        Increments the old programs make after this, until the new ones replace them, are lost."""
        from kpr.bpf import percpu

        for name, slots in aside:
            kept = self.pin / (name + self.COUNTERS_ASIDE)
            with M.BpfMap.open_pinned(kept) as old, M.BpfMap.open_pinned(self.pin / name) as new:
                percpu.add_u64(old, new, slots)
                want = new.info().max_entries
            kept.unlink()
            log.warning("event=nodeport_counters_grown map=%s max_entries_old=%d max_entries=%d carried=%d",
                        self.pin / name, slots, want, slots)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        for p in self.progs.values():
            if hasattr(p, "close"):  # adopted (kpr.bpf.builds); bcc closes its own
                p.close()
        self._drop_compiled()

    def drop_other_generations(self) -> list[str]:
        """Unpin the stage arrays of earlier builds (call once this build's entries are attached
        everywhere: an entry still attached from an earlier build would lose its stages)."""
        gone = []
        for p in sorted(self.pin.glob(f"{self.CALLS_MAP}*")):
            if p.name != self.calls_pin and (p.name == self.CALLS_MAP or p.name.startswith(f"{self.CALLS_MAP}_")):
                try:
                    p.unlink()
                    gone.append(p.name)
                except FileNotFoundError:
                    continue
        if gone:
            log.info("event=nodeport_old_stage_arrays_unpinned pins=%s", ",".join(gone))
        return gone

    def fd(self, name: str) -> int:
        return int(self.progs[name].fd)

    def prog_id(self, name: str) -> int:
        return int(M.prog_info(self.fd(name)).id)

    # ------------------------------------------------------------------ counters

    def stats(self) -> dict[str, int]:
        """This build's counters summed over CPUs ({} when not loaded)."""
        from kpr.bpf import percpu

        stats, fwd = self.maps.get(self.STATS_MAP), self.maps.get(self.FWD_MAP)
        if stats is None or fwd is None:
            return {}
        out = dict(zip(STATS, percpu.u64_sums(stats, len(STATS))))
        sums = percpu.u64_sums(fwd, FWD_SLOTS)
        out.update({name: sums[i] for i, name in FWD_STATS.items()})
        # the cached-next-hop sends, one slot per kind in the map: each was a redirect out of a
        # device of that kind, from the cache (fwd_nh_cached is never written by the programs)
        out["fwd_nh_cached"] = 0
        for i, egress in FWD_CACHED.items():
            out["fwd_nh_cached"] += sums[i]
            out["fwd_redirect"] += sums[i]
            out[egress] += sums[i]
        return out

    def own_sizes(self) -> dict[str, int]:
        """max_entries of the plugin's pinned maps (a pin from an earlier run keeps its size)."""
        return {name: m.info().max_entries for name, m in self.maps.items() if name in OWN_MAPS}

    # ------------------------------------------------------------------ plugin-owned maps

    def invalidate_next_hops(self) -> int:
        """As the agent does when routes or neighbours change (and once at start, which arms the cache)."""
        return invalidate_next_hops(self.maps[NH_MAP])

    def set_vips(self, addresses: Iterable[str]) -> None:
        """kpr_np_vip, and the announced-address bits of kpr_np_ports the early exit tests first:
        a bit is set before its address is added and cleared after it is removed."""
        want = {M.addr_to_bytes(a): M.U32.pack(1) for a in addresses}
        m = self.maps[VIP_MAP]
        self._set_words(VIP_BITS, VIP_WORDS, _vip_words(set(want) | set(m.keys())))
        sync_map(m, want)
        self._set_words(VIP_BITS, VIP_WORDS, _vip_words(want))

    def set_frontend_ports(self, ports: Iterable[tuple[int, int]], *, keep: bool = False) -> None:
        """kpr_np_ports: every (port, protocol number) of a frontend reached from outside, as the
        bitmap the programs' fast exit tests; then armed (before, nothing exits early). `keep`
        adds to the ports already there instead of replacing them.

        Tests and benchmarks only; written here, not through kpr.nodeport.tables, and that is
        harmless: the same order as the agent's set_ports (port words, the armed word, then
        kpr_np_unserved's words), each word written once and only where it differs, so a
        program (which reads one of the two: kpr_np_unserved, or the port word and the armed
        word) sees each word go from its old value to its new one, as with the agent's."""
        words: dict[int, int] = {}
        if keep:
            for k, v in self.maps[PORTS_MAP].items():
                i = M.U32.unpack(k)[0]
                if i < PORTS_ARMED:
                    words[i] = struct.unpack("=Q", v)[0]
        for port, proto in ports:
            pb = port_bit(port, proto)
            if pb is not None:
                words[pb[0]] = words.get(pb[0], 0) | pb[1]
        self._set_words(0, PORTS_ARMED, words)
        self._set_words(PORTS_ARMED, 1, {PORTS_ARMED: 1})
        _set_array_words(self.maps[UNSERVED_MAP], unserved_words(words, True))

    def _set_words(self, first: int, count: int, words: Mapping[int, int]) -> None:
        """kpr_np_ports words first..first+count as given (absent: zero), where they differ. A map
        pinned by a build with fewer words keeps them absent (its programs then look up)."""
        _set_array_words(self.maps[PORTS_MAP], {i: words.get(i, 0) for i in range(first, first + count)})

    def set_modes(self, modes: Mapping[tuple[str, int, int], str]) -> None:
        """kpr_np_fe: (address, port, protocol number) -> mode, for frontends overriding the default;
        kpr_np_nomode's bits as the agent's tables write them: cleared for every port with a key
        now or to come before the keys change, then set for every port left without one."""
        want = {
            NP_FE_KEY.pack(M.addr_to_bytes(addr), M.htons(port), proto): NP_FE.pack(MODES[mode])
            for (addr, port, proto), mode in modes.items()
        }
        nomode = self.maps[NOMODE_MAP]
        sync_modes(self.maps[FE_MAP], want,
                   lambda keys: _set_array_words(nomode, nomode_words({mode_key_port(k) for k in keys})))
