/* Service lookup and backend selection on a flow tuple; context-free (tc, XDP, socket hooks).
 *
 * Typical use for a new flow:
 *   struct kpr_svc_key key; struct kpr_svc_val *svc; struct kpr_backend *be; __u32 id;
 *   svc = kpr_lb_lookup(&key, &t, KPR_LB_FROM_CLUSTER);        // NULL: not a service
 *   if (svc && !kpr_lb_src_allowed(svc, &t.saddr)) drop;
 *   be = kpr_lb_pick(&key, svc, &t, &aff, &id);                 // NULL: no backend, reject
 * then DNAT to be->addr/be->port and remember id in conntrack, so the flow keeps its backend
 * while the service's slots change.
 */
#ifndef KPR_LIB_LB_H
#define KPR_LIB_LB_H

#include "lib/common.h"
#include "lib/maps.h"

#ifndef KPR_LB_WILDCARD
#define KPR_LB_WILDCARD 1 // 1: a miss on a node address retries the address-0 NodePort entry
#endif
#ifndef KPR_LB_AFFINITY_SCAN
#define KPR_LB_AFFINITY_SCAN 4 // slots searched for a remembered backend whose slot moved (a removal compacts slots); verifier cost grows with it
#endif
#ifndef KPR_LB_RANDOM_BY_HASH
#define KPR_LB_RANDOM_BY_HASH 0 // 1: "random" selection hashes the 5-tuple (stable per flow without conntrack)
#endif

#ifndef KPR_LB_FE
#define KPR_LB_FE 1 // 1: callers that pass a buffer find frontends in kpr_fe first (one line), kpr_svc on a miss
#endif
#ifndef KPR_LB_FE_IDS
#define KPR_LB_FE_IDS 1 // 1: a frontend found in kpr_fe picks slots 1..KPR_FE_IDS from its line's backend ids, not kpr_slots
#endif

/* The kpr_fe hash of a service key: its six words mixed (murmur3's finaliser at the end);
 * kpr.servicemaps.fetable.fe_hash is the same function. */
static __always_inline __u32 kpr_fe_hash(const struct kpr_svc_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = 0;

#pragma unroll
	for (int i = 0; i < 6; i++)
		h = (h ^ w[i]) * 0x9E3779B1U;
	h ^= h >> 16;
	h *= 0x85EBCA6BU;
	h ^= h >> 13;
	h *= 0xC2B2AE35U;
	h ^= h >> 16;
	return h;
}

/* The key's kpr_svc value and its first slots' backend ids from its kpr_fe line, copied into
 * *out: 1 when found whole, 0 when not there (an empty line ends the probe run) or being
 * written (odd or changed sequence word: the caller asks kpr_svc, the truth). *out is written
 * only on success. */
static __always_inline int kpr_lb_fe_get(const struct kpr_svc_key *k, struct kpr_fe_buf *out)
{
	const __u64 *a = (const __u64 *)k, *b;
	__u32 h = kpr_fe_hash(k), i, idx, seq;
	struct kpr_fe_line *l;
	struct kpr_fe_buf v;

#pragma unroll
	for (i = 0; i < KPR_FE_PROBES; i++) {
		idx = (h + i) & (KPR_FE_LINES - 1);
		l = kpr_fe.lookup(&idx);
		if (!l)
			return 0;
		seq = *(volatile __u32 *)&l->seq;
		asm volatile("" ::: "memory"); // the word before the key and value (clang may move plain loads above a volatile one)
		b = (const __u64 *)&l->key;
		if (a[0] == b[0] && a[1] == b[1] && a[2] == b[2]) {
			if (seq & 1)
				return 0;
			__builtin_memcpy(&v.val, &l->val, sizeof(v.val));
#if KPR_LB_FE_IDS
			__builtin_memcpy(v.ids, l->ids, sizeof(v.ids));
#else
			__builtin_memset(v.ids, 0, sizeof(v.ids));
#endif
			asm volatile("" ::: "memory"); // the copy before the second read of the word
			if (*(volatile __u32 *)&l->seq != seq)
				return 0;
			*out = v;
			return 1;
		}
		if (!l->key.port && !l->key.slot)
			return 0; // empty: the key was never placed beyond it
	}
	return 0;
}

