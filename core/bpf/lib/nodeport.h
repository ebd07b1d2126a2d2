/* North-south load balancing: NodePort, LoadBalancer, ExternalIP and HostPort frontends reached
 * from outside the node, for programs on the node's external devices.
 *
 * Written against the ctx API only, so tc (ctx/skb.h) and XDP (ctx/xdp.h) compile the same
 * logic. What XDP cannot do is behind switches that default off there: DSR needs
 * bpf_skb_adjust_room (KPR_NP_DSR), delivery into a pod namespace needs bpf_redirect_peer
 * (KPR_NP_PEER); turning them on in an XDP build fails the build on purpose (ctx/xdp.h). What
 * the hooks do differently is a ctx operation both define (CTX_REDIRECT_NEEDS_XDP_XMIT,
 * CTX_RESOLVE_NEIGH_IS_STACK, CTX_REDIRECTS_EVERYWHERE, ctx_resolve_neigh, ctx_fits_mtu,
 * CTX_FIB_MTU), not an #ifdef on the context (the KPR_CTX_SKB ones left name each build's own
 * maps and pick its defaults); what they mean for NodePort's devices is stated here
 * (kpr_np_redirect_reaches).
 *
 * Per packet arriving from outside (kpr_np_from_netdev):
 *   1. a DSR header from another node's kpr: remember (backend, client) -> frontend, strip it;
 *   2. an ICMP error about a source-NATed flow: translate it back to the client;
 *   3. a reply to a source-NATed flow: restore client and frontend, send it to the client;
 *   4. a tracked flow (kpr_ct): same backend, same treatment as its first packet;
 *   5. a new flow to a frontend: source ranges, backend pick (random/Maglev/affinity), conntrack,
 *      then by backend: local -> DNAT and deliver to the pod; remote -> DNAT and SNAT
 *      (node address, allocated port) or DSR (client address kept, frontend carried along);
 *      no backend -> ICMP port unreachable (eTP=Local without a local backend: drop);
 *   6. anything else to an announced address (LB IP, ExternalIP): dropped, never routed back out.
 * Per packet leaving to the outside (kpr_np_to_netdev): replies of local and DSR backends, and
 * ICMP errors they send, get the frontend as their source.
 *
 * The work is split into stages reached by tail calls (kpr_np_calls), as Cilium does: one
 * program holding every path exceeds the 512-byte stack and loses the verifier in register
 * spills, and bcc cannot link BPF-to-BPF calls. A stage re-parses the packet and finds what
 * the stage before decided in a per-CPU map (kpr_np_state): XDP has no skb->cb. The entry
 * file defines one program per KPR_NP_CALL_* (kpr_np_stage_*() below) and the loader puts
 * them into kpr_np_calls.
 *
 * Maps owned here (pinned next to the shared ones): kpr_np_rev, kpr_np_fe, kpr_np_vip,
 * kpr_np_nodeaddr, kpr_np_dev, kpr_np_devkind, kpr_np_ports, kpr_np_unserved, kpr_np_nomode,
 * created and written by the NodePort facility (kpr.nodeport.facility) whichever hooks run; per build: its counters (kpr_np_stats and
 * kpr_np_fwd for tc, kpr_np_xstats and kpr_np_xfwd for XDP) and stages (kpr_np_calls, kpr_np_xcalls);
 * KPR_NP_CT_SLOTS builds: kpr_np_ct_slots and kpr_np_ct_gate (made by their compile, shared by
 * tc and XDP; read and freed by the collector, kpr.nodeport.gc).
 *
 * Forwarding is decided by what the FIB's egress device is (kpr_np_devkind, which the agent
 * keeps current from kpr.netdevs; values KPR_DEV_*): bpf_redirect_peer only into a veth or
 * netkit whose peer is in another namespace (anything else it would hand to the kernel, which
 * drops it after the program returned, unseen), bpf_redirect with the FIB's MACs or
 * bpf_redirect_neigh for every other device (a bridge forwards by its FDB, an overlay device
 * encapsulates), for a device the agent has not classified (yet) the kernel's stack when the
 * packet still has the client's source (a local pod's request) and bpf_redirect_neigh
 * otherwise (the stack drops a packet with the node's own address as its source). XDP can only
 * XDP_REDIRECT, and only a device with an XDP transmit path receives that (a veth only when its
 * peer runs XDP): it redirects to the external devices it is attached to and passes everything
 * else (pods' veths, bridges, overlays) to the stack. kpr_np_fwd counts how each packet left
 * and why one was given up on.
 */
#ifndef KPR_LIB_NODEPORT_H
#define KPR_LIB_NODEPORT_H

#if !defined(KPR_CTX_SKB) && !defined(KPR_CTX_XDP)
#error "include ctx/skb.h or ctx/xdp.h before lib/nodeport.h"
#endif

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/lb.h"
/* Conntrack keys as 64-bit words (KPR_CT_KEY_WORDS, lib/conntrack.h) are for the slot tables'
 * word reads. A build with four LRU inserts per new SNAT flow (KPR_NP_SNAT_IN_CT=0) writes them
 * field by field: with words, tc's kpr_np_snat passed BPF's 512 stack bytes (LLVM then ends the
 * compile). */
#if !defined(KPR_CT_KEY_WORDS) && defined(KPR_NP_SNAT_IN_CT)
#if !KPR_NP_SNAT_IN_CT
#define KPR_CT_KEY_WORDS 0
#endif
#endif
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/slots.h"
#include "lib/devkind.h"
#include "lib/fib.h"
#include "lib/monitor.h"

#ifdef KPR_CTX_SKB
#define KPR_NP_MON_HOOK KPR_MON_HOOK_TC // `kpr monitor` events say which build saw the packet
#else
#define KPR_NP_MON_HOOK KPR_MON_HOOK_XDP
#endif

/* --- tunables ---------------------------------------------------------------------- */

#define KPR_NP_MODE_SNAT 0   // remote backends: source NAT to the node's address
#define KPR_NP_MODE_DSR 1    // remote backends: keep the client's address, reply straight from the backend's node
#define KPR_NP_MODE_HYBRID 2 // DSR for TCP, SNAT for everything else

#ifndef KPR_NP_MODE
#define KPR_NP_MODE KPR_NP_MODE_SNAT // default mode (plugins.tc_nodeport.mode); per frontend: kpr_np_fe
#endif
#ifndef KPR_NP_PASS
#define KPR_NP_PASS CTX_PASS // verdict for packets kpr leaves alone (tc: TC_ACT_UNSPEC lets later filters run)
#endif
#ifndef KPR_NP_DSR
#ifdef KPR_CTX_SKB
#define KPR_NP_DSR 1 // DSR support (needs bpf_skb_adjust_room); 0: DSR frontends fall back to SNAT
#else
#define KPR_NP_DSR 0
#endif
#endif
#ifndef KPR_NP_PEER
#ifdef KPR_CTX_SKB
#define KPR_NP_PEER 1 // deliver to local pods with bpf_redirect_peer (skips the host's backlog queue)
#else
#define KPR_NP_PEER 0
#endif
#endif
#ifndef KPR_NP_ICMP_UNREACH
#define KPR_NP_ICMP_UNREACH 1 // 1: answer frontends without backends with ICMP port unreachable; 0: drop
#endif
#ifndef KPR_NP_ICMP_RATE
#define KPR_NP_ICMP_RATE 1000 // generated ICMP errors per second per CPU; 0: unlimited
#endif
#ifndef KPR_NP_REV_MAX
#define KPR_NP_REV_MAX 524288 // reverse translations (one per flow with a local, SNAT or DSR-received backend); LRU
#endif
#ifndef KPR_NP_FE_MAX
#define KPR_NP_FE_MAX 65536 // frontends with a per-service mode (annotation service.kpr.io/lb-mode)
#endif
#ifndef KPR_NP_VIP_MAX
#define KPR_NP_VIP_MAX 16384 // announced addresses (LoadBalancer IPs, ExternalIPs)
#endif
#ifndef KPR_NP_NODEADDR_MAX
#define KPR_NP_NODEADDR_MAX 1024 // node addresses a NodePort answers on
#endif
#ifndef KPR_NP_DEV_MAX
#define KPR_NP_DEV_MAX 256 // external devices (and key 0, the node's default SNAT addresses)
#endif

#ifndef KPR_NP_DEVKIND_MAX
#define KPR_NP_DEVKIND_MAX 16384 // classified devices: every link of the node's namespace (pods' veths too)
#endif
#ifndef KPR_NP_PREFILTER
#define KPR_NP_PREFILTER 1 // 1: a TCP/UDP packet to a port no frontend uses leaves after one bitmap test (kpr_np_ports)
#endif
#ifndef KPR_NP_EARLY_EXIT
#define KPR_NP_EARLY_EXIT 1 // 1: the prefilter's test on the raw headers before the full parse (kpr_np_early)
#endif
#ifndef KPR_NP_UNSERVED
#define KPR_NP_UNSERVED 1 // 1: the prefilter tests a port's bit in kpr_np_unserved (one line), 0: kpr_np_ports and its armed word
#endif
#ifndef KPR_NP_NOMODE
#define KPR_NP_NOMODE 1 // 1: a new flow to a frontend whose port's kpr_np_nomode bit is set takes the default mode, no kpr_np_fe lookup
#endif
#ifndef KPR_NP_EARLY_RAW
#define KPR_NP_EARLY_RAW 1 // 1: the fast exit hashes the destination from the packet's words and builds it on the stack only for a lookup that needs it (kpr_np_early)
#endif
#ifndef KPR_NP_EARLY_PARSE
#define KPR_NP_EARLY_PARSE 1 // 1: a plain TCP/UDP frame to a frontend's port goes from the fast exit's raw-header read to the service path (no second parse)
#endif
#ifndef KPR_NP_EST_INLINE
#define KPR_NP_EST_INLINE 1 // 1: an established SNAT flow with a cached next hop is rewritten and sent by the entry program (no state write, tail call, re-parse)
#endif
#ifndef KPR_NP_DNAT_ONE_PASS
#define KPR_NP_DNAT_ONE_PASS 1 // 1: DNAT to a local backend of an IPv4 TCP/UDP packet patches its L4 checksum once (tc: in place when the entry read the packet is not offloaded), not per field by helper; only with KPR_REWRITE_ONE_CSUM=1 and KPR_REWRITE_HELPERS=0 (it uses their kpr_nat_rewrite4_both): KPR_REWRITE_ONE_CSUM=0 turns it off too
#endif
#ifndef KPR_NP_EST_LOCAL
#define KPR_NP_EST_LOCAL 1 // 1: an established flow to a local backend whose next hop is cached is translated and sent (XDP: or passed) by the entry program (no tail call, re-parse, FIB or device lookups)
#endif
#ifndef KPR_NP_LAZY_SNAT_ADDR
#define KPR_NP_LAZY_SNAT_ADDR 1 // 1: the node address to SNAT to is looked up only when a flow's SNAT mapping is made
#endif
#ifndef KPR_NP_SNAT_IN_CT
/* 1: a new SNAT flow writes two LRU entries: conntrack (holding the SNAT address and port) and
 * one kpr_snat entry keyed by the reply tuple (holding client and frontend); 0: four, as
 * before (conntrack, SNAT forward and reverse, kpr_np_rev). Both builds read either kind. */
#define KPR_NP_SNAT_IN_CT 1
#endif
/* KPR_NP_SNAT_SLOTS (lib/nat.h, where kpr_snat_claim reads it; needs KPR_NP_SNAT_IN_CT and
 * KPR_NP_NEW_NH): 1: a new SNAT flow to a backend whose next hop is cached claims its reply side in
 * a slot of kpr_snat_slots (KPR_NP_CALL_SNAT_CLAIM), kpr_snat only when every slot tried is held.
 * On by default, with KPR_NP_CT_SLOTS (README issue 14, twentieth round; config flowSlots). */
#ifndef KPR_NP_NEW_NH
/* 1: a new SNAT flow to a backend whose next hop is cached takes its SNAT address from the
 * cached device and is sent there, without a FIB lookup; 0: new flows always look the route up */
#define KPR_NP_NEW_NH 1
#endif
#ifndef KPR_NP_NH_CACHE
/* 1: the SNAT stage caches each remote backend's next hop (kpr_np_nh: egress device, MACs)
 * and skips the FIB lookup while the agent's generation is unchanged; 0: a FIB lookup per packet */
#define KPR_NP_NH_CACHE 1
#endif
#ifndef KPR_NP_NH_SNAT_ADDR
#define KPR_NP_NH_SNAT_ADDR 1 // 1: a new SNAT flow to an IPv4 backend takes the SNAT address cached with its next hop (kpr_np_nh.nat4), no kpr_np_dev lookups
#endif
#ifndef KPR_NP_NH_MAX
#define KPR_NP_NH_MAX 65536 // cached next hops, by backend index (indexes above: a FIB lookup per packet)
#endif
#ifndef KPR_NP_CT_SLOTS
/* 1: NodePort's conntrack entries in a table of slots of its own (kpr_np_ct_slots, claimed by
 * compare-and-swap on a flow's first packet), kpr_ct (LRU, shared with host_routing) only for
 * a flow whose slots are all held and for flows an older build began, consulted after a slot
 * miss only while kpr_np_ct_gate says NodePort entries may be there; 0: kpr_ct only (config
 * flowSlots: false builds both slot tables off: kpr.nodeport.datapath.NO_SLOTS). */
#define KPR_NP_CT_SLOTS 1
#endif
#ifndef KPR_NP_CT_PROBES
/* Slots a flow may take, from its hash on (adjacent: two lines each). 2: a table F full sends
 * about F squared of new flows to kpr_ct (1, direct-mapped: F of them; at half full that cost
 * more than kpr_ct alone, README issue 14, seventeenth round). The verifier walks the probe loops,
 * with their expiry test, once per path into the service path: 2 loads (XDP ingress 755k of the
 * million, tc 781k, since the fast exit's raw address test); 4 did only before the SNAT slots. */
#define KPR_NP_CT_PROBES 2
#endif
#ifndef KPR_NP_SYN_FIRST
/* With both slot tables (KPR_NP_CT_SLOTS, KPR_NP_SNAT_SLOTS): 1, a TCP SYN is balanced before its
 * conntrack slots are read (the claim finds a live entry of the tuple and follows it; kpr_ct,
 * where a flow that overflowed its slots lives, is read after the pick while the gates say it
 * may hold the tuple: kpr_np_ct_lru_syn), and the slot of the first SNAT port its claim will try
 * (a keyed hash of the tuple, kpr_snat_first_port) is loaded just before them: the two cold lines
 * of a new flow in flight together instead of one after the other (XDP new SNAT flow 685 -> 499
 * ns above bare, README issue 14, nineteenth round). tc: 0, its ingress walk would be 938k of the
 * verifier's million. */
#ifdef KPR_CTX_XDP
#define KPR_NP_SYN_FIRST 1
#else
#define KPR_NP_SYN_FIRST 0
#endif
#endif
#ifndef KPR_NP_TEST_EARLY_FULL
#define KPR_NP_TEST_EARLY_FULL 0 // tests only: non-zero, the verdict of a packet kpr_np_early leaves to the full path (KPR_NP_EARLY_FULL), returned in place of that path: which packets the fast exit decided
#endif
#ifndef KPR_NP_BENCH_STOP
#define KPR_NP_BENCH_STOP 0 // benchmarks only: return at stop point N (KPR_NP_STOP) to time the stages before it (7, 8: the entry program's established path; 9-11: a new flow's lookups)
#endif
// Per-stage timing (benchmarks/bench_xdp_nodeport.py): a build with -DKPR_NP_BENCH_STOP=N leaves here.
#define KPR_NP_STOP(n)                      \
	do {                                \
		if (KPR_NP_BENCH_STOP == (n)) \
			return CTX_PASS;     \
	} while (0)

#ifndef KPR_DSR_EDIT
#define KPR_DSR_EDIT KPR_NP_DSR // DSR header insertion/removal exactly when DSR is on
#endif
#include "lib/icmp.h"
#include "lib/dsr.h"

// Frontend types reached from outside the node; ClusterIP traffic is left to the kernel/socket LB.
#define KPR_NP_SVC_TYPES (KPR_SVC_F_NODE_PORT | KPR_SVC_F_LOAD_BALANCER | KPR_SVC_F_EXTERNAL_IP | KPR_SVC_F_HOST_PORT)

/* --- counters (kpr.nodeport.datapath.STATS mirrors the order) ---------------- */

