/* eBPF host routing: ordinary traffic between the node's external devices and its local pods
 * without the host's upper stack (netfilter, the routing decision, the backlog queue), as in
 * Cilium's LPC 2020 talk, and per-packet ClusterIP for pods outside the socket hooks.
 *
 * tc only (needs ctx/skb.h): bpf_redirect_peer and bpf_redirect_neigh exist for skbs only.
 *
 * Three entry points:
 *   kpr_hr_from_netdev_main  ingress of an external device. A packet for a known local pod
 *       goes straight into the pod: bpf_redirect_peer into the pod's namespace when the pod's
 *       host-side device is a veth/netkit whose peer is the pod's (kpr_dev_has_peer), else
 *       bpf_redirect to the device the route names (a bridge) with the route's MACs, or
 *       bpf_redirect_neigh when the neighbour is not resolved yet. Replies to per-packet
 *       ClusterIP flows are reverse-translated first.
 *   kpr_hr_from_pod_main  ingress of a pod's host-side device (a veth, or a bridge port). A
 *       packet from a known pod: replies of local backends are reverse-translated, packets to
 *       a service are DNATed to a backend (conntrack keeps the flow on it), then the packet is
 *       routed: into another local pod as above, out of an external device or an Ethernet
 *       overlay (vxlan, geneve: other nodes' pods, flannel vxlan) by bpf_redirect_neigh (the
 *       kernel resolves the next hop's MAC; the overlay's FDB names the remote node).
 *   kpr_hr_to_pod_main  egress of a pod's host-side device: replies to per-packet ClusterIP
 *       flows that came through the stack (or any redirect that ends at this device) get
 *       their service address back before the pod sees them.
 *
 * Everything else is the kernel's (CTX_PASS to the stack, counted by reason): not IP, headers
 * kpr cannot parse, fragments, IPv4 options (DSR carries a frontend there), packets not for or
 * from a known pod, packets for the node itself, TTL about to run out (the stack answers with
 * ICMP time exceeded), routes the FIB lookup cannot resolve or that leave through a device that
 * is neither external, nor a pod's, nor an Ethernet overlay (L3 tunnels: wireguard, ipip, gre;
 * their encapsulation is the stack's). A redirect is issued only where
 * the kernel takes it: bpf_redirect_peer only into devices the agent classified as veth/netkit peers
 * (kpr.netdevs, lib/devkind.h).
 *
 * Helpers: KPR_HR_PEER (1: bpf_redirect_peer; 0: bpf_redirect out of the host-side device)
 * and KPR_HR_NEIGH (1: bpf_redirect_neigh; 0: the stack) are the talk's fallbacks, chosen by
 * the plugin from feature probes and config.
 *
 * Maps owned here (pinned next to the shared ones, filled by the host_routing plugin):
 * kpr_hr_pods, kpr_hr_devs, kpr_hr_stats. Flows of the per-packet ClusterIP path live in the
 * shared kpr_ct: an ORIGINAL entry (pod -> service) names the backend, a REPLY entry
 * (backend -> pod) the service's rev-NAT index; neither carries KPR_CT_F_NODE_PORT, so the
 * NodePort collector leaves them to the LRU.
 */
#ifndef KPR_LIB_HOST_ROUTING_H
#define KPR_LIB_HOST_ROUTING_H

#ifndef KPR_CTX_SKB
#error "lib/host_routing.h is for tc programs: include ctx/skb.h first"
#endif

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/lb.h"
#include "lib/conntrack.h"
#include "lib/devkind.h"
#include "lib/fib.h"
/* Rewrites through load/store helpers: inlined at every reply and hairpin site after helpers
 * that move the packet, the pointer form is refused by the verifier (see lib/rewrite.h). */
#define KPR_REWRITE_HELPERS 1
#include "lib/rewrite.h"

/* --- tunables ---------------------------------------------------------------------- */

#ifndef KPR_HR_PASS
#define KPR_HR_PASS TC_ACT_UNSPEC // packets left to the kernel: later tcx programs and filters still see them
#endif
#ifndef KPR_HR_PEER
#define KPR_HR_PEER 1 // 1: bpf_redirect_peer into pods on veth/netkit; 0: bpf_redirect out of the host-side device
#endif
#ifndef KPR_HR_NEIGH
#define KPR_HR_NEIGH 1 // 1: bpf_redirect_neigh where the next hop's MAC is the kernel's to find; 0: the stack
#endif
#ifndef KPR_HR_CLUSTER_IP
#define KPR_HR_CLUSTER_IP 1 // 1: per-packet service load balancing for packets from pods
#endif
#ifndef KPR_HR_NH_CACHE
#define KPR_HR_NH_CACHE 1 // 1: remember the FIB's answer for pods behind veth/netkit peers (no FIB lookup per packet)
#endif
/* Conntrack work only where a per-packet service flow can be (KPR_HR_CLUSTER_IP): 1: a packet
 * from a pod looks its destination up as a service first and only a service's packets consult
 * kpr_ct; replies are looked up in kpr_ct only once the programs have ever made a per-packet flow
 * on this pin path (kpr_hr_flows; where socklb's socket hooks cover every pod, never); 0: kpr_ct
 * looked up for every TCP/UDP packet (reply, then flow, then service). */
#ifndef KPR_HR_CT_GATE
#define KPR_HR_CT_GATE 1
#endif
/* pod -> outside (KPR_HR_NEIGH): 0: a FIB lookup per packet; 1: the route's device and next hop
 * remembered per (source, destination) in kpr_hr_out until the generation moves (kpr.nexthops:
 * a route or neighbour change, a sync, and every 2 s), the packet still sent by
 * bpf_redirect_neigh, so the kernel's neighbour output (its state machine, probes) sees every
 * packet; 2: the neighbour's MAC remembered too and the packet sent by bpf_redirect with it out
 * of an external device (an overlay still takes 1's way), as Cilium sends with the FIB's MACs:
 * skips the kernel's neighbour output too; every miss (a new pair, and each pair's first packet
 * after every generation, so at least every 2 s) still goes by bpf_redirect_neigh, which keeps
 * the entry in use and probed, and a changed MAC moves the generation at once. 1 is the default:
 * TCP_RR over veth showed no difference between 1 and 2 beyond this machine's noise
 * (bench_host_routing, README). */
