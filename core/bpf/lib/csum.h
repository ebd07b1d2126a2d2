/* Incremental checksum updates (RFC 1624) for both contexts.
 *
 * tc (skb): an L4 checksum goes through bpf_l4_csum_replace, which keeps skb->csum right for
 * CHECKSUM_COMPLETE and leaves CHECKSUM_PARTIAL fields (only the pseudo header summed) correct,
 * except where the packet's state is known not to be offloaded (ctx_csum_state: NONE,
 * UNNECESSARY) or shows in the helper's result (kpr_csum_l4_diff2): those parts are patched
 * in place, as the helper would patch them.
 * XDP: frames carry complete checksums, so the field is patched in place.
 *
 * skb helpers invalidate packet pointers: callers re-derive them with ctx_ptr() afterwards.
 * Every function takes the offset of the checksum field and returns 0 or a negative error.
 */
#ifndef KPR_LIB_CSUM_H
#define KPR_LIB_CSUM_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/csum.h"
#endif

#include "lib/common.h"

#define KPR_CSUM_PSEUDO BPF_F_PSEUDO_HDR       // the changed field is in the L4 pseudo header (an address)
#define KPR_CSUM_UDP BPF_F_MARK_MANGLED_0      // UDP rules: 0 means "no checksum" and is kept; a result of 0 is sent as 0xffff

#define KPR_E_CSUM -1 // checksum field outside the packet

/* Ones-complement 32-bit add with end-around carry. In 64 bits, without a comparison: BPF has
 * no set-on-condition instruction, so `a + (a < b)` becomes a branch, and the verifier walks
 * both sides of every such branch of a program that patches many checksums (the XDP build's
 * ICMP-in stage went past its limit). The carry added back cannot carry again: the sum's low
 * half is at most 2^32 - 2 when its high half is 1. */
static __always_inline __u32 kpr_csum_add(__u32 a, __u32 b)
{
	__u64 s = (__u64)a + b;

	return (__u32)s + (__u32)(s >> 32);
}

