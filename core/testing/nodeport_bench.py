"""Per-packet cost of the NodePort programs (tc and XDP builds of lib/nodeport.h) with
BPF_PROG_TEST_RUN, shared by benchmarks/bench_tc_nodeport.py and bench_xdp_nodeport.py.

Two methods, both against a bare program of the same hook measured the same way:
  - wrapper: a small program restores the input packet (and, for new flows, stamps a fresh
    client address into it) and tail-calls the program under test; run with repeat=N, so the
    kernel's per-run figure has no per-call overhead. The programs rewrite their packet and
    BPF_PROG_TEST_RUN does not restore it between repeats: without the wrapper every run after
    the first would take another path. Reported as ns above (wrapper -> bare).
  - repeat=1: one call per packet, the kernel's duration of each; reported as a ratio to the
    bare program's (the per-call overhead is in both). The kernel's clock may step coarser than a
    ns (this VM's: 10 ns, about a ninth of a bare call): each block's median is interpolated
    within the step (tick_median), not the step the plain median lands on.
Builds differ by -D flags (stop points of lib/nodeport.h KPR_NP_BENCH_STOP for the per-stage
table, and the optimisation switches); the program's own counters are read around every
measurement and show which path ran. With repeat=1 the same source loaded twice can differ by
0.3x bare (where the load's code lands); so the main table pools several loads of the default
(--loads), and a switch row can pool several loads of its build, against as many of the
default's (--switch-loads; 1, one build per row, is the older method, faster and noisier). Every round starts with the flows gone as the agent's
collector leaves them (ProgLab.flush_flows: conntrack, SNAT and reverse entries deleted).

The summary ends with the machine's cost of one cold cache line (kpr.testing.coldline), taken
before and after the run. A new SNAT flow is about five cold lines (hash buckets and elements
of kpr_ct and kpr_snat, the LRU lists, the service maps), an established packet almost none,
and that cost moves with what the VM's host runs: the same tree measured 756-834 ns above bare
one session, 1690-1954 ns (quiet VM) the next, 918-1074 ns at a 210 ns cold line the one after,
established packets 48-59 ns throughout. Compare new-flow figures of different runs only beside
their cold-line figures; within a run the builds are interleaved and see the same machine.

The lab: a namespace "lb" (the node: eth0 10.0.0.1/24 to "out", next hop 10.0.0.2; node2 at
10.0.0.3 routes the remote backends 10.244.2.0/24 and 10.245.0.0/16; a local pod 10.244.1.10)
with the core's ServiceMapWriter filling a scratch pin dir.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr.testing.prog_run import test_run

NODE4, OUT4, NODE2_4 = "10.0.0.1", "10.0.0.2", "10.0.0.3"
NODE6, OUT6, NODE2_6 = "fd00::1", "fd00::2", "fd00::3"
POD4, POD6 = "10.244.1.10", "fd00:244:1::10"
MAC_OUT, MAC_NODE2, MAC_POD = "02:00:00:00:00:02", "02:00:00:00:00:03", "02:00:00:00:01:10"
VIP = "203.0.113.40"  # the measured LoadBalancer frontend: 100 remote backends (SNAT)
NODEPORT = 30080  # the measured NodePort frontend: one local backend
FILLER_BASE = 0x0AC80000  # 10.200.0.0: filler frontends 10.200.0.0 + i, one remote backend each
CLIENT_BASE = 0x64400000  # 100.64.0.0: clients of new flows 100.64.0.0 + n
PKT_LEN = 64  # every measured frame: Ethernet + IPv4 + TCP + 10 bytes (the wrapper copies this many)

WRAPPER_C = r"""
#define PKT_LEN %(len)d
struct wr_cfg {
	__u32 vary;   // 1: a new client address (CLIENT_BASE + counter) per run
	__u32 spread; // > 0: destination FILLER_BASE + counter * stride %% spread (new flows over many frontends)
	__u32 stride; // 1: the frontends in the order they were written; a large prime: scattered
	__u8 data[PKT_LEN];
};
BPF_ARRAY(wr_cfg, struct wr_cfg, 1);
BPF_ARRAY(wr_ctr, __u32, 1);
BPF_PROG_ARRAY(wr_target, 1);

static __always_inline int wr_restore(CTX *ctx)
{
	__u32 zero = 0, *n;
	struct wr_cfg *c = wr_cfg.lookup(&zero);
	__u8 *d = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;

#ifdef WR_XDP
	// a target that grew the frame last run (an encapsulating one) left its head moved back: moved
	// forward again, by 0 when it did not grow; called every run, for every program and the bare
	// one alike, so its cost cancels out of every figure above bare
	if (bpf_xdp_adjust_head(ctx, (int)(end - d) - PKT_LEN))
		return -1;
	d = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
#endif
	if (!c || d + PKT_LEN > end)
		return -1;
	__builtin_memcpy(d, c->data, PKT_LEN);
	if (c->vary) {
		n = wr_ctr.lookup(&zero);
		if (!n)
			return -1;
		*n += 1;
		*(__be32 *)(d + 26) = bpf_htonl(%(client)d + *n);
		if (c->spread)
			*(__be32 *)(d + 30) = bpf_htonl(%(filler)d + (__u32)((__u64)*n * c->stride %% c->spread));
	}
	return 0;
}

int wr_main(CTX *ctx)
{
	if (wr_restore(ctx))
		return %(abort)s;
	wr_target.call(ctx, 0);
	return %(abort)s;
}

