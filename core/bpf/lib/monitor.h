/* `kpr monitor`: events from the programs through one BPF ring buffer, pinned next to the
 * service maps so every program (socket hooks, tc, XDP) writes to the same one.
 *
 * Off unless someone listens: every emit point first reads kpr_mon_cfg.on (one array lookup
 * with a constant key, which the verifier inlines, and one compare); `kpr monitor` raises it
 * while it runs and lowers it on exit. benchmarks/bench_monitor.py measures the cost of that
 * check against the build without the monitor (KPR_MON 0).
 *
 * This header is the one definition of the event layout, the event types and the reasons:
 * kpr.monitor reads the #defines below by name (KPR_MON_T_*, KPR_MON_HOOK_*, KPR_MON_NEW_*,
 * KPR_MON_R_*) and mirrors struct kpr_mon_event field by field (tests/test_monitor.py checks
 * the names and sizes against this file). Drop reasons are named as the drop counters are
 * (kpr.drops): KPR_MON_R_SOURCE_RANGE is "source_range" in kpr_drops_total and in `kpr explain`.
 */
#ifndef KPR_LIB_MONITOR_H
#define KPR_LIB_MONITOR_H

#include "lib/common.h"
#include "lib/maps.h"

#ifndef KPR_MON
#define KPR_MON 1 // 0: build without the monitor (no maps, no checks): the benchmark's baseline
#endif
#ifndef KPR_MON_RING_BYTES
#define KPR_MON_RING_BYTES (256 * 1024) // ring buffer size: a power of 2 multiple of the page size
#endif

// Event types (struct kpr_mon_event.type); kpr_mon_cfg.types masks them by (1 << type).
#define KPR_MON_T_NEW 1      // a new flow translated to a backend (how: KPR_MON_NEW_*)
#define KPR_MON_T_DROP 2     // a packet dropped (reason: KPR_MON_R_*)
#define KPR_MON_T_REFUSE 3   // a connect()/sendmsg() refused (reason: KPR_MON_R_*)
#define KPR_MON_T_CT_FULL 4  // a conntrack or reverse entry could not be written
#define KPR_MON_T_NAT_FULL 5 // no free SNAT port (NAT exhaustion)
#define KPR_MON_T_PASS 6     // a packet kpr could not take apart, left to the kernel's stack (reason: KPR_MON_R_*)

// Where the event comes from (struct kpr_mon_event.hook).
#define KPR_MON_HOOK_SOCKET 1 // the cgroup connect/sendmsg hooks (socklb)
#define KPR_MON_HOOK_TC 2     // tc_nodeport
#define KPR_MON_HOOK_XDP 3    // xdp_nodeport

// How a new flow was translated (struct kpr_mon_event.reason when type is KPR_MON_T_NEW).
#define KPR_MON_NEW_SOCKET 1 // socket LB: the socket now talks to the backend
#define KPR_MON_NEW_LOCAL 2  // DNAT to a backend on this node
#define KPR_MON_NEW_SNAT 3   // to a remote backend, source-NATed
#define KPR_MON_NEW_DSR 4    // to a remote backend by direct server return

// Why a packet was dropped or a call refused: the drop counters' names (kpr.drops).
#define KPR_MON_R_NO_BACKEND 1       // the frontend has no selectable backend
#define KPR_MON_R_NO_LOCAL_BACKEND 2 // traffic policy Local and no backend on this node
#define KPR_MON_R_SOURCE_RANGE 3     // the client is outside loadBalancerSourceRanges
#define KPR_MON_R_SNAT_NO_PORT 4     // no free SNAT port
#define KPR_MON_R_VIP_UNSERVED 5     // an announced address, on a port or protocol it does not serve
#define KPR_MON_R_NAT_FAILED 6       // a rewrite failed (truncated headers, SCTP port change)
#define KPR_MON_R_DSR_FAILED 7       // the DSR header could not be added or removed
#define KPR_MON_R_DSR_UNKNOWN_FRONTEND 8 // a DSR header naming no frontend of this cluster
#define KPR_MON_R_MTU 9              // the DSR header would exceed the MTU and DF is clear
#define KPR_MON_R_NO_REVERSE_ENTRY 10 // a reply to a SNAT port whose frontend is unknown
#define KPR_MON_R_NO_SNAT_ADDRESS 11 // no node address of the egress device's family to SNAT to
#define KPR_MON_R_MALFORMED 12       // headers kpr could not parse (type KPR_MON_T_PASS: the stack judges them)
#define KPR_MON_R_BIND_REFUSED 13    // bind() to a frontend's address and port refused (bind protection)
#define KPR_MON_R_SHORT_FRAME 14     // a frame too short for the route's MACs (counter fwd_drop_short; no tuple)
#define KPR_MON_R_TAIL_CALL_MISSING 15 // a stage program missing from the tail-call array (no tuple)
#define KPR_MON_R_CT_CLAIM 16        // a new flow's first packet while another CPU wrote the same flow's entry (KPR_NP_CT_SLOTS)

