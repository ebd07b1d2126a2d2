/* XDP entry of announce_arp: the same answers as arp_tc.c from the same code (lib/arp.h).
 * The plugin attaches the tc build (a veth's XDP_TX frames reach its peer only when the
 * peer runs XDP too); this one is built and tested so both hooks stay possible.
 */
#include "ctx/xdp.h"
#include "lib/arp.h"

int kpr_arp_xdp(struct xdp_md *ctx) { return kpr_arp_answer(ctx); }
