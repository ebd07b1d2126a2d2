"""North-south load balancing shared by the NodePort plugins (tc_nodeport, xdp_nodeport).

Both compile core/bpf/lib/nodeport.h, one for tc (ctx/skb.h), one for XDP (ctx/xdp.h). The
state both read has one owner, the NodePort facility (kpr_requires "nodeport"):
  facility.py     the facility: maps, conntrack GC, health checks, node facts, status
  services.py     what the maps need of each service, counted node-wide (pure logic)
  tables.py       the facility's maps: created, and written by difference
  gc.py           conntrack garbage collection and clearing flows of departed backends
  healthcheck.py  healthCheckNodePort listeners for externalTrafficPolicy=Local
  netns.py        the agent's network namespace, and its devices' facts
and what each plugin does with its own build:
  datapath.py     loading the programs of an entry file, struct packers, counters
  agent.py        the plugins' base: load, attach to node.devices, report its own counters
  config.py       the config keys both plugins understand
"""
