/* Socket-level service load balancing: the cgroup hooks of the socklb plugin.
 *
 * connect and UDP sendmsg rewrite a service address to a backend before the kernel routes
 * anything, so established flows cost nothing per packet; recvmsg and getpeername rewrite
 * the backend back to what the application dialled; post_bind keeps host sockets off
 * NodePort/ExternalIP/LoadBalancer frontends. The decisions live in lib/sock.h.
 *
 * Tunables come from the plugin as -D flags (see lib/sock.h and lib/maps.h).
 */
#include "lib/sock.h"

#define KPR_SOCK_ALLOW 1  // cgroup hook verdict: go on
#define KPR_SOCK_REFUSE 0 // cgroup hook verdict: fail the call (EPERM unless bpf_set_retval said otherwise)

static __always_inline int kpr_sock_refuse(int err)
{
#if KPR_SOCK_HAVE_SET_RETVAL
	bpf_set_retval(-err);
#endif
	return KPR_SOCK_REFUSE;
}

// Fill the request shared by both families' connect/sendmsg hooks.
static __always_inline void kpr_sock_req_init(struct kpr_sock_req *req, struct bpf_sock_addr *ctx, __u32 hook)
{
	req->dport = (__be16)ctx->user_port;
	req->proto = (__u8)ctx->protocol;
	req->family = kpr_addr_is_v4(&req->daddr) ? KPR_FAMILY_V4 : KPR_FAMILY_V6;
	req->hook = hook;
	req->netns = bpf_get_netns_cookie(ctx);
	req->cookie = bpf_get_socket_cookie(ctx);
}

static __always_inline int kpr_sock4_fwd(struct bpf_sock_addr *ctx, __u32 hook)
{
	struct kpr_sock_req req = {};
	struct kpr_sock_res res = {};
	int verdict;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return KPR_SOCK_ALLOW;
	kpr_addr_set_v4(&req.daddr, ctx->user_ip4);
	kpr_sock_req_init(&req, ctx, hook);
	verdict = kpr_sock_xlate(&req, &res);
	if (verdict == KPR_SOCK_REJECT)
		return kpr_sock_refuse(KPR_SOCK_ECONNREFUSED);
	if (verdict != KPR_SOCK_XLATE)
		return KPR_SOCK_ALLOW;
	kpr_sock_revnat_remember(&req, &res);
	ctx->user_ip4 = res.addr.w[3];
	ctx->user_port = (__u32)res.port;
	return KPR_SOCK_ALLOW;
}

static __always_inline int kpr_sock6_fwd(struct bpf_sock_addr *ctx, __u32 hook)
{
	struct kpr_sock_req req = {};
	struct kpr_sock_res res = {};
	int verdict;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return KPR_SOCK_ALLOW;
	// A dual-stack socket dialling ::ffff:a.b.c.d is already in the maps' v4-mapped form.
	req.daddr.w[0] = ctx->user_ip6[0];
	req.daddr.w[1] = ctx->user_ip6[1];
	req.daddr.w[2] = ctx->user_ip6[2];
	req.daddr.w[3] = ctx->user_ip6[3];
	kpr_sock_req_init(&req, ctx, hook);
	verdict = kpr_sock_xlate(&req, &res);
	if (verdict == KPR_SOCK_REJECT)
		return kpr_sock_refuse(KPR_SOCK_ECONNREFUSED);
	if (verdict != KPR_SOCK_XLATE)
		return KPR_SOCK_ALLOW;
	kpr_sock_revnat_remember(&req, &res);
	ctx->user_ip6[0] = res.addr.w[0];
	ctx->user_ip6[1] = res.addr.w[1];
	ctx->user_ip6[2] = res.addr.w[2];
	ctx->user_ip6[3] = res.addr.w[3];
	ctx->user_port = (__u32)res.port;
	return KPR_SOCK_ALLOW;
}

