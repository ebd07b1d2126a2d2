/* ICMP and ICMPv6 errors: answering a packet with one (port unreachable, fragmentation needed /
 * packet too big), and finding and rewriting the packet an error quotes, so errors about
 * translated flows can be translated back.
 *
 * Needs ctx/skb.h or ctx/xdp.h first and a packet parsed by kpr_parse(). Errors are built in a
 * per-CPU scratch buffer and checksummed with bpf_csum_diff, which both contexts have; only resizing the
 * packet differs (bpf_skb_change_tail / bpf_xdp_adjust_tail).
 *
 * tc caveat: a packet that arrived CHECKSUM_PARTIAL (sent over a veth from this very machine,
 * or by virtio with needs-csum) keeps that state, and no helper can clear it. Receivers on
 * virtual paths accept such packets unverified, which is the only place they come from.
 */
#ifndef KPR_LIB_ICMP_H
#define KPR_LIB_ICMP_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/icmp.h"
#endif

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/csum.h"

#ifndef KPR_ICMP_TTL
#define KPR_ICMP_TTL 64 // TTL / hop limit of generated errors
#endif

#define KPR_ICMP4_QUOTE 28 // bytes of the offending IPv4 packet an error quotes: header + 8 (RFC 792)
#define KPR_ICMP6_QUOTE 48 // bytes of the offending IPv6 packet an error quotes: header + 8

#define KPR_E_ICMP_PKT -20    // the offending packet is too short or not parsed
#define KPR_E_ICMP_RESIZE -21 // the packet could not be resized to the error's length
#define KPR_E_ICMP_STORE -22  // writing the error into the packet failed

// An IPv4 error as it goes on the wire after the L2 header.
struct kpr_icmp4_err {
	struct iphdr ip;              // new header: from the offending packet's destination to its source
	struct icmphdr icmp;          // type, code, checksum, and the MTU for fragmentation needed
	__u8 quote[KPR_ICMP4_QUOTE];  // the start of the offending packet
};

// An IPv6 error as it goes on the wire after the L2 header.
struct kpr_icmp6_err {
	struct ipv6hdr ip;            // new header: from the offending packet's destination to its source
	struct icmp6hdr icmp;         // type, code, checksum, and the MTU for packet too big
	__u8 quote[KPR_ICMP6_QUOTE];  // the start of the offending packet
};

// ICMPv6 pseudo header (RFC 8200 8.1), summed into the checksum.
struct kpr_icmp6_pseudo {
	union kpr_addr saddr; // source
	union kpr_addr daddr; // destination
	__be32 len;           // upper-layer length
	__be32 nexthdr;       // 3 zero bytes, then IPPROTO_ICMPV6
};

_Static_assert(sizeof(struct kpr_icmp4_err) == 56, "kpr_icmp4_err layout");
_Static_assert(sizeof(struct kpr_icmp6_err) == 96, "kpr_icmp6_err layout");

// Where an error is assembled: too big for the 512-byte stack next to a load balancer's state.
union kpr_icmp_scratch {
	struct kpr_icmp4_err e4; // IPv4 error
	struct {
		struct kpr_icmp6_err e;     // IPv6 error
		struct kpr_icmp6_pseudo ph; // and its checksum's pseudo header
	} e6;
};

// One scratch buffer per CPU (programs do not migrate while they run); not pinned.
BPF_PERCPU_ARRAY(kpr_icmp_scratch, union kpr_icmp_scratch, 1);

// Set the packet's length to `len` bytes (grow with zeros, or trim) at its tail.
static __always_inline int kpr_icmp_resize(kpr_ctx_t *ctx, __u32 len)
{
#ifdef KPR_CTX_SKB
	return bpf_skb_change_tail(ctx, len, 0);
#else
	// the frame's length from the helper: the verifier refuses data_end - data arithmetic here
	return bpf_xdp_adjust_tail(ctx, (int)len - (int)bpf_xdp_get_buff_len(ctx));
#endif
}

// Store bytes keeping a tc packet's CHECKSUM_COMPLETE sum right (XDP has none to keep).
static __always_inline int kpr_icmp_store(kpr_ctx_t *ctx, __u32 off, const void *from, __u32 len)
{
#ifdef KPR_CTX_SKB
	return bpf_skb_store_bytes(ctx, off, (void *)from, len, BPF_F_RECOMPUTE_CSUM);
#else
	return ctx_store_bytes(ctx, off, from, len);
#endif
}

