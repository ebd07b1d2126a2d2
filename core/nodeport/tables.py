"""The NodePort maps the facility owns (lib/nodeport.h): created here when not pinned yet, so
they exist before any plugin loads its programs, and written here only.

  kpr_np_rev       reverse translations (written by the programs, collected by gc.py)
  kpr_np_fe        per-frontend modes (services annotated service.kpr.io/lb-mode)
  kpr_np_vip       announced addresses
  kpr_np_nodeaddr  node addresses
  kpr_np_dev       SNAT addresses per external device (key 0: the node's defaults)
  kpr_np_devkind   what every link of the namespace is (kpr.netdevs)
  kpr_np_ports     the fast exit's bitmaps: frontend ports, announced-address bits
  kpr_np_unserved  the port words inverted once armed (zero before): what the programs test
  kpr_np_nomode    a bit per port no kpr_np_fe key has (zero: unknown): the programs then take
                   the default mode without the kpr_np_fe lookup
  kpr_np_nh        next hops the programs cache per backend; written here: the generation
                   (kpr.nexthops bumps it when routes or neighbours change)
  kpr_snat_slots   new SNAT flows' reply sides (lib/nat.h; slots freed by gc.py)
  kpr_snat_gate    whether kpr_snat may hold reverse entries (gc.py marks it clean)

Pins of maps no kpr build uses any more (OBSOLETE_PINS) are removed as the tables open: the
SNAT port table of issue 14 (kpr_snat_ports, 10 MiB) was dropped, never on by default.

Per-service changes are written as differences (`apply`): a word of kpr_np_ports, a key of
kpr_np_vip or kpr_np_fe at a time, from a mirror of the words, never by dumping a map.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from kpr.bpf import abi
from kpr.bpf import maps as M
from kpr.bpf.slots import SLOT_SIZE

from . import datapath as D
from .services import Change, ModeKey, PortKey

log = logging.getLogger(__name__)

_WORD = struct.Struct("=Q")
# maps an older kpr pinned that no build declares now (issue 14's SNAT port table)
OBSOLETE_PINS = ("kpr_snat_ports", "kpr_snat_ports_used", "kpr_snat_cursor")


def specs(rev_size: int) -> list[M.MapSpec]:
    """The maps as lib/nodeport.h declares them (kpr_np_rev sized like conntrack)."""
    return [
        M.MapSpec(D.REV_MAP, M.BPF_MAP_TYPE_LRU_HASH, D.CT_KEY.size, D.NP_REV.size, rev_size, "KPR_NP_REV_MAX"),
        M.MapSpec(D.FE_MAP, M.BPF_MAP_TYPE_HASH, D.NP_FE_KEY.size, D.NP_FE.size, abi.value("KPR_NP_FE_MAX")),
        M.MapSpec(D.VIP_MAP, M.BPF_MAP_TYPE_HASH, 16, 4, abi.value("KPR_NP_VIP_MAX")),
        M.MapSpec(D.NODEADDR_MAP, M.BPF_MAP_TYPE_HASH, 16, 4, abi.value("KPR_NP_NODEADDR_MAX")),
        M.MapSpec(D.DEV_MAP, M.BPF_MAP_TYPE_HASH, 4, D.NP_DEV.size, abi.value("KPR_NP_DEV_MAX")),
        M.MapSpec(D.DEVKIND_MAP, M.BPF_MAP_TYPE_HASH, 4, 4, abi.value("KPR_NP_DEVKIND_MAX")),
        M.MapSpec(D.PORTS_MAP, M.BPF_MAP_TYPE_ARRAY, 4, 8, D.VIP_BITS + D.VIP_WORDS),
        M.MapSpec(D.UNSERVED_MAP, M.BPF_MAP_TYPE_ARRAY, 4, 8, D.UNSERVED_WORDS),
        M.MapSpec(D.NOMODE_MAP, M.BPF_MAP_TYPE_ARRAY, 4, 8, D.NOMODE_WORDS),
        M.MapSpec(D.NH_MAP, M.BPF_MAP_TYPE_ARRAY, 4, D.NP_NH.size, abi.value("KPR_NP_NH_MAX")),
        # (lib/nat.h: the collector frees slots in its memory; the gate's clean word likewise)
        M.MapSpec(D.SNAT_SLOTS_MAP, M.BPF_MAP_TYPE_ARRAY, 4, SLOT_SIZE, abi.value("KPR_SNAT_SLOTS_N"),
                  flags=M.BPF_F_MMAPABLE),
        M.MapSpec(D.SNAT_GATE_MAP, M.BPF_MAP_TYPE_ARRAY, 4, D.SNAT_GATE.size, 1, flags=M.BPF_F_MMAPABLE),
    ]


port_word = D.port_bit  # (kpr_np_ports word, bit) of a frontend port (host order), None for other protocols


def _mode_key(mk: ModeKey) -> bytes:
    addr, port, proto = mk
    return D.NP_FE_KEY.pack(M.addr_to_bytes(addr), M.htons(port), proto)


class NodePortTables(D.DeviceMaps):
    """Handles on the facility's maps, and the writes to them."""

    def __init__(self, pin: Path, rev_size: int) -> None:
        self.pin = Path(pin)
        self.maps: dict[str, M.BpfMap] = {}
        created = []
        try:
            for spec in specs(rev_size):
                path = self.pin / spec.name
                if path.exists():
                    self.maps[spec.name] = M.BpfMap.open_pinned(path)
                    continue
                m = M.BpfMap.create(spec)
                try:
                    m.pin(path)
                except OSError:
                    m.close()
                    if not path.exists():
                        raise
                    m = M.BpfMap.open_pinned(path)  # pinned meanwhile by a program's load
                else:
                    created.append(spec.name)
                self.maps[spec.name] = m
            for name in OBSOLETE_PINS:  # an older kpr's; a program still attached keeps its own reference
                (self.pin / name).unlink(missing_ok=True)
            ports = self.maps[D.PORTS_MAP]
            self._nwords = ports.info().max_entries
            # the words as the map holds them: later writes compare against this mirror
            self._words = {M.U32.unpack(k)[0]: _WORD.unpack(v)[0] for k, v in ports.items()}
            self._unserved = {M.U32.unpack(k)[0]: _WORD.unpack(v)[0] for k, v in self.maps[D.UNSERVED_MAP].items()}
            self._nomode = {M.U32.unpack(k)[0]: _WORD.unpack(v)[0] for k, v in self.maps[D.NOMODE_MAP].items()}
            # kpr_np_fe's keys as the map holds them (an earlier run's too: a port's bit is set
            # only once none of them is left), and how many of them each (port, protocol) has;
            # kpr_np_nomode written from them at once (an older kpr's pins have none, a hand
            # edit may disagree): only these tables write kpr_np_fe
            self._mode_keys: set[bytes] = set()
            self._mode_ports: Counter[tuple[int, int]] = Counter()
            self._modes_present(bytes(k) for k in self.maps[D.FE_MAP].keys())
            self._put(D.NOMODE_MAP, self._nomode, D.nomode_words(self._mode_ports))
        except BaseException:
            self.close()
            raise
        self._vip_bits: Counter[int] = Counter()  # vip_hash -> announced addresses written with it
        log.info("event=nodeport_tables_open pin_path=%s created=%s", self.pin, ",".join(created) or "-")

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    # ------------------------------------------------------------------ small maps, whole

    # set_devices, set_device_kinds, set_node_addresses: D.DeviceMaps's, the lab's Datapath's too

    # ------------------------------------------------------------------ by difference

    def _write_words(self, words: Mapping[int, int]) -> None:
        """kpr_np_ports words, and kpr_np_unserved's for the port words among them (all of them
        when the armed word is written: arming fills it, disarming clears it)."""
        self._put(D.PORTS_MAP, self._words, {i: w for i, w in words.items() if i < self._nwords})
        armed = bool(self._words.get(D.PORTS_ARMED))
        idx = range(D.UNSERVED_WORDS) if D.PORTS_ARMED in words else [i for i in words if i < D.UNSERVED_WORDS]
        self._put(D.UNSERVED_MAP, self._unserved, {i: D.unserved_word(self._words.get(i, 0), armed) for i in idx})

    def _put(self, name: str, mirror: dict[int, int], words: Mapping[int, int]) -> None:
        """The words of u64 array `name` that differ from `mirror` (what it holds), written."""
        up = {i: w for i, w in words.items() if mirror.get(i, 0) != w}
        if up:
            m = self.maps[name]
            try:
                m.update_many([M.U32.pack(i) for i in up], [_WORD.pack(w) for w in up.values()])
            except BaseException:
                # a batch may stop part way: the words tried are read back, so the mirror says
                # what the map holds and the next write of them is not skipped as unchanged
                self._reread(m, mirror, up)
                raise
            mirror.update(up)

    @staticmethod
    def _reread(m: M.BpfMap, mirror: dict[int, int], idx: Iterable[int]) -> None:
        """The mirror's words `idx` read back from `m` (one that cannot be read keeps its entry:
        kpr_np_ports' mirror is also the base its bits are added to)."""
        for i in idx:
            try:
                v = m.lookup(M.U32.pack(i))
            except OSError:
                continue
            if v is not None:
                mirror[i] = _WORD.unpack(v)[0]

    def add_ports(self, ports: Iterable[PortKey]) -> None:
        words: dict[int, int] = {}
        for port, proto in ports:
            pw = port_word(port, proto)
            if pw is not None:
                words[pw[0]] = words.get(pw[0], self._words.get(pw[0], 0)) | pw[1]
        self._write_words(words)

    def remove_ports(self, ports: Iterable[PortKey]) -> None:
        words: dict[int, int] = {}
        for port, proto in ports:
            pw = port_word(port, proto)
            if pw is not None:
                words[pw[0]] = words.get(pw[0], self._words.get(pw[0], 0)) & ~pw[1]
        self._write_words(words)

    def set_ports(self, ports: Iterable[PortKey]) -> None:
        """Exactly these frontend ports (the initial sync's end), then armed."""
        words = {i: 0 for i in range(D.PORTS_ARMED)}
        for port, proto in ports:
            pw = port_word(port, proto)
            if pw is not None:
                words[pw[0]] |= pw[1]
        self._write_words(words)
        self.arm()

    def invalidate_next_hops(self) -> int:
        return D.invalidate_next_hops(self.maps[D.NH_MAP])

    def disarm_next_hops(self) -> None:
        D.disarm_next_hops(self.maps[D.NH_MAP])

    def arm(self) -> None:
        """Until armed, the programs' fast exit lets every packet through to the lookups."""
        self._write_words({D.PORTS_ARMED: 1})

    def add_vips(self, addresses: Iterable[str]) -> None:
        """An announced address's bit is set before the address is added."""
        keys = [M.addr_to_bytes(a) for a in addresses]
        if not keys:
            return
        words: dict[int, int] = {}
        for k in keys:
            h = D.vip_hash(k)
            self._vip_bits[h] += 1
            i = D.VIP_BITS + (h >> 6)
            words[i] = words.get(i, self._words.get(i, 0)) | 1 << (h & 63)
        self._write_words(words)
        self.maps[D.VIP_MAP].update_many(keys, [M.U32.pack(1)] * len(keys))

    def remove_vips(self, addresses: Iterable[str]) -> None:
        """... and cleared after it is removed (when no other address shares it)."""
        keys = [M.addr_to_bytes(a) for a in addresses]
        if not keys:
            return
        self.maps[D.VIP_MAP].delete_many(keys)
        words: dict[int, int] = {}
        for k in keys:
            h = D.vip_hash(k)
            self._vip_bits[h] -= 1
            if self._vip_bits[h] <= 0:
                del self._vip_bits[h]
                i = D.VIP_BITS + (h >> 6)
                words[i] = words.get(i, self._words.get(i, 0)) & ~(1 << (h & 63))
        self._write_words(words)

    def set_vips(self, addresses: Iterable[str]) -> None:
        """Exactly these announced addresses (start, node address changes): whatever the map
        holds besides them goes."""
        want = {M.addr_to_bytes(a): a for a in addresses}
        have = {bytes(k) for k in self.maps[D.VIP_MAP].keys()}
        self._vip_bits.clear()
        words = {D.VIP_BITS + i: 0 for i in range(D.VIP_WORDS)}
        for k in set(want) | have:  # bits of every address present or coming, first
            h = D.vip_hash(k)
            words[D.VIP_BITS + (h >> 6)] |= 1 << (h & 63)
        self._write_words(words)
        gone = [k for k in have if k not in want]
        if gone:
            self.maps[D.VIP_MAP].delete_many(gone)
        if want:
            self.maps[D.VIP_MAP].update_many(list(want), [M.U32.pack(1)] * len(want))
        words = {D.VIP_BITS + i: 0 for i in range(D.VIP_WORDS)}
        for k in want:
            h = D.vip_hash(k)
            self._vip_bits[h] += 1
            words[D.VIP_BITS + (h >> 6)] |= 1 << (h & 63)
        self._write_words(words)

    # ------------------------------------------------------------------ per-frontend modes

    def _modes_present(self, keys: Iterable[bytes]) -> None:
        """kpr_np_fe keys that are (or may be, a write under way) in the map: their ports' bits
        in kpr_np_nomode cleared, before the keys are written. The words of every key's port
        are written, not only a new key's: one whose clearing failed is known already, and a
        later write of it (a mode change) clears its bit then (unchanged words cost nothing)."""
        keys = list(keys)
        new = [k for k in keys if k not in self._mode_keys]
        self._mode_keys.update(new)
        self._mode_ports.update(D.mode_key_port(k) for k in new)
        self._write_nomode({D.mode_key_port(k) for k in keys})

    def _modes_gone(self, keys: Iterable[bytes]) -> None:
        """kpr_np_fe keys deleted: the bits of ports left without a key set, after the delete."""
        ports = []
        for k in keys:
            if k in self._mode_keys:
                self._mode_keys.discard(k)
                port = D.mode_key_port(k)
                self._mode_ports[port] -= 1
                if self._mode_ports[port] <= 0:
                    del self._mode_ports[port]
                ports.append(port)
        self._write_nomode(ports)

    def _write_nomode(self, ports: Iterable[tuple[int, int]]) -> None:
        """kpr_np_nomode's words holding these ports, from the keys known (_mode_ports)."""
        idx = {pb[0] for pb in (D.port_bit(port, proto) for port, proto in ports) if pb is not None}
        if idx:
            self._put(D.NOMODE_MAP, self._nomode, D.nomode_words(self._mode_ports, idx))

    def set_modes(self, modes: Mapping[ModeKey, str]) -> None:
        """Exactly these per-frontend modes (the sync's end: an earlier run's others go);
        kpr_np_nomode then has the bit of every port left without one set."""
        want = {_mode_key(k): D.NP_FE.pack(D.MODES[m]) for k, m in modes.items()}
        D.sync_modes(self.maps[D.FE_MAP], want, self._modes_exactly)

    def _modes_exactly(self, keys: list[bytes]) -> None:
        """kpr_np_nomode for exactly these kpr_np_fe keys (D.sync_modes): their ports' bits
        cleared, then those of the known keys not among them set (none is in kpr_np_fe)."""
        kept = set(keys)
        self._modes_present(keys)
        self._modes_gone([k for k in self._mode_keys if k not in kept])
        self._put(D.NOMODE_MAP, self._nomode, D.nomode_words(self._mode_ports))

    def apply(self, ch: Change, *, vip_filter: set[str], keep_ports: bool) -> None:
        """One service's change. Announced addresses in `vip_filter` (the node's own) are not
        announced; `keep_ports`: ports only added (before the initial sync is complete)."""
        self.add_ports(ch.ports_added)
        self.add_vips(ch.vips_added - vip_filter)
        if ch.modes_set:
            keys = [_mode_key(k) for k in ch.modes_set]
            self._modes_present(keys)
            self.maps[D.FE_MAP].update_many(keys, [D.NP_FE.pack(D.MODES[m]) for m in ch.modes_set.values()])
        if ch.modes_removed:
            keys = [_mode_key(k) for k in ch.modes_removed]
            self.maps[D.FE_MAP].delete_many(keys)
            self._modes_gone(keys)
        self.remove_vips(ch.vips_removed - vip_filter)
        if not keep_ports:
            self.remove_ports(ch.ports_removed)
