/* Packet context for tc (clsact) programs: struct __sk_buff.
 *
 * ctx/skb.h and ctx/xdp.h define the same API so lib/ headers and plugin code compile for
 * both hooks. An operation one context lacks is a macro calling an undefined extern named
 * after the problem (__kpr_skb_has_no_...): using it fails the build (bcc: "cannot call
 * non-static helper function", pointing at the name) instead of silently doing nothing.
 * They are macros, not inline functions, because bcc rejects such a call even in an unused
 * function. So lib/ code may not name such an operation even in a branch the context never
 * takes: a difference between the hooks is an operation both define, each with its own answer
 * (CTX_REDIRECT_NEEDS_XDP_XMIT, CTX_RESOLVE_NEIGH_IS_STACK, CTX_REDIRECTS_EVERYWHERE,
 * ctx_resolve_neigh, ctx_fits_mtu, CTX_FIB_MTU), and an operation one hook lacks is used
 * only behind a build switch that defaults off on the other (lib/nodeport.h: KPR_NP_PEER,
 * KPR_NP_DSR). The answers are the hook's facts only: what a lib/ user makes of them (which
 * of its devices a redirect reaches) is stated in lib/, and no ctx header includes lib/.
 *
 * Include exactly one ctx header, before any lib/ header that touches packets.
 */
#ifndef KPR_CTX_SKB_H
#define KPR_CTX_SKB_H

#ifdef KPR_CTX_XDP
#error "include only one of ctx/skb.h and ctx/xdp.h"
#endif
#define KPR_CTX_SKB 1 // this program runs on socket buffers (tc)

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#ifndef KPR_CTX_MAX_OFF
#define KPR_CTX_MAX_OFF 512 // largest header offset ctx_ptr() accepts; bounds variable offsets for the verifier
#endif

typedef struct __sk_buff kpr_ctx_t; // the program's context type

#define CTX_PASS TC_ACT_OK             // let the kernel continue with the packet
#define CTX_DROP TC_ACT_SHOT           // drop the packet
#define CTX_REDIRECT TC_ACT_REDIRECT   // what a successful ctx_redirect*() returns

extern int __kpr_skb_has_no_tx_verdict(void);
extern int __kpr_skb_has_no_adjust_head(void);

// tc has no XDP_TX; ctx_tx() below bounces the packet out of its device instead.
#define CTX_TX (__kpr_skb_has_no_tx_verdict())

/* data and data_end loaded with one opaque instruction each, from the context register itself
 * (as ctx/xdp.h does, see there): written as ctx->data_end, clang may keep the field's address
 * (ctx + 80) in a register and load through it later, which the verifier refuses ("dereference
 * of modified ctx ptr"). */
static __always_inline void *ctx_data(kpr_ctx_t *ctx)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p) : "r"(ctx), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return p;
}
static __always_inline void *ctx_data_end(kpr_ctx_t *ctx)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p) : "r"(ctx), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return p;
}
static __always_inline __u32 ctx_len(kpr_ctx_t *ctx) { return ctx->len; }
// The device the program runs on (ingress or egress side).
static __always_inline __u32 ctx_ifindex(kpr_ctx_t *ctx) { return ctx->ifindex; }
// The segment size of a GSO packet (the kernel splits it after the program), 0 for one packet.
static __always_inline __u32 ctx_gso_size(kpr_ctx_t *ctx) { return ctx->gso_size; }

/* A FIB lookup without tot_len reports the egress device's MTU (bpf_skb_fib_lookup): a route's
 * MTU is known (ctx/xdp.h: not). ctx_fits_mtu(): whether the packet, its L3 header at l3_off,
 * fits a route of MTU `mtu` (0: not known, no). A GSO packet's segments are the kernel's to
 * fit; the slack is the one a VLAN tag gets in the FIB lookup's own check (is_skb_forwardable).
 * (the GSO size, in the skb's shared info, a line of its own, only for a packet too long) */
#define CTX_FIB_MTU 1
static __always_inline int ctx_fits_mtu(kpr_ctx_t *ctx, __u32 l3_off, __u32 mtu)
{
	return mtu && (ctx_len(ctx) - l3_off <= mtu + 4 || ctx_gso_size(ctx));
}

/* The skb's checksum state as CTX_CSUM_* (ip_summed + 1), 0 when the build does not know where
 * ip_summed is (the loader passes KPR_SKB_KERN_CTX_FN and KPR_SKB_IP_SUMMED_* from the kernel's
 * BTF: kpr.bpf.kernctx). struct __sk_buff has no such field: the kfunc bpf_cast_to_kern_ctx
 * (which the verifier turns into a register move) gives the struct sk_buff to read it from.
 * The call is written as its instruction (bcc cannot call kfuncs), without the clobbers a call
 * has (bcc's front end parses asm for the host, which has no registers r0..r5), and the
 * verifier takes r1-r5 away after it: so the context goes through the stack around it (*ctx
 * is the caller's variable, reloaded), and it belongs first in a program, where nothing else is
 * live (a value the compiler kept in r1-r5 fails the load, "!read_ok"; the loader then builds
 * without the read, kpr.nodeport.datapath). r0 the asm cannot name either: a value kept there
 * would be overwritten without a word (the verifier takes the pointer for it), which the first
 * place keeps from happening (nothing is computed before it), and kpr.bpf.loader refuses a
 * build that reads r0 after the call all the same (kernctx.r0_kept_across_call; the same
 * fallback then). */