#define KPR_NP_ST_NEW_LOCAL 0        // new flows to a backend on this node
#define KPR_NP_ST_NEW_SNAT 1         // new flows to a remote backend, source-NATed
#define KPR_NP_ST_NEW_DSR 2          // new flows to a remote backend, DSR
#define KPR_NP_ST_ESTABLISHED 3      // packets of tracked flows forwarded
#define KPR_NP_ST_REPLY_REVNAT 4     // replies of local/DSR backends given the frontend as source (egress)
#define KPR_NP_ST_REPLY_SNAT 5       // replies to source-NATed flows sent back to the client (ingress)
#define KPR_NP_ST_DSR_RECEIVED 6     // DSR headers received and stripped (this node has the backend)
#define KPR_NP_ST_ICMP_SENT 7        // ICMP port unreachable / fragmentation needed sent
#define KPR_NP_ST_ICMP_XLATED 8      // ICMP errors about tracked flows translated
#define KPR_NP_ST_DROP_NO_BACKEND 9  // dropped: frontend without backend (ICMP off, limited or failed)
#define KPR_NP_ST_DROP_NO_LOCAL 10   // dropped: externalTrafficPolicy=Local and no local backend
#define KPR_NP_ST_DROP_SRC_RANGE 11  // dropped: client outside loadBalancerSourceRanges
#define KPR_NP_ST_DROP_VIP 12        // dropped: announced address, port or protocol it does not serve
#define KPR_NP_ST_DROP_SNAT_PORT 13  // dropped: no free SNAT port (exhaustion)
#define KPR_NP_ST_DROP_NAT 14        // dropped: a rewrite failed (truncated headers, SCTP port change)
#define KPR_NP_ST_DROP_DSR 15        // dropped: DSR header could not be added or removed
#define KPR_NP_ST_DROP_DSR_BAD 16    // dropped: DSR header naming no frontend of this cluster
#define KPR_NP_ST_DROP_MTU 17        // dropped: DSR header would exceed the MTU and DF is clear
#define KPR_NP_ST_DROP_NO_REV 18     // dropped: reply to a SNAT port whose frontend is unknown
#define KPR_NP_ST_DROP_NO_SNAT_ADDR 19 // dropped: no node address of the egress device's family to SNAT to
#define KPR_NP_ST_MALFORMED 20       // passed: headers kpr could not parse
#define KPR_NP_ST_FRAGMENT 21        // passed: non-first fragments (no ports to balance on)
#define KPR_NP_ST_FIB_PASS 22        // handed to the kernel: no usable route in the FIB lookup
#define KPR_NP_ST_CT_FAILED 23       // conntrack or reverse entry could not be written (flow still forwarded)
#define KPR_NP_ST_STALE_BACKEND 24   // tracked flow whose backend is gone: balanced again
#define KPR_NP_ST_ICMP_LIMITED 25    // ICMP errors not sent: rate limit
#define KPR_NP_ST_TAIL_MISSING 26    // dropped: a stage program is missing from kpr_np_calls
#define KPR_NP_ST_REV_STALE 27       // passed: a new connection's SYN-ACK met the reverse entry of an ended flow (deleted)
#define KPR_NP_ST_SNAT_SLOT_FULL 28  // new SNAT flows whose reply side went into kpr_snat: every kpr_snat_slots slot tried held (KPR_NP_SNAT_SLOTS)
#define KPR_NP_ST_CT_SLOT_FULL 29    // new flows whose conntrack slots were all held: written to kpr_ct (KPR_NP_CT_SLOTS)
#define KPR_NP_ST_DROP_CT_CLAIM 30   // dropped: another CPU was writing the entry of the same new flow (KPR_NP_CT_SLOTS)
#define KPR_NP_ST_MAX 31

/* --- how packets left (kpr_np_fwd; kpr.nodeport.datapath reads the names from here) --- */

#define KPR_NP_FWD_PEER 0                 // into a pod's namespace with bpf_redirect_peer (veth/netkit peer)
#define KPR_NP_FWD_NEIGH 1                // bpf_redirect_neigh: the kernel resolves the next hop's MAC
#define KPR_NP_FWD_REDIRECT 2             // bpf_redirect with the FIB's MACs (XDP: XDP_REDIRECT)
#define KPR_NP_FWD_STACK_UNKNOWN_DEV 3    // given up, to the kernel's stack: egress device not classified (yet)
#define KPR_NP_FWD_STACK_XDP_UNREACHABLE 4 // given up (XDP), to the stack: XDP_REDIRECT cannot reach that device
#define KPR_NP_FWD_STACK_NO_NEIGH 5       // given up (XDP), to the stack: the next hop's MAC is not known yet
#define KPR_NP_FWD_DROP_SHORT 6           // dropped: frame shorter than an Ethernet header
// Never written by the programs: the reader reports the sum of the KPR_NP_FWD_CACHED_BY_KIND
// slots here (redirects to a next hop cached per backend, no FIB lookup).
#define KPR_NP_FWD_NH_CACHED 7
#define KPR_NP_FWD_BY_KIND 8              // + KPR_DEV_*: packets routed out of a device of that kind
// + KPR_DEV_*: redirects to a cached next hop out of a device of that kind. One increment per
// such packet (issue 14: three cost 0.4x of the tc established ratio); the reader adds each
// slot into fwd_redirect, egress_<kind> and fwd_nh_cached, so those keep their meaning.
#define KPR_NP_FWD_CACHED_BY_KIND (KPR_NP_FWD_BY_KIND + KPR_DEV_COUNT)
#define KPR_NP_FWD_MAX (KPR_NP_FWD_CACHED_BY_KIND + KPR_DEV_COUNT)

/* --- stages (kpr.nodeport.datapath.CALLS mirrors the order) ------------------- */

#define KPR_NP_CALL_LOCAL 0       // DNAT to a local backend, deliver to the pod
#define KPR_NP_CALL_SNAT 1        // DNAT + SNAT to a remote backend
#define KPR_NP_CALL_DSR 2         // DNAT + DSR header to a remote backend
#define KPR_NP_CALL_NO_BACKEND 3  // ICMP port unreachable for a frontend without backends
#define KPR_NP_CALL_SNAT_REPLY 4  // a reply to a source-NATed flow, back to the client
#define KPR_NP_CALL_DSR_RECV 5    // a DSR header for a backend on this node
#define KPR_NP_CALL_ICMP_IN 6     // an ICMP error from outside about a source-NATed flow
#define KPR_NP_CALL_ICMP_OUT 7    // an ICMP error from a local/DSR backend, leaving
#define KPR_NP_CALL_SNAT_CLAIM 8  // a new SNAT flow's reply side in a kpr_snat_slots slot, then KPR_NP_CALL_SNAT (KPR_NP_SNAT_SLOTS)
#define KPR_NP_CALL_MAX 9

/* --- structs ------------------------------------------------------------------------- */

#define KPR_NP_REV_F_DSR (1U << 0)     // made from a DSR header (this node has the backend; no conntrack entry)
#define KPR_NP_REV_F_CLOSING (1U << 1) // FIN or RST seen in a reply

// kpr_np_rev value (key: struct kpr_ct_key of the reply, backend -> client, dir REPLY).
struct kpr_np_rev {
	union kpr_addr addr; // frontend address replies must come from (the address the client dialled)
	__be16 port;         // frontend port
	__u16 flags;         // KPR_NP_REV_F_*
	__u32 pad;           // zero
	__u64 last_seen;     // kpr_ct_now() at creation or the last refresh (at most once a second), ns
};

// kpr_np_fe key: a frontend as the service map keys it (wildcard address for NodePort).
struct kpr_np_fe_key {
	union kpr_addr addr; // frontend address
	__be16 port;         // frontend port
	__u8 proto;          // IPPROTO_*
	__u8 pad;            // zero
};

// kpr_np_fe value: per-frontend overrides of the plugin's defaults.
struct kpr_np_fe {
	__u8 mode;   // KPR_NP_MODE_*
	__u8 pad[3]; // zero
};

// kpr_np_dev value (key: ifindex; 0 = defaults): the address a flow leaving through it is SNATed to.
struct kpr_np_dev {
	union kpr_addr addr4; // IPv4 (v4-mapped); zero: none
	union kpr_addr addr6; // IPv6; zero: none
	__u32 flags;          // reserved, zero
	__u32 pad;            // zero
};

#define KPR_NP_NH_GEN 0 // kpr_np_nh key holding the generation (backend index 0 is never used)
#define KPR_NP_NH_EXTERNAL (1U << 8) // kpr_np_nh kind: ifindex is an external device (kpr_np_dev)

/* kpr_np_nh value: the route to a backend as a FIB lookup answered it, for the next packets of
 * the SNAT stage (remote backends) and, on XDP, of kpr_np_est_local (local ones). Key
 * KPR_NP_NH_GEN's gen is the current generation: the agent (kpr.nodeport.nexthops) bumps it
 * when a route, a neighbour or a device's kind or addresses (kpr_np_devkind, kpr_np_dev: kind
 * and KPR_NP_NH_EXTERNAL are copies) change, which makes every cached entry stale at once; 0
 * there: nothing is cached (not armed yet). Keyed per backend while the lookup depends on the
 * flow (ingress device, client source, ports): with source- or ingress-based `ip rule`s or
 * L4-hash multipath routes the first flow's answer is reused for every flow to the backend. */
struct kpr_np_nh {
	__u32 gen;           // the generation it was cached in
	__u32 ifindex;       // egress device (bpf_redirect / XDP_REDIRECT with these MACs)
	__u8 smac[6];        // the route's source MAC
	__u8 dmac[6];        // the next hop's MAC
	__u32 kind;          // KPR_DEV_* of ifindex (the forwarding counters) | KPR_NP_NH_EXTERNAL | mtu << 16
	__be32 nat4;         // an IPv4 backend's SNAT address by ifindex (kpr_np_snat_addr); 0: look it up
	__u32 pad;           // zero (validity is the generation's: no time kept)
	union kpr_addr addr; // the backend's address (an index reused for another backend misses)
};

_Static_assert(sizeof(struct kpr_np_rev) == 32, "kpr_np_rev layout");
_Static_assert(sizeof(struct kpr_np_nh) == 48, "kpr_np_nh layout");
_Static_assert(sizeof(struct kpr_np_fe_key) == 20, "kpr_np_fe_key layout");
_Static_assert(sizeof(struct kpr_np_fe) == 4, "kpr_np_fe layout");
_Static_assert(sizeof(struct kpr_np_dev) == 40, "kpr_np_dev layout");

// What the service stage decided, for the stage it tail-calls.
struct kpr_np_state {
	__u32 backend_id;        // the flow's backend id (generation << 24 | index: kpr_lb_backend())
	__u16 flags;             // the flow's KPR_CT_F_*
	__u8 created;            // 1: the flow's first packet (reverse entries are written then)
	__u8 pad;                // zero
	__u32 rev_nat;           // the frontend's rev-NAT index (a SNAT flow's conntrack entry is written by its stage)
	__be16 nat_port;         // SNAT flows: the mapping from the conntrack entry; 0: none yet
	__u16 pad2;              // zero
	union kpr_addr nat_addr; // with nat_port
	// The backend as looked up there (same packet, same CPU: a tail call is immediate). The
	// parse is not carried: offsets read back from a map are unbounded for the verifier, and
	// re-parsing costs less than bounding every use.
	struct kpr_backend be;
	__u32 ct_slot;           // KPR_NP_CT_SLOTS: the flow's conntrack slot, index + 1; 0: none (kpr_ct)
	__u32 pad3;              // zero
};

// One CPU's ICMP rate-limit bucket.
struct kpr_np_rl {
	__u64 stamp;  // kpr_now() when the bucket was last refilled
	__u64 tokens; // errors still allowed in this second
};

/* --- maps ---------------------------------------------------------------------------- */

// (backend, client) of a reply -> the frontend it must come from. LRU: active flows stay.
BPF_TABLE_PINNED("lru_hash", struct kpr_ct_key, struct kpr_np_rev, kpr_np_rev, KPR_NP_REV_MAX, KPR_PIN(kpr_np_rev));
// Next hops of backends (remote; local too on XDP) by backend index (KPR_NP_NH_CACHE), key 0 the generation.
BPF_TABLE_PINNED("array", __u32, struct kpr_np_nh, kpr_np_nh, KPR_NP_NH_MAX, KPR_PIN(kpr_np_nh));
// Frontends whose service overrides the default mode.
BPF_TABLE_PINNED("hash", struct kpr_np_fe_key, struct kpr_np_fe, kpr_np_fe, KPR_NP_FE_MAX, KPR_PIN(kpr_np_fe));
// Announced addresses: traffic to them that no frontend takes is dropped.
BPF_TABLE_PINNED("hash", union kpr_addr, __u32, kpr_np_vip, KPR_NP_VIP_MAX, KPR_PIN(kpr_np_vip));
// Node addresses: a port miss on them retries the wildcard NodePort entry.
BPF_TABLE_PINNED("hash", union kpr_addr, __u32, kpr_np_nodeaddr, KPR_NP_NODEADDR_MAX, KPR_PIN(kpr_np_nodeaddr));
// External devices by ifindex (0: defaults): SNAT addresses; also tells pod devices from external ones.
BPF_TABLE_PINNED("hash", __u32, struct kpr_np_dev, kpr_np_dev, KPR_NP_DEV_MAX, KPR_PIN(kpr_np_dev));
/* Frontend ports (kpr_np_ports, written by the agent from every external frontend): bit
 * (port & 63) of word (proto index * KPR_NP_PORT_WORDS_UDP | port >> 6), TCP index 0, UDP 1; word
 * KPR_NP_PORTS_ARMED is non-zero once the agent wrote them all (until then nothing exits early;
 * read only by KPR_NP_UNSERVED=0 builds and older programs still attached: the others read
 * kpr_np_unserved, whose words stay zero until then).
 * The KPR_NP_VIP_WORDS words from KPR_NP_VIP_BITS hold a bit per announced address (kpr_np_vip), at
 * kpr_np_vip_hash(): a clear bit spares the early exit the announced-address lookup. */
#define KPR_NP_PORT_WORDS_UDP 1024 // the first UDP port word (TCP's from 0): 65536 ports / 64 bits
#define KPR_NP_PORTS_ARMED (2 * KPR_NP_PORT_WORDS_UDP)
#define KPR_NP_VIP_BITS (KPR_NP_PORTS_ARMED + 1)
#define KPR_NP_VIP_HASH_MASK 0xffff // kpr_np_vip_hash()'s values (kpr.nodeport.datapath.vip_hash reads it)
// kpr_np_ports' words from KPR_NP_VIP_BITS: a bit per kpr_np_vip_hash() value
#define KPR_NP_VIP_WORDS ((KPR_NP_VIP_HASH_MASK >> 6) + 1)
BPF_TABLE_PINNED("array", __u32, __u64, kpr_np_ports, KPR_NP_VIP_BITS + KPR_NP_VIP_WORDS, KPR_PIN(kpr_np_ports));
/* The same port words inverted, armed in each bit (kpr_np_unserved, written with kpr_np_ports): a
 * set bit is a port no frontend has, once the agent armed kpr_np_ports; all clear (as created)
 * before. The prefilter reads this word alone: no armed word's line of its own, so a packet
 * that leaves early reads two lines (this word, the announced-address bit), not three. */
#define KPR_NP_UNSERVED_WORDS (2 * KPR_NP_PORT_WORDS_UDP)
BPF_TABLE_PINNED("array", __u32, __u64, kpr_np_unserved, KPR_NP_UNSERVED_WORDS, KPR_PIN(kpr_np_unserved));
/* Ports no frontend overrides the mode on (kpr_np_nomode, written by the agent with kpr_np_fe),
 * indexed as kpr_np_unserved (bit port & 63 of word proto index * KPR_NP_PORT_WORDS_UDP | port >> 6): a
 * set bit says kpr_np_fe holds no key of that port and protocol, so a new flow to a frontend
 * there takes the default mode without the kpr_np_fe lookup, a hash bucket of 1 MiB and a cold
 * line of its own when new flows spread over many frontends. Clear (as created): look it up.
 * The agent clears a bit before it writes a kpr_np_fe key of its port, and sets it only once
 * the port's last key is gone. */
#define KPR_NP_NOMODE_WORDS (2 * KPR_NP_PORT_WORDS_UDP)
BPF_TABLE_PINNED("array", __u32, __u64, kpr_np_nomode, KPR_NP_NOMODE_WORDS, KPR_PIN(kpr_np_nomode));
// What each device is (ifindex -> KPR_DEV_*), for the forwarding helper it allows.
BPF_TABLE_PINNED("hash", __u32, __u32, kpr_np_devkind, KPR_NP_DEVKIND_MAX, KPR_PIN(kpr_np_devkind));
/* Counters, per CPU, per hook: tc and XDP on one node (XDP in front, tc behind it for local
 * backends and replies) each count into their own pair, so each plugin reports its own packets
 * (kpr.nodeport.datapath.Datapath.STATS_MAP / FWD_MAP name the pins). */
#ifdef KPR_CTX_SKB
#define KPR_NP_PIN_STATS "kpr_np_stats"
#define KPR_NP_PIN_FWD "kpr_np_fwd"
#else
#define KPR_NP_PIN_STATS "kpr_np_xstats"
#define KPR_NP_PIN_FWD "kpr_np_xfwd"
#endif
// KPR_NP_ST_* counters.
BPF_TABLE_PINNED("percpu_array", __u32, __u64, kpr_np_stats, KPR_NP_ST_MAX, KPR_PIN_PATH "/" KPR_NP_PIN_STATS);
// Forwarding counters (KPR_NP_FWD_*): a map of its own, so kpr_np_stats keeps its size.
BPF_TABLE_PINNED("percpu_array", __u32, __u64, kpr_np_fwd, KPR_NP_FWD_MAX, KPR_PIN_PATH "/" KPR_NP_PIN_FWD);
// ICMP rate limiting, per CPU; not pinned: a restart may refill the buckets.
BPF_PERCPU_ARRAY(kpr_np_icmp_rl, struct kpr_np_rl, 1);
// Hand-over between stages of one packet (same CPU throughout: programs do not migrate).
BPF_PERCPU_ARRAY(kpr_np_state, struct kpr_np_state, 1);
// The stage programs (KPR_NP_CALL_*). Pinned: a program array drops its entries when its last
// user reference goes, which would break attached programs of an agent that exited.
// A program array serves one program type only: an XDP build has its own (kpr_np_xcalls).
// Each build pins its own array (KPR_NP_CALLS_PIN, named per load by the plugin): the stages
// hand state over in the build's own kpr_np_state, so an entry must only ever reach its own
// build's stages; the link update that installs a new entry switches entry and stages at once.
#ifndef KPR_NP_CALLS_PIN
#ifdef KPR_CTX_SKB
#define KPR_NP_CALLS_PIN "kpr_np_calls" // pin name of the stage array under KPR_PIN_PATH
#else
#define KPR_NP_CALLS_PIN "kpr_np_xcalls"
#endif
#endif
#ifdef KPR_CTX_SKB
BPF_TABLE_PINNED("prog", __u32, __u32, kpr_np_calls, KPR_NP_CALL_MAX, KPR_PIN_PATH "/" KPR_NP_CALLS_PIN);
#else
BPF_TABLE_PINNED("prog", __u32, __u32, kpr_np_xcalls, KPR_NP_CALL_MAX, KPR_PIN_PATH "/" KPR_NP_CALLS_PIN);
#endif

