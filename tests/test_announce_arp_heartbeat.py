"""announce_arp heartbeats: only authentic, fresh, in-order messages from members count."""

import json

import pytest

from kpr.plugins.announce_arp.config import Member
from kpr.plugins.announce_arp.heartbeat import MAGIC, MAC_LEN, Codec, Heartbeat, PeerTable, Rejected, cluster_id
from kpr.plugins.announce_arp.membership import HeartbeatMembership

KEY = b"k" * 32
MEMBERS = [Member("node1", "10.0.0.1"), Member("node2", "10.0.0.2"), Member("node3", "10.0.0.3")]
CLUSTER = cluster_id(MEMBERS, 7946)
WALL = 1_700_000_000.0


def hb(node="node2", inc=100, seq=1, ts=WALL, eligible=("10.0.100.10",), leaving=False):
    return Heartbeat(node, inc, seq, ts, frozenset(eligible), leaving)


def table():
    return PeerTable("node1", MEMBERS, dead_interval=1.0, max_skew=30.0)


def test_round_trip():
    c = Codec(KEY, CLUSTER)
    assert c.decode(c.encode(hb())) == hb()


def test_short_keys_are_refused():
    with pytest.raises(ValueError):
        Codec(b"short", CLUSTER)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        # unsigned: a plausible body without a MAC
        MAGIC + json.dumps({"c": CLUSTER, "n": "node2", "i": 1, "s": 1, "t": WALL, "e": [], "l": False}).encode(),
        # a MAC of zeros
        MAGIC + b"\0" * MAC_LEN + json.dumps({"c": CLUSTER, "n": "node2", "i": 1, "s": 1, "t": WALL, "e": [], "l": False}).encode(),
    ],
)
def test_unsigned_or_garbage_is_rejected(data):
    with pytest.raises(Rejected) as e:
        Codec(KEY, CLUSTER).decode(data)
    assert e.value.reason in ("malformed", "bad_mac")


def test_forged_with_another_key_is_rejected():
    forged = Codec(b"x" * 32, CLUSTER).encode(hb())
    with pytest.raises(Rejected) as e:
        Codec(KEY, CLUSTER).decode(forged)
    assert e.value.reason == "bad_mac"


def test_tampered_body_is_rejected():
    good = Codec(KEY, CLUSTER).encode(hb(eligible=()))
    bad = good.replace(b'"e":[]', b'"e":["10.0.100.10"]')
    assert bad != good
    with pytest.raises(Rejected) as e:
        Codec(KEY, CLUSTER).decode(bad)
    assert e.value.reason == "bad_mac"


def test_another_member_list_is_a_config_mismatch():
    other = Codec(KEY, cluster_id(MEMBERS[:2], 7946)).encode(hb())
    with pytest.raises(Rejected) as e:
        Codec(KEY, CLUSTER).decode(other)
    assert e.value.reason == "config_mismatch"


def test_replayed_and_reordered_messages_are_rejected():
    t = table()
    assert t.accept(hb(seq=5), "10.0.0.2", mono=10.0, wall=WALL) is True
    for seq in (5, 4, 1):
        with pytest.raises(Rejected) as e:
            t.accept(hb(seq=seq), "10.0.0.2", mono=10.1, wall=WALL)
        assert e.value.reason == "replay"
    # an older incarnation (the node before its restart), even with a higher sequence
    with pytest.raises(Rejected) as e:
        t.accept(hb(inc=99, seq=1000), "10.0.0.2", mono=10.2, wall=WALL)
    assert e.value.reason == "replay"
    # the next message, and a restarted node (newer incarnation, sequence from 1), count
    assert t.accept(hb(seq=6), "10.0.0.2", mono=10.3, wall=WALL) is False
    assert t.accept(hb(inc=200, seq=1), "10.0.0.2", mono=10.4, wall=WALL) is False


def test_replayed_dead_node_heartbeats_do_not_revive_it():
    t = table()
    t.accept(hb(seq=1), "10.0.0.2", mono=0.0, wall=WALL)
    t.accept(hb(seq=2), "10.0.0.2", mono=0.2, wall=WALL + 0.2)
    assert t.live(2.0) == frozenset()
    with pytest.raises(Rejected):
        t.accept(hb(seq=2), "10.0.0.2", mono=2.0, wall=WALL + 2.0)
    assert t.live(2.0) == frozenset()