// Swap the Ethernet source and destination, so the frame goes back where it came from.
static __always_inline int kpr_icmp_swap_macs(kpr_ctx_t *ctx)
{
	__u8 macs[12], swapped[12];
	int i;

	if (ctx_load_bytes(ctx, 0, macs, sizeof(macs)))
		return KPR_E_ICMP_PKT;
#pragma unroll
	for (i = 0; i < 6; i++) {
		swapped[i] = macs[i + 6];
		swapped[i + 6] = macs[i];
	}
	return ctx_store_bytes(ctx, 0, swapped, sizeof(swapped)) ? KPR_E_ICMP_STORE : 0;
}

/* Turn the packet into an ICMP(v6) error about itself, addressed back to its sender from the
 * address it was sent to, with swapped MACs: send it with ctx_tx() afterwards. `type`/`code` as
 * on the wire; `mtu` is the next-hop MTU for fragmentation needed / packet too big (else 0).
 * Returns 0 or KPR_E_ICMP_*; on error the packet may be half rewritten and must be dropped. */
static __always_inline int kpr_icmp_reply_error(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, __u8 type, __u8 code,
						__u32 mtu)
{
	union kpr_icmp_scratch *buf;
	__u32 off = pkt->l3_off, zero = 0;

	buf = kpr_icmp_scratch.lookup(&zero);
	if (!buf)
		return KPR_E_ICMP_PKT;
	__builtin_memset(buf, 0, sizeof(*buf));
	if (pkt->t.family == KPR_FAMILY_V4) {
		struct kpr_icmp4_err *e = &buf->e4;

		if (ctx_load_bytes(ctx, off, e->quote, sizeof(e->quote)))
			return KPR_E_ICMP_PKT;
		e->ip.version = 4;
		e->ip.ihl = 5;
		e->ip.tos = 0xc0; // precedence "internetwork control", as the kernel's own errors
		e->ip.tot_len = kpr_htons(sizeof(*e));
		e->ip.ttl = KPR_ICMP_TTL;
		e->ip.protocol = IPPROTO_ICMP;
		e->ip.saddr = pkt->t.daddr.w[3];
		e->ip.daddr = pkt->t.saddr.w[3];
		e->ip.check = kpr_csum_fold(bpf_csum_diff(0, 0, (void *)&e->ip, sizeof(e->ip), 0));
		e->icmp.type = type;
		e->icmp.code = code;
		e->icmp.un.frag.mtu = kpr_htons((__u16)mtu);
		e->icmp.checksum =
		    kpr_csum_fold(bpf_csum_diff(0, 0, (void *)&e->icmp, sizeof(e->icmp) + sizeof(e->quote), 0));
		if (kpr_icmp_resize(ctx, off + sizeof(*e)))
			return KPR_E_ICMP_RESIZE;
		if (kpr_icmp_store(ctx, off, e, sizeof(*e)))
			return KPR_E_ICMP_STORE;
	} else {
		struct kpr_icmp6_err *e = &buf->e6.e;
		struct kpr_icmp6_pseudo *ph = &buf->e6.ph;
		__u32 sum;

		if (ctx_load_bytes(ctx, off, e->quote, sizeof(e->quote)))
			return KPR_E_ICMP_PKT;
		e->ip.version = 6;
		e->ip.payload_len = kpr_htons(sizeof(e->icmp) + sizeof(e->quote));
		e->ip.nexthdr = IPPROTO_ICMPV6;
		e->ip.hop_limit = KPR_ICMP_TTL;
		kpr_addr_set_v6((union kpr_addr *)&e->ip.saddr, pkt->t.daddr.w);
		kpr_addr_set_v6((union kpr_addr *)&e->ip.daddr, pkt->t.saddr.w);
		e->icmp.icmp6_type = type;
		e->icmp.icmp6_code = code;
		e->icmp.icmp6_dataun.un_data32[0] = kpr_htonl(mtu);
		ph->saddr = pkt->t.daddr;
		ph->daddr = pkt->t.saddr;
		ph->len = kpr_htonl(sizeof(e->icmp) + sizeof(e->quote));
		ph->nexthdr = kpr_htonl(IPPROTO_ICMPV6);
		sum = bpf_csum_diff(0, 0, (void *)ph, sizeof(*ph), 0);
		sum = bpf_csum_diff(0, 0, (void *)&e->icmp, sizeof(e->icmp) + sizeof(e->quote), sum);
		e->icmp.icmp6_cksum = kpr_csum_fold(sum);
		if (kpr_icmp_resize(ctx, off + sizeof(*e)))
			return KPR_E_ICMP_RESIZE;
		if (kpr_icmp_store(ctx, off, e, sizeof(*e)))
			return KPR_E_ICMP_STORE;
	}
	return kpr_icmp_swap_macs(ctx);
}

