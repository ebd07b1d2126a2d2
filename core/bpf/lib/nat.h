/* DNAT to a backend, SNAT, reverse NAT (the rewrites themselves: lib/rewrite.h), and SNAT
 * port allocation.
 *
 * Needs ctx/skb.h or ctx/xdp.h first and a packet parsed by kpr_parse(). Rewrites keep
 * pkt->t in step with the packet.
 */
#ifndef KPR_LIB_NAT_H
#define KPR_LIB_NAT_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/nat.h"
#endif

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/conntrack.h"
#include "lib/rewrite.h"

#ifndef KPR_SNAT_MAX
#define KPR_SNAT_MAX 131072 // SNAT mappings (two per flow: forward and reverse); LRU evicts the oldest
#endif
#ifndef KPR_SNAT_PORT_MIN
#define KPR_SNAT_PORT_MIN 61000 // first SNAT source port: above Linux's default ephemeral range (32768-60999)
#endif
#ifndef KPR_SNAT_PORT_MAX
#define KPR_SNAT_PORT_MAX 65535 // last SNAT source port
#endif
#ifndef KPR_SNAT_RETRIES
#define KPR_SNAT_RETRIES 16 // random ports tried before giving up on a new SNAT flow
#endif

#ifndef KPR_SNAT_PORT_TABLE
/* 1: a new NodePort SNAT flow's reply side is a slot of an array indexed by its SNAT port
 * (kpr_snat_ports, written in place: no LRU insert), the port found by walking the CPU's own
 * share of the range from a per-CPU cursor; 0: a kpr_snat LRU entry keyed by the reply tuple
 * (random ports tried). Either build reads both. Needs KPR_NP_SNAT_IN_CT (a slot is free once
 * its flow's conntrack entry, which holds the port, is gone or expired).
 * Off by default: a CPU's share of a backend bucket is min(range, 8192) / KPR_SNAT_CPUS ports
 * (35 with 128 possible CPUs) and four tries refuse new flows long before the range is full,
 * where the LRU path's 16 random tries over the whole range almost never do; and the collector
 * frees a slot by reading then rewriting it, which can race a program handing it to a new flow
 * (no atomic claim yet). It saves about 100 ns per new SNAT flow; benchmarks build it on. */
#define KPR_SNAT_PORT_TABLE 0
#endif
#ifndef KPR_SNAT_PORT_BUCKETS
#define KPR_SNAT_PORT_BUCKETS 8 // port spaces per protocol: a backend's address hashes to one, so backends reuse ports
#endif
#ifndef KPR_SNAT_PORT_SPAN
// slots per port space, whatever the configured range (the map's size stays fixed, so the
// facility creates it before any program): a range of more ports uses its first this many
#define KPR_SNAT_PORT_SPAN 8192
#endif
#ifndef KPR_SNAT_PORT_PROBES
#define KPR_SNAT_PORT_PROBES 4 // slots of the CPU's share tried (the next ones, the last half a share away) before a new flow is refused (more: past the verifier's limit in the stages)
#endif
#ifndef KPR_SNAT_CPUS
#define KPR_SNAT_CPUS 1 // possible CPUs (the loader passes them): CPU c allocates the ports c, c + this, ... of the range
#endif

#define KPR_E_NAT_NOPORT -4   // no free SNAT port after KPR_SNAT_RETRIES tries

/* kpr_snat value: where one direction of a source-NATed flow is translated to. A NodePort
 * flow's reverse entry (kpr_snat_alloc) also holds the frontend its replies must come from,
 * so a reply needs this one entry (no kpr_np_rev entry); fe_port 0: not recorded here. */
struct kpr_nat_entry {
	union kpr_addr addr;    // forward: the SNAT address; reverse: the original client address
	__be16 port;            // forward: the SNAT port; reverse: the original client port
	__be16 fe_port;         // reverse, NodePort flows: the frontend port; 0: none
	__u32 pad2;             // zero
	__u64 created;          // kpr_ct_now() at allocation, ns
	union kpr_addr fe_addr; // reverse, NodePort flows: the frontend address (the one the client dialled)
};

_Static_assert(sizeof(struct kpr_nat_entry) == 48, "kpr_nat_entry layout");

