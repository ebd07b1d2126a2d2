"""announce_bgp: announce LoadBalancer IPs and ExternalIPs over BGP, as MetalLB's BGP mode does.

Each node announces a host route (/32, /128) for the addresses of the services the config
selects, with itself as next hop; routers spread traffic over the nodes that announce an
address (ECMP). With externalTrafficPolicy Local a node announces an address only while it
has a ready local endpoint. kpr runs ExaBGP 5 as a managed child (`exabgp server`) and drives
it through its process API; graceful restart keeps the routes at the routers while the agent
or ExaBGP restarts.

Enable it with

    plugins:
      announce_bgp:
        enabled: true
        localASN: 64512
        peers:
          - {address: 10.0.0.254, asn: 64500}

Modules: config.py (the section; serviceSelector is core's kpr.selectors), routes.py (pure
logic: which routes), exabgp.py (config file, commands, supervisor), bridge.py (the helper
ExaBGP runs), speaker.py (the agent's end of the bridge), plugin.py (the hooks).
"""

from .config import AnnounceBGPConfig
from .plugin import AnnounceBGP

__all__ = ["AnnounceBGP", "AnnounceBGPConfig"]
