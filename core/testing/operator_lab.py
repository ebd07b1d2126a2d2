"""An operator's node in namespaces: one `kpr run` with socklb and tc_nodeport, many backends,
and read-only checks of what the agent wrote.

    with operator_lab("kpr-op") as lab:
        lab.write("web", [svc_doc, slice_doc])     # a manifest, replaced atomically
        rig = AgentRig(lab.topo, lab.pin, lab.work, "", "", agent_ns="node1", agent=lab.agent)
        rig.start()                                # tests/kernel/socklb_env's: kpr run, ready
        lab.cluster_ip("10.96.10.10", 80, 8)       # answers: the backend address reached
        lab.node_port(30080, 8)                    # from the external client
        assert fe_disagreements(lab.pin) == []

Layout: the external client `cl` (10.100.0.2, fd10::2) behind router `rt` reaches node1
(10.0.1.10, fd01::10, its device eth0); pod `pa` behind node1 holds BACKENDS4/BACKENDS6 (12 of
each family) and one server answering, on TCP port PORT, the address the connection reached
(kpr.testing.echo's server answering the reached address): a test tells backends apart by
address, with one process. Clients of
ClusterIPs run in node1's namespace inside the socklb hooks' child cgroup.

`fe_disagreements(pin)` reads the pinned kpr_fe lines against kpr_svc and kpr_slots without
writing anything (the writer's periodic check repairs what it finds; a test must see what the
writer left).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BACKENDS4", "BACKENDS6", "CLIENT4", "CLIENT6", "NODE4", "NODE6", "PORT", "OperatorLab", "endpoint_slice",
           "fe_disagreements", "operator_lab", "tc_programs"]

NODE4, NODE6 = "10.0.1.10", "fd01::10"
CLIENT4, CLIENT6 = "10.100.0.2", "fd10::2"
BACKENDS4 = tuple(f"10.244.1.{11 + i}" for i in range(12))
BACKENDS6 = tuple(f"fd44:1::{11 + i:x}" for i in range(12))
PORT = 8080

def endpoint_slice(service: str, addrs: Sequence[str]) -> dict[str, Any]:
    """A slice of `service` on node1: `addrs` on PORT, the port named "http"."""
    from kpr.testing import manifests

    return manifests.endpoint_slice(service, addrs, port=PORT, port_name="http")


def _build(topo: Any) -> None:
    from kpr.testing.echo import start_echo

    topo.add_router("rt")
    topo.add_external("cl")
    topo.link("rt", "cl", ["10.100.0.1/24", "fd10::1/64"], [f"{CLIENT4}/24", f"{CLIENT6}/64"])
    topo.add_route("cl", "default", "10.100.0.1")
    topo.add_route("cl", "default", "fd10::1")
    topo.add_node("node1")
    topo.link("rt", "node1", ["10.0.1.1/24", "fd01::1/64"], [f"{NODE4}/24", f"{NODE6}/64"])
    topo.add_route("node1", "default", "10.0.1.1")
    topo.add_route("node1", "default", "fd01::1")
    topo.add_route("rt", "10.244.1.0/24", NODE4)
    topo.add_route("rt", "fd44:1::/64", NODE6)
    for ns in ("rt", "node1"):
        topo.sysctl(ns, {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"})
    topo.add_pod("node1", "pa", BACKENDS4[0], ip6=BACKENDS6[0])
    host_if = next(i for i in topo["node1"].ifaces if i.startswith("lxc"))
    for a4, a6 in zip(BACKENDS4[1:], BACKENDS6[1:]):
        topo.run("pa", f"ip addr add {a4}/32 dev eth0 && ip -6 addr add {a6}/128 dev eth0 nodad")
        topo.run("node1", f"ip route replace {a4}/32 dev {host_if} && ip -6 route replace {a6}/128 dev {host_if}")
    start_echo(topo["pa"], port=PORT, reached=True)


@dataclass
class OperatorLab:
    topo: Any  # kpr.testing.netns.Topology
    pin: Path
    work: Path
    cgroup: Path
    agent: Any  # kpr.testing.agent.AgentConfig (the agent's socket, manifests, state)

    def write(self, name: str, docs: Sequence[dict]) -> None:
        """manifests/<name>.yaml holding `docs` (AgentConfig.manifest: replaced by a rename)."""
        from kpr.testing.manifests import yaml_docs

        self.agent.manifest(name, yaml_docs(*docs))

    def remove(self, name: str) -> None:
        (self.agent.manifests / f"{name}.yaml").unlink()

    def _answers(self, rows: list[dict]) -> list[str]:
        return [r.get("answer") or r.get("error", "?") for r in rows]

    def cluster_ip(self, host: str, port: int, n: int = 8) -> list[str]:
        """n new connections from node1 (in the hooks' cgroup): each the address it reached, or
        its error's name."""
        from kpr.testing import echo

        return self._answers(echo.client(self.topo["node1"], "tcp", host, port, n, "timeout=2", cgroup=self.cgroup))

    def node_port(self, port: int, n: int = 8, host: str = NODE4) -> list[str]:
        """n new connections from the external client to node1's `host`:`port`."""
        from kpr.testing import echo

        return self._answers(echo.client(self.topo["cl"], "tcp", host, port, n, "timeout=2"))

    def status(self) -> dict:
        """`kpr status --json` of the running agent."""
        from kpr import api

        return api.get(self.agent.socket, "/v1/status", timeout=10)

    def services(self) -> dict[str, set[tuple[str, str, int, str]]]:
        """The agent's frontends by service name: {(type, address, port, protocol)}."""
        from kpr import api

        out: dict[str, set[tuple[str, str, int, str]]] = {}
        for row in api.get(self.agent.socket, "/v1/services", timeout=10):
            out.setdefault(row["service"].split("/")[-1], set()).add(
                (row["type"], row["address"], row["port"], row["protocol"]))
        return out


def tc_programs(lab: OperatorLab) -> dict[str, int]:
    """Programs attached by kpr's plugins, counted as an operator would: the hooks' cgroup
    (bpftool) and node1's eth0 (tcx and clsact, both directions)."""
    import json

    from kpr.plugins.tc_nodeport.attach import tcx_programs

    cg = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", str(lab.cgroup)], capture_output=True,
                                   text=True, check=True).stdout or "[]")
    out = {"cgroup": len(cg)}
    for direction in ("ingress", "egress"):
        with lab.topo["node1"].enter():
            import socket

            n = len(tcx_programs(socket.if_nametoindex("eth0"), direction))
        tc = json.loads(lab.topo.run("node1", ["tc", "-j", "filter", "show", "dev", "eth0", direction]).stdout or "[]")
        out[direction] = n + sum(1 for f in tc if f.get("kind") == "bpf" and "handle" in (f.get("options") or {}))
    return out


