"""Which node announces an address: the same answer on every node, from the same inputs.

Rendezvous (highest-random-weight) hashing, as MetalLB's layer-2 mode ranks speakers: every
eligible node gets the score sha256(node + "#" + address) and the lowest score owns the
address. Each address is ranked independently, so when a node leaves only the addresses it
owned move, and when it joins it takes only the addresses it ranks first for: the minimum
movement possible. Nothing here has state or does I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping


def normalise(address: str) -> str:
    """The text form every node hashes, so "fd00::0a" and "fd00::a" rank alike."""
    return str(ipaddress.ip_address(address))


def score(node: str, address: str) -> bytes:
    return hashlib.sha256(f"{node}#{normalise(address)}".encode()).digest()


def rank(address: str, nodes: Iterable[str]) -> list[str]:
    """Nodes in order of preference for the address; the name breaks (improbable) hash ties."""
    return sorted(set(nodes), key=lambda n: (score(n, address), n))


def owner(address: str, eligible: Iterable[str]) -> str | None:
    ranked = rank(address, eligible)
    return ranked[0] if ranked else None


def assign(eligible: Mapping[str, Iterable[str]]) -> dict[str, str | None]:
    """address -> owning node (None when no node is eligible), for every address given.

    ``eligible`` maps each address to the live nodes that may announce it (for
    externalTrafficPolicy=Local, only those with a ready local endpoint).
    """
    return {addr: owner(addr, nodes) for addr, nodes in eligible.items()}


def owned_by(node: str, eligible: Mapping[str, Iterable[str]]) -> set[str]:
    return {addr for addr, who in assign(eligible).items() if who == node}