/* The service entry of a key (bcc rewrites map calls only outside macros: a function): from
 * kpr_fe into *buf when the caller gives a buffer, else (or on a miss there) kpr_svc's own
 * element, buf's ids then cleared (they never outlive the copy they came with: an entry
 * handed back from kpr_svc, or an earlier copy kept when this key is not found, reads its
 * slots from kpr_slots). */
static __always_inline struct kpr_svc_val *kpr_lb_svc_get(struct kpr_svc_key *key, struct kpr_fe_buf *buf)
{
	struct kpr_svc_val *svc;

#if KPR_LB_FE
	if (buf && kpr_lb_fe_get(key, buf))
		return &buf->val;
#endif
	if (buf)
		__builtin_memset(buf->ids, 0, sizeof(buf->ids));
	svc = kpr_svc.lookup(key);
	if (!svc)
		return (void *)0;
	/* (checked here, and opaque after: clang would otherwise merge the element with buf and
	 * offset the merged pointer before its caller's NULL check, which the verifier refuses) */
	asm volatile("" : "+r"(svc));
	return svc;
}

// kpr_lb_lookup() flags.
#define KPR_LB_FROM_CLUSTER (1U << 0) // the caller is inside the cluster: prefer the internal scope
#define KPR_LB_NODE_ADDR (1U << 1)    // daddr is one of this node's addresses: wildcard NodePort applies

/* Find the service entry (slot 0) for the tuple's destination. `key` is filled in and left
 * pointing at the entry found (wildcard address and scope included), ready for
 * kpr_lb_pick(). Returns NULL when the destination is not a service. With a buffer `buf` (the
 * caller's, living as long as the entry is used) the entry may be a copy from kpr_fe held
 * there: one cache line per frontend instead of kpr_svc's bucket and element, and with it the
 * backend ids of its first slots for kpr_lb_pick_ids() (buf->ids: all 0 unless the entry
 * returned is that copy). */
static __always_inline struct kpr_svc_val *kpr_lb_lookup_into(struct kpr_svc_key *key, const struct kpr_tuple *t,
							       __u32 lflags, struct kpr_fe_buf *buf)
{
	struct kpr_svc_val *svc, *isvc;

	key->addr = t->daddr;
	key->port = t->dport;
	key->proto = t->proto;
	key->scope = KPR_SCOPE_EXTERNAL;
	key->slot = 0;
	key->pad = 0;
	svc = kpr_lb_svc_get(key, buf);
#if KPR_LB_WILDCARD
	if (!svc && (lflags & KPR_LB_NODE_ADDR)) {
		kpr_addr_set_any(&key->addr, t->family);
		svc = kpr_lb_svc_get(key, buf);
	}
#endif
	if (!svc)
		return (void *)0;
	if ((lflags & KPR_LB_FROM_CLUSTER) && (svc->flags & KPR_SVC_F_TWO_SCOPES)) {
		key->scope = KPR_SCOPE_INTERNAL;
		// (a kpr_fe hit overwrites *buf only when found whole: svc stays the external entry otherwise)
		isvc = kpr_lb_svc_get(key, buf);
		if (isvc)
			return isvc;
		key->scope = KPR_SCOPE_EXTERNAL; // the writer adds internal entries first; tolerate a race
	}
	return svc;
}

// kpr_lb_lookup_into() with kpr_svc's own elements (callers with no buffer to spare).
static __always_inline struct kpr_svc_val *kpr_lb_lookup(struct kpr_svc_key *key, const struct kpr_tuple *t,
							  __u32 lflags)
{
	return kpr_lb_lookup_into(key, t, lflags, (void *)0);
}

// Whether the client may use the service (loadBalancerSourceRanges); true when it has none.
static __always_inline int kpr_lb_src_allowed(const struct kpr_svc_val *svc, const union kpr_addr *saddr)
{
	struct kpr_srcrange_key k = {};

	if (!(svc->flags & KPR_SVC_F_SOURCE_RANGES))
		return 1;
	k.prefixlen = 32 + 128;
	k.rev_nat = svc->rev_nat;
	k.addr = *saddr;
	return kpr_srcrange.lookup(&k) != (void *)0;
}

/* Backend id in slot `slot` (1-based) of the service entry `svc`: kpr_slots[slot_base + slot - 1],
 * or its copy in `ids` (the entry's kpr_fe line's, kpr_lb_lookup_into(); NULL or 0: none) for
 * the first KPR_FE_IDS slots. 0 when the entry has no slots (slot_base 0: an older kpr's
 * entry, whose slots lived in kpr_svc, until the writer rewrites it). */
