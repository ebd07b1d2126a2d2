"""A pool's addresses of one family as a line of slots 0..size-1, and the home slot of a key.

Slots follow the configured order of CIDRs and ranges, so addresses appended at the end of a
pool only add slots; the home slot comes from jump consistent hashing (Lamping and Veach), so
growing a pool moves only the keys whose home lands in the new slots (about new/total of
them), not every key as `hash mod size` would.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress

# (family, first, last) as integers, last inclusive.
Span = tuple[int, int, int]


def parse_addresses(entries: list[str]) -> list[Span]:
    """CIDRs and a-b ranges as spans; raises ValueError naming the bad entry."""
    out: list[Span] = []
    for i, text in enumerate(entries):
        where = f"addresses[{i}] {text!r}"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: empty")
        text = text.strip()
        if "-" in text:
            left, _, right = text.partition("-")
            try:
                a, b = ipaddress.ip_address(left.strip()), ipaddress.ip_address(right.strip())
            except ValueError:
                raise ValueError(f"{where}: a range must be two addresses, first-last") from None
            if a.version != b.version:
                raise ValueError(f"{where}: a range cannot mix IPv4 and IPv6")
            if int(b) < int(a):
                raise ValueError(f"{where}: the range ends before it starts")
            out.append((a.version, int(a), int(b)))
            continue
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ValueError(f"{where}: not a CIDR or range ({e})") from None
        out.append((net.version, int(net.network_address), int(net.broadcast_address)))
    return out


def _buggy_up_to(n: int) -> int:
    """IPv4 addresses in [0, n) ending in .0 or .255."""
    full, rest = divmod(n, 256)
    return 2 * full + (1 if rest > 0 else 0) + (1 if rest > 255 else 0)


def seed(*parts: str) -> int:
    # Not hash(): salted per process, so two nodes (or two runs) would disagree.
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash of a 64-bit key into [0, buckets)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


class AddressSpace:
    """The slots of one family of one pool."""

    def __init__(self, family: int, spans: list[tuple[int, int]], avoid_buggy: bool = False):
        self.family = family
        self.spans = list(spans)
        self.avoid_buggy = avoid_buggy and family == 4
        self.starts: list[int] = []
        size = 0
        for a, b in self.spans:
            self.starts.append(size)
            size += b - a + 1
        self.size = size
        self.buggy_count = (
            sum(_buggy_up_to(b + 1) - _buggy_up_to(a) for a, b in self.spans) if self.avoid_buggy else 0
        )

    def address(self, slot: int) -> int:
        i = bisect.bisect_right(self.starts, slot) - 1
        return self.spans[i][0] + slot - self.starts[i]

    def slot(self, address: int) -> int | None:
        for (a, b), start in zip(self.spans, self.starts):
            if a <= address <= b:
                return start + address - a
        return None

    def buggy(self, slot: int) -> bool:
        return self.avoid_buggy and self.address(slot) % 256 in (0, 255)

    def home(self, key: str) -> int:
        h = seed(key)
        # Jump hashing's float step is exact below 2**31 buckets; an IPv6 pool larger than
        # that is never close to full, where a plain modulus serves as well.
        return jump_hash(h, self.size) if self.size < 1 << 31 else h % self.size
