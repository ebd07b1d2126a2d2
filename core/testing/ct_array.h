/* A prototype conntrack layout (issue 14, item 4), for benchmarks/bench_nodeport_flowmaps.py
 * --kinds array and tests/kernel/test_nodeport_flowmaps_bench.py only: no collector, no writer
 * and no program of the agent's knows it. kpr.testing.ct_array pastes it before a plugin's
 * entry file (after its ctx header), where it replaces lib/conntrack.h's kpr_ct_lookup and
 * kpr_ct_write_entry (KPR_CT_OWN) and lib/nat.h's kpr_snat_alloc (KPR_SNAT_ALLOC_OWN).
 *
 * kpr_ct and kpr_snat are kernel hashes: a new flow misses a bucket of kpr_ct, then each insert
 * takes an element (LRU: a node off its lists) and links it into a bucket; the reply side's
 * bucket and element are lines of their own. Here a flow's direction is a slot of an array the
 * program indexes by its own hash of the key (KPR_CT_ARRAY_PROBES slots from it): the
 * lookup's miss reads the slot line the entry is then written to, and the reply side is one
 * slot line of kpr_snat_arr: two lines a new flow touches, not four. A slot whose entry expired
 * is taken again in place (no collector needed for room). Single-writer prototype: a slot is
 * claimed by a plain store (two CPUs writing one slot at once would need a compare-and-swap). */
// (the guard named as lib/*.h guards are: kpr.bpf.abi reads this header beside them)
#ifndef KPR_LIB_TESTING_CT_ARRAY_H
#define KPR_LIB_TESTING_CT_ARRAY_H

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/slots.h"

// the three replaced, declared for the headers' own callers (defined below)
struct kpr_ct_key;
struct kpr_ct_entry;
static __always_inline struct kpr_ct_entry *kpr_ct_lookup(const struct kpr_tuple *t, __u8 dir);
static __always_inline int kpr_ct_write_entry(const struct kpr_ct_key *k, const struct kpr_ct_entry *e);
static __always_inline int kpr_snat_alloc(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
					  const union kpr_addr *fe, __be16 fport, __be16 *port);
#define KPR_CT_OWN 1
#define KPR_SNAT_ALLOC_OWN 1
// NodePort's own slot tables would hold its flows before the prototype's arrays saw them
#ifndef KPR_NP_CT_SLOTS
#define KPR_NP_CT_SLOTS 0
#endif
#ifndef KPR_NP_SNAT_SLOTS
#define KPR_NP_SNAT_SLOTS 0
#endif
#ifndef KPR_SNAT_RETRIES
#define KPR_SNAT_RETRIES 4 // (the product's 16 with probing take the XDP SNAT stage past 4096 instructions)
#endif
#include "lib/conntrack.h"
#include "lib/nat.h"

#ifndef KPR_CT_ARRAY_MAX
#define KPR_CT_ARRAY_MAX 262144 // slots per table, a power of two (twice kpr_ct's entries)
#endif
#ifndef KPR_CT_ARRAY_PROBES
/* Slots tried from the key's hash on. 1 (direct-mapped: a slot a live entry of another key
 * holds refuses the insert, counted as a conntrack or SNAT-port failure): 2 take the XDP SNAT
 * stage past the 4096 instructions a program may have (5059). */
#define KPR_CT_ARRAY_PROBES 1
#endif

/* One direction of a flow: its key and value in two adjacent lines (the array's values are
 * page-aligned, 128 apart): the key and the value's first bytes in the first. */
struct kpr_ct_slot {
	__u64 used;            // 0: a free slot (never written)
	struct kpr_ct_key key; // the direction's key
	__u8 val[48];          // struct kpr_ct_entry (kpr_ct_arr) or struct kpr_nat_entry (kpr_snat_arr)
	__u8 pad[32];          // zero
};
_Static_assert(sizeof(struct kpr_ct_slot) == 128, "kpr_ct_slot layout");

BPF_TABLE_PINNED("array", __u32, struct kpr_ct_slot, kpr_ct_arr, KPR_CT_ARRAY_MAX, KPR_PIN(kpr_ct_arr),
		 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct kpr_ct_slot, kpr_snat_arr, KPR_CT_ARRAY_MAX, KPR_PIN(kpr_snat_arr),
		 BPF_F_MMAPABLE);

// The key's five 64-bit words hashed as the product's slot tables hash theirs (lib/slots.h).
static __always_inline __u32 kpr_ct_arr_hash(const struct kpr_ct_key *k)
{
	return kpr_slots_hash(k, 5);
}

