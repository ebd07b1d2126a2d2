/* Counters of the ARP/NDP answering program (lib/arp.h), one line each:
 * KPR_ARP_COUNTER(C name, status name). The one definition of names and order: lib/arp.h
 * builds its enum from it and kpr.plugins.announce_arp.bpfanswer reads it for the names.
 * Append only: a slot's meaning must not change under a running program.
 */
KPR_ARP_COUNTER(ARP_REPLY, arp_replies)          /* ARP requests (probes included) answered */
KPR_ARP_COUNTER(NA_REPLY, na_replies)            /* neighbour solicitations answered (DAD ones to all-nodes) */
KPR_ARP_COUNTER(NOT_OWNED, requests_not_owned)   /* requests for an address this node does not own here: to the kernel */
KPR_ARP_COUNTER(CONFLICT, conflicts)             /* another node announcing an address we own: to the kernel */
KPR_ARP_COUNTER(EXPIRED, agent_silent)           /* requests for owned addresses while the agent stopped refreshing: to the kernel */
KPR_ARP_COUNTER(INVALID, invalid)                /* malformed ARP / NS (lengths, hop limit, code): to the kernel */
KPR_ARP_COUNTER(TX_ERROR, reply_errors)          /* a reply could not be built (resize failed): to the kernel */
