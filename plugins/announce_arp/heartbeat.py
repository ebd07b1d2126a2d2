"""Heartbeat messages and the peer table: pure logic, no sockets, clocks passed in.

A heartbeat says "node N, incarnation I, message S, sent at T, is alive and may announce
these addresses" (or "is alive but has not finished its initial sync": no address list). It is authenticated with HMAC-SHA256 under the cluster's shared key and
refused when:

- the MAC is missing or wrong (unsigned, forged, or tampered with),
- it was signed by a cluster with a different member list (a misconfiguration),
- the sender is not a member, is this node's own name, or sends from another address,
- its timestamp is further than maxClockSkew from our clock (a replay after a restart),
- its (incarnation, sequence) is not newer than the last accepted one (a replay).

The incarnation is the sender's start time in nanoseconds, so a restarted node is newer than
its earlier self without any state on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from .config import Member

MAGIC = b"KPRHB1"
MAC_LEN = 32
# A UDP datagram's payload limit; a heartbeat above it cannot be sent.
MAX_DATAGRAM = 65507


class Rejected(Exception):
    """A heartbeat that must be ignored; ``reason`` is a short counter-friendly word."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Heartbeat:
    node: str
    incarnation: int
    seq: int
    timestamp: float
    # None: the sender has not finished its initial sync and cannot tell yet.
    eligible: frozenset[str] | None = frozenset()
    leaving: bool = False


def cluster_id(members: list[Member], port: int) -> str:
    """A digest of what every member must agree on; heartbeats carry it."""
    text = ",".join(sorted(str(m) for m in members)) + f"|{port}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Codec:
    def __init__(self, key: bytes, cluster: str):
        if len(key) < 16:
            raise ValueError("heartbeat key must be at least 16 bytes")
        self._key = key
        self.cluster = cluster

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, MAGIC + body, hashlib.sha256).digest()

    def encode(self, hb: Heartbeat) -> bytes:
        body = json.dumps(
            {
                "c": self.cluster,
                "n": hb.node,
                "i": hb.incarnation,
                "s": hb.seq,
                "t": hb.timestamp,
                "e": None if hb.eligible is None else sorted(hb.eligible),
                "l": hb.leaving,
            },
            separators=(",", ":"),
        ).encode()
        return MAGIC + self._mac(body) + body

    def decode(self, data: bytes) -> Heartbeat:
        if len(data) < len(MAGIC) + MAC_LEN or not data.startswith(MAGIC):
            raise Rejected("malformed", "not a kpr heartbeat")
        mac = data[len(MAGIC) : len(MAGIC) + MAC_LEN]
        body = data[len(MAGIC) + MAC_LEN :]
        # The MAC is checked before the body is parsed: nothing unauthenticated is trusted.
        if not hmac.compare_digest(mac, self._mac(body)):
            raise Rejected("bad_mac", "unsigned, forged or altered")
        try:
            d = json.loads(body)
            hb = Heartbeat(
                node=str(d["n"]),
                incarnation=int(d["i"]),
                seq=int(d["s"]),
                timestamp=float(d["t"]),
                eligible=None if d["e"] is None else frozenset(str(a) for a in d["e"]),
                leaving=bool(d["l"]),
            )
            cluster = str(d["c"])
        except (ValueError, KeyError, TypeError) as e:
            raise Rejected("malformed", f"bad body: {e}") from None
        if cluster != self.cluster:
            raise Rejected("config_mismatch", f"{hb.node} has another members list or heartbeatPort")
        return hb


@dataclass
class PeerState:
    address: str
    incarnation: int = -1
    seq: int = -1
    last_heard: float = float("-inf")  # monotonic
    eligible: frozenset[str] | None = None
    leaving: bool = False


@dataclass
class PeerTable:
    """What this node knows of the other members; every method takes the time."""

    self_name: str
    members: list[Member]
    dead_interval: float
    max_skew: float
    peers: dict[str, PeerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._addr = {m.name: m.address for m in self.members}
        self.peers = {m.name: PeerState(m.address) for m in self.members if m.name != self.self_name}

    def accept(self, hb: Heartbeat, source: str, mono: float, wall: float) -> bool:
        """Record an authenticated heartbeat; True when liveness or eligibility changed.

        Raises Rejected for heartbeats that must not count.
        """
        if hb.node == self.self_name:
            raise Rejected("own_name", f"a heartbeat in this node's name came from {source}")
        peer = self.peers.get(hb.node)
        if peer is None:
            raise Rejected("unknown_node", f"{hb.node!r} is not a member")
        if source != peer.address:
            raise Rejected("wrong_source", f"{hb.node} belongs to {peer.address}, came from {source}")
        if abs(wall - hb.timestamp) > self.max_skew:
            raise Rejected("stale", f"{hb.node} timestamp is {wall - hb.timestamp:+.1f}s off")
        self._forget_silent(peer, mono)
        if (hb.incarnation, hb.seq) <= (peer.incarnation, peer.seq):
            raise Rejected("replay", f"{hb.node} {hb.incarnation}/{hb.seq} not newer than {peer.incarnation}/{peer.seq}")
        was_live = self.is_live(hb.node, mono)
        before = peer.eligible
        peer.incarnation, peer.seq = hb.incarnation, hb.seq
        peer.last_heard = mono
        peer.eligible = hb.eligible
        peer.leaving = hb.leaving
        return was_live != self.is_live(hb.node, mono) or before != hb.eligible

    def _forget_silent(self, peer: PeerState, mono: float) -> None:
        # A node silent for longer than any timestamp we accept can only come back with a
        # fresh message, so its old counters may go: this lets a node whose clock was
        # stepped back across a reboot (a smaller incarnation) rejoin.
        if mono - peer.last_heard > self.max_skew:
            peer.incarnation, peer.seq = -1, -1

    def is_live(self, node: str, mono: float) -> bool:
        peer = self.peers.get(node)
        return peer is not None and not peer.leaving and mono - peer.last_heard <= self.dead_interval

    def live(self, mono: float) -> frozenset[str]:
        return frozenset(n for n in self.peers if self.is_live(n, mono))

    def next_expiry(self, mono: float) -> float | None:
        """When the next live peer turns dead if it stays silent (monotonic), or None."""
        times = [p.last_heard + self.dead_interval for n, p in self.peers.items() if self.is_live(n, mono)]
        return min(times) if times else None

    def heard_all_since(self, since: float) -> bool:
        return all(p.last_heard >= since for p in self.peers.values())
