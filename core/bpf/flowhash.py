"""kpr_tuple_hash() of lib/common.h in Python: the flow hash Maglev indexes its table with.

`kpr explain` names the backend a Maglev service gives a flow by computing exactly what the
program computes, so this must stay bit-for-bit the C code: 32-bit words read in host order
from the stored (network-order) bytes, ports as the __be16 the tuple holds, the lookup3 mix
and final rounds with KPR_HASH_SEED. tests/kernel/test_explain.py runs the C function under
BPF_PROG_TEST_RUN on random tuples and checks both agree.
"""

from __future__ import annotations

import struct

from . import maps as M

HASH_SEED = 0x6B707231  # KPR_HASH_SEED (lib/common.h)
_MASK = 0xFFFFFFFF
# Words of union kpr_addr as the program reads them: host order (__be32 loaded as is; BPF
# runs in the host's byte order, so "=" here is the program's view on any host).
_WORDS = struct.Struct("=4I")
_BE16 = struct.Struct("=H")


def _rol(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK; a ^= _rol(c, 4); c = (c + b) & _MASK  # noqa: E702 - one lookup3 line each
    b = (b - a) & _MASK; b ^= _rol(a, 6); a = (a + c) & _MASK  # noqa: E702
    c = (c - b) & _MASK; c ^= _rol(b, 8); b = (b + a) & _MASK  # noqa: E702
    a = (a - c) & _MASK; a ^= _rol(c, 16); c = (c + b) & _MASK  # noqa: E702
    b = (b - a) & _MASK; b ^= _rol(a, 19); a = (a + c) & _MASK  # noqa: E702
    c = (c - b) & _MASK; c ^= _rol(b, 4); b = (b + a) & _MASK  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol(b, 14)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _MASK  # noqa: E702
    return c


def tuple_hash_raw(saddr: bytes, daddr: bytes, sport_be: int, dport_be: int, proto: int, seed: int = HASH_SEED) -> int:
    """The hash of a tuple as the maps store it: 16-byte addresses, ports as the u16 value of
    their network-order bytes (socket.htons(port) on this host)."""
    s = _WORDS.unpack(saddr)
    d = _WORDS.unpack(daddr)
    a = b = c = (0xDEADBEEF + 36 + seed) & _MASK
    a = (a + s[0]) & _MASK; b = (b + s[1]) & _MASK; c = (c + s[2]) & _MASK  # noqa: E702
    a, b, c = _mix(a, b, c)
    a = (a + s[3]) & _MASK; b = (b + d[0]) & _MASK; c = (c + d[1]) & _MASK  # noqa: E702
    a, b, c = _mix(a, b, c)
    a = (a + d[2]) & _MASK; b = (b + d[3]) & _MASK  # noqa: E702
    c = (c + (((sport_be << 16) ^ dport_be ^ (proto << 8)) & _MASK)) & _MASK
    return _final(a, b, c)


def tuple_hash(saddr: str, sport: int, daddr: str, dport: int, proto: int) -> int:
    """kpr_tuple_hash() of a flow given as text addresses and host-order ports."""
    return tuple_hash_raw(M.addr_to_bytes(saddr), M.addr_to_bytes(daddr), M.htons(sport), M.htons(dport), proto)


def maglev_index(saddr: str, sport: int, daddr: str, dport: int, proto: int, table_size: int) -> int:
    """The Maglev table slot lb.h reads for this flow (kpr_lb_maglev_backend)."""
    return tuple_hash(saddr, sport, daddr, dport, proto) % table_size