static __always_inline int kpr_ct_arr_key_eq(const struct kpr_ct_key *a, const struct kpr_ct_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* kpr_ct_arr's slot for the key: the one holding it (*found = 1), else the first free slot or
 * one whose entry has expired at `now` (*found = 0), else NULL. A free slot ends the search.
 * (Loops kept loops, not unrolled: the stages are near the 4096-instruction limit of a program.) */
static __always_inline struct kpr_ct_slot *kpr_ct_arr_find(const struct kpr_ct_key *k, __u64 now, int *found)
{
	struct kpr_ct_slot *s, *spare = (void *)0;
	__u32 h = kpr_ct_arr_hash(k), i, idx;

	*found = 0;
#pragma nounroll
	for (i = 0; i < KPR_CT_ARRAY_PROBES; i++) {
		idx = (h + i) & (KPR_CT_ARRAY_MAX - 1);
		s = kpr_ct_arr.lookup(&idx);
		if (!s)
			return spare;
		if (!s->used)
			return spare ? spare : s;
		if (kpr_ct_arr_key_eq(&s->key, k)) {
			*found = 1;
			return s;
		}
		if (!spare && kpr_ct_expired((struct kpr_ct_entry *)s->val, k->proto, now))
			spare = s;
	}
	return spare;
}

static __always_inline struct kpr_ct_entry *kpr_ct_lookup(const struct kpr_tuple *t, __u8 dir)
{
	struct kpr_ct_key k;
	struct kpr_ct_slot *s;
	struct kpr_ct_entry *e;
	__u64 now = kpr_ct_now();
	int found;

	kpr_ct_key_from_tuple(&k, t, dir);
	s = kpr_ct_arr_find(&k, now, &found);
	if (!s || !found)
		return (void *)0;
	e = (struct kpr_ct_entry *)s->val;
	if (kpr_ct_expired(e, t->proto, now))
		return (void *)0;
	return kpr_ct_refresh(e, t, dir, now);
}

static __always_inline int kpr_ct_write_entry(const struct kpr_ct_key *k, const struct kpr_ct_entry *e)
{
	struct kpr_ct_slot *s;
	int found;

	s = kpr_ct_arr_find(k, e->last_seen, &found);
	if (!s)
		return -7; // -E2BIG: no free slot within the probes
	s->key = *k;
	*(struct kpr_ct_entry *)s->val = *e; // (val is 8-aligned: offset 48)
	s->used = 1;
	return 0;
}

// kpr_snat_arr's slot to write the reverse entry `rk` into at `created`; NULL: the port is taken.
static __always_inline struct kpr_ct_slot *kpr_snat_arr_slot(const struct kpr_ct_key *rk, __u64 created)
{
	struct kpr_ct_slot *s;
	__u32 h = kpr_ct_arr_hash(rk), j, idx;

#pragma nounroll
	for (j = 0; j < KPR_CT_ARRAY_PROBES; j++) {
		idx = (h + j) & (KPR_CT_ARRAY_MAX - 1);
		s = kpr_snat_arr.lookup(&idx);
		if (!s)
			return (void *)0;
		if (!s->used)
			return s;
		if (kpr_ct_arr_key_eq(&s->key, rk))
			// taken while its entry is younger than the longest idle timeout
			return (__s64)(created - ((struct kpr_nat_entry *)s->val)->created) <= (__s64)KPR_CT_TCP_TIMEOUT_NS
				       ? (void *)0
				       : s;
	}
	return (void *)0;
}

/* A new SNAT flow's reverse entry: a slot of kpr_snat_arr keyed by the reply tuple. */
static __always_inline int kpr_snat_alloc(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
					  const union kpr_addr *fe, __be16 fport, __be16 *port)
{
	struct kpr_ct_key rk;
	struct kpr_nat_entry rev = {};
	struct kpr_ct_slot *slot;
	int i;

	kpr_snat_rev_fill(&rev, t, fe, fport);
#pragma nounroll
	for (i = 0; i < KPR_SNAT_RETRIES; i++) {
		kpr_ct_reply_key(&rk, &t->daddr, t->dport, nat_addr, kpr_htons(kpr_snat_random_port()), t->proto);
		slot = kpr_snat_arr_slot(&rk, rev.created);
		if (!slot)
			continue;
		slot->key = rk;
		*(struct kpr_nat_entry *)slot->val = rev;
		slot->used = 1;
		*port = rk.dport;
		return 0;
	}
	return KPR_E_NAT_NOPORT;
}

#endif /* KPR_LIB_TESTING_CT_ARRAY_H */
