/* Packet parsing: Ethernet (+ up to KPR_VLAN_DEPTH VLAN tags), IPv4/IPv6, TCP/UDP/SCTP/ICMP,
 * into a struct kpr_pkt: the flow tuple plus the offsets NAT and checksum code need.
 *
 * Needs ctx/skb.h or ctx/xdp.h first. Offsets, not pointers, are kept: helpers that change
 * packet data (csum replace, adjust_room) invalidate pointers, so users re-derive them with
 * ctx_ptr().
 */
#ifndef KPR_LIB_PARSE_H
#define KPR_LIB_PARSE_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/parse.h"
#endif

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include "lib/common.h"

#ifndef KPR_VLAN_DEPTH
#define KPR_VLAN_DEPTH 2 // VLAN tags (802.1Q/802.1ad) skipped in the frame; tc usually sees them offloaded already
#endif
#ifndef KPR_IPV6_EXT_MAX
#define KPR_IPV6_EXT_MAX 4 // IPv6 extension headers walked before giving up on finding L4
#endif

#define KPR_PARSE_OK 0          // tuple filled, l4_off set (or frag=1)
#define KPR_PARSE_NOT_IP 1      // not IPv4/IPv6: leave the packet alone
#define KPR_PARSE_MALFORMED 2   // truncated or inconsistent headers
#define KPR_PARSE_UNKNOWN_L4 3  // IP, but an L4 protocol without ports (tuple has addresses only)

// One parsed packet.
struct kpr_pkt {
	struct kpr_tuple t; // addresses, ports, protocol, family, TCP flags
	__u16 l3_off;       // offset of the IP header from ctx_data()
	__u16 l4_off;       // offset of the L4 header; 0 when absent (non-first fragment, unknown L4)
	__u16 csum_off;     // offset of the L4 checksum field; 0 when none (SCTP uses CRC32c, fragments)
	__u8 frag;          // 1: a fragment; non-first ones carry no ports
	__u8 csum_state;    // CTX_CSUM_* when the entry program read it (ctx_csum_state), else 0: unknown
};

// 802.1Q/802.1ad tag as it sits in the frame.
struct kpr_vlan_hdr {
	__be16 tci;         // priority, DEI and VLAN id
	__be16 proto;       // the encapsulated ethertype
};

/* Ports and flags of the whole TCP header at pkt->l4_off; sets csum_off. kpr_parse_l4's TCP
 * case and UDP case (below), also how the NodePort fast exit fills a plain frame's packet
 * (lib/nodeport.h kpr_np_early_fill). Two functions, not one with a test of the protocol:
 * clang merges two such ctx_ptr() calls into one of a variable size, which the verifier gives
 * no range ("invalid access to packet"). */
static __always_inline int kpr_parse_tcp(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	__u32 off = pkt->l4_off;
	struct tcphdr *th = ctx_ptr(ctx, off, sizeof(*th));

	if (!th)
		return KPR_PARSE_MALFORMED;
	pkt->t.sport = th->source;
	pkt->t.dport = th->dest;
	pkt->t.tcp_flags = ((__u8 *)th)[13];
	pkt->csum_off = off + offsetof(struct tcphdr, check);
	return KPR_PARSE_OK;
}

// Ports of the UDP header at pkt->l4_off; sets csum_off.
static __always_inline int kpr_parse_udp(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	__u32 off = pkt->l4_off;
	struct udphdr *uh = ctx_ptr(ctx, off, sizeof(*uh));

	if (!uh)
		return KPR_PARSE_MALFORMED;
	pkt->t.sport = uh->source;
	pkt->t.dport = uh->dest;
	pkt->csum_off = off + offsetof(struct udphdr, check);
	return KPR_PARSE_OK;
}

// Ports (or ICMP echo id) of the L4 header at pkt->l4_off; sets csum_off.
static __always_inline int kpr_parse_l4(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	__u32 off = pkt->l4_off;

	switch (pkt->t.proto) {
	case IPPROTO_TCP:
		return kpr_parse_tcp(ctx, pkt);
	case IPPROTO_UDP:
		return kpr_parse_udp(ctx, pkt);
	case IPPROTO_SCTP: {
		// SCTP common header starts with the two ports, like UDP; its CRC32c cannot be patched incrementally.
		__be16 *ports = ctx_ptr(ctx, off, 4);
		if (!ports)
			return KPR_PARSE_MALFORMED;
		pkt->t.sport = ports[0];
		pkt->t.dport = ports[1];
		return KPR_PARSE_OK;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *ih = ctx_ptr(ctx, off, sizeof(*ih));
		if (!ih)
			return KPR_PARSE_MALFORMED;
		if (ih->type == ICMP_ECHO)
			pkt->t.sport = ih->un.echo.id;
		else if (ih->type == ICMP_ECHOREPLY)
			pkt->t.dport = ih->un.echo.id;
		pkt->csum_off = off + offsetof(struct icmphdr, checksum);
		return KPR_PARSE_OK;
	}
	case IPPROTO_ICMPV6: {
		struct icmp6hdr *ih = ctx_ptr(ctx, off, sizeof(*ih));
		if (!ih)
			return KPR_PARSE_MALFORMED;
		if (ih->icmp6_type == ICMPV6_ECHO_REQUEST)
			pkt->t.sport = ih->icmp6_dataun.u_echo.identifier;
		else if (ih->icmp6_type == ICMPV6_ECHO_REPLY)
			pkt->t.dport = ih->icmp6_dataun.u_echo.identifier;
		pkt->csum_off = off + offsetof(struct icmp6hdr, icmp6_cksum);
		return KPR_PARSE_OK;
	}
	}
	pkt->l4_off = 0;
	return KPR_PARSE_UNKNOWN_L4;
}

