/* Socket-level service load balancing: the decision the cgroup connect/sendmsg hooks take,
 * the per-socket reverse NAT that recvmsg/getpeername undo it with, and bind protection.
 *
 * Context-free: the socket programs (plugins/socklb/bpf/socklb.c) fill a struct kpr_sock_req
 * from their bpf_sock_addr, and a test program can fill the same struct from packet bytes and
 * run the very same kpr_sock_xlate() under BPF_PROG_TEST_RUN (cgroup sock_addr programs have
 * no test_run). Needs lib/lb.h (service lookup and backend selection).
 *
 * Which sockets count as the host's: the one whose netns cookie is KPR_SOCK_HOST_NETNS, the
 * namespace the agent runs in. Only the host may reach NodePorts on loopback, is subject to
 * bind protection, and (hostNamespaceOnly) is translated at all.
 */
#ifndef KPR_LIB_SOCK_H
#define KPR_LIB_SOCK_H

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/monitor.h"

/* --- tunables ---------------------------------------------------------------------- */

#ifndef KPR_SOCK_HOST_NETNS
#define KPR_SOCK_HOST_NETNS 0ULL // netns cookie of the host (the agent's namespace); 0: no socket is the host's
#endif
#ifndef KPR_SOCK_HOST_ONLY
#define KPR_SOCK_HOST_ONLY 0 // 1: translate host-namespace sockets only, leaving pods to the per-packet path (meshes)
#endif
#ifndef KPR_SOCK_REVNAT_MAX
#define KPR_SOCK_REVNAT_MAX 262144 // translated (socket, backend) pairs remembered for recvmsg/getpeername; LRU
#endif
#ifndef KPR_SOCK_HOSTADDR_MAX
#define KPR_SOCK_HOSTADDR_MAX 1024 // node addresses (NodePort via any node address, local ExternalIPs)
#endif
#ifndef KPR_SOCK_HAVE_SET_RETVAL
#define KPR_SOCK_HAVE_SET_RETVAL 1 // bpf_set_retval (5.18+): refusals carry ECONNREFUSED/EADDRINUSE, not EPERM
#endif

#define KPR_SOCK_ECONNREFUSED 111 // errno a service without backends answers connect/sendmsg with
#define KPR_SOCK_EADDRINUSE 98    // errno bind protection answers bind with

/* --- verdicts and counters ------------------------------------------------------------ */

#define KPR_SOCK_PASS 0   // not a service (or not ours to translate): leave the address alone
#define KPR_SOCK_XLATE 1  // rewrite to the backend in struct kpr_sock_res
#define KPR_SOCK_REJECT 2 // a service without a backend: refuse the call

// Counters in kpr_sock_stats (kpr.plugins.socklb.plugin.STATS mirrors the order).
#define KPR_SOCK_ST_CONNECT 0         // connect() translated to a backend
#define KPR_SOCK_ST_SENDMSG 1         // unconnected UDP sendmsg translated
#define KPR_SOCK_ST_REVERSE 2         // recvmsg/getpeername shown the service address
#define KPR_SOCK_ST_NO_BACKEND 3      // refused: the service has no backend
#define KPR_SOCK_ST_BIND_REFUSED 4    // bind() refused by bind protection
#define KPR_SOCK_ST_SKIP_NOT_HOST 5   // hostNamespaceOnly: a pod's socket left alone
#define KPR_SOCK_ST_SKIP_EXTERNAL 6   // a pod dialled a non-local ExternalIP: not translated (CVE-2020-8554)
#define KPR_SOCK_ST_SKIP_SRCRANGE 7   // loadBalancerSourceRanges need the packet's source: left to the per-packet path
#define KPR_SOCK_ST_REVNAT_FAIL 8     // reverse-NAT entry could not be written (translation still done)
#define KPR_SOCK_ST_REVNAT_STALE 9    // reverse-NAT entry of a frontend that is gone: dropped
#define KPR_SOCK_ST_FAMILY 10         // backend family differs from the socket's: left alone
#define KPR_SOCK_ST_MAX 11

#define KPR_SOCK_HOOK_CONNECT 0 // struct kpr_sock_req.hook
#define KPR_SOCK_HOOK_SENDMSG 1

/* --- structs ------------------------------------------------------------------------- */

