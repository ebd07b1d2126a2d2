"""kpr_np_ports', kpr_np_unserved's and kpr_np_nomode's port words, and kpr_np_ports' announced-
address words, as Python indexes them: the header's numbers (lib/nodeport.h
KPR_NP_PORT_WORDS_UDP, KPR_NP_VIP_WORDS, read by kpr.bpf.abi), no copy of them in Python."""

from __future__ import annotations

import struct

from kpr.bpf import abi
from kpr.nodeport import datapath as D
from kpr.nodeport import tables


def test_udp_port_words_start_where_the_header_says():
    udp = abi.value("KPR_NP_PORT_WORDS_UDP")
    for port in (0, 53, 80, 30080, 65535):
        assert D.port_bit(port, 17) == (udp | port >> 6, 1 << (port & 63)), port
        assert D.port_bit(port, 6) == (port >> 6, 1 << (port & 63)), port
    assert D.port_bit(80, 132) is None
    # every port of both protocols has a word of its own within the maps' words, derived from it
    assert udp == 65536 >> 6
    assert 2 * udp == abi.value("KPR_NP_UNSERVED_WORDS") == abi.value("KPR_NP_NOMODE_WORDS") == D.PORTS_ARMED


def test_announced_address_words_are_the_headers():
    mask = abi.value("KPR_NP_VIP_HASH_MASK")
    assert D.VIP_WORDS == abi.value("KPR_NP_VIP_WORDS") == (mask >> 6) + 1  # a bit per vip_hash value
    # vip_hash's values are the header's kpr_np_vip_hash()'s: under its mask, every bit of it used
    seen = 0
    for i in range(4096):
        h = D.vip_hash(struct.pack("=4I", i * 2654435761 & 0xFFFFFFFF, i, i << 7, 0))
        assert h & ~mask == 0, (i, hex(h))
        seen |= h
    assert seen == mask
    spec = {s.name: s for s in tables.specs(1024)}[D.PORTS_MAP]
    assert spec.max_entries == abi.value("KPR_NP_VIP_BITS") + abi.value("KPR_NP_VIP_WORDS")