static __always_inline __u32 kpr_lb_slot_backend_ids(const struct kpr_svc_val *svc, const __u32 *ids, __u16 slot)
{
	struct kpr_slot *s;
	__u32 idx, base = svc->slot_base;

	if (!base)
		return 0;
#if KPR_LB_FE_IDS
	if (ids) {
		/* Each id read at its constant offset, then chosen (the barrier keeps clang from
		 * merging the four loads into one at ids + slot): `ids` is the caller's stack buffer,
		 * and kernels before about 5.12 refuse a variable-offset stack read. */
		_Static_assert(KPR_FE_IDS == 4, "four ids read here");
		__u32 i0 = ids[0], i1 = ids[1], i2 = ids[2], i3 = ids[3], bid;

		asm volatile("" : "+r"(i0), "+r"(i1), "+r"(i2), "+r"(i3));
		bid = slot == 1 ? i0 : slot == 2 ? i1 : slot == 3 ? i2 : slot == 4 ? i3 : 0;
		if (bid)
			return bid;
	}
#endif
	idx = base + slot - 1;
	s = kpr_slots.lookup(&idx);
	return s ? s->backend_id : 0;
}

// kpr_lb_slot_backend_ids() from kpr_slots only.
static __always_inline __u32 kpr_lb_slot_backend(const struct kpr_svc_val *svc, __u16 slot)
{
	return kpr_lb_slot_backend_ids(svc, (void *)0, slot);
}

// Maglev pick: the flow hash indexes the frontend scope's table. 0 when there is no table yet.
static __always_inline __u32 kpr_lb_maglev_backend(const struct kpr_svc_key *key, const struct kpr_svc_val *svc,
						    const struct kpr_tuple *t)
{
	struct kpr_maglev_key mk = {};
	__u32 idx, *id;
	void *table;

	mk.rev_nat = svc->rev_nat;
	mk.scope = key->scope;
	table = kpr_maglev.lookup(&mk);
	if (!table)
		return 0;
	idx = kpr_tuple_hash(t) % KPR_MAGLEV_M;
	id = bpf_map_lookup_elem(table, &idx);
	return id ? *id : 0;
}

// Random slot among the selectable slots 1..count (0 when there is none).
static __always_inline __u16 kpr_lb_random_slot(const struct kpr_svc_val *svc, const struct kpr_tuple *t)
{
	__u32 r;

	if (svc->count == 0)
		return 0;
#if KPR_LB_RANDOM_BY_HASH
	r = kpr_tuple_hash(t);
#else
	r = bpf_get_prandom_u32();
#endif
	return (__u16)(r % svc->count) + 1;
}

// Fill an affinity key for a client address (tc/XDP) ...
static __always_inline void kpr_lb_affinity_key_addr(struct kpr_affinity_key *k, const struct kpr_svc_val *svc,
						      const union kpr_addr *client)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->client = *client;
	k->rev_nat = svc->rev_nat;
}

// ... or for a network namespace (socket LB: the client's address is not known at connect()).
static __always_inline void kpr_lb_affinity_key_netns(struct kpr_affinity_key *k, const struct kpr_svc_val *svc,
						       __u64 netns_cookie)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->client.w[0] = (__u32)netns_cookie;
	k->client.w[1] = (__u32)(netns_cookie >> 32);
	k->rev_nat = svc->rev_nat;
	k->netns = 1;
}

/* The remembered backend of an affinity client, if still within the service's timeout and
 * still one of this service's selectable backends (slots 1..count): backends are shared
 * across services, so one that left this service, or is terminating in it, may live on in
 * the backends map. The slot remembered with it
 * is checked first; when a removal moved it, the first KPR_LB_AFFINITY_SCAN slots are
 * searched (and the next new connection searches again). *slot is set when the hint held. */
static __always_inline __u32 kpr_lb_affinity_backend(const struct kpr_svc_val *svc, const __u32 *ids,
						      struct kpr_affinity_key *aff, __u64 now, __u16 *slot)
{
	struct kpr_affinity_val *v = kpr_affinity.lookup(aff);
	__u32 bid;
	__u16 i;