// What a connect/sendmsg hook asks: where the socket wants to go, and whose socket it is.
struct kpr_sock_req {
	union kpr_addr daddr; // address dialled; IPv4 (also ::ffff:a.b.c.d from a dual-stack socket) v4-mapped
	__be16 dport;         // port dialled, network order
	__u8 proto;           // IPPROTO_TCP / IPPROTO_UDP
	__u8 family;          // KPR_FAMILY_V4 when daddr is v4-mapped, else KPR_FAMILY_V6
	__u32 hook;           // KPR_SOCK_HOOK_*
	__u64 netns;          // the socket's netns cookie
	__u64 cookie;         // the socket's cookie
};

// The answer when the verdict is KPR_SOCK_XLATE.
struct kpr_sock_res {
	union kpr_addr addr; // backend address (v4-mapped for IPv4)
	__be16 port;         // backend port, network order
	__u16 pad;           // zero
	__u32 backend_id;    // backend id (kpr_lb_backend())
	__u32 rev_nat;       // the frontend's rev-NAT index
	__u32 svc_flags;     // KPR_SVC_F_* of the service entry used
};

// kpr_sock_revnat key: one socket and the backend it was sent to.
struct kpr_sock_revnat_key {
	__u64 cookie;        // socket cookie
	union kpr_addr addr; // backend address
	__be16 port;         // backend port, network order
	__u16 pad;           // zero
	__u32 pad2;          // zero
};

// kpr_sock_revnat value: what the application dialled.
struct kpr_sock_revnat_val {
	union kpr_addr addr; // frontend address as dialled (a node address or loopback for NodePort)
	__be16 port;         // frontend port, network order
	__u8 proto;          // IPPROTO_*
	__u8 pad;            // zero
	__u32 rev_nat;       // rev-NAT index at translation time: the entry is stale once kpr_revnat disagrees
	__u64 netns;         // the socket's netns cookie, so the agent can find it to terminate it
};

_Static_assert(sizeof(struct kpr_sock_req) == 40, "kpr_sock_req layout");
_Static_assert(sizeof(struct kpr_sock_res) == 32, "kpr_sock_res layout");
_Static_assert(sizeof(struct kpr_sock_revnat_key) == 32, "kpr_sock_revnat_key layout");
_Static_assert(sizeof(struct kpr_sock_revnat_val) == 32, "kpr_sock_revnat_val layout");

/* --- maps (pinned next to the service maps, so they outlive an agent restart) -------- */

// (socket cookie, backend) -> dialled frontend; LRU: closed sockets age out without a sweeper.
BPF_TABLE_PINNED("lru_hash", struct kpr_sock_revnat_key, struct kpr_sock_revnat_val, kpr_sock_revnat,
		 KPR_SOCK_REVNAT_MAX, KPR_PIN(kpr_sock_revnat));
// This node's addresses (v4-mapped for IPv4) -> 1; written by the socklb plugin from the node facts.
BPF_TABLE_PINNED("hash", union kpr_addr, __u32, kpr_sock_hostaddr, KPR_SOCK_HOSTADDR_MAX, KPR_PIN(kpr_sock_hostaddr));
// Per-CPU counters, KPR_SOCK_ST_*.
BPF_TABLE_PINNED("percpu_array", __u32, __u64, kpr_sock_stats, KPR_SOCK_ST_MAX, KPR_PIN(kpr_sock_stats));

/* --- helpers ------------------------------------------------------------------------- */

static __always_inline void kpr_sock_count(__u32 idx)
{
	__u64 *v = kpr_sock_stats.lookup(&idx);

	if (v)
		*v += 1;
}

static __always_inline int kpr_sock_in_hostns(__u64 netns)
{
	return KPR_SOCK_HOST_NETNS != 0 && netns == KPR_SOCK_HOST_NETNS;
}

// 127.0.0.0/8 (v4-mapped) or ::1.
static __always_inline int kpr_sock_is_loopback(const union kpr_addr *a)
{
	if (kpr_addr_is_v4(a))
		return (kpr_ntohl(a->w[3]) >> 24) == 127;
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == kpr_htonl(1);
}

// The family's any-address (0.0.0.0 v4-mapped, or ::).
static __always_inline int kpr_sock_is_any(const union kpr_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[3] == 0 && (a->w[2] == 0 || a->w[2] == kpr_htonl(0x0000ffff));
}

static __always_inline int kpr_sock_is_hostaddr(const union kpr_addr *a)
{
	return kpr_sock_hostaddr.lookup((union kpr_addr *)a) != (void *)0;
}

