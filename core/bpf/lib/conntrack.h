/* Connection tracking for load-balanced flows: an LRU map keyed by the 5-tuple remembers the
 * backend (and the frontend's rev-NAT index) a flow was given, so established flows keep their
 * backend while the service changes, and replies can be reverse-translated.
 *
 * Context-free. Entries are created for the original direction (client -> frontend) and, by
 * programs that see replies, for the reply direction (backend -> client).
 */
#ifndef KPR_LIB_CONNTRACK_H
#define KPR_LIB_CONNTRACK_H

#include "lib/common.h"
#include "lib/maps.h"

#ifndef KPR_CT_MAX
#define KPR_CT_MAX 131072 // tracked flows (both directions); LRU evicts the oldest when full
#endif
#ifndef KPR_CT_TCP_TIMEOUT_NS
#define KPR_CT_TCP_TIMEOUT_NS (21600ULL * 1000000000ULL) // idle established TCP flow lifetime: 6 h (Cilium's)
#endif
#ifndef KPR_CT_TCP_SYN_TIMEOUT_NS
#define KPR_CT_TCP_SYN_TIMEOUT_NS (60ULL * 1000000000ULL) // a TCP flow that never saw a reply: 60 s
#endif
#ifndef KPR_CT_TCP_CLOSE_TIMEOUT_NS
#define KPR_CT_TCP_CLOSE_TIMEOUT_NS (10ULL * 1000000000ULL) // after FIN or RST: 10 s, so ports recycle
#endif
#ifndef KPR_CT_OTHER_TIMEOUT_NS
#define KPR_CT_OTHER_TIMEOUT_NS (60ULL * 1000000000ULL) // UDP, SCTP, ICMP idle lifetime: 60 s
#endif
#ifndef KPR_CT_TOUCH_INTERVAL_NS
#define KPR_CT_TOUCH_INTERVAL_NS 1000000000ULL // refresh last_seen at most once a second: fewer writes to a shared line
#endif

/* The conntrack clock: what kpr_ct's last_seen (and the NodePort maps' kpr_np_rev last_seen and
 * kpr_snat created) hold. A jiffies read is one load of jiffies_64 where the coarse clock reads
 * the timekeeper under its seqcount; converted here to ns on the CLOCK_MONOTONIC time base
 * (jiffies since INITIAL_JIFFIES times the tick, so the timeouts and stamps stay in ns and an
 * upgrade from a build on kpr_now() reads the same stamps), within a tick and the boot's offset
 * (jiffies start a few hundred ms after CLOCK_MONOTONIC's zero). Python's side, with that
 * offset measured: kpr.bpf.ctclock. */
#ifndef KPR_CT_CLOCK_JIFFIES
#define KPR_CT_CLOCK_JIFFIES 1 // 1: bpf_jiffies64() (when KPR_HZ is known); 0: kpr_now() (common.h: the coarse clock)
#endif
#ifndef KPR_HZ
#define KPR_HZ 0 // the running kernel's CONFIG_HZ, passed by the loader (kpr.bpf.ctclock.cflags()); 0: unknown, kpr_now()
#endif
#define KPR_CT_INITIAL_JIFFIES_S 300 // the kernel's INITIAL_JIFFIES: -300 s of jiffies as a 32-bit value (jiffies.h)

#if KPR_CT_CLOCK_JIFFIES && KPR_HZ
#define KPR_CT_TICK_NSEC ((1000000000ULL + KPR_HZ / 2) / KPR_HZ) // the kernel's TICK_NSEC
#define KPR_CT_INITIAL_JIFFIES ((__u64)(__u32)(-KPR_CT_INITIAL_JIFFIES_S * KPR_HZ))
#endif

// Now, on the conntrack clock, ns.
static __always_inline __u64 kpr_ct_now(void)
{
#if KPR_CT_CLOCK_JIFFIES && KPR_HZ
	return (bpf_jiffies64() - KPR_CT_INITIAL_JIFFIES) * KPR_CT_TICK_NSEC;
#else
	return kpr_now();
#endif
}

