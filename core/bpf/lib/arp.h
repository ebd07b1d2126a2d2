/* Answering ARP requests and IPv6 neighbour solicitations for addresses this node owns,
 * without the kernel's stack or a userspace process: the reply is built in place and sent
 * back out of the device the request came in on (announce_arp's program, tc or XDP).
 *
 * Maps (the plugin's, not pinned: a new program starts empty and the plugin fills it
 * before the pinned link switches to it):
 *   kpr_arp_owned  (ifindex, address) -> the MAC to answer with. Only configured
 *                  interfaces have entries, so other devices never answer.
 *   kpr_arp_stats  ifindex -> per-CPU counters (lib/arp_counters.h names them).
 *   kpr_arp_alive  [0] = CLOCK_MONOTONIC ns until which the agent vouches for the map; the
 *                  agent moves it forward a few times a second. A killed agent's program
 *                  (its link stays pinned) stops answering within that time, so a peer
 *                  taking the address over is never contradicted.
 *
 * What is answered (everything else goes on to the kernel untouched):
 *   ARP request (RFC 826), target owned here: a reply from the interface MAC to the sender.
 *   A probe (sender IP 0.0.0.0, RFC 5227) gets the same reply, addressed to 0.0.0.0 at the
 *   prober's MAC, as Linux defends its own addresses. A gratuitous request or reply
 *   (sender IP = target IP) is never answered; for an owned address from another MAC it
 *   counts as a conflict.
 *   Neighbour solicitation (RFC 4861 7.1.1 checks: hop limit 255, code 0, ICMPv6 length
 *   >= 24, target not multicast), target owned here: a neighbour advertisement with
 *   Solicited and Override set and a target link-layer address option, to the solicitor;
 *   from the unspecified address (DAD, RFC 4862 5.4.3 / RFC 4861 7.2.4) Override only,
 *   to all-nodes ff02::1. The incoming ICMPv6 checksum is not verified (the kernel would
 *   drop a corrupt solicitation; the worst here is an answer to it).
 * VLAN-tagged frames are left to the kernel.
 *
 * Needs ctx/skb.h or ctx/xdp.h first. KPR_ARP_PASS is what "not ours" returns: tc entry
 * points set TC_ACT_UNSPEC so later tcx programs and clsact filters still see the packet.
 */
#ifndef KPR_LIB_ARP_H
#define KPR_LIB_ARP_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/arp.h"
#endif

#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_arp.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/icmpv6.h>
#include "lib/common.h"
#include "lib/csum.h"

#ifndef KPR_ARP_PASS
#define KPR_ARP_PASS CTX_PASS // verdict for every packet not answered here
#endif
#ifndef KPR_ARP_MAX
#define KPR_ARP_MAX 16384 // (interface, address) pairs answered for
#endif
#ifndef KPR_ARP_IF_MAX
#define KPR_ARP_IF_MAX 64 // interfaces with counters
#endif

enum {
#define KPR_ARP_COUNTER(c, name) KPR_ARP_ST_##c,
#include "lib/arp_counters.h"
#undef KPR_ARP_COUNTER
	KPR_ARP_ST_MAX
};

struct kpr_arp_key {
	__u32 ifindex;       // the device the request arrived on
	union kpr_addr addr; // the owned address (IPv4 v4-mapped)
};

struct kpr_arp_val {
	__u8 mac[6]; // what the reply says the address is at: the interface's MAC
	__u16 pad;   // zero
};

struct kpr_arp_stats {
	__u64 n[KPR_ARP_ST_MAX]; // indexed by KPR_ARP_ST_*
};

_Static_assert(sizeof(struct kpr_arp_key) == 20, "kpr_arp_key layout");
_Static_assert(sizeof(struct kpr_arp_val) == 8, "kpr_arp_val layout");

BPF_HASH(kpr_arp_owned, struct kpr_arp_key, struct kpr_arp_val, KPR_ARP_MAX);
BPF_PERCPU_HASH(kpr_arp_stats, __u32, struct kpr_arp_stats, KPR_ARP_IF_MAX);
BPF_ARRAY(kpr_arp_alive, __u64, 1);