// kpr_mon_cfg value (one entry, key 0): written by `kpr monitor`, read by the programs.
struct kpr_mon_cfg {
	__u32 on;     // listeners; 0: emit nothing (the one check every emit point makes)
	__u32 types;  // bit (1 << KPR_MON_T_*) set: emit that type; 0: every type
	__u32 sample; // emit 1 event in `sample` (0 or 1: every event)
	__u32 lost;   // events the ring buffer had no room for
};

// One event (ring buffer record).
struct kpr_mon_event {
	__u64 ts;             // bpf_ktime_get_ns()
	__u64 cookie;         // the socket's cookie (socket hook); 0 otherwise
	union kpr_addr saddr; // client address; socket hook: zero (chosen after connect())
	union kpr_addr daddr; // the frontend address as dialled
	union kpr_addr baddr; // the backend (new flows); zero otherwise
	__be16 sport;         // client port (network order); socket hook: 0
	__be16 dport;         // frontend port (network order)
	__be16 bport;         // backend port (network order)
	__u8 proto;           // IPPROTO_*
	__u8 type;            // KPR_MON_T_*
	__u8 hook;            // KPR_MON_HOOK_*
	__u8 reason;          // KPR_MON_NEW_* or KPR_MON_R_*
	__u16 pad;            // zero
	__u32 rev_nat;        // the frontend's rev-NAT index (0 when no frontend matched)
	__u32 backend_id;     // the backend's id (new flows; kpr_lb_backend())
	__u32 pad2;           // zero
};

_Static_assert(sizeof(struct kpr_mon_cfg) == 16, "kpr_mon_cfg layout");
_Static_assert(sizeof(struct kpr_mon_event) == 88, "kpr_mon_event layout");

#if KPR_MON

BPF_TABLE_PINNED("array", __u32, struct kpr_mon_cfg, kpr_mon_cfg, 1, KPR_PIN(kpr_mon_cfg));

// BPF_RINGBUF_OUTPUT, pinned (bcc has no pinned form of it).
struct kpr_mon_ring_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" KPR_PIN(kpr_mon_ring)))) struct kpr_mon_ring_table_t kpr_mon_ring = {
	.max_entries = KPR_MON_RING_BYTES};

/* The gate of every emit point: NULL (emit nothing) unless someone listens for this type and
 * the sample falls on this event; otherwise a reserved record, zeroed, for the caller to
 * fill and hand to kpr_mon_submit(). */
static __always_inline struct kpr_mon_event *kpr_mon_begin(__u8 type, __u8 hook, __u8 reason)
{
	__u32 zero = 0;
	struct kpr_mon_cfg *cfg = kpr_mon_cfg.lookup(&zero);
	struct kpr_mon_event *e;

	if (!cfg || !cfg->on) // the off switch
		return (void *)0;
	if (cfg->types && !(cfg->types & (1U << type)))
		return (void *)0;
	if (cfg->sample > 1 && bpf_get_prandom_u32() % cfg->sample)
		return (void *)0;
	e = kpr_mon_ring.ringbuf_reserve(sizeof(*e));
	if (!e) {
		__sync_fetch_and_add(&cfg->lost, 1);
		return (void *)0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts = bpf_ktime_get_ns();
	e->type = type;
	e->hook = hook;
	e->reason = reason;
	return e;
}

static __always_inline void kpr_mon_submit(struct kpr_mon_event *e)
{
	kpr_mon_ring.ringbuf_submit(e, 0);
}

// An event about a flow tuple (tc/XDP): new flow to a backend, drop, exhaustion.
static __always_inline void kpr_mon_flow(__u8 type, __u8 hook, __u8 reason, const struct kpr_tuple *t,
					 __u32 rev_nat, __u32 backend_id, const struct kpr_backend *be)
{
	struct kpr_mon_event *e = kpr_mon_begin(type, hook, reason);

	if (!e)
		return;
	e->saddr = t->saddr;
	e->daddr = t->daddr;
	e->sport = t->sport;
	e->dport = t->dport;
	e->proto = t->proto;
	e->rev_nat = rev_nat;
	e->backend_id = backend_id;
	if (be) {
		e->baddr = be->addr;
		e->bport = be->port;
	}
	kpr_mon_submit(e);
}

/* An event with no packet headers to tell (addresses, ports and proto zero): drops decided
 * where no tuple is at hand, e.g. a missing tail-call stage. kpr.monitor prints it without
 * addresses. */
static __always_inline void kpr_mon_bare(__u8 type, __u8 hook, __u8 reason)
{
	struct kpr_mon_event *e = kpr_mon_begin(type, hook, reason);

	if (e)
		kpr_mon_submit(e);
}

#else /* !KPR_MON: every emit point compiles to nothing */

#define kpr_mon_flow(type, hook, reason, t, rev_nat, backend_id, be) \
	do {                                                         \
	} while (0)

#define kpr_mon_bare(type, hook, reason) \
	do {                             \
	} while (0)

#endif /* KPR_MON */

#endif /* KPR_LIB_MONITOR_H */