static __always_inline int kpr_parse_ipv4(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct iphdr *ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip));
	__u32 ihl;

	if (!ip)
		return KPR_PARSE_MALFORMED;
	ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < sizeof(*ip))
		return KPR_PARSE_MALFORMED;
	pkt->t.family = KPR_FAMILY_V4;
	pkt->t.proto = ip->protocol;
	kpr_addr_set_v4(&pkt->t.saddr, ip->saddr);
	kpr_addr_set_v4(&pkt->t.daddr, ip->daddr);
	if (ip->frag_off & kpr_htons(0x3fff)) { // MF set or offset != 0
		pkt->frag = 1;
		if (ip->frag_off & kpr_htons(0x1fff)) // not the first fragment: no L4 header
			return KPR_PARSE_OK;
	}
	pkt->l4_off = pkt->l3_off + ihl;
	return kpr_parse_l4(ctx, pkt);
}

static __always_inline int kpr_ipv6_is_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	       nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH;
}

static __always_inline int kpr_parse_ipv6(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct ipv6hdr *ip6 = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip6));
	__u32 off;
	__u8 nh;
	int i;

	if (!ip6)
		return KPR_PARSE_MALFORMED;
	if (ip6->version != 6)
		return KPR_PARSE_MALFORMED;
	pkt->t.family = KPR_FAMILY_V6;
	kpr_addr_set_v6(&pkt->t.saddr, ip6->saddr.in6_u.u6_addr32);
	kpr_addr_set_v6(&pkt->t.daddr, ip6->daddr.in6_u.u6_addr32);
	nh = ip6->nexthdr;
	off = pkt->l3_off + sizeof(*ip6);

#pragma unroll
	for (i = 0; i < KPR_IPV6_EXT_MAX; i++) {
		__u8 *eh;

		if (!kpr_ipv6_is_ext(nh))
			break;
		eh = ctx_ptr(ctx, off, 8);
		if (!eh)
			return KPR_PARSE_MALFORMED;
		if (nh == IPPROTO_FRAGMENT) {
			pkt->frag = 1;
			// fragment offset is the top 13 bits of bytes 2-3; non-first fragments carry no L4
			if ((((__u16)eh[2] << 8) | eh[3]) & 0xfff8) {
				pkt->t.proto = eh[0];
				return KPR_PARSE_OK;
			}
			nh = eh[0];
			off += 8;
		} else if (nh == IPPROTO_AH) {
			nh = eh[0];
			off += ((__u32)eh[1] + 2) * 4;
		} else {
			nh = eh[0];
			off += ((__u32)eh[1] + 1) * 8;
		}
	}
	if (kpr_ipv6_is_ext(nh))
		return KPR_PARSE_MALFORMED; // deeper chain than KPR_IPV6_EXT_MAX
	pkt->t.proto = nh;
	pkt->l4_off = off;
	return kpr_parse_l4(ctx, pkt);
}

// Parse Ethernet, VLAN tags, IP and L4 into *pkt (zeroed here). Returns KPR_PARSE_*.
static __always_inline int kpr_parse(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct ethhdr *eth = ctx_ptr(ctx, 0, sizeof(*eth));
	__u32 off = sizeof(struct ethhdr);
	__be16 proto;
	int i;

	__builtin_memset(pkt, 0, sizeof(*pkt));
	if (!eth)
		return KPR_PARSE_MALFORMED;
	proto = eth->h_proto;

#pragma unroll
	for (i = 0; i < KPR_VLAN_DEPTH; i++) {
		struct kpr_vlan_hdr *vh;

		if (proto != kpr_htons(ETH_P_8021Q) && proto != kpr_htons(ETH_P_8021AD))
			break;
		vh = ctx_ptr(ctx, off, sizeof(*vh));
		if (!vh)
			return KPR_PARSE_MALFORMED;
		proto = vh->proto;
		off += sizeof(*vh);
	}
	pkt->l3_off = off;
	if (proto == kpr_htons(ETH_P_IP))
		return kpr_parse_ipv4(ctx, pkt);
	if (proto == kpr_htons(ETH_P_IPV6))
		return kpr_parse_ipv6(ctx, pkt);
	return KPR_PARSE_NOT_IP;
}

#endif /* KPR_LIB_PARSE_H */
