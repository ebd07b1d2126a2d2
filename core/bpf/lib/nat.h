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

// A build may bring its own kpr_snat_alloc (KPR_SNAT_ALLOC_OWN, as KPR_CT_OWN in lib/conntrack.h).
#ifndef KPR_SNAT_ALLOC_OWN
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

	kpr_snat_rev_fill(&rev, t, fe, fport);
	for (i = 0; i < KPR_SNAT_RETRIES; i++) {
		kpr_ct_reply_key(&rk, &t->daddr, t->dport, nat_addr, kpr_htons(kpr_snat_random_port()), t->proto);
		if (kpr_snat.insert(&rk, &rev) == 0)
			goto found;
	}
	return KPR_E_NAT_NOPORT;
found:
	*port = rk.dport;
	return 0;
}
#endif /* KPR_SNAT_ALLOC_OWN */

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
