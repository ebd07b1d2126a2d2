/* tc entry points of the host_routing plugin: ingress of the external devices, ingress and
 * egress of pods' host-side devices. The logic is lib/host_routing.h; the helpers and the
 * per-packet ClusterIP switch come from the plugin as -D flags. kpr's programs are named
 * kpr_*, which is how the plugin and `kpr cleanup` recognise their own.
 */
#include "ctx/skb.h"
#include "lib/host_routing.h"

// From outside the node to local pods.
int kpr_hr_from_netdev(struct __sk_buff *ctx) { return kpr_hr_from_netdev_main(ctx); }
// What a pod sends: to services, other pods, the outside.
int kpr_hr_from_pod(struct __sk_buff *ctx) { return kpr_hr_from_pod_main(ctx); }
// What a pod receives through the stack: replies of its per-packet service flows.
int kpr_hr_to_pod(struct __sk_buff *ctx) { return kpr_hr_to_pod_main(ctx); }