#ifndef KPR_HR_OUT_CACHE
#define KPR_HR_OUT_CACHE 1
#endif
/* 1: what the programs remember stands in for the kpr_hr_pods lookup while its generation
 * (kpr_hr_gen) holds: its entry was made for a known pod, and the plugin's sync moves the
 * generation right after every kpr_hr_pods change. Packets into a pod look kpr_hr_nh up first
 * (its entries carry the generation); without per-packet services (KPR_HR_CLUSTER_IP 0), where
 * nothing a pod sends needs more than its route, a pod's packets look kpr_hr_out up first (an
 * entry names the pod's device it was made on). One hash lookup less per packet each way.
 * 0: kpr_hr_pods first for every packet, kpr_hr_nh checked against its answer. */
#ifndef KPR_HR_CACHE_FIRST
#define KPR_HR_CACHE_FIRST 1
#endif
#ifndef KPR_HR_OUT_MAX
#define KPR_HR_OUT_MAX 65536 // (pod, destination) pairs whose route is remembered; LRU
#endif
#ifndef KPR_HR_PODS_MAX
#define KPR_HR_PODS_MAX 16384 // local pod addresses (both families)
#endif
#ifndef KPR_HR_DEVS_MAX
#define KPR_HR_DEVS_MAX 16384 // devices the programs decide on (external and pods' host-side ones)
#endif

// Service types the per-packet path balances for pods (exact-address entries; NodePort at
// node addresses and HostPort are the stack's and tc_nodeport's).
#define KPR_HR_SVC_TYPES (KPR_SVC_F_CLUSTER_IP | KPR_SVC_F_EXTERNAL_IP | KPR_SVC_F_LOAD_BALANCER)

// kpr_hr_devs flags.
#define KPR_HR_DEV_F_EXTERNAL (1U << 0) // one of the configured external devices
#define KPR_HR_DEV_F_POD (1U << 1)      // a pod's host-side device (veth/netkit, or a bridge port)
#define KPR_HR_DEV_F_BRIDGE (1U << 3)   // a bridge pods sit on (routes to its pods name it)
#define KPR_HR_DEV_F_L2 (1U << 4)       // a bridge port: only frames to gw_mac are routed, the rest is switched
#define KPR_HR_DEV_F_OVERLAY (1U << 5)  // an Ethernet overlay (vxlan, geneve): other nodes' pods behind it

// kpr_hr_stats slots; the plugin's STATS names them in this order.
#define KPR_HR_ST_PEER 0             // delivered into a pod by bpf_redirect_peer
#define KPR_HR_ST_REDIRECT 1         // sent out of a device by bpf_redirect with the route's MACs
#define KPR_HR_ST_NEIGH 2            // sent out of a device by bpf_redirect_neigh
#define KPR_HR_ST_SVC_NEW 3          // per-packet ClusterIP: new flows balanced
#define KPR_HR_ST_SVC_ESTABLISHED 4  // per-packet ClusterIP: packets of tracked flows translated
#define KPR_HR_ST_SVC_REVNAT 5       // per-packet ClusterIP: replies given the service address back
#define KPR_HR_ST_PASS_NOT_IP 6      // to the stack: not IPv4/IPv6 (ARP, LLDP, ...)
#define KPR_HR_ST_PASS_MALFORMED 7   // to the stack: headers kpr could not parse
#define KPR_HR_ST_PASS_FRAGMENT 8    // to the stack: IP fragments
#define KPR_HR_ST_PASS_IP_OPTIONS 9  // to the stack: IPv4 options, IPv6 extension headers (DSR, others)
#define KPR_HR_ST_PASS_NOT_POD 10    // to the stack: neither to (external) nor from (pod side) a known pod
#define KPR_HR_ST_PASS_LOCAL 11      // to the stack: for the node itself (FIB: not forwarded)
#define KPR_HR_ST_PASS_TTL 12        // to the stack: TTL/hop limit would expire (ICMP is the stack's)
#define KPR_HR_ST_PASS_FIB 13        // to the stack: the FIB lookup gave no usable route
#define KPR_HR_ST_PASS_NO_NEIGH 14   // to the stack: next hop unresolved and bpf_redirect_neigh not used
#define KPR_HR_ST_PASS_NEIGH_OFF 15  // to the stack: leaving the node without bpf_redirect_neigh (fallback)
#define KPR_HR_ST_PASS_SWITCHED 16   // to the stack: a bridge port's frame to another MAC (switched, not routed)
#define KPR_HR_ST_PASS_NOT_DEV 17    // to the stack: the route's device is not one kpr decides for
#define KPR_HR_ST_DROP_NO_BACKEND 18 // dropped: a service without backends
#define KPR_HR_ST_DROP_NAT 19        // dropped: a rewrite failed
#define KPR_HR_ST_CT_FAILED 20       // conntrack entry not written (the packet still went)
#define KPR_HR_ST_STALE_BACKEND 21   // tracked flow whose backend is gone: balanced again
#define KPR_HR_ST_SVC_HAIRPIN 22     // per-packet ClusterIP: packets of a pod reaching itself through a service
#define KPR_HR_ST_NEIGH_OVERLAY 23   // sent into an overlay device by bpf_redirect_neigh (not counted as NEIGH)
#define KPR_HR_ST_OUT_CACHED 24     // leaving the node by a route from kpr_hr_out (no FIB lookup); also counted by helper
#define KPR_HR_ST_REDIRECT_OUT 25   // sent out of the node by bpf_redirect with a remembered next hop's MACs (KPR_HR_OUT_CACHE 2)
#define KPR_HR_ST_MAX 26

// kpr_ct flag of per-packet flows whose backend is their own client (hairpin): the source
// becomes the service address, so the pod's reply comes back through its device. A high bit,
// clear of lib/conntrack.h's KPR_CT_F_*.
#define KPR_HR_CT_F_HAIRPIN (1U << 15)

/* --- structs ------------------------------------------------------------------------- */

// kpr_hr_pods value (key: union kpr_addr, the pod's address).
struct kpr_hr_pod {
	__u32 ifindex; // the device the pod's route names (its host-side veth, or its bridge)
	__u32 flags;   // reserved, zero
};