#define CTX_CSUM_UNKNOWN 0
#define CTX_CSUM_NONE 1        // CHECKSUM_NONE + 1
#define CTX_CSUM_UNNECESSARY 2 // CHECKSUM_UNNECESSARY + 1
#define CTX_CSUM_COMPLETE 3    // CHECKSUM_COMPLETE + 1
#define CTX_CSUM_PARTIAL 4     // CHECKSUM_PARTIAL + 1
static __always_inline __u8 ctx_csum_state(kpr_ctx_t **ctx)
{
#if defined(KPR_SKB_KERN_CTX_FN) && defined(KPR_SKB_IP_SUMMED_OFF) && defined(KPR_SKB_IP_SUMMED_SHIFT)
	volatile __u64 keep = (__u64)*ctx;
	__u64 v = keep;

	asm volatile("r1 = %[v]\n\t"
		     ".byte 0x85, 0x20, 0x00, 0x00\n\t" // call, src_reg BPF_PSEUDO_KFUNC_CALL, off 0 (vmlinux)
		     ".long %[fn]\n\t"                  // imm: the kfunc's BTF id
		     "%[v] = *(u8 *)(r0 + %[off])"
		     : [v] "+r"(v)
		     : [fn] "i"(KPR_SKB_KERN_CTX_FN), [off] "i"(KPR_SKB_IP_SUMMED_OFF));
	*ctx = (kpr_ctx_t *)keep;
	return ((v >> KPR_SKB_IP_SUMMED_SHIFT) & 3) + 1;
#else
	return CTX_CSUM_UNKNOWN;
#endif
}

// Pointer to `size` bytes at `off` from the start of the packet, or NULL when they are not in
// the linear data. Re-derive pointers with it after any helper that may move packet data.
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

// Send the packet back out of the device it is on: the tc counterpart of XDP_TX.
static __always_inline int ctx_tx(kpr_ctx_t *ctx) { return bpf_redirect(ctx->ifindex, 0); }
static __always_inline int ctx_redirect(kpr_ctx_t *ctx, __u32 ifindex, __u32 flags)
{
	return bpf_redirect(ifindex, flags);
}
// Into the peer of a veth/netkit device, skipping the backlog queue (pod ingress fast path).
static __always_inline int ctx_redirect_peer(kpr_ctx_t *ctx, __u32 ifindex, __u32 flags)
{
	return bpf_redirect_peer(ifindex, flags);
}
// 0: ctx_redirect() delivers to any device (ctx/xdp.h: 1, only to one with an XDP transmit path).
#define CTX_REDIRECT_NEEDS_XDP_XMIT 0
// Out of a device with the kernel's neighbour resolution filling in the MACs.
static __always_inline int ctx_redirect_neigh(kpr_ctx_t *ctx, __u32 ifindex)
{
	// bcc 0.26 declares this helper without its `plen` argument; call it with the kernel's four
	return ((long (*)(__u32, void *, int, __u64))BPF_FUNC_redirect_neigh)(ifindex, (void *)0, 0, 0);
}
// Hand the packet to the kernel's neighbour resolution for `ifindex` (a next hop whose MAC is
// not known, or a device no MAC rewrite suits): here the neighbour helper (ctx/xdp.h: the stack).
static __always_inline int ctx_resolve_neigh(kpr_ctx_t *ctx, __u32 ifindex) { return ctx_redirect_neigh(ctx, ifindex); }
#define CTX_RESOLVE_NEIGH_IS_STACK 0 // ctx_resolve_neigh() sends the packet itself (ctx/xdp.h: 1)
/* 1: the program sends a packet to every device a FIB lookup names, its next hop's MAC known
 * (ctx_redirect) or not (ctx_resolve_neigh): it can decide after translating (ctx/xdp.h: 0).
 * Derived, the same line in both ctx headers, so it cannot disagree with the two facts. */
#define CTX_REDIRECTS_EVERYWHERE (!CTX_REDIRECT_NEEDS_XDP_XMIT && !CTX_RESOLVE_NEIGH_IS_STACK)
// The same to a known next hop (a FIB lookup's result): the kernel skips its own route lookup.
static __always_inline int ctx_redirect_neigh_nh(kpr_ctx_t *ctx, __u32 ifindex, struct bpf_redir_neigh *nh)
{
	return ((long (*)(__u32, void *, int, __u64))BPF_FUNC_redirect_neigh)(ifindex, nh, sizeof(*nh), 0);
}
static __always_inline int ctx_adjust_room(kpr_ctx_t *ctx, __s32 len_diff, __u32 mode, __u64 flags)
{
	return bpf_skb_adjust_room(ctx, len_diff, mode, flags);
}
#define ctx_adjust_head(ctx, delta) ((void)(ctx), (void)(delta), __kpr_skb_has_no_adjust_head())
// Make the packet exactly `len` bytes long, cutting or zero-filling at its end (a reply
// built in place that is longer or shorter than the request).
static __always_inline int ctx_set_len(kpr_ctx_t *ctx, __u32 len)
{
	return bpf_skb_change_tail(ctx, len, 0);
}
static __always_inline int ctx_load_bytes(kpr_ctx_t *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_skb_load_bytes(ctx, off, to, len);
}
static __always_inline int ctx_store_bytes(kpr_ctx_t *ctx, __u32 off, const void *from, __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, (void *)from, len, 0);
}

#endif /* KPR_CTX_SKB_H */
