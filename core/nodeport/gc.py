"""Conntrack garbage collection for NodePort flows, and clearing flows whose backend is gone.

The maps are LRU, so they never fill up with dead flows; collection is about correctness and
accounting: expired flows give their SNAT ports back, reverse entries and SNAT mappings of
flows that ended are removed, and counters tell how many flows are live.

What belongs to whom:
  kpr_ct      ORIGINAL entries flagged KPR_CT_F_NODE_PORT (client -> frontend). Expired after
              lib/conntrack.h's timeouts (read from it below). Non-TCP flows whose backend left
              their frontend are "stale" and cleared at once: kube-proxy's long-standing
              stale-UDP problem (clients keep sending into the void) does not happen here.
  kpr_np_ct_slots  the same entries of KPR_NP_CT_SLOTS builds (lib/nodeport.h), judged alike;
              a dead one's slot is freed (kpr.bpf.slots). One claimed less than GRACE_NS ago
              (its mapping may still be being written) never expires, and is stale only by a
              backend the pass's read of kpr_backend knows. After a full pass that left no NodePort
              entry in kpr_ct, kpr_np_ct_gate is marked clean with the count read before it;
              after every full pass, each home slot's gate (the keys whose first probe it
              is) likewise, open where kpr_ct keeps a NodePort entry of such a key.
  kpr_np_rev  reverse translations (backend -> client) of local and DSR flows. Those made
              from a DSR header (on the backend's node: no conntrack entry there) expire on
              their own timestamps; the others live exactly as long as their conntrack flow.
  kpr_snat    mappings whose SNAT address is one of this node's: live while their flow is. A
              SNAT flow has one entry here, keyed by its reply tuple (client and frontend in
              it; its SNAT address and port are in its conntrack entry); flows a
              KPR_NP_SNAT_IN_CT=0 build made also have a forward entry (and a kpr_np_rev one).
              When no reverse entry is left, kpr_snat_gate is marked clean (new flows' slot
              claims then skip their look into kpr_snat).
  kpr_snat_slots  new SNAT flows' reverse entries (lib/nat.h KPR_NP_SNAT_SLOTS), keyed by the reply
              tuple: a slot is freed (kpr.bpf.slots) once its flow is gone: its conntrack entry
              gone, expired or holding another SNAT port, and its claim older than GRACE_NS.
A flow born between the dumps of two maps could look orphaned: entries younger than GRACE_NS
are never collected for want of a partner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pathlib import Path

from kpr.bpf import abi, ctclock
from kpr.bpf import maps as M
from kpr.bpf.slots import SlotTable

from . import datapath as D

log = logging.getLogger(__name__)

# lib/conntrack.h timeouts (their #ifndef defaults), ns.
TCP_TIMEOUT_NS = abi.value("KPR_CT_TCP_TIMEOUT_NS")
TCP_SYN_TIMEOUT_NS = abi.value("KPR_CT_TCP_SYN_TIMEOUT_NS")
TCP_CLOSE_TIMEOUT_NS = abi.value("KPR_CT_TCP_CLOSE_TIMEOUT_NS")
OTHER_TIMEOUT_NS = abi.value("KPR_CT_OTHER_TIMEOUT_NS")
GRACE_NS = 10 * 10**9  # entries this young are never orphans (their partner may be being written)

TCP, UDP = 6, 17

# A flow as the maps can all name it: client address, client port (network order), protocol,
# backend address, backend port (network order).
Flow = tuple[bytes, int, int, bytes, int]
# Backends a frontend may send to: (address, port in network order).
BackendSet = frozenset[tuple[bytes, int]]


def now_ns() -> int:
    # The clock the programs stamp conntrack entries with (lib/conntrack.h kpr_ct_now(): jiffies
    # in ns on CLOCK_MONOTONIC's base, or the coarse clock), as the datapath's build flags chose.
    return ctclock.now_ns()


def ct_timeout(flags: int, proto: int) -> int:
    if proto != TCP:
        return OTHER_TIMEOUT_NS
    if flags & D.CT_F_CLOSING:
        return TCP_CLOSE_TIMEOUT_NS
    if not flags & D.CT_F_SEEN_REPLY:
        return TCP_SYN_TIMEOUT_NS
    return TCP_TIMEOUT_NS


def rev_timeout(flags: int, proto: int) -> int:
    if proto != TCP:
        return OTHER_TIMEOUT_NS
    return TCP_CLOSE_TIMEOUT_NS if flags & D.REV_F_CLOSING else TCP_TIMEOUT_NS


@dataclass
class Totals:
    runs: int = 0
    ct_expired: int = 0
    stale_flows_cleared: int = 0
    rev_expired: int = 0
    snat_freed: int = 0
    errors: int = 0
    last_duration_ms: float = 0.0
    # Live entries found by the last pass.
    ct_entries: int = 0
    rev_entries: int = 0
    snat_entries: int = 0
    snat_slots: int = 0  # held kpr_snat_slots slots


@dataclass
class PassResult:
    ct_expired: int = 0
    stale: int = 0
    rev_expired: int = 0
    snat_freed: int = 0  # kpr_snat mappings and kpr_snat_slots slots freed
    live: set[Flow] = field(default_factory=set)
    # (flow, its conntrack entry's SNAT port, network order) of every live entry: a set, as one
    # client address and port to two frontends with one backend are one Flow with two ports
    live_ports: set[tuple[Flow, int]] = field(default_factory=set)


class Collector:
    """One collector per plugin; `run()` is one pass, `start()` runs passes on a thread.

    `allowed(daddr16, dport_n, proto)` returns the backends the frontend may use now, or None
    when the frontend is unknown (then its flows are never judged stale).
    `snat_addrs()` returns this node's SNAT addresses (16-byte form).
    `ready()`: whether `allowed` answers from every service; until then only passes asked for
    (`stale_only`: a change's purge, the initial sync's end) judge flows stale. The first pass
    runs at once, in the initial burst of services: a frontend two services share answered
    with the one delivered so far, one not delivered yet with a NodePort on its port number.
    """

    def __init__(
        self,
        maps: dict[str, M.BpfMap],
        allowed: Callable[[bytes, int, int], BackendSet | None],
        snat_addrs: Callable[[], set[bytes]],
        interval: float,
        after_pass: Callable[[], None] | None = None,
        ready: Callable[[], bool] = lambda: True,
        pin: Path | None = None,
        ct_slots: bool | None = None,
    ) -> None:
        self.maps = maps
        # whether the builds this collector serves keep conntrack in slots (None: this kpr's
        # header default, lib/nodeport.h KPR_NP_CT_SLOTS). A collector of builds without slots
        # never marks kpr_np_ct_gate clean: its programs write kpr_ct unmarked.
        self.ct_slots = D.CT_SLOTS_ON if ct_slots is None else ct_slots
        # where a KPR_NP_CT_SLOTS build pins kpr_np_ct_slots and kpr_np_ct_gate (made by its
        # compile, after the collector may have started): opened once they are there
        self.pin = pin
        self._ct_slots: SlotTable | None = None
        self._gate_owned = False  # kpr_np_ct_gate opened here (closed by stop())
        self.ready = ready
        self.after_pass = after_pass
        self.allowed = allowed
        self.snat_addrs = snat_addrs
        self.interval = interval
        self.totals = Totals()
        self._lock = threading.Lock()  # one pass at a time (thread and purges from the bus worker)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # backend id -> (address, port) from earlier dumps: a flow's backend may be gone from
        # kpr_backend before its flow is cleared, and its reverse entry is keyed by address.
        self._backend_names: dict[int, tuple[bytes, int]] = {}

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kpr-tc-nodeport-gc", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            if self._ct_slots is not None:
                self._ct_slots.close()
                self._ct_slots = None
            if self._gate_owned:
                m = self.maps.pop(D.CT_GATE_MAP, None)
                if m is not None:
                    m.close()
                self._gate_owned = False

    def _slot_maps(self) -> tuple[SlotTable | None, M.BpfMap | None]:
        """kpr_np_ct_slots and kpr_np_ct_gate, when a KPR_NP_CT_SLOTS build made them."""
        if self._ct_slots is None:
            m = self.maps.get(D.CT_SLOTS_MAP)
            if m is not None:
                self._ct_slots = SlotTable(m, D.CT_SLOT)
            elif self.pin is not None and (self.pin / D.CT_SLOTS_MAP).exists():
                self._ct_slots = SlotTable.open(self.pin / D.CT_SLOTS_MAP, D.CT_SLOT)
        gate = self.maps.get(D.CT_GATE_MAP)
        if gate is None and self._ct_slots is not None and self.pin is not None and (self.pin / D.CT_GATE_MAP).exists():
            gate = self.maps[D.CT_GATE_MAP] = M.BpfMap.open_pinned(self.pin / D.CT_GATE_MAP)
            self._gate_owned = True
        return self._ct_slots, gate

    def _loop(self) -> None:
        # The first pass at once, not an interval after start: nothing frees SNAT ports while no
        # agent runs (their entries wait for a pass), so an agent that waited would leave a restart's
        # downtime, its own start and one more interval uncollected, and agents restarted within an
        # interval of each other (a crash loop, a burst of restarts) would never collect at all.
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.interval
            if not self.maps:
                # The datapath closed its maps under us (a teardown whose stop() timed out
                # waiting for a long pass, or an owner that never called stop()): there is
                # nothing left to collect, and a pass would only fail on the missing maps.
                log.debug("event=nodeport_gc_exit reason=maps_closed")
                return
            try:
                self.run()
                if self.after_pass is not None:
                    self.after_pass()
            except Exception:  # keep collecting; the next pass may succeed
                self.totals.errors += 1
                log.exception("event=nodeport_gc_failed")

    # ------------------------------------------------------------------ passes

    def _backends(self) -> dict[int, tuple[bytes, int]]:
        current = {}
        for bid, v in M.backend_ids(self.maps["kpr_backend"]):  # its backends, by the ids flows hold (with generation)
            addr, port, _proto, _state, _flags = M.BACKEND.unpack(v)
            current[bid] = (addr, port)
        # names of backends gone since the last pass are kept one more pass
        merged = dict(self._backend_names)
        merged.update(current)
        self._backend_names = current
        return merged

    def run(self, *, stale_only: bool = False, only: Callable[[bytes, int, int], bool] | None = None) -> PassResult:
        """One pass. `stale_only`: clear flows of removed backends only (no expiry), of the
        frontends `only(addr16, port_n, proto)` accepts (None: all)."""
        return self._pass(stale_only, only)

    def _pass(self, stale_only: bool, only: Callable[[bytes, int, int], bool] | None) -> PassResult:
        with self._lock:
            t0 = time.perf_counter()
            res = self._run(stale_only, only)
            t = self.totals
            t.ct_expired += res.ct_expired
            t.stale_flows_cleared += res.stale
            t.rev_expired += res.rev_expired
            t.snat_freed += res.snat_freed
            if not stale_only:
                t.runs += 1
                t.last_duration_ms = (time.perf_counter() - t0) * 1e3
            if res.ct_expired or res.stale or res.rev_expired or res.snat_freed:
                log.info(
                    "event=nodeport_gc stale_only=%s ct_expired=%d stale_cleared=%d rev_expired=%d snat_freed=%d",
                    stale_only, res.ct_expired, res.stale, res.rev_expired, res.snat_freed,
                )
            return res

    def _run(self, stale_only: bool, only: Callable[[bytes, int, int], bool] | None) -> PassResult:
        res = PassResult()
        now = now_ns()
        names = self._backends()
        ct = self.maps["kpr_ct"]
        slots, gate = self._slot_maps()
        overflows = D.ct_gate_overflows(gate) if gate is not None else 0  # before the sweep (see ct_gate_clean)
        # the home slots' counts likewise, when this pass may mark them (D.ct_homes_clean)
        marks = slots is not None and self.ct_slots and not stale_only and only is None
        home_adds = D.ct_homes_adds(slots) if marks else None
        held_homes: set[int] = set()  # home slots of the NodePort entries kpr_ct keeps
        dead_ct: list[bytes] = []
        # flows cleared now whose partners go with them -> the NAT ports their entries held
        gone: dict[Flow, set[int]] = {}
        judge = stale_only or self.ready()  # staleness against every service, or asked for

        def live(k: bytes, v: bytes, young: bool = False) -> bool | None:
            """Whether a NodePort entry lives on (None: not one); counts and notes the flow. A
            `young` one (a slot claimed within GRACE_NS: perhaps its mapping still being
            written) never expires, and is judged stale only by a backend this pass's read of
            kpr_backend knows (a backend added after that read is no removed one): a change's
            purge clears a fresh UDP flow of a removed backend at once, as kpr_ct's. A flow that
            lives is noted live: the same key's expired entry in another slot must not take the
            live one's partners with it."""
            saddr, daddr, sport, dport, proto, direction, _ = D.CT_KEY.unpack(k)
            last_seen, bid, _rev_nat, flags, _tf, _pad, nat_port = D.CT_ENTRY.unpack(v)[:7]
            if direction != D.CT_DIR_ORIGINAL or not flags & D.CT_F_NODE_PORT:
                return None
            be = names.get(bid)
            if (young and be is None) or (only is not None and not only(daddr, dport, proto)):
                if be is not None:
                    res.live.add((saddr, sport, proto, be[0], be[1]))
                    res.live_ports.add(((saddr, sport, proto, be[0], be[1]), nat_port))
                return True
            expired = not stale_only and not young and now - last_seen > ct_timeout(flags, proto)
            stale = proto != TCP and judge and self._stale(daddr, dport, proto, be)
            if expired or stale:
                if stale and not expired:
                    res.stale += 1
                else:
                    res.ct_expired += 1
                if be is not None:
                    gone.setdefault((saddr, sport, proto, be[0], be[1]), set()).add(nat_port)
                return False
            if be is not None:
                res.live.add((saddr, sport, proto, be[0], be[1]))
                res.live_ports.add(((saddr, sport, proto, be[0], be[1]), nat_port))
            return True

        n_ct = n_lru = 0
        for k, v in ct.items():
            ok = live(k, v)
            if ok is False:
                dead_ct.append(k)
            elif ok:
                n_lru += 1
                if home_adds is not None:
                    held_homes.add(D.ct_home(slots, k))
        if dead_ct:
            ct.delete_many(dead_ct)
        if slots is not None:
            for idx, stamp, k, v in slots.held():
                ok = live(k, v, young=now - stamp < GRACE_NS)
                if ok is False:
                    slots.free(idx)
                elif ok:
                    n_ct += 1
        n_ct += n_lru
        if gate is not None and self.ct_slots and not stale_only and only is None and n_lru == 0:
            D.ct_gate_clean(gate, overflows)
        if home_adds is not None:
            D.ct_homes_clean(slots, home_adds, held_homes)
        # A flow both cleared and live (its expired slot and the kpr_ct entry a reused source
        # port made while that slot was held: the same key, no frontend or NAT port in it)
        # keeps its partners but the cleared entry's own SNAT mapping (another NAT port).
        for flow in gone.keys() & res.live:
            gone[flow] = {p for p in gone[flow] if p and (flow, p) not in res.live_ports}
        self._rev_pass(res, now, stale_only, gone)
        self._snat_pass(res, now, stale_only, gone)
        self._slot_pass(res, now, stale_only, gone)
        if not stale_only:
            self.totals.ct_entries = n_ct
        return res

    @staticmethod
    def _partner_gone(res: PassResult, gone: dict[Flow, set[int]], flow: Flow, nat_port: int | None = None) -> bool:
        """Whether a partner of `flow` (its reverse entry: nat_port None; a SNAT mapping of
        nat_port) goes with a conntrack entry cleared now: the flow's, unless the flow still
        lives in another entry, then only the cleared entry's own NAT port's."""
        ports = gone.get(flow)
        if ports is None:
            return False
        if flow not in res.live:
            return True
        return nat_port is not None and nat_port in ports

    def _stale(self, daddr: bytes, dport: int, proto: int, be: tuple[bytes, int] | None) -> bool:
        allowed = self.allowed(daddr, dport, proto)
        if allowed is None:
            return False  # a frontend this plugin does not know (yet): not its call
        return be is None or be not in allowed

    def _rev_pass(self, res: PassResult, now: int, stale_only: bool, gone: dict[Flow, set[int]]) -> None:
        rev = self.maps[D.REV_MAP]
        dead: list[bytes] = []
        n = 0
        for k, v in rev.items():
            baddr, caddr, bport, cport, proto, _dir, _ = D.CT_KEY.unpack(k)
            _fe, _fport, flags, _pad, last_seen = D.NP_REV.unpack(v)
            flow = (caddr, cport, proto, baddr, bport)
            if self._partner_gone(res, gone, flow):
                dead.append(k)
                continue
            if stale_only:
                continue
            if flags & D.REV_F_DSR:
                keep = now - last_seen <= rev_timeout(flags, proto)
            else:
                keep = flow in res.live or now - last_seen < GRACE_NS
            if keep:
                n += 1
            else:
                dead.append(k)
        if dead:
            rev.delete_many(dead)
            res.rev_expired += len(dead)
        if not stale_only:
            self.totals.rev_entries = n

    def _snat_pass(self, res: PassResult, now: int, stale_only: bool, gone: dict[Flow, set[int]]) -> None:
        snat = self.maps["kpr_snat"]
        gate = self.maps.get(D.SNAT_GATE_MAP)
        # read before the dump: an insert after it raises the count and keeps the gate shut
        overflows = D.snat_gate_overflows(gate) if gate is not None else 0
        replies: set[bytes] = set()  # the even ports' REPLY keys the dump held (the gate's count)
        ours = self.snat_addrs()
        dead: list[bytes] = []
        paired: set[bytes] = set()  # reverse keys a forward entry decided
        reverse: dict[bytes, tuple[Flow, int]] = {}  # reverse key -> (its flow, created)
        n = 0
        for k, v in snat.items():
            saddr, daddr, sport, dport, proto, direction, _ = D.CT_KEY.unpack(k)
            addr, port, _fport, _p2, created, _fe = D.NAT_ENTRY.unpack(v)
            if direction == D.CT_DIR_REPLY:
                if not M.htons(dport) & 1:  # an even SNAT port's: one a slot claim may meet
                    replies.add(k)
                if daddr in ours:  # backend -> node:port; the value names the client
                    reverse[k] = ((addr, port, proto, saddr, sport), created)
                continue
            if addr not in ours:
                continue  # another owner's mapping
            flow = (saddr, sport, proto, daddr, dport)
            rkey = D.CT_KEY.pack(daddr, addr, dport, port, proto, D.CT_DIR_REPLY, 0)
            if self._partner_gone(res, gone, flow, port) or (
                    not stale_only and flow not in res.live and now - created >= GRACE_NS):
                dead.append(k)
                dead.append(rkey)
                res.snat_freed += 1
            else:
                n += 1
            paired.add(rkey)
        # Reverse entries on their own (the SNAT flows of KPR_NP_SNAT_IN_CT builds; also the
        # halves of an interrupted allocation or an evicted forward entry): live while their
        # conntrack flow is.
        for k, (flow, created) in reverse.items():
            if k in paired:
                continue
            if self._partner_gone(res, gone, flow, D.CT_KEY.unpack(k)[3]) or (not stale_only and flow not in res.live and now - created >= GRACE_NS):
                dead.append(k)
                res.snat_freed += 1
            else:
                n += 1
        if not stale_only:
            self.totals.snat_entries = n
        dead_keys = sorted(set(dead))
        if dead_keys:
            snat.delete_many(dead_keys)
        # reverse entries left: those the dump held and this pass kept (a dead forward entry's
        # reply key, deleted with it, may never have been there)
        left = len(replies.difference(dead_keys))
        if gate is not None and left == 0:
            D.snat_gate_clean(gate, overflows)

    def _slot_pass(self, res: PassResult, now: int, stale_only: bool, gone: dict[Flow, set[int]]) -> None:
        m = self.maps.get(D.SNAT_SLOTS_MAP)
        if m is None:
            return
        table = SlotTable(m, D.SNAT_SLOT)  # (the map stays the owner's)
        try:
            dead, n = [], 0
            for idx, stamp, key, val in table.held():
                baddr, _nat, bport, nport, proto, _dir, _ = D.CT_KEY.unpack(key)
                caddr, cport = D.NAT_ENTRY.unpack(val)[:2]
                flow = (caddr, cport, proto, baddr, bport)
                if (flow, nport) in res.live_ports:
                    n += 1  # a live conntrack entry's port (another frontend's entry, if one of the flow's went)
                elif self._partner_gone(res, gone, flow, nport):
                    dead.append(idx)
                elif stale_only or now - stamp < GRACE_NS:
                    n += 1  # young: being filled, its conntrack entry being written
                else:
                    dead.append(idx)
            for idx in dead:
                table.free(idx)
            res.snat_freed += len(dead)
            if not stale_only:
                self.totals.snat_slots = n
        finally:
            table.close()
