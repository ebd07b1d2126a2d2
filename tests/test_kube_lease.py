"""kpr.kube.lease: the Lease rules leader election and announce_arp's liveness Leases share."""

from __future__ import annotations

import datetime

from kpr.kube.lease import holding_spec, micro_time, parse_time, released_spec

NOW = "2026-12-05T13:40:00.000001Z"


def test_micro_time_is_metav1_microtime_text_in_utc() -> None:
    assert micro_time(0) == "1970-01-01T00:00:00.000000Z"
    assert micro_time(1.5) == "1970-01-01T00:00:01.500000Z"
    assert parse_time(micro_time(1_700_000_000.25)).timestamp() == 1_700_000_000.25


def test_parse_time_takes_text_and_datetimes_and_refuses_junk() -> None:
    assert parse_time("2026-12-05T13:40:00Z") == datetime.datetime(2026, 12, 5, 13, 40, tzinfo=datetime.timezone.utc)
    naive = datetime.datetime(2026, 12, 5, 13, 40)
    assert parse_time(naive).tzinfo is datetime.timezone.utc
    for bad in (None, "", "yesterday", 17, {"t": 1}):
        assert parse_time(bad) is None


def test_a_new_lease_is_acquired_with_no_transition() -> None:
    spec = holding_spec(None, "node-a", 15.4, NOW, acquire=True)
    assert spec == {
        "holderIdentity": "node-a",
        "leaseDurationSeconds": 15,
        "renewTime": NOW,
        "acquireTime": NOW,
        "leaseTransitions": 0,
    }


def test_taking_over_counts_a_transition_and_keeps_other_fields() -> None:
    old = {"holderIdentity": "node-b", "leaseDurationSeconds": 10, "renewTime": "x", "acquireTime": "y",
           "leaseTransitions": 3, "preferredHolder": "node-c"}
    spec = holding_spec(old, "node-a", 0.2, NOW, acquire=True)
    assert spec["holderIdentity"] == "node-a" and spec["leaseTransitions"] == 4 and spec["acquireTime"] == NOW
    assert spec["leaseDurationSeconds"] == 1  # never 0: a zero duration would mean "expired"
    assert spec["preferredHolder"] == "node-c"
    assert old["holderIdentity"] == "node-b"  # the caller's copy is not changed


def test_renewing_changes_only_the_renew_time() -> None:
    old = {"holderIdentity": "node-a", "leaseDurationSeconds": 15, "renewTime": "x", "acquireTime": "y",
           "leaseTransitions": 2}
    spec = holding_spec(old, "node-a", 15, NOW, acquire=False)
    assert spec == {**old, "renewTime": NOW}


def test_release_clears_the_holder_for_a_one_second_duration() -> None:
    old = {"holderIdentity": "node-a", "leaseDurationSeconds": 15, "renewTime": "x", "leaseTransitions": 2}
    spec = released_spec(old, NOW)
    assert spec == {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": NOW, "leaseTransitions": 2}
    assert released_spec(None, NOW)["holderIdentity"] is None
