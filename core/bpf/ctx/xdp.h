/* Packet context for XDP programs: struct xdp_md.
 *
 * Same API as ctx/skb.h (see there). Operations XDP lacks (ctx_redirect_peer,
 * ctx_redirect_neigh, ctx_adjust_room) are macros calling an undefined extern
 * (__kpr_xdp_has_no_...), so a program using one fails to build rather than silently
 * misbehaving. Where the hooks differ in what an operation can do (CTX_REDIRECT_NEEDS_XDP_XMIT,
 * CTX_RESOLVE_NEIGH_IS_STACK, CTX_REDIRECTS_EVERYWHERE, ctx_resolve_neigh, ctx_fits_mtu,
 * CTX_FIB_MTU), both define it, each with its own answer, so lib/ headers read the same for
 * both. No lib/ header is included: the answers are the hook's facts, lib/ derives the rest.
 */
#ifndef KPR_CTX_XDP_H
#define KPR_CTX_XDP_H

#ifdef KPR_CTX_SKB
#error "include only one of ctx/skb.h and ctx/xdp.h"
#endif
#define KPR_CTX_XDP 1 // this program runs on XDP frames

#include <uapi/linux/bpf.h>

#ifndef KPR_CTX_MAX_OFF
#define KPR_CTX_MAX_OFF 512 // largest header offset ctx_ptr() accepts; bounds variable offsets for the verifier
#endif

typedef struct xdp_md kpr_ctx_t; // the program's context type

#define CTX_PASS XDP_PASS         // let the kernel's stack have the frame
#define CTX_DROP XDP_DROP         // drop the frame
#define CTX_TX XDP_TX             // send the frame back out of the device it arrived on
#define CTX_REDIRECT XDP_REDIRECT // what a successful ctx_redirect() returns

extern int __kpr_xdp_has_no_redirect_peer(void);
extern int __kpr_xdp_has_no_redirect_neigh(void);
extern int __kpr_xdp_has_no_adjust_room(void);

/* data and data_end are loaded with one opaque instruction each, straight into a 64-bit
 * pointer. Written as (void *)(long)ctx->data, the compiler may keep the 32-bit field as an
 * integer: XDP rewrites are plain stores (no helper call forces a reload), so it merges loads
 * from different branches and spills, then zero-extends the merged value (r <<= 32; r >>= 32)
 * before use, and the verifier refuses shifts on packet pointers ("pointer arithmetic on
 * pkt_end prohibited"). The asm keeps every use a fresh load of a pointer. */
static __always_inline void *ctx_data(kpr_ctx_t *ctx)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p) : "r"(ctx), "i"(__builtin_offsetof(struct xdp_md, data)));
	return p;
}
static __always_inline void *ctx_data_end(kpr_ctx_t *ctx)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p) : "r"(ctx), "i"(__builtin_offsetof(struct xdp_md, data_end)));
	return p;
}
static __always_inline __u32 ctx_len(kpr_ctx_t *ctx) { return ctx->data_end - ctx->data; }
// The device the frame arrived on.
static __always_inline __u32 ctx_ifindex(kpr_ctx_t *ctx) { return ctx->ingress_ifindex; }
// XDP frames are single packets (ctx/skb.h: a GSO packet's segment size).
static __always_inline __u32 ctx_gso_size(kpr_ctx_t *ctx) { return 0; }

/* The FIB lookup (without tot_len) reports no MTU here: a route's MTU is never known, and
 * ctx_fits_mtu() takes any packet (ctx/skb.h: bpf_skb_fib_lookup reports the device's). */
#define CTX_FIB_MTU 0
static __always_inline int ctx_fits_mtu(kpr_ctx_t *ctx, __u32 l3_off, __u32 mtu) { return 1; }

// Frames carry complete checksums, patched in place (ctx/skb.h: the skb's checksum state).
#define CTX_CSUM_UNKNOWN 0
static __always_inline __u8 ctx_csum_state(kpr_ctx_t **ctx) { return CTX_CSUM_UNKNOWN; }

