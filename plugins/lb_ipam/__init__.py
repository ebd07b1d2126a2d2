"""lb_ipam: LoadBalancer addresses from pools, as MetalLB and Cilium's LB IPAM hand them out.

A `type: LoadBalancer` Service without an address gets one from a configured pool; the
plugin writes it to status.loadBalancer.ingress through the source (kpr.sources.StatusWriter),
and from there it reaches the data path and the announcers like any other LoadBalancer
address. Enable it with

    plugins:
      lb_ipam:
        enabled: true
        pools:
          - name: public
            addresses: [203.0.113.0/28]
"""

from .config import LbIpamConfig
from .plugin import LbIpam

__all__ = ["LbIpam", "LbIpamConfig"]
