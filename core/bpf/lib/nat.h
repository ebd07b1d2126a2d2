/* Address/port rewriting (DNAT to a backend, SNAT, reverse NAT) with checksum fixes, and SNAT
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

#define KPR_E_NAT_PKT -2      // header not in the packet
#define KPR_E_NAT_UNSUPP -3   // SCTP port change: its CRC32c cannot be patched incrementally
#define KPR_E_NAT_NOPORT -4   // no free SNAT port after KPR_SNAT_RETRIES tries

// kpr_snat value: where one direction of a source-NATed flow is translated to.
struct kpr_nat_entry {
	union kpr_addr addr; // forward: the SNAT address; reverse: the original client address
	__be16 port;         // forward: the SNAT port; reverse: the original client port
	__u16 pad;           // zero
	__u32 pad2;          // zero
	__u64 created;       // kpr_now() at allocation, ns
};

_Static_assert(sizeof(struct kpr_nat_entry) == 32, "kpr_nat_entry layout");

// SNAT mappings keyed like conntrack: DIR_ORIGINAL = the client's tuple, DIR_REPLY = the reply's tuple.
BPF_TABLE_PINNED("lru_hash", struct kpr_ct_key, struct kpr_nat_entry, kpr_snat, KPR_SNAT_MAX, KPR_PIN(kpr_snat));

// Rewrite one address of the packet (dst when is_dst, else src) with L3/L4 checksum fixes.
static __always_inline int kpr_nat_rewrite_addr(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *to,
						 int is_dst)
{
	union kpr_addr *cur = is_dst ? &pkt->t.daddr : &pkt->t.saddr;
	__u64 l4flags = KPR_CSUM_PSEUDO | (pkt->t.proto == IPPROTO_UDP ? KPR_CSUM_UDP : 0);
	// ICMPv4 has no pseudo header; SCTP's CRC32c does not cover addresses
	int l4 = pkt->csum_off && pkt->t.proto != IPPROTO_ICMP;

	if (pkt->t.family == KPR_FAMILY_V4) {
		struct iphdr *ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip));
		__be32 from, nto = to->w[3];

		if (!ip)
			return KPR_E_NAT_PKT;
		if (is_dst) {
			from = ip->daddr;
			ip->daddr = nto;
		} else {
			from = ip->saddr;
			ip->saddr = nto;
		}
		if (kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), from, nto))
			return KPR_E_NAT_PKT;
		if (l4 && kpr_csum_l4_replace4(ctx, pkt->csum_off, from, nto, l4flags))
			return KPR_E_NAT_PKT;
	} else {
		__u32 off = pkt->l3_off + (is_dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		union kpr_addr *a = ctx_ptr(ctx, off, sizeof(*a));
		union kpr_addr from;

		if (!a)
			return KPR_E_NAT_PKT;
		from = *a;
		*a = *to;
		if (l4 && kpr_csum_l4_replace16(ctx, pkt->csum_off, &from, to, l4flags))
			return KPR_E_NAT_PKT;
	}
	*cur = *to;
	return 0;
}

// Rewrite one port (dport when is_dst) with the L4 checksum fix. ICMP echo ids are left alone.
static __always_inline int kpr_nat_rewrite_port(kpr_ctx_t *ctx, struct kpr_pkt *pkt, __be16 to, int is_dst)
{
	__be16 *cur = is_dst ? &pkt->t.dport : &pkt->t.sport;
	__be16 *p, from;
	__u32 off;

	if (*cur == to || !pkt->l4_off)
		return 0;
	if (pkt->t.proto == IPPROTO_SCTP)
		return KPR_E_NAT_UNSUPP;
	if (pkt->t.proto != IPPROTO_TCP && pkt->t.proto != IPPROTO_UDP)
		return 0;
	// TCP and UDP both start with source port, destination port
	off = pkt->l4_off + (is_dst ? 2 : 0);
	p = ctx_ptr(ctx, off, sizeof(*p));
	if (!p)
		return KPR_E_NAT_PKT;
	from = *p;
	*p = to;
	if (pkt->csum_off &&
	    kpr_csum_l4_replace2(ctx, pkt->csum_off, from, to, pkt->t.proto == IPPROTO_UDP ? KPR_CSUM_UDP : 0))
		return KPR_E_NAT_PKT;
	*cur = to;
	return 0;
}

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

// Reverse NAT of a reply from a backend: restore the frontend (kpr_revnat) as its source.
static __always_inline int kpr_nat_revnat(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const struct kpr_revnat *rn)
{
	return kpr_nat_snat(ctx, pkt, &rn->addr, rn->port);
}

/* The SNAT mapping of an outgoing flow (tuple before SNAT), creating one when `create`: the
 * reverse entry is inserted first with BPF_NOEXIST, so a port is owned by one flow per remote
 * endpoint. Returns the forward entry (addr/port to rewrite the source to) or NULL. */
static __always_inline struct kpr_nat_entry *kpr_snat_mapping(const struct kpr_tuple *t, const union kpr_addr *nat_addr,
							       int create, int *err)
{
	struct kpr_ct_key fk, rk;
	struct kpr_nat_entry fwd = {}, rev = {};
	struct kpr_nat_entry *e;
	__u64 now;
	int i;

	*err = 0;
	kpr_ct_key_from_tuple(&fk, t, KPR_CT_DIR_ORIGINAL);
	e = kpr_snat.lookup(&fk);
	if (e || !create)
		return e;

	now = kpr_now();
	rev.addr = t->saddr;
	rev.port = t->sport;
	rev.created = now;
	// the reply arrives from the remote endpoint to nat_addr:port
	rk.saddr = t->daddr;
	rk.daddr = *nat_addr;
	rk.sport = t->dport;
	rk.proto = t->proto;
	rk.dir = KPR_CT_DIR_REPLY;
	rk.pad = 0;
	for (i = 0; i < KPR_SNAT_RETRIES; i++) {
		__u16 port = KPR_SNAT_PORT_MIN + bpf_get_prandom_u32() % (KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1);

		rk.dport = kpr_htons(port);
		if (kpr_snat.insert(&rk, &rev) == 0) {
			fwd.addr = *nat_addr;
			fwd.port = rk.dport;
			fwd.created = now;
			if (kpr_snat.update(&fk, &fwd)) {
				kpr_snat.delete(&rk);
				*err = KPR_E_NAT_NOPORT;
				return (void *)0;
			}
			return kpr_snat.lookup(&fk);
		}
	}
	*err = KPR_E_NAT_NOPORT;
	return (void *)0;
}

// The original client of a reply to a source-NATed flow (tuple as received), or NULL.
static __always_inline struct kpr_nat_entry *kpr_snat_reverse(const struct kpr_tuple *t)
{
	struct kpr_ct_key rk;

	kpr_ct_key_from_tuple(&rk, t, KPR_CT_DIR_REPLY);
	return kpr_snat.lookup(&rk);
}

#endif /* KPR_LIB_NAT_H */
