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
#include "lib/slots.h"

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

#ifndef KPR_NP_SNAT_SLOTS
/* 1: a new NodePort SNAT flow's reply side is a slot of kpr_snat_slots claimed by compare-and-swap
 * (kpr_snat_claim: one line, no LRU insert), kpr_snat only when every slot tried is held (counted:
 * KPR_NP_ST_SNAT_SLOT_FULL); 0: kpr_snat only, as before. Both builds read both for replies.
 * (Listed with NodePort's switches, lib/nodeport.h, where the claim's stage is.)
 * On by default since README issue 14's twentieth round (with KPR_NP_CT_SLOTS; H1's defects, which
 * kept it off, were mended in the rounds before); the agent builds both off for config
 * flowSlots: false (kpr.nodeport.datapath.NO_SLOTS). */
#define KPR_NP_SNAT_SLOTS 1
#endif
#ifndef KPR_NP_TEST_GATES_SHUT
/* Benchmarks only: non-zero, the slot tables' gates (kpr_snat_gate, lib/nodeport.h kpr_np_ct_gate)
 * read as shut whatever they hold, so a slot miss never looks in kpr_snat or kpr_ct: what a new
 * flow costs when its slot's key was never sent to the LRU maps (the bound a gate per slot could
 * reach; one gate per table opens at a table's first overflow). Wrong for real traffic. */
#define KPR_NP_TEST_GATES_SHUT 0
#endif
#ifndef KPR_SNAT_SLOT_TRIES
#define KPR_SNAT_SLOT_TRIES 4 // random ports whose slots are tried before kpr_snat (then KPR_SNAT_RETRIES there)
#endif
#ifndef KPR_SNAT_SLOT_PROBES
/* Slots from a reply key's hash on (a find reads them all: a freed slot ends no probe run). One:
 * the compare-and-swap on a key's only slot makes the key unique there; with more, a claim that met
 * another CPU's slot claimed but its key not yet written took the next probe, and when that key
 * landed two slots held it (replies to the other flow's client; README issue 14, H1's SNAT slots
 * reviewed). A held slot makes the claim try another port (KPR_SNAT_SLOT_TRIES). */
#define KPR_SNAT_SLOT_PROBES 1
#endif
#define KPR_SNAT_SLOTS_N 262144 // kpr_snat_slots' slots: twice KPR_SNAT_MAX's default; a power of two, fixed (the programs' index mask)
#define KPR_SNAT_KEY_DWORDS 5   // struct kpr_ct_key in 64-bit words

#define KPR_E_NAT_NOPORT -4   // no free SNAT port after KPR_SNAT_RETRIES tries
#define KPR_SNAT_SLOTS_HELD 1 // kpr_snat_claim: every slot tried held, or its port taken

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

/* kpr_snat_slots slot (lib/slots.h): a NodePort SNAT flow's reverse entry, keyed by its reply tuple
 * (backend -> SNAT address:port, dir REPLY). Freed by the collector (kpr.nodeport.gc) once the flow
 * is gone; kpr.bpf.slots reads and clears it. */
struct kpr_snat_slot {
	__u64 claim;             // KPR_SLOT_FREE, or the claim stamp (kpr_ct_now() | 1)
	struct kpr_ct_key key;   // the reply tuple
	struct kpr_nat_entry val; // the client and the frontend, as a kpr_snat reverse entry
	__u8 pad[32];            // zero
};

/* Whether kpr_snat may hold reverse entries (a claim then checks its key there: a flow an older
 * build began, or an overflow, keeps its port). The programs add 1 to `overflows` after every
 * kpr_snat insert of an even port (odd ones are never a slot's); the collector reads `overflows`,
 * finds no even port's reverse entry in kpr_snat, then writes `clean` = what it read + 1. Zero
 * (a new pin, an upgrade): not clean. */
struct kpr_snat_gate {
	__u64 overflows; // kpr_snat inserts of even ports so far
	__u64 clean;     // overflows + 1 when the collector last found kpr_snat without reverse entries
};

_Static_assert(sizeof(struct kpr_snat_slot) == KPR_SLOT_SIZE, "kpr_snat_slot layout");
_Static_assert(sizeof(struct kpr_snat_gate) == 16, "kpr_snat_gate layout");

