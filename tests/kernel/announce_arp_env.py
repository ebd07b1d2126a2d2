"""Shared pieces of the announce_arp kernel tests and benchmark: an L2 segment in namespaces
with kpr agents on its nodes, and the router's view of it.

Layout: a "sw" namespace holds a bridge; every node (n1, n2, ...) and the router "r" have
eth0 on it. Nodes hold 10.0.0.<i>/24 and fd00::<i>/64 (forwarding on, default route via the
router); the router holds 10.0.0.254 and fd00::fe and reaches the VIP prefixes
10.0.100.0/24 and fd00:100::/64 on-link, so it resolves VIPs with ARP / NDP itself. Each
node runs `kpr run` (files source, announce_arp) inside its namespace as a subprocess; its
config, manifests, socket, state and log live in a per-test directory.

With `membership="kubernetes"` the agents keep the files source for services but take part
through Leases on a test API server (kpr.testing.apiserver) that the test runs on the host's
loopback; a kpr.testing.relay.TcpRelay makes it reachable at the same address and port on
each node namespace's loopback, so agents use its URL and certificate unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpr import api
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.agent import AgentConfig, kpr_cli
from kpr.testing.bpffs import private_bpffs
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.netns import Topology, in_netns
from kpr.testing.relay import TcpRelay
from kpr.testing.waiting import wait_for

__all__ = ["wait_for"]  # the kit's, imported from here by the tests and the benchmark

VIP4 = "10.0.100.10"
VIP6 = "fd00:100::10"
ROUTER4 = "10.0.0.254"
ROUTER6 = "fd00::fe"
PORT = 17946  # heartbeats; inside the test namespaces only
KEY = b"kpr-announce-arp-test-key-0123456789"


def node_ip4(i: int) -> str:
    return f"10.0.0.{i}"


def node_ip6(i: int) -> str:
    return f"fd00::{i}"


def lb_manifest(name: str, vip: str, endpoint_nodes: list[str], *, local: bool = False) -> str:
    """A LoadBalancer service at `vip` with one ready endpoint on each named node."""
    v6 = ":" in vip
    family = "IPv6" if v6 else "IPv4"
    eps = [(f"fd00:10:244::{i + 1}" if v6 else f"10.244.{i + 1}.5", n) for i, n in enumerate(endpoint_nodes)]
    return yaml_docs(
        service(name, type="LoadBalancer", local=local, family=family, port_name="http", protocol="TCP", lb_ip=vip),
        endpoint_slice(name, eps, port_name="http", ready=True, family=family),
    )


@dataclass
class Node:
    name: str
    index: int
    ns: str
    agent: AgentConfig  # its agent's config, every path in the node's own directory
    mac: str = ""
    proc: subprocess.Popen | None = None
    log: Any = None

    def __post_init__(self) -> None:
        self.dir, self.config, self.socket = self.agent.work, self.agent.path, self.agent.socket


@dataclass
class Segment:
    topo: Topology
    base: Path
    n_nodes: int = 3
    members: bool = True
    announce: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    # heartbeat, or kubernetes: Leases on `apiserver`, reached through a TcpRelay.
    membership: str = "heartbeat"
    apiserver: KubeApiServer | None = None

    def __post_init__(self) -> None:
        t = self.topo
        self.relay: TcpRelay | None = None
        self.hosts: dict[str, int] = {}  # plain hosts (add_host): namespace -> index
        # Each node pins its links in its own directory of a private bpffs (the agents share
        # this host's bpffs otherwise, and `ip netns exec` hides /sys/fs/bpf).
        self._stack = contextlib.ExitStack()
        self.bpffs = self._stack.enter_context(private_bpffs(f"kpr-arp-{os.getpid()}"))
        if self.membership == "kubernetes":
            if self.apiserver is None:
                raise ValueError("membership kubernetes needs an apiserver")
            self.relay = TcpRelay(self.apiserver.port)
        t.add_namespace("sw")
        t.run("sw", "ip link add br0 type bridge && ip link set br0 type bridge mcast_snooping 0 && ip link set br0 up")
        t.add_router("r")
        self._attach("r", [f"{ROUTER4}/24", f"{ROUTER6}/64"])
        t.run("r", f"ip route add 10.0.100.0/24 dev eth0 && ip -6 route add fd00:100::/64 dev eth0")
        self.manifests = self.base / "manifests"
        self.manifests.mkdir(parents=True, exist_ok=True)
        (self.base / "arp.key").write_bytes(KEY)
        os.chmod(self.base / "arp.key", 0o600)
        for i in range(1, self.n_nodes + 1):
            self.add_node(f"node{i}", i)

    def _attach(self, ns: str, addrs: list[str]) -> None:
        t = self.topo
        port = f"p{ns}"[:15]
        t.link(ns, "sw", addrs, None, ifname_a="eth0", ifname_b=port)
        t.run("sw", f"ip link set {port} master br0")

    def add_node(self, name: str, i: int) -> Node:
        ns = f"n{i}"
        self.topo.add_node(ns)
        self._attach(ns, [f"{node_ip4(i)}/24", f"{node_ip6(i)}/64"])
        self.topo.add_route(ns, "default", ROUTER4)
        self.topo.add_route(ns, "default", ROUTER6)
        if self.relay is not None:
            self.relay.listen(self.relay.target[1], netns=self.topo.namespaces[ns].path)
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        agent = AgentConfig(d, self.bpffs / name, node=name, addresses=(node_ip4(i), node_ip6(i)), devices=("eth0",),
                            extra={"service": {"clusterCIDR": ["10.96.0.0/16", "fd00:96::/112"]}})
        node = Node(name, i, ns, agent, mac=self.topo.mac(ns, "eth0"))
        self.nodes[name] = node
        return node

    def add_host(self, ns: str, i: int) -> str:
        """A plain host on the segment (no forwarding: a router would forward replies meant
        for a scan's made-up requesters and fill the kernel's neighbour table, which all
        namespaces share), at 10.0.0.<i> and fd00::<i>, reaching the VIP prefixes on-link and
        ignoring redirects (it resolves VIPs itself, as the router does)."""
        self.topo.add_namespace(ns)
        self.hosts[ns] = i
        self._attach(ns, [f"{node_ip4(i)}/24", f"{node_ip6(i)}/64"])
        self.topo.run(ns, "ip route add 10.0.100.0/24 dev eth0 && ip -6 route add fd00:100::/64 dev eth0")
        for fam in ("ipv4", "ipv6"):
            self.topo.sysctl(ns, {f"net.{fam}.conf.all.accept_redirects": "0", f"net.{fam}.conf.eth0.accept_redirects": "0"})
        return ns

    def close(self) -> None:
        try:
            for node in self.nodes.values():
                if node.config.exists() and node.ns in self.topo.namespaces:
                    # What an operator runs: the node's pinned links and programs go.
                    kpr_cli("cleanup", "--config", str(node.config), netns=self.topo[node.ns], timeout=30)
        finally:
            self._stack.close()
            if self.relay is not None:
                self.relay.close()

    # --- agents ------------------------------------------------------------------------

    def expiry(self, config: Path | None = None) -> float:
        """Seconds after which a silent (killed) node drops out, as configured."""
        cfg = json.loads((config or next(iter(self.nodes.values())).config).read_text())["plugins"]["announce_arp"]
        return float(cfg.get("leaseDuration", 3)) if self.membership == "kubernetes" else float(cfg["deadInterval"])

    def long_expiry(self, seconds: float) -> dict[str, Any]:
        """The announce keys that make a killed node count for `seconds`."""
        if self.membership == "kubernetes":
            return {"leaseDuration": int(seconds), "renewInterval": 0.5}
        return {"deadInterval": seconds}

    def write_config(self, node: Node, manifests: Path | None = None, **announce: Any) -> None:
        section: dict[str, Any] = {
            "enabled": True,
            "interfaces": ["eth0"],
            "garpRepeat": 3,
            "garpSpacing": 0.2,
        }
        source: dict[str, Any] = {}
        if self.membership == "kubernetes":
            assert self.apiserver is not None
            section["membership"] = "kubernetes"
            # Services still come from the files; the Leases from the API server.
            source = {"apiServer": self.apiserver.url, "tokenFile": self.apiserver.token_file, "caFile": self.apiserver.ca_file}
        else:
            section |= {"heartbeatPort": PORT, "heartbeatInterval": 0.1, "deadInterval": 0.5}
            if self.members:
                section["members"] = [f"{n.name}={node_ip4(n.index)}" for n in self.nodes.values()]
                section["keyFile"] = str(self.base / "arp.key")
        section.update(self.announce)
        section.update(announce)
        node.agent.source = {"path": str(manifests or self.manifests), "emptyGracePeriod": 0, **source}
        node.agent.plugins = {"announce_arp": section}
        node.agent.write()

    def start(self, name: str, env: dict[str, str] | None = None, **announce: Any) -> Node:
        """Start the node's agent (`env`: extra environment variables for it)."""
        node = self.nodes[name]
        if announce or not node.config.exists():
            self.write_config(node, **announce)
        node.log = open(node.dir / "agent.log", "ab")
        node.proc = self.topo.popen(node.ns, [sys.executable, "-m", "kpr.cli", "run", "--config", str(node.config)],
                                    stderr=node.log, env={**os.environ, **(env or {})})
        return node

    def send_signal(self, name: str, sig: int) -> None:
        """Signal the agent without waiting for it (its own process group)."""
        os.killpg(self.nodes[name].proc.pid, sig)

    def reap(self, name: str, timeout: float = 10) -> int:
        node = self.nodes[name]
        rc = node.proc.wait(timeout=timeout)
        node.proc = None
        node.log.close()
        return rc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.nodes[name].proc is None:
            return None
        self.send_signal(name, sig)
        return self.reap(name, timeout)

    def status(self, name: str) -> dict | None:
        try:
            return api.get(self.nodes[name].socket, "/v1/status", timeout=2)
        except api.ApiError:
            return None

    def plugin(self, name: str) -> dict | None:
        st = self.status(name)
        return st["plugins"].get("announce_arp") if st else None

    def wait_ready(self, names: list[str], timeout: float = 30) -> None:
        def ready(n: str) -> bool:
            p = self.plugin(n)
            if self.nodes[n].proc is not None and self.nodes[n].proc.poll() is not None:
                raise AssertionError(f"agent {n} exited: {self.log_tail(n)}")
            st = self.status(n)
            return bool(
                st
                and st["ready"]
                and p
                and p["healthy"]
                and all(i["open"] for i in p["details"]["interfaces"].values())
                and n in p["details"]["live"]
                and not p["details"]["waitingFor"]
            )

        wait_for(lambda: all(ready(n) for n in names), timeout, f"agents {names} ready", lambda: {n: self.plugin(n) for n in names})

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.nodes[name].dir / "agent.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def owners(self, vip: str) -> set[str]:
        """Nodes whose agent says it owns the address now."""
        out = set()
        for n in self.nodes:
            p = self.plugin(n)
            if p and vip in p["details"]["owned"]:
                out.add(n)
        return out

    # --- the router's view ------------------------------------------------------------

    def by_mac(self, mac: str | None) -> str | None:
        for n in self.nodes.values():
            if mac and n.mac == mac.lower():
                return n.name
        return None

    def neigh(self, vip: str) -> str | None:
        """The router's neighbour entry for the address (its MAC), or None."""
        fam = "-6" if ":" in vip else "-4"
        out = self.topo.run("r", ["ip", fam, "-j", "neigh", "show", vip, "dev", "eth0"]).stdout
        for e in json.loads(out or "[]"):
            if e.get("lladdr") and "FAILED" not in e.get("state", []) and "INCOMPLETE" not in e.get("state", []):
                return e["lladdr"].lower()
        return None

    def neigh_owner(self, vip: str) -> str | None:
        return self.by_mac(self.neigh(vip))

    def flush_neigh(self, vip: str) -> None:
        fam = "-6" if ":" in vip else "-4"
        self.topo.run("r", ["ip", fam, "neigh", "flush", "to", vip, "dev", "eth0"], check=False)

    def resolve(self, vip: str) -> None:
        """Make the router resolve the address (a ping nobody answers still needs ARP / NDP)."""
        fam = "-6" if ":" in vip else "-4"
        self.topo.run("r", ["ping", fam, "-c", "1", "-W", "0.5", vip], check=False)

    def solicit(self, vip: str, iface: str = "eth0", ns: str = "r", wait: float = 0.5) -> list[str]:
        """MACs in the neighbour advertisements answering one solicitation for `vip`, sent
        from `iface` of namespace `ns` (a packet socket: no neighbour entry is involved)."""
        import select

        import scapy.arch  # noqa: F401
        from scapy.config import conf
        from scapy.layers.inet6 import ICMPv6NDOptDstLLAddr
        from scapy.layers.l2 import Ether

        (frame,) = request_frames(self.topo.mac(ns, iface), vip, 1)
        with in_netns(self.topo.namespaces[ns].path):
            sock = conf.L2socket(iface=iface, promisc=False, filter="icmp6 and ip6[40] = 136")
        try:
            sock.send(frame)
            macs, end = [], time.monotonic() + wait
            while (left := end - time.monotonic()) > 0:
                if select.select([sock.ins], [], [], left)[0]:
                    _, raw, _ = sock.recv_raw()
                    if raw is not None and ICMPv6NDOptDstLLAddr in (p := Ether(raw)) and p.tgt == vip:
                        macs.append(p[ICMPv6NDOptDstLLAddr].lladdr.lower())
            return macs
        finally:
            sock.close()

    def arping(self, vip: str, count: int = 3, iface: str = "eth0") -> list[str]:
        """MACs of every ARP reply to `count` requests (all of them, duplicates included)."""
        res = self.topo.run(
            "r",
            ["arping", "-c", str(count), "-W", "0.2", "-w", str(count * 0.2 + 1), "-i", iface, vip],
            check=False,
            timeout=count + 10,
        )
        return re.findall(r"bytes from ([0-9a-f]{2}(?::[0-9a-f]{2}){5})", res.stdout.lower())