// SNAT mappings keyed like conntrack: DIR_ORIGINAL = the client's tuple, DIR_REPLY = the reply's tuple.
BPF_TABLE_PINNED("lru_hash", struct kpr_ct_key, struct kpr_nat_entry, kpr_snat, KPR_SNAT_MAX, KPR_PIN(kpr_snat));

/* The port table's map and its reply-side lookup are in every build, with the table or without:
 * a build without it (KPR_SNAT_PORT_TABLE=0, or one replacing a build with it) still
 * translates the replies of the flows a build with it began, and gives none of their ports to
 * a new flow (kpr_snat_alloc). Only the allocation from the table is the switch's. */
#define KPR_SNAT_RANGE (KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1)
#define KPR_SNAT_NPORTS (KPR_SNAT_RANGE < KPR_SNAT_PORT_SPAN ? KPR_SNAT_RANGE : KPR_SNAT_PORT_SPAN)
// CPUs sharing the range (more CPUs than ports: some share a share, and may race for a slot)
#define KPR_SNAT_SHARES (KPR_SNAT_CPUS < KPR_SNAT_NPORTS ? KPR_SNAT_CPUS : KPR_SNAT_NPORTS)
_Static_assert((KPR_SNAT_PORT_BUCKETS & (KPR_SNAT_PORT_BUCKETS - 1)) == 0, "KPR_SNAT_PORT_BUCKETS: a power of two");
_Static_assert((KPR_SNAT_PORT_SPAN & (KPR_SNAT_PORT_SPAN - 1)) == 0, "KPR_SNAT_PORT_SPAN: a power of two");
// A port's slot in its space: the port modulo the span (distinct for the range's first span
// ports, and the same whatever the range: the collector and `kpr explain` need no range).
#define KPR_SNAT_PORT_SLOT(base, port) ((base) + ((port) & (KPR_SNAT_PORT_SPAN - 1)))

/* kpr_snat_ports value: the reply side of one source-NATed NodePort flow, at index
 * ((proto is UDP) * KPR_SNAT_PORT_BUCKETS + bucket of the backend's address) * KPR_SNAT_PORT_SPAN
 * + port % KPR_SNAT_PORT_SPAN. A reply (backend -> SNAT address:port) is this flow's when backend,
 * backend port, SNAT address and protocol match; anything else at that port is not ours. */
struct kpr_snat_port {
	__u64 stamp;             // kpr_ct_now() at allocation; 0: never used (or cleared by the collector)
	union kpr_addr addr;     // the client (a reply's new destination)
	__be16 port;             // the client's port
	__be16 fe_port;          // the frontend port (a reply's new source port)
	__be16 be_port;          // the backend's port (a reply's source port)
	__u8 proto;              // IPPROTO_*
	__u8 pad;                // zero
	union kpr_addr fe_addr;  // the frontend address the client dialled
	union kpr_addr be_addr;  // the backend (a reply's source)
	union kpr_addr nat_addr; // the SNAT address (a reply's destination)
};

_Static_assert(sizeof(struct kpr_snat_port) == 80, "kpr_snat_port layout");

BPF_TABLE_PINNED("array", __u32, struct kpr_snat_port, kpr_snat_ports, 2 * KPR_SNAT_PORT_BUCKETS * KPR_SNAT_PORT_SPAN,
		 KPR_PIN(kpr_snat_ports));

// First slot of the port space replies from `be` use (kpr.nodeport.gc.snat_port_slot mirrors it).
static __always_inline __u32 kpr_snat_port_base(__u8 proto, const union kpr_addr *be)
{
	__u32 h = be->w[0] ^ be->w[1] ^ be->w[2] ^ be->w[3];

	h ^= h >> 16;
	h ^= h >> 8;
	return ((proto == IPPROTO_UDP ? KPR_SNAT_PORT_BUCKETS : 0) + (h & (KPR_SNAT_PORT_BUCKETS - 1))) * KPR_SNAT_PORT_SPAN;
}

/* The slot a reply from `be`:`bport` to `nat`:`port` (network order) belongs to, or NULL: its
 * backend, backend port, SNAT address and protocol match (the slot is indexed by protocol,
 * backend bucket and port). One test of the fields' differences (few branches: kpr_snat_alloc
 * runs this once per port it tries); a cleared slot (all zero) matches nothing, its protocol
 * being 0. */
