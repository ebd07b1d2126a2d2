"""announce_arp ownership: deterministic, balanced, and moving as little as possible."""

import random

from kpr.plugins.announce_arp import ownership as O

NODES = [f"node{i}" for i in range(1, 6)]
ADDRS = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)] + [f"fd00:100::{i:x}" for i in range(200)]


def test_same_answer_whatever_the_input_order():
    for addr in ADDRS[:50]:
        expected = O.rank(addr, NODES)
        for _ in range(5):
            shuffled = NODES[:]
            random.shuffle(shuffled)
            assert O.rank(addr, shuffled) == expected
            assert O.owner(addr, set(shuffled)) == expected[0]


def test_known_values_pin_the_hash():
    # Every node of a cluster must compute the same thing, across versions too: a change of
    # hash input would split ownership during a rolling upgrade.
    assert O.score("node1", "10.0.100.10").hex() == __import__("hashlib").sha256(b"node1#10.0.100.10").hexdigest()
    assert O.rank("10.0.100.10", ["a", "b", "c"]) == sorted(
        ["a", "b", "c"], key=lambda n: __import__("hashlib").sha256(f"{n}#10.0.100.10".encode()).digest()
    )


def test_addresses_are_normalised_before_hashing():
    assert O.rank("fd00:100:0::0a", NODES) == O.rank("fd00:100::a", NODES)


def test_no_eligible_node_means_no_owner():
    assert O.owner("10.0.100.10", []) is None
    assert O.assign({"10.0.100.10": set()}) == {"10.0.100.10": None}


def test_spread_over_nodes():
    owners = O.assign({a: NODES for a in ADDRS})
    counts = {n: sum(1 for o in owners.values() if o == n) for n in NODES}
    fair = len(ADDRS) / len(NODES)
    assert all(0.75 * fair < c < 1.25 * fair for c in counts.values()), counts


def test_a_node_leaving_moves_only_its_addresses():
    before = O.assign({a: NODES for a in ADDRS})
    rest = [n for n in NODES if n != "node3"]
    after = O.assign({a: rest for a in ADDRS})
    moved = {a for a in ADDRS if before[a] != after[a]}
    assert moved == {a for a in ADDRS if before[a] == "node3"}
    # ...and each goes to the node ranked second for it, which every node can predict.
    for a in moved:
        assert after[a] == O.rank(a, NODES)[1]


def test_a_node_joining_takes_only_what_it_ranks_first_for():
    few = NODES[:4]
    before = O.assign({a: few for a in ADDRS})
    after = O.assign({a: NODES for a in ADDRS})
    moved = {a for a in ADDRS if before[a] != after[a]}
    assert moved and all(after[a] == "node5" for a in moved)
    assert moved == {a for a in ADDRS if O.rank(a, NODES)[0] == "node5"}


def test_leave_then_rejoin_restores_the_same_owners():
    full = O.assign({a: NODES for a in ADDRS})
    O.assign({a: NODES[1:] for a in ADDRS})
    assert O.assign({a: NODES for a in ADDRS}) == full


def test_eligibility_limits_candidates():
    addr = "10.0.100.10"
    first = O.rank(addr, NODES)[0]
    others = [n for n in NODES if n != first]
    assert O.owner(addr, others) == O.rank(addr, NODES)[1]
    assert O.owned_by(first, {addr: NODES}) == {addr}
    assert O.owned_by(first, {addr: others}) == set()