#ifndef KPR_CT_LOOKUP_BEFORE_WRITE
#define KPR_CT_LOOKUP_BEFORE_WRITE 1 // 1: an established packet writes an entry only when a field changes; 0: every packet (benchmarks' comparison)
#endif

#define KPR_CT_DIR_ORIGINAL 0 // client -> frontend (before DNAT)
#define KPR_CT_DIR_REPLY 1    // backend -> client (after DNAT)

#define KPR_CT_F_SEEN_REPLY (1U << 0) // a reply was seen: the flow is established
#define KPR_CT_F_CLOSING (1U << 1)    // FIN or RST seen: short timeout
#define KPR_CT_F_NODE_PORT (1U << 2)  // created by the NodePort path (SNAT may apply)
#define KPR_CT_F_SNAT (1U << 3)       // the flow was source-NATed (see lib/nat.h)
#define KPR_CT_F_DSR (1U << 4)        // the flow goes to a remote backend by direct server return (lib/dsr.h)
#define KPR_CT_F_LOCAL (1U << 5)      // the flow's backend is on this node (DNAT only)

#define KPR_TCP_FIN 0x01 // TCP flag bits as in the header's flags byte
#define KPR_TCP_SYN 0x02
#define KPR_TCP_RST 0x04
#define KPR_TCP_ACK 0x10

// kpr_ct key: one direction of a flow.
struct kpr_ct_key {
	union kpr_addr saddr; // source address
	union kpr_addr daddr; // destination address
	__be16 sport;         // source port (ICMP echo: id)
	__be16 dport;         // destination port
	__u8 proto;           // IPPROTO_*
	__u8 dir;             // KPR_CT_DIR_*
	__u16 pad;            // zero
} __attribute__((aligned(8))); // written and read as 64-bit words (kpr_ct_key_of, lib/slots.h): on the stack too

/* kpr_ct value. A source-NATed NodePort flow keeps its SNAT address and port here (no SNAT
 * forward entry of its own: one LRU insert less per new flow); its reply side is one kpr_snat
 * entry keyed by the reply tuple (lib/nat.h, kpr_snat_alloc). */
struct kpr_ct_entry {
	__u64 last_seen;         // kpr_ct_now() at the last refresh, ns
	__u32 backend_id;        // the flow's backend id (generation << 24 | index: kpr_lb_backend())
	__u32 rev_nat;           // the frontend's rev-NAT index (kpr_revnat key)
	__u16 flags;             // KPR_CT_F_*
	__u8 tcp_flags;          // union of TCP flags seen
	__u8 pad;                // zero
	__be16 nat_port;         // KPR_CT_F_SNAT flows: the SNAT source port; 0: no mapping made yet
	__u16 pad2;              // zero
	union kpr_addr nat_addr; // KPR_CT_F_SNAT flows: the SNAT source address (with nat_port)
};

#ifndef KPR_CT_KEY_WORDS
#define KPR_CT_KEY_WORDS 1 // 1: keys written as 64-bit words (kpr_ct_key_of); 0: field by field (lib/nodeport.h: KPR_NP_SNAT_IN_CT=0 builds, whose tc kpr_np_snat passed 512 stack bytes with words)
#endif

_Static_assert(sizeof(struct kpr_ct_key) == 40, "kpr_ct_key layout");
_Static_assert(__builtin_offsetof(struct kpr_ct_key, sport) == 32 && __builtin_offsetof(struct kpr_ct_key, dir) == 37,
	       "kpr_ct_key words (kpr_ct_key_of)");
_Static_assert(sizeof(struct kpr_ct_entry) == 40, "kpr_ct_entry layout");

// Tracked flows; LRU so the map never fills up with dead flows.
BPF_TABLE_PINNED("lru_hash", struct kpr_ct_key, struct kpr_ct_entry, kpr_ct, KPR_CT_MAX, KPR_PIN(kpr_ct));

/* A key from `s`:`sport` to `d`:`dport` in direction `dir`, written as the five 64-bit words
 * the slot hash and key compare read back (lib/slots.h). Why words: a word load over several
 * narrow stores cannot be forwarded from the store buffer, so it waits until those stores reach
 * the cache, and they wait for every older load: a new flow's conntrack claim hashed its key
 * only after the touched SNAT slot's miss, and the two misses ran one after the other (XDP new
 * SNAT flow 10-82 ns less in side-by-side runs, README issue 14, twenty-first round). Little-endian words,
 * as the BPF target and the JIT's hosts are (kpr.bpf.slots.slot_hash reads the same bytes). */
