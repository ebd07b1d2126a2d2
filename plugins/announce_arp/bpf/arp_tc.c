/* tc (tcx or clsact) ingress entry of announce_arp: answers ARP and neighbour solicitations
 * for owned addresses (core/bpf/lib/arp.h) and leaves every other packet to later programs
 * and the kernel. Named kpr_* so `kpr cleanup` recognises it.
 */
#include "ctx/skb.h"

#define KPR_ARP_PASS TC_ACT_UNSPEC // untouched packets go on to the tcx programs and filters after ours

#include "lib/arp.h"

int kpr_arp_tc(struct __sk_buff *ctx) { return kpr_arp_answer(ctx); }