	if (!v)
		return 0;
	if (now - v->last_used > (__u64)svc->affinity_timeout * 1000000000ULL)
		return 0;
	bid = v->backend_id;
	if (v->slot >= 1 && v->slot <= svc->count && kpr_lb_slot_backend_ids(svc, ids, (__u16)v->slot) == bid) {
		*slot = (__u16)v->slot;
		return bid;
	}
#pragma clang loop unroll(disable)
	for (i = 1; i <= KPR_LB_AFFINITY_SCAN; i++) {
		if (i > svc->count)
			break;
		// *slot stays 0: distinct constants here would defeat the verifier's state pruning
		if (kpr_lb_slot_backend_ids(svc, ids, i) == bid)
			return bid;
	}
	return 0;
}

/* The backend with this id, or NULL. Programs read kpr_backend only through here (a flow's
 * backend from conntrack, a pick's result), so its layout stays lb.h's business. */
static __always_inline struct kpr_backend *kpr_lb_backend(__u32 id)
{
	__u32 idx = id & KPR_BACKEND_INDEX_MASK;
	struct kpr_backend *be = kpr_backend.lookup(&idx);

	/* An array: a zero entry is no backend. The id's generation must be the entry's (flags and
	 * gen[3] read as one little-endian word): a stale id of a reused index is no backend. */
	return be && be->proto && *(const __u32 *)&be->flags >> 8 == id >> KPR_BACKEND_INDEX_BITS ? be : (void *)0;
}

/* Pick the backend for a new flow to the service entry `key`/`svc` found by kpr_lb_lookup():
 * affinity (when the service has it and `aff` is given), then Maglev or random. Returns the
 * backend and its id in *id, or NULL when the service has no selectable backend. `ids`: the
 * first slots' backend ids kpr_lb_lookup_into() copied with the entry (NULL: kpr_slots). */
static __always_inline struct kpr_backend *kpr_lb_pick_ids(struct kpr_svc_key *key, const struct kpr_svc_val *svc,
							    const struct kpr_tuple *t, struct kpr_affinity_key *aff,
							    __u32 *id, const __u32 *ids)
{
	struct kpr_backend *be = (void *)0;
	__u32 bid = 0;
	__u64 now = 0;
	__u16 slot = 0;

	*id = 0;
	if (svc->count == 0)
		return (void *)0;
	if (aff && (svc->flags & KPR_SVC_F_AFFINITY)) {
		now = kpr_now();
		/* Only a backend in this service's selectable slots comes back: whether it may take
		 * new connections is the slot's business (kpr_backend is shared by services that
		 * may disagree on the pod's state). */
		bid = kpr_lb_affinity_backend(svc, ids, aff, now, &slot);
		if (bid)
			be = kpr_lb_backend(bid);
	}
	if (!be) {
		bid = 0;
		slot = 0;
		/* Affinity services pick a new client's backend at random: the affinity entry then
		 * remembers the slot, which makes its later membership check O(1). Maglev would buy
		 * nothing here: the client sticks to its backend whatever the 5-tuple. */
		if ((svc->flags & KPR_SVC_F_MAGLEV) && !(aff && (svc->flags & KPR_SVC_F_AFFINITY)))
			bid = kpr_lb_maglev_backend(key, svc, t);
		if (!bid) { // no Maglev table (yet): fall back to random rather than drop
			slot = kpr_lb_random_slot(svc, t);
			bid = slot ? kpr_lb_slot_backend_ids(svc, ids, slot) : 0;
		}
		if (!bid)
			return (void *)0;
		be = kpr_lb_backend(bid);
		if (!be)
			return (void *)0;
	}
	if (aff && (svc->flags & KPR_SVC_F_AFFINITY)) {
		struct kpr_affinity_val v = {};

		v.last_used = now;
		v.backend_id = bid;
		v.slot = slot;
		kpr_affinity.update(aff, &v);
	}
	*id = bid;
	return be;
}

// kpr_lb_pick_ids() reading the slots from kpr_slots.
static __always_inline struct kpr_backend *kpr_lb_pick(struct kpr_svc_key *key, const struct kpr_svc_val *svc,
							const struct kpr_tuple *t, struct kpr_affinity_key *aff,
							__u32 *id)
{
	return kpr_lb_pick_ids(key, svc, t, aff, id, (void *)0);
}

// Reverse-NAT entry (the frontend) of a flow, from the rev-NAT index kept in conntrack.
static __always_inline struct kpr_revnat *kpr_lb_revnat(__u32 rev_nat)
{
	return kpr_revnat.lookup(&rev_nat);
}

#endif /* KPR_LIB_LB_H */
