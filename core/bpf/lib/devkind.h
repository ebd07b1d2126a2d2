/* kpr datapath library: what an egress device is, as the agent tells the data path.
 *
 * The values are kpr.netdevs.DevKind's (a root-free test checks names and values against the
 * enum): the agent classifies every link with pyroute2 and writes ifindex -> kind into the data
 * path's own map, and the program picks the forwarding helper the device allows.
 * Context-free.
 */
#ifndef KPR_LIB_DEVKIND_H
#define KPR_LIB_DEVKIND_H

#include "lib/common.h"

#define KPR_DEV_UNKNOWN 0    // not classified (or not known to the agent yet)
#define KPR_DEV_VETH_PEER 1  // veth whose peer is in another namespace: bpf_redirect_peer works
#define KPR_DEV_NETKIT 2     // netkit: bpf_redirect_peer works
#define KPR_DEV_BRIDGE 3     // Linux bridge (cni0): no peer; neighbour output works
#define KPR_DEV_OVERLAY 4    // vxlan, geneve, gre, ipip, wireguard, ...: encapsulates on xmit
#define KPR_DEV_PHYSICAL 5   // other Ethernet device: NIC, macvlan, bond, vlan, dummy
#define KPR_DEV_VETH_LOCAL 6 // veth whose peer is in the same namespace
#define KPR_DEV_L3 7         // no Ethernet header: loopback, tun, raw IP devices
#define KPR_DEV_COUNT 8      // number of kinds (array sizes), not a kind

// bpf_redirect_peer only reaches these; anything else is dropped by the kernel after the
// program returned, where no counter sees it.
static __always_inline int kpr_dev_has_peer(__u32 kind)
{
	return kind == KPR_DEV_VETH_PEER || kind == KPR_DEV_NETKIT;
}

#endif