// ARP for IPv4 over Ethernet, after the Ethernet header; addresses as bytes (unaligned).
struct kpr_arp_eth {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

// The ICMPv6 part of a neighbour advertisement with one target link-layer address option.
struct kpr_na {
	__u8 type;       // 136
	__u8 code;       // 0
	__be16 cksum;
	__be32 flags;    // R, S, O in the top bits
	__be32 target[4];
	__u8 opt_type;   // 2: target link-layer address
	__u8 opt_len;    // 1 (units of 8 bytes)
	__u8 mac[6];
};

#define KPR_ND_NS 135
#define KPR_ND_NA 136
#define KPR_NA_F_SOLICITED kpr_htonl(0x40000000)
#define KPR_NA_F_OVERRIDE kpr_htonl(0x20000000)
#define KPR_NA_LEN (ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct kpr_na)) // 86

static __always_inline void kpr_arp_count(__u32 ifindex, __u32 counter)
{
	struct kpr_arp_stats *s = kpr_arp_stats.lookup(&ifindex);

	if (s && counter < KPR_ARP_ST_MAX)
		s->n[counter]++; // per-CPU: no atomics needed
}

// Whether the agent has vouched for kpr_arp_owned recently enough.
static __always_inline int kpr_arp_agent_alive(void)
{
	__u32 zero = 0;
	__u64 *until = kpr_arp_alive.lookup(&zero);

	return until && kpr_now() < *until;
}

static __always_inline int kpr_mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

// The entry to answer a request with, or NULL (counted) when the target is not owned here, the
// agent has gone silent, or the request is our own frame coming back.
static __always_inline struct kpr_arp_val *kpr_arp_answerable(__u32 ifindex, struct kpr_arp_val *own, const __u8 *src_mac)
{
	if (!own) {
		kpr_arp_count(ifindex, KPR_ARP_ST_NOT_OWNED);
		return (void *)0;
	}
	if (!kpr_arp_agent_alive()) {
		kpr_arp_count(ifindex, KPR_ARP_ST_EXPIRED);
		return (void *)0;
	}
	if (kpr_mac_eq(src_mac, own->mac))
		return (void *)0; // never answer ourselves
	return own;
}

static __always_inline int kpr_arp_v4(kpr_ctx_t *ctx, __u32 ifindex)
{
	struct ethhdr *eth = ctx_ptr(ctx, 0, ETH_HLEN + sizeof(struct kpr_arp_eth));
	struct kpr_arp_key key = {};
	struct kpr_arp_val *own;
	struct kpr_arp_eth *a;
	__u8 asker[6];
	__be32 spa, tpa;

	if (!eth)
		return KPR_ARP_PASS;
	a = (void *)(eth + 1);
	if (a->htype != kpr_htons(ARPHRD_ETHER) || a->ptype != kpr_htons(ETH_P_IP) || a->hlen != 6 || a->plen != 4)
		return KPR_ARP_PASS;
	if (a->op != kpr_htons(ARPOP_REQUEST) && a->op != kpr_htons(ARPOP_REPLY))
		return KPR_ARP_PASS;
	__builtin_memcpy(&spa, a->spa, 4);
	__builtin_memcpy(&tpa, a->tpa, 4);
	key.ifindex = ifindex;
	kpr_addr_set_v4(&key.addr, tpa);
	own = kpr_arp_owned.lookup(&key);
	if (spa == tpa) {
		// Gratuitous: someone announcing the address. Never answered; ours means a conflict.
		if (own && !kpr_mac_eq(a->sha, own->mac))
			kpr_arp_count(ifindex, KPR_ARP_ST_CONFLICT);
		return KPR_ARP_PASS;
	}
	if (a->op != kpr_htons(ARPOP_REQUEST))
		return KPR_ARP_PASS;
	own = kpr_arp_answerable(ifindex, own, eth->h_source);
	if (!own)
		return KPR_ARP_PASS;
	__builtin_memcpy(asker, a->sha, 6);
	__builtin_memcpy(eth->h_dest, asker, 6);
	__builtin_memcpy(eth->h_source, own->mac, 6);
	a->op = kpr_htons(ARPOP_REPLY);
	__builtin_memcpy(a->sha, own->mac, 6);
	__builtin_memcpy(a->spa, &tpa, 4);
	__builtin_memcpy(a->tha, asker, 6);
	// A probe's sender IP is 0.0.0.0: the reply goes to 0.0.0.0 at its MAC (RFC 5227).
	__builtin_memcpy(a->tpa, &spa, 4);
	kpr_arp_count(ifindex, KPR_ARP_ST_ARP_REPLY);
	return ctx_tx(ctx);
}

static __always_inline int kpr_addr_is_unspec(const __be32 *w)
{
	return (w[0] | w[1] | w[2] | w[3]) == 0;
}

static __always_inline int kpr_ndp(kpr_ctx_t *ctx, __u32 ifindex)
{
	struct ethhdr *eth = ctx_ptr(ctx, 0, ETH_HLEN + sizeof(struct ipv6hdr) + 24);
	struct kpr_arp_key key = {};
	struct kpr_arp_val *own;
	struct ipv6hdr *ip6;
	struct ipv6hdr rip6 = {};
	struct ethhdr reth = {};
	struct kpr_na na = {};
	__u8 *icmp;
	__be32 src[4], target[4];
	__u32 sum = 0;
	int dad, i;

	if (!eth)
		return KPR_ARP_PASS;
	ip6 = (void *)(eth + 1);
	icmp = (void *)(ip6 + 1);
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_ICMPV6 || icmp[0] != KPR_ND_NS)
		return KPR_ARP_PASS;
	if (ip6->hop_limit != 255 || icmp[1] != 0 || kpr_ntohs(ip6->payload_len) < 24 || icmp[8] == 0xff) {
		kpr_arp_count(ifindex, KPR_ARP_ST_INVALID);
		return KPR_ARP_PASS;
	}
	__builtin_memcpy(src, &ip6->saddr, 16);
	__builtin_memcpy(target, icmp + 8, 16);
	key.ifindex = ifindex;
	kpr_addr_set_v6(&key.addr, target);
	own = kpr_arp_owned.lookup(&key);
	if (src[0] == target[0] && src[1] == target[1] && src[2] == target[2] && src[3] == target[3]) {
		if (own && !kpr_mac_eq(eth->h_source, own->mac))
			kpr_arp_count(ifindex, KPR_ARP_ST_CONFLICT);
		return KPR_ARP_PASS;
	}
	own = kpr_arp_answerable(ifindex, own, eth->h_source);
	if (!own)
		return KPR_ARP_PASS;
	dad = kpr_addr_is_unspec(src);