/* --- errors about other packets ---------------------------------------------------------- */

// The packet an ICMP error quotes: as it was sent by whoever the error is addressed to.
struct kpr_icmp_inner {
	struct kpr_tuple t; // the quoted packet's addresses, ports and protocol
	__u16 l3_off;       // offset of the quoted IP header
	__u16 l4_off;       // offset of the quoted L4 header
	__u16 csum_off;     // offset of the quoted L4 checksum when the quote holds it (UDP), else 0
	__u16 pad;          // zero
};

// Whether the parsed packet is an ICMP error that quotes another packet.
static __always_inline int kpr_icmp_is_error(kpr_ctx_t *ctx, const struct kpr_pkt *pkt)
{
	__u8 *type;

	if (!pkt->l4_off || pkt->frag)
		return 0;
	if (pkt->t.proto == IPPROTO_ICMP) {
		type = ctx_ptr(ctx, pkt->l4_off, 1);
		return type && (*type == ICMP_DEST_UNREACH || *type == ICMP_TIME_EXCEEDED || *type == ICMP_PARAMETERPROB);
	}
	if (pkt->t.proto == IPPROTO_ICMPV6) {
		type = ctx_ptr(ctx, pkt->l4_off, 1);
		return type && *type >= ICMPV6_DEST_UNREACH && *type <= ICMPV6_PARAMPROB;
	}
	return 0;
}

/* Parse the packet an ICMP error quotes (TCP and UDP only: other protocols carry no ports to
 * translate). Returns 0, or -1 when the quote is not one kpr can translate. */
static __always_inline int kpr_icmp_parse_inner(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, struct kpr_icmp_inner *in)
{
	__u32 off = pkt->l4_off + 8; // ICMP and ICMPv6 error headers are 8 bytes
	__be16 *ports;

	__builtin_memset(in, 0, sizeof(*in));
	in->l3_off = off;
	if (pkt->t.family == KPR_FAMILY_V4) {
		struct iphdr *ip = ctx_ptr(ctx, off, sizeof(*ip));

		if (!ip || ip->version != 4 || ip->ihl < 5 || (ip->frag_off & kpr_htons(0x1fff)))
			return -1;
		in->t.family = KPR_FAMILY_V4;
		in->t.proto = ip->protocol;
		kpr_addr_set_v4(&in->t.saddr, ip->saddr);
		kpr_addr_set_v4(&in->t.daddr, ip->daddr);
		in->l4_off = off + ip->ihl * 4;
	} else {
		struct ipv6hdr *ip6 = ctx_ptr(ctx, off, sizeof(*ip6));

		if (!ip6 || ip6->version != 6)
			return -1;
		in->t.family = KPR_FAMILY_V6;
		in->t.proto = ip6->nexthdr; // extension headers in a quote are not followed
		kpr_addr_set_v6(&in->t.saddr, ip6->saddr.in6_u.u6_addr32);
		kpr_addr_set_v6(&in->t.daddr, ip6->daddr.in6_u.u6_addr32);
		in->l4_off = off + sizeof(*ip6);
	}
	if (in->t.proto != IPPROTO_TCP && in->t.proto != IPPROTO_UDP)
		return -1;
	ports = ctx_ptr(ctx, in->l4_off, 4);
	if (!ports)
		return -1;
	in->t.sport = ports[0];
	in->t.dport = ports[1];
	if (in->t.proto == IPPROTO_UDP) {
		__be16 *sum = ctx_ptr(ctx, in->l4_off + 6, 2);

		// a zero UDP checksum (IPv4 only) means "none": nothing to keep right
		if (sum && *sum)
			in->csum_off = in->l4_off + 6;
	}
	return 0;
}

