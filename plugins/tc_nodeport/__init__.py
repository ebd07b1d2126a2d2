"""tc_nodeport: north-south load balancing for NodePort, LoadBalancer and ExternalIP services.

Programs on clsact ingress and egress of the node's external devices (node.devices) take
traffic from outside to frontends, pick a backend (random or Maglev, session affinity,
source ranges, externalTrafficPolicy), track the flow and translate it: local backends get
the packet straight into their namespace; remote ones through SNAT or DSR. The data path is
core/bpf/lib/nodeport.h (shared with XDP builds); plugins/tc_nodeport/bpf/tc_nodeport.c is
its tc entry file.

Enable it with

    plugins:
      tc_nodeport:
        enabled: true
        mode: snat        # snat | dsr | hybrid; per service: service.kpr.io/lb-mode
"""

from .config import TcNodePortConfig
from .plugin import TcNodePort

__all__ = ["TcNodePort", "TcNodePortConfig"]