static __always_inline struct kpr_snat_port *kpr_snat_port_find(__u8 proto, const union kpr_addr *be, __be16 bport,
								 const union kpr_addr *nat, __be16 port)
{
	__u16 p = kpr_ntohs(port);
	__u32 idx, diff;
	struct kpr_snat_port *s;

	if (p < KPR_SNAT_PORT_MIN || p - KPR_SNAT_PORT_MIN >= KPR_SNAT_NPORTS)
		return (void *)0;
	idx = KPR_SNAT_PORT_SLOT(kpr_snat_port_base(proto, be), p);
	s = kpr_snat_ports.lookup(&idx);
	if (!s)
		return (void *)0;
	diff = (s->be_port ^ bport) | (s->proto ^ proto) | (s->be_addr.w[0] ^ be->w[0]) | (s->be_addr.w[1] ^ be->w[1]) |
	       (s->be_addr.w[2] ^ be->w[2]) | (s->be_addr.w[3] ^ be->w[3]) | (s->nat_addr.w[0] ^ nat->w[0]) |
	       (s->nat_addr.w[1] ^ nat->w[1]) | (s->nat_addr.w[2] ^ nat->w[2]) | (s->nat_addr.w[3] ^ nat->w[3]);
	return diff || !proto ? (void *)0 : s;
}

// The kpr_snat_ports slot a reply (tuple as received: backend -> SNAT address:port) belongs to, or NULL.
static __always_inline struct kpr_snat_port *kpr_snat_port_reverse(const struct kpr_tuple *t)
{
	return kpr_snat_port_find(t->proto, &t->saddr, t->sport, &t->daddr, t->dport);
}

// Each CPU's walk over its share of the range (defined in every build: the ABI is one, whatever
// the switches; only KPR_SNAT_PORT_TABLE builds have the map).
struct kpr_snat_cursor {
	__u32 next;  // the next port of the CPU's share to try (modulo the share's size)
	__u32 found; // the port offset the last allocation took, + 1 (0: none)
};

#if KPR_SNAT_PORT_TABLE
// Each CPU's cursor. Pinned: the tc and XDP builds (and a build replacing them) walk a CPU's
// share from one position, not each from its own over the other's live slots.
BPF_TABLE_PINNED("percpu_array", __u32, struct kpr_snat_cursor, kpr_snat_cursor, 1, KPR_PIN(kpr_snat_cursor));

/* Whether a slot's flow still holds its port: its conntrack entry (key from the slot) is there,
 * live on the conntrack clock, and holds this very mapping. Few branches (bitwise tests): the
 * verifier walks this once per slot tried. */
static __always_inline int kpr_snat_port_live(const struct kpr_snat_port *s, __be16 port, __u64 now)
{
	struct kpr_ct_key k;
	struct kpr_ct_entry *e;
	__u32 diff;

	if (!s->stamp)
		return 0;
	kpr_ct_key_of(&k, &s->addr, s->port, &s->fe_addr, s->fe_port, s->proto, KPR_CT_DIR_ORIGINAL);
	e = kpr_ct.lookup(&k);
	if (!e)
		return 0;
	diff = (e->nat_port ^ port) | (e->nat_addr.w[0] ^ s->nat_addr.w[0]) | (e->nat_addr.w[1] ^ s->nat_addr.w[1]) |
	       (e->nat_addr.w[2] ^ s->nat_addr.w[2]) | (e->nat_addr.w[3] ^ s->nat_addr.w[3]);
	return !diff && !kpr_ct_expired(e, s->proto, now);
}

/* The reply side of a new NodePort SNAT flow (tuple after DNAT: client -> backend) as a slot
 * of kpr_snat_ports: the CPU's cursor walks its own share of the port range (ports c, c +
 * KPR_SNAT_CPUS, ... for CPU c: no other CPU writes those slots, so no two flows race for
 * one) and takes the first slot whose flow is gone. KPR_SNAT_PORT_PROBES slots all live: the
 * range is full for this backend's port space, the flow is refused (KPR_E_NAT_NOPORT), as a
 * full kpr_snat is. The caller writes the flow's conntrack entry with the port next. */
