"""host_routing: eBPF host routing between the node's external devices and its local pods.

Traffic from outside to a local pod goes from the external device's ingress straight into the
pod's namespace (bpf_redirect_peer); traffic a pod sends goes from its host-side device
straight out of the external device (bpf_redirect_neigh) or into another local pod, bypassing
the host's upper stack, as in Cilium's LPC 2020 talk. Pods the socket hooks do not cover get
their services load-balanced per packet here. See README.md, "host_routing".

Enable it with

    plugins:
      host_routing:
        enabled: true
"""

from .config import HostRoutingConfig
from .plugin import HostRouting

__all__ = ["HostRouting", "HostRoutingConfig"]