// Pointer to `size` bytes at `off` from the start of the frame, or NULL when beyond its end.
// Re-derive pointers with it after any helper that may move frame data.
static __always_inline void *ctx_ptr(kpr_ctx_t *ctx, __u32 off, __u32 size)
{
	void *data = ctx_data(ctx), *end = ctx_data_end(ctx);

	if (off > KPR_CTX_MAX_OFF)
		return (void *)0;
	/* The bound first, on the register the pointer is made from: clang may otherwise fold
	 * both tests into one exit and compare the pointer before the offset is bounded, and
	 * the verifier gives an unbounded pointer no range ("invalid access to packet"). */
	asm volatile("" : "+r"(off));
	if (data + off + size > end)
		return (void *)0;
	return data + off;
}

static __always_inline int ctx_tx(kpr_ctx_t *ctx) { return XDP_TX; }
static __always_inline int ctx_redirect(kpr_ctx_t *ctx, __u32 ifindex, __u32 flags)
{
	return bpf_redirect(ifindex, flags);
}
/* 1: XDP_REDIRECT delivers only to a device with an XDP transmit path (ndo_xdp_xmit), which
 * not every device has (ctx/skb.h: 0, any device). Which devices those are is the user's
 * knowledge of its devices (lib/nodeport.h: kpr_np_redirect_reaches). */
#define CTX_REDIRECT_NEEDS_XDP_XMIT 1
// No neighbour helper here: the stack routes the frame and resolves the next hop (ctx/skb.h).
static __always_inline int ctx_resolve_neigh(kpr_ctx_t *ctx, __u32 ifindex) { return CTX_PASS; }
#define CTX_RESOLVE_NEIGH_IS_STACK 1 // ctx_resolve_neigh() hands the frame to the stack (ctx/skb.h: 0)
/* 0: a frame leaves by ctx_redirect() only to devices with an XDP transmit path, its next hop's
 * MAC known; anything else is the stack's, so a stage whose translation the stack cannot take (a
 * source-NATed frame is a martian there) asks before translating (ctx/skb.h: 1).
 * Derived, the same line in both ctx headers, so it cannot disagree with the two facts. */
#define CTX_REDIRECTS_EVERYWHERE (!CTX_REDIRECT_NEEDS_XDP_XMIT && !CTX_RESOLVE_NEIGH_IS_STACK)
#define ctx_redirect_peer(ctx, ifindex, flags) \
	((void)(ctx), (void)(ifindex), (void)(flags), __kpr_xdp_has_no_redirect_peer())
#define ctx_redirect_neigh(ctx, ifindex) ((void)(ctx), (void)(ifindex), __kpr_xdp_has_no_redirect_neigh())
#define ctx_redirect_neigh_nh(ctx, ifindex, nh) \
	((void)(ctx), (void)(ifindex), (void)(nh), __kpr_xdp_has_no_redirect_neigh())
#define ctx_adjust_room(ctx, len_diff, mode, flags) \
	((void)(ctx), (void)(len_diff), (void)(mode), (void)(flags), __kpr_xdp_has_no_adjust_room())
// Grow (negative delta) or shrink the frame at its head, e.g. to push an encapsulation header.
static __always_inline int ctx_adjust_head(kpr_ctx_t *ctx, int delta)
{
	return bpf_xdp_adjust_head(ctx, delta);
}
// Make the frame exactly `len` bytes long at its end (see ctx/skb.h).
static __always_inline int ctx_set_len(kpr_ctx_t *ctx, __u32 len)
{
	return bpf_xdp_adjust_tail(ctx, (int)len - (int)ctx_len(ctx));
}
static __always_inline int ctx_load_bytes(kpr_ctx_t *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_xdp_load_bytes(ctx, off, to, len);
}
static __always_inline int ctx_store_bytes(kpr_ctx_t *ctx, __u32 off, const void *from, __u32 len)
{
	return bpf_xdp_store_bytes(ctx, off, (void *)from, len);
}

#endif /* KPR_CTX_XDP_H */