// kpr_hr_devs value (key: __u32 ifindex).
struct kpr_hr_dev {
	__u32 flags;     // KPR_HR_DEV_F_*
	__u8 kind;       // KPR_DEV_* (lib/devkind.h): bpf_redirect_peer only into a veth/netkit peer
	__u8 gw_mac[6];  // bridge ports: the bridge's MAC (pods route through it); else zero
	__u8 pad;        // zero
};

/* kpr_hr_nh value (key: union kpr_addr, a pod's address): the FIB's answer for a pod behind a
 * veth/netkit peer, so packets into it skip the FIB lookup. Only used while it still holds (else
 * the FIB decides as before): KPR_HR_CACHE_FIRST 1: while `gen` is kpr_hr_gen's (not 0); 0: while
 * `ifindex` is still the pod's (kpr_hr_pods); either way only for packets that fit the device's
 * MTU. The plugin also empties the map on every sync, which follows every link and route change
 * (a new MTU, a device gone). With bpf_redirect_peer the MACs are the pod's to see, not the
 * kernel's to switch by; so the cache is for the peer helper only. */
struct kpr_hr_nh {
	__u32 ifindex;  // the pod's host-side device
	__u32 max_len;  // the longest packet used with it (MTU + Ethernet + VLAN); longer ones (GSO) ask the FIB
	__u8 dmac[6];   // the pod's MAC (the neighbour's)
	__u8 smac[6];   // the host-side device's MAC
	__u32 gen;      // kpr_hr_gen's value when learned (KPR_HR_CACHE_FIRST)
};

/* kpr_hr_out: the route of a pod's packets to a destination outside the node, as a FIB lookup
 * from the pod's device answered it (KPR_HR_OUT_CACHE). Keyed by source and destination: the
 * FIB's inputs that decide with the kernel's default multipath hash (addresses only); with an
 * L4 multipath hash policy or ip rules on ports, a pair keeps its first flow's path until the
 * generation moves. Valid while `gen` is kpr_hr_gen's (0 there: nothing is used or kept). */
struct kpr_hr_out_key {
	union kpr_addr saddr;
	union kpr_addr daddr;
};

struct kpr_hr_out {
	__u32 gen;                  // kpr_hr_gen's value when the route was looked up
	__u32 ifindex;              // egress device (external or overlay)
	__u32 iif;                  // the device the lookup was made from (a pod's); another misses
	__u32 max_len;              // the longest packet used with it (MTU + Ethernet + VLAN); longer ones ask the FIB
	__u32 nh_family;            // the next hop, laid out as struct bpf_redir_neigh (handed to
	__u32 nh_addr[4];           // bpf_redirect_neigh as it is): AF_INET (nh_addr[0]) or AF_INET6
	__u8 dmac[6];               // KPR_HR_OUT_CACHE 2: the next hop's MAC
	__u8 smac[6];               // and the egress device's
	__u8 overlay;               // 1: ifindex is an Ethernet overlay (counted as redirect_neigh_overlay)
	__u8 l2;                    // 1: iif is a bridge port (its frames to other MACs are switched, not routed)
	__u8 pad[2];                // zero
};

_Static_assert(sizeof(struct kpr_hr_out_key) == 32, "kpr_hr_out_key layout");
_Static_assert(sizeof(struct kpr_hr_out) == 52, "kpr_hr_out layout");
_Static_assert(offsetof(struct kpr_hr_out, nh_addr) - offsetof(struct kpr_hr_out, nh_family) ==
		       offsetof(struct bpf_redir_neigh, ipv4_nh), "kpr_hr_out's next hop is a struct bpf_redir_neigh");
_Static_assert(sizeof(struct kpr_hr_pod) == 8, "kpr_hr_pod layout");
_Static_assert(sizeof(struct kpr_hr_dev) == 12, "kpr_hr_dev layout");

/* --- maps ---------------------------------------------------------------------------- */

// Local pod addresses: from the source's Pod objects and the host's /32 and /128 pod routes.
BPF_TABLE_PINNED("hash", union kpr_addr, struct kpr_hr_pod, kpr_hr_pods, KPR_HR_PODS_MAX, KPR_PIN(kpr_hr_pods));
// Devices by ifindex: what each one allows.
BPF_TABLE_PINNED("hash", __u32, struct kpr_hr_dev, kpr_hr_devs, KPR_HR_DEVS_MAX, KPR_PIN(kpr_hr_devs));
#if KPR_HR_PEER && KPR_HR_NH_CACHE
// Next hops of pods behind peer devices, learned from FIB lookups (per load, not pinned).
BPF_TABLE("lru_hash", union kpr_addr, struct kpr_hr_nh, kpr_hr_nh, KPR_HR_PODS_MAX);
#endif
// pod next hops used without a kpr_hr_pods lookup, while their generation holds
#define KPR_HR_NH_FIRST (KPR_HR_PEER && KPR_HR_NH_CACHE && KPR_HR_CACHE_FIRST)
#define KPR_HR_GEN ((KPR_HR_NEIGH && KPR_HR_OUT_CACHE) || KPR_HR_NH_FIRST)
#if KPR_HR_NEIGH && KPR_HR_OUT_CACHE
// Routes of pods' packets leaving the node (per load, not pinned).
BPF_TABLE("lru_hash", struct kpr_hr_out_key, struct kpr_hr_out, kpr_hr_out, KPR_HR_OUT_MAX);
#endif
#if KPR_HR_GEN
// The generation of what kpr_hr_out and (KPR_HR_CACHE_FIRST) kpr_hr_nh remember (slot 0).
BPF_TABLE("array", __u32, __u32, kpr_hr_gen, 1);
#endif
#if KPR_HR_CLUSTER_IP && KPR_HR_CT_GATE
/* Slot 0 non-zero once a program made a per-packet service flow (set before its conntrack
 * entries are written, so its replies see it); pinned, so a new agent's programs still reverse
 * flows of the old one's. Never cleared: the conntrack entries outlive any bookkeeping here. */