// SNAT mappings keyed like conntrack: DIR_ORIGINAL = the client's tuple, DIR_REPLY = the reply's tuple.
BPF_TABLE_PINNED("lru_hash", struct kpr_ct_key, struct kpr_nat_entry, kpr_snat, KPR_SNAT_MAX, KPR_PIN(kpr_snat));
// New SNAT flows' reverse entries (KPR_NP_SNAT_SLOTS), indexed by the reply key's hash; mmapable:
// the collector reads and frees slots as memory. Declared in every build (they all read it).
BPF_TABLE_PINNED("array", __u32, struct kpr_snat_slot, kpr_snat_slots, KPR_SNAT_SLOTS_N, KPR_PIN(kpr_snat_slots),
		 BPF_F_MMAPABLE);
// Mmapable: the collector writes the clean word alone (a whole-value update could lose an insert's count).
BPF_TABLE_PINNED("array", __u32, struct kpr_snat_gate, kpr_snat_gate, 1, KPR_PIN(kpr_snat_gate), BPF_F_MMAPABLE);

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

// The reverse entry of a new NodePort SNAT flow (tuple after DNAT): its client and frontend.
static __always_inline void kpr_snat_rev_fill(struct kpr_nat_entry *rev, const struct kpr_tuple *t,
					      const union kpr_addr *fe, __be16 fport)
{
	rev->addr = t->saddr;
	rev->port = t->sport;
	rev->fe_addr = *fe;
	rev->fe_port = fport;
	rev->created = kpr_ct_now();
}

// A random SNAT port, host order.
static __always_inline __u16 kpr_snat_random_port(void)
{
	return KPR_SNAT_PORT_MIN + bpf_get_prandom_u32() % (KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1);
}

/* The range's even ports (a kpr_snat_slots slot's, KPR_NP_SNAT_SLOTS) and odd ones (kpr_snat's in
 * those builds): the first of each and how many. A range may start on an odd port or end on an
 * even one (snatPortRange 61001-61001): a port rounded to its parity must stay inside it. */
#define KPR_SNAT_EVEN_MIN ((KPR_SNAT_PORT_MIN + 1) & ~1)
#define KPR_SNAT_EVEN_N (KPR_SNAT_PORT_MAX >= KPR_SNAT_EVEN_MIN ? (KPR_SNAT_PORT_MAX - KPR_SNAT_EVEN_MIN) / 2 + 1 : 0)
#define KPR_SNAT_ODD_MIN (KPR_SNAT_PORT_MIN | 1)
#define KPR_SNAT_ODD_N (KPR_SNAT_PORT_MAX >= KPR_SNAT_ODD_MIN ? (KPR_SNAT_PORT_MAX - KPR_SNAT_ODD_MIN) / 2 + 1 : 0)

// A random even SNAT port of the range, host order (KPR_SNAT_EVEN_N > 0).
static __always_inline __u16 kpr_snat_random_even(void)
{
	return KPR_SNAT_EVEN_MIN + 2 * (bpf_get_prandom_u32() % (KPR_SNAT_EVEN_N ? KPR_SNAT_EVEN_N : 1));
}

/* A random SNAT port for kpr_snat, host order: in KPR_NP_SNAT_SLOTS builds an odd one (never a
 * slot's; KPR_SNAT_ODD_N > 0). */
static __always_inline __u16 kpr_snat_random_lru_port(void)
{
	if (KPR_NP_SNAT_SLOTS)
		return KPR_SNAT_ODD_MIN + 2 * (bpf_get_prandom_u32() % (KPR_SNAT_ODD_N ? KPR_SNAT_ODD_N : 1));
	return kpr_snat_random_port();
}

/* The first (even) SNAT port (host order) a new flow to backend b:bport tries, from its tuple after DNAT
 * hashed with `seed` (after RFC 6056's hash-based choice: not a function of the tuple alone),
 * as the range scaled by the hash (a multiply and a shift: a divide costs tens of cycles). `k`:
 * room for the key. Its caller can load the port's slot before the claim (KPR_NP_SYN_FIRST). */
static __always_inline __u16 kpr_snat_first_port(struct kpr_ct_key *k, const union kpr_addr *c, __be16 cport,
						const union kpr_addr *b, __be16 bport, __u8 proto, __u64 seed)
{
	__u64 v;

	kpr_ct_key_of(k, c, cport, b, bport, proto, KPR_CT_DIR_ORIGINAL);
	v = ((__u64)kpr_slots_hash(k, KPR_SNAT_KEY_DWORDS) ^ seed) * 0x9E3779B97F4A7C15ULL;
	return KPR_SNAT_EVEN_MIN + 2 * (__u16)(((v >> 32) * KPR_SNAT_EVEN_N) >> 32);
}

