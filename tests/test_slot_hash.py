"""The slot tables' hash (lib/slots.h kpr_slots_hash, kpr.bpf.slots.slot_hash: the same function,
checked against the C in tests/kernel/test_slots.py) spreads the keys the data path makes as a
random function would (README issue 14, eighteenth round). The old hash, a 32-bit multiply-add
over the key's words with no fold, put the reply keys of 100 backends over every even SNAT port
on 4568 of 262144 slots: a table that full sent about one new flow in ten through four held
probes and on into kpr_snat."""

from __future__ import annotations

import ipaddress

import pytest

from kpr.bpf import abi
from kpr.bpf import maps as M
from kpr.bpf.slots import slot_hash
from kpr.nodeport import datapath as D

SLOTS = abi.value("KPR_NP_CT_SLOTS_N")  # kpr_np_ct_slots' size (kpr_snat_slots', KPR_SNAT_SLOTS_N, is the same today)
TCP = 6
EVEN_PORTS = range(D.SNAT_PORT_MIN + D.SNAT_PORT_MIN % 2, D.SNAT_PORT_MAX + 1, 2)  # kpr_snat_claim's (lib/nat.h)


def _key(src: str, sport: int, dst: str, dport: int, direction: int) -> bytes:
    return D.CT_KEY.pack(M.addr_to_bytes(src), M.addr_to_bytes(dst), M.htons(sport), M.htons(dport), TCP, direction, 0)


def _hosts(net: str, n: int) -> list[str]:
    return [str(a) for a, _ in zip(ipaddress.ip_network(net).hosts(), range(n))]


def _spread(keys: list[bytes]) -> float:
    """Distinct slots the keys fall on, as a share of what a random function gives them."""
    expected = SLOTS * (1 - (1 - 1 / SLOTS) ** len(keys))
    return len({slot_hash(k) & (SLOTS - 1) for k in keys}) / expected


KEY_SETS = {
    # reply keys (backend -> SNAT address:port): the backend's last octet and the port both sit
    # in the high halves of their words
    "replies-100-backends-every-even-port": lambda: [
        _key(b, 8080, "10.0.0.2", p, D.CT_DIR_REPLY) for b in _hosts("10.244.2.0/24", 100) for p in EVEN_PORTS],
    "replies-4-snat-addresses-50-backends": lambda: [
        _key(b, 80, n, p, D.CT_DIR_REPLY) for n in _hosts("10.0.0.0/29", 4) for b in _hosts("10.244.2.0/24", 50)
        for p in EVEN_PORTS],
    "replies-v6-100-backends": lambda: [
        _key(b, 8080, "fd00::2", p, D.CT_DIR_REPLY) for b in _hosts("fd00:244:2::/120", 100) for p in EVEN_PORTS],
    # original keys: clients by address, by port, and clients times frontends
    "clients-100k": lambda: [_key(c, 40000, "203.0.113.40", 80, D.CT_DIR_ORIGINAL) for c in _hosts("198.18.0.0/15", 100000)],
    "clients-1000-by-100-ports": lambda: [
        _key(c, 40000 + p, "203.0.113.40", 80, D.CT_DIR_ORIGINAL) for c in _hosts("10.1.0.0/16", 1000) for p in range(100)],
    "clients-300-by-300-frontends": lambda: [
        _key(c, 40000, f, 80, D.CT_DIR_ORIGINAL) for c in _hosts("10.1.0.0/16", 300) for f in _hosts("203.0.0.0/16", 300)],
}


@pytest.mark.parametrize("name", list(KEY_SETS))
def test_the_slot_hash_spreads_the_keys_the_data_path_makes_like_a_random_function(name: str) -> None:
    assert _spread(KEY_SETS[name]()) > 0.98, f"{name}: the keys crowd onto too few slots"


def test_the_slot_hash_takes_whole_64_bit_words() -> None:
    with pytest.raises(ValueError, match="64-bit words"):
        slot_hash(bytes(12))