def fe_disagreements(pin: Path) -> list[str]:
    """kpr_fe lines that do not hold what kpr_svc and kpr_slots hold for their key, and
    kpr_svc keys without a line where one was free; [] when the table agrees. Writes nothing."""
    from kpr.bpf import maps as M
    from kpr.servicemaps import fetable as F

    svc = M.BpfMap.open_pinned(Path(pin) / "kpr_svc")
    slots = M.BpfMap.open_pinned(Path(pin) / "kpr_slots")
    fe = F.FeTable(M.BpfMap.open_pinned(Path(pin) / F.FE_MAP), slots=slots)
    slots.close()  # (FeTable keeps its own mapping of kpr_slots' memory)
    try:
        want = {k: v for k, v in svc.items() if k[F._SLOT_AT : F._SLOT_AT + 2] == b"\0\0"}
        return fe.disagreements(want, bytes(fe.mem[: F.LINES * F.LINE]))[0]
    finally:
        fe.close()
        svc.close()


@contextlib.contextmanager
def operator_lab(prefix: str, *, cluster_cidr: Sequence[str] = ("10.96.0.0/16",)) -> Iterator[OperatorLab]:
    """The lab (module docstring) with its agent configured, not started (the caller runs it and
    kills it before the block ends); at the end `kpr cleanup` removes what the agent attached,
    and every namespace, the cgroup, the bpffs and the work directory go, even on failure."""
    from kpr.testing.agent import AgentConfig, kpr_cleanup, lab_scratch

    with contextlib.ExitStack() as stack:
        mnt, topo, cg, work = lab_scratch(stack, prefix)
        _build(topo)
        pin = mnt / "kpr"
        stack.callback(kpr_cleanup, pin, work, check=True)  # its failure is the test's
        agent = AgentConfig(work, pin, addresses=(NODE4, NODE6), devices=("eth0",), shutdown_timeout=None,
                            extra={"service": {"clusterCIDR": list(cluster_cidr)}})
        agent.plugin("socklb", cgroupPath=str(cg), keepAttachedOnStop=True)
        agent.plugin("tc_nodeport", keepAttachedOnStop=True)
        agent.write()
        yield OperatorLab(topo, pin, work, cg, agent)
