"""North-south load balancing shared by the NodePort plugins (tc_nodeport, xdp_nodeport).

Both compile core/bpf/lib/nodeport.h, one for tc (ctx/skb.h), one for XDP (ctx/xdp.h), and
keep the same maps in step with services and node facts. What they share lives here:
  datapath.py     loading the programs of an entry file, struct packers, plugin-owned maps
  gc.py           conntrack garbage collection and clearing flows of departed backends
  healthcheck.py  healthCheckNodePort listeners for externalTrafficPolicy=Local
  config.py       the config keys both plugins understand
  agent.py        the service/node bookkeeping; plugins add attaching to devices
"""