// A `kpr monitor` event for a socket's translation or refusal (nothing unless someone listens).
static __always_inline void kpr_sock_mon(const struct kpr_sock_req *req, __u8 type, __u8 reason, __u32 rev_nat,
					 __u32 id, const struct kpr_backend *be)
{
#if KPR_MON
	struct kpr_mon_event *e = kpr_mon_begin(type, KPR_MON_HOOK_SOCKET, reason);

	if (!e)
		return;
	e->cookie = req->cookie;
	e->daddr = req->daddr;
	e->dport = req->dport;
	e->proto = req->proto;
	e->rev_nat = rev_nat;
	e->backend_id = id;
	if (be) {
		e->baddr = be->addr;
		e->bport = be->port;
	}
	kpr_mon_submit(e);
#endif
}

// A `kpr monitor` event for a bind() refused by bind protection: the address and port asked for.
static __always_inline void kpr_sock_mon_bind(__u64 cookie, const union kpr_addr *addr, __be16 port, __u8 proto)
{
#if KPR_MON
	struct kpr_mon_event *e = kpr_mon_begin(KPR_MON_T_REFUSE, KPR_MON_HOOK_SOCKET, KPR_MON_R_BIND_REFUSED);

	if (!e)
		return;
	e->cookie = cookie;
	e->daddr = *addr;
	e->dport = port;
	e->proto = proto;
	kpr_mon_submit(e);
#endif
}

/* The decision of a connect/sendmsg hook. Returns KPR_SOCK_PASS, KPR_SOCK_XLATE (res filled
 * in) or KPR_SOCK_REJECT. Selection follows lib/lb.h: in-cluster scope (internalTrafficPolicy),
 * affinity keyed by the socket's netns (its address is not known yet at connect()), then
 * Maglev or random; terminating backends sit outside the selectable slots. */
static __always_inline int kpr_sock_xlate(const struct kpr_sock_req *req, struct kpr_sock_res *res)
{
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_affinity_key aff;
	struct kpr_backend *be;
	struct kpr_tuple t = {};
	__u32 lflags = KPR_LB_FROM_CLUSTER, id;
	int hostns = kpr_sock_in_hostns(req->netns);
	int local;

	if (KPR_SOCK_HOST_ONLY && !hostns) {
		kpr_sock_count(KPR_SOCK_ST_SKIP_NOT_HOST);
		return KPR_SOCK_PASS;
	}
	// NodePorts answer on every node address, and for the host on loopback: both reach the
	// address-0 entry. A pod's loopback is its own, so it does not.
	local = kpr_sock_is_hostaddr(&req->daddr);
	if (local || (hostns && kpr_sock_is_loopback(&req->daddr)))
		lflags |= KPR_LB_NODE_ADDR;

	t.daddr = req->daddr;
	t.dport = req->dport;
	t.proto = req->proto;
	t.family = req->family;
	// No source address or port exists yet: the netns and the socket stand in for them, so
	// Maglev spreads sockets (not packets) and a socket keeps one answer.
	t.saddr.w[0] = (__u32)req->netns;
	t.saddr.w[1] = (__u32)(req->netns >> 32);
	t.saddr.w[2] = (__u32)req->cookie;
	t.saddr.w[3] = (__u32)(req->cookie >> 32);

	svc = kpr_lb_lookup(&key, &t, lflags);
	if (!svc)
		return KPR_SOCK_PASS;
	// CVE-2020-8554: anyone who can create a Service could otherwise capture a pod's traffic
	// to any address by naming it as an ExternalIP; only node-local ones are served here.
	if ((svc->flags & KPR_SVC_F_EXTERNAL_IP) && !hostns && !local) {
		kpr_sock_count(KPR_SOCK_ST_SKIP_EXTERNAL);
		return KPR_SOCK_PASS;
	}
	// The client's address is chosen by routing after connect(): only the packet path can check it.
	if (svc->flags & KPR_SVC_F_SOURCE_RANGES) {
		kpr_sock_count(KPR_SOCK_ST_SKIP_SRCRANGE);
		return KPR_SOCK_PASS;
	}
	kpr_lb_affinity_key_netns(&aff, svc, req->netns);
	be = kpr_lb_pick(&key, svc, &t, &aff, &id);
	if (!be) {
		kpr_sock_count(KPR_SOCK_ST_NO_BACKEND);
		kpr_sock_mon(req, KPR_MON_T_REFUSE, KPR_MON_R_NO_BACKEND, svc->rev_nat, 0, (void *)0);
		return KPR_SOCK_REJECT;
	}
	if (kpr_addr_is_v4(&be->addr) != (req->family == KPR_FAMILY_V4)) {
		kpr_sock_count(KPR_SOCK_ST_FAMILY);
		return KPR_SOCK_PASS;
	}
	res->addr = be->addr;
	res->port = be->port;
	res->pad = 0;
	res->backend_id = id;
	res->rev_nat = svc->rev_nat;
	res->svc_flags = svc->flags;
	kpr_sock_count(req->hook == KPR_SOCK_HOOK_SENDMSG ? KPR_SOCK_ST_SENDMSG : KPR_SOCK_ST_CONNECT);
	kpr_sock_mon(req, KPR_MON_T_NEW, KPR_MON_NEW_SOCKET, svc->rev_nat, id, be);
	return KPR_SOCK_XLATE;
}