BPF_TABLE_PINNED("array", __u32, __u32, kpr_hr_flows, 1, KPR_PIN(kpr_hr_flows));
#endif
// Counters, per CPU (KPR_HR_ST_*).
BPF_TABLE_PINNED("percpu_array", __u32, __u64, kpr_hr_stats, KPR_HR_ST_MAX, KPR_PIN(kpr_hr_stats));

/* --- helpers --------------------------------------------------------------------------- */

static __always_inline void kpr_hr_count(__u32 idx)
{
	__u64 *c = kpr_hr_stats.lookup(&idx);

	if (c)
		*c += 1;
}

// Count a reason and hand the packet to the stack.
static __always_inline int kpr_hr_pass(__u32 reason)
{
	kpr_hr_count(reason);
	return KPR_HR_PASS;
}

static __always_inline struct kpr_hr_pod *kpr_hr_pod_of(const union kpr_addr *a)
{
	union kpr_addr k = *a;

	return kpr_hr_pods.lookup(&k);
}

// Multicast, broadcast and link-local destinations (neighbour discovery among them) are the stack's.
static __always_inline int kpr_hr_special_dst(const union kpr_addr *d, __u8 family)
{
	if (family == KPR_FAMILY_V4) {
		__u32 a = kpr_ntohl(d->w[3]);

		return (a >> 28) == 0xe || a == 0xffffffff;
	}
	return d->b[0] == 0xff || (d->b[0] == 0xfe && (d->b[1] & 0xc0) == 0x80);
}

// Parse; on anything but a whole, option-free, unfragmented IP packet, the reason to pass it.
static __always_inline int kpr_hr_parse(kpr_ctx_t *ctx, struct kpr_pkt *pkt, __u32 *reason)
{
	int ret = kpr_parse(ctx, pkt);

	if (ret == KPR_PARSE_NOT_IP) {
		*reason = KPR_HR_ST_PASS_NOT_IP;
		return -1;
	}
	if (ret == KPR_PARSE_MALFORMED) {
		*reason = KPR_HR_ST_PASS_MALFORMED;
		return -1;
	}
	if (pkt->frag) {
		*reason = KPR_HR_ST_PASS_FRAGMENT;
		return -1;
	}
	// an IPv4 header with options (a DSR frontend among them) is the stack's and tc_nodeport's
	if (pkt->t.family == KPR_FAMILY_V4 && pkt->l4_off && pkt->l4_off != pkt->l3_off + sizeof(struct iphdr)) {
		*reason = KPR_HR_ST_PASS_IP_OPTIONS;
		return -1;
	}
	// IPv6 extension headers likewise (a DSR destination option among them)
	if (pkt->t.family == KPR_FAMILY_V6 && pkt->l4_off && pkt->l4_off != pkt->l3_off + sizeof(struct ipv6hdr)) {
		*reason = KPR_HR_ST_PASS_IP_OPTIONS;
		return -1;
	}
	if (pkt->t.family == KPR_FAMILY_V4 && !pkt->l4_off) {
		struct iphdr *ip = ctx_ptr(ctx, pkt->l3_off, sizeof(*ip));

		if (!ip || ip->ihl != 5) {
			*reason = KPR_HR_ST_PASS_IP_OPTIONS;
			return -1;
		}
	}
	if (kpr_hr_special_dst(&pkt->t.daddr, pkt->t.family)) {
		*reason = KPR_HR_ST_PASS_LOCAL;
		return -1;
	}
	return 0;
}

#define KPR_HR_ETH_HLEN 14
#define KPR_HR_VLAN_HLEN 4

/* Forwarding is routing: the TTL (hop limit) goes down by one, as the stack would do. Returns
 * -1 when it would expire here (the stack then sends ICMP time exceeded). */
static __always_inline int kpr_hr_dec_ttl(kpr_ctx_t *ctx, const struct kpr_pkt *pkt)
{
	// an untagged frame (nearly all): the header in place, the checksum fixed as the stack's
	// ip_decrease_ttl() does (RFC 1141): no helper calls
	if (pkt->l3_off == KPR_HR_ETH_HLEN) {
		if (pkt->t.family == KPR_FAMILY_V4) {
			struct iphdr *ip = ctx_ptr(ctx, KPR_HR_ETH_HLEN, sizeof(*ip));
			__u32 check;

			if (!ip || ip->ttl <= 1)
				return -1;
			check = (__u32)ip->check + (__u32)kpr_htons(0x0100);
			ip->check = (__u16)(check + (check >= 0xffff));
			ip->ttl--;
		} else {
			struct ipv6hdr *ip6 = ctx_ptr(ctx, KPR_HR_ETH_HLEN, sizeof(*ip6));

			if (!ip6 || ip6->hop_limit <= 1)
				return -1;
			ip6->hop_limit--;
		}
		return 0;
	}
	// through load/store helpers: after the NAT helpers the verifier no longer trusts a
	// packet pointer at a variable offset on every path that reaches here
	if (pkt->t.family == KPR_FAMILY_V4) {
		__be16 from = 0, to;
		__u8 *b = (__u8 *)&from;

		// ttl and protocol share one 16-bit word of the header checksum
		if (ctx_load_bytes(ctx, pkt->l3_off + offsetof(struct iphdr, ttl), &from, 2) || b[0] <= 1)
			return -1;
		to = from;
		((__u8 *)&to)[0] = b[0] - 1;
		if (ctx_store_bytes(ctx, pkt->l3_off + offsetof(struct iphdr, ttl), &to, 2))
			return -1;
		return bpf_l3_csum_replace(ctx, pkt->l3_off + offsetof(struct iphdr, check), from, to, 2) ? -1 : 0;
	} else {
		__u8 hl = 0;

		if (ctx_load_bytes(ctx, pkt->l3_off + offsetof(struct ipv6hdr, hop_limit), &hl, 1) || hl <= 1)
			return -1;
		hl--;
		return ctx_store_bytes(ctx, pkt->l3_off + offsetof(struct ipv6hdr, hop_limit), &hl, 1) ? -1 : 0;
	}
}

/* Whether a GSO packet's segments fit the MTU of `ifindex`, as the stack's forwarding checks
 * (skb_gso_validate_network_len): the FIB lookup's own check lets every GSO packet through, and
 * a segment too big for the device (a pod MTU above an overlay's, say) would leave fragmented
 * or be dropped instead of the sender learning the path MTU from the stack's ICMP. */