/* --- small helpers -------------------------------------------------------------------- */

static __always_inline void kpr_np_count(__u32 idx)
{
	__u64 *c = kpr_np_stats.lookup(&idx);

	if (c)
		*c += 1;
}

static __always_inline void kpr_np_fwd_count(__u32 idx)
{
	__u64 *c = kpr_np_fwd.lookup(&idx);

	if (c)
		*c += 1;
}

// A drop counted and told to `kpr monitor` under the counter's name (KPR_MON_R_*).
static __always_inline void kpr_np_drop(__u32 idx, __u8 reason, const struct kpr_tuple *t)
{
	kpr_np_count(idx);
	kpr_mon_flow(KPR_MON_T_DROP, KPR_NP_MON_HOOK, reason, t, 0, 0, (void *)0);
}

// Continue with stage `idx`; returns only when that stage is missing.
static __always_inline int kpr_np_tail(kpr_ctx_t *ctx, __u32 idx)
{
#ifdef KPR_CTX_SKB
	kpr_np_calls.call(ctx, idx);
#else
	kpr_np_xcalls.call(ctx, idx);
#endif
	kpr_np_count(KPR_NP_ST_TAIL_MISSING);
	// no tuple here (kpr_np_dispatch has none): the event names the reason only
	kpr_mon_bare(KPR_MON_T_DROP, KPR_NP_MON_HOOK, KPR_MON_R_TAIL_CALL_MISSING);
	return CTX_DROP;
}

// Drop packets to an announced address nobody serves; leave everything else alone.
static __always_inline int kpr_np_vip_guard(const struct kpr_pkt *pkt)
{
	union kpr_addr a = pkt->t.daddr;

	if (kpr_np_vip.lookup(&a)) {
		kpr_np_drop(KPR_NP_ST_DROP_VIP, KPR_MON_R_VIP_UNSERVED, &pkt->t);
		return CTX_DROP;
	}
	return KPR_NP_PASS;
}

// The word of kpr_np_ports' port words, kpr_np_unserved and kpr_np_nomode holding `port`'s bit
// (port & 63), host order: TCP words first, then UDP's (kpr.nodeport.datapath.port_bit).
static __always_inline __u32 kpr_np_port_word(__u8 proto, __u16 port)
{
	return (proto == IPPROTO_UDP ? KPR_NP_PORT_WORDS_UDP : 0) | (port >> 6);
}

// Whether a TCP/UDP tuple's destination port is a frontend's (or the bitmap is not armed yet).
static __always_inline int kpr_np_port_served(const struct kpr_tuple *t)
{
	__u16 port = kpr_ntohs(t->dport);
	__u32 k = kpr_np_port_word(t->proto, port);
#if KPR_NP_UNSERVED
	__u64 *w = kpr_np_unserved.lookup(&k);

	return !w || !((*w >> (port & 63)) & 1);
#else
	__u64 *w = kpr_np_ports.lookup(&k);

	// the port's bit first: a service's packet is served without reading the armed word (a
	// cache line of its own); a clear bit counts only once the agent armed the bitmap
	if (!w || ((*w >> (port & 63)) & 1))
		return 1;
	k = KPR_NP_PORTS_ARMED;
	w = kpr_np_ports.lookup(&k);
	return !w || !*w;
#endif
}

// kpr_np_vip_hash() of an address whose four words xor to `x` (the fast exit's from the packet).
static __always_inline __u32 kpr_np_vip_fold(__u32 x)
{
	return (x ^ (x >> 16)) & KPR_NP_VIP_HASH_MASK;
}

// Hash of an address for the announced-address bits (kpr.nodeport.datapath.vip_hash mirrors it).
static __always_inline __u32 kpr_np_vip_hash(const union kpr_addr *a)
{
	return kpr_np_vip_fold(a->w[0] ^ a->w[1] ^ a->w[2] ^ a->w[3]);
}

// Whether an address of kpr_np_vip_hash() `h` may be an announced one (its bit is set, or the bits are not there).
static __always_inline int kpr_np_maybe_vip_hash(__u32 h)
{
	__u32 k = KPR_NP_VIP_BITS + (h >> 6);
	__u64 *w = kpr_np_ports.lookup(&k);

	return !w || ((*w >> (h & 63)) & 1);
}

// Whether the address may be an announced one.
static __always_inline int kpr_np_maybe_vip(const union kpr_addr *a)
{
	return kpr_np_maybe_vip_hash(kpr_np_vip_hash(a));
}

static __always_inline int kpr_np_icmp_allowed(void)
{
#if KPR_NP_ICMP_RATE
	__u32 zero = 0;
	struct kpr_np_rl *rl = kpr_np_icmp_rl.lookup(&zero);
	__u64 now;

	if (!rl)
		return 1;
	now = kpr_now();
	if (now - rl->stamp >= 1000000000ULL) {
		rl->stamp = now;
		rl->tokens = KPR_NP_ICMP_RATE;
	}
	if (!rl->tokens) {
		kpr_np_count(KPR_NP_ST_ICMP_LIMITED);
		return 0;
	}
	rl->tokens--;
#endif
	return 1;
}

// Remember that replies from backend to client must come from the frontend.
static __always_inline void kpr_np_rev_create(const union kpr_addr *b, __be16 bport, const union kpr_addr *c,
					      __be16 cport, __u8 proto, const union kpr_addr *fe, __be16 fport,
					      __u16 flags)
{
	struct kpr_ct_key k;
	struct kpr_np_rev v = {};

	kpr_ct_reply_key(&k, b, bport, c, cport, proto);
	v.addr = *fe;
	v.port = fport;
	v.flags = flags;
	v.last_seen = kpr_ct_now();
	if (kpr_np_rev.update(&k, &v))
		kpr_np_count(KPR_NP_ST_CT_FAILED);
}

// Refresh a reverse entry from a packet of its flow (at most once a second: fewer writes to a shared line).
static __always_inline void kpr_np_rev_touch(struct kpr_np_rev *rev, __u8 tcp_flags)
{
	__u64 now = kpr_ct_now();

	if (tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)) {
		if (!(rev->flags & KPR_NP_REV_F_CLOSING))
			rev->flags |= KPR_NP_REV_F_CLOSING;
		rev->last_seen = now;
	} else if (now - rev->last_seen > KPR_CT_TOUCH_INTERVAL_NS) {
		rev->last_seen = now;
	}
}

// Whether no frontend of `key`'s port and protocol has a kpr_np_fe entry (kpr_np_nomode's bit).
static __always_inline int kpr_np_mode_plain(const struct kpr_svc_key *key)
{
#if KPR_NP_NOMODE
	__u16 port = kpr_ntohs(key->port);
	__u32 k = kpr_np_port_word(key->proto, port);
	__u64 *w;

	if (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP)
		return 0;
	w = kpr_np_nomode.lookup(&k);
	return w && ((*w >> (port & 63)) & 1);
#else
	return 0;
#endif
}

// The mode for a new flow to a remote backend of the frontend `key` found.
static __always_inline __u8 kpr_np_mode_of(const struct kpr_svc_key *key, __u8 proto)
{
	struct kpr_np_fe_key fk = {};
	struct kpr_np_fe *o;
	__u8 mode = KPR_NP_MODE;

#if !KPR_NP_DSR
	// every remote backend is source-NATed: no per-frontend mode to look up (a frontend's
	// kpr_np_fe bucket is a cache miss of its own when new flows spread over many frontends)
	return KPR_NP_MODE_SNAT;
#endif
	if (!kpr_np_mode_plain(key)) {
		fk.addr = key->addr;
		fk.port = key->port;
		fk.proto = key->proto;
		o = kpr_np_fe.lookup(&fk);
		if (o)
			mode = o->mode;
	}
	if (mode == KPR_NP_MODE_HYBRID)
		mode = proto == IPPROTO_TCP ? KPR_NP_MODE_DSR : KPR_NP_MODE_SNAT;
	return mode;
}

/* --- NodePort's conntrack in slots (KPR_NP_CT_SLOTS) ----------------------------------- */

/* A NodePort flow's ORIGINAL conntrack entry (struct kpr_ct_entry: the same expiry and refresh
 * rules as kpr_ct's, lib/conntrack.h) in a slot of kpr_np_ct_slots (lib/slots.h), indexed by the
 * key's hash (KPR_NP_CT_PROBES slots from it): a new flow's miss reads the lines its entry is then
 * written to, where kpr_ct's insert takes an LRU element and links it into a bucket (issue 14).
 * The flow's first packet claims the slot (compare-and-swap) whatever the flow's stage; a SNAT
 * flow's stage adds the mapping. A flow whose probes are all held goes into kpr_ct as before
 * (counted ct_slot_full), and kpr_ct is read after a slot miss only while both kpr_np_ct_gate and
 * the key's home slot (its first probe: lru_adds, lru_clean) say NodePort entries may be there.
 * The collector (kpr.nodeport.gc) frees the slots of expired
 * and stale flows. */
#define KPR_NP_CT_SLOTS_N 262144 // kpr_np_ct_slots' slots: twice kpr_ct's default; a power of two, fixed (the programs' index mask)
#define KPR_NP_CT_KEY_DWORDS 5   // struct kpr_ct_key in 64-bit words

struct kpr_np_ct_slot {
	__u64 claim;              // KPR_SLOT_FREE, or the claim stamp (kpr_ct_now() | 1)
	struct kpr_ct_key key;    // the flow's ORIGINAL key (written last)
	struct kpr_ct_entry val;  // its entry
	/* The home slot's gate (the rule of struct kpr_np_ct_gate, for the keys whose first probe
	 * this slot is): programs add 1 to lru_adds before and after writing such a key's NodePort
	 * entry to kpr_ct; the collector writes lru_clean = lru_adds as read before its sweep + 1 when
	 * the sweep left no entry of a key homed here (0 when it did). Kept when the slot is freed or
	 * claimed: they belong to the index, not to the flow in it. So one overflow opens kpr_ct's
	 * look for the keys of its own home, where the table's gate opens it for every key. */
	__u64 lru_adds;
	__u64 lru_clean;
	__u8 pad[24];             // zero
};

/* Whether kpr_ct may hold NodePort entries: unless clean == overflows + 1. A program adds 1 to
 * overflows before and after it writes a NodePort entry to kpr_ct; the collector reads
 * overflows, sweeps kpr_ct, and when the sweep found no NodePort entry writes clean = what it
 * read + 1. An entry written before that read is swept (and then clean is not written); one
 * whose write ends after it moved overflows past it. Zero (a new pin: an upgrade whose kpr_ct
 * holds an older build's flows): not clean, until the collector's first sweep. */
struct kpr_np_ct_gate {
	__u64 overflows; // NodePort writes to kpr_ct so far (two adds each)
	__u64 clean;     // overflows + 1 as read before the collector's last sweep that found none
};

_Static_assert(sizeof(struct kpr_np_ct_slot) == KPR_SLOT_SIZE, "kpr_np_ct_slot layout");
_Static_assert(sizeof(struct kpr_np_ct_gate) == 16, "kpr_np_ct_gate layout");

#define KPR_NP_CT_FOUND (1U << 31) // kpr_np_ct_probe: the index holds the key's live entry
#define KPR_NP_CT_NONE (~0U)       // kpr_np_ct_probe: no live entry of the key, no free probe

#define KPR_NP_CT_CLAIMED 0 // kpr_np_ct_claim: the flow's entry is in the slot this packet claimed
#define KPR_NP_CT_FOLLOW 1  // another CPU's packet of the flow claimed first: *won is a copy of its entry
#define KPR_NP_CT_BUSY 2    // two CPUs' first packets of the flow met: this one is dropped (the client resends)
#define KPR_NP_CT_FULL 3    // every probe held: the entry belongs in kpr_ct

/* One CPU's room for a new flow's claim (kpr_np_ct_claim): the entry it writes and a copy of its
 * key (for kpr_ct when every probe is held), and the copy of the entry a claim follows. On the
 * stack, with kpr_ct_write's own key and entry for that overflow, they took tc's kpr_np_ingress
 * to 504 of BPF's 512 bytes (over it with KPR_NP_EARLY_PARSE=0, where LLVM ends the compile);
 * with the room, 440 (XDP 424). A key to hash stays on the stack: written here in narrow fields and read
 * back in words, its loads wait for the stores to reach the cache, and those wait for every
 * older load, the SNAT slot's touched line among them (XDP new SNAT flow 506 -> 660 ns); the
 * claim copies its key here only for an overflow (copied at once: 22-66 ns more a new flow). */
struct kpr_np_claim_room {
	struct kpr_ct_key k;
	struct kpr_ct_entry e;
	struct kpr_ct_entry won; // KPR_NP_CT_FOLLOW: the entry of the flow's slot, as the claim read it
};

#if KPR_NP_CT_SLOTS
BPF_PERCPU_ARRAY(kpr_np_claim, struct kpr_np_claim_room, 1);

BPF_TABLE_PINNED("array", __u32, struct kpr_np_ct_slot, kpr_np_ct_slots, KPR_NP_CT_SLOTS_N, KPR_PIN(kpr_np_ct_slots),
		 BPF_F_MMAPABLE);
// Mmapable: the collector writes the clean word alone (a whole-value update could lose an add).
BPF_TABLE_PINNED("array", __u32, struct kpr_np_ct_gate, kpr_np_ct_gate, 1, KPR_PIN(kpr_np_ct_gate), BPF_F_MMAPABLE);

// Whether kpr_ct may hold NodePort entries (struct kpr_np_ct_gate).
static __always_inline int kpr_np_ct_lru_maybe(void)
{
	__u32 zero = 0;
	struct kpr_np_ct_gate *g = kpr_np_ct_gate.lookup(&zero);

	if (KPR_NP_TEST_GATES_SHUT)
		return 0;
	return !g || *(volatile __u64 *)&g->clean != *(volatile __u64 *)&g->overflows + 1;
}

// Whether kpr_ct may hold NodePort entries of the keys whose home slot is `home`.
static __always_inline int kpr_np_ct_home_maybe(__u32 home)
{
	struct kpr_np_ct_slot *s = kpr_np_ct_slots.lookup(&home);

	return !s || *(volatile __u64 *)&s->lru_clean != *(volatile __u64 *)&s->lru_adds + 1;
}

// A mark on the table's gate and on the key's home slot (`home`), before and after a kpr_ct write.
static __always_inline void kpr_np_ct_lru_mark(__u32 home)
{
	__u32 zero = 0;
	struct kpr_np_ct_gate *g = kpr_np_ct_gate.lookup(&zero);
	struct kpr_np_ct_slot *s = kpr_np_ct_slots.lookup(&home);

	if (g)
		__sync_fetch_and_add(&g->overflows, 1);
	if (s)
		__sync_fetch_and_add(&s->lru_adds, 1);
}

/* Where the key `k` (hash `h`) is: its live entry's slot index | KPR_NP_CT_FOUND (a slot other
 * than `skip`), else the first free probe's index, else KPR_NP_CT_NONE. Every probe is read (a
 * slot the collector freed may sit before the key's); an expired entry of the key is passed
 * over (the collector frees it). Numbers carried between probes, not pointers (lib/slots.h). */
static __always_inline __u32 kpr_np_ct_probe(const struct kpr_ct_key *k, __u32 h, __u64 now, __u32 skip)
{
	struct kpr_np_ct_slot *s;
	__u32 i, idx, free = KPR_NP_CT_NONE;

#pragma nounroll
	for (i = 0; i < KPR_NP_CT_PROBES; i++) {
		idx = kpr_slots_index(h, i, KPR_NP_CT_SLOTS_N - 1);
		s = kpr_np_ct_slots.lookup(&idx);
		if (!s)
			break;
		if (s->claim == KPR_SLOT_FREE) {
			if (free == KPR_NP_CT_NONE)
				free = idx;
		} else if (idx != skip && kpr_slots_key_eq(&s->key, k, KPR_NP_CT_KEY_DWORDS) &&
			   !kpr_ct_expired(&s->val, k->proto, now)) {
			return idx | KPR_NP_CT_FOUND;
		}
	}
	return free;
}

static __always_inline __u32 kpr_np_ct_hash(const struct kpr_ct_key *k)
{
	return kpr_slots_hash(k, KPR_NP_CT_KEY_DWORDS);
}

// The home slot (first probe) of a key of hash `h`: where its gate words are.
static __always_inline __u32 kpr_np_ct_home(__u32 h)
{
	return kpr_slots_index(h, 0, KPR_NP_CT_SLOTS_N - 1);
}

// Whether kpr_ct may hold the NodePort entry of a key of hash `h`: the table's gate and its home slot's.
static __always_inline int kpr_np_ct_lru_may_hold(__u32 h)
{
	return kpr_np_ct_lru_maybe() && kpr_np_ct_home_maybe(kpr_np_ct_home(h));
}

/* NodePort's live entry of the tuple (original direction), refreshed with this packet: its
 * slot's (*slot: the index + 1, for the flow's stage), else kpr_ct's while NodePort entries
 * may be there (*slot 0). */
static __always_inline struct kpr_ct_entry *kpr_np_ct_lookup(const struct kpr_tuple *t, __u32 *slot)
{
	struct kpr_ct_key k; // (on the stack: see struct kpr_np_claim_room)
	struct kpr_np_ct_slot *s;
	__u64 now = kpr_ct_now();
	__u32 h, r;

	*slot = 0;
	kpr_ct_key_from_tuple(&k, t, KPR_CT_DIR_ORIGINAL);
	h = kpr_np_ct_hash(&k);
	r = kpr_np_ct_probe(&k, h, now, KPR_NP_CT_NONE);
	if (r != KPR_NP_CT_NONE && (r & KPR_NP_CT_FOUND)) {
		r &= ~KPR_NP_CT_FOUND;
		s = kpr_np_ct_slots.lookup(&r);
		if (s) {
			*slot = r + 1;
			return kpr_ct_refresh(&s->val, t, KPR_CT_DIR_ORIGINAL, now);
		}
	}
	if (!kpr_np_ct_lru_may_hold(h))
		return (void *)0;
	return kpr_ct_lookup(t, KPR_CT_DIR_ORIGINAL);
}

