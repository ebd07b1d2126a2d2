"""The `plugins.tc_nodeport` config section (the shared keys: kpr.nodeport.config)."""

from __future__ import annotations

from pydantic import Field

from kpr.nodeport.config import Mode, NodePortSection


class TcNodePortConfig(NodePortSection):
    # How new flows to a backend on another node travel: "snat" (the node's address and an
    # allocated port; replies come back through this node), "dsr" (the client's address kept,
    # the frontend carried to the backend's node in an IP option / IPv6 destination option, and
    # that node's kpr makes the backend answer the client directly), "hybrid" (DSR for TCP,
    # SNAT for the rest). Per service: annotation service.kpr.io/lb-mode.
    mode: Mode = "snat"
    # tc filter priority of kpr's programs on each device (lower runs first). Filters of other
    # owners are never touched; one at a lower priority sees packets before kpr does.
    tc_priority: int = Field(1, ge=1, le=65535)
    # Deliver to node-local pods on veth/netkit devices with bpf_redirect_peer (skips the host's
    # backlog). Other devices (a bridge, an overlay) never get it, whatever this says; false:
    # bpf_redirect for every pod.
    redirect_peer: bool = True
