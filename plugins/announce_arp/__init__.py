"""announce_arp: announce LoadBalancer IPs and ExternalIPs on the local segment over ARP and
NDP, one node per address, as MetalLB's layer-2 mode does but with faster failover.

- ownership.py: which node owns an address (rendezvous hashing over the eligible live nodes)
- heartbeat.py, membership.py: which nodes are alive and what each may announce
  (authenticated UDP heartbeats), behind the `Membership` interface
- leases.py: the same through one coordination.k8s.io Lease per node (membership: kubernetes)
- bpfanswer.py: answers ARP requests / neighbour solicitations in BPF (bpf/arp_tc.c over
  core/bpf/lib/arp.h) on every interface the program attaches to
- responder.py: sends gratuitous ARP and unsolicited neighbour advertisements, and answers
  requests in Python where the BPF program cannot be attached (scapy)
- droprules.py: the nftables table that keeps a node from routing VIP traffic back out

Enable it with

    plugins:
      announce_arp:
        enabled: true
        interfaces: [eth0]
        members: [node1=10.0.0.1, node2=10.0.0.2]   # name=address of each heartbeat endpoint
        heartbeatPort: 7946
        heartbeatInterval: 0.2      # seconds
        deadInterval: 1.0           # seconds
        keyFile: /etc/kpr/arp.key   # shared secret, at least 16 bytes
        garpRepeat: 3
        garpInterval: 0             # seconds; 0 disables periodic re-announcement

or, with Leases through the API server the `source` section reaches,

        membership: kubernetes
        leaseNamespace: kube-system
        leaseDuration: 3            # seconds
        renewInterval: 1.0          # seconds
        leasePrefix: kpr-arp-
"""

from .config import AnnounceARPConfig
from .plugin import AnnounceARP

__all__ = ["AnnounceARP", "AnnounceARPConfig"]
