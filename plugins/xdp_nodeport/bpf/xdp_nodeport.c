/* XDP entry points of the xdp_nodeport plugin: the same NodePort logic as tc_nodeport's
 * (lib/nodeport.h), compiled against ctx/xdp.h. kpr_xnp_ingress is attached to the node's
 * external devices; the stages are tail-called through kpr_np_xcalls (filled by the plugin in
 * KPR_NP_CALL_* order). XDP has no egress hook: kpr_xnp_egress is built (and verified) for a
 * devmap egress program, but the plugin does not attach it. DSR and delivery into a pod's
 * namespace need skb operations XDP lacks; asking for them (-DKPR_NP_DSR=1, -DKPR_NP_PEER=1)
 * fails the build on purpose (ctx/xdp.h).
 */
#include "ctx/xdp.h"

#include "lib/nodeport.h"

// Frames arriving from outside: requests to frontends, replies to source-NATed flows.
int kpr_xnp_ingress(struct xdp_md *ctx) { return kpr_np_from_netdev(ctx); }
// Frames leaving to the outside (devmap egress): replies of local backends.
int kpr_xnp_egress(struct xdp_md *ctx) { return kpr_np_to_netdev(ctx); }

// Stages, one per KPR_NP_CALL_* this build has (DSR and DSR receive are tc only).
int kpr_xnp_local(struct xdp_md *ctx) { return kpr_np_stage_local(ctx); }
int kpr_xnp_snat(struct xdp_md *ctx) { return kpr_np_stage_snat(ctx); }
int kpr_xnp_snat_claim(struct xdp_md *ctx) { return kpr_np_stage_snat_claim(ctx); }
int kpr_xnp_nobackend(struct xdp_md *ctx) { return kpr_np_stage_no_backend(ctx); }
int kpr_xnp_snat_reply(struct xdp_md *ctx) { return kpr_np_stage_snat_reply(ctx); }
int kpr_xnp_icmp_in(struct xdp_md *ctx) { return kpr_np_stage_icmp_in(ctx); }
int kpr_xnp_icmp_out(struct xdp_md *ctx) { return kpr_np_stage_icmp_out(ctx); }
#if KPR_NP_DSR
int kpr_xnp_dsr(struct xdp_md *ctx) { return kpr_np_stage_dsr(ctx); }
int kpr_xnp_dsr_recv(struct xdp_md *ctx) { return kpr_np_stage_dsr_recv(ctx); }
#endif
