"""A reference load balancer of Katran's shape (kpr/testing/reference_lb.c: kpr's own code from
Katran's published design, not Katran) loaded with its maps filled, for issue 14's XDP benchmark
(kpr.testing.nodeport_bench, --no-reference skips it) and tests/kernel/test_reference_lb.py.

Issue 14's XDP goals are Katran's figures from one run on another machine; a new flow's cost is
mostly cold cache lines, whose price moves with the machine (kpr.testing.coldline). This program,
measured beside kpr's by the same methods in the same run, makes the comparison one of this
machine: Katran's fast path (VIP hash, LRU connection table, Maglev ring, IPIP, per-CPU
counters) and its bookkeeping, without its features the benchmark never reaches.

Two builds: `main` (Katran's defaults: 512 VIPs, 65537-slot rings; the measured VIP, the lab's
VIP:80, with 100 reals; in a lab with fillers a second main build serves them, the scale rows'
base at Katran's ring size) and `scale` (65536 VIPs of 257-slot rings, every lab filler frontend a
VIP with its one real; the same map sizes in every lab, so only the VIP count differs between
the rows at 10 and 50000 services: 65537-slot rings for 50000 VIPs would take 26 GB, 8-byte
array values).

The connection tables are Katran's: one LRU hash of LRU entries per CPU (created here, put in
the program's array of maps), the program's own LRU the fallback. Katran's default is 8,000,000
entries split over the forwarding cores, so a table here is smaller than Katran's and a new flow's
insert probably no dearer than Katran's at its defaults.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("reference_lb.c")
HASH_SEED = 0x2A1B3C4D  # REF_HASH_SEED
# ref_stats entries after the per-VIP ones (REF_LRU_CNTRS ... in the program): name -> (entry, v1 or v2)
CNTRS = {"lru_total": (0, 0), "lru_miss": (0, 1), "tcp_syn_miss": (1, 0), "tcp_nonsyn_miss": (1, 1),
         "fallback_lru": (3, 0), "xdp_total": (4, 0), "xdp_tx": (5, 0), "xdp_drop": (6, 0), "xdp_pass": (7, 0)}
CNTR_ENTRIES = 8  # REF_CNTRS
MAX_CPUS = 128  # REF_MAX_CPUS
BUILDS = {
    # name: (VIPs, ring slots per VIP, reals)
    "main": (512, 65537, 4096),
    "scale": (65536, 257, 65536 + 128),
}
LRU = 131072  # each CPU's connection table entries, as kpr_ct's default (KPR_CT_MAX)
FLOW_KEY, LRU_VAL = 40, 16  # struct ref_flow, struct ref_lru_val
GATEWAY_MAC = "02:00:00:00:00:02"  # the lab's next hop (nodeport_bench.MAC_OUT)


def _rol(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & 0xFFFFFFFF


def flow_hash(src: str, sport: int, dport: int) -> int:
    """ref_hash in the program: jhash's final mix of the source address and the ports, as the
    program reads them (network order words on a little-endian CPU)."""
    m = 0xFFFFFFFF
    a = (struct.unpack("<I", socket.inet_aton(src))[0] + 0xDEADBEEF) & m
    b = (struct.unpack("<I", struct.pack("!HH", sport, dport))[0] + 0xDEADBEEF) & m
    c = HASH_SEED
    for x, y, z, s in ((2, 1, 0, 14), (0, 2, 1, 11), (1, 0, 2, 25), (2, 1, 0, 16), (0, 2, 1, 4), (1, 0, 2, 14),
                       (2, 1, 0, 24)):
        v = [a, b, c]
        v[x] ^= v[y]
        v[x] = (v[x] - _rol(v[y], s)) & m
        a, b, c = v
    return c


def maglev(reals: int, size: int) -> list[int]:
    """A Maglev lookup table (Eisenbud et al.): every real, in turn, takes the next free slot of its
    own permutation (offset, skip) of the `size` (prime) slots; equal weights."""
    perms = []
    for r in range(reals):
        h1, h2 = struct.unpack("<II", hashlib.blake2b(struct.pack("<I", r), digest_size=8).digest())
        offset, skip = h1 % size, h2 % (size - 1) + 1
        perms.append([offset, skip, 0])  # next slot: (offset + j * skip) % size
    table = [-1] * size
    filled = 0
    while True:
        for r, p in enumerate(perms):
            while True:
                slot = (p[0] + p[2] * p[1]) % size
                p[2] += 1
                if table[slot] < 0:
                    break
            table[slot] = r
            filled += 1
            if filled == size:
                return table


class ReferenceLB:
    """One loaded build; quacks as a nodeport_bench build (fd, stats, flush_own_flows, close)."""

    warms_itself = True  # its established flows are set up by itself, not by kpr's default build

    def __init__(self, build: str = "main", *, max_conn_rate: int | None = None) -> None:
        """`max_conn_rate`: new connections per second per CPU before LRU inserts stop (the flood
        guard; default out of reach)."""
        from kpr.bpf import maps as M
        from kpr.bpf.loader import compile_and_load, load_prog

        self.vips, self.ring, self.reals = BUILDS[build]
        flags = [f"-DREF_LRU={LRU}", f"-DREF_VIPS={self.vips}", f"-DREF_RING={self.ring}", f"-DREF_REALS={self.reals}"]
        if max_conn_rate is not None:
            flags.append(f"-DREF_MAX_CONN_RATE={max_conn_rate}ULL")
        self.bpf = compile_and_load(SOURCE, cflags=flags, name=f"reference_lb_{build}")
        self.cpu_lrus: list[Any] = []
        try:
            self.prog = load_prog(self.bpf, "ref_balancer", "XDP")
            # one plain LRU hash per CPU (flags 0, as Katran's), found by the CPU's id
            with self._array("ref_lru_mapping") as outer:
                for cpu in range(min(os.cpu_count() or 1, MAX_CPUS)):
                    inner = M.BpfMap.create(M.MapSpec(f"ref_lru_cpu{cpu}", M.BPF_MAP_TYPE_LRU_HASH, FLOW_KEY,
                                                      LRU_VAL, LRU))
                    self.cpu_lrus.append(inner)
                    outer.update(struct.pack("<I", cpu), struct.pack("<I", inner.fd))
            gw = self.bpf[b"ref_ctl"]
            v = gw.Leaf()
            for i, b in enumerate(bytes.fromhex(GATEWAY_MAC.replace(":", ""))):
                v.mac[i] = b
            gw[gw.Key(0)] = v
        except BaseException:
            self.close()
            raise

    def fd(self, _prog: object = None) -> int:
        return self.prog.fd

    def _array(self, name: str) -> Any:
        from kpr.bpf import maps as M

        t = self.bpf[name.encode()]
        info = M.obj_info(t.get_fd())
        return M.BpfMap(os.dup(t.get_fd()), name, info.key_size, info.value_size, info.type)

    def set_vips(self, vips: list[tuple[Any, ...]], *, proto: int = socket.IPPROTO_TCP) -> None:
        """VIP i = (address, port, its reals' addresses[, its protocol: `proto`]): its ring i filled by Maglev (every slot
        the one real when there is one), the reals numbered in order from 1 (0 is no real, as
        Katran's)."""
        keys, vals, reals, rings = [], [], [], []
        by_count: dict[int, list[int]] = {}
        for i, (addr, port, rs, *p) in enumerate(vips):
            keys.append(socket.inet_aton(addr) + bytes(12) + struct.pack("!HBx", port, p[0] if p else proto))
            vals.append(struct.pack("<II", 0, i))
            first = len(reals) + 1
            reals += rs
            if len(rs) not in by_count:
                by_count[len(rs)] = maglev(len(rs), self.ring) if len(rs) > 1 else [0] * self.ring
            # an array's values lie 8 bytes apart in its memory (u32 slots too)
            rings.append(struct.pack(f"<{self.ring}Q", *(first + r for r in by_count[len(rs)]))
                         if len(rs) > 1 else struct.pack("<Q", first) * self.ring)
        assert len(vips) <= self.vips and len(reals) < self.reals, (len(vips), len(reals))
        with self._array("ref_ring") as ring, self._array("ref_reals") as rm:
            ring.mmap()[: sum(map(len, rings))] = b"".join(rings)
            rm.mmap()[24: 24 * (1 + len(reals))] = b"".join(socket.inet_aton(a) + bytes(20) for a in reals)
        self.bpf[b"ref_vips"].clear()
        with self._array("ref_vips") as vm:
            vm.update_blob(b"".join(keys), b"".join(vals), len(keys))
        log.info("event=reference_vips vips=%d reals=%d ring=%d", len(vips), len(reals), self.ring)

    def set_slot(self, vip_num: int, slot: int, real: int) -> None:
        """One ring slot (tests: a ring changed under an established flow)."""
        ring = self.bpf[b"ref_ring"]
        ring[ring.Key(vip_num * self.ring + slot)] = ring.Leaf(real)

    def slot_real(self, vip_num: int, slot: int) -> int:
        ring = self.bpf[b"ref_ring"]
        return ring[ring.Key(vip_num * self.ring + slot)].value

    def real_addr(self, index: int) -> str:
        t = self.bpf[b"ref_reals"]
        return socket.inet_ntoa(struct.pack("<I", t[t.Key(index)].dst))

    def stat(self, key: int) -> tuple[int, int]:
        """A ref_stats or ref_real_stats entry (key < 0: ref_real_stats[-key - 1]), summed over CPUs."""
        t = self.bpf[b"ref_stats" if key >= 0 else b"ref_real_stats"]
        vals = t[t.Key(key if key >= 0 else -key - 1)]
        return sum(v.v1 for v in vals), sum(v.v2 for v in vals)

    def stats(self) -> dict[str, int]:
        """The program's global counters, and the LRU hits they imply (packets to a VIP less misses)."""
        got = {i: self.stat(self.vips + i) for i in range(CNTR_ENTRIES)}
        out = {name: got[i][j] for name, (i, j) in CNTRS.items()}
        out["lru_hit"] = out["lru_total"] - out["lru_miss"]
        return {k: v for k, v in out.items() if v}

    def flow_count(self) -> int:
        """Entries in every CPU's connection table and the fallback's."""
        with self._array("ref_lru") as fallback:
            return sum(sum(1 for _k in m.keys()) for m in [fallback, *self.cpu_lrus])

    def flush_own_flows(self) -> None:
        """The connection tables emptied (the benchmark's flush between rounds)."""
        with self._array("ref_lru") as fallback:
            for m in [fallback, *self.cpu_lrus]:
                keys = list(m.keys())
                if keys:
                    m.delete_many(keys)

    def close(self) -> None:
        for m in self.cpu_lrus:
            m.close()
        self.cpu_lrus = []
        self.bpf.cleanup()


def load_reference(lab: Any, name: str, build: str = "main", *, fillers: bool = False) -> ReferenceLB:
    """A build loaded into `lab` (kpr.testing.nodeport_bench.ProgLab) as build `name`: main serves the
    lab's VIP:80 with its 100 remote backends as reals, scale (or main with `fillers`) every filler
    frontend with its one."""
    from kpr.testing import nodeport_bench as NB

    ref = ReferenceLB(build)
    try:
        if build == "main" and not fillers:
            ref.set_vips([(NB.VIP, 80, [f"10.244.2.{i}" for i in range(1, 101)])])
        else:
            ref.set_vips([(NB.ip4(NB.FILLER_BASE + i), 80, [NB.ip4(0x0AF50000 + i + 1)]) for i in range(lab.fillers)])
    except BaseException:
        ref.close()
        raise
    lab.builds[name] = ref
    return ref


# ---------------------------------------------------------------------- the benchmark's rows

MAIN, SCALE = "reference (Katran-shaped)", "reference (Katran-shaped), 257-slot rings"
SPREAD_MAIN = "reference (Katran-shaped), fillers, 65537-slot rings"
LABEL = "xdp reference (Katran-shaped)"


def cases(lab: Any) -> dict[str, Any]:
    """The reference's cases in `lab`: established and new flows to its VIP (main build), new flows
    spread over every filler frontend as VIPs (scale build, and the main build's 65537-slot rings;
    none without fillers). Each must end in XDP_TX (its counter is bumped after the encapsulation)
    on its path (an LRU hit, a SYN's miss)."""
    from kpr.testing.nodeport_bench import VIP, Case, FILLER_BASE, ip4

    out = {
        "established": Case("reference (Katran-shaped): established", "established", VIP, 80, ("xdp_tx", "lru_hit")),
        "new flow": Case("reference (Katran-shaped): new flow", "new", VIP, 80, ("xdp_tx", "tcp_syn_miss")),
    }
    if lab.fillers:
        for key, ring in (("spread", BUILDS["scale"][1]), ("spread main", BUILDS["main"][1])):
            out[key] = Case(f"reference: new flows over {lab.fillers} VIPs, {ring}-slot rings", "new",
                            ip4(FILLER_BASE), 80, ("xdp_tx", "tcp_syn_miss"), spread=True)
    return out


def main_rows(lab: Any, hook: str, kpr_build: str, kpr_cases: dict[str, Any], b: Any, *, runs: int, rounds: int,
              single_rounds: int, pr: Any) -> tuple[dict[str, str], Any]:
    """The reference's rows in the main lab, measured interleaved with kpr's established and new
    SNAT flows (`kpr_cases`, build `kpr_build`) so the ratios between them see one machine; prints
    the rows and returns the summary lines and the spread rows (the scale ratios' bases: 257-slot and
    65537-slot rings; empty without fillers)."""
    from kpr.testing.nodeport_bench import interleaved, proof, summary_line

    load_reference(lab, MAIN, "main")
    own = cases(lab)
    if "spread" in own:
        load_reference(lab, SCALE, "scale")
        load_reference(lab, SPREAD_MAIN, "main", fillers=True)
    jobs = [(kpr_build, kpr_cases["established"]), (kpr_build, kpr_cases["new flow"]),
            (MAIN, own["established"]), (MAIN, own["new flow"])]
    if "spread" in own:
        jobs += [(SCALE, own["spread"]), (SPREAD_MAIN, own["spread main"])]
    got = interleaved(lab, hook, jobs, runs, rounds, single_rounds=single_rounds)
    pr(f"\n  reference load balancer of Katran's shape (kpr.testing.reference_lb: 1 VIP, 100 reals, Maglev ring "
       f"{BUILDS['main'][1]}, per-CPU LRU hashes of {LRU}), interleaved with kpr's build beside it")
    for (build, c), m in zip(jobs, got):
        label = c.name if build != kpr_build else f"kpr beside it: {c.name}"
        pr(f"  {label:58s} {m.wrapper:8.1f} {m.wrapper - b.wrapper:10.1f} {m.single:9.1f} {m.x_bare(b):7.2f}  "
           f"{proof(m, c, hook)}")
    kpr_est, kpr_new, ref_est, ref_new = got[:4]
    summary = {
        "reference established": summary_line(f"{LABEL} established", ref_est, b),
        "reference new flow": summary_line(f"{LABEL} new flow", ref_new, b),
    }
    for key, k, r in (("established", kpr_est, ref_est), ("new flow", kpr_new, ref_new)):
        summary[f"vs reference {key}"] = (f"{hook} {key} vs reference: {(k.wrapper - b.wrapper) / (r.wrapper - b.wrapper):.2f} x "
                                          f"(wrapper), {k.x_bare(b) / r.x_bare(b):.2f} x (repeat=1)")
    for line in summary.values():
        pr(f"  {line}")
    return summary, ({"257": got[4], "65537": got[5]} if "spread" in own else {})


def scale_row(lab: Any, hook: str, bb: Any, *, runs: int, rounds: int, single_rounds: int, pr: Any) -> Any:
    """The scale build's spread row in a lab of many frontends (each a VIP): printed and returned."""
    from kpr.testing.nodeport_bench import interleaved, proof

    load_reference(lab, SCALE, "scale")
    c = cases(lab)["spread"]
    m = interleaved(lab, hook, [(SCALE, c)], runs, rounds, single_rounds=single_rounds)[0]
    pr(f"  {c.name:58s} {m.wrapper - bb.wrapper:8.1f} ns above bare, {m.x_bare(bb):5.2f} x bare  {proof(m, c, hook)}")
    return m