// The entry of ORIGINAL key `k` (no refresh): its slot's, else kpr_ct's while NodePort entries may be there.
static __always_inline struct kpr_ct_entry *kpr_np_ct_peek(struct kpr_ct_key *k)
{
	struct kpr_np_ct_slot *s;
	__u32 h = kpr_np_ct_hash(k);
	__u32 r = kpr_np_ct_probe(k, h, kpr_ct_now(), KPR_NP_CT_NONE);

	if (r != KPR_NP_CT_NONE && (r & KPR_NP_CT_FOUND)) {
		r &= ~KPR_NP_CT_FOUND;
		s = kpr_np_ct_slots.lookup(&r);
		if (s)
			return &s->val;
	}
	if (!kpr_np_ct_lru_may_hold(h))
		return (void *)0;
	return kpr_ct.lookup(k);
}

/* A NodePort entry (`e` under its ORIGINAL key `k`) written to kpr_ct, marked before and after
 * (struct kpr_np_ct_gate, and the key's home slot: struct kpr_np_ct_slot's lru_adds). */
static __always_inline int kpr_np_ct_lru_put(const struct kpr_ct_key *k, const struct kpr_ct_entry *e)
{
	__u32 home = kpr_np_ct_home(kpr_np_ct_hash(k));
	int err;

	kpr_np_ct_lru_mark(home);
	err = kpr_ct_write_entry(k, e);
	kpr_np_ct_lru_mark(home);
	return err;
}

/* The same for a flow's entry with its mapping (the SNAT stage's; the claim's is in its room). Its
 * key is made twice (once for the home slot, once by kpr_ct_write): one kpr_ct_new here instead
 * took the XDP SNAT stage past bcc's 4096 instructions (4600). */
static __always_inline int kpr_np_ct_lru_write(const struct kpr_tuple *t, __u32 backend_id, __u32 rev_nat, __u16 flags,
					       const union kpr_addr *nat_addr, __be16 nat_port)
{
	struct kpr_ct_key k;
	__u32 home;
	int err;

	kpr_ct_key_from_tuple(&k, t, KPR_CT_DIR_ORIGINAL);
	home = kpr_np_ct_home(kpr_np_ct_hash(&k));
	kpr_np_ct_lru_mark(home);
	err = kpr_ct_write(t, KPR_CT_DIR_ORIGINAL, backend_id, rev_nat, flags, nat_addr, nat_port);
	kpr_np_ct_lru_mark(home);
	return err;
}

/* The claim of a new flow's slot by its first packet: the tuple's probes read (a live entry of
 * the key there, another CPU's first packet of the flow: followed), the first free one claimed
 * (lib/slots.h), entry and then key written; then the probes read again, past a locked add that
 * orders this CPU's key before its reads: two CPUs claiming two slots for one flow at once each
 * see the other's key, or one of them does, and whoever sees the other's gives its own slot
 * back and follows that one (both seeing: both packets dropped, no entry left, the client's
 * next packet claims anew). A claim that finds no free probe, or loses the compare-and-swap,
 * reads the probes again (kpr_np_ct_recheck): the flow's key there (another CPU's first packet
 * of the flow won the slot): followed; a claimed slot whose key is not written yet (perhaps
 * this flow's, being claimed by another CPU): BUSY, dropped (the client resends), never a
 * second entry in kpr_ct naming another backend; only probes held by other flows' keys (or
 * the flow's own expired entry) send the flow to kpr_ct (FULL). So no flow ever holds two
 * entries naming two backends. *slot: the index + 1 of the flow's slot (CLAIMED, FOLLOW), else 0. */
#define KPR_NP_CT_UNKEYED (KPR_NP_CT_NONE - 1) // kpr_np_ct_recheck: a held probe without its key yet

static __always_inline __u32 kpr_np_ct_recheck(const struct kpr_ct_key *k, __u32 h, __u64 now)
{
	struct kpr_np_ct_slot *s;
	__u32 i, idx, r = KPR_NP_CT_NONE;

#pragma nounroll
	for (i = 0; i < KPR_NP_CT_PROBES; i++) {
		idx = kpr_slots_index(h, i, KPR_NP_CT_SLOTS_N - 1);
		s = kpr_np_ct_slots.lookup(&idx);
		if (!s)
			break;
		if (kpr_slots_key_eq(&s->key, k, KPR_NP_CT_KEY_DWORDS) && !kpr_ct_expired(&s->val, k->proto, now))
			return idx | KPR_NP_CT_FOUND;
		if (s->claim != KPR_SLOT_FREE && kpr_slots_key_zero(&s->key, KPR_NP_CT_KEY_DWORDS))
			r = KPR_NP_CT_UNKEYED;
	}
	return r;
}

static __always_inline int kpr_np_ct_claim(struct kpr_np_claim_room *room, const struct kpr_tuple *t, __u32 backend_id,
					   __u32 rev_nat, __u16 flags, __u32 *slot)
{
	struct kpr_ct_key key; // (on the stack: see struct kpr_np_claim_room; copied there for kpr_ct)
	const struct kpr_ct_key *k = &key;
	struct kpr_ct_entry *e = &room->e;
	struct kpr_np_ct_slot *s;
	__u32 h, r, idx;

	*slot = 0;
	__builtin_memset(e, 0, sizeof(*e)); // (the room holds the CPU's last claim)
	kpr_ct_new(&key, e, t, KPR_CT_DIR_ORIGINAL, backend_id, rev_nat, flags, (void *)0, 0);
	h = kpr_np_ct_hash(k);
	r = kpr_np_ct_probe(k, h, e->last_seen, KPR_NP_CT_NONE);
	if (r != KPR_NP_CT_NONE && !(r & KPR_NP_CT_FOUND)) {
		idx = r;
		s = kpr_np_ct_slots.lookup(&idx);
		if (!s)
			goto full;
		if (!kpr_slots_claim(&s->claim, kpr_slots_stamp(e->last_seen)))
			r = KPR_NP_CT_NONE; // lost to another CPU: read again below
	}
	if (r == KPR_NP_CT_NONE) {
		r = kpr_np_ct_recheck(k, h, e->last_seen);
		if (r == KPR_NP_CT_NONE)
			goto full;
		if (r == KPR_NP_CT_UNKEYED)
			return KPR_NP_CT_BUSY;
	} else if (!(r & KPR_NP_CT_FOUND)) {
		s->val = *e;
		kpr_slots_fill_key(&s->key, k, KPR_NP_CT_KEY_DWORDS);
		__sync_fetch_and_add(&s->claim, 0); // (a locked add: the key is visible before the reads below)
		r = kpr_np_ct_probe(k, h, e->last_seen, idx);
		if (r == KPR_NP_CT_NONE || !(r & KPR_NP_CT_FOUND)) {
			*slot = idx + 1;
			return KPR_NP_CT_CLAIMED;
		}
		// another slot holds the flow: ours given back (key zeroed first), that one followed
		__builtin_memset(&s->key, 0, sizeof(s->key));
		kpr_slots_release(&s->claim);
	}
	r &= ~KPR_NP_CT_FOUND;
	s = kpr_np_ct_slots.lookup(&r);
	if (!s)
		return KPR_NP_CT_BUSY;
	room->won = s->val;
	asm volatile("" ::: "memory");
	// still the flow's after the copy (not given back by its own claimer meanwhile)
	if (!kpr_slots_key_eq(&s->key, k, KPR_NP_CT_KEY_DWORDS))
		return KPR_NP_CT_BUSY;
	*slot = r + 1;
	if (kpr_lb_backend(room->won.backend_id))
		return KPR_NP_CT_FOLLOW;
	/* The flow's own entry, its backend gone (kpr_np_lb balances such a flow again): the new
	 * pick written in place, as kpr_ct's update replaces it (the mapping with it: its stage
	 * makes a new one). */
	s->val.backend_id = backend_id;
	s->val.rev_nat = rev_nat;
	s->val.flags = flags;
	s->val.nat_port = 0;
	return KPR_NP_CT_CLAIMED;
full:
	room->k = key; // (for kpr_ct; copied only here: see struct kpr_np_claim_room)
	return KPR_NP_CT_FULL;
}

/* A source-NATed flow's mapping, made by its stage, into its entry: the slot `slot` (index + 1,
 * from the service path: the one its first packet claimed, or a later packet found) while it
 * still holds the flow's key, else kpr_ct (a flow whose probes were all held, or one an older
 * build began). Returns 0 or the map update's negative error. */
static __always_inline int kpr_np_ct_snat(__u32 slot, const struct kpr_tuple *t, __u32 backend_id, __u32 rev_nat,
					  __u16 flags, const union kpr_addr *nat_addr, __be16 nat_port)
{
	struct kpr_np_ct_slot *s = (void *)0;
	__u32 idx = slot - 1;

	if (slot)
		s = kpr_np_ct_slots.lookup(&idx);
	if (!s || s->claim == KPR_SLOT_FREE || s->key.dir != KPR_CT_DIR_ORIGINAL || s->key.proto != t->proto ||
	    s->key.sport != t->sport || s->key.dport != t->dport || !kpr_addr_eq(&s->key.saddr, &t->saddr) ||
	    !kpr_addr_eq(&s->key.daddr, &t->daddr))
		return kpr_np_ct_lru_write(t, backend_id, rev_nat, flags, nat_addr, nat_port);
	s->val.nat_addr = *nat_addr;
	asm volatile("" ::: "memory"); // the address before the port: a reader takes the mapping by its port
	s->val.nat_port = nat_port;
	return 0;
}
#else
static __always_inline struct kpr_ct_entry *kpr_np_ct_lookup(const struct kpr_tuple *t, __u32 *slot)
{
	*slot = 0;
	return kpr_ct_lookup(t, KPR_CT_DIR_ORIGINAL);
}

static __always_inline struct kpr_ct_entry *kpr_np_ct_peek(struct kpr_ct_key *k)
{
	return kpr_ct.lookup(k);
}

static __always_inline int kpr_np_ct_snat(__u32 slot, const struct kpr_tuple *t, __u32 backend_id, __u32 rev_nat,
					  __u16 flags, const union kpr_addr *nat_addr, __be16 nat_port)
{
	return kpr_ct_create_snat(t, backend_id, rev_nat, flags, nat_addr, nat_port);
}
#endif

/* --- routing ------------------------------------------------------------------------- */

// What the egress device is. An external device (kpr_np_dev) not classified yet is taken for a
// plain Ethernet device: the operator named it, and kpr's programs run on it.
static __always_inline __u32 kpr_np_devkind_of(__u32 ifindex, int external)
{
	__u32 *k = kpr_np_devkind.lookup(&ifindex);

	if (k && *k < KPR_DEV_COUNT)
		return *k;
	return external ? KPR_DEV_PHYSICAL : KPR_DEV_UNKNOWN;
}

/* Whether ctx_redirect() delivers to a device of kind `kind` (KPR_DEV_*), `external` when kpr's
 * programs run on it (kpr_np_dev). Any device where the hook needs no XDP transmit path (tc).
 * Where it does (XDP): the external devices kpr's XDP program runs on have one (an overlay or a
 * bridge named as one runs generic XDP at best: no transmit path either); a pod's veth only if
 * its peer runs XDP, a bridge or an overlay device none. A frame for any other device is the
 * stack's (CTX_PASS). */
static __always_inline int kpr_np_redirect_reaches(__u32 kind, int external)
{
	return !CTX_REDIRECT_NEEDS_XDP_XMIT ||
	       (external && (kind == KPR_DEV_PHYSICAL || kind == KPR_DEV_VETH_PEER || kind == KPR_DEV_VETH_LOCAL));
}

// A route's MACs (the FIB's or a cached next hop's) on the frame; -1 when it is too short to hold them.
static __always_inline int kpr_np_set_macs(kpr_ctx_t *ctx, const __u8 *dmac, const __u8 *smac)
{
	if (kpr_fib_set_macs(ctx, dmac, smac)) {
		kpr_np_fwd_count(KPR_NP_FWD_DROP_SHORT);
		kpr_mon_bare(KPR_MON_T_DROP, KPR_NP_MON_HOOK, KPR_MON_R_SHORT_FRAME);
		return -1;
	}
	return 0;
}

/* Whether the program can send a frame where the FIB lookup `p` (result `rc`) says with
 * ctx_redirect() (and the route's MACs); otherwise counts why not, and the frame goes to the
 * stack. Only asked where the hook cannot send everywhere (!CTX_REDIRECTS_EVERYWHERE: XDP, whose
 * XDP_REDIRECT needs the target's XDP transmit path, kpr_np_redirect_reaches, and a known
 * neighbour). Stages that source-NAT ask before translating: a frame whose source became the
 * node's own address is a martian to the stack, so they pass it untranslated and tc_nodeport
 * behind XDP (or the stack) carries the flow on. */
static __always_inline int kpr_np_sendable(const struct bpf_fib_lookup *p, int rc)
{
	__u32 ifindex = p->ifindex, kind;
	int external;

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		kpr_np_count(KPR_NP_ST_FIB_PASS);
		return 0;
	}
	external = kpr_np_dev.lookup(&ifindex) != (void *)0;
	kind = kpr_np_devkind_of(ifindex, external);
	kpr_np_fwd_count(KPR_NP_FWD_BY_KIND + kind);
	if (!kpr_np_redirect_reaches(kind, external)) {
		kpr_np_fwd_count(KPR_NP_FWD_STACK_XDP_UNREACHABLE);
		return 0;
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		kpr_np_fwd_count(KPR_NP_FWD_STACK_NO_NEIGH);
		return 0;
	}
	return 1;
}

/* Send a translated packet where the FIB lookup `p` (result `rc`) says, with the fastest helper
 * its egress device allows (see the top of this file): into the pod's namespace when `peer` and
 * the device has a peer, with the route's MACs out of the device, through the kernel's neighbour
 * resolution when the next hop's MAC is not known yet, or to the kernel's own routing when the
 * lookup found no forwarding route or the device is one no helper can be trusted with (on
 * XDP: one kpr_np_redirect_reaches() says XDP_REDIRECT does not reach, or a next hop without a
 * known MAC: ctx_resolve_neigh is the stack there, CTX_RESOLVE_NEIGH_IS_STACK picks the
 * counter saying so; an XDP build with KPR_NP_PEER fails, naming
 * ctx_redirect_peer). The frame is only rewritten when a helper takes it: the stack must see it
 * as it came. */
static __always_inline int kpr_np_forward(kpr_ctx_t *ctx, const struct bpf_fib_lookup *p, int rc, int peer)
{
	__u32 ifindex = p->ifindex, kind;
	int external;

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		kpr_np_count(KPR_NP_ST_FIB_PASS);
		return CTX_PASS;
	}
	external = kpr_np_dev.lookup(&ifindex) != (void *)0;
	kind = kpr_np_devkind_of(ifindex, external);
	kpr_np_fwd_count(KPR_NP_FWD_BY_KIND + kind);
	if (!kpr_np_redirect_reaches(kind, external)) { // (XDP; an unknown device is one of these there)
		kpr_np_fwd_count(KPR_NP_FWD_STACK_XDP_UNREACHABLE);
		return CTX_PASS;
	}
	if (kind == KPR_DEV_UNKNOWN) {
		// A request for a local pod (only DNAT: the client's source) the stack delivers as
		// well. Other stages may have made the node's own address the source, which the stack
		// drops as a martian: the neighbour helper is safe on every kind of device (only
		// redirect_peer needs a peer), so they take it.
		if (peer) {
			kpr_np_fwd_count(KPR_NP_FWD_STACK_UNKNOWN_DEV);
			return CTX_PASS;
		}
		kpr_np_fwd_count(KPR_NP_FWD_NEIGH);
		return ctx_resolve_neigh(ctx, ifindex);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		kpr_np_fwd_count(CTX_RESOLVE_NEIGH_IS_STACK ? KPR_NP_FWD_STACK_NO_NEIGH : KPR_NP_FWD_NEIGH);
		return ctx_resolve_neigh(ctx, ifindex);
	}
	if (kpr_np_set_macs(ctx, p->dmac, p->smac))
		return CTX_DROP;
#if KPR_NP_PEER
	if (peer && !external && kpr_dev_has_peer(kind)) {
		kpr_np_fwd_count(KPR_NP_FWD_PEER);
		return ctx_redirect_peer(ctx, ifindex, 0);
	}
#endif
	kpr_np_fwd_count(KPR_NP_FWD_REDIRECT);
	return ctx_redirect(ctx, ifindex, 0);
}

// Forward a packet whose tuple is final (after every rewrite).
static __always_inline int kpr_np_route(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, int peer)
{
	struct bpf_fib_lookup p;
	int rc = kpr_fib_lookup(ctx, &p, &pkt->t, &pkt->t.saddr, &pkt->t.daddr, 0);

	return kpr_np_forward(ctx, &p, rc, peer);
}

/* --- errors back to the client ------------------------------------------------------- */

static __always_inline int kpr_np_send_error(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, __u8 type, __u8 code, __u32 mtu)
{
	if (!kpr_np_icmp_allowed())
		return -1;
	if (kpr_icmp_reply_error(ctx, pkt, type, code, mtu))
		return -1;
	kpr_np_count(KPR_NP_ST_ICMP_SENT);
	return 0;
}

/* --- forwarding one packet of a flow ---------------------------------------------------- */

