/* Routing a packet from a program: the FIB lookup and the route's MACs, for tc and XDP.
 *
 * One definition for every program that forwards (lib/nodeport.h, lib/host_routing.h): what
 * goes into bpf_fib_lookup() and how its answer lands on the frame must not differ between
 * the NodePort path and eBPF host routing, or a packet would route one way through one and
 * another way through the other.
 */
#ifndef KPR_LIB_FIB_H
#define KPR_LIB_FIB_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/fib.h"
#endif

#include "lib/common.h"

#define KPR_FIB_AF_INET 2   // AF_INET, as bpf_fib_lookup wants it
#define KPR_FIB_AF_INET6 10 // AF_INET6

/* FIB lookup for a packet of tuple `t` (protocol and ports) from `s` to `d`, entering at the
 * context's device. `tot_len`: the L3 length the MTU check uses (0: the packet's own, tc only).
 * Returns bpf_fib_lookup's result (BPF_FIB_LKUP_RET_*); `p` holds the route's answer. */
static __always_inline int kpr_fib_lookup(kpr_ctx_t *ctx, struct bpf_fib_lookup *p, const struct kpr_tuple *t,
					  const union kpr_addr *s, const union kpr_addr *d, __u16 tot_len)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->ifindex = ctx_ifindex(ctx);
	p->l4_protocol = t->proto;
	p->sport = t->sport;
	p->dport = t->dport;
	p->tot_len = tot_len;
	if (t->family == KPR_FAMILY_V4) {
		p->family = KPR_FIB_AF_INET;
		p->ipv4_src = s->w[3];
		p->ipv4_dst = d->w[3];
	} else {
		// word by word: LLVM's memcpy of a union would go byte by byte here
		p->family = KPR_FIB_AF_INET6;
		p->ipv6_src[0] = s->w[0];
		p->ipv6_src[1] = s->w[1];
		p->ipv6_src[2] = s->w[2];
		p->ipv6_src[3] = s->w[3];
		p->ipv6_dst[0] = d->w[0];
		p->ipv6_dst[1] = d->w[1];
		p->ipv6_dst[2] = d->w[2];
		p->ipv6_dst[3] = d->w[3];
	}
	return bpf_fib_lookup(ctx, p, sizeof(*p), 0);
}

/* Destination and source MAC on the frame; -1 when it is too short to hold them. Copied 2 bytes
 * at a time (LLVM copies a __u8 array byte by byte: 24 instructions where this takes 12): every
 * MAC passed sits at an even offset (struct bpf_fib_lookup's, the next-hop caches' values), as
 * the verifier demands of 2-byte stack reads. */
static __always_inline int kpr_fib_set_macs(kpr_ctx_t *ctx, const __u8 *dmac, const __u8 *smac)
{
	__u16 *eth = ctx_ptr(ctx, 0, 12);
	const __u16 *d = (const __u16 *)dmac, *s = (const __u16 *)smac;

	if (!eth)
		return -1;
	eth[0] = d[0];
	eth[1] = d[1];
	eth[2] = d[2];
	eth[3] = s[0];
	eth[4] = s[1];
	eth[5] = s[2];
	return 0;
}

#endif /* KPR_LIB_FIB_H */