static __always_inline int kpr_snat_port_alloc(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
					       const union kpr_addr *fe, __be16 fport, __be16 *port)
{
	__u32 zero = 0, cpu = bpf_get_smp_processor_id() % KPR_SNAT_SHARES, base, off, idx, next, len;
	struct kpr_snat_cursor *cur = kpr_snat_cursor.lookup(&zero);
	struct kpr_snat_port *s;
	__u64 now = kpr_ct_now();
	int i;

	if (!cur)
		return KPR_E_NAT_NOPORT;
	base = kpr_snat_port_base(t->proto, &t->daddr);
	len = (KPR_SNAT_NPORTS - 1 - cpu) / KPR_SNAT_SHARES + 1; // ports in the share
	next = cur->next;
	cur->found = 0;
	/* The search only, a loop the verifier walks (bounded) rather than copies of its body:
	 * what it found goes through the cursor's map value, read back after the loop, so every
	 * try that found a slot leaves the loop in one state (the verifier walks the rest of the
	 * stage once, not once per try). The offset is arithmetic, no branch, for the same reason. */
#pragma clang loop unroll(disable)
	for (i = 0; i < KPR_SNAT_PORT_PROBES; i++) {
		/* The tries are the slots at the cursor but the last, which is half the share
		 * ahead; the cursor moves past the near ones only (no free slot is jumped over).
		 * Flows opened together hold consecutive slots: when the cursor comes round to
		 * such a run (under half the share), a new flow takes a slot half a share away,
		 * where before one new flow for every 4 slots of the run was refused each round. */
		__u32 far = i == KPR_SNAT_PORT_PROBES - 1;

		off = cpu + ((next + (far ? len / 2 : i)) % len) * KPR_SNAT_SHARES;
		cur->next = (next + (far ? i : i + 1)) % len;
		idx = KPR_SNAT_PORT_SLOT(base, KPR_SNAT_PORT_MIN + off);
		s = kpr_snat_ports.lookup(&idx);
		if (s && !kpr_snat_port_live(s, kpr_htons(KPR_SNAT_PORT_MIN + off), now)) {
			cur->found = off + 1;
			break;
		}
	}
	off = cur->found;
	if (!off)
		return KPR_E_NAT_NOPORT;
	off--;
	idx = KPR_SNAT_PORT_SLOT(base, KPR_SNAT_PORT_MIN + off);
	s = kpr_snat_ports.lookup(&idx);
	if (!s)
		return KPR_E_NAT_NOPORT;
	s->addr = t->saddr;
	s->port = t->sport;
	s->fe_port = fport;
	s->be_port = t->dport;
	s->proto = t->proto;
	s->pad = 0;
	s->fe_addr = *fe;
	s->be_addr = t->daddr;
	s->nat_addr = *nat_addr;
	s->stamp = now;
	*port = kpr_htons(KPR_SNAT_PORT_MIN + off);
	return 0;
}
#endif

// DNAT: send the packet to `addr`:`port` (a backend). port 0 keeps the port.
static __always_inline int kpr_nat_dnat(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *addr, __be16 port)
{
	int ret;

	if (port && port != pkt->t.dport && pkt->t.proto == IPPROTO_SCTP)
		return KPR_E_NAT_UNSUPP; // checked before touching the packet
	ret = kpr_nat_rewrite_addr(ctx, pkt, addr, 1);
	if (ret)
		return ret;
	return port ? kpr_nat_rewrite_port(ctx, pkt, port, 1) : 0;
}

// SNAT (or reverse DNAT of a reply): make the packet come from `addr`:`port`. port 0 keeps the port.
static __always_inline int kpr_nat_snat(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *addr, __be16 port)
{
	int ret;

	if (port && port != pkt->t.sport && pkt->t.proto == IPPROTO_SCTP)
		return KPR_E_NAT_UNSUPP;
	ret = kpr_nat_rewrite_addr(ctx, pkt, addr, 0);
	if (ret)
		return ret;
	return port ? kpr_nat_rewrite_port(ctx, pkt, port, 0) : 0;
}

// DNAT to `daddr`:`dport` and SNAT to `saddr`:`sport` (a port of 0 kept): IPv4 TCP/UDP in one
// pass (lib/rewrite.h, KPR_REWRITE_ONE_CSUM), anything else a field at a time.
static __always_inline int kpr_nat_dnat_snat(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *daddr,
					     __be16 dport, const union kpr_addr *saddr, __be16 sport)
{
#if KPR_REWRITE_ONE_CSUM && !KPR_REWRITE_HELPERS
	if (pkt->t.family == KPR_FAMILY_V4 && pkt->csum_off &&
	    (pkt->t.proto == IPPROTO_TCP || pkt->t.proto == IPPROTO_UDP))
		return kpr_nat_rewrite4_both(ctx, pkt, saddr->w[3], sport, daddr->w[3], dport);
#endif
	return kpr_nat_dnat(ctx, pkt, daddr, dport) || kpr_nat_snat(ctx, pkt, saddr, sport) ? KPR_E_NAT_PKT : 0;
}