// Remember what the socket dialled, for recvmsg/getpeername. Skips the write when unchanged
// (unconnected UDP sends through here on every datagram).
static __always_inline void kpr_sock_revnat_remember(const struct kpr_sock_req *req, const struct kpr_sock_res *res)
{
	struct kpr_sock_revnat_key k = {};
	struct kpr_sock_revnat_val v = {}, *old;

	k.cookie = req->cookie;
	k.addr = res->addr;
	k.port = res->port;
	v.addr = req->daddr;
	v.port = req->dport;
	v.proto = req->proto;
	v.rev_nat = res->rev_nat;
	v.netns = req->netns;
	old = kpr_sock_revnat.lookup(&k);
	if (old && kpr_addr_eq(&old->addr, &v.addr) && old->port == v.port && old->rev_nat == v.rev_nat)
		return;
	if (kpr_sock_revnat.update(&k, &v) != 0)
		kpr_sock_count(KPR_SOCK_ST_REVNAT_FAIL);
}

/* The frontend a socket dialled to reach backend addr:port, or NULL. An entry whose frontend
 * is gone, or now has another rev-NAT index (the service was recreated), is dropped: the
 * application then sees the backend, as it would without socket LB. */
static __always_inline struct kpr_sock_revnat_val *kpr_sock_revnat_find(__u64 cookie, const union kpr_addr *addr,
									 __be16 port)
{
	struct kpr_sock_revnat_key k = {};
	struct kpr_sock_revnat_val *v;
	struct kpr_revnat *rn;

	k.cookie = cookie;
	k.addr = *addr;
	k.port = port;
	v = kpr_sock_revnat.lookup(&k);
	if (!v)
		return (void *)0;
	rn = kpr_lb_revnat(v->rev_nat);
	if (!rn || rn->port != v->port || rn->proto != v->proto ||
	    !(kpr_addr_eq(&rn->addr, &v->addr) || kpr_sock_is_any(&rn->addr))) {
		kpr_sock_revnat.delete(&k);
		kpr_sock_count(KPR_SOCK_ST_REVNAT_STALE);
		return (void *)0;
	}
	kpr_sock_count(KPR_SOCK_ST_REVERSE);
	return v;
}

/* Bind protection: whether a host socket bound to addr:port (family's any-address included)
 * would take a NodePort, ExternalIP or LoadBalancer frontend's traffic. A v6 socket bound to
 * :: also binds IPv4 (unless V6ONLY, which the hook cannot see): both wildcards count. */
static __always_inline int kpr_sock_bind_taken(const union kpr_addr *addr, __be16 port, __u8 proto)
{
	struct kpr_svc_key key = {};
	struct kpr_svc_val *svc;

	key.addr = *addr;
	key.port = port;
	key.proto = proto;
	svc = kpr_svc.lookup(&key);
	if (svc && (svc->flags & (KPR_SVC_F_NODE_PORT | KPR_SVC_F_EXTERNAL_IP | KPR_SVC_F_LOAD_BALANCER)))
		return 1;
	// Any address of the host, loopback included, receives NodePort traffic.
	kpr_addr_set_any(&key.addr, kpr_addr_is_v4(addr) ? KPR_FAMILY_V4 : KPR_FAMILY_V6);
	if (kpr_svc.lookup(&key))
		return 1;
	if (!kpr_addr_is_v4(addr) && kpr_sock_is_any(addr)) {
		kpr_addr_set_any(&key.addr, KPR_FAMILY_V4);
		if (kpr_svc.lookup(&key))
			return 1;
	}
	return 0;
}

#endif /* KPR_LIB_SOCK_H */
