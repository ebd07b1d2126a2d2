/* tc entry points of the tc_nodeport plugin: clsact ingress and egress of the node's external
 * devices, and the stages they tail-call (kpr_np_calls, filled by the plugin in KPR_NP_CALL_*
 * order). The logic is lib/nodeport.h, shared with an XDP build; tunables come from the plugin
 * as -D flags (lib/nodeport.h, lib/maps.h). kpr's filters are named kpr_*, which is how the
 * plugin and `kpr cleanup` recognise their own.
 */
#include "ctx/skb.h"

#ifndef KPR_NP_PASS
#define KPR_NP_PASS TC_ACT_UNSPEC // untouched packets go on to the filters after kpr's
#endif

#include "lib/nodeport.h"

// Packets arriving from outside: requests to frontends, replies to source-NATed flows, DSR.
int kpr_np_ingress(struct __sk_buff *ctx) { return kpr_np_from_netdev(ctx); }
// Packets leaving to the outside: replies of local and DSR-reached backends.
int kpr_np_egress(struct __sk_buff *ctx) { return kpr_np_to_netdev(ctx); }

// Stages, one per KPR_NP_CALL_*.
int kpr_np_local(struct __sk_buff *ctx) { return kpr_np_stage_local(ctx); }
int kpr_np_snat(struct __sk_buff *ctx) { return kpr_np_stage_snat(ctx); }
int kpr_np_snat_claim(struct __sk_buff *ctx) { return kpr_np_stage_snat_claim(ctx); }
int kpr_np_dsr(struct __sk_buff *ctx) { return kpr_np_stage_dsr(ctx); }
int kpr_np_nobackend(struct __sk_buff *ctx) { return kpr_np_stage_no_backend(ctx); }
int kpr_np_snat_reply(struct __sk_buff *ctx) { return kpr_np_stage_snat_reply(ctx); }
int kpr_np_dsr_recv(struct __sk_buff *ctx) { return kpr_np_stage_dsr_recv(ctx); }
int kpr_np_icmp_in(struct __sk_buff *ctx) { return kpr_np_stage_icmp_in(ctx); }
int kpr_np_icmp_out(struct __sk_buff *ctx) { return kpr_np_stage_icmp_out(ctx); }