// The node's address to source-NAT to when leaving through `ifindex`, or NULL.
static __always_inline const union kpr_addr *kpr_np_snat_addr(__u32 ifindex, __u8 family)
{
	struct kpr_np_dev *d = kpr_np_dev.lookup(&ifindex);
	__u32 zero = 0;
	const union kpr_addr *a;

	if (d) {
		a = family == KPR_FAMILY_V4 ? &d->addr4 : &d->addr6;
		if (a->w[0] | a->w[1] | a->w[2] | a->w[3])
			if (family == KPR_FAMILY_V6 || a->w[3])
				return a;
	}
	d = kpr_np_dev.lookup(&zero);
	if (!d)
		return (void *)0;
	a = family == KPR_FAMILY_V4 ? &d->addr4 : &d->addr6;
	if (family == KPR_FAMILY_V4 ? a->w[3] == 0 : (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0)
		return (void *)0;
	return a;
}

/* --- next hops cached per backend --------------------------------------------------------- */

/* Whether a cached next hop keeps the route's MTU: where the FIB lookup reports it (CTX_FIB_MTU,
 * tc) it is checked from the cache (ctx_fits_mtu), and an entry without it (XDP's) is written
 * again with it; where not (XDP), an entry is taken whatever MTU it holds (no rewrite of tc's
 * entries). */
#define KPR_NP_NH_MTU CTX_FIB_MTU

// The backend's cached next hop when it is current (this generation, this address), else NULL.
static __always_inline struct kpr_np_nh *kpr_np_nh_current(__u32 bid, const union kpr_addr *addr)
{
#if KPR_NP_NH_CACHE
	__u32 k = KPR_NP_NH_GEN;
	struct kpr_np_nh *g = kpr_np_nh.lookup(&k), *e;

	if (!g || !g->gen || !bid)
		return (void *)0;
	bid &= KPR_BACKEND_INDEX_MASK; // by index: a backend keeps its entry whatever its id's generation
	e = kpr_np_nh.lookup(&bid);
	// no clock read here: the agent also bumps the generation every few seconds (a lost event)
	if (!e || e->gen != g->gen || !kpr_addr_eq(&e->addr, addr))
		return (void *)0;
	return e;
#else
	return (void *)0;
#endif
}

/* The backend's cached next hop when it is current and the packet (its L3 header at l3_off) fits
 * the route's MTU (ctx_fits_mtu; an entry XDP cached holds mtu 0: looked up again and cached
 * with it), else NULL: a packet too big takes the FIB lookup, whose FRAG_NEEDED hands it to the
 * stack for the ICMP error path MTU discovery needs. */
static __always_inline struct kpr_np_nh *kpr_np_nh_fitting(kpr_ctx_t *ctx, __u32 l3_off, __u32 bid,
							   const union kpr_addr *addr)
{
	struct kpr_np_nh *e = kpr_np_nh_current(bid, addr);

	if (!e || !ctx_fits_mtu(ctx, l3_off, e->kind >> 16))
		return (void *)0;
	return e;
}

/* The same, only where ctx_redirect() reaches: tc, and the XDP local stage, cache next hops
 * XDP_REDIRECT cannot reach (kpr_np_sendable). */
static __always_inline struct kpr_np_nh *kpr_np_nh_get(kpr_ctx_t *ctx, __u32 l3_off, __u32 bid,
						       const union kpr_addr *addr)
{
	struct kpr_np_nh *e = kpr_np_nh_fitting(ctx, l3_off, bid, addr);

	if (!e || !kpr_np_redirect_reaches(e->kind & 0xff, e->kind & KPR_NP_NH_EXTERNAL))
		return (void *)0;
	return e;
}

/* The SNAT address of a new flow whose backend's next hop is `nh`, into `out`: an IPv4 backend's
 * as cached with the next hop (kpr_np_nh.nat4, KPR_NP_NH_SNAT_ADDR: no kpr_np_dev lookups), else
 * its egress device's (kpr_np_snat_addr). Returns 0, or -1 when the device has none. */
static __always_inline int kpr_np_nh_snat_addr(const struct kpr_np_nh *nh, __u8 family, union kpr_addr *out)
{
	const union kpr_addr *a;

	if (KPR_NP_NH_SNAT_ADDR && family == KPR_FAMILY_V4 && nh->nat4) {
		kpr_addr_set_v4(out, nh->nat4);
		return 0;
	}
	a = kpr_np_snat_addr(nh->ifindex, family);
	if (!a)
		return -1;
	*out = *a;
	return 0;
}

/* Cache a successful FIB lookup `p` for the backend: what kpr_np_forward does with it, a
 * redirect with the route's MACs, when the device is one it knows. On XDP the SNAT stage caches
 * after kpr_np_sendable, the local stage before it (devices XDP_REDIRECT cannot reach
 * included: kpr_np_est_local sends those to the stack); SNAT readers stay safe because
 * kpr_np_nh_get filters by reachability on XDP. The device is looked up only when caching is
 * armed. */
static __always_inline void kpr_np_nh_put(__u32 bid, const union kpr_addr *addr, const struct bpf_fib_lookup *p)
{
#if KPR_NP_NH_CACHE
	__u32 k = KPR_NP_NH_GEN, ifindex = p->ifindex, kind;
	struct kpr_np_nh *g = kpr_np_nh.lookup(&k), *e;
	__u32 mtu = KPR_NP_NH_MTU ? p->mtu_result & 0xffff : 0;
	int external;

	if (!g || !g->gen || !bid)
		return;
	bid &= KPR_BACKEND_INDEX_MASK; // (the address check in kpr_np_nh_get tells an index's backends apart)
	e = kpr_np_nh.lookup(&bid);
	/* Current already (every new flow to the backend after the first, each with its FIB
	 * lookup): no device lookups, and no write to a line every CPU's packets to it read (a
	 * route or MAC change bumps the generation, which makes the entry stale). */
	if (!e || (e->gen == g->gen && e->ifindex == ifindex && kpr_addr_eq(&e->addr, addr) &&
		   (!KPR_NP_NH_MTU || (e->kind >> 16) == mtu)))
		return;
	external = kpr_np_dev.lookup(&ifindex) != (void *)0;
	kind = kpr_np_devkind_of(ifindex, external);
	if (kind == KPR_DEV_UNKNOWN)
		return;
	kind |= external ? KPR_NP_NH_EXTERNAL : 0;
	e->gen = 0; // no reader takes it while half written (the same values, were two CPUs to write it)
	e->ifindex = p->ifindex;
	__builtin_memcpy(e->smac, p->smac, 6);
	__builtin_memcpy(e->dmac, p->dmac, 6);
	e->kind = kind | (mtu << 16);
	e->nat4 = 0;
	if (kpr_addr_is_v4(addr)) {
		const union kpr_addr *nat = kpr_np_snat_addr(ifindex, KPR_FAMILY_V4);

		if (nat)
			e->nat4 = nat->w[3];
	}
	e->addr = *addr;
	e->gen = g->gen;
#endif
}

// Send a packet to a cached next hop; the reader counts it as kpr_np_forward's redirect with the route's MACs.
static __always_inline int kpr_np_nh_send(kpr_ctx_t *ctx, const struct kpr_np_nh *nh)
{
	kpr_np_fwd_count(KPR_NP_FWD_CACHED_BY_KIND + (nh->kind & 0xff)); // fwd_redirect, egress_<kind>, fwd_nh_cached
	if (kpr_np_set_macs(ctx, nh->dmac, nh->smac))
		return CTX_DROP;
	return ctx_redirect(ctx, nh->ifindex, 0);
}

/* --- forwarding stages ---------------------------------------------------------------- */

// The packet and its flow's state, for a forwarding stage. Returns 0, or -1 with nothing to do.
static __always_inline int kpr_np_stage_begin(kpr_ctx_t *ctx, struct kpr_pkt *pkt, struct kpr_np_state **st,
					      struct kpr_backend **be)
{
	__u32 zero = 0;

	*st = kpr_np_state.lookup(&zero);
	if (!*st)
		return -1;
	if (kpr_parse(ctx, pkt) != KPR_PARSE_OK || !pkt->l4_off)
		return -1;
	*be = &(*st)->be;
	return 0;
}

/* DNAT to a local backend. An IPv4 TCP/UDP packet's address and port are written and each
 * checksum patched once with their summed difference (the one-pass rewrite of SNAT flows, the
 * source kept): on tc no helper call for a packet the entry program read as not offloaded
 * (established flows), one for any other (kpr_csum_l4_diff2), where the per-field rewrite
 * (kpr_nat_dnat) makes two bpf_l4_csum_replace calls. Anything else as kpr_nat_dnat, and
 * everything in a build without KPR_REWRITE_ONE_CSUM or with KPR_REWRITE_HELPERS (the one-pass
 * rewrite is theirs). */
static __always_inline int kpr_np_dnat(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const union kpr_addr *addr, __be16 port)
{
#if KPR_NP_DNAT_ONE_PASS && KPR_REWRITE_ONE_CSUM && !KPR_REWRITE_HELPERS
	if (pkt->t.family == KPR_FAMILY_V4 && pkt->csum_off &&
	    (pkt->t.proto == IPPROTO_TCP || pkt->t.proto == IPPROTO_UDP))
		return kpr_nat_rewrite4_both(ctx, pkt, pkt->t.saddr.w[3], pkt->t.sport, addr->w[3], port);
#endif
	return kpr_nat_dnat(ctx, pkt, addr, port);
}

// KPR_NP_CALL_LOCAL: DNAT, then straight into the pod (the client's address is kept).
static __always_inline int kpr_np_stage_local(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_np_state *st;
	struct kpr_backend *be;

	if (kpr_np_stage_begin(ctx, &pkt, &st, &be))
		return CTX_DROP;
	if (st->created)
		kpr_np_rev_create(&be->addr, be->port, &pkt.t.saddr, pkt.t.sport, pkt.t.proto, &pkt.t.daddr, pkt.t.dport, 0);
	if (kpr_np_dnat(ctx, &pkt, &be->addr, be->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
#if KPR_NP_EST_LOCAL
	{
		// the route's outcome kept for the flow's later packets (kpr_np_est_local), as the
		// SNAT stage keeps a remote backend's: on tc redirect_peer into the pod or a redirect;
		// on XDP a redirect, or the stack for a device XDP_REDIRECT cannot reach (a pod's veth)
		struct bpf_fib_lookup p;
		int rc = kpr_fib_lookup(ctx, &p, &pkt.t, &pkt.t.saddr, &pkt.t.daddr, 0);

		if (rc == BPF_FIB_LKUP_RET_SUCCESS)
			kpr_np_nh_put(st->backend_id, &be->addr, &p);
		return kpr_np_forward(ctx, &p, rc, 1);
	}
#else
	return kpr_np_route(ctx, &pkt, 1);
#endif
}

// KPR_NP_CALL_SNAT: DNAT to the backend and SNAT to the egress device's node address.
static __always_inline int kpr_np_stage_snat(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_np_state *st;
	struct kpr_backend *be;
	struct bpf_fib_lookup p;
	const union kpr_addr *nat;
	int rc;
	int err;
#if KPR_NP_SNAT_IN_CT
	struct kpr_tuple orig; // the client's tuple (the conntrack key), before DNAT
	struct kpr_np_nh *nh;
	__be16 nport;
#else
	struct kpr_nat_entry *m;
#endif

	if (kpr_np_stage_begin(ctx, &pkt, &st, &be))
		return CTX_DROP;
	KPR_NP_STOP(4);
#if KPR_NP_SNAT_IN_CT
	// An established flow whose backend's next hop is cached: a path of its own to the end
	// (sharing the rest with the lookup's path would have the verifier walk every rewrite
	// once with the cache's pointer and once without: past its limit in the XDP build).
	// (a new flow's only with KPR_NP_NEW_NH: without it, it always takes the lookup below)
	nh = st->nat_port || (KPR_NP_NEW_NH && st->created) ? kpr_np_nh_get(ctx, pkt.l3_off, st->backend_id, &be->addr)
							     : (void *)0;
	if (nh) {
#if KPR_NP_NEW_NH
		if (!st->nat_port) {
			/* A new flow to a backend whose next hop is cached (KPR_NP_NEW_NH): the cached
			 * egress device names the SNAT address, as the FIB lookup's would, so no lookup.
			 * The reply side is allocated for the tuple after DNAT, then the conntrack
			 * entry for the client's tuple, as on the lookup's path. */
			orig = pkt.t;
			orig.daddr = be->addr;
			if (be->port)
				orig.dport = be->port;
			// (the address as the claim stage takes it: cached with the next hop, or looked up)
			if (kpr_np_nh_snat_addr(nh, pkt.t.family, &st->nat_addr)) {
				kpr_np_drop(KPR_NP_ST_DROP_NO_SNAT_ADDR, KPR_MON_R_NO_SNAT_ADDRESS, &pkt.t);
				return CTX_DROP;
			}
			nat = &st->nat_addr;
			if (kpr_snat_alloc(&orig, nat, &pkt.t.daddr, pkt.t.dport, &nport)) {
				kpr_np_count(KPR_NP_ST_DROP_SNAT_PORT);
				kpr_mon_flow(KPR_MON_T_NAT_FULL, KPR_NP_MON_HOOK, KPR_MON_R_SNAT_NO_PORT, &orig, 0,
					     st->backend_id, be);
				return CTX_DROP;
			}
			st->nat_port = nport;
			if (kpr_np_ct_snat(st->ct_slot, &pkt.t, st->backend_id, st->rev_nat, st->flags, nat, nport)) {
				kpr_np_count(KPR_NP_ST_CT_FAILED);
				kpr_mon_flow(KPR_MON_T_CT_FULL, KPR_NP_MON_HOOK, 0, &pkt.t, st->rev_nat, st->backend_id, be);
			}
		}
#endif
		KPR_NP_STOP(5);
		if (kpr_nat_dnat_snat(ctx, &pkt, &be->addr, be->port, &st->nat_addr, st->nat_port)) {
			kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
			return CTX_DROP;
		}
		KPR_NP_STOP(6);
		return kpr_np_nh_send(ctx, nh);
	}
#endif
	rc = kpr_fib_lookup(ctx, &p, &pkt.t, &pkt.t.saddr, &be->addr, 0);
	KPR_NP_STOP(5);
#if KPR_NP_SNAT_IN_CT
	orig = pkt.t;
	if (!CTX_REDIRECTS_EVERYWHERE && !kpr_np_sendable(&p, rc)) {
		// (XDP) tc_nodeport behind carries the flow on: the same backend from this entry, the
		// SNAT mapping made there (KPR_NP_CT_SLOTS: the entry its first packet claimed)
		if (!KPR_NP_CT_SLOTS && st->created && !st->nat_port &&
		    kpr_ct_create(&orig, KPR_CT_DIR_ORIGINAL, st->backend_id, st->rev_nat, st->flags))
			kpr_np_count(KPR_NP_ST_CT_FAILED);
		return CTX_PASS;
	}
	if (kpr_nat_dnat(ctx, &pkt, &be->addr, be->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	if (!st->nat_port && !st->created) {
		// a flow a KPR_NP_SNAT_IN_CT=0 build began: its mapping is a forward entry
		struct kpr_nat_entry *m = kpr_snat_mapping(&pkt.t, (void *)0, 0, &err);

		if (m) {
			st->nat_addr = m->addr;
			st->nat_port = m->port;
		}
	}
	if (!st->nat_port) {
		// a new flow (or one XDP passed on without a mapping): the reply side (a kpr_snat
		// insert), one conntrack insert holding the mapping
		nat = kpr_np_snat_addr(rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ? p.ifindex : 0,
				       pkt.t.family);
		if (!nat) {
			kpr_np_drop(KPR_NP_ST_DROP_NO_SNAT_ADDR, KPR_MON_R_NO_SNAT_ADDRESS, &pkt.t);
			return CTX_DROP;
		}
		if (kpr_snat_alloc(&pkt.t, nat, &orig.daddr, orig.dport, &nport)) {
			kpr_np_count(KPR_NP_ST_DROP_SNAT_PORT);
			kpr_mon_flow(KPR_MON_T_NAT_FULL, KPR_NP_MON_HOOK, KPR_MON_R_SNAT_NO_PORT, &pkt.t, 0, st->backend_id,
				     be);
			return CTX_DROP;
		}
		st->nat_addr = *nat;
		st->nat_port = nport;
		if (kpr_np_ct_snat(st->ct_slot, &orig, st->backend_id, st->rev_nat, st->flags, nat, nport)) {
			kpr_np_count(KPR_NP_ST_CT_FAILED);
			kpr_mon_flow(KPR_MON_T_CT_FULL, KPR_NP_MON_HOOK, 0, &orig, st->rev_nat, st->backend_id, be);
		}
	}
	if (kpr_nat_snat(ctx, &pkt, &st->nat_addr, st->nat_port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	KPR_NP_STOP(6);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		kpr_np_nh_put(st->backend_id, &be->addr, &p);
#else
#if !KPR_NP_LAZY_SNAT_ADDR
	nat = kpr_np_snat_addr(rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ? p.ifindex : 0,
			       pkt.t.family);
	if (!nat) {
		kpr_np_drop(KPR_NP_ST_DROP_NO_SNAT_ADDR, KPR_MON_R_NO_SNAT_ADDRESS, &pkt.t);
		return CTX_DROP;
	}
#endif
	if (st->created)
		kpr_np_rev_create(&be->addr, be->port, &pkt.t.saddr, pkt.t.sport, pkt.t.proto, &pkt.t.daddr, pkt.t.dport, 0);
	// (XDP) the flow's conntrack and reverse entries are written: tc_nodeport behind carries it on
	if (!CTX_REDIRECTS_EVERYWHERE && !kpr_np_sendable(&p, rc))
		return CTX_PASS;
	if (kpr_nat_dnat(ctx, &pkt, &be->addr, be->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
#if KPR_NP_LAZY_SNAT_ADDR
	// a flow past its first packet has its mapping: no device lookups for the address
	m = kpr_snat_mapping(&pkt.t, (void *)0, 0, &err);
	if (!m) {
		nat = kpr_np_snat_addr(rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ? p.ifindex : 0,
				       pkt.t.family);
		if (!nat) {
			kpr_np_drop(KPR_NP_ST_DROP_NO_SNAT_ADDR, KPR_MON_R_NO_SNAT_ADDRESS, &pkt.t);
			return CTX_DROP;
		}
		m = kpr_snat_mapping(&pkt.t, nat, 1, &err);
	}
#else
	m = kpr_snat_mapping(&pkt.t, nat, 1, &err);
#endif
	if (!m) {
		kpr_np_count(KPR_NP_ST_DROP_SNAT_PORT);
		kpr_mon_flow(KPR_MON_T_NAT_FULL, KPR_NP_MON_HOOK, KPR_MON_R_SNAT_NO_PORT, &pkt.t, 0, st->backend_id, be);
		return CTX_DROP;
	}
	if (kpr_nat_snat(ctx, &pkt, &m->addr, m->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	KPR_NP_STOP(6);
#endif
	if (!CTX_REDIRECTS_EVERYWHERE) {
		kpr_np_fwd_count(KPR_NP_FWD_REDIRECT); // kpr_np_sendable said yes above
		if (kpr_np_set_macs(ctx, p.dmac, p.smac))
			return CTX_DROP;
		return ctx_redirect(ctx, p.ifindex, 0);
	}
	return kpr_np_forward(ctx, &p, rc, 0);
}

#if KPR_NP_DSR
// KPR_NP_CALL_DSR: DNAT to the backend, keep the client's address, carry the frontend along.
static __always_inline int kpr_np_stage_dsr(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_np_state *st;
	struct kpr_backend *be;
	struct bpf_fib_lookup p;
	union kpr_addr fe;
	__be16 fport;
	__u32 extra, l3len;
	int rc;

	if (kpr_np_stage_begin(ctx, &pkt, &st, &be))
		return CTX_DROP;
	fe = pkt.t.daddr;
	fport = pkt.t.dport;
	extra = pkt.t.family == KPR_FAMILY_V4 ? KPR_DSR_OPT4_LEN : KPR_DSR_OPT6_LEN;
	l3len = ctx_len(ctx) - pkt.l3_off + extra;
	// A GSO packet is checked per segment by the kernel (and adjust_room shrinks its segments
	// by the header it adds): only a single packet is held against the route's MTU here.
	if (ctx_gso_size(ctx))
		l3len = 0;
	rc = kpr_fib_lookup(ctx, &p, &pkt.t, &pkt.t.saddr, &be->addr, (__u16)l3len);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		// tell the client the path MTU less the DSR header: it then sends packets that fit
		int v4 = pkt.t.family == KPR_FAMILY_V4;
		__u32 mtu = p.mtu_result > extra ? p.mtu_result - extra : 0;

		if (v4) {
			struct iphdr *ip = ctx_ptr(ctx, pkt.l3_off, sizeof(*ip));

			if (!ip || !(ip->frag_off & kpr_htons(0x4000))) {
				kpr_np_drop(KPR_NP_ST_DROP_MTU, KPR_MON_R_MTU, &pkt.t);
				return CTX_DROP;
			}
		}
		if (!kpr_np_send_error(ctx, &pkt, v4 ? ICMP_DEST_UNREACH : ICMPV6_PKT_TOOBIG, v4 ? ICMP_FRAG_NEEDED : 0,
				       mtu))
			return ctx_tx(ctx);
		kpr_np_drop(KPR_NP_ST_DROP_MTU, KPR_MON_R_MTU, &pkt.t);
		return CTX_DROP;
	}
	if (kpr_nat_dnat(ctx, &pkt, &be->addr, be->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	if (kpr_dsr_insert(ctx, &pkt, &fe, fport)) {
		kpr_np_drop(KPR_NP_ST_DROP_DSR, KPR_MON_R_DSR_FAILED, &pkt.t);
		return CTX_DROP;
	}
	return kpr_np_forward(ctx, &p, rc, 0);
}
#endif

// KPR_NP_CALL_NO_BACKEND: a frontend without a backend answers port unreachable (kube-proxy's REJECT).
static __always_inline int kpr_np_stage_no_backend(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	int v4;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK)
		return CTX_DROP;
	v4 = pkt.t.family == KPR_FAMILY_V4;
#if KPR_NP_ICMP_UNREACH
	if (!kpr_np_send_error(ctx, &pkt, v4 ? ICMP_DEST_UNREACH : ICMPV6_DEST_UNREACH,
			       v4 ? ICMP_PORT_UNREACH : ICMPV6_PORT_UNREACH, 0))
		return ctx_tx(ctx);
#endif
	kpr_np_count(KPR_NP_ST_DROP_NO_BACKEND);
	return CTX_DROP;
}

/* --- the service path ------------------------------------------------------------------ */

// Hand a flow to its forwarding stage.
// `ct`: the flow's conntrack entry (its SNAT mapping goes along), NULL for a new flow.
static __always_inline int kpr_np_dispatch(kpr_ctx_t *ctx, const struct kpr_backend *be, __u32 bid, __u16 flags,
					   __u8 created, __u32 rev_nat, const struct kpr_ct_entry *ct, __u32 ct_slot)
{
	__u32 zero = 0;
	struct kpr_np_state *st = kpr_np_state.lookup(&zero);

	if (!st)
		return CTX_DROP;
	st->backend_id = bid;
	st->flags = flags;
	st->created = created;
	st->rev_nat = rev_nat;
	st->ct_slot = ct_slot;
	if (ct && ct->nat_port) {
		st->nat_port = ct->nat_port;
		st->nat_addr = ct->nat_addr;
	} else {
		st->nat_port = 0;
	}
	st->be = *be;
	if (flags & KPR_CT_F_LOCAL)
		return kpr_np_tail(ctx, KPR_NP_CALL_LOCAL);
	if (flags & KPR_CT_F_DSR)
		return kpr_np_tail(ctx, KPR_NP_CALL_DSR);
	if (KPR_NP_SNAT_SLOTS && KPR_NP_SNAT_IN_CT && KPR_NP_NEW_NH && created && !st->nat_port)
		return kpr_np_tail(ctx, KPR_NP_CALL_SNAT_CLAIM);
	return kpr_np_tail(ctx, KPR_NP_CALL_SNAT);
}

#ifndef KPR_NP_CT_TOUCH
/* 1: a new SYN's conntrack home slot (the claim's first probe) is loaded beside the SNAT slot's
 * touch (kpr_np_snat_touch), its key hashed before that touch's own work: the claim's read, a
 * hundred instructions and some twenty stores later, waited on the touched miss first (19% of
 * the entry program's samples on it; 2.5% with this). */
#define KPR_NP_CT_TOUCH 1
#endif
#ifndef KPR_NP_NH_TOUCH
#define KPR_NP_NH_TOUCH 1 // 1: a new flow reads its backend's next-hop entry as it picks (the miss beside kpr_backend's)
#endif

/* Bring a new flow's next-hop entry (kpr_np_nh, read by its stage after the tail call) into the
 * cache now: a load issued beside the pick's kpr_backend load overlaps the two misses, where the
 * stage's read, hundreds of instructions later, would take its own. Both ends of the entry (48
 * bytes: half of them span two lines). Nothing is decided on what it reads. */
static __always_inline void kpr_np_nh_touch(__u32 bid)
{
#if KPR_NP_NH_CACHE && KPR_NP_NH_TOUCH
	__u32 idx = bid & KPR_BACKEND_INDEX_MASK;
	struct kpr_np_nh *e = kpr_np_nh.lookup(&idx);

	if (e)
		asm volatile("" ::"r"(*(volatile __u32 *)&e->gen), "r"(*(volatile __u32 *)&e->addr.w[3]));
#endif
}

#if KPR_NP_EST_LOCAL
#define KPR_NP_EST_MISS (-1) // kpr_np_est_local: no current next hop, the stage's path

/* An established flow to a local backend, in the entry program: what the local stage does
 * after its FIB lookup (kpr_np_forward with peer), from the next hop it cached (kpr_np_nh,
 * invalidated by the same generation as a remote backend's), with the same counters: DNAT,
 * then the stack for a device ctx_redirect() cannot reach (XDP: no transmit path),
 * redirect_peer into the pod (a veth or netkit with a peer, not external; KPR_NP_PEER, tc), or
 * a redirect with the route's MACs. KPR_NP_EST_MISS when nothing is cached, or the packet is too
 * big for the cached route's MTU (ctx_fits_mtu): the packet untouched. */
static __always_inline int kpr_np_est_local(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const struct kpr_backend *be,
					    __u32 bid)
{
	// (no reachability filter: an unreachable device is the stack's, below; only known kinds
	// are cached, so kpr_np_forward's unknown-device and neighbour-helper branches cannot apply)
	struct kpr_np_nh *nh = kpr_np_nh_fitting(ctx, pkt->l3_off, bid, &be->addr);
	__u32 kind;

	if (!nh)
		return KPR_NP_EST_MISS;
	kind = nh->kind;
	if (kpr_np_dnat(ctx, pkt, &be->addr, be->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt->t);
		return CTX_DROP;
	}
	if (!kpr_np_redirect_reaches(kind & 0xff, kind & KPR_NP_NH_EXTERNAL)) {
		kpr_np_fwd_count(KPR_NP_FWD_BY_KIND + (kind & 0xff)); // as kpr_np_sendable counts it
		kpr_np_fwd_count(KPR_NP_FWD_STACK_XDP_UNREACHABLE);
		return CTX_PASS;
	}
#if KPR_NP_PEER
	if (!(kind & KPR_NP_NH_EXTERNAL) && kpr_dev_has_peer(kind & 0xff)) {
		kpr_np_fwd_count(KPR_NP_FWD_BY_KIND + (kind & 0xff)); // as kpr_np_forward counts it
		if (kpr_np_set_macs(ctx, nh->dmac, nh->smac))
			return CTX_DROP;
		kpr_np_fwd_count(KPR_NP_FWD_PEER);
		return ctx_redirect_peer(ctx, nh->ifindex, 0);
	}
#endif
	return kpr_np_nh_send(ctx, nh);
}
#endif

#define KPR_NP_SYN_FIRST_ON (KPR_NP_SYN_FIRST && KPR_NP_CT_SLOTS && KPR_NP_SNAT_SLOTS)

/* One CPU's room for a reply key (the entry's stack has none to spare), its SNAT port seed, and
 * what the entry's touch found for the flow, carried to its claim stage (the same packet, a tail
 * call later): the SNAT address and the first port, not looked up and hashed twice. */
struct kpr_np_syn {
	struct kpr_ct_key rk;   // room for a key (the first port's, then the touched slot's)
	__u64 seed;             // kpr_snat_first_port's; 0: not drawn yet (drawn on the CPU's first new flow)
	union kpr_addr nat;     // the flow's SNAT address, as the touch found it
	union kpr_addr saddr;   // the flow's client (with sport and bid: whose carry this is)
	__u32 bid;              // the flow's backend; 0: nothing carried (taken once)
	__be16 sport;
	__u16 first;            // the first port, host order
};
#if KPR_NP_SYN_FIRST_ON
BPF_PERCPU_ARRAY(kpr_np_syn, struct kpr_np_syn, 1);

/* This CPU's scratch, its seed drawn. A flow's first port is the same in the entry program and
 * in its claim stage (one CPU, one packet); a retransmitted SYN on another CPU meets the flow's
 * conntrack entry and follows it, with no port chosen. */
static __always_inline struct kpr_np_syn *kpr_np_syn_get(void)
{
	__u32 zero = 0;
	struct kpr_np_syn *p = kpr_np_syn.lookup(&zero);

	if (p && !p->seed)
		p->seed = ((__u64)bpf_get_prandom_u32() << 32 | bpf_get_prandom_u32()) | 1;
	return p;
}

/* The first SNAT port a new SNAT flow to backend `be` tries (host order), from this CPU's
 * scratch `p` (its key room and seed). */
static __always_inline __u16 kpr_np_snat_first(struct kpr_np_syn *p, const struct kpr_tuple *t,
					       const struct kpr_backend *be)
{
	return kpr_snat_first_port(&p->rk, &t->saddr, t->sport, &be->addr, be->port ? be->port : t->dport, t->proto,
				   p->seed);
}

/* Load the slot line a new SNAT flow's claim will try first (the claim stage's read, after the
 * tail call, then finds it cached), and leave the claim stage the SNAT address and first port
 * (struct kpr_np_syn). Nothing is decided on what it reads. */
static __always_inline void kpr_np_snat_touch(kpr_ctx_t *ctx, const struct kpr_pkt *pkt, __u32 bid,
					      const struct kpr_backend *be)
{
	struct kpr_np_nh *nh = kpr_np_nh_get(ctx, pkt->l3_off, bid, &be->addr);
	struct kpr_np_syn *p = kpr_np_syn_get();
	struct kpr_snat_slot *s;
	__u32 idx;
#if KPR_NP_CT_TOUCH
	struct kpr_np_ct_slot *cs;
	__u32 home;
#endif

	if (!nh || !p || kpr_np_nh_snat_addr(nh, pkt->t.family, &p->nat))
		return;
#if KPR_NP_CT_TOUCH
	kpr_ct_key_from_tuple(&p->rk, &pkt->t, KPR_CT_DIR_ORIGINAL);
	home = kpr_np_ct_home(kpr_np_ct_hash(&p->rk));
#endif
	p->first = kpr_np_snat_first(p, &pkt->t, be);
	p->saddr = pkt->t.saddr;
	p->sport = pkt->t.sport;
	p->bid = bid;
	kpr_ct_reply_key(&p->rk, &be->addr, be->port ? be->port : pkt->t.dport, &p->nat, kpr_htons(p->first),
			 pkt->t.proto);
	idx = kpr_slots_index(kpr_slots_hash(&p->rk, KPR_SNAT_KEY_DWORDS), 0, KPR_SNAT_SLOTS_N - 1);
	s = kpr_snat_slots.lookup(&idx);
#if KPR_NP_CT_TOUCH
	cs = kpr_np_ct_slots.lookup(&home);
	if (s && cs)
		asm volatile("" ::"r"(*(volatile __u64 *)&s->claim), "r"(*(volatile __u64 *)&cs->claim));
#else
	if (s)
		asm volatile("" ::"r"(*(volatile __u64 *)&s->claim));
#endif
}

/* A SYN balanced first: its tuple's live NodePort entry in kpr_ct (a flow that overflowed its
 * slots, its SYN resent or its tuple reused), refreshed; NULL when there is none or the gates
 * say there can be none. Read after the SNAT slot's touch: the key's home slot, whose gate it
 * reads while the table's is open, is the line the claim reads next, so its miss overlaps the
 * touch's; and kpr_ct's bucket is read only for a home that had an overflow. */
static __always_inline struct kpr_ct_entry *kpr_np_ct_lru_syn(const struct kpr_tuple *t)
{
	struct kpr_ct_key k;
	struct kpr_ct_entry *e;

	if (!kpr_np_ct_lru_maybe())
		return (void *)0;
	kpr_ct_key_from_tuple(&k, t, KPR_CT_DIR_ORIGINAL);
	if (!kpr_np_ct_home_maybe(kpr_np_ct_home(kpr_np_ct_hash(&k))))
		return (void *)0;
	e = kpr_ct_lookup(t, KPR_CT_DIR_ORIGINAL);
	return e && (e->flags & KPR_CT_F_NODE_PORT) ? e : (void *)0;
}
#endif

// Tracked flow or new flow to a frontend; anything else goes to the announced-address guard.
static __always_inline int kpr_np_lb(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct kpr_ct_entry *ct;
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_fe_buf svcbuf; // the entry's copy from kpr_fe and its first slots' backend ids (lib/lb.h)
	struct kpr_affinity_key aff;
	struct kpr_backend *be;
	__u32 bid, counter, ct_slot;
	__u16 flags;
#if KPR_NP_SYN_FIRST_ON
	/* (KPR_NP_SYN_FIRST) whatever the gates say: kpr_ct is read after the pick (kpr_np_ct_lru_syn).
	 * When it was read first while the table's gate was open, one overflow anywhere (the first of
	 * a 20000-flow benchmark round came after about 6000 flows) cost every later SYN its two
	 * misses' overlap until the collector's sweep. */
	int syn_first = pkt->t.proto == IPPROTO_TCP && (pkt->t.tcp_flags & (KPR_TCP_ACK | KPR_TCP_SYN)) == KPR_TCP_SYN;
#else
	const int syn_first = 0;
#endif

	ct_slot = 0;
	ct = syn_first ? (void *)0 : kpr_np_ct_lookup(&pkt->t, &ct_slot);
	if (ct && (ct->flags & KPR_CT_F_NODE_PORT)) {
		bid = ct->backend_id;
		be = kpr_lb_backend(bid);
		if (be) {
			__u8 tf = pkt->t.tcp_flags & (KPR_TCP_ACK | KPR_TCP_SYN);
			__u8 restart = 0;

			// a client ACK without SYN means it heard the server: established (DSR never sees replies)
			if (tf == KPR_TCP_ACK)
				kpr_ct_seen_reply(ct);
			// a SYN on the tuple of a flow that ended: the same backend, but a new connection
			// (its reverse entry is written afresh, so replies are not taken for stale ones)
			if (tf == KPR_TCP_SYN && (ct->flags & KPR_CT_F_CLOSING)) {
				ct->flags &= ~(KPR_CT_F_CLOSING | KPR_CT_F_SEEN_REPLY);
				restart = 1;
			}
			kpr_np_count(KPR_NP_ST_ESTABLISHED);
			KPR_NP_STOP(2);
#if KPR_NP_EST_INLINE && KPR_NP_SNAT_IN_CT
			// what the SNAT stage's cached-next-hop path does, without getting there
			if (!(ct->flags & (KPR_CT_F_LOCAL | KPR_CT_F_DSR)) && ct->nat_port) {
				struct kpr_np_nh *nh = kpr_np_nh_get(ctx, pkt->l3_off, bid, &be->addr);

				if (nh) {
					union kpr_addr nat_addr = ct->nat_addr;

					KPR_NP_STOP(7);
					if (kpr_nat_dnat_snat(ctx, pkt, &be->addr, be->port, &nat_addr, ct->nat_port)) {
						kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt->t);
						return CTX_DROP;
					}
					KPR_NP_STOP(8);
					return kpr_np_nh_send(ctx, nh);
				}
			}
#endif
#if KPR_NP_EST_LOCAL
			// (a restarted flow takes the stage: its reverse entry is written afresh there)
			if ((ct->flags & KPR_CT_F_LOCAL) && !restart) {
				int v = kpr_np_est_local(ctx, pkt, be, bid);

				if (v != KPR_NP_EST_MISS)
					return v;
			}
#endif
			return kpr_np_dispatch(ctx, be, bid, ct->flags, restart, ct->rev_nat, ct, ct_slot);
		}
		kpr_np_count(KPR_NP_ST_STALE_BACKEND);
	}
	KPR_NP_STOP(9); // (stops 9-11 split stop 2 of a new flow: conntrack miss, service entry, pick)

	svc = kpr_lb_lookup_into(&key, &pkt->t, 0, &svcbuf);
	if (!svc) {
		union kpr_addr d = pkt->t.daddr;

		if (kpr_np_nodeaddr.lookup(&d))
			svc = kpr_lb_lookup_into(&key, &pkt->t, KPR_LB_NODE_ADDR, &svcbuf);
	}
	if (!svc || !(svc->flags & KPR_NP_SVC_TYPES))
		return kpr_np_vip_guard(pkt);
	KPR_NP_STOP(10);
	if (!kpr_lb_src_allowed(svc, &pkt->t.saddr)) {
		kpr_np_count(KPR_NP_ST_DROP_SRC_RANGE);
		kpr_mon_flow(KPR_MON_T_DROP, KPR_NP_MON_HOOK, KPR_MON_R_SOURCE_RANGE, &pkt->t, svc->rev_nat, 0, (void *)0);
		return CTX_DROP;
	}
	if (svc->count == 0 && (svc->flags & KPR_SVC_F_LOCAL_SCOPE)) {
		kpr_np_count(KPR_NP_ST_DROP_NO_LOCAL);
		kpr_mon_flow(KPR_MON_T_DROP, KPR_NP_MON_HOOK, KPR_MON_R_NO_LOCAL_BACKEND, &pkt->t, svc->rev_nat, 0, (void *)0);
		return CTX_DROP;
	}
	kpr_lb_affinity_key_addr(&aff, svc, &pkt->t.saddr);
	be = kpr_lb_pick_ids(&key, svc, &pkt->t, &aff, &bid, svcbuf.ids);
	kpr_np_nh_touch(bid);
	if (!be) {
		kpr_mon_flow(KPR_MON_T_DROP, KPR_NP_MON_HOOK, KPR_MON_R_NO_BACKEND, &pkt->t, svc->rev_nat, 0, (void *)0);
		return kpr_np_tail(ctx, KPR_NP_CALL_NO_BACKEND);
	}
	KPR_NP_STOP(11);

	flags = KPR_CT_F_NODE_PORT;
	if (be->flags & KPR_BACKEND_F_LOCAL) {
		flags |= KPR_CT_F_LOCAL;
		counter = KPR_NP_ST_NEW_LOCAL;
	} else if (kpr_np_mode_of(&key, pkt->t.proto) == KPR_NP_MODE_DSR &&
		   (pkt->t.family == KPR_FAMILY_V6 || pkt->l4_off == pkt->l3_off + sizeof(struct iphdr))) {
		// (an IPv4 client packet with options of its own goes SNAT: no room is assumed for ours)
		flags |= KPR_CT_F_DSR;
		counter = KPR_NP_ST_NEW_DSR;
	} else {
		flags |= KPR_CT_F_SNAT;
		counter = KPR_NP_ST_NEW_SNAT;
	}
#if KPR_NP_CT_SLOTS
	{
		/* The flow's entry claimed now, whatever its stage (a SNAT flow's mapping is added by
		 * its stage): a packet of the same flow another CPU began first follows that one's
		 * backend, and is not counted as a new flow. */
		struct kpr_np_claim_room *room;
		struct kpr_ct_entry *won = (void *)0; // the live entry a claim follows: a copy of its slot's, or kpr_ct's own
		int claim;
		__u32 zero = 0;

#if KPR_NP_SYN_FIRST_ON
		if (syn_first && (flags & KPR_CT_F_SNAT))
			kpr_np_snat_touch(ctx, pkt, bid, be);
		if (syn_first) {
			won = kpr_np_ct_lru_syn(&pkt->t);
			if (won && !kpr_lb_backend(won->backend_id)) {
				kpr_np_count(KPR_NP_ST_STALE_BACKEND); // (as the conntrack hit above: balanced again)
				won = (void *)0;
			}
		}
#endif
		room = kpr_np_claim.lookup(&zero);
		if (won) {
			claim = KPR_NP_CT_FOLLOW; // (kpr_ct's: ct_slot stays 0, no slot claimed)
		} else {
			claim = room ? kpr_np_ct_claim(room, &pkt->t, bid, svc->rev_nat, flags, &ct_slot) : KPR_NP_CT_FULL;
			if (claim == KPR_NP_CT_FOLLOW && room)
				won = &room->won;
		}
		if (claim == KPR_NP_CT_FOLLOW && won) {
			struct kpr_backend *wbe = kpr_lb_backend(won->backend_id);
			__u8 restart = 0;

			if (wbe) {
#if KPR_NP_SYN_FIRST_ON
				/* A SYN met its tuple's live entry (a resent SYN, or a new connection on the
				 * tuple of one that ended): what the conntrack hit above does with it. */
				if (syn_first) {
					if (won->flags & KPR_CT_F_CLOSING) {
						__u32 idx = ct_slot - 1;
						struct kpr_np_ct_slot *cs = ct_slot ? kpr_np_ct_slots.lookup(&idx) : (void *)0;

						if (cs) { // (a slot's: `won` is the claim's copy, the slot's own entry cleared too)
							cs->val.flags &= ~(KPR_CT_F_CLOSING | KPR_CT_F_SEEN_REPLY);
							cs->val.last_seen = kpr_ct_now();
						}
						won->flags &= ~(KPR_CT_F_CLOSING | KPR_CT_F_SEEN_REPLY);
						restart = 1;
					}
					kpr_np_count(KPR_NP_ST_ESTABLISHED);
				}
#endif
				return kpr_np_dispatch(ctx, wbe, won->backend_id, won->flags, restart, won->rev_nat, won, ct_slot);
			}
			claim = KPR_NP_CT_BUSY; // (its backend gone since the claim's own test: the next packet balances it)
		}
		if (claim == KPR_NP_CT_BUSY) {
			kpr_np_drop(KPR_NP_ST_DROP_CT_CLAIM, KPR_MON_R_CT_CLAIM, &pkt->t);
			return CTX_DROP;
		}
		if (claim == KPR_NP_CT_FULL) {
			kpr_np_count(KPR_NP_ST_CT_SLOT_FULL);
			// (the entry the claim made in its room: this flow's, with no mapping yet)
			if (!room || kpr_np_ct_lru_put(&room->k, &room->e)) {
				kpr_np_count(KPR_NP_ST_CT_FAILED);
				kpr_mon_flow(KPR_MON_T_CT_FULL, KPR_NP_MON_HOOK, 0, &pkt->t, svc->rev_nat, bid, be);
			}
		}
	}
#endif
	kpr_np_count(counter);
	KPR_NP_STOP(2);
	kpr_mon_flow(KPR_MON_T_NEW, KPR_NP_MON_HOOK,
		     (flags & KPR_CT_F_LOCAL) ? KPR_MON_NEW_LOCAL : (flags & KPR_CT_F_DSR) ? KPR_MON_NEW_DSR : KPR_MON_NEW_SNAT,
		     &pkt->t, svc->rev_nat, bid, be);
	// a SNAT flow's entry is written by its stage, with the SNAT mapping in it (one insert)
	if (!KPR_NP_CT_SLOTS && (!KPR_NP_SNAT_IN_CT || !(flags & KPR_CT_F_SNAT)) &&
	    kpr_ct_create(&pkt->t, KPR_CT_DIR_ORIGINAL, bid, svc->rev_nat, flags)) {
		kpr_np_count(KPR_NP_ST_CT_FAILED);
		kpr_mon_flow(KPR_MON_T_CT_FULL, KPR_NP_MON_HOOK, 0, &pkt->t, svc->rev_nat, bid, be);
	}
	KPR_NP_STOP(3);
	return kpr_np_dispatch(ctx, be, bid, flags, 1, svc->rev_nat, (void *)0, ct_slot);
}

/* KPR_NP_CALL_SNAT_CLAIM (KPR_NP_SNAT_SLOTS): a new SNAT flow's reply side in a slot of
 * kpr_snat_slots, when its backend's next hop is cached (the egress device names the SNAT
 * address, as on KPR_NP_NEW_NH's path), and its conntrack entry holding the mapping; then
 * KPR_NP_CALL_SNAT sends it as a flow with a mapping. A stage of its own: in KPR_NP_CALL_SNAT the
 * slot probes, walked by the verifier on each of that stage's paths, passed its million
 * instructions (XDP build); here there are few paths. Anything else (no cached next hop, every
 * slot tried held: counted) goes on to KPR_NP_CALL_SNAT as before, which allocates in kpr_snat. */
static __always_inline int kpr_np_stage_snat_claim(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_np_state *st;
	struct kpr_backend *be;
	struct kpr_tuple orig; // the tuple after DNAT (client -> backend)
	const union kpr_addr *nat;
	union kpr_addr nat_buf; // (the address found from the next hop, when not carried)
	struct kpr_np_nh *nh;
	__be16 nport;
	__u16 first;

	if (kpr_np_stage_begin(ctx, &pkt, &st, &be))
		return CTX_DROP;
	first = 0;
#if KPR_NP_SYN_FIRST_ON
	{ // what the entry's touch found for this flow (struct kpr_np_syn), taken once; else the same port
		struct kpr_np_syn *p = kpr_np_syn_get();

		if (p && p->bid == st->backend_id && p->sport == pkt.t.sport && kpr_addr_eq(&p->saddr, &pkt.t.saddr)) {
			p->bid = 0;
			nat = &p->nat;
			first = p->first;
			goto carried;
		}
		if (p)
			first = kpr_np_snat_first(p, &pkt.t, be);
	}
#endif
	nh = kpr_np_nh_get(ctx, pkt.l3_off, st->backend_id, &be->addr);
	if (!nh)
		return kpr_np_tail(ctx, KPR_NP_CALL_SNAT);
	if (kpr_np_nh_snat_addr(nh, pkt.t.family, &nat_buf))
		return kpr_np_tail(ctx, KPR_NP_CALL_SNAT); // (counted and dropped there)
	nat = &nat_buf;
#if KPR_NP_SYN_FIRST_ON
carried:
#endif
	orig = pkt.t;
	orig.daddr = be->addr;
	if (be->port)
		orig.dport = be->port;
	if (kpr_snat_claim(&orig, nat, &pkt.t.daddr, pkt.t.dport, first, &nport)) {
		kpr_np_count(KPR_NP_ST_SNAT_SLOT_FULL);
		return kpr_np_tail(ctx, KPR_NP_CALL_SNAT);
	}
	st->nat_addr = *nat;
	st->nat_port = nport;
	if (kpr_np_ct_snat(st->ct_slot, &pkt.t, st->backend_id, st->rev_nat, st->flags, nat, nport)) {
		kpr_np_count(KPR_NP_ST_CT_FAILED);
		kpr_mon_flow(KPR_MON_T_CT_FULL, KPR_NP_MON_HOOK, 0, &pkt.t, st->rev_nat, st->backend_id, be);
	}
	return kpr_np_tail(ctx, KPR_NP_CALL_SNAT);
}

/* --- replies to source-NATed flows ----------------------------------------------------- */

// Whether a reply-direction tuple's destination port is one SNAT allocates.
static __always_inline int kpr_np_snat_port(const struct kpr_tuple *t)
{
	return kpr_ntohs(t->dport) >= KPR_SNAT_PORT_MIN && kpr_ntohs(t->dport) <= KPR_SNAT_PORT_MAX;
}

/* The client and frontend a reply to a source-NATed flow (tuple as received: backend -> SNAT
 * address:port) is translated back to, from whichever entry the flow has: its kpr_snat
 * reverse entry with the frontend in it, or (flows of the four-entry layout)
 * a kpr_snat reverse entry and a kpr_np_rev entry, refreshed when `touch`. Returns 0; 1: not a
 * reply of ours; -1: that kpr_np_rev entry is gone (the caller drops and counts it). */
static __always_inline int kpr_np_snat_rev(const struct kpr_tuple *t, int touch, union kpr_addr *client,
					   __be16 *cport, union kpr_addr *fe, __be16 *fport)
{
	struct kpr_nat_entry *n;
	struct kpr_np_rev *rev;
	struct kpr_ct_key rk;

	n = kpr_snat_reverse(t);
	if (!n)
		return 1;
	*client = n->addr;
	*cport = n->port;
	if (n->fe_port) {
		// the frontend is in the SNAT entry itself (KPR_NP_SNAT_IN_CT builds)
		*fe = n->fe_addr;
		*fport = n->fe_port;
		return 0;
	}
	kpr_ct_reply_key(&rk, &t->saddr, t->sport, &n->addr, n->port, t->proto);
	rev = kpr_np_rev.lookup(&rk);
	if (!rev)
		return -1;
	if (touch)
		kpr_np_rev_touch(rev, t->tcp_flags);
	*fe = rev->addr;
	*fport = rev->port;
	return 0;
}

// Whether a tuple (as received) is a reply to a source-NATed flow.
static __always_inline int kpr_np_is_snat_reply(const struct kpr_tuple *t)
{
	return kpr_snat_reverse(t) != (void *)0;
}

// KPR_NP_CALL_SNAT_REPLY: backend -> node:port becomes frontend -> client.
static __always_inline int kpr_np_stage_snat_reply(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	union kpr_addr fe, cl;
	__be16 fport, cport;
	int ret;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return KPR_NP_PASS;
	ret = kpr_np_snat_rev(&pkt.t, 1, &cl, &cport, &fe, &fport);
	if (ret > 0)
		return KPR_NP_PASS;
	if (ret < 0) {
		kpr_np_drop(KPR_NP_ST_DROP_NO_REV, KPR_MON_R_NO_REVERSE_ENTRY, &pkt.t);
		return CTX_DROP;
	}
	if (!CTX_REDIRECTS_EVERYWHERE) {
		// the route to the client first: a reply the hook cannot send (XDP) is passed untranslated
		struct bpf_fib_lookup p;
		int rc = kpr_fib_lookup(ctx, &p, &pkt.t, &fe, &cl, 0);

		if (!kpr_np_sendable(&p, rc))
			return CTX_PASS;
		if (kpr_nat_dnat_snat(ctx, &pkt, &cl, cport, &fe, fport)) {
			kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
			return CTX_DROP;
		}
		kpr_np_count(KPR_NP_ST_REPLY_SNAT);
		if (kpr_np_set_macs(ctx, p.dmac, p.smac))
			return CTX_DROP;
		kpr_np_fwd_count(KPR_NP_FWD_REDIRECT);
		return ctx_redirect(ctx, p.ifindex, 0);
	}
	if (kpr_nat_dnat_snat(ctx, &pkt, &cl, cport, &fe, fport)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	kpr_np_count(KPR_NP_ST_REPLY_SNAT);
	return kpr_np_route(ctx, &pkt, 0);
}

/* --- DSR on the backend's node --------------------------------------------------------- */

#if KPR_NP_DSR
// KPR_NP_CALL_DSR_RECV: remember the frontend the backend must answer from, strip the header.
static __always_inline int kpr_np_stage_dsr_recv(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_tuple ft = {};
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_np_rev *rev;
	struct kpr_ct_key rk;
	union kpr_addr fe;
	__be16 fport;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off || !kpr_dsr_parse(ctx, &pkt, &fe, &fport))
		return KPR_NP_PASS;
	// Only frontends of this cluster (another node's NodePort: the wildcard entry), so a forged
	// header cannot make a backend answer from an arbitrary address.
	ft.daddr = fe;
	ft.dport = fport;
	ft.proto = pkt.t.proto;
	ft.family = pkt.t.family;
	svc = kpr_lb_lookup(&key, &ft, KPR_LB_NODE_ADDR);
	if (!svc || !(svc->flags & KPR_NP_SVC_TYPES)) {
		kpr_np_drop(KPR_NP_ST_DROP_DSR_BAD, KPR_MON_R_DSR_UNKNOWN_FRONTEND, &pkt.t);
		return CTX_DROP;
	}
	kpr_ct_reply_key(&rk, &pkt.t.daddr, pkt.t.dport, &pkt.t.saddr, pkt.t.sport, pkt.t.proto);
	rev = kpr_np_rev.lookup(&rk);
	// a SYN starts a connection: its entry is written afresh (no closing mark from an ended one)
	if (rev && kpr_addr_eq(&rev->addr, &fe) && rev->port == fport &&
	    (pkt.t.tcp_flags & (KPR_TCP_SYN | KPR_TCP_ACK)) != KPR_TCP_SYN)
		kpr_np_rev_touch(rev, 0);
	else
		kpr_np_rev_create(&pkt.t.daddr, pkt.t.dport, &pkt.t.saddr, pkt.t.sport, pkt.t.proto, &fe, fport,
				  KPR_NP_REV_F_DSR);
	if (kpr_dsr_strip(ctx, &pkt)) {
		kpr_np_drop(KPR_NP_ST_DROP_DSR, KPR_MON_R_DSR_FAILED, &pkt.t);
		return CTX_DROP;
	}
	kpr_np_count(KPR_NP_ST_DSR_RECEIVED);
	// the packet is now client -> local pod: the kernel delivers it
	return CTX_PASS;
}
#endif

/* --- ICMP errors about tracked flows ---------------------------------------------------- */

// KPR_NP_CALL_ICMP_IN: an error from outside about a packet kpr source-NATed (node:port -> backend).
static __always_inline int kpr_np_stage_icmp_in(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_icmp_inner in;
	struct kpr_tuple rt = {};
	union kpr_addr client, fe, be;
	__be16 cport, fport;
	int ret;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || kpr_icmp_parse_inner(ctx, &pkt, &in))
		return KPR_NP_PASS;
	// the flow's reply direction: backend -> node:port
	rt.saddr = in.t.daddr;
	rt.daddr = in.t.saddr;
	rt.sport = in.t.dport;
	rt.dport = in.t.sport;
	rt.proto = in.t.proto;
	rt.family = in.t.family;
	ret = kpr_np_snat_rev(&rt, 0, &client, &cport, &fe, &fport);
	if (ret > 0)
		return kpr_np_vip_guard(&pkt);
	if (ret < 0) {
		kpr_np_drop(KPR_NP_ST_DROP_NO_REV, KPR_MON_R_NO_REVERSE_ENTRY, &pkt.t);
		return CTX_DROP;
	}
	be = in.t.daddr;
	// Outer header first: no condition then spans the packet rewrites (the verifier, unlike the
	// compiler, cannot tell which branch combinations are impossible).
	// An error the backend itself sent must come from the frontend; a router's keeps its address.
	if (kpr_addr_eq(&pkt.t.saddr, &be) && kpr_nat_rewrite_addr(ctx, &pkt, &fe, 0))
		goto fail;
	if (kpr_nat_rewrite_addr(ctx, &pkt, &client, 1))
		goto fail;
	if (kpr_icmp_inner_rewrite(ctx, &pkt, &in, &client, cport, 0))
		goto fail;
	if (kpr_icmp_inner_rewrite(ctx, &pkt, &in, &fe, fport, 1))
		goto fail;
	kpr_np_count(KPR_NP_ST_ICMP_XLATED);
	return kpr_np_route(ctx, &pkt, 0);
fail:
	kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
	return CTX_DROP;
}

// KPR_NP_CALL_ICMP_OUT: an error a local (or DSR-reached) backend sends about a packet of a balanced flow.
static __always_inline int kpr_np_stage_icmp_out(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_icmp_inner in;
	struct kpr_np_rev *rev;
	struct kpr_ct_key rk;
	union kpr_addr fe, be;
	__be16 fport;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || kpr_icmp_parse_inner(ctx, &pkt, &in))
		return KPR_NP_PASS;
	// the quote is client -> backend; the flow's replies are backend -> client
	be = in.t.daddr;
	kpr_ct_reply_key(&rk, &be, in.t.dport, &in.t.saddr, in.t.sport, in.t.proto);
	rev = kpr_np_rev.lookup(&rk);
	if (!rev)
		return KPR_NP_PASS;
	fe = rev->addr;
	fport = rev->port;
	if ((kpr_addr_eq(&pkt.t.saddr, &be) && kpr_nat_rewrite_addr(ctx, &pkt, &fe, 0)) ||
	    kpr_icmp_inner_rewrite(ctx, &pkt, &in, &fe, fport, 1)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	kpr_np_count(KPR_NP_ST_ICMP_XLATED);
	return CTX_PASS;
}

/* Whether a reverse entry still belongs to a live flow, asked when a backend's SYN-ACK (a new
 * connection) meets it: a client that reuses a source port of an ended NodePort flow to dial
 * the pod directly must not have the replies rewritten. DSR entries (no conntrack entry on
 * this node) are live until their flow closes; a new DSR SYN rewrites them. */
static __always_inline int kpr_np_rev_live(const struct kpr_np_rev *rev, const struct kpr_tuple *reply)
{
	struct kpr_ct_key k;
	struct kpr_ct_entry *e;

	if (rev->flags & KPR_NP_REV_F_DSR)
		return !(rev->flags & KPR_NP_REV_F_CLOSING);
	kpr_ct_key_of(&k, &reply->daddr, reply->dport, &rev->addr, rev->port, reply->proto, KPR_CT_DIR_ORIGINAL);
	e = kpr_np_ct_peek(&k);
	return e && !(e->flags & KPR_CT_F_CLOSING);
}

#if KPR_NP_PREFILTER && KPR_NP_EARLY_EXIT
#define KPR_NP_EARLY_FULL 0 // kpr_np_early: the full parse decides
#define KPR_NP_EARLY_PASS 1 // kpr_np_early: no frontend's port, not announced: pass it
#define KPR_NP_EARLY_LB 2   // kpr_np_early: *pkt filled, a frontend's port: the service path

// Whether the frame holds the whole TCP (or UDP) header at `off`, as kpr_parse_l4 wants it.
static __always_inline int kpr_np_l4_whole(kpr_ctx_t *ctx, __u32 off, __u8 proto)
{
	if (proto == IPPROTO_TCP)
		return ctx_ptr(ctx, off, sizeof(struct tcphdr)) != (void *)0;
	return ctx_ptr(ctx, off, sizeof(struct udphdr)) != (void *)0;
}

/* *pkt as kpr_parse fills it, for a frame kpr_np_early found plain (no VLAN tag, IPv4 without
 * options or fragmentation or IPv6 without extension headers, the whole TCP/UDP header there),
 * from what it read (`t`: destination, its port, protocol, family) and the rest of the headers
 * (the ports by kpr_parse's own kpr_parse_tcp/udp; the source from its IP header at `l3`, still
 * valid: no helper ran since). Only a service's packet gets here: the fast exit writes nothing.
 * 0, or -1 (never, the frame being as checked). */
static __always_inline int kpr_np_early_fill(kpr_ctx_t *ctx, struct kpr_pkt *pkt, const struct kpr_tuple *t,
					     const void *l3)
{
	pkt->t.daddr = t->daddr;
	if (t->family == KPR_FAMILY_V4)
		kpr_addr_set_v4(&pkt->t.saddr, ((const struct iphdr *)l3)->saddr);
	else
		kpr_addr_set_v6(&pkt->t.saddr, ((const struct ipv6hdr *)l3)->saddr.in6_u.u6_addr32);
	pkt->t.proto = t->proto;
	pkt->t.family = t->family;
	pkt->t.tcp_flags = 0;
	pkt->t.pad = 0;
	pkt->l3_off = sizeof(struct ethhdr);
	pkt->l4_off = sizeof(struct ethhdr) + (t->family == KPR_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
	pkt->frag = 0;
	pkt->csum_state = CTX_CSUM_UNKNOWN;
	if (t->proto == IPPROTO_TCP)
		return kpr_parse_tcp(ctx, pkt) == KPR_PARSE_OK ? 0 : -1;
	return kpr_parse_udp(ctx, pkt) == KPR_PARSE_OK ? 0 : -1;
}

// kpr_np_early's destination into the tuple from the packet's words (d6: IPv6's, else the IPv4
// d4), only where a lookup or *pkt needs it. On d6, not the tuple's family: the verifier follows
// a NULL pointer, not a byte on the stack, so it never sees IPv6 words read from an IPv4 packet.
static __always_inline void kpr_np_early_daddr(union kpr_addr *a, const __be32 *d6, __be32 d4)
{
	if (d6)
		kpr_addr_set_v6(a, d6);
	else
		kpr_addr_set_v4(a, d4);
}

/* The fast exit, before the full parse (no tuple built, no other test first): an untagged IPv4
 * (without options or fragmentation) or IPv6 (without extension headers) TCP/UDP packet to a
 * port no frontend has, outside the SNAT port range, to an address that cannot be an announced
 * one: KPR_NP_EARLY_PASS. Exactly the packets the prefilter in kpr_np_from_parse would pass
 * after parsing (DSR needs IP options or an extension header, SNAT replies a port in the range,
 * ICMP errors another protocol). Such a packet to a frontend's port outside the SNAT range
 * (KPR_NP_EARLY_PARSE): *pkt filled from the raw headers, KPR_NP_EARLY_LB, every step between
 * the parse and the service path known to let it through (no DSR header, not a SNAT reply, a
 * port served), which spares a service packet the second parse and the second bitmap test.
 * Every other packet: KPR_NP_EARLY_FULL. */
static __always_inline int kpr_np_early(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	struct ethhdr *eth = ctx_ptr(ctx, 0, sizeof(struct ethhdr) + sizeof(struct iphdr) + 4);
	const void *l3;
	struct kpr_tuple t;
#if KPR_NP_EARLY_RAW
	__u32 vx; // the destination's four words xored (kpr_np_vip_fold), as the packet holds them
	__be32 d4 = 0; // an IPv4 destination, into t.daddr only when needed
	const __be32 *d6 = 0; // an IPv6 one's words in the packet, likewise
	int served;
#endif

	if (!eth)
		return KPR_NP_EARLY_FULL;
	if (eth->h_proto == kpr_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		// version 4, header length 5 words; no MF flag or offset
		if (((__u8 *)ip)[0] != 0x45 || (ip->frag_off & kpr_htons(0x3fff)))
			return KPR_NP_EARLY_FULL;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return KPR_NP_EARLY_FULL;
		// a cut L4 header is the full parse's (counted malformed there)
		if (!kpr_np_l4_whole(ctx, sizeof(struct ethhdr) + sizeof(struct iphdr), ip->protocol))
			return KPR_NP_EARLY_FULL;
		t.dport = ((__be16 *)(ip + 1))[1];
		t.proto = ip->protocol;
		t.family = KPR_FAMILY_V4;
#if KPR_NP_EARLY_RAW
		d4 = ip->daddr;
		vx = kpr_htonl(0x0000ffff) ^ d4; // as kpr_addr_set_v4 lays it out
#else
		kpr_addr_set_v4(&t.daddr, ip->daddr);
#endif
		l3 = ip;
	} else if (eth->h_proto == kpr_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = ctx_ptr(ctx, sizeof(struct ethhdr), sizeof(struct ipv6hdr) + 4);

		// version 6 (the full parse's first test: another one is malformed there, counted)
		if (!ip6 || (((__u8 *)ip6)[0] >> 4) != 6 || (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP))
			return KPR_NP_EARLY_FULL;
		if (!kpr_np_l4_whole(ctx, sizeof(struct ethhdr) + sizeof(struct ipv6hdr), ip6->nexthdr))
			return KPR_NP_EARLY_FULL;
		t.dport = ((__be16 *)(ip6 + 1))[1];
		t.proto = ip6->nexthdr;
		t.family = KPR_FAMILY_V6;
#if KPR_NP_EARLY_RAW
		d6 = ip6->daddr.in6_u.u6_addr32;
		vx = d6[0] ^ d6[1] ^ d6[2] ^ d6[3];
#else
		kpr_addr_set_v6(&t.daddr, ip6->daddr.in6_u.u6_addr32);
#endif
		l3 = ip6;
	} else {
		return KPR_NP_EARLY_FULL;
	}
	if (kpr_np_snat_port(&t))
		return KPR_NP_EARLY_FULL;
#if KPR_NP_EARLY_RAW
	// the address on the stack only where a lookup or *pkt needs it: a non-service packet's
	// test is the hash of the words read above and one bit
	served = kpr_np_port_served(&t);
	if (!served && !kpr_np_maybe_vip_hash(kpr_np_vip_fold(vx)))
		return KPR_NP_EARLY_PASS;
	kpr_np_early_daddr(&t.daddr, d6, d4); // once for both users: the program does not grow
	if (served)
		return KPR_NP_EARLY_PARSE && !kpr_np_early_fill(ctx, pkt, &t, l3) ? KPR_NP_EARLY_LB : KPR_NP_EARLY_FULL;
#else
	if (kpr_np_port_served(&t))
		return KPR_NP_EARLY_PARSE && !kpr_np_early_fill(ctx, pkt, &t, l3) ? KPR_NP_EARLY_LB : KPR_NP_EARLY_FULL;
	if (!kpr_np_maybe_vip(&t.daddr))
		return KPR_NP_EARLY_PASS;
#endif
	// a set bit is an announced address, or another address's hash (one in five of them with
	// 16000 announced): the exact lookup then, which the full path would do too
	if (!kpr_np_vip.lookup(&t.daddr))
		return KPR_NP_EARLY_PASS;
	return KPR_NP_EARLY_FULL;
}
#endif

#define KPR_NP_TO_LB 0x10000 // kpr_np_from_parse: no verdict, the service path's (no TC_ACT_* or XDP_* value)

// What the full parse of a packet from outside says: a verdict, or KPR_NP_TO_LB.
static __always_inline int kpr_np_from_parse(kpr_ctx_t *ctx, struct kpr_pkt *pkt)
{
	int ret;
#if KPR_NP_DSR
	union kpr_addr fe;
	__be16 fport;
#endif

	ret = kpr_parse(ctx, pkt);
	KPR_NP_STOP(1);
	if (ret == KPR_PARSE_NOT_IP)
		return KPR_NP_PASS;
	if (ret == KPR_PARSE_MALFORMED) {
		kpr_np_count(KPR_NP_ST_MALFORMED);
		kpr_mon_flow(KPR_MON_T_PASS, KPR_NP_MON_HOOK, KPR_MON_R_MALFORMED, &pkt->t, 0, 0, (void *)0);
		return KPR_NP_PASS;
	}
	if (!pkt->l4_off) { // non-first fragment, or an L4 without ports
		if (pkt->frag)
			kpr_np_count(KPR_NP_ST_FRAGMENT);
		return kpr_np_vip_guard(pkt);
	}
	if (pkt->t.proto != IPPROTO_TCP && pkt->t.proto != IPPROTO_UDP) {
		if (kpr_icmp_is_error(ctx, pkt))
			return kpr_np_tail(ctx, KPR_NP_CALL_ICMP_IN);
		return kpr_np_vip_guard(pkt);
	}
#if KPR_NP_DSR
	if (kpr_dsr_parse(ctx, pkt, &fe, &fport))
		return kpr_np_tail(ctx, KPR_NP_CALL_DSR_RECV);
#endif
	if (kpr_np_snat_port(&pkt->t) && kpr_np_is_snat_reply(&pkt->t))
		return kpr_np_tail(ctx, KPR_NP_CALL_SNAT_REPLY);
#if KPR_NP_PREFILTER
	// the fast exit: no conntrack or service lookups for a port no frontend has (replies to
	// source-NATed flows, DSR headers and ICMP errors took their paths above)
	if (!kpr_np_port_served(&pkt->t))
		return kpr_np_maybe_vip(&pkt->t.daddr) ? kpr_np_vip_guard(pkt) : KPR_NP_PASS;
#endif
	return KPR_NP_TO_LB;
}

// A packet arriving on an external device.
static __always_inline int kpr_np_from_netdev(kpr_ctx_t *ctx)
{
	__u8 csum_state = ctx_csum_state(&ctx); // first: see there
	struct kpr_pkt pkt;
	int ret = KPR_NP_TO_LB;

#if KPR_NP_PREFILTER && KPR_NP_EARLY_EXIT
	ret = kpr_np_early(ctx, &pkt);
	if (ret == KPR_NP_EARLY_PASS)
		return KPR_NP_PASS;
	if (KPR_NP_TEST_EARLY_FULL && ret == KPR_NP_EARLY_FULL)
		return KPR_NP_TEST_EARLY_FULL;
	// (one call of the service path below: inlined twice, it doubles the program)
	if (KPR_NP_EARLY_PARSE && ret == KPR_NP_EARLY_LB) {
		KPR_NP_STOP(1);
		ret = KPR_NP_TO_LB;
	} else {
		ret = kpr_np_from_parse(ctx, &pkt);
	}
#else
	ret = kpr_np_from_parse(ctx, &pkt);
#endif
	if (ret != KPR_NP_TO_LB)
		return ret;
	pkt.csum_state = csum_state;
	return kpr_np_lb(ctx, &pkt);
}

// A packet leaving through an external device.
static __always_inline int kpr_np_to_netdev(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_np_rev *rev;
	struct kpr_ct_key rk;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return KPR_NP_PASS;
	if (pkt.t.proto != IPPROTO_TCP && pkt.t.proto != IPPROTO_UDP) {
		if (kpr_icmp_is_error(ctx, &pkt))
			return kpr_np_tail(ctx, KPR_NP_CALL_ICMP_OUT);
		return KPR_NP_PASS;
	}
	kpr_ct_key_from_tuple(&rk, &pkt.t, KPR_CT_DIR_REPLY);
	rev = kpr_np_rev.lookup(&rk);
	if (!rev)
		return KPR_NP_PASS;
	if ((pkt.t.tcp_flags & (KPR_TCP_SYN | KPR_TCP_ACK)) == (KPR_TCP_SYN | KPR_TCP_ACK) && !kpr_np_rev_live(rev, &pkt.t)) {
		kpr_np_rev.delete(&rk);
		kpr_np_count(KPR_NP_ST_REV_STALE);
		return KPR_NP_PASS;
	}
	kpr_np_rev_touch(rev, pkt.t.tcp_flags);
	if (kpr_nat_snat(ctx, &pkt, &rev->addr, rev->port)) {
		kpr_np_drop(KPR_NP_ST_DROP_NAT, KPR_MON_R_NAT_FAILED, &pkt.t);
		return CTX_DROP;
	}
	kpr_np_count(KPR_NP_ST_REPLY_REVNAT);
	return CTX_PASS;
}

#endif /* KPR_LIB_NODEPORT_H */