// Reverse NAT of a reply from a backend: restore the frontend (kpr_revnat) as its source.
static __always_inline int kpr_nat_revnat(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const struct kpr_revnat *rn)
{
	return kpr_nat_snat(ctx, pkt, &rn->addr, rn->port);
}

/* The reply side of a new NodePort SNAT flow (tuple after DNAT: client -> backend), in one LRU
 * insert: the reverse entry, inserted with BPF_NOEXIST so a port is owned by one flow per
 * remote endpoint, holds the client and the frontend. The forward side (SNAT address and
 * port) goes into the flow's conntrack entry (kpr_ct_create_snat). Returns 0 with *port set,
 * or KPR_E_NAT_NOPORT. */
static __always_inline int kpr_snat_alloc(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
					  const union kpr_addr *fe, __be16 fport, __be16 *port)
{
	struct kpr_ct_key rk;
	struct kpr_nat_entry rev = {};
	int i;

	rev.addr = t->saddr;
	rev.port = t->sport;
	rev.fe_addr = *fe;
	rev.fe_port = fport;
	rev.created = kpr_ct_now();
	for (i = 0; i < KPR_SNAT_RETRIES; i++) {
		__u16 p = KPR_SNAT_PORT_MIN + bpf_get_prandom_u32() % (KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1);

		kpr_ct_reply_key(&rk, &t->daddr, t->dport, nat_addr, kpr_htons(p), t->proto);
		if (kpr_snat.insert(&rk, &rev) == 0)
			goto found;
	}
	return KPR_E_NAT_NOPORT;
found:
	/* A port whose kpr_snat_ports slot would take this flow's replies (a flow a build with the
	 * table began, live or not yet cleared by the collector) is not free: the flow is refused
	 * (its client's next try draws another port). Checked once, after the tries, not in each:
	 * the verifier's walk of the XDP build's SNAT stage stays within its limit. */
	if (kpr_snat_port_find(t->proto, &t->daddr, t->dport, nat_addr, rk.dport)) {
		kpr_snat.delete(&rk);
		return KPR_E_NAT_NOPORT;
	}
	*port = rk.dport;
	return 0;
}

/* The SNAT mapping of an outgoing flow (tuple before SNAT), creating one when `create`: the
 * reverse entry first (kpr_snat_alloc, no frontend in it), then the forward entry. Returns the
 * forward entry (addr/port to rewrite the source to) or NULL. */
static __always_inline struct kpr_nat_entry *kpr_snat_mapping(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
							       int create, int *err)
{
	struct kpr_ct_key fk, rk;
	struct kpr_nat_entry fwd = {};
	struct kpr_nat_entry *e;
	union kpr_addr none = {};

	*err = 0;
	kpr_ct_key_from_tuple(&fk, t, KPR_CT_DIR_ORIGINAL);
	e = kpr_snat.lookup(&fk);
	if (e || !create)
		return e;
	if (kpr_snat_alloc(t, nat_addr, &none, 0, &fwd.port)) {
		*err = KPR_E_NAT_NOPORT;
		return (void *)0;
	}
	fwd.addr = *nat_addr;
	fwd.created = kpr_ct_now();
	if (kpr_snat.update(&fk, &fwd)) {
		kpr_ct_reply_key(&rk, &t->daddr, t->dport, nat_addr, fwd.port, t->proto);
		kpr_snat.delete(&rk);
		*err = KPR_E_NAT_NOPORT;
		return (void *)0;
	}
	return kpr_snat.lookup(&fk);
}

// The original client of a reply to a source-NATed flow (tuple as received), or NULL.
static __always_inline struct kpr_nat_entry *kpr_snat_reverse(const struct kpr_tuple *t)
{
	struct kpr_ct_key rk;

	kpr_ct_key_from_tuple(&rk, t, KPR_CT_DIR_REPLY);
	return kpr_snat.lookup(&rk);
}

#endif /* KPR_LIB_NAT_H */
