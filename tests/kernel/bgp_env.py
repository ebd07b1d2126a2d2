"""Real BGP speakers for the announce_bgp tests: bird2 and gobgpd inside a test's namespaces.

Each peer runs in a namespace of a kpr.testing.netns.Topology (started with its popen, so
teardown stops it); its control socket and config live in the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kpr.model import Backend, BackendState, Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
from kpr.plugins.announce_bgp.exabgp import Backoff
from kpr.plugins.announce_bgp.plugin import AnnounceBGP
from kpr.testing.harness import plugin_context, start_plugin
from kpr.testing.netns import Namespace
from kpr.testing.waiting import free_port, wait_for

__all__ = ["free_port"]  # the kit's, imported from here by the tests

# Conditions here ask bird or gobgp (a process each time): poll less often than the kit's default.
wait_until = partial(wait_for, interval=0.05)

LOCAL_ASN = 64512
ROUTER_ASN = 64500


# --- bird2 -----------------------------------------------------------------------------------

_PREFIX_LINE = re.compile(r"^(\S+/\d+)\s+(?:unicast|unreachable)\s+\[(\S+)")
_ALT_LINE = re.compile(r"^\s+(?:unicast|unreachable)\s+\[(\S+)")
_VIA = re.compile(r"^\s+via (\S+) on (\S+)")
_ATTR = re.compile(r"^\s+BGP\.(\S+): (.*)$")


def parse_bird_routes(text: str) -> dict[str, list[dict[str, Any]]]:
    """`birdc show route all` -> {prefix: [{"protocol", "via", "dev", "attrs": {...}, "stale"}]}"""
    routes: dict[str, list[dict[str, Any]]] = {}
    prefix = None
    entry: dict[str, Any] | None = None
    for line in text.splitlines():
        m = _PREFIX_LINE.match(line)
        if m:
            prefix = m.group(1)
            entry = {"protocol": m.group(2), "attrs": {}, "stale": "stale" in line.lower(), "line": line}
            routes.setdefault(prefix, []).append(entry)
            continue
        m = _ALT_LINE.match(line)
        if m and prefix:
            entry = {"protocol": m.group(1), "attrs": {}, "stale": "stale" in line.lower(), "line": line}
            routes[prefix].append(entry)
            continue
        if entry is None:
            continue
        m = _VIA.match(line)
        if m:
            entry["via"], entry["dev"] = m.group(1), m.group(2)
            continue
        m = _ATTR.match(line)
        if m:
            entry["attrs"][m.group(1)] = m.group(2).strip()
    return routes


@dataclass
class BirdNeighbor:
    name: str
    local: str  # bird's address on the link
    address: str  # kpr's (ExaBGP's) address
    asn: int = LOCAL_ASN
    password: str | None = None
    multihop: bool = False
    port: int = 179  # the port bird listens on for this session


@dataclass
class Bird:
    ns: Namespace
    workdir: Path
    router_id: str
    neighbors: list[BirdNeighbor]
    asn: int = ROUTER_ASN
    hold: int = 6
    proc: subprocess.Popen | None = None
    conf: Path = field(init=False)
    sock: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "bird.conf"
        self.sock = self.workdir / "bird.ctl"

    def config_text(self) -> str:
        lines = [f"router id {self.router_id};", "protocol device {}"]
        for n in self.neighbors:
            lines += [
                f"protocol bgp {n.name} {{",
                f"  local {n.local}{f' port {n.port}' if n.port != 179 else ''} as {self.asn};",
                f"  neighbor {n.address} as {n.asn};",
                f"  hold time {self.hold};",
                # ExaBGP does not listen: bird waits for it, and retries fast after errors.
                "  passive on;",
                "  error wait time 1, 2;",
                "  graceful restart aware;",
            ]
            if n.password:
                lines.append(f'  password "{n.password}";')
            if n.multihop:
                lines.append("  multihop;")
            lines += ["  ipv4 { import all; export none; };", "  ipv6 { import all; export none; };", "}"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.conf.write_text(self.config_text())
        subprocess.run(["bird", "-p", "-c", str(self.conf)], check=True, capture_output=True, text=True)
        self.sock.unlink(missing_ok=True)
        log = open(self.workdir / "bird.log", "ab")
        self.proc = self.ns.popen(["bird", "-f", "-c", str(self.conf), "-s", str(self.sock)], stdout=log, stderr=log)
        wait_until(lambda: self.sock.exists() and self.birdc("show status").returncode == 0, 10, "bird control socket")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        self.proc = None

    def birdc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["birdc", "-s", str(self.sock), *args], capture_output=True, text=True, timeout=10)

    def show(self, *args: str) -> str:
        return self.birdc("show", *args).stdout

    def routes(self) -> dict[str, list[dict[str, Any]]]:
        return parse_bird_routes(self.show("route", "all"))

    def established(self, name: str) -> bool:
        return "Established" in self.show("protocols", name)


# --- gobgpd ----------------------------------------------------------------------------------


@dataclass
class GoBGP:
    ns: Namespace
    workdir: Path
    router_id: str
    neighbors: list[tuple[str, int]]  # (address, asn)
    asn: int = ROUTER_ASN
    api_port: int = 50051
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "gobgpd.toml"
        lines = ["[global.config]", f"  as = {self.asn}", f'  router-id = "{self.router_id}"', ""]
        for address, asn in self.neighbors:
            lines += [
                "[[neighbors]]",
                "  [neighbors.config]",
                f'    neighbor-address = "{address}"',
                f"    peer-as = {asn}",
                "  [neighbors.timers.config]",
                "    hold-time = 6",
                "    keepalive-interval = 2",
                "    connect-retry = 1",
                "  [neighbors.transport.config]",
                "    passive-mode = true",
                "",
            ]
        conf.write_text("\n".join(lines))
        log = open(self.workdir / "gobgpd.log", "ab")
        # The API listens on the namespace's own loopback: no clash with the host or other tests.
        self.proc = self.ns.popen(["gobgpd", "-f", str(conf), "--api-hosts", f"127.0.0.1:{self.api_port}", "-p"], stdout=log, stderr=log)
        wait_until(lambda: self.gobgp("global").returncode == 0, 15, "gobgpd API")

    def gobgp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run(["gobgp", "-p", str(self.api_port), *args], check=False, timeout=10)

    def rib(self, family: str = "ipv4") -> dict[str, list[dict[str, Any]]]:
        res = self.gobgp("global", "rib", "-a", family, "-j")
        if res.returncode != 0 or not res.stdout.strip():
            return {}
        return json.loads(res.stdout)


# --- driving the plugin directly -------------------------------------------------------------


def make_plugin(
    section: dict[str, Any],
    node: NodeInfo,
    state_dir: Path,
    *,
    name: str = "announce_bgp",
    backoff: Backoff | None = None,
) -> AnnounceBGP:
    plugin = AnnounceBGP()
    if backoff is not None:
        plugin.backoff = backoff
    return start_plugin(plugin, section, plugin_context(name, node, state_dir=state_dir))


def lb_service(
    name: str,
    address: str,
    *,
    namespace: str = "default",
    local: bool = False,
    backends: tuple[tuple[str, bool, BackendState], ...] = (("10.244.0.5", True, BackendState.ACTIVE),),
    type: FrontendType = FrontendType.LOAD_BALANCER,
    labels: dict[str, str] | None = None,
) -> Service:
    bes = tuple(Backend(a, 8080, state, node_name="node1" if is_local else "node2", local=is_local) for a, is_local, state in backends)
    fe = Frontend(type, address, 80, Protocol.TCP, bes, external_local=local)
    return Service(ServiceKey(namespace, name), (fe,), labels=tuple(sorted((labels or {}).items())))