@contextlib.contextmanager
def segment(base: Path, **kw: Any) -> Iterator[Segment]:
    """A Segment (`kw`: its fields) on a fresh topology; afterwards every agent still running
    is killed (SIGKILL, as a test that failed midway leaves them), the nodes' pins cleaned up
    and the namespaces removed."""
    with Topology() as topo:
        s = Segment(topo, base, **kw)
        try:
            yield s
        finally:
            try:
                for name, node in s.nodes.items():
                    if node.proc is not None:
                        with contextlib.suppress(Exception):
                            s.stop(name, signal.SIGKILL)
            finally:
                s.close()


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def request_frames(src_mac: str, target: str, senders: int, first: int = 200, own: int | None = None) -> list[bytes]:
    """ARP requests (or neighbour solicitations, for an IPv6 target) for `target`, each from a
    different sender address (one: the sender's own, 10.0.0.<own> / fd00::<own>, or the
    router's), all from `src_mac`. One frame is built
    with scapy; the others patch its sender address (and the ICMPv6 checksum, RFC 1624)."""
    import ipaddress
    import socket
    import struct

    from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
    from scapy.layers.l2 import ARP, Ether

    if ":" in target:
        low = ipaddress.IPv6Address(target).packed[-3:]
        dst = str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))
        dst_mac = "33:33:ff:" + ":".join(f"{b:02x}" for b in low)
        addrs = [ROUTER6 if own is None else node_ip6(own)] if senders == 1 else [f"fd00::{first:x}:{i // 65536:x}:{i % 65536:x}" for i in range(senders)]
        base = bytearray(bytes(Ether(src=src_mac, dst=dst_mac) / IPv6(src=addrs[0], dst=dst, hlim=255)
                               / ICMPv6ND_NS(tgt=target) / ICMPv6NDOptSrcLLAddr(lladdr=src_mac)))
        off, csum_off, fam = 22, 56, socket.AF_INET6
    else:
        # 10.<first>.0.1 upwards, off the segment's /24 (62,500 per <first>)
        addrs = [ROUTER4 if own is None else node_ip4(own)] if senders == 1 else [f"10.{first + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}" for i in range(senders)]
        base = bytearray(bytes(Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=src_mac, psrc=addrs[0], pdst=target)))
        off, csum_off, fam = 28, 0, socket.AF_INET
    old = socket.inet_pton(fam, addrs[0])
    old_sum = sum(struct.unpack(f"!{len(old) // 2}H", old))
    frames = []
    for a in addrs:
        raw = socket.inet_pton(fam, a)
        f = bytearray(base)
        f[off:off + len(raw)] = raw
        if csum_off:
            (c,) = struct.unpack_from("!H", base, csum_off)
            new_sum = sum(struct.unpack(f"!{len(raw) // 2}H", raw))
            words = len(raw) // 2  # ~m summed over the changed words is words * 0xffff - sum(m)
            c = ~_fold((~c & 0xFFFF) + words * 0xFFFF - old_sum + new_sum) & 0xFFFF
            struct.pack_into("!H", f, csum_off, c)
        frames.append(bytes(f))
    return frames