static __always_inline void kpr_ct_key_of(struct kpr_ct_key *k, const union kpr_addr *s, __be16 sport,
					  const union kpr_addr *d, __be16 dport, __u8 proto, __u8 dir)
{
#if KPR_CT_KEY_WORDS
	__u64 *w = (__u64 *)k;

	w[0] = (__u64)s->w[0] | (__u64)s->w[1] << 32;
	w[1] = (__u64)s->w[2] | (__u64)s->w[3] << 32;
	w[2] = (__u64)d->w[0] | (__u64)d->w[1] << 32;
	w[3] = (__u64)d->w[2] | (__u64)d->w[3] << 32;
	w[4] = (__u64)sport | (__u64)dport << 16 | (__u64)proto << 32 | (__u64)dir << 40; // pad zero
#else
	k->saddr = *s;
	k->daddr = *d;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->dir = dir;
	k->pad = 0;
#endif
}

static __always_inline void kpr_ct_key_from_tuple(struct kpr_ct_key *k, const struct kpr_tuple *t, __u8 dir)
{
	kpr_ct_key_of(k, &t->saddr, t->sport, &t->daddr, t->dport, t->proto, dir);
}

// Reply-direction key: from `b`:`bport` (the backend) to `c`:`cport` (the client, or the SNAT address).
static __always_inline void kpr_ct_reply_key(struct kpr_ct_key *k, const union kpr_addr *b, __be16 bport,
					     const union kpr_addr *c, __be16 cport, __u8 proto)
{
	kpr_ct_key_of(k, b, bport, c, cport, proto, KPR_CT_DIR_REPLY);
}

static __always_inline __u64 kpr_ct_timeout(const struct kpr_ct_entry *e, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return KPR_CT_OTHER_TIMEOUT_NS;
	if (e->flags & KPR_CT_F_CLOSING)
		return KPR_CT_TCP_CLOSE_TIMEOUT_NS;
	if (!(e->flags & KPR_CT_F_SEEN_REPLY))
		return KPR_CT_TCP_SYN_TIMEOUT_NS;
	return KPR_CT_TCP_TIMEOUT_NS;
}

/* Whether the entry has been idle longer than its timeout at `now` (the conntrack clock).
 * Signed: a stamp ahead of now is fresh, not 2^64 ns old (an upgrade from a build on the
 * coarse clock leaves stamps up to the boot's offset, a few hundred ms, ahead of jiffies). */
static __always_inline int kpr_ct_expired(const struct kpr_ct_entry *e, __u8 proto, __u64 now)
{
	return (__s64)(now - e->last_seen) > (__s64)kpr_ct_timeout(e, proto);
}

/* Refresh a live entry `e` with this packet's TCP flags at `now`; returns it. */
static __always_inline struct kpr_ct_entry *kpr_ct_refresh(struct kpr_ct_entry *e, const struct kpr_tuple *t, __u8 dir,
							   __u64 now)
{
#if !KPR_CT_LOOKUP_BEFORE_WRITE
	// every packet dirties the entry's cache line (shared by every CPU the flow's packets reach)
	e->last_seen = now;
	e->tcp_flags |= t->tcp_flags;
	e->flags |= (t->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST) ? KPR_CT_F_CLOSING : 0) |
		    (dir == KPR_CT_DIR_REPLY ? KPR_CT_F_SEEN_REPLY : 0);
	return e;
#endif
	if (t->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)) {
		e->flags |= KPR_CT_F_CLOSING;
		e->last_seen = now;
	} else if (now - e->last_seen > KPR_CT_TOUCH_INTERVAL_NS) {
		e->last_seen = now;
	}
	if ((t->tcp_flags | e->tcp_flags) != e->tcp_flags)
		e->tcp_flags |= t->tcp_flags;
	if (dir == KPR_CT_DIR_REPLY && !(e->flags & KPR_CT_F_SEEN_REPLY))
		e->flags |= KPR_CT_F_SEEN_REPLY;
	return e;
}