static __always_inline int kpr_hr_gso_fits(kpr_ctx_t *ctx, __u32 ifindex)
{
	__u32 mtu = 0;

	if (!ctx_gso_size(ctx))
		return 1;
	// bpf_check_mtu(ctx, ifindex, &mtu_len, len_diff, BPF_MTU_CHK_SEGS): 0 when it fits
	return ((long (*)(void *, __u32, __u32 *, __s32, __u64))BPF_FUNC_check_mtu)(ctx, ifindex, &mtu, 0, 1) == 0;
}

// The next hop a successful FIB lookup `p` found, as bpf_redirect_neigh takes it (also the
// layout kpr_hr_out keeps it in).
static __always_inline void kpr_hr_fib_nh(struct bpf_redir_neigh *nh, const struct bpf_fib_lookup *p)
{
	if (p->family == KPR_FIB_AF_INET) {
		nh->nh_family = KPR_FIB_AF_INET;
		nh->ipv4_nh = p->ipv4_dst; // the FIB lookup leaves the next hop here
	} else {
		nh->nh_family = KPR_FIB_AF_INET6;
		__builtin_memcpy(nh->ipv6_nh, p->ipv6_dst, 16);
	}
}

static __always_inline int kpr_hr_redirect_neigh(kpr_ctx_t *ctx, const struct bpf_fib_lookup *p)
{
	struct bpf_redir_neigh nh = {};

	kpr_hr_fib_nh(&nh, p);
	return ctx_redirect_neigh_nh(ctx, p->ifindex, &nh);
}

#if KPR_HR_GEN
// The current generation of kpr_hr_gen (0: not armed: nothing is used or kept).
static __always_inline __u32 kpr_hr_out_gen(void)
{
	__u32 zero = 0, *g = kpr_hr_gen.lookup(&zero);

	return g ? *g : 0;
}
#endif

#if KPR_HR_PEER && KPR_HR_NH_CACHE
// Into a pod by its remembered next hop (after the same TTL step as the FIB's path).
static __always_inline int kpr_hr_nh_send(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, const struct kpr_hr_nh *nh)
{
	if (kpr_hr_dec_ttl(ctx, pkt))
		return kpr_hr_pass(KPR_HR_ST_PASS_TTL);
	if (kpr_fib_set_macs(ctx, nh->dmac, nh->smac))
		return CTX_DROP; // no Ethernet header after all, as on the FIB's path
	kpr_hr_count(KPR_HR_ST_PEER);
	return ctx_redirect_peer(ctx, nh->ifindex, 0);
}
#endif

#if KPR_HR_NEIGH && KPR_HR_OUT_CACHE

// The remembered route of this packet (pod -> outside), or NULL when the FIB must decide.
static __always_inline struct kpr_hr_out *kpr_hr_out_get(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, __u32 gen)
{
	struct kpr_hr_out_key k;
	struct kpr_hr_out *o;

	// GSO packets: the segments' fit is bpf_check_mtu's (kpr_hr_gso_fits), on the FIB's path
	if (!gen || ctx_gso_size(ctx))
		return (void *)0;
	k.saddr = pkt->t.saddr;
	k.daddr = pkt->t.daddr;
	o = kpr_hr_out.lookup(&k);
	if (!o || o->gen != gen || o->iif != ctx_ifindex(ctx) || ctx_len(ctx) > o->max_len)
		return (void *)0;
	return o;
}

// Remember a successful lookup `p` of this packet; `gen`: read before the lookup, so a route
// changed meanwhile leaves an entry that is already stale.
static __always_inline void kpr_hr_out_put(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, const struct bpf_fib_lookup *p,
					   __u32 gen, __u8 overlay, __u8 l2)
{
	struct kpr_hr_out_key k;
	struct kpr_hr_out o = {};

	if (!gen)
		return;
	k.saddr = pkt->t.saddr;
	k.daddr = pkt->t.daddr;
	o.gen = gen;
	o.ifindex = p->ifindex;
	o.iif = ctx_ifindex(ctx);
	o.max_len = (__u32)p->mtu_result + KPR_HR_ETH_HLEN + KPR_HR_VLAN_HLEN;
	kpr_hr_fib_nh((struct bpf_redir_neigh *)&o.nh_family, p);
	__builtin_memcpy(o.dmac, p->dmac, 6);
	__builtin_memcpy(o.smac, p->smac, 6);
	o.overlay = overlay;
	o.l2 = l2;
	kpr_hr_out.update(&k, &o);
}

// Send a packet out by its remembered route (after the same TTL step as the FIB's path).
static __always_inline int kpr_hr_out_send(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, struct kpr_hr_out *o)
{
	if (kpr_hr_dec_ttl(ctx, pkt))
		return kpr_hr_pass(KPR_HR_ST_PASS_TTL);
	kpr_hr_count(KPR_HR_ST_OUT_CACHED);
#if KPR_HR_OUT_CACHE >= 2
	if (!o->overlay) {
		if (kpr_fib_set_macs(ctx, o->dmac, o->smac))
			return CTX_DROP;
		kpr_hr_count(KPR_HR_ST_REDIRECT_OUT);
		return ctx_redirect(ctx, o->ifindex, 0);
	}
#endif
	kpr_hr_count(o->overlay ? KPR_HR_ST_NEIGH_OVERLAY : KPR_HR_ST_NEIGH);
	return ctx_redirect_neigh_nh(ctx, o->ifindex, (struct bpf_redir_neigh *)&o->nh_family);
}
#endif

/* Route the packet (tuple final) with the fastest helper the route's device allows:
 *   into a pod behind a PEER device: bpf_redirect_peer (KPR_HR_PEER) or bpf_redirect;
 *   to a bridge with pods: bpf_redirect with the route's MACs;
 *   anywhere else (the route leaves the node): bpf_redirect_neigh (KPR_HR_NEIGH) or the stack.
 * `pod`: the destination's kpr_hr_pods entry when it is a known local pod (then also `to_pod`);
 * `hairpin`: a service flow back into the pod it came from (the one case where the route may
 * name the device the packet came in on; to_pod without a `pod`); `gen`: kpr_hr_gen's value as
 * read before the lookup (0: kpr_hr_out remembers nothing, nor kpr_hr_nh with
 * KPR_HR_CACHE_FIRST); `l2`: the packet came from a bridge port; `nh_asked`: the caller already
 * looked kpr_hr_nh up for this destination under KPR_HR_NH_FIRST's conditions and missed (the
 * external device's program), so asking again here could only miss again. */