def flood(seg: Segment, target: str, seconds: float, senders: int, rate: int, *, ns: str,
          count_replies: bool = True) -> tuple[float, int]:
    """Offer `rate` requests/s for `target` from `senders` distinct requesters, sent from the
    `ns` namespace's eth0 for `seconds`; returns (replies per second received there, requests
    sent). Replies are counted from a packet socket (ARP replies from the target, or
    neighbour advertisements for it)."""
    import select
    import socket
    import threading

    import scapy.arch  # noqa: F401
    from scapy.config import conf

    frames = request_frames(seg.topo.mac(ns, "eth0"), target, senders, own=seg.hosts.get(ns))
    if ":" in target:
        import ipaddress

        words = ipaddress.IPv6Address(target).packed
        tgt = " and ".join(f"ip6[{48 + 4 * i}:4] = 0x{words[4 * i:4 * i + 4].hex()}" for i in range(4))
        expr = f"icmp6 and ip6[40] = 136 and {tgt}"
    else:
        expr = f"arp and arp[6:2] = 2 and arp src host {target}"
    with in_netns(seg.topo.namespaces[ns].path):
        rx = conf.L2socket(iface="eth0", promisc=False, filter=expr) if count_replies else None
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind(("eth0", 0))
    count = 0
    stop = threading.Event()

    def receive() -> None:
        nonlocal count
        while not stop.is_set():
            if select.select([rx.ins], [], [], 0.1)[0]:
                _, frame, _ = rx.recv_raw()
                if frame is not None:
                    count += 1

    t = threading.Thread(target=receive, daemon=True) if rx is not None else None
    if t is not None:
        t.start()
    sent = 0
    t0 = time.monotonic()
    try:
        # Paced to a fixed offered rate, in small bursts.
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                try:
                    tx.send(frames[sent % senders])
                except BlockingIOError:
                    pass  # the device queue is full: offered, not sent
                sent += 1
            time.sleep(0.0005)
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        stop.set()
        if t is not None:
            t.join()
            rx.close()
        tx.close()
    return count / elapsed, sent