def test_stale_timestamps_are_rejected():
    t = table()
    with pytest.raises(Rejected) as e:
        t.accept(hb(ts=WALL - 31), "10.0.0.2", mono=0.0, wall=WALL)
    assert e.value.reason == "stale"
    with pytest.raises(Rejected) as e:
        t.accept(hb(ts=WALL + 31), "10.0.0.2", mono=0.0, wall=WALL)
    assert e.value.reason == "stale"


@pytest.mark.parametrize(
    "msg,source,reason",
    [
        (hb(node="node9"), "10.0.0.9", "unknown_node"),
        (hb(node="node1"), "10.0.0.1", "own_name"),
        (hb(node="node2"), "10.0.0.3", "wrong_source"),
    ],
)
def test_senders_must_be_other_members_at_their_address(msg, source, reason):
    with pytest.raises(Rejected) as e:
        table().accept(msg, source, mono=0.0, wall=WALL)
    assert e.value.reason == reason


def test_liveness_follows_silence_and_leaving():
    t = table()
    t.accept(hb(node="node2", seq=1), "10.0.0.2", mono=0.0, wall=WALL)
    t.accept(hb(node="node3", inc=7, seq=1), "10.0.0.3", mono=0.5, wall=WALL)
    assert t.live(0.9) == {"node2", "node3"}
    assert t.next_expiry(0.9) == pytest.approx(1.0)
    assert t.live(1.2) == {"node3"}
    # leaving counts at once
    assert t.accept(hb(node="node3", inc=7, seq=2, leaving=True), "10.0.0.3", mono=1.3, wall=WALL) is True
    assert t.live(1.3) == frozenset()
    assert t.next_expiry(1.3) is None


def test_eligibility_change_is_a_change():
    t = table()
    assert t.accept(hb(seq=1, eligible=("10.0.100.10",)), "10.0.0.2", mono=0.0, wall=WALL) is True
    assert t.accept(hb(seq=2, eligible=("10.0.100.10",)), "10.0.0.2", mono=0.1, wall=WALL) is False
    assert t.accept(hb(seq=3, eligible=()), "10.0.0.2", mono=0.2, wall=WALL) is True
    assert t.peers["node2"].eligible == frozenset()


def test_a_long_silent_node_may_rejoin_with_a_smaller_incarnation():
    # Its clock was stepped back across a reboot: accepted once nothing it sent before can
    # still pass the timestamp check.
    t = table()
    t.accept(hb(inc=500, seq=9), "10.0.0.2", mono=0.0, wall=WALL)
    with pytest.raises(Rejected):
        t.accept(hb(inc=400, seq=1), "10.0.0.2", mono=5.0, wall=WALL)
    assert t.accept(hb(inc=400, seq=1), "10.0.0.2", mono=40.0, wall=WALL) is True


def test_heard_all_since():
    t = table()
    t.accept(hb(node="node2", seq=1), "10.0.0.2", mono=5.0, wall=WALL)
    assert not t.heard_all_since(4.0)
    t.accept(hb(node="node3", seq=1), "10.0.0.3", mono=5.1, wall=WALL)
    assert t.heard_all_since(4.0)
    assert not t.heard_all_since(5.05)


def test_membership_eligible_is_the_published_one_for_itself_and_the_heard_one_for_peers():
    m = HeartbeatMembership("node1", MEMBERS, 7946, Codec(KEY, CLUSTER), heartbeat_interval=1.0,
                            dead_interval=3.0, max_skew=30.0)  # never started: no socket
    assert m.eligible("node1") is None and m.eligible("node2") is None
    m.publish(frozenset({"10.0.100.10"}))
    m.table.accept(hb(node="node2", eligible=("10.0.100.11",)), "10.0.0.2", mono=0.0, wall=WALL)
    assert m.eligible("node1") == {"10.0.100.10"} and m.eligible("node2") == {"10.0.100.11"}