	// Ethernet: to the solicitor, or to all-nodes (33:33:00:00:00:01) for DAD.
	if (dad) {
		reth.h_dest[0] = 0x33;
		reth.h_dest[1] = 0x33;
		reth.h_dest[5] = 0x01;
	} else {
		__builtin_memcpy(reth.h_dest, eth->h_source, 6);
	}
	__builtin_memcpy(reth.h_source, own->mac, 6);
	reth.h_proto = kpr_htons(ETH_P_IPV6);

	rip6.version = 6;
	rip6.payload_len = kpr_htons(sizeof(struct kpr_na));
	rip6.nexthdr = IPPROTO_ICMPV6;
	rip6.hop_limit = 255;
	__builtin_memcpy(&rip6.saddr, target, 16);
	if (dad) {
		rip6.daddr.in6_u.u6_addr32[0] = kpr_htonl(0xff020000);
		rip6.daddr.in6_u.u6_addr32[3] = kpr_htonl(1);
	} else {
		__builtin_memcpy(&rip6.daddr, src, 16);
	}

	na.type = KPR_ND_NA;
	na.flags = dad ? KPR_NA_F_OVERRIDE : (KPR_NA_F_SOLICITED | KPR_NA_F_OVERRIDE);
	__builtin_memcpy(na.target, target, 16);
	na.opt_type = 2;
	na.opt_len = 1;
	__builtin_memcpy(na.mac, own->mac, 6);

	// ICMPv6 checksum: pseudo header (addresses, length, next header) and the message.
#pragma unroll
	for (i = 0; i < 4; i++) {
		sum = kpr_csum_add(sum, rip6.saddr.in6_u.u6_addr32[i]);
		sum = kpr_csum_add(sum, rip6.daddr.in6_u.u6_addr32[i]);
	}
	sum = kpr_csum_add(sum, kpr_htonl(sizeof(struct kpr_na)));
	sum = kpr_csum_add(sum, kpr_htonl(IPPROTO_ICMPV6));
#pragma unroll
	for (i = 0; i < (int)(sizeof(na) / 4); i++)
		sum = kpr_csum_add(sum, ((__u32 *)&na)[i]);
	na.cksum = kpr_csum_fold(sum);

	// The request is 78 bytes or more (options); the advertisement exactly KPR_NA_LEN.
	if (ctx_len(ctx) != KPR_NA_LEN && ctx_set_len(ctx, KPR_NA_LEN) < 0) {
		kpr_arp_count(ifindex, KPR_ARP_ST_TX_ERROR);
		return KPR_ARP_PASS;
	}
	if (ctx_store_bytes(ctx, 0, &reth, ETH_HLEN) < 0 ||
	    ctx_store_bytes(ctx, ETH_HLEN, &rip6, sizeof(rip6)) < 0 ||
	    ctx_store_bytes(ctx, ETH_HLEN + sizeof(rip6), &na, sizeof(na)) < 0) {
		kpr_arp_count(ifindex, KPR_ARP_ST_TX_ERROR);
		return CTX_DROP; // half rewritten: never hand it to the kernel
	}
	kpr_arp_count(ifindex, KPR_ARP_ST_NA_REPLY);
	return ctx_tx(ctx);
}

// The program: answer what is ours, pass everything else.
static __always_inline int kpr_arp_answer(kpr_ctx_t *ctx)
{
	struct ethhdr *eth = ctx_ptr(ctx, 0, ETH_HLEN);
	__u32 ifindex = ctx_ifindex(ctx);

	if (!eth)
		return KPR_ARP_PASS;
	if (eth->h_proto == kpr_htons(ETH_P_ARP))
		return kpr_arp_v4(ctx, ifindex);
	if (eth->h_proto == kpr_htons(ETH_P_IPV6))
		return kpr_ndp(ctx, ifindex);
	return KPR_ARP_PASS;
}

#endif /* KPR_LIB_ARP_H */