int wr_bare(CTX *ctx) { return %(bare)s; }
"""

HOOKS = {
    # hook: (C context type, program type, bare verdict, name of the bare program)
    "xdp": ("struct xdp_md", "XDP", "XDP_TX", "return XDP_TX"),
    "tc": ("struct __sk_buff", "SCHED_CLS", "TC_ACT_OK", "return TC_ACT_OK"),
}


def clock_tick(durations: Sequence[int]) -> int:
    """The step of the clock behind BPF_PROG_TEST_RUN's durations (ktime_get_ns), from a sample of
    them: the largest T (3..64) that at least 99.5% of them are a multiple of, plus the one ns the
    clock's scaling adds now and then (T * k or T * k + 1), with readings on at least two of its
    steps, each step more of them than the 0.5% forgiven off the grid (the off-grid readings, or
    as few on a step, are no evidence of a second step); else 1 (a clock of ns or close to it).
    This VM's clock steps 10 ns (durations 80, 81, 90, 91, 100, ...; CLOCK_MONOTONIC in user
    space alike): a 90 ns call reads 9 steps and a median of such readings moves by 0.11x bare."""
    ds = [d for d in durations if d > 0]
    for t in range(64, 2, -1):
        steps = collections.Counter(d // t for d in ds if d % t <= 1)
        if (ds and steps.total() >= 0.995 * len(ds)
                and sum(n > 0.005 * len(ds) for n in steps.values()) >= 2):
            return t
    return 1


def tick_median(durations: Sequence[int], tick: int) -> float:
    """Median of one block of repeat=1 durations read from a clock that steps `tick` ns: each
    reading put on its step (the +1 ns of the clock's rounding dropped) and the median
    interpolated within its step (statistics.median_grouped). A call of true length 10k + f ns
    reads 10k or 10(k + 1) ns by where the clock's step falls, the second with odds f/10: the plain
    median of such readings is the nearer step, so a ratio of two such medians moves in steps of
    a tenth of the bare call's readings; the interpolated one follows f. With tick 1 it is the
    plain median (within half a ns)."""
    if tick <= 1:
        return float(statistics.median(durations))
    return float(statistics.median_grouped([round(d / tick) * tick for d in durations], interval=tick))


def ip4(n: int) -> str:
    return ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0))


def build_lab(topo: Any, *, v6: bool = False, remote4: Sequence[str] = ("10.244.2.0/24",),
              remote6: Sequence[str] = ("fd00:244:2::/64",)) -> str:
    """The lab's namespaces in `topo` (a kpr.testing.netns.Topology): "lb", the node, with eth0
    (NODE4, and NODE6 when `v6`) to "out" (OUT4/OUT6, the default route) and a local pod (POD4,
    POD6) on a veth; the `remote4`/`remote6` networks routed via node2 (NODE2_4/NODE2_6) on eth0.
    Every next hop has a permanent neighbour entry, so a program's FIB lookups succeed in a
    test run without traffic. Returns the pod's veth on the node."""
    topo.add_node("lb")
    topo.add_namespace("out")
    topo.link("lb", "out", [f"{NODE4}/24", *([f"{NODE6}/64"] if v6 else [])], [f"{OUT4}/24", *([f"{OUT6}/64"] if v6 else [])])
    topo.add_pod("lb", "pod", POD4, ip6=POD6 if v6 else None)
    lb = topo["lb"]
    lxc = next(i for i in lb.ifaces if i.startswith("lxc"))
    neigh = [(OUT4, MAC_OUT, "eth0"), (NODE2_4, MAC_NODE2, "eth0"), (POD4, MAC_POD, lxc)]
    routes = [("default", OUT4)] + [(net, NODE2_4) for net in remote4]
    if v6:
        neigh += [(OUT6, MAC_OUT, "eth0"), (NODE2_6, MAC_NODE2, "eth0"), (POD6, MAC_POD, lxc)]
        routes += [("default", OUT6)] + [(net, NODE2_6) for net in remote6]
    lb.run(" && ".join(
        [f"ip neigh replace {a} lladdr {mac} dev {dev} nud permanent" for a, mac, dev in neigh]
        + [f"ip {'-6 ' if ':' in via else ''}route replace {dst} via {via}" for dst, via in routes]
    ))
    return lxc


@dataclass
class Measured:
    """One case: kernel ns per run by each method (medians over rounds), and counter deltas."""

    wrapper_ns: list[float] = field(default_factory=list)
    single_ns: list[float] = field(default_factory=list)
    # repeat=1: each round's median over the bare program's median, its calls taken in turn
    # with this case's (so the load's drift between measurements cancels out of the ratio)
    ratios: list[float] = field(default_factory=list)
    counted: dict[str, int] = field(default_factory=dict)
    runs: int = 0  # wrapped runs
    single_runs: int = 0  # repeat=1 calls
    verdicts: set[int] = field(default_factory=set)

    def add(self, other: "Measured") -> "Measured":
        """Fold another round of the same case in."""
        self.wrapper_ns += other.wrapper_ns
        self.single_ns += other.single_ns
        self.ratios += other.ratios
        self.runs += other.runs
        self.single_runs += other.single_runs
        self.verdicts |= other.verdicts
        for k, v in other.counted.items():
            self.counted[k] = self.counted.get(k, 0) + v
        return self

    @property
    def wrapper(self) -> float:
        return statistics.median(self.wrapper_ns) if self.wrapper_ns else float("nan")

    @property
    def single(self) -> float:
        return statistics.median(self.single_ns) if self.single_ns else float("nan")

    def x_bare(self, b: "Measured") -> float:
        """repeat=1 cost as a multiple of the bare program's: the median of the paired rounds'
        ratios, or (a case measured without pairing) the ratio of the two medians."""
        return statistics.median(self.ratios) if self.ratios else self.single / b.single


class ProgLab:
    """The lab namespace, the service maps, and loaded builds of one hook's program."""

    def __init__(self, services: int, stride: int = 1, *, v6: bool = False) -> None:
        self.services = services
        # v6: the node has NODE6 too (eth0, kpr_np_dev, a node address), the pod POD6, and
        # fd00:244:2::/64 is routed via node2 (tests' IPv6 frontends; the benchmarks' are IPv4)
        self.v6 = v6
        # Spread flows visit frontend n * stride % fillers: 1 walks them in the order the writer
        # wrote them (their kpr_svc elements, slot ranges and backends adjacent in memory, which
        # the CPU's prefetchers follow); a large prime scatters them as a real node's traffic is.
        self.stride = stride
        self._stack = contextlib.ExitStack()
        self.builds: dict[str, Any] = {}  # build name -> Datapath
        # Share of kpr_ct's and kpr_snat's capacity flush_flows fills with other flows' entries
        # (0: the maps start empty; 1: full, an LRU then evicts on every insert, as on a node at
        # capacity): kpr.testing.flow_maps.fill_flow_maps.
        self.fill = 0.0
        self.wrappers: dict[str, tuple[Any, Any, Any]] = {}  # hook -> (bpf, main fn, bare fn)
        self._tick: int | None = None  # the kernel clock's step (ns), measured on first use

    # ------------------------------------------------------------------ setup

    def __enter__(self) -> "ProgLab":
        from kpr.bpf.cleanup import scratch_pin_dir
        from kpr.netdevs import classify
        from kpr.servicemaps import ServiceMapWriter
        from kpr.testing.netns import Topology

        try:
            self.pin = self._stack.enter_context(scratch_pin_dir("kpr-npbench"))
            self.topo = topo = self._stack.enter_context(Topology())
            build_lab(topo, v6=self.v6, remote4=("10.244.2.0/24", "10.245.0.0/16"))
            self._hold(topo)
            lb = topo["lb"]
            self.ifindex = topo.ifindex("lb", "eth0")
            self.mac = topo.mac("lb", "eth0")
            self.kinds = {i: d.kind for i, d in classify(lb.netns).items()}
            self.writer = ServiceMapWriter(self.pin).open()
            self._stack.callback(self.writer.close)
            t0 = time.perf_counter()
            self.writer.full_sync(self._services())
            self.sync_s = time.perf_counter() - t0
        except BaseException:
            self._stack.close()
            raise
        return self

    def _hold(self, topo: Any) -> None:
        """Keep the lab's namespaces alive by open descriptors for as long as the lab runs, and
        enter "lb" through its own: a name alone does not survive its /run/netns entry being
        deleted. That once happened mid-run (eth0 gone, ENODEV): a pyroute2 child forked by the
        lab unwound the lab's stack on the SIGTERM that stops it (see exit_on_sigterm)."""
        for ns in topo.namespaces.values():
            fd = os.open(ns.path, os.O_RDONLY)
            self._stack.callback(os.close, fd)
            if ns.name == "lb":
                self.lb_path = f"/proc/{os.getpid()}/fd/{fd}"

    def __exit__(self, *exc: object) -> None:
        # Every close runs and the stack (namespaces, pins) last, even when one raises: a second
        # TERM during a build's close must not leave the lab behind.
        try:
            with contextlib.ExitStack() as closing:
                for bpf, _m, _b in reversed(list(self.wrappers.values())):
                    closing.callback(bpf.cleanup)
                for dp in reversed(list(self.builds.values())):
                    closing.callback(dp.close)  # (LIFO: the builds first, in order, as before)
        finally:
            self._stack.close()

    def _services(self) -> list[Any]:
        from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey

        tcp = Protocol.TCP
        out = [
            Service(ServiceKey("bench", "vip"), (Frontend(FrontendType.LOAD_BALANCER, VIP, 80, tcp, tuple(
                Backend(f"10.244.2.{i}", 8080, node_name="node2") for i in range(1, 101))),)),
            Service(ServiceKey("bench", "np"), (Frontend(FrontendType.NODE_PORT, NODE4, NODEPORT, tcp, (
                Backend(POD4, 8080, node_name="lb", local=True),)),)),
        ]
        for i in range(max(0, self.services - len(out))):
            be = Backend(ip4(0x0AF50000 + i + 1), 8080, node_name="node2")
            out.append(Service(ServiceKey("bench", f"f{i}"), (
                Frontend(FrontendType.LOAD_BALANCER, ip4(FILLER_BASE + i), 80, tcp, (be,)),)))
        return out

    @property
    def fillers(self) -> int:
        return max(0, self.services - 2)

    def load(self, hook: str, name: str, cflags: Sequence[str] = (), source: Path | None = None,
             program_cache: Any = None) -> Any:
        """Compile and load one build of the hook's program, its device maps filled as the agent does
        (`source`: an entry file of the benchmark's own in place of the plugin's; `program_cache`:
        the Datapath's, kpr.bpf.progcache)."""
        from kpr.plugins.tc_nodeport import datapath as TD
        from kpr.plugins.xdp_nodeport import datapath as XD

        cls = XD.Datapath if hook == "xdp" else TD.Datapath
        if source is not None:
            cls = type(f"{cls.__name__}Of{source.stem}", (cls,), {"SOURCE": source})
        dp = cls(self.pin, mode="snat", extra_cflags=list(cflags))
        dp.program_cache = program_cache
        dp.load()
        self.builds[name] = dp
        node6 = NODE6 if self.v6 else None
        dp.set_devices({self.ifindex: (NODE4, node6)}, (NODE4, node6))
        dp.set_device_kinds(self.kinds)
        dp.set_node_addresses([NODE4, *([NODE6] if self.v6 else [])])
        # announced: as many as kpr_np_vip holds (KPR_NP_VIP_MAX); the other frontends work unannounced
        dp.set_vips([VIP] + [ip4(FILLER_BASE + i) for i in range(min(self.fillers, 16000))])
        dp.set_frontend_ports([(80, 6), (NODEPORT, 6)])  # as the agent does (arms the fast exit)
        dp.set_modes({})  # as the agent's sync does: no frontend overrides the mode (kpr_np_nomode's bits set)
        dp.invalidate_next_hops()  # as the agent's watcher does at start (arms the next-hop cache)
        self.wrapper(hook)  # compiled with the build, not inside a timed block
        return dp

    def entry(self, hook: str, name: str) -> int:
        from kpr.plugins.tc_nodeport import datapath as TD
        from kpr.plugins.xdp_nodeport import datapath as XD

        return self.builds[name].fd(XD.INGRESS if hook == "xdp" else TD.INGRESS)

    def wrapper(self, hook: str) -> tuple[Any, Any, Any]:
        from kpr.bpf.loader import compile_and_load, load_prog

        if hook not in self.wrappers:
            ctype, ptype, verdict, _ = HOOKS[hook]
            src = "#include <uapi/linux/pkt_cls.h>\n#define CTX " + ctype + "\n" + ("#define WR_XDP 1\n" if hook == "xdp" else "") + WRAPPER_C % {
                "len": PKT_LEN, "client": CLIENT_BASE, "filler": FILLER_BASE,
                "abort": "XDP_ABORTED" if hook == "xdp" else "TC_ACT_SHOT", "bare": verdict,
            }
            bpf = compile_and_load(src, name=f"wrapper_{hook}")
            self.wrappers[hook] = (bpf, load_prog(bpf, "wr_main", ptype), load_prog(bpf, "wr_bare", ptype))
        return self.wrappers[hook]

    # ------------------------------------------------------------------ packets and context

    def ctx(self, hook: str) -> bytes:
        if hook == "xdp":  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index
            return struct.pack("=6I", 0, PKT_LEN, 0, self.ifindex, 0, 0)
        return struct.pack("=11I", 0, 0, 0, 0, 0, 0, 0, 0, 0, self.ifindex, self.ifindex)

    def packet(self, dst: str, dport: int, *, src: str = "192.0.2.50", sport: int = 40000, flags: str = "A") -> bytes:
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        p = bytes(Ether(src=MAC_OUT, dst=self.mac) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)
                  / (b"k" * 10))
        assert len(p) == PKT_LEN, len(p)
        return p

    def flush_flows(self) -> None:
        """Empty conntrack, SNAT and reverse entries (then fill kpr_ct and kpr_snat to `fill`): every
        case starts with the same table fill."""
        from kpr.bpf import maps as M

        for name in ("kpr_ct", "kpr_snat", "kpr_np_rev"):
            with M.BpfMap.open_pinned(self.pin / name) as m:
                keys = list(m.keys())
                if keys:
                    m.delete_many(keys)
        clear_snat_slots(self.pin)
        clear_ct_slots(self.pin)
        for dp in self.builds.values():  # builds with flow maps of their own (kpr.testing.reference_lb)
            if hasattr(dp, "flush_own_flows"):
                dp.flush_own_flows()
        if self.fill:
            from kpr.testing.flow_maps import fill_flow_maps

            fill_flow_maps(self.pin, self.fill)

    def warm_next_hops(self, hook: str) -> None:
        """One flow to every filler frontend through the default build, then the flow maps
        emptied: each filler's backend has its next hop cached (kpr_np_nh, kept by
        flush_flows), as a backend some earlier flow reached has on a running node."""
        from kpr.testing.netns import in_netns
        from kpr.testing.prog_run import test_run

        fd = self.entry(hook, "default")
        with in_netns(self.lb_path):
            for i in range(self.fillers):
                test_run(fd, self.packet(ip4(FILLER_BASE + i), 80, src=ip4(CLIENT_BASE + i), flags="S"), ctx=self.ctx(hook))
        self.flush_flows()

    # ------------------------------------------------------------------ measuring

    def run_wrapped(self, hook: str, target_fd: int, pkt: bytes, repeat: int, *, vary: bool = False,
                    spread: int = 0) -> tuple[float, int]:
        """Kernel ns per run of wrapper -> target over `repeat` runs, and the last verdict."""
        bpf, main, _bare = self.wrapper(hook)
        cfg = bpf[b"wr_cfg"]
        v = cfg.Leaf()
        v.vary, v.spread, v.stride = int(vary), spread, self.stride
        for i, b in enumerate(pkt):
            v.data[i] = b
        cfg[cfg.Key(0)] = v
        prog = bpf[b"wr_target"]
        prog[prog.Key(0)] = prog.Leaf(target_fd)
        res = self._test_run(hook, main.fd, pkt, repeat)
        return float(res.duration_ns), res.retval

    def _test_run(self, hook: str, fd: int, pkt: bytes, repeat: int = 1) -> Any:
        """test_run in the lab's namespace, with a clear error when the lab's device is gone."""
        try:
            return test_run(fd, pkt, repeat=repeat, ctx=self.ctx(hook))
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
            links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
            names = [ln.split(":")[1].strip() for ln in links.splitlines() if ":" in ln]
            raise RuntimeError(
                f"the lab's eth0 (ifindex {self.ifindex}) is gone from its namespace (links left: {names}): "
                "something outside this benchmark removed the lab's namespaces or veths"
            ) from exc

    @property
    def tick(self) -> int:
        """The kernel clock's step in ns as repeat=1 durations show it (clock_tick), taken once
        from the bare program of the first hook asked for (the clock is the machine's)."""
        if self._tick is None:
            from kpr.testing.netns import in_netns

            hook = next(iter(self.wrappers), "tc")
            _bpf, _main, bare_fn = self.wrapper(hook)
            pkt = self.packet(VIP, 80)
            with in_netns(self.lb_path):
                self._tick = clock_tick([self._test_run(hook, bare_fn.fd, pkt).duration_ns for _ in range(2000)])
        return self._tick

    def run_single(self, hook: str, fd: int, packets: Sequence[bytes]) -> tuple[float, set[int]]:
        """Median kernel ns of one call per packet (tick_median), and the verdicts seen."""
        tick = self.tick
        ds, verdicts = [], set()
        for p in packets:
            r = self._test_run(hook, fd, p)
            ds.append(r.duration_ns)
            verdicts.add(r.retval)
        return tick_median(ds, tick), verdicts

    def run_paired(self, hook: str, fd: int, packets: Sequence[bytes]) -> tuple[float, float, set[int]]:
        """run_single with a call of the bare program before each call of `fd`: the medians of
        both (ns) and the verdicts of `fd`. A ratio of two medians taken minutes apart moved
        with the machine's load (tc non-service 1.27x to 1.91x bare in one session); taken in
        turn, both see the same load. The bare call touches no map: what `fd` finds in the
        caches is what the Python between two calls left, as without it."""
        _bpf, _main, bare_fn = self.wrapper(hook)
        bare_pkt = self.packet(VIP, 80)
        tick = self.tick
        ds, bs, verdicts = [], [], set()
        for p in packets:
            bs.append(self._test_run(hook, bare_fn.fd, bare_pkt).duration_ns)
            r = self._test_run(hook, fd, p)
            ds.append(r.duration_ns)
            verdicts.add(r.retval)
        return tick_median(ds, tick), tick_median(bs, tick), verdicts


