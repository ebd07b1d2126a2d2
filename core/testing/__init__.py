"""The testing kit shared by kpr's and its plugins' tests (README: "Testing a plugin").

- kpr.testing.harness: one plugin (or a few) run as the agent would, with the core facilities
  it requires, against a real service map writer: apply/delete/feed a service through the
  agent's synchronous bus, the writer first, then the facilities and plugins.
- kpr.testing.agent: agent configs with every path the test's own (AgentConfig), agents run
  from them in this process (start_agent, running_agent).
- kpr.testing.echo: echo servers and a client (TCP and UDP, IPv4 and IPv6) in namespaces.
- kpr.testing.bpffs: scratch pin directories, private bpffs mounts, maps pinned as an older kpr
  left them (pin_map).
- kpr.testing.waiting: wait_for (a condition with a deadline), stays (one that must hold for a
  while), free_port.
- kpr.testing.fixtures: pytest fixtures and hooks (`from kpr.testing.fixtures import *` in a
  conftest.py): kernel skips, topology, cgroup, pin_dir, bpffs, harness.
- kpr.testing.prog_run: BPF_PROG_TEST_RUN through libbpf, table-driven packet cases,
  checksum verification.
- kpr.testing.netns: throw-away namespace topologies (nodes, pods, clients, routers).
- kpr.testing.cgroup: child cgroups for cgroup BPF hooks.
- kpr.testing.restart_probe: a real-time client that measures gaps in a service (not in its
  own scheduling) while an agent restarts (benchmarks/bench_restart.py).
- kpr.testing.relay: a TCP relay that brings a loopback test server into a namespace, and
  cuts one client off it.
- kpr.testing.apiserver: an in-memory Kubernetes API server (TLS, token auth, faults) for
  tests of the Kubernetes source; kubectl and the kubernetes client accept it.
- kpr.testing.operator_lab: one `kpr run` with socklb and tc_nodeport, a pod holding 12
  backend addresses, an external client; fe_disagreements reads the kpr_fe lines back.
- kpr.testing.standin_maps: DictMap, a dict standing in for a map the code under test only
  dumps and deletes from (the NodePort collector's passes).
- kpr.testing.np_conntrack: NodePort's conntrack entries wherever the build put them (a slot of
  kpr_np_ct_slots or kpr_ct): ct_entries, ct_of_client, ct_write. Tests read flows there, not
  from kpr_ct alone, so they hold whichever KPR_NP_CT_SLOTS the header defaults to.

Submodules are imported on use so `import kpr.testing` stays cheap and needs no root.
"""

from __future__ import annotations

import os
import shutil

__all__ = ["kernel_skip_reason"]


def kernel_skip_reason() -> str | None:
    """Why kernel tests cannot run here, or None when they can (root, bcc, iproute2)."""
    if os.geteuid() != 0:
        return "kernel tests need root (BPF, network namespaces, cgroups)"
    try:
        import bcc  # noqa: F401 - only checking that it imports
    except ImportError as exc:
        return f"bcc not importable ({exc}); run scripts/install-deps.sh and use a venv with --system-site-packages"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed; run scripts/install-deps.sh"
    if not os.path.exists("/proc/self/ns/net"):
        return "kernel without network namespaces"
    return None
