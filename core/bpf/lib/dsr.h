/* Direct server return: the frontend a load-balanced packet was sent to, carried to the
 * backend's node inside the packet, so that node can make the backend's replies come from the
 * frontend straight to the client.
 *
 * IPv4: an 8-byte IP option right after the fixed header (type KPR_DSR_OPT4_TYPE, length 8, port,
 * address). IPv6: a Destination Options header right after the fixed header holding a 20-byte
 * option (KPR_DSR_OPT6_TYPE, port, address) and a 2-byte PadN: 24 bytes. The option types are ones
 * routers skip when they do not know them (IPv6: top bits 00), so the packet crosses any path;
 * the backend's node strips the header before the pod sees the packet.
 *
 * Inserting and removing bytes between L3 and L4 needs bpf_skb_adjust_room: tc only. An XDP
 * build gets kpr_dsr_parse() only; asking it for insert/strip (KPR_DSR_EDIT=1) fails the build
 * naming the missing operation (ctx/xdp.h).
 */
#ifndef KPR_LIB_DSR_H
#define KPR_LIB_DSR_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/dsr.h"
#endif

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/csum.h"

#ifndef KPR_DSR_OPT4_TYPE
#define KPR_DSR_OPT4_TYPE 0x9a // IPv4 option: copied-on-fragment flag | class 0 | number 26 (as Cilium's)
#endif
#ifndef KPR_DSR_OPT6_TYPE
#define KPR_DSR_OPT6_TYPE 0x1b // IPv6 destination option: top bits 00, so nodes that do not know it skip it
#endif

#ifndef KPR_DSR_EDIT
#ifdef KPR_CTX_SKB
#define KPR_DSR_EDIT 1 // 1: define kpr_dsr_insert/strip (bpf_skb_adjust_room: an XDP build fails on purpose)
#else
#define KPR_DSR_EDIT 0
#endif
#endif

#define KPR_DSR_OPT4_LEN 8  // bytes the IPv4 option adds
#define KPR_DSR_OPT6_LEN 24 // bytes the IPv6 destination options header adds

#define KPR_E_DSR_ROOM -30 // bpf_skb_adjust_room failed (packet too big, GSO UDP, ...)
#define KPR_E_DSR_PKT -31  // headers not where they should be
#define KPR_E_DSR_OPTS -32 // an IPv4 packet with options already: no room is assumed for ours

// The IPv4 option as it sits in the header.
struct kpr_dsr_opt4 {
	__u8 type;     // KPR_DSR_OPT4_TYPE
	__u8 len;      // 8
	__be16 port;   // frontend port
	__be32 addr;   // frontend address
};

// The IPv6 destination options header kpr inserts.
struct kpr_dsr_opt6 {
	__u8 nexthdr;          // the protocol that follows (the packet's L4)
	__u8 hdrlen;           // (24 / 8) - 1 = 2
	__u8 type;             // KPR_DSR_OPT6_TYPE
	__u8 len;              // 18: port + address
	__be16 port;           // frontend port
	__be32 addr[4];        // frontend address
	__u8 pad_type;         // PadN (1): fills the header to a multiple of 8
	__u8 pad_len;          // 0: the PadN option is its two bytes alone
} __attribute__((packed));

_Static_assert(sizeof(struct kpr_dsr_opt4) == KPR_DSR_OPT4_LEN, "kpr_dsr_opt4 layout");
_Static_assert(sizeof(struct kpr_dsr_opt6) == KPR_DSR_OPT6_LEN, "kpr_dsr_opt6 layout");

/* The frontend a DSR packet carries, when it carries one (kpr's header first after the fixed
 * IP header). Returns 1 and fills addr and port, else 0. */