static __always_inline int kpr_hr_route(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, const struct kpr_hr_pod *pod,
					int to_pod, int hairpin, __u32 gen, __u8 l2, int nh_asked)
{
	struct bpf_fib_lookup p;
	struct kpr_hr_dev *dev;
	__u32 oif;
	int rc;

#if KPR_HR_PEER && KPR_HR_NH_CACHE
	if (pod && !nh_asked) {
		union kpr_addr k = pkt->t.daddr;
		struct kpr_hr_nh *nh = kpr_hr_nh.lookup(&k);

		// what the FIB said last time, while it still holds (see struct kpr_hr_nh)
		if (nh && nh->ifindex == pod->ifindex && (!KPR_HR_NH_FIRST || (gen && nh->gen == gen)) &&
		    nh->ifindex != ctx_ifindex(ctx) && ctx_len(ctx) <= nh->max_len)
			return kpr_hr_nh_send(ctx, pkt, nh);
	}
#endif
	rc = kpr_fib_lookup(ctx, &p, &pkt->t, &pkt->t.saddr, &pkt->t.daddr, 0);

	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return kpr_hr_pass(KPR_HR_ST_PASS_LOCAL);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return kpr_hr_pass(KPR_HR_ST_PASS_FIB);
	oif = p.ifindex;
	if (oif == ctx_ifindex(ctx) && !hairpin) // out of the device it came in on: the stack's (redirects, ICMP)
		return kpr_hr_pass(KPR_HR_ST_PASS_FIB);
	if (!kpr_hr_gso_fits(ctx, oif)) // the stack sends "fragmentation needed" (packet too big)
		return kpr_hr_pass(KPR_HR_ST_PASS_FIB);
	dev = kpr_hr_devs.lookup(&oif);
	// decide first: a packet left to the stack must keep its TTL (the stack takes one off)
	if (to_pod) {
		if (!dev || !(dev->flags & (KPR_HR_DEV_F_POD | KPR_HR_DEV_F_BRIDGE)))
			return kpr_hr_pass(KPR_HR_ST_PASS_NOT_DEV);
#if !KPR_HR_NEIGH
		if (rc != BPF_FIB_LKUP_RET_SUCCESS)
			return kpr_hr_pass(KPR_HR_ST_PASS_NO_NEIGH);
#endif
	} else {
		// leaving the node: through the external devices or an Ethernet overlay (vxlan, geneve:
		// the neighbour names the remote VTEP's MAC, the device's FDB the node); L3 tunnels and
		// anything else are the stack's
		if (!dev || !(dev->flags & (KPR_HR_DEV_F_EXTERNAL | KPR_HR_DEV_F_OVERLAY)))
			return kpr_hr_pass(KPR_HR_ST_PASS_NOT_DEV);
#if !KPR_HR_NEIGH
		return kpr_hr_pass(KPR_HR_ST_PASS_NEIGH_OFF);
#endif
	}
	if (kpr_hr_dec_ttl(ctx, pkt))
		return kpr_hr_pass(KPR_HR_ST_PASS_TTL);
	if (to_pod && rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (kpr_fib_set_macs(ctx, p.dmac, p.smac))
			return CTX_DROP; // no Ethernet header after all: nothing sane to hand on
#if KPR_HR_PEER
		if ((dev->flags & KPR_HR_DEV_F_POD) && kpr_dev_has_peer(dev->kind)) {
#if KPR_HR_NH_CACHE
			if (pod && pod->ifindex == oif && (gen || !KPR_HR_NH_FIRST)) {
				struct kpr_hr_nh nh = {.ifindex = oif, .max_len = (__u32)p.mtu_result + KPR_HR_ETH_HLEN + KPR_HR_VLAN_HLEN,
						       .gen = gen};
				union kpr_addr k = pkt->t.daddr;

				__builtin_memcpy(nh.dmac, p.dmac, 6);
				__builtin_memcpy(nh.smac, p.smac, 6);
				kpr_hr_nh.update(&k, &nh);
			}
#endif
			kpr_hr_count(KPR_HR_ST_PEER);
			return ctx_redirect_peer(ctx, oif, 0);
		}
#endif
		kpr_hr_count(KPR_HR_ST_REDIRECT);
		return ctx_redirect(ctx, oif, 0);
	}
	// the next hop's MAC is the kernel's to find (out of the node, or a pod not resolved yet);
	// the lookup's next hop goes along, so the kernel does not route the packet a second time;
	// never bpf_redirect_peer: an overlay has no peer (the route to a remote pod names it)
#if KPR_HR_NEIGH && KPR_HR_OUT_CACHE
	if (!to_pod && rc == BPF_FIB_LKUP_RET_SUCCESS)
		kpr_hr_out_put(ctx, pkt, &p, gen, dev && (dev->flags & KPR_HR_DEV_F_OVERLAY) ? 1 : 0, l2);
#endif
	kpr_hr_count(dev && (dev->flags & KPR_HR_DEV_F_OVERLAY) ? KPR_HR_ST_NEIGH_OVERLAY : KPR_HR_ST_NEIGH);
	return kpr_hr_redirect_neigh(ctx, &p);
}

/* --- per-packet services --------------------------------------------------------------- */

#if KPR_HR_CLUSTER_IP
/* A reply of a per-packet service flow (backend -> pod): the service becomes its source again;
 * a hairpin flow's reply (pod -> the service address it was given as client) also goes back to
 * the pod itself. Returns 0 (translated, or not one), 1 (a hairpin reply, translated), or -1 when
 * the rewrite failed (drop). */
