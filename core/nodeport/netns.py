"""The network namespace the agent runs in, and the facts of its devices.

Attaching programs, listening sockets and reading device addresses act on the calling
thread's namespace; bus workers and test threads may be elsewhere, so the NodePort facility
and plugins capture the namespace they start in and run such calls there.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# name -> (ifindex, first global IPv4, first global IPv6)
DeviceFacts = dict[str, tuple[int, str | None, str | None]]


class AgentNetns:
    """Runs callables in the network namespace it was made in, whichever thread calls."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.ino = os.fstat(self.fd).st_ino

    def here(self) -> bool:
        return os.stat("/proc/thread-self/ns/net").st_ino == self.ino

    def __call__(self, fn: Callable[[], T]) -> T:
        from kpr.bpf.links import run_in_netns

        if self.here():
            return fn()
        return run_in_netns(self.fd, fn)

    def path(self) -> str:
        """A path naming the namespace for `kpr cleanup` ("" for the host's own)."""
        try:
            if os.stat("/proc/1/ns/net").st_ino == self.ino:
                return ""
        except OSError:
            pass
        netns_dir = Path("/run/netns")
        if netns_dir.is_dir():
            for p in sorted(netns_dir.iterdir()):
                try:
                    if os.stat(p).st_ino == self.ino:
                        return str(p)
                except OSError:
                    continue
        return ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def device_facts(devices: tuple[str, ...]) -> tuple[DeviceFacts, list[str], list[str]]:
    """(name -> (ifindex, first global IPv4, first global IPv6), missing names, every global
    address of those devices), in the calling thread's namespace."""
    from pyroute2 import IPRoute

    facts: DeviceFacts = {}
    missing: list[str] = []
    every: list[str] = []
    with IPRoute() as ipr:
        for dev in devices:
            found = ipr.link_lookup(ifname=dev)
            if not found:
                missing.append(dev)
                continue
            v4 = v6 = None
            for msg in ipr.get_addr(index=found[0]):
                ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                if ip.is_link_local or ip.is_loopback:
                    continue
                every.append(str(ip))
                if ip.version == 4 and v4 is None:
                    v4 = str(ip)
                elif ip.version == 6 and v6 is None:
                    v6 = str(ip)
            facts[dev] = (int(found[0]), v4, v6)
    return facts, missing, every
