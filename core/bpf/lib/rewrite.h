/* Rewriting one address or port of a parsed packet, with the L3/L4 checksum fixes: the one
 * mechanism under DNAT, SNAT and reverse NAT (lib/nat.h) and eBPF host routing's per-packet
 * services (lib/host_routing.h). No maps: including it creates nothing.
 *
 * Two forms of the same rewrite, chosen per build:
 *   packet pointers (default): cheapest, what XDP and the NodePort programs use;
 *   load/store helpers (-DKPR_REWRITE_HELPERS=1): for a program that inlines rewrites at many
 *     call sites after helpers that move the packet (host_routing): there clang computes the
 *     packet pointer at a variable offset before its bounds check on some paths, and the
 *     verifier refuses the program; a helper call takes an offset and needs no pointer.
 * Either way pkt->t stays in step with the packet, and the old value is taken from it.
 */
#ifndef KPR_LIB_REWRITE_H
#define KPR_LIB_REWRITE_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/rewrite.h"
#endif

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/csum.h"

#ifndef KPR_REWRITE_HELPERS
#define KPR_REWRITE_HELPERS 0 // 1: rewrite through ctx_store_bytes (see above); 0: through packet pointers
#endif

#ifndef KPR_REWRITE_ONE_CSUM
#define KPR_REWRITE_ONE_CSUM 1 // 1: DNAT+SNAT of IPv4 TCP/UDP patches each checksum once (kpr_nat_rewrite4_both); 0: once per field
#endif

#define KPR_E_NAT_PKT -2    // header not in the packet
#define KPR_E_NAT_UNSUPP -3 // SCTP port change: its CRC32c cannot be patched incrementally

// Put `len` bytes at `off`: by pointer, or by helper in a KPR_REWRITE_HELPERS build.
static __always_inline int kpr_rewrite_bytes(kpr_ctx_t *ctx, __u32 off, const void *from, __u32 len)
{
#if KPR_REWRITE_HELPERS
	return ctx_store_bytes(ctx, off, from, len) ? KPR_E_NAT_PKT : 0;
#else
	void *p = ctx_ptr(ctx, off, len);

	if (!p)
		return KPR_E_NAT_PKT;
	if (len == 2)
		*(__u16 *)p = *(const __u16 *)from;
	else if (len == 4)
		*(__u32 *)p = *(const __u32 *)from;
	else
		__builtin_memcpy(p, from, 16);
	return 0;
#endif
}

// Rewrite one address of the packet (dst when is_dst, else src) with L3/L4 checksum fixes.
static __always_inline int kpr_nat_rewrite_addr(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *to,
						 int is_dst)
{
	union kpr_addr *cur = is_dst ? &pkt->t.daddr : &pkt->t.saddr;
	__u64 l4flags = KPR_CSUM_PSEUDO | (pkt->t.proto == IPPROTO_UDP ? KPR_CSUM_UDP : 0);
	// ICMPv4 has no pseudo header; SCTP's CRC32c does not cover addresses
	int l4 = pkt->csum_off && pkt->t.proto != IPPROTO_ICMP;

	if (pkt->t.family == KPR_FAMILY_V4) {
		__u32 off = pkt->l3_off + (is_dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
		__be32 from = cur->w[3], nto = to->w[3];

		if (kpr_rewrite_bytes(ctx, off, &nto, 4))
			return KPR_E_NAT_PKT;
		if (kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), from, nto))
			return KPR_E_NAT_PKT;
		if (l4 && kpr_csum_l4_replace4(ctx, pkt->csum_off, from, nto, l4flags))
			return KPR_E_NAT_PKT;
	} else {
		__u32 off = pkt->l3_off + (is_dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		union kpr_addr from = *cur, nto = *to;

		if (kpr_rewrite_bytes(ctx, off, &nto, 16))
			return KPR_E_NAT_PKT;
		if (l4 && kpr_csum_l4_replace16(ctx, pkt->csum_off, &from, &nto, l4flags))
			return KPR_E_NAT_PKT;
	}
	*cur = *to;
	return 0;
}

// Rewrite one port (dport when is_dst) with the L4 checksum fix. ICMP echo ids are left alone.
static __always_inline int kpr_nat_rewrite_port(kpr_ctx_t *ctx, struct kpr_pkt *pkt, __be16 to, int is_dst)
{
	__be16 *cur = is_dst ? &pkt->t.dport : &pkt->t.sport;
	__be16 from = *cur;

	if (from == to || !pkt->l4_off)
		return 0;
	if (pkt->t.proto == IPPROTO_SCTP)
		return KPR_E_NAT_UNSUPP;
	if (pkt->t.proto != IPPROTO_TCP && pkt->t.proto != IPPROTO_UDP)
		return 0;
	// TCP and UDP both start with source port, destination port
	if (kpr_rewrite_bytes(ctx, pkt->l4_off + (is_dst ? 2 : 0), &to, 2))
		return KPR_E_NAT_PKT;
	if (pkt->csum_off &&
	    kpr_csum_l4_replace2(ctx, pkt->csum_off, from, to, pkt->t.proto == IPPROTO_UDP ? KPR_CSUM_UDP : 0))
		return KPR_E_NAT_PKT;
	*cur = to;
	return 0;
}

/* Both addresses and both ports of an IPv4 TCP/UDP packet at once (a port of 0 is kept): the
 * four fields written through one pointer each, then each checksum patched once with the
 * summed differences (tc: the IP header's in place; the L4 one in place for a packet whose
 * state the entry program read as not offloaded, else with one or two helper calls:
 * kpr_csum_l4_diff2). The caller checks family and protocol (kpr_nat_dnat_snat). */
static __always_inline int kpr_nat_rewrite4_both(kpr_ctx_t *ctx, struct kpr_pkt *pkt, __be32 saddr, __be16 sport,
						 __be32 daddr, __be16 dport)
{
	__be32 os = pkt->t.saddr.w[3], od = pkt->t.daddr.w[3];
	__be16 osp = pkt->t.sport, odp = pkt->t.dport;
	__u64 udp = pkt->t.proto == IPPROTO_UDP ? KPR_CSUM_UDP : 0;
	struct iphdr *ip;
	__be16 *ports;
	__u32 adiff, pdiff;

	if (!sport)
		sport = osp;
	if (!dport)
		dport = odp;
	ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip));
	if (!ip)
		return KPR_E_NAT_PKT;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ports = ctx_ptr(ctx, pkt->l4_off, 4);
	if (!ports)
		return KPR_E_NAT_PKT;
	ports[0] = sport;
	ports[1] = dport;
	adiff = kpr_csum_add(kpr_csum_diff4(os, saddr), kpr_csum_diff4(od, daddr));
	pdiff = kpr_csum_add(kpr_csum_diff2(osp, sport), kpr_csum_diff2(odp, dport));
	if (kpr_csum_l3_diff(ctx, pkt->l3_off + offsetof(struct iphdr, check), adiff))
		return KPR_E_NAT_PKT;
	if (kpr_csum_l4_diff2(ctx, pkt->csum_off, adiff, pdiff, udp, pkt->csum_state))
		return KPR_E_NAT_PKT;
	pkt->t.saddr.w[3] = saddr;
	pkt->t.daddr.w[3] = daddr;
	pkt->t.sport = sport;
	pkt->t.dport = dport;
	return 0;
}

#endif /* KPR_LIB_REWRITE_H */