static __always_inline int kpr_hr_revnat(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct kpr_ct_entry *e;
	struct kpr_revnat *rn;
	union kpr_addr client;
	int hairpin;

	if (!pkt->l4_off || (pkt->t.proto != IPPROTO_TCP && pkt->t.proto != IPPROTO_UDP))
		return 0; // per-packet flows are TCP and UDP only: no conntrack lookup for the rest
#if KPR_HR_CT_GATE
	{
		__u32 zero = 0, *made = kpr_hr_flows.lookup(&zero);

		if (!made || !*made)
			return 0; // no per-packet flow was ever made: nothing to reverse
	}
#endif
	e = kpr_ct_lookup(&pkt->t, KPR_CT_DIR_REPLY);
	if (!e || (e->flags & KPR_CT_F_NODE_PORT))
		return 0;
	rn = kpr_lb_revnat(e->rev_nat);
	if (!rn)
		return 0;
	hairpin = (e->flags & KPR_HR_CT_F_HAIRPIN) != 0;
	client = pkt->t.saddr; // a hairpin reply's sender is the client itself
	if (kpr_nat_rewrite_addr(ctx, pkt, &rn->addr, 0) || kpr_nat_rewrite_port(ctx, pkt, rn->port, 0) ||
	    (hairpin && kpr_nat_rewrite_addr(ctx, pkt, &client, 1))) {
		kpr_hr_count(KPR_HR_ST_DROP_NAT);
		return -1;
	}
	kpr_hr_count(hairpin ? KPR_HR_ST_SVC_HAIRPIN : KPR_HR_ST_SVC_REVNAT);
	return hairpin;
}

// The reply tuple of a flow DNATed to `be`: backend -> the pod.
static __always_inline void kpr_hr_reply_tuple(struct kpr_tuple *r, const struct kpr_tuple *t,
					       const struct kpr_backend *be, int hairpin)
{
	r->saddr = be->addr;
	r->daddr = hairpin ? t->daddr : t->saddr; // hairpin: the reply goes to the service address
	r->sport = be->port;
	r->dport = t->sport;
	r->proto = t->proto;
	r->family = t->family;
	r->tcp_flags = 0;
	r->pad = 0;
}

/* A packet from a pod to a service: its tracked flow's backend, or a new pick (conntrack in both
 * directions), then DNAT; when the backend is the pod itself, SNAT to the service address too
 * (hairpin). Returns 0 (translated, or no service), 2 (hairpin), 1 to drop. */
static __always_inline int kpr_hr_service(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct kpr_ct_entry *ct;
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_affinity_key aff;
	struct kpr_backend *be = (void *)0;
	struct kpr_tuple r;
	union kpr_addr fe;
	__u32 bid;
	int hairpin;

	if (!pkt->l4_off || (pkt->t.proto != IPPROTO_TCP && pkt->t.proto != IPPROTO_UDP))
		return 0;
	fe = pkt->t.daddr;
#if KPR_HR_CT_GATE
	// not a service (nearly every packet): no conntrack lookup. A tracked flow whose service has
	// gone is not translated any more, as the service address no longer leads anywhere
	svc = kpr_lb_lookup(&key, &pkt->t, KPR_LB_FROM_CLUSTER);
	if (!svc || !(svc->flags & KPR_HR_SVC_TYPES))
		return 0;
#endif
	ct = kpr_ct_lookup(&pkt->t, KPR_CT_DIR_ORIGINAL);
	if (ct && !(ct->flags & KPR_CT_F_NODE_PORT)) {
		bid = ct->backend_id;
		be = kpr_lb_backend(bid);
		if (be) {
			kpr_hr_count(KPR_HR_ST_SVC_ESTABLISHED);
			goto dnat;
		}
		kpr_hr_count(KPR_HR_ST_STALE_BACKEND);
	}
#if !KPR_HR_CT_GATE
	svc = kpr_lb_lookup(&key, &pkt->t, KPR_LB_FROM_CLUSTER);
	if (!svc || !(svc->flags & KPR_HR_SVC_TYPES))
		return 0;
#endif
	kpr_lb_affinity_key_addr(&aff, svc, &pkt->t.saddr);
	be = kpr_lb_pick(&key, svc, &pkt->t, &aff, &bid);
	if (!be) {
		kpr_hr_count(KPR_HR_ST_DROP_NO_BACKEND);
		return 1;
	}
	kpr_hr_count(KPR_HR_ST_SVC_NEW);
#if KPR_HR_CT_GATE
	{
		__u32 zero = 0, *made = kpr_hr_flows.lookup(&zero);

		if (made && !*made)
			*made = 1; // before the entries: the flow's replies must look for them
	}
#endif
	hairpin = kpr_addr_eq(&be->addr, &pkt->t.saddr);
	if (kpr_ct_create(&pkt->t, KPR_CT_DIR_ORIGINAL, bid, svc->rev_nat, hairpin ? KPR_HR_CT_F_HAIRPIN : 0))
		kpr_hr_count(KPR_HR_ST_CT_FAILED);
	kpr_hr_reply_tuple(&r, &pkt->t, be, hairpin);
	if (kpr_ct_create(&r, KPR_CT_DIR_REPLY, bid, svc->rev_nat, hairpin ? KPR_HR_CT_F_HAIRPIN : 0))
		kpr_hr_count(KPR_HR_ST_CT_FAILED);
dnat:
	hairpin = kpr_addr_eq(&be->addr, &pkt->t.saddr);
	if (kpr_nat_rewrite_addr(ctx, pkt, &be->addr, 1) || kpr_nat_rewrite_port(ctx, pkt, be->port, 1) ||
	    (hairpin && kpr_nat_rewrite_addr(ctx, pkt, &fe, 0))) {
		kpr_hr_count(KPR_HR_ST_DROP_NAT);
		return 1;
	}
	if (hairpin) {
		kpr_hr_count(KPR_HR_ST_SVC_HAIRPIN);
		return 2;
	}
	return 0;
}
#endif

/* --- entry points ------------------------------------------------------------------------ */