# ---------------------------------------------------------------------- cases and suites


@dataclass(frozen=True)
class Case:
    """A packet stream: established (one flow, warmed up first) or new flows (a client each)."""

    name: str
    kind: str  # "established", "new", "bare", "pass"
    dst: str
    dport: int
    counter: str | tuple[str, ...] | None  # kpr_np_stats counter(s) that must grow by one per run
    spread: bool = False  # new flows spread over every filler frontend


def cases(lab: ProgLab, hook: str) -> list[Case]:
    out = [
        Case("established, remote backend (SNAT)", "established", VIP, 80, "established"),
        Case("new flow, remote backend (SNAT)", "new", VIP, 80, "new_snat"),
        Case("established, local backend", "established", NODE4, NODEPORT, "established"),
        Case("new flow, local backend", "new", NODE4, NODEPORT, "new_local"),
        Case("not a service (node address, port 22)", "pass", NODE4, 22, None),
    ]
    if lab.fillers:
        out.append(Case(f"new flows over {lab.fillers} frontends (SNAT)", "new", ip4(FILLER_BASE), 80, "new_snat",
                        spread=True))
    return out


def measure(lab: ProgLab, hook: str, build: str, case: Case, runs: int, rounds: int, *,
            single: bool = True, wrapper: bool = True, single_runs: int | None = None, offset: int = 0) -> Measured:
    """Wrapper method (rounds x runs/rounds repeats) and repeat=1 (single_runs calls, default
    runs) for one case of one build. `offset`: where in the stream of new flows the repeat=1
    calls start (a later block of a spread case goes on to further frontends)."""
    from kpr.testing.netns import in_netns

    dp = lab.builds[build]
    fd = lab.entry(hook, build)
    # flows are set up by the full program: a build that stops early would not write them
    # (a build of another program, kpr.testing.reference_lb, sets its flows up itself)
    warm = fd if getattr(dp, "warms_itself", False) else lab.entry(hook, "default")
    single_runs = runs if single_runs is None else single_runs
    m = Measured(runs=runs if wrapper else 0, single_runs=single_runs if single else 0)
    per_round = max(1, runs // rounds)
    before = dp.stats()
    with in_netns(lab.lb_path):
        for r in range(rounds if wrapper else 0):
            lab.flush_flows()
            base = lab.packet(case.dst, case.dport, sport=40000 + r, flags="S" if case.kind == "new" else "A")
            if case.kind == "established":
                test_run(warm, lab.packet(case.dst, case.dport, sport=40000 + r, flags="S"), ctx=lab.ctx(hook))
            spread = lab.fillers if case.spread else 0
            ns, verdict = lab.run_wrapped(hook, fd, base, per_round, vary=case.kind == "new", spread=spread)
            m.wrapper_ns.append(ns)
            m.verdicts.add(verdict)
        if single:
            lab.flush_flows()
            if case.kind == "new":
                n0 = 1_000_000
                pkts = [lab.packet(ip4(FILLER_BASE + i * lab.stride % lab.fillers) if case.spread else case.dst, case.dport,
                                   src=ip4(CLIENT_BASE + n0 + i), flags="S")
                        for i in range(offset, offset + single_runs)]
            else:
                if case.kind == "established":
                    test_run(warm, lab.packet(case.dst, case.dport, sport=41000, flags="S"), ctx=lab.ctx(hook))
                pkts = [lab.packet(case.dst, case.dport, sport=41000, flags="A")] * single_runs
            d, bd, _v = lab.run_paired(hook, fd, pkts)
            m.single_ns.append(d)
            m.ratios.append(d / bd)
    after = dp.stats()
    m.counted = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return m


def bare(lab: ProgLab, hook: str, runs: int, rounds: int) -> Measured:
    from kpr.testing.netns import in_netns

    _bpf, _main, bare_fn = lab.wrapper(hook)
    m = Measured(runs=runs)
    pkt = lab.packet(VIP, 80)
    with in_netns(lab.lb_path):
        for _ in range(rounds):
            ns, _v = lab.run_wrapped(hook, bare_fn.fd, pkt, max(1, runs // rounds))
            m.wrapper_ns.append(ns)
        m.single_ns.append(lab.run_single(hook, bare_fn.fd, [pkt] * runs)[0])
    return m


def proof(m: Measured, case: Case, hook: str) -> str:
    """The counters that show the path, and whether they grew by one per run."""
    from kpr.testing.prog_run import verdict_name

    runs = m.runs + m.single_runs
    keep = {k: v for k, v in m.counted.items() if not k.startswith("egress_")}
    text = " ".join(f"{k}+{v}" for k, v in sorted(keep.items())) or "no counter moved"
    ok = True
    if case.counter is not None:
        # rounds x (runs // rounds) wrapped runs (rounding down), plus the repeat=1 calls
        need = case.counter if isinstance(case.counter, tuple) else (case.counter,)
        ok = all(keep.get(c, 0) >= runs * 0.95 for c in need) and not any(k.startswith("drop_") for k in keep)
    elif case.kind == "pass":
        ok = not any(k in keep for k in ("established", "new_snat", "new_local"))
    verdicts = ",".join(verdict_name(v, hook) for v in sorted(m.verdicts))
    return f"[{verdicts}; {text}{'' if ok else '; PATH NOT PROVEN'}]"


def summary_line(label: str, m: Measured, b: Measured) -> str:
    return f"{label}: {m.wrapper - b.wrapper:.0f} ns above bare (wrapper), {m.x_bare(b):.2f} x bare (repeat=1)"


# ---------------------------------------------------------------------- the suite both benchmarks run

# Per-stage table: builds that return at lib/nodeport.h's stop points; each row is the cost up to there.
STOPS = (
    (1, "parse"),
    (2, "conntrack / service lookup, backend pick"),
    (3, "conntrack entry written (new local/DSR flows; SNAT: at 6)"),
    (4, "tail call, stage re-parse, backend lookup"),
    (5, "FIB lookup (established: the cached next hop)"),
    (6, "SNAT port + conntrack entry, DNAT + SNAT rewrite"),
    (0, "forward (full program, stages by tail call)"),
)

# The same for the entry program's established path (the default build: KPR_NP_EST_INLINE).
INLINE_STOPS = (
    (2, "conntrack / backend lookup"),
    (7, "next hop from the cache"),
    (8, "DNAT + SNAT rewrite with checksums"),
    (0, "MACs, counters, redirect (full program)"),
)

# The cases of the switch table, with their column labels: the goals' three, and the local
# backend's established packets and new flows (a DNAT-only rewrite: the local stage, KPR_NP_EST_LOCAL).
SWITCH_CASES = {
    "established, remote backend (SNAT)": "established",
    "new flow, remote backend (SNAT)": "new",
    "not a service (node address, port 22)": "pass",
    "established, local backend": "est. local",
    "new flow, local backend": "new local",
}

# Optimisation switches, each measured against the default build in the same run: name -> -D flags
# that turn the default's choice around.
SWITCHES: dict[str, tuple[str, ...]] = {
    "no fast exit for non-service ports (KPR_NP_PREFILTER=0)": ("-DKPR_NP_PREFILTER=0",),
    "conntrack written every packet (KPR_CT_LOOKUP_BEFORE_WRITE=0)": ("-DKPR_CT_LOOKUP_BEFORE_WRITE=0",),
    "SNAT address looked up every packet (KPR_NP_LAZY_SNAT_ADDR=0)": ("-DKPR_NP_LAZY_SNAT_ADDR=0",),
    "fine clock (bpf_ktime_get_ns; default coarse, KPR_CLOCK_FINE=1)": ("-DKPR_CLOCK_FINE=1",),
    "conntrack ages on the coarse clock, not jiffies (KPR_CT_CLOCK_JIFFIES=0)": ("-DKPR_CT_CLOCK_JIFFIES=0",),
    "fast exit after the full parse, not before (KPR_NP_EARLY_EXIT=0)": ("-DKPR_NP_EARLY_EXIT=0",),
    "fast exit reads kpr_np_ports' word and armed word, not kpr_np_unserved's (KPR_NP_UNSERVED=0)": (
        "-DKPR_NP_UNSERVED=0",),
    "checksums patched once per field, not once, local DNAT too (KPR_REWRITE_ONE_CSUM=0, so KPR_NP_DNAT_ONE_PASS off)": (
        "-DKPR_REWRITE_ONE_CSUM=0",),
    "established SNAT flows through the tail call, not inline (KPR_NP_EST_INLINE=0)": ("-DKPR_NP_EST_INLINE=0",),
    "established local flows through the local stage, not from the cached next hop (KPR_NP_EST_LOCAL=0)": (
        "-DKPR_NP_EST_LOCAL=0",),
    "DNAT to a local backend patches the L4 checksum per field, not once (KPR_NP_DNAT_ONE_PASS=0)": (
        "-DKPR_NP_DNAT_ONE_PASS=0",),
    "tc: IPv4 header checksum by bpf_l3_csum_replace, not in place (KPR_CSUM_IP_DIRECT=0)": ("-DKPR_CSUM_IP_DIRECT=0",),
    "four LRU inserts per new SNAT flow (KPR_NP_SNAT_IN_CT=0)": ("-DKPR_NP_SNAT_IN_CT=0",),
    "a new SNAT flow's reply side an LRU insert into kpr_snat, not a kpr_snat_slots slot (KPR_NP_SNAT_SLOTS=0)": (
        "-DKPR_NP_SNAT_SLOTS=0",),
    "FIB lookup every packet, no next hop cached (KPR_NP_NH_CACHE=0)": ("-DKPR_NP_NH_CACHE=0",),
    "new SNAT flows look the route up though their backend's next hop is cached (KPR_NP_NEW_NH=0)": (
        "-DKPR_NP_NEW_NH=0",),
    "a new SNAT flow looks its IPv4 SNAT address up in kpr_np_dev, not cached with the next hop (KPR_NP_NH_SNAT_ADDR=0)": (
        "-DKPR_NP_NH_SNAT_ADDR=0",),
    "fast exit puts the destination on the stack before its tests, not only for a lookup (KPR_NP_EARLY_RAW=0)": (
        "-DKPR_NP_EARLY_RAW=0",),
    "service packets parsed twice: the fast exit's raw read, then the full parse (KPR_NP_EARLY_PARSE=0)": (
        "-DKPR_NP_EARLY_PARSE=0",),
    "tc: the checksum state inferred from the helper, not read (no KPR_SKB_KERN_CTX_FN)": ("-UKPR_SKB_KERN_CTX_FN",),
    "tc: two checksum helper calls per L4 rewrite, nothing read or inferred (KPR_CSUM_L4_INFER=0)": (
        "-UKPR_SKB_KERN_CTX_FN", "-DKPR_CSUM_L4_INFER=0"),
    "frontends in kpr_svc only, no one-line copy read first (KPR_LB_FE=0)": ("-DKPR_LB_FE=0",),
    "backend ids from kpr_slots, not from the frontend's kpr_fe line (KPR_LB_FE_IDS=0)": ("-DKPR_LB_FE_IDS=0",),
    "a new flow's next-hop entry read in its stage only, not touched at the pick (KPR_NP_NH_TOUCH=0)": (
        "-DKPR_NP_NH_TOUCH=0",),
    "tc: a new flow's mode looked up in kpr_np_fe though no frontend of its port has one (KPR_NP_NOMODE=0)": (
        "-DKPR_NP_NOMODE=0",),
    "NodePort conntrack in kpr_ct's LRU, not slots claimed by compare-and-swap (KPR_NP_CT_SLOTS=0)": (
        "-DKPR_NP_CT_SLOTS=0",),
    "no slot tables: conntrack and a new SNAT flow's reply side LRU inserts (KPR_NP_CT_SLOTS=0, KPR_NP_SNAT_SLOTS=0)": (
        "-DKPR_NP_CT_SLOTS=0", "-DKPR_NP_SNAT_SLOTS=0"),
    "slot tables, a SYN's conntrack slots read before its pick, not after (KPR_NP_SYN_FIRST=0; XDP's default on)": (
        "-DKPR_NP_SYN_FIRST=0",),
    "conntrack keys written field by field, not as 64-bit words (KPR_CT_KEY_WORDS=0)": ("-DKPR_CT_KEY_WORDS=0",),
    "a new SYN's conntrack home slot read by its claim only, not touched beside the SNAT slot (KPR_NP_CT_TOUCH=0)": (
        "-DKPR_NP_CT_TOUCH=0",),
    "slot tables, their gates read as shut: no LRU lookup on a slot miss (benchmark only, KPR_NP_TEST_GATES_SHUT=1)": (
        "-DKPR_NP_TEST_GATES_SHUT=1",),
    "all off (as before issue 14's changes, with a fine clock and writes)": (
        "-DKPR_NP_PREFILTER=0", "-DKPR_NP_LAZY_SNAT_ADDR=0", "-DKPR_CT_LOOKUP_BEFORE_WRITE=0",
        "-DKPR_CLOCK_FINE=1", "-DKPR_CT_CLOCK_JIFFIES=0", "-DKPR_NP_SNAT_IN_CT=0", "-DKPR_NP_NH_CACHE=0",
        "-DKPR_NP_EARLY_EXIT=0", "-DKPR_REWRITE_ONE_CSUM=0", "-DKPR_NP_EST_INLINE=0", "-DKPR_CSUM_IP_DIRECT=0",
        "-UKPR_SKB_KERN_CTX_FN", "-DKPR_CSUM_L4_INFER=0", "-DKPR_LB_FE=0", "-DKPR_NP_EST_LOCAL=0",
        "-DKPR_NP_DNAT_ONE_PASS=0", "-DKPR_NP_CT_SLOTS=0", "-DKPR_NP_SNAT_SLOTS=0", "-DKPR_CT_KEY_WORDS=0"),
    "before issue 14 (PREFILTER, LAZY_SNAT_ADDR, SNAT_IN_CT, NH_CACHE off; the backend carried)": (
        "-DKPR_NP_PREFILTER=0", "-DKPR_NP_LAZY_SNAT_ADDR=0", "-DKPR_NP_SNAT_IN_CT=0",
        "-DKPR_NP_NH_CACHE=0", "-DKPR_CT_CLOCK_JIFFIES=0", "-DKPR_NP_EARLY_EXIT=0", "-DKPR_REWRITE_ONE_CSUM=0",
        "-DKPR_NP_EST_INLINE=0", "-DKPR_CSUM_IP_DIRECT=0", "-UKPR_SKB_KERN_CTX_FN", "-DKPR_CSUM_L4_INFER=0",
        "-DKPR_LB_FE=0", "-DKPR_NP_EST_LOCAL=0", "-DKPR_NP_DNAT_ONE_PASS=0", "-DKPR_NP_CT_SLOTS=0",
        "-DKPR_NP_SNAT_SLOTS=0", "-DKPR_CT_KEY_WORDS=0"),
}


# repeat=1 blocks per case (runs/SINGLE_ROUNDS calls each, every job in turn, each block's ratio
# to the bare program's calls taken in turn with it; the median block reported): cold-cache
# effects vary with what else runs on the machine, which a few long blocks caught unevenly.
SINGLE_ROUNDS = 20


def interleaved(lab: ProgLab, hook: str, jobs: Sequence[tuple[str, Case]], runs: int, rounds: int, *,
                single: bool = True, single_rounds: int = SINGLE_ROUNDS) -> list[Measured]:
    """Each (build, case) measured in `rounds` rounds of runs/rounds (wrapper) and, when `single`,
    `single_rounds` blocks of runs/single_rounds calls (repeat=1), the rounds going over every job
    in turn: drift in the machine's load spreads over all of them alike."""
    out = [Measured() for _ in jobs]
    single_rounds = max(single_rounds, 1) if single else 0
    per_block = max(1, runs // single_rounds) if single else 0
    for r in range(max(rounds, single_rounds)):
        for m, (build, case) in zip(out, jobs):
            m.add(measure(lab, hook, build, case, max(1, runs // rounds), 1, single=r < single_rounds,
                          wrapper=r < rounds, single_runs=per_block, offset=r * per_block))
    return out


# Loads of the default build whose repeat=1 figures the main table and the scale rows pool (each
# run runs/LOADS times): five loads of one build in one run gave 2.64-3.40x bare (tc,
# established) and 1.27-1.63x (non-service) with repeat=1, each steady over its own blocks, by
# the wrapper all within 2 ns: where a load's code lands costs a cold call more or less.
LOADS = 3


def load_default(lab: ProgLab, hook: str, loads: int) -> list[str]:
    """The default build and `loads` - 1 more loads of it (an unused define apart: the same
    instructions); their names."""
    names = ["default"] + [f"default, load {i}" for i in range(2, loads + 1)]
    for i, name in enumerate(names, 1):
        if name not in lab.builds:
            lab.load(hook, name, [f"-DKPR_BENCH_LOAD={i}"] if i > 1 else [])
    return names


def pooled(lab: ProgLab, hook: str, names: Sequence[str], case_list: Sequence[Case], runs: int, rounds: int,
           single_rounds: int, b: Measured) -> tuple[list[Measured], list[list[float]]]:
    """Every case over every load of the default build (runs split between them), interleaved;
    per case the pooled measurement and each load's repeat=1 ratio."""
    per = max(1, runs // len(names))
    got = iter(interleaved(lab, hook, [(n, c) for n in names for c in case_list], per, rounds,
                           single_rounds=single_rounds))
    merged = [Measured() for _ in case_list]
    each: list[list[float]] = [[] for _ in case_list]
    for _n in names:
        for i in range(len(case_list)):
            m = next(got)
            each[i].append(m.x_bare(b))
            merged[i].add(m)
    return merged, each


def run_suite(hook: str, *, runs: int, rounds: int, scales: Sequence[int], stages: bool = True,
              switches: bool = True, only: str = "", out: Any = None,
              single_rounds: int = SINGLE_ROUNDS, loads: int = LOADS, switch_loads: int = 1,
              reference: bool = False) -> dict[str, str]:
    """Measure one hook's program; print the tables; return the summary lines by label. `reference`
    (XDP): the Katran-shaped reference load balancer's rows too (kpr.testing.reference_lb)."""
    reference = reference and hook == "xdp"
    ref_summary: dict[str, str] = {}
    ref_base: dict[str, tuple[int, Measured, float]] = {}  # ring slots -> VIPs, the reference's spread row, x bare
    ref_scale: dict[int, tuple[Measured, float]] = {}  # VIPs -> the scale build's spread row, its x bare
    out = out or sys.stdout
    pr = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    summary: dict[str, str] = {}
    # one CPU throughout: the kernel's per-run figure then never spans a migration
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    with ProgLab(scales[0]) as lab:
        t0 = time.perf_counter()
        names = load_default(lab, hook, loads)
        pr(f"  (default build compiled and loaded {len(names)} times in {time.perf_counter() - t0:.1f} s; "
           f"{lab.services} services; repeat=1: all loads' blocks pooled, each load's ratio in brackets)")
        b = bare(lab, hook, runs, rounds)
        pr(f"  (repeat=1 durations step {lab.tick} ns, the kernel clock's: each block's median interpolated "
           f"within its step)")
        pr(f"  {'case':58s} {'wrapper':>8s} {'above bare':>10s} {'repeat=1':>9s} {'x bare':>7s}")
        pr(f"  {'bare (' + HOOKS[hook][3] + ')':58s} {b.wrapper:8.1f} {'':>10s} {b.single:9.1f}")
        res: dict[str, Measured] = {}
        main_cases = cases(lab, hook)
        got_main, each_main = pooled(lab, hook, names, main_cases, runs, rounds, single_rounds, b)
        for c, m, each in zip(main_cases, got_main, each_main):
            res[c.name] = m
            loads_x = "/".join(f"{x:.2f}" for x in each)
            pr(f"  {c.name:58s} {m.wrapper:8.1f} {m.wrapper - b.wrapper:10.1f} {m.single:9.1f} "
               f"{m.x_bare(b):7.2f}  ({loads_x}) {proof(m, c, hook)}")
        summary["established"] = summary_line(f"{hook} established", res["established, remote backend (SNAT)"], b)
        summary["new flow"] = summary_line(f"{hook} new flow", res["new flow, remote backend (SNAT)"], b)
        summary["non-service"] = summary_line(f"{hook} non-service", res["not a service (node address, port 22)"], b)
        spread = [k for k in res if k.startswith("new flows over")]
        scale_rows = {lab.services: res[spread[0]]} if spread else {}
        scale_x = {lab.services: res[spread[0]].x_bare(b)} if spread else {}
        if reference:
            from kpr.testing import reference_lb

            ref_summary, bases = reference_lb.main_rows(
                lab, hook, "default", {"established": main_cases[0], "new flow": main_cases[1]}, b, runs=runs,
                rounds=rounds, single_rounds=single_rounds, pr=pr)
            ref_base = {ring: (lab.fillers, m, m.x_bare(b)) for ring, m in bases.items()}

        if stages:
            pr(f"\n  per stage (builds stopping after each stage; wrapper: ns above bare; established also "
               f"repeat=1 x bare; {lab.services} services)")
            pr(f"  {'stage (cumulative)':50s} {'established':>12s} {'+':>6s} {'repeat=1':>8s} {'new flow':>10s} {'+':>6s}")
            est_c, new_c = cases(lab, hook)[0], cases(lab, hook)[1]
            # the stages as separate programs (KPR_NP_EST_INLINE=0): established packets reach the
            # SNAT stage's stop points instead of being sent by the entry program
            names = {stop: f"stop{stop}" for stop, _l in STOPS}
            for stop, name in names.items():
                if name not in lab.builds:
                    lab.load(hook, name, [f"-DKPR_NP_BENCH_STOP={stop}", "-DKPR_NP_EST_INLINE=0"])
            # the default build's own established path (KPR_NP_EST_INLINE): stops 7 and 8 are on it
            inline = {stop: f"istop{stop}" for stop, _l in INLINE_STOPS}
            for stop, name in inline.items():
                if name not in lab.builds:
                    lab.load(hook, name, [f"-DKPR_NP_BENCH_STOP={stop}"] if stop else [])
            est = iter(interleaved(lab, hook, [(names[stop], est_c) for stop, _l in STOPS if stop != 3]
                                   + [(inline[stop], est_c) for stop, _l in INLINE_STOPS], runs, rounds,
                                   single_rounds=single_rounds))
            new = iter(interleaved(lab, hook, [(names[stop], new_c) for stop, _l in STOPS], runs, rounds, single=False))
            prev = (0.0, 0.0)
            for stop, label in STOPS:
                n = next(new).wrapper - b.wrapper
                if stop == 3:  # an established packet never reaches stop 3: that build runs it in full
                    pr(f"  {label:50s} {'-':>12s} {'':>6s} {'':>8s} {n:10.1f} {n - prev[1]:+6.0f}")
                    prev = (prev[0], n)
                    continue
                m = next(est)
                e = m.wrapper - b.wrapper
                pr(f"  {label:50s} {e:12.1f} {e - prev[0]:+6.0f} {m.x_bare(b):7.2f}x {n:10.1f} {n - prev[1]:+6.0f}")
                prev = (e, n)
            pr("  the entry program's established path (default build, KPR_NP_EST_INLINE):")
            prev_e = 0.0
            for stop, label in INLINE_STOPS:
                m = next(est)
                e = m.wrapper - b.wrapper
                pr(f"  {label:50s} {e:12.1f} {e - prev_e:+6.0f} {m.x_bare(b):7.2f}x")
                prev_e = e

        if switches and SWITCHES:
            per = "one build each" if switch_loads == 1 else f"{switch_loads} loads of each build, pooled"
            pr(f"\n  switches ({per} against the default, same run; wrapper ns above bare / repeat=1 x bare)")
            sel = [c for c in cases(lab, hook) if c.name in SWITCH_CASES]
            pr(f"  {'build':72s} " + " ".join(f"{SWITCH_CASES[c.name]:>18s}" for c in sel))
            wanted = [w.strip().lower() for w in only.split(",")]
            builds = [("default", ()), *((k, v) for k, v in SWITCHES.items() if any(w in k.lower() for w in wanted))]
            # each row's loads: the default's own (load_default), each switch build loaded as often
            rows = {"default": load_default(lab, hook, switch_loads)[:switch_loads]}
            for label, flags in builds[1:]:
                rows[label] = [label] + [f"{label}, load {i}" for i in range(2, switch_loads + 1)]
                for i, name in enumerate(rows[label], 1):
                    lab.load(hook, name, [*flags, f"-DKPR_BENCH_LOAD={i}"] if i > 1 else flags)
            got = iter(interleaved(lab, hook, [(name, c) for label, _f in builds for name in rows[label] for c in sel],
                                   max(1, runs // switch_loads), rounds, single_rounds=single_rounds))
            for label, _f in builds:
                merged = [Measured() for _c in sel]
                each: list[list[float]] = [[] for _c in sel]
                for _name in rows[label]:
                    for i in range(len(sel)):
                        m = next(got)
                        each[i].append(m.x_bare(b))
                        merged[i].add(m)
                cells = [f"{m.wrapper - b.wrapper:8.1f} / {m.x_bare(b):5.2f}x" for m in merged]
                pr(f"  {label:72s} " + " ".join(f"{x:>18s}" for x in cells))
                if switch_loads > 1:
                    pr(f"  {'  each load, x bare':72s} " + " ".join(
                        f"{'/'.join(f'{x:.2f}' for x in e):>18s}" for e in each))

    cold: dict[int, float] = {}
    for n in scales[1:]:
        t0 = time.perf_counter()
        with ProgLab(n) as big:
            pr(f"\n  {n} services (written in {big.sync_s:.1f} s)")
            big_names = load_default(big, hook, loads)
            bb = bare(big, hook, runs, rounds)
            c = [x for x in cases(big, hook) if x.spread][0]
            # first as written: the repeat=1 blocks reach frontends whose backends no flow
            # reached yet (a FIB lookup and a kpr_np_nh write each; at 8 frontends every next
            # hop is cached after the first round) ...
            m = pooled(big, hook, big_names, [c], runs, rounds, single_rounds, bb)[0][0]
            cold[n] = m.x_bare(bb)
            pr(f"  {c.name + ', first contacts':58s} {m.wrapper - bb.wrapper:8.1f} ns above bare, "
               f"{m.x_bare(bb):5.2f} x bare  {proof(m, c, hook)}")
            # ... then with every backend's next hop cached, as at 8 frontends: the comparison
            big.warm_next_hops(hook)
            m = pooled(big, hook, big_names, [c], runs, rounds, single_rounds, bb)[0][0]
            scale_rows[n] = m
            scale_x[n] = m.x_bare(bb)
            pr(f"  {c.name + ', next hops cached':58s} {m.wrapper - bb.wrapper:8.1f} ns above bare, "
               f"{m.x_bare(bb):5.2f} x bare  {proof(m, c, hook)}")
            if reference:
                from kpr.testing import reference_lb

                rm = reference_lb.scale_row(big, hook, bb, runs=runs, rounds=rounds, single_rounds=single_rounds, pr=pr)
                ref_scale[big.fillers] = (rm, rm.x_bare(bb))
    if len(scale_rows) > 1:
        base_n = min(scale_rows)
        for n, m in sorted(scale_rows.items()):
            if n != base_n:
                r_w = m.wrapper / scale_rows[base_n].wrapper
                # each a paired ratio to its own lab's bare program: the labs run minutes apart
                r_s = scale_x[n] / scale_x[base_n]
                summary[f"scale {n}"] = (f"{hook} new flows over {n} vs {base_n} frontends: {r_w:.2f} x (wrapper, "
                                         f"incl. the wrapper), {r_s:.2f} x (repeat=1)"
                                         + (f"; first contacts {cold[n] / scale_x[base_n]:.2f} x (repeat=1)" if n in cold else ""))
    summary.update(ref_summary)
    # the reference's growth: its 257-slot-ring rows at many VIPs against the same build at the first
    # lab's few (its rings then stay in cache: a warm base), and against Katran's 65537-slot rings there
    for v, (m, x) in sorted(ref_scale.items()):
        for ring, (base_v, bm, bx) in sorted(ref_base.items(), key=lambda kv: int(kv[0])):
            summary[f"reference scale {v} vs {ring}"] = (
                f"{hook} reference (Katran-shaped) new flows over {v} VIPs (257-slot rings) vs {base_v} VIPs "
                f"({ring}-slot rings): {m.wrapper / bm.wrapper:.2f} x (wrapper, incl. the wrapper), "
                f"{x / bx:.2f} x (repeat=1)")
    return summary


def add_arguments(ap: Any) -> None:
    """The BPF_PROG_TEST_RUN part's options, the same in both benchmarks."""
    ap.add_argument("--runs", type=int, default=20000, help="BPF_PROG_TEST_RUN runs per case and method")
    ap.add_argument("--prog-rounds", type=int, default=5, help="wrapper rounds per case, interleaved (median)")
    ap.add_argument("--single-rounds", type=int, default=SINGLE_ROUNDS,
                    help="repeat=1 blocks per case, interleaved, each paired with bare calls (median ratio)")
    ap.add_argument("--loads", type=int, default=LOADS,
                    help="loads of the default build the main table and scale rows pool (repeat=1 varies by load)")
    ap.add_argument("--services", default="10,10000,50000", help="service counts; the first is the main table's")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage builds")
    ap.add_argument("--no-switches", action="store_true", help="skip the optimisation switches")
    ap.add_argument("--switches", default="", help="only the switches whose label contains one of these comma-separated texts")
    ap.add_argument("--switch-loads", type=int, default=1,
                    help="loads of each switch build (and of the default) its row pools; repeat=1 varies by load")


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, the lab's namespaces and pins removed on the way out: in
    this process only. pyroute2 does its namespace work (IPRoute(netns=...), as classify()
    in the lab's setup) in forked children and stops each with SIGTERM; a child that
    inherited a raising handler unwound the copy of the lab's stack it was forked with and
    tore down the live lab (its namespaces, so their veths, and its pins): the veths lost
    mid-run. A forked child exits at once instead."""
    import signal

    owner = os.getpid()

    def on_term(*_a: object) -> None:
        if os.getpid() != owner:
            os._exit(143)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)


def run_from_args(hook: str, args: Any) -> dict[str, str]:
    exit_on_sigterm()
    from kpr.testing.coldline import cold_line_ns

    print(f"== {hook} nodeport: BPF_PROG_TEST_RUN, {args.runs} runs per case (kernel {os.uname().release}); {uptime()}")
    # A new flow is mostly cold lines (about five of them here), an established packet mostly
    # cached ones: the machine's cost of a cold line, taken before and after, is what makes a
    # new-flow figure comparable with another run's (kpr.testing.coldline).
    before = cold_line_ns()
    summary = run_suite(hook, runs=args.runs, rounds=args.prog_rounds, scales=[int(x) for x in args.services.split(",")],
                        stages=not args.no_stages, switches=not args.no_switches, only=args.switches,
                        single_rounds=args.single_rounds, loads=args.loads, switch_loads=max(1, args.switch_loads),
                        reference=not getattr(args, "no_reference", True))
    summary["cold line"] = f"cold line: {before:.0f} / {cold_line_ns():.0f} ns before / after (dependent read, 16 MiB array map)"
    return summary


def print_summary(summary: dict[str, str]) -> None:
    """The summary lines the issue's goals are stated in, with the load, last."""
    print(f"\n{uptime()}")
    for line in summary.values():
        print(line)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def clear_snat_slots(pin: Path) -> None:
    """kpr_snat_slots freed and kpr_snat_gate marked clean, as the collector leaves them once kpr_snat
    holds no reverse entry (call it after emptying kpr_snat): a flush between rounds."""
    from kpr.nodeport import datapath as D

    _clear_slots(pin, D.SNAT_SLOTS_MAP, D.SNAT_SLOT, D.SNAT_GATE_MAP, D.snat_gate_overflows, D.snat_gate_clean)


def clear_ct_slots(pin: Path) -> None:
    """kpr_np_ct_slots freed and kpr_np_ct_gate marked clean (a KPR_NP_CT_SLOTS build's), as the
    collector leaves them once kpr_ct holds no NodePort entry (call it after emptying kpr_ct)."""
    from kpr.nodeport import datapath as D

    _clear_slots(pin, D.CT_SLOTS_MAP, D.CT_SLOT, D.CT_GATE_MAP, D.ct_gate_overflows, D.ct_gate_clean)
    if (pin / D.CT_SLOTS_MAP).exists():  # and every home slot's gate shut likewise
        from kpr.bpf.slots import SlotTable

        with SlotTable.open(pin / D.CT_SLOTS_MAP, D.CT_SLOT) as t:
            D.ct_homes_mark_clean(t)


def _clear_slots(pin: Path, table: str, slot: str, gate: str, overflows: Any, clean: Any) -> None:
    from kpr.bpf import maps as M
    from kpr.bpf.slots import SlotTable

    if (pin / table).exists():
        with SlotTable.open(pin / table, slot) as t:
            t.clear()
    if (pin / gate).exists():
        with M.BpfMap.open_pinned(pin / gate) as g:
            clean(g, overflows(g))