#define KPR_SNAT_SLOT_FOUND (1U << 31) // kpr_snat_slot_probe: the index holds the key
#define KPR_SNAT_SLOT_NONE (~0U)        // kpr_snat_slot_probe: no slot holds the key, none of its probes is free

/* Where the reply key `rk` is in kpr_snat_slots: its slot's index | KPR_SNAT_SLOT_FOUND, else the
 * index of the first free slot of its probes, else KPR_SNAT_SLOT_NONE. Every probe is read: a slot
 * the collector freed may sit before the key's. A slot being filled (key not written yet) matches
 * no key. (Numbers carried between probes, not pointers: see lib/slots.h.) */
static __always_inline __u32 kpr_snat_slot_probe(const struct kpr_ct_key *rk)
{
	struct kpr_snat_slot *s;
	__u32 h = kpr_slots_hash(rk, KPR_SNAT_KEY_DWORDS), i, idx, free = KPR_SNAT_SLOT_NONE;

#pragma nounroll
	for (i = 0; i < KPR_SNAT_SLOT_PROBES; i++) {
		idx = kpr_slots_index(h, i, KPR_SNAT_SLOTS_N - 1);
		s = kpr_snat_slots.lookup(&idx);
		if (!s)
			break;
		if (s->claim == KPR_SLOT_FREE) {
			if (free == KPR_SNAT_SLOT_NONE)
				free = idx;
		} else if (kpr_slots_key_eq(&s->key, rk, KPR_SNAT_KEY_DWORDS)) {
			return idx | KPR_SNAT_SLOT_FOUND;
		}
	}
	return free;
}

// The slot of kpr_snat_slots holding the reply key `rk`, or NULL.
static __always_inline struct kpr_snat_slot *kpr_snat_slot_find(const struct kpr_ct_key *rk)
{
	__u32 r = kpr_snat_slot_probe(rk);

	if (r == KPR_SNAT_SLOT_NONE || !(r & KPR_SNAT_SLOT_FOUND))
		return (void *)0;
	r &= ~KPR_SNAT_SLOT_FOUND;
	return kpr_snat_slots.lookup(&r);
}

/* A new NodePort SNAT flow's reply side in a slot of kpr_snat_slots (tuple after DNAT: client ->
 * backend): KPR_SNAT_SLOT_TRIES even SNAT ports, `first` (host order; 0: a random one) and then
 * random ones, each port's reply key hashed to its probes;
 * a port whose key a slot holds, or kpr_snat (while its gate says it may hold reverse entries), is
 * taken; else the first free probe is claimed by compare-and-swap and filled (client, frontend).
 * Returns 0 with *port set, or KPR_SNAT_SLOTS_HELD (the caller then takes kpr_snat_alloc). */
static __always_inline int kpr_snat_claim(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
					  const union kpr_addr *fe, __be16 fport, __u16 first, __be16 *port)
{
	struct kpr_ct_key rk;
	struct kpr_nat_entry rev = {};
	struct kpr_snat_slot *s;
	struct kpr_snat_gate *g;
	__u32 zero = 0, r;
	int i, lru;

	if (!KPR_SNAT_EVEN_N)
		return KPR_SNAT_SLOTS_HELD; // (a range of one odd port: no slot's port in it)
	kpr_snat_rev_fill(&rev, t, fe, fport);
	// (a number, not the gate's pointer, carried on: see lib/slots.h)
	g = kpr_snat_gate.lookup(&zero);
	lru = !KPR_NP_TEST_GATES_SHUT && (!g || g->clean != g->overflows + 1); // kpr_snat may hold reverse entries
#pragma nounroll
	for (i = 0; i < KPR_SNAT_SLOT_TRIES; i++) {
		kpr_ct_reply_key(&rk, &t->daddr, t->dport, nat_addr,
				 kpr_htons(i == 0 && first ? first : kpr_snat_random_even()), t->proto);
		r = kpr_snat_slot_probe(&rk);
		if (r == KPR_SNAT_SLOT_NONE || (r & KPR_SNAT_SLOT_FOUND) || (lru && kpr_snat.lookup(&rk)))
			continue; // every probe held, or the port taken
		s = kpr_snat_slots.lookup(&r);
		if (!s || !kpr_slots_claim(&s->claim, kpr_slots_stamp(rev.created)))
			continue;
		s->val = rev;
		kpr_slots_fill_key(&s->key, &rk, KPR_SNAT_KEY_DWORDS);
		*port = rk.dport;
		return 0;
	}
	return KPR_SNAT_SLOTS_HELD;
}