// Ingress of an external device.
static __always_inline int kpr_hr_from_netdev_main(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_hr_pod *pod;
	__u32 reason, gen = 0;

	if (kpr_hr_parse(ctx, &pkt, &reason))
		return kpr_hr_pass(reason);
#if KPR_HR_NH_FIRST
	// the pod's remembered next hop first: while its generation holds it stands in for kpr_hr_pods
	gen = kpr_hr_out_gen();
	if (gen) {
		union kpr_addr k = pkt.t.daddr;
		struct kpr_hr_nh *nh = kpr_hr_nh.lookup(&k);

		if (nh && nh->gen == gen && nh->ifindex != ctx_ifindex(ctx) && ctx_len(ctx) <= nh->max_len) {
#if KPR_HR_CLUSTER_IP
			if (kpr_hr_revnat(ctx, &pkt) < 0)
				return CTX_DROP;
#endif
			return kpr_hr_nh_send(ctx, &pkt, nh);
		}
	}
#endif
	/* An address no pod's (the node's own, mostly) costs kpr_hr_nh's miss and kpr_hr_pods'.
	 * Remembering it in kpr_hr_nh for the generation (ifindex 0) saved nothing measurable
	 * (bench_host_routing --prog-cost, two runs: 107 and 137 ns with it, 115 and 80 without,
	 * inside the noise; such packets then cross the whole stack) and let a flood to many such
	 * addresses push pods' next hops out of the LRU, so it is not done. */
	pod = kpr_hr_pod_of(&pkt.t.daddr);
	if (!pod)
		return kpr_hr_pass(KPR_HR_ST_PASS_NOT_POD);
#if KPR_HR_CLUSTER_IP
	if (kpr_hr_revnat(ctx, &pkt) < 0)
		return CTX_DROP;
#endif
	// with KPR_HR_NH_FIRST kpr_hr_nh was asked above (gen 0: no entry of it is used either)
	return kpr_hr_route(ctx, &pkt, pod, 1, 0, gen, 0, KPR_HR_NH_FIRST);
}

// Ingress of a pod's host-side device: what the pod sends.
static __always_inline int kpr_hr_from_pod_main(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_hr_dev *dev;
	struct kpr_hr_pod *pod;
	__u32 reason, ifindex = ctx_ifindex(ctx), gen = 0;
	int ret = 0, hairpin = 0;
#if KPR_HR_NEIGH && KPR_HR_OUT_CACHE
	struct kpr_hr_out *o = (void *)0;
#endif

	if (kpr_hr_parse(ctx, &pkt, &reason))
		return kpr_hr_pass(reason);
#if KPR_HR_NEIGH && KPR_HR_OUT_CACHE && !KPR_HR_CLUSTER_IP && KPR_HR_CACHE_FIRST
	/* Without per-packet services nothing comes before the route: a remembered one first, and
	 * no kpr_hr_pods lookup for its packets. An entry is only made for a known pod's packet on
	 * this device (iif) and holds while its generation does, and the sync moves the generation
	 * right after every change of kpr_hr_pods, so a pod gone or moved misses as before. A
	 * bridge port's entry (l2) still waits for the check below: only frames to the bridge are
	 * routed. */
	gen = kpr_hr_out_gen();
	o = kpr_hr_out_get(ctx, &pkt, gen);
	if (o && !o->l2)
		return kpr_hr_out_send(ctx, &pkt, o);
#endif
	pod = kpr_hr_pod_of(&pkt.t.saddr);
	if (!pod)
		return kpr_hr_pass(KPR_HR_ST_PASS_NOT_POD);
#if KPR_HR_CLUSTER_IP
	ret = kpr_hr_revnat(ctx, &pkt);
	if (ret < 0)
		return CTX_DROP;
	hairpin = ret; // a hairpin reply, now from the service to the pod it came from
#endif
	// a pod whose route names this very device has it to itself (veth, netkit): no bridge port
	// (bridge pods' routes name the bridge), so no device lookup for the switched-frame check
	dev = hairpin || pod->ifindex == ifindex ? (void *)0 : kpr_hr_devs.lookup(&ifindex);
	if (dev && (dev->flags & KPR_HR_DEV_F_L2)) {
		__u8 *eth = ctx_ptr(ctx, 0, 6);

		// on a bridge, only frames to the bridge itself are routed; the rest is switched
		if (!eth || ((eth[0] ^ dev->gw_mac[0]) | (eth[1] ^ dev->gw_mac[1]) | (eth[2] ^ dev->gw_mac[2]) |
			     (eth[3] ^ dev->gw_mac[3]) | (eth[4] ^ dev->gw_mac[4]) | (eth[5] ^ dev->gw_mac[5])))
			return kpr_hr_pass(KPR_HR_ST_PASS_SWITCHED);
	}
#if KPR_HR_CLUSTER_IP
	if (!hairpin) {
		ret = kpr_hr_service(ctx, &pkt);
		if (ret == 1)
			return CTX_DROP;
		hairpin = ret == 2;
	}
#endif
#if KPR_HR_NEIGH && KPR_HR_OUT_CACHE
#if KPR_HR_CLUSTER_IP || !KPR_HR_CACHE_FIRST
	// a remembered route first: it only ever names a way out of the node, and a destination
	// that became a local pod since came with a sync or a route event, which moved the generation
	gen = kpr_hr_out_gen();
	if (!hairpin)
		o = kpr_hr_out_get(ctx, &pkt, gen);
#endif
	if (o)
		return kpr_hr_out_send(ctx, &pkt, o);
#endif
#if KPR_HR_GEN && !(KPR_HR_NEIGH && KPR_HR_OUT_CACHE)
	gen = kpr_hr_out_gen(); // pod to pod: kpr_hr_nh's generation (KPR_HR_CACHE_FIRST)
#endif
	pod = hairpin ? (void *)0 : kpr_hr_pod_of(&pkt.t.daddr);
	return kpr_hr_route(ctx, &pkt, pod, hairpin || pod != (void *)0, hairpin, gen,
			    dev && (dev->flags & KPR_HR_DEV_F_L2) ? 1 : 0, 0);
}

// Egress of a pod's host-side device: what the pod is about to receive through the stack.
static __always_inline int kpr_hr_to_pod_main(kpr_ctx_t *ctx)
{
#if KPR_HR_CLUSTER_IP
	struct kpr_pkt pkt;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || pkt.frag)
		return KPR_HR_PASS;
	if (kpr_hr_revnat(ctx, &pkt) < 0)
		return CTX_DROP;
#endif
	return KPR_HR_PASS;
}

#endif /* KPR_LIB_HOST_ROUTING_H */