static __always_inline int kpr_dsr_parse(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, union kpr_addr *addr, __be16 *port)
{
	if (pkt->t.family == KPR_FAMILY_V4) {
		__u8 *vihl = ctx_ptr(ctx, pkt->l3_off, 1);
		struct kpr_dsr_opt4 *o;

		if (!vihl || (*vihl & 0x0f) < 7) // room for our 8 bytes after the 20-byte header
			return 0;
		o = ctx_ptr(ctx, pkt->l3_off + sizeof(struct iphdr), sizeof(*o));
		if (!o || o->type != KPR_DSR_OPT4_TYPE || o->len != KPR_DSR_OPT4_LEN)
			return 0;
		kpr_addr_set_v4(addr, o->addr);
		*port = o->port;
		return 1;
	} else {
		__u8 *nh = ctx_ptr(ctx, pkt->l3_off + offsetof(struct ipv6hdr, nexthdr), 1);
		struct kpr_dsr_opt6 *o;

		if (!nh || *nh != IPPROTO_DSTOPTS)
			return 0;
		o = ctx_ptr(ctx, pkt->l3_off + sizeof(struct ipv6hdr), sizeof(*o));
		if (!o || o->hdrlen != 2 || o->type != KPR_DSR_OPT6_TYPE || o->len != 18)
			return 0;
		kpr_addr_set_v6(addr, o->addr);
		*port = o->port;
		return 1;
	}
}

#if KPR_DSR_EDIT
#if defined(KPR_CTX_SKB)
// tc: store bytes the IP checksum does not cover with skb->csum kept right (CHECKSUM_COMPLETE).
#define kpr_dsr_store(ctx, off, from, len) bpf_skb_store_bytes(ctx, off, (void *)(from), len, BPF_F_RECOMPUTE_CSUM)
#else
#define kpr_dsr_store(ctx, off, from, len) ctx_store_bytes(ctx, off, from, len)
#endif

// Room flags: keep offloaded checksum state (a CHECKSUM_PARTIAL L4 sum stays valid: L4 does not move).
#define KPR_DSR_ROOM_FLAGS BPF_F_ADJ_ROOM_NO_CSUM_RESET

/* Insert the frontend `addr`:`port` into the packet (after DNAT: its addresses are the client's
 * and the backend's). Offsets in *pkt are moved past the inserted bytes. */
static __always_inline int kpr_dsr_insert(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *addr, __be16 port)
{
	if (pkt->t.family == KPR_FAMILY_V4) {
		struct kpr_dsr_opt4 opt = {};
		struct iphdr *ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip));
		__be32 old0, new0;
		__be32 *w;

		if (!ip)
			return KPR_E_DSR_PKT;
		if (ip->ihl != 5)
			return KPR_E_DSR_OPTS;
		if (ctx_adjust_room(ctx, KPR_DSR_OPT4_LEN, BPF_ADJ_ROOM_NET, KPR_DSR_ROOM_FLAGS))
			return KPR_E_DSR_ROOM;
		ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip) + sizeof(opt));
		if (!ip)
			return KPR_E_DSR_PKT;
		// version/ihl, tos and tot_len share the header's first word: one checksum update for all three
		w = (__be32 *)ip;
		old0 = w[0];
		ip->ihl = 7;
		ip->tot_len = kpr_htons(kpr_ntohs(ip->tot_len) + KPR_DSR_OPT4_LEN);
		new0 = w[0];
		opt.type = KPR_DSR_OPT4_TYPE;
		opt.len = KPR_DSR_OPT4_LEN;
		opt.port = port;
		opt.addr = addr->w[3];
		__builtin_memcpy((void *)ip + sizeof(*ip), &opt, sizeof(opt));
		// the option's words were zero in the sum before: add them like changed fields
		if (kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), old0, new0) ||
		    kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), 0, ((__be32 *)&opt)[0]) ||
		    kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), 0, ((__be32 *)&opt)[1]))
			return KPR_E_DSR_PKT;
		pkt->l4_off += KPR_DSR_OPT4_LEN;
		if (pkt->csum_off)
			pkt->csum_off += KPR_DSR_OPT4_LEN;
	} else {
		struct kpr_dsr_opt6 opt = {};
		struct ipv6hdr *ip6 = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip6));
		__u8 nh;
		__be16 plen;

		if (!ip6)
			return KPR_E_DSR_PKT;
		nh = ip6->nexthdr;
		plen = kpr_htons(kpr_ntohs(ip6->payload_len) + KPR_DSR_OPT6_LEN);
		if (ctx_adjust_room(ctx, KPR_DSR_OPT6_LEN, BPF_ADJ_ROOM_NET, KPR_DSR_ROOM_FLAGS))
			return KPR_E_DSR_ROOM;
		opt.nexthdr = nh;
		opt.hdrlen = 2;
		opt.type = KPR_DSR_OPT6_TYPE;
		opt.len = 18;
		opt.port = port;
		opt.addr[0] = addr->w[0];
		opt.addr[1] = addr->w[1];
		opt.addr[2] = addr->w[2];
		opt.addr[3] = addr->w[3];
		opt.pad_type = 1;
		opt.pad_len = 0;
		nh = IPPROTO_DSTOPTS;
		if (kpr_dsr_store(ctx, pkt->l3_off + sizeof(*ip6), &opt, sizeof(opt)) ||
		    kpr_dsr_store(ctx, pkt->l3_off + offsetof(struct ipv6hdr, payload_len), &plen, sizeof(plen)) ||
		    kpr_dsr_store(ctx, pkt->l3_off + offsetof(struct ipv6hdr, nexthdr), &nh, sizeof(nh)))
			return KPR_E_DSR_PKT;
		pkt->l4_off += KPR_DSR_OPT6_LEN;
		if (pkt->csum_off)
			pkt->csum_off += KPR_DSR_OPT6_LEN;
	}
	return 0;
}