// A build may bring its own kpr_snat_alloc (KPR_SNAT_ALLOC_OWN, as KPR_CT_OWN in lib/conntrack.h).
#ifndef KPR_SNAT_ALLOC_OWN
/* The reply side of a SNAT flow in kpr_snat (tuple after DNAT: client -> backend), in one LRU
 * insert: the reverse entry, inserted with BPF_NOEXIST so a port is owned by one flow per remote
 * endpoint, holds the client and the frontend. The forward side (SNAT address and port) goes into
 * the flow's conntrack entry (kpr_ct_create_snat). KPR_NP_SNAT_SLOTS builds take odd ports here
 * (none in a range without one) and even ones in kpr_snat_slots (kpr_snat_claim): a port one holds is never the other's, with no
 * look at the slots per try (the XDP SNAT stage has no room for it under the verifier's million
 * instructions). Every even port's insert counts in kpr_snat_gate. Returns 0 with *port set, or
 * KPR_E_NAT_NOPORT. */
static __always_inline int kpr_snat_alloc(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
					  const union kpr_addr *fe, __be16 fport, __be16 *port)
{
	struct kpr_ct_key rk;
	struct kpr_nat_entry rev = {};
	struct kpr_snat_gate *g;
	__u32 zero = 0;
	int i;

	if (KPR_NP_SNAT_SLOTS && !KPR_SNAT_ODD_N)
		return KPR_E_NAT_NOPORT; // (a range of one even port: the slots' alone)
	kpr_snat_rev_fill(&rev, t, fe, fport);
	for (i = 0; i < KPR_SNAT_RETRIES; i++) {
		kpr_ct_reply_key(&rk, &t->daddr, t->dport, nat_addr,
				 kpr_htons(kpr_snat_random_lru_port()), t->proto);
		if (kpr_snat.insert(&rk, &rev) == 0)
			goto found;
	}
	return KPR_E_NAT_NOPORT;
found:
	g = kpr_snat_gate.lookup(&zero);
	if (g) // kpr_snat holds a reverse entry a claim may meet: an even port's (only those are slots')
		__sync_fetch_and_add(&g->overflows, (__u64)(~kpr_ntohs(rk.dport) & 1)); // (no branch: the stage's verifier walk)
	*port = rk.dport;
	return 0;
}
#endif /* KPR_SNAT_ALLOC_OWN */

/* Undo kpr_snat_alloc's reverse entry `rk` (its flow could not be recorded): a slot it claimed is
 * given back (key zeroed first: no reader matches it after), else the kpr_snat entry deleted. */
static __always_inline void kpr_snat_unalloc(const struct kpr_ct_key *rk)
{
	struct kpr_ct_key none = {};
	struct kpr_snat_slot *s = kpr_snat_slot_find(rk);

	if (s) {
		kpr_slots_fill_key(&s->key, &none, KPR_SNAT_KEY_DWORDS);
		kpr_slots_release(&s->claim);
		return;
	}
	kpr_snat.delete(rk);
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
		kpr_snat_unalloc(&rk);
		*err = KPR_E_NAT_NOPORT;
		return (void *)0;
	}
	return kpr_snat.lookup(&fk);
}

/* The original client of a reply to a source-NATed flow (tuple as received), or NULL: its slot
 * of kpr_snat_slots, else kpr_snat (flows an older build began, overflow). */
static __always_inline struct kpr_nat_entry *kpr_snat_reverse(const struct kpr_tuple *t)
{
	struct kpr_ct_key rk;
	struct kpr_snat_slot *s;

	kpr_ct_key_from_tuple(&rk, t, KPR_CT_DIR_REPLY);
	s = kpr_snat_slot_find(&rk);
	if (s)
		return &s->val;
	return kpr_snat.lookup(&rk);
}

#endif /* KPR_LIB_NAT_H */
