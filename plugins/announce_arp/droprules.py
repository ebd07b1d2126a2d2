"""The explicit drop for announced addresses when no datapath plugin takes their traffic.

A node that answers ARP for a VIP receives the VIP's traffic. With nothing to DNAT it, a
forwarding node routes it on, often straight back onto the segment it came from, where the
router sends it to the same node again: a loop until the TTL runs out. This keeps one
nftables table, ``inet kpr_announce_arp``, whose forward-hook chain drops traffic that
arrived on an announcing interface for an announced address. Traffic from pods or other
interfaces is left alone, and no other table is ever read or written.

Every address the cluster announces is in the set, not only those this node owns: a node
that just lost an address still receives its traffic until the router's neighbour entry
moves, and must not route it back either. With a datapath plugin that DNATs served ports at
ingress, only unserved ports would ever reach this chain.

Changes are applied with ``nft -f -``, one atomic transaction each, in the namespace the
agent runs in.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

TABLE = "kpr_announce_arp"
FAMILY = "inet"


class NftError(RuntimeError):
    pass


def _nft_binary() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"


def _quote_ifname(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _elements(addrs: Iterable[str]) -> str:
    return ", ".join(sorted(addrs))


class DropRules:
    def __init__(self, interfaces: Sequence[str], *, argv_prefix: Sequence[str] = ()):
        self.interfaces = list(interfaces)
        # e.g. ["ip", "netns", "exec", NS] in tests; empty runs nft where the agent runs.
        self.argv_prefix = list(argv_prefix)
        self.addresses: frozenset[str] = frozenset()
        self.installed = False

    def _nft(self, *args: str, script: str | None = None) -> str:
        argv = [*self.argv_prefix, _nft_binary(), *args]
        try:
            res = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftError(f"cannot run {' '.join(argv)}: {e}") from None
        if res.returncode != 0:
            raise NftError(f"nft failed ({res.returncode}): {res.stderr.strip()[-500:]}")
        return res.stdout

    def install(self) -> None:
        """Create the table afresh (a table left by an earlier run is replaced)."""
        ifaces = ", ".join(_quote_ifname(i) for i in self.interfaces)
        script = f"""
table {FAMILY} {TABLE}
delete table {FAMILY} {TABLE}
table {FAMILY} {TABLE} {{
    comment "kpr announce_arp: no forwarding of announced addresses back onto the segment"
    set interfaces {{ type ifname; elements = {{ {ifaces} }}; }}
    set vips4 {{ type ipv4_addr; }}
    set vips6 {{ type ipv6_addr; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname @interfaces ip daddr @vips4 counter drop
        iifname @interfaces ip6 daddr @vips6 counter drop
    }}
}}
"""
        self._nft("-f", "-", script=script)
        self.installed = True
        self.addresses = frozenset()
        log.info("event=droprules_installed table=%s/%s interfaces=%s", FAMILY, TABLE, ",".join(self.interfaces))

    def update(self, addresses: Iterable[str]) -> None:
        """Make the sets hold exactly these addresses, in one transaction."""
        new = frozenset(str(ipaddress.ip_address(a)) for a in addresses)
        if self.installed and new == self.addresses:
            return
        if not self.installed:
            self.install()
        v4 = [a for a in new if ":" not in a]
        v6 = [a for a in new if ":" in a]
        lines = [f"flush set {FAMILY} {TABLE} vips4", f"flush set {FAMILY} {TABLE} vips6"]
        if v4:
            lines.append(f"add element {FAMILY} {TABLE} vips4 {{ {_elements(v4)} }}")
        if v6:
            lines.append(f"add element {FAMILY} {TABLE} vips6 {{ {_elements(v6)} }}")
        try:
            self._nft("-f", "-", script="\n".join(lines) + "\n")
        except NftError:
            # The table may have been removed under us; the next attempt recreates it.
            self.installed = False
            raise
        self.addresses = new
        log.info("event=droprules_updated addresses=%d", len(new))

    def remove(self) -> None:
        # "table X" first makes the delete a no-op when the table is already gone.
        self._nft("-f", "-", script=f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
        self.installed = False
        self.addresses = frozenset()
        log.info("event=droprules_removed table=%s/%s", FAMILY, TABLE)

    def dropped(self) -> int:
        """Packets dropped so far (both rules' counters)."""
        out = json.loads(self._nft("-j", "list", "table", FAMILY, TABLE))
        total = 0
        for item in out.get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"].get("packets", 0))
        return total