// A new entry `e` for the tuple in direction `dir` (its key `k`), with its SNAT mapping when
// `nat_addr` (see struct kpr_ct_entry).
static __always_inline void kpr_ct_new(struct kpr_ct_key *k, struct kpr_ct_entry *e, const struct kpr_tuple *t,
				       __u8 dir, __u32 backend_id, __u32 rev_nat, __u16 flags,
				       const union kpr_addr *nat_addr, __be16 nat_port)
{
	kpr_ct_key_from_tuple(k, t, dir);
	e->last_seen = kpr_ct_now();
	e->backend_id = backend_id;
	e->rev_nat = rev_nat;
	e->flags = flags;
	e->tcp_flags = t->tcp_flags;
	if (nat_addr) {
		e->nat_port = nat_port;
		e->nat_addr = *nat_addr;
	}
}

/* A build may bring its own kpr_ct_lookup and kpr_ct_write_entry (bcc rewrites map calls only in the
 * main text: a header pasted before the entry file defines KPR_CT_OWN, includes this one and
 * then defines them): kpr.testing.ct_array measures another layout of conntrack so. */
#ifndef KPR_CT_OWN
/* The live entry for the tuple in direction `dir`, refreshed with this packet's TCP flags; NULL
 * when there is none or it expired (a new SYN then starts a new flow with a fresh pick). */
static __always_inline struct kpr_ct_entry *kpr_ct_lookup(const struct kpr_tuple *t, __u8 dir)
{
	struct kpr_ct_key k;
	struct kpr_ct_entry *e;
	__u64 now;

	kpr_ct_key_from_tuple(&k, t, dir);
	e = kpr_ct.lookup(&k);
	if (!e)
		return (void *)0;
	now = kpr_ct_now();
	if (kpr_ct_expired(e, t->proto, now))
		return (void *)0;
	return kpr_ct_refresh(e, t, dir, now);
}

// Record a flow's entry `e` under its key `k`. Returns 0 or the map update's negative error.
static __always_inline int kpr_ct_write_entry(const struct kpr_ct_key *k, const struct kpr_ct_entry *e)
{
	return kpr_ct.update(k, e);
}
#endif /* KPR_CT_OWN */

// Record a flow, with its SNAT mapping when `nat_addr` (see struct kpr_ct_entry). Returns 0 or
// the map update's negative error.
static __always_inline int kpr_ct_write(const struct kpr_tuple *t, __u8 dir, __u32 backend_id, __u32 rev_nat,
					__u16 flags, const union kpr_addr *nat_addr, __be16 nat_port)
{
	struct kpr_ct_key k;
	struct kpr_ct_entry e = {};

	kpr_ct_new(&k, &e, t, dir, backend_id, rev_nat, flags, nat_addr, nat_port);
	return kpr_ct_write_entry(&k, &e);
}

// Record a new flow. Returns 0 or the map update's negative error.
static __always_inline int kpr_ct_create(const struct kpr_tuple *t, __u8 dir, __u32 backend_id, __u32 rev_nat,
					 __u16 flags)
{
	return kpr_ct_write(t, dir, backend_id, rev_nat, flags, (void *)0, 0);
}

// Record a new source-NATed flow (original direction) with its SNAT address and port.
static __always_inline int kpr_ct_create_snat(const struct kpr_tuple *t, __u32 backend_id, __u32 rev_nat, __u16 flags,
					      const union kpr_addr *nat_addr, __be16 nat_port)
{
	return kpr_ct_write(t, KPR_CT_DIR_ORIGINAL, backend_id, rev_nat, flags, nat_addr, nat_port);
}

// Mark the original direction's entry as answered, from a reply seen elsewhere.
static __always_inline void kpr_ct_seen_reply(struct kpr_ct_entry *e)
{
	if (!(e->flags & KPR_CT_F_SEEN_REPLY))
		e->flags |= KPR_CT_F_SEEN_REPLY;
}

#endif /* KPR_LIB_CONNTRACK_H */
