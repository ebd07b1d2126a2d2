"""The host routing programs (bpf/host_routing.c over core/bpf/lib/host_routing.h) and the maps
the plugin writes: local pods, devices; counters read back for status.

Counter names, flags and struct packers are read from lib/host_routing.h (kpr.bpf.abi);
tests/kernel/test_host_routing_prog.py checks them against bcc's view of the C.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.bpf import abi
from kpr.bpf import maps as M
from kpr.nodeport.datapath import CT_F_NODE_PORT
from kpr.nodeport.datapath import sync_map

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "bpf" / "host_routing.c"

# Entry programs (kpr_* marks kpr's programs for tc, tcx and `kpr cleanup`).
FROM_NETDEV, FROM_POD, TO_POD = "kpr_hr_from_netdev", "kpr_hr_from_pod", "kpr_hr_to_pod"
ENTRIES = (FROM_NETDEV, FROM_POD, TO_POD)

# kpr_hr_stats slots in KPR_HR_ST_* order (lib/host_routing.h, via kpr.bpf.abi), each named by
# its C suffix in lower case, or by its published name (status, metrics) where that differs.
STATS = abi.counters(
    "KPR_HR_ST_",
    names={
        "PEER": "redirect_peer",
        "NEIGH": "redirect_neigh",
        "SVC_NEW": "service_new",
        "SVC_ESTABLISHED": "service_established",
        "SVC_REVNAT": "service_revnat",
        "CT_FAILED": "conntrack_write_failed",
        "SVC_HAIRPIN": "service_hairpin",
        "NEIGH_OVERLAY": "redirect_neigh_overlay",
        "OUT_CACHED": "out_route_cached",
    },
)
PASS_STATS = tuple(s for s in STATS if s.startswith("pass_"))

PODS_MAP, DEVS_MAP, STATS_MAP = "kpr_hr_pods", "kpr_hr_devs", "kpr_hr_stats"
NH_MAP = "kpr_hr_nh"  # next hops of pods behind peers, learned by the programs (bpf_redirect_peer builds only)
# routes of pods' packets leaving the node and their generation (KPR_HR_OUT_CACHE builds with bpf_redirect_neigh)
OUT_MAP, GEN_MAP = "kpr_hr_out", "kpr_hr_gen"
OWN_MAPS = (PODS_MAP, DEVS_MAP)
_CT_FLAGS = struct.Struct("=H")
FLOWS_MAP = "kpr_hr_flows"  # pinned: set once a per-packet service flow was made (KPR_HR_CT_GATE)

# lib/host_routing.h's structs and flags: fields positionally in header order (tests/test_abi.py).
POD = abi.packer("kpr_hr_pod")  # ifindex, flags
DEV = abi.packer("kpr_hr_dev")  # flags, kind, gw_mac, pad

DEV_F_EXTERNAL, DEV_F_POD, DEV_F_BRIDGE, DEV_F_L2, DEV_F_OVERLAY = (
    abi.value(f"KPR_HR_DEV_F_{n}") for n in ("EXTERNAL", "POD", "BRIDGE", "L2", "OVERLAY")
)


@dataclass(frozen=True)
class DevEntry:
    flags: int
    kind: int = 0
    gw_mac: str = ""  # "aa:bb:..." for bridge ports


@dataclass(frozen=True)
class Helpers:
    """Which helper carries each direction (after probes and config)."""

    peer: bool  # into pods: bpf_redirect_peer (else bpf_redirect)
    neigh: bool  # out of the node: bpf_redirect_neigh (else the stack)

    @property
    def to_pod(self) -> str:
        return "bpf_redirect_peer" if self.peer else "bpf_redirect"

    @property
    def to_netdev(self) -> str:
        return "bpf_redirect_neigh" if self.neigh else "stack"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "")) if text else bytes(6)


class Datapath:
    """The loaded programs of one agent and the plugin's maps."""

    def __init__(self, pin: Path | str, helpers: Helpers, *, cluster_ip: bool = True, max_pods: int = 16384,
                 extra_cflags: Iterable[str] = ()) -> None:
        self.pin = Path(pin)
        self.helpers = helpers
        self.cluster_ip = cluster_ip
        self.max_pods = max_pods
        # kpr_hr_pods' real size: an earlier run's pin is adopted as it is (another maxPods then)
        self.pods_capacity = max_pods
        self._last_gen = 0  # the last generation bump_out_generation wrote
        # bump_out_generation's read and write as one step: the sync's thread and kpr.nexthops'
        # both bump, and a bump whose write lands after another's (read before it) would move the
        # generation back and make entries remembered since trusted again
        self._gen_lock = threading.Lock()
        self.extra_cflags = list(extra_cflags)
        self.sizes: dict[str, int] = {}
        self.maglev_size = M.MAGLEV_DEFAULT_SIZE
        self.bpf: Any = None
        self.progs: dict[str, Any] = {}
        self.maps: dict[str, M.BpfMap] = {}

    def cflags(self) -> list[str]:
        return M.cflags(self.pin, self.sizes, maglev_size=self.maglev_size) + [
            f"-DKPR_HR_PEER={int(self.helpers.peer)}",
            f"-DKPR_HR_NEIGH={int(self.helpers.neigh)}",
            f"-DKPR_HR_CLUSTER_IP={int(self.cluster_ip)}",
            f"-DKPR_HR_PODS_MAX={self.max_pods}",
            *self.extra_cflags,
        ]

    def load(self) -> "Datapath":
        from kpr.bpf.loader import compile_and_load, load_prog

        fresh_gate = not (self.pin / FLOWS_MAP).exists()
        self.bpf = compile_and_load(SOURCE, cflags=self.cflags())
        try:
            for name in ENTRIES:
                self.progs[name] = load_prog(self.bpf, name, "SCHED_CLS")
            for name in OWN_MAPS:
                self.maps[name] = M.BpfMap.open_pinned(self.pin / name)
            self.pods_capacity = self.maps[PODS_MAP].info().max_entries
            if self.pods_capacity != self.max_pods:
                log.warning("event=host_routing_pinned_size map=%s pinned=%d max_pods=%d: kept; `kpr cleanup` and a "
                            "restart resize it", PODS_MAP, self.pods_capacity, self.max_pods)
            if fresh_gate:
                self._open_gate_for_adopted_flows()
        except BaseException:
            self.close()
            raise
        log.info("event=host_routing_loaded to_pod=%s to_netdev=%s cluster_ip=%s", self.helpers.to_pod,
                 self.helpers.to_netdev, self.cluster_ip)
        return self

    def _open_gate_for_adopted_flows(self) -> None:
        """A kpr_hr_flows made by this load (KPR_HR_CT_GATE) beside an adopted kpr_ct holding
        per-packet flows (programs of a kpr without the gate made them): their replies must
        still be reversed, so the gate starts open (else they reach the pod from the backend's
        address until some new flow opens it)."""
        if not (self.pin / FLOWS_MAP).exists() or not (self.pin / "kpr_ct").exists():
            return  # built without the gate or without per-packet services
        with M.BpfMap.open_pinned(self.pin / "kpr_ct") as ct:
            # kpr_ct_entry.flags at 16 (lib/conntrack.h; an older kpr's shorter values too)
            if all(_CT_FLAGS.unpack_from(v, M.CtEntry.flags.offset)[0] & CT_F_NODE_PORT for _, v in ct.items()):
                return
        with M.BpfMap.open_pinned(self.pin / FLOWS_MAP) as flows:
            flows.update(M.U32.pack(0), M.U32.pack(1))
        log.info("event=host_routing_gate_opened reason=adopted_flows")

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        self.progs.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def fd(self, name: str) -> int:
        return int(self.progs[name].fd)

    def stats(self) -> dict[str, int]:
        bpf = self.bpf
        if bpf is None:
            return {}
        table = bpf[STATS_MAP.encode()]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(STATS)}

    def next_hops(self) -> dict[str, int]:
        """kpr_hr_nh: pod address -> ifindex the programs remembered from their FIB lookups."""
        table = self._nh_table()
        if table is None:
            return {}
        return {M.bytes_to_addr(bytes(k)): int(v.ifindex) for k, v in table.items()}

    def flush_next_hops(self) -> int:
        """Forget what the programs learned from the FIB (after links or routes changed: a new
        MTU, a device gone); the next packet to each pod asks the FIB again."""
        table = self._nh_table()
        if table is None:
            return 0
        keys = list(table.keys())
        for k in keys:
            try:
                del table[k]
            except KeyError:  # evicted meanwhile
                pass
        return len(keys)

    def _nh_table(self) -> Any:
        if self.bpf is None or not self.helpers.peer:
            return None
        try:
            return self.bpf.get_table(NH_MAP.encode())
        except KeyError:  # built without it (-DKPR_HR_NH_CACHE=0)
            return None

    def bump_out_generation(self) -> int:
        """Every route kpr_hr_out remembers, and every pod next hop kpr_hr_nh does (KPR_HR_CACHE_FIRST
        builds, where they stand in for the kpr_hr_pods lookup), is looked up again (kpr.nexthops
        calls this on route and neighbour changes and every few seconds, the sync after link
        changes and right after every kpr_hr_pods change); the first call arms the caches. Returns
        the new generation (0: built without them)."""
        table = self._table(GEN_MAP)
        if table is None:
            return 0
        key = table.Key(0)
        with self._gen_lock:
            # never 0 ("not armed"), and never a number this load used before: after disarm_out the
            # count goes on from the last one, else entries of that earlier generation, still in the
            # maps, would be trusted again
            gen = max(int(table[key].value), self._last_gen) % 0xFFFFFFFF + 1
            table[key] = table.Leaf(gen)
            self._last_gen = gen
        return gen

    def out_generation_armable(self) -> bool:
        """Whether this build remembers routes out of the node (kpr_hr_out)."""
        return self._table(GEN_MAP) is not None

    def disarm_out(self) -> None:
        """Generation 0: the programs neither use nor keep routes (programs left attached while no
        agent watches the routes ask the FIB for every packet)."""
        table = self._table(GEN_MAP)
        if table is not None:
            with self._gen_lock:
                table[table.Key(0)] = table.Leaf(0)

    def out_routes(self) -> dict[tuple[str, str], int]:
        """kpr_hr_out entries of the current generation: (pod, destination) -> egress ifindex."""
        gens, table = self._table(GEN_MAP), self._table(OUT_MAP)
        if gens is None or table is None:
            return {}
        gen = int(gens[gens.Key(0)].value)
        if not gen:
            return {}
        return {(M.bytes_to_addr(bytes(k.saddr)), M.bytes_to_addr(bytes(k.daddr))): int(v.ifindex)
                for k, v in table.items() if int(v.gen) == gen}

    def _table(self, name: str) -> Any:
        if self.bpf is None:
            return None
        try:
            return self.bpf.get_table(name.encode())
        except KeyError:  # not in this build (-DKPR_HR_OUT_CACHE=0, or without bpf_redirect_neigh)
            return None

    # The NodePort data path's map sync: write what differs, delete what is not wanted.
    _sync = staticmethod(sync_map)

    def set_pods(self, pods: Mapping[str, int]) -> tuple[int, int]:
        """kpr_hr_pods: pod address -> ifindex of the device its route names; (written, removed)."""
        m = self.maps[PODS_MAP]
        want = {M.addr_to_bytes(a): POD.pack(idx, 0) for a, idx in pods.items()}
        # the plan fills the map up to its size (max_pods): the shared sync takes gone pods out
        # before it writes new ones
        return self._sync(m, want)

    def set_devices(self, devices: Mapping[int, DevEntry]) -> tuple[int, int]:
        """kpr_hr_devs: ifindex -> flags, kind, gateway MAC."""
        want = {M.U32.pack(idx): DEV.pack(d.flags, d.kind, _mac(d.gw_mac), 0) for idx, d in devices.items()}
        return self._sync(self.maps[DEVS_MAP], want)