/* Remove the option kpr_dsr_parse() found (the backend's node, before the pod sees the packet).
 * Offsets in *pkt are moved back. */
static __always_inline int kpr_dsr_strip(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	if (pkt->t.family == KPR_FAMILY_V4) {
		struct iphdr *ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip) + KPR_DSR_OPT4_LEN);
		__be32 old0, new0, o0, o1;
		__be32 *w;

		if (!ip)
			return KPR_E_DSR_PKT;
		w = (__be32 *)ip;
		o0 = w[5];
		o1 = w[6];
		old0 = w[0];
		ip->ihl -= 2;
		ip->tot_len = kpr_htons(kpr_ntohs(ip->tot_len) - KPR_DSR_OPT4_LEN);
		new0 = w[0];
		if (kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), old0, new0) ||
		    kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), o0, 0) ||
		    kpr_csum_l3_replace4(ctx, pkt->l3_off + offsetof(struct iphdr, check), o1, 0))
			return KPR_E_DSR_PKT;
		if (ctx_adjust_room(ctx, -KPR_DSR_OPT4_LEN, BPF_ADJ_ROOM_NET, KPR_DSR_ROOM_FLAGS))
			return KPR_E_DSR_ROOM;
		pkt->l4_off -= KPR_DSR_OPT4_LEN;
		if (pkt->csum_off)
			pkt->csum_off -= KPR_DSR_OPT4_LEN;
	} else {
		struct kpr_dsr_opt6 *o = ctx_ptr(ctx, pkt->l3_off + sizeof(struct ipv6hdr), sizeof(*o));
		struct ipv6hdr *ip6 = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip6));
		__u8 nh;
		__be16 plen;

		if (!o || !ip6)
			return KPR_E_DSR_PKT;
		nh = o->nexthdr;
		plen = kpr_htons(kpr_ntohs(ip6->payload_len) - KPR_DSR_OPT6_LEN);
		if (kpr_dsr_store(ctx, pkt->l3_off + offsetof(struct ipv6hdr, payload_len), &plen, sizeof(plen)) ||
		    kpr_dsr_store(ctx, pkt->l3_off + offsetof(struct ipv6hdr, nexthdr), &nh, sizeof(nh)))
			return KPR_E_DSR_PKT;
		// the removed bytes leave skb->csum through adjust_room's own bookkeeping
		if (ctx_adjust_room(ctx, -KPR_DSR_OPT6_LEN, BPF_ADJ_ROOM_NET, KPR_DSR_ROOM_FLAGS))
			return KPR_E_DSR_ROOM;
		pkt->l4_off -= KPR_DSR_OPT6_LEN;
		if (pkt->csum_off)
			pkt->csum_off -= KPR_DSR_OPT6_LEN;
	}
	return 0;
}
#endif /* KPR_DSR_EDIT */

#endif /* KPR_LIB_DSR_H */