// Patch the quoted UDP checksum for a 4- or 16-byte change, and the outer ICMP checksum for that patch.
static __always_inline int kpr_icmp_inner_csum(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, struct kpr_icmp_inner *in,
					       const union kpr_addr *from, const union kpr_addr *to, __be16 pfrom, __be16 pto)
{
	__be16 *p, old, new;
	int v4 = in->t.family == KPR_FAMILY_V4;

	if (!in->csum_off)
		return 0;
	p = ctx_ptr(ctx, in->csum_off, 2);
	if (!p)
		return KPR_E_CSUM;
	old = *p;
	// Plain arithmetic (no pseudo-header flag): this checksum is data inside the error, not the skb's own.
	if (v4) {
		if (kpr_csum_l4_replace4(ctx, in->csum_off, from->w[3], to->w[3], KPR_CSUM_UDP))
			return KPR_E_CSUM;
	} else if (kpr_csum_l4_replace16(ctx, in->csum_off, from, to, KPR_CSUM_UDP)) {
		return KPR_E_CSUM;
	}
	if (pfrom != pto && kpr_csum_l4_replace2(ctx, in->csum_off, pfrom, pto, KPR_CSUM_UDP))
		return KPR_E_CSUM;
	p = ctx_ptr(ctx, in->csum_off, 2);
	if (!p)
		return KPR_E_CSUM;
	new = *p;
	return kpr_csum_l4_replace2(ctx, pkt->csum_off, old, new, 0);
}

/* Rewrite the quoted packet's source (or destination, when is_dst) to addr:port, keeping right
 * the quoted IPv4 header checksum, the quoted UDP checksum when the quote holds it (TCP's lies
 * beyond the 8 quoted bytes), and the error's own checksum over all of it. port 0 keeps the port. */
static __always_inline int kpr_icmp_inner_rewrite(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, struct kpr_icmp_inner *in,
						  const union kpr_addr *addr, __be16 port, int is_dst)
{
	union kpr_addr *cur = is_dst ? &in->t.daddr : &in->t.saddr;
	__be16 *curp = is_dst ? &in->t.dport : &in->t.sport;
	union kpr_addr from = *cur;
	__be16 pfrom = *curp, pto = port ? port : *curp;
	__u32 aoff, poff = in->l4_off + (is_dst ? 2 : 0);
	__be16 *pp;

	if (in->t.family == KPR_FAMILY_V4) {
		__be16 *check, oldc, newc;
		__be32 *a;

		aoff = in->l3_off + (is_dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
		a = ctx_ptr(ctx, aoff, 4);
		check = ctx_ptr(ctx, in->l3_off + offsetof(struct iphdr, check), 2);
		if (!a || !check)
			return KPR_E_CSUM;
		oldc = *check;
		*a = addr->w[3];
		if (kpr_csum_l3_replace4(ctx, in->l3_off + offsetof(struct iphdr, check), from.w[3], addr->w[3]))
			return KPR_E_CSUM;
		check = ctx_ptr(ctx, in->l3_off + offsetof(struct iphdr, check), 2);
		if (!check)
			return KPR_E_CSUM;
		newc = *check;
		// ICMPv4's checksum covers the quote only (no pseudo header): the address and the quoted header checksum
		if (kpr_csum_l4_replace4(ctx, pkt->csum_off, from.w[3], addr->w[3], 0) ||
		    kpr_csum_l4_replace2(ctx, pkt->csum_off, oldc, newc, 0))
			return KPR_E_CSUM;
	} else {
		union kpr_addr *a;

		aoff = in->l3_off + (is_dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		a = ctx_ptr(ctx, aoff, sizeof(*a));
		if (!a)
			return KPR_E_CSUM;
		*a = *addr;
		if (kpr_csum_l4_replace16(ctx, pkt->csum_off, &from, addr, 0))
			return KPR_E_CSUM;
	}
	if (kpr_icmp_inner_csum(ctx, pkt, in, &from, addr, pfrom, pto))
		return KPR_E_CSUM;
	if (pto != pfrom) {
		pp = ctx_ptr(ctx, poff, 2);
		if (!pp)
			return KPR_E_CSUM;
		*pp = pto;
		if (kpr_csum_l4_replace2(ctx, pkt->csum_off, pfrom, pto, 0))
			return KPR_E_CSUM;
	}
	*cur = *addr;
	*curp = pto;
	return 0;
}

#endif /* KPR_LIB_ICMP_H */
