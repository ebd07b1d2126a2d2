"""kpr_np_ports', kpr_np_unserved's and kpr_np_nomode's port words, and kpr_np_ports' announced-
address words, as Python indexes them: the header's numbers (lib/nodeport.h
KPR_NP_PORT_WORDS_UDP, KPR_NP_VIP_WORDS, read by kpr.bpf.abi), no copy of them in Python."""

from __future__ import annotations

from kpr.bpf import abi
from kpr.nodeport import datapath as D
from kpr.nodeport import tables


def test_udp_port_words_start_where_the_header_says():
    udp = abi.value("KPR_NP_PORT_WORDS_UDP")
    for port in (0, 53, 80, 30080, 65535):
        assert D.port_bit(port, 17) == (udp | port >> 6, 1 << (port & 63)), port
        assert D.port_bit(port, 6) == (port >> 6, 1 << (port & 63)), port
    assert D.port_bit(80, 132) is None
    # every port of both protocols has a word of its own within the maps' words
    assert udp == 65536 >> 6 and 2 * udp <= abi.value("KPR_NP_UNSERVED_WORDS") == abi.value("KPR_NP_NOMODE_WORDS")


def test_announced_address_words_are_the_headers():
    assert D.VIP_WORDS == abi.value("KPR_NP_VIP_WORDS") == (0xFFFF >> 6) + 1  # a bit per vip_hash value
    spec = {s.name: s for s in tables.specs(1024)}[D.PORTS_MAP]
    assert spec.max_entries == abi.value("KPR_NP_VIP_BITS") + abi.value("KPR_NP_VIP_WORDS")