static __always_inline void kpr_sock4_rev(struct bpf_sock_addr *ctx)
{
	union kpr_addr peer;
	struct kpr_sock_revnat_val *v;

	kpr_addr_set_v4(&peer, ctx->user_ip4);
	v = kpr_sock_revnat_find(bpf_get_socket_cookie(ctx), &peer, (__be16)ctx->user_port);
	if (!v || !kpr_addr_is_v4(&v->addr))
		return;
	ctx->user_ip4 = v->addr.w[3];
	ctx->user_port = (__u32)v->port;
}

static __always_inline void kpr_sock6_rev(struct bpf_sock_addr *ctx)
{
	union kpr_addr peer;
	struct kpr_sock_revnat_val *v;

	peer.w[0] = ctx->user_ip6[0];
	peer.w[1] = ctx->user_ip6[1];
	peer.w[2] = ctx->user_ip6[2];
	peer.w[3] = ctx->user_ip6[3];
	v = kpr_sock_revnat_find(bpf_get_socket_cookie(ctx), &peer, (__be16)ctx->user_port);
	if (!v)
		return;
	ctx->user_ip6[0] = v->addr.w[0];
	ctx->user_ip6[1] = v->addr.w[1];
	ctx->user_ip6[2] = v->addr.w[2];
	ctx->user_ip6[3] = v->addr.w[3];
	ctx->user_port = (__u32)v->port;
}

static __always_inline int kpr_sock_post_bind(struct bpf_sock *ctx, union kpr_addr *addr)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return KPR_SOCK_ALLOW;
	// Pods have addresses of their own; only the host's sockets can steal a node's frontend.
	if (!kpr_sock_in_hostns(bpf_get_netns_cookie(ctx)))
		return KPR_SOCK_ALLOW;
	// bpf_sock.src_port is in host order, unlike every other port here.
	if (!kpr_sock_bind_taken(addr, kpr_htons(ctx->src_port), (__u8)ctx->protocol))
		return KPR_SOCK_ALLOW;
	kpr_sock_count(KPR_SOCK_ST_BIND_REFUSED);
	kpr_sock_mon_bind(bpf_get_socket_cookie(ctx), addr, kpr_htons(ctx->src_port), (__u8)ctx->protocol);
	return kpr_sock_refuse(KPR_SOCK_EADDRINUSE);
}

/* --- the programs (names: 15 characters at most, the kernel's limit) ------------------ */

int sklb4_connect(struct bpf_sock_addr *ctx) { return kpr_sock4_fwd(ctx, KPR_SOCK_HOOK_CONNECT); }
int sklb6_connect(struct bpf_sock_addr *ctx) { return kpr_sock6_fwd(ctx, KPR_SOCK_HOOK_CONNECT); }
int sklb4_sendmsg(struct bpf_sock_addr *ctx) { return kpr_sock4_fwd(ctx, KPR_SOCK_HOOK_SENDMSG); }
int sklb6_sendmsg(struct bpf_sock_addr *ctx) { return kpr_sock6_fwd(ctx, KPR_SOCK_HOOK_SENDMSG); }

// recvmsg and getpeername must return 1: they may only rewrite the address.
int sklb4_recvmsg(struct bpf_sock_addr *ctx) { kpr_sock4_rev(ctx); return KPR_SOCK_ALLOW; }
int sklb6_recvmsg(struct bpf_sock_addr *ctx) { kpr_sock6_rev(ctx); return KPR_SOCK_ALLOW; }
int sklb4_peername(struct bpf_sock_addr *ctx) { kpr_sock4_rev(ctx); return KPR_SOCK_ALLOW; }
int sklb6_peername(struct bpf_sock_addr *ctx) { kpr_sock6_rev(ctx); return KPR_SOCK_ALLOW; }

int sklb4_postbind(struct bpf_sock *ctx)
{
	union kpr_addr a;

	kpr_addr_set_v4(&a, ctx->src_ip4);
	return kpr_sock_post_bind(ctx, &a);
}

int sklb6_postbind(struct bpf_sock *ctx)
{
	union kpr_addr a;

	a.w[0] = ctx->src_ip6[0];
	a.w[1] = ctx->src_ip6[1];
	a.w[2] = ctx->src_ip6[2];
	a.w[3] = ctx->src_ip6[3];
	return kpr_sock_post_bind(ctx, &a);
}
