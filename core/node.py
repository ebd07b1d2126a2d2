"""Node facts: which devices face the outside and which addresses NodePort listens on."""

from __future__ import annotations

import ipaddress
import logging
import socket

from .config import NodeSection
from .model import NodeInfo

log = logging.getLogger(__name__)


def default_route_devices(ipr) -> list[str]:
    """Devices that hold a default route, IPv4 then IPv6, in route order."""
    names: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_default_routes(family=family):
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                for hop in route.get_attr("RTA_MULTIPATH") or []:
                    oif = hop.get("oif")
                    if oif:
                        break
            if oif is None:
                continue
            links = ipr.get_links(oif)
            if links:
                name = links[0].get_attr("IFLA_IFNAME")
                if name not in names:
                    names.append(name)
    return names


def device_addresses(ipr, devices: list[str]) -> list[str]:
    """Global unicast addresses of the devices (no link-local, no loopback)."""
    out: list[str] = []
    for dev in devices:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            continue
        for addr in ipr.get_addr(index=idx[0]):
            text = addr.get_attr("IFA_ADDRESS")
            ip = ipaddress.ip_address(text)
            if ip.is_link_local or ip.is_loopback:
                continue
            if text not in out:
                out.append(str(ip))
    return out


def detect(section: NodeSection) -> NodeInfo:
    """Configured facts win; what is left empty is read from the kernel (read-only)."""
    devices = list(section.devices)
    addresses = list(section.addresses)
    if not devices or not addresses:
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                if not devices:
                    devices = default_route_devices(ipr)
                if not addresses:
                    addresses = device_addresses(ipr, devices)
        except Exception as e:  # detection is best effort; an empty list is a valid answer
            log.warning("node.detect_failed error=%r", e)
    return NodeInfo(name=section.name, addresses=tuple(addresses), devices=tuple(devices))


def missing_devices(devices: tuple[str, ...]) -> list[str]:
    """Configured devices this host does not have."""
    # By name, as pyroute2's link_lookup, without importing pyroute2 (0.1 s of CPU at start).
    missing = []
    for d in devices:
        try:
            socket.if_nametoindex(d)
        except (OSError, ValueError):  # no such device; a name no device can have
            missing.append(d)
    return missing