// Fold a 32-bit partial sum into the 16-bit complemented checksum stored in headers.
static __always_inline __u16 kpr_csum_fold(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

// Patch the 16-bit checksum at `off` by a summed difference (~from + to over every changed field),
// through a packet pointer: XDP's every patch; on tc a field the kernel never folds into
// skb->csum (the IPv4 header checksum: bpf_l3_csum_replace does no more) and the L4 parts
// kpr_csum_l4_diff2 may patch in place.
static __always_inline int kpr_csum_patch_diff(kpr_ctx_t *ctx, __u32 off, __u32 diff, __u64 flags)
{
	__u16 *sum = ctx_ptr(ctx, off, sizeof(*sum));
	__u16 res;

	if (!sum)
		return KPR_E_CSUM;
	if ((flags & KPR_CSUM_UDP) && *sum == 0)
		return 0;
	res = kpr_csum_fold(kpr_csum_add(~(__u32)*sum, diff));
	if ((flags & KPR_CSUM_UDP) && res == 0)
		res = 0xffff;
	*sum = res;
	return 0;
}

// The same for a change of `from` to `to` (32-bit sums of the changed bytes).
static __always_inline int kpr_csum_patch(kpr_ctx_t *ctx, __u32 off, __u32 from_sum, __u32 to_sum, __u64 flags)
{
	return kpr_csum_patch_diff(ctx, off, kpr_csum_add(~from_sum, to_sum), flags);
}

#ifndef KPR_CSUM_IP_DIRECT
/* 1: tc patches the IPv4 header checksum (kpr_csum_l3_diff, kpr_csum_l3_replace4: every NAT,
 * DSR option and ICMP inner-header rewrite) through a packet pointer, as XDP does; 0: with
 * bpf_l3_csum_replace. The same result: that helper only patches the field (no
 * skb->csum change: the header's sum with its checksum stays 0 for CHECKSUM_COMPLETE, and
 * CHECKSUM_PARTIAL leaves only the L4 checksum to the device), and a helper call costs a
 * call into the kernel and the re-derived packet pointers after it. */
#define KPR_CSUM_IP_DIRECT 1
#endif

// The IPv4 header checksum at `off`, for changed fields summing to `diff` (kpr_csum_diff4()s added).
static __always_inline int kpr_csum_l3_diff(kpr_ctx_t *ctx, __u32 off, __u32 diff)
{
#if defined(KPR_CTX_SKB) && !KPR_CSUM_IP_DIRECT
	return bpf_l3_csum_replace(ctx, off, 0, diff, 0);
#else
	return kpr_csum_patch_diff(ctx, off, diff, 0);
#endif
}

#ifndef KPR_CSUM_L4_INFER
/* 1: tc patches an L4 checksum for changed pseudo-header fields and changed L4 fields
 * (kpr_csum_l4_diff2: NAT of addresses and ports) with one bpf_l4_csum_replace call, the
 * pseudo-header one, and the ports' part in place when that call's result shows the packet
 * is not CHECKSUM_PARTIAL; 0: two calls. */
#define KPR_CSUM_L4_INFER 1
#endif

/* The L4 checksum at `off` for changed pseudo-header fields summing to `pdiff` (addresses) and
 * changed L4 header fields summing to `diff` (ports); `flags` without KPR_CSUM_PSEUDO.
 * tc: the helper must patch the addresses' part (a CHECKSUM_COMPLETE packet's skb->csum changes
 * with it), and the ports' part only applies to a packet that is not CHECKSUM_PARTIAL (whose
 * field holds the pseudo header's sum, the device adding the rest), which struct __sk_buff
 * does not tell. The first call's result does: it leaves ~fold(~old + pdiff) in the field of a
 * packet that is not CHECKSUM_PARTIAL and fold(old + pdiff) in that of one that is
 * (inet_proto_csum_replace_by_diff), two values that differ unless pdiff sums to zero. So the
 * ports' part is patched in place, as the helper would, when the field shows the first; is left
 * out on the second; and goes through the helper when the field cannot tell (or is neither). */
static __always_inline int kpr_csum_l4_diff2(kpr_ctx_t *ctx, __u32 off, __u32 pdiff, __u32 diff, __u64 flags,
					     __u8 state)
{
#ifdef KPR_CTX_SKB
	// known not offloaded (ctx_csum_state): the field is the whole checksum and skb->csum unused
	if (state == CTX_CSUM_NONE || state == CTX_CSUM_UNNECESSARY)
		return kpr_csum_patch_diff(ctx, off, kpr_csum_add(pdiff, diff), flags);
#endif
#if defined(KPR_CTX_SKB) && KPR_CSUM_L4_INFER
	__u16 *sum = ctx_ptr(ctx, off, sizeof(*sum));
	__u16 old, whole, partial;

	if (!sum)
		return KPR_E_CSUM;
	old = *sum;
	if (bpf_l4_csum_replace(ctx, off, 0, pdiff, flags | KPR_CSUM_PSEUDO))
		return KPR_E_CSUM;
	if ((flags & KPR_CSUM_UDP) && old == 0)
		return 0; // UDP without a checksum: the helper kept the 0, and so do the ports
	whole = kpr_csum_fold(kpr_csum_add(~(__u32)old, pdiff));
	partial = ~kpr_csum_fold(kpr_csum_add(old, pdiff));
	if (flags & KPR_CSUM_UDP) { // the helper's mangled zero
		whole = whole ? whole : 0xffff;
		partial = partial ? partial : 0xffff;
	}
	sum = ctx_ptr(ctx, off, sizeof(*sum));
	if (!sum)
		return KPR_E_CSUM;
	if (whole != partial) {
		if (*sum == whole)
			return kpr_csum_patch_diff(ctx, off, diff, flags);
		if (*sum == partial)
			return 0;
	}
	return bpf_l4_csum_replace(ctx, off, 0, diff, flags);
#elif defined(KPR_CTX_SKB)
	if (bpf_l4_csum_replace(ctx, off, 0, pdiff, flags | KPR_CSUM_PSEUDO))
		return KPR_E_CSUM;
	return bpf_l4_csum_replace(ctx, off, 0, diff, flags);
#else
	return kpr_csum_patch_diff(ctx, off, kpr_csum_add(pdiff, diff), flags);
#endif
}

// The difference a 4-byte field's change from `from` to `to` makes to a checksum (summable).
static __always_inline __u32 kpr_csum_diff4(__u32 from, __u32 to)
{
	return kpr_csum_add(~from, to);
}

// The same for a 2-byte field.
static __always_inline __u32 kpr_csum_diff2(__u16 from, __u16 to)
{
	return kpr_csum_add((__u16)~from, to);
}

// The IPv4 header checksum at `off`, for a changed 4-byte field (an address). An inner
// header's too (ICMP errors): bpf_l3_csum_replace leaves skb->csum alone there as well.
static __always_inline int kpr_csum_l3_replace4(kpr_ctx_t *ctx, __u32 off, __be32 from, __be32 to)
{
	return kpr_csum_l3_diff(ctx, off, kpr_csum_diff4(from, to));
}

// The L4 checksum at `off`, for a changed 4-byte field (an IPv4 address: pass KPR_CSUM_PSEUDO).
static __always_inline int kpr_csum_l4_replace4(kpr_ctx_t *ctx, __u32 off, __be32 from, __be32 to, __u64 flags)
{
#ifdef KPR_CTX_SKB
	return bpf_l4_csum_replace(ctx, off, from, to, flags | 4);
#else
	return kpr_csum_patch(ctx, off, from, to, flags);
#endif
}

// The L4 checksum at `off`, for a changed 2-byte field (a port).
static __always_inline int kpr_csum_l4_replace2(kpr_ctx_t *ctx, __u32 off, __be16 from, __be16 to, __u64 flags)
{
#ifdef KPR_CTX_SKB
	return bpf_l4_csum_replace(ctx, off, from, to, flags | 2);
#else
	return kpr_csum_patch(ctx, off, from, to, flags);
#endif
}

// The L4 checksum at `off`, for a changed 16-byte field (an IPv6 address: pass KPR_CSUM_PSEUDO).
static __always_inline int kpr_csum_l4_replace16(kpr_ctx_t *ctx, __u32 off, const union kpr_addr *from,
						 const union kpr_addr *to, __u64 flags)
{
	__u32 f = 0, t = 0;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		f = kpr_csum_add(f, from->w[i]);
		t = kpr_csum_add(t, to->w[i]);
	}
#ifdef KPR_CTX_SKB
	// size 0 in flags: `to` is a precomputed difference (what bpf_csum_diff would return)
	return bpf_l4_csum_replace(ctx, off, 0, kpr_csum_add(~f, t), flags);
#else
	return kpr_csum_patch(ctx, off, f, t, flags);
#endif
}

#endif /* KPR_LIB_CSUM_H */
