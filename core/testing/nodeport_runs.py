"""One BPF_PROG_TEST_RUN of a NodePort build loaded in a kpr.testing.nodeport_bench.ProgLab,
with what it returned and the counters it moved: the shape of a table-driven NodePort test; and
an address's announced-address filter bit set for a while (filter_bit_set)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

from kpr.testing.netns import in_netns
from kpr.testing.prog_run import test_run


def run_counted(lab: Any, hook: str, build: str, pkt: bytes, *, gso_size: int = 0) -> tuple[int, bytes, dict[str, int]]:
    """Run `pkt` through build `build`'s entry program in the lab's node namespace: its verdict,
    the packet as it left, and each counter that moved by how much. An XDP context is sized to
    the packet (the lab's own is for its 64-byte frames). gso_size (tc only): the skb is a GSO
    packet of segments that size (struct __sk_buff's gso_size, which the test run copies in)."""
    dp = lab.builds[build]
    if hook == "xdp":
        if gso_size:
            raise ValueError(f"gso_size={gso_size}: XDP frames are never GSO packets")
        ctx = struct.pack("=6I", 0, len(pkt), 0, lab.ifindex, 0, 0)
    elif gso_size:
        ctx = skb_ctx(lab.ifindex, gso_size=gso_size)
    else:
        ctx = lab.ctx(hook)
    before = dp.stats()
    with in_netns(lab.topo["lb"].path):
        res = test_run(lab.entry(hook, build), pkt, ctx=ctx)
    after = dp.stats()
    return res.retval, res.data_out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


# struct __sk_buff up to gso_size (uapi/linux/bpf.h): the test run takes no larger context
# than it needs and refuses non-zero fields it does not copy in.
_SKB_IFINDEX_OFF, _SKB_GSO_SIZE_OFF = 40, 176


def skb_ctx(ifindex: int, *, gso_size: int = 0) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN: ingress_ifindex and ifindex, and gso_size."""
    ctx = bytearray(_SKB_GSO_SIZE_OFF + 4)
    struct.pack_into("=2I", ctx, _SKB_IFINDEX_OFF - 4, ifindex, ifindex)
    struct.pack_into("=I", ctx, _SKB_GSO_SIZE_OFF, gso_size)
    return bytes(ctx)


def filter_bit(address: str) -> tuple[int, int]:
    """Where `address`'s announced-address filter bit lives in kpr_np_ports: (word index, bit)."""
    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    h = ND.vip_hash(M.addr_to_bytes(address))
    return ND.VIP_BITS + (h >> 6), h & 63


@contextlib.contextmanager
def filter_bit_set(lab: Any, address: str) -> Iterator[None]:
    """`address`'s announced-address filter bit set in the lab's pinned kpr_np_ports, as another
    announced address of the same hash sets it (the fast exit must then look the address up
    exactly), and its word put back after. The bit must be clear before: a test meaning to show
    the exact lookup on an address whose bit was set anyway would show nothing."""
    from kpr.bpf import maps as M
    from kpr.nodeport import datapath as ND

    word, bit = filter_bit(address)
    key = M.U32.pack(word)
    with M.BpfMap.open_pinned(lab.pin / ND.PORTS_MAP) as ports:
        old = ports.lookup(key)
        value = struct.unpack("=Q", old)[0]
        if value >> bit & 1:
            raise AssertionError(f"{address}'s filter bit is set already: pick another address")
        ports.update(key, struct.pack("=Q", value | 1 << bit))
        try:
            yield
        finally:
            ports.update(key, old)
