"""socklb reads the host namespace's addresses by an RTM_GETADDR dump of its own
(sockdiag.interface_addresses), as `ip addr` lists them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
from kpr.plugins.socklb import sockdiag
from kpr.testing.netns import Namespace, Topology

pytestmark = pytest.mark.kernel


def _lab(topo: Topology) -> Namespace:
    ns = topo.add_namespace("a")
    ns.run("ip link set lo up")
    ns.run("ip link add d0 type veth peer name d1")
    ns.run("ip link set d0 up")
    return ns


def _listed(ns: Namespace) -> list[str]:
    """The local address of every entry `ip addr` shows."""
    return [a["local"] for link in json.loads(ns.run("ip -j addr show").stdout) for a in link["addr_info"]]


def _listed_and_read(prefix: str, *setup: str) -> tuple[list[str], list[str]]:
    """What `ip addr` lists and what interface_addresses reads, in a lab after `setup`."""
    with Topology(prefix=f"{prefix}{os.getpid() % 100000}") as topo:
        ns = _lab(topo)
        for cmd in setup:
            ns.run(cmd)
        return _listed(ns), sockdiag.run_in_netns(ns.path, sockdiag.interface_addresses)


def test_interface_addresses_are_what_ip_addr_lists() -> None:
    listed, got = _listed_and_read(
        "h5ifa",
        # Both families, secondary addresses, and more addresses than one netlink message
        # holds (the dump comes in parts).
        "for i in $(seq 1 300); do ip addr add 10.77.$((i / 256)).$((i % 256))/16 dev d0; done",
        "ip addr add fd00:77::1/64 dev d0 nodad",
        # A deprecated and a tentative IPv6 address are the host's too, as ip lists them.
        "ip addr add fd00:78::1/64 dev d0 nodad preferred_lft 0",
        "ip addr add fd00:79::1/64 dev d0",
    )
    assert len(got) > 300
    assert {"10.77.1.44", "fd00:77::1", "fd00:78::1", "fd00:79::1", "127.0.0.1"} <= set(got)
    assert sorted(got) == sorted(listed)


def test_a_point_to_point_address_is_the_local_end_not_the_peer() -> None:
    # On a point-to-point address IFA_ADDRESS is the peer's; the host's own is IFA_LOCAL.
    listed, got = _listed_and_read(
        "r1ptp",
        "ip addr add 10.99.0.1 peer 10.99.0.2/32 dev d0",
        "ip addr add fd00:99::1 peer fd00:99::2/128 dev d0 nodad",
    )
    assert "10.99.0.1" in got and "fd00:99::1" in got
    assert "10.99.0.2" not in got and "fd00:99::2" not in got
    assert sorted(got) == sorted(listed)


# 1200 addresses come in four parts: a change while the first is read reaches the later ones.
STAYS = [f"10.77.{i // 256}.{i % 256}" for i in range(1, 1201)]


def _read_while_changing(
    prefix: str, monkeypatch: pytest.MonkeyPatch, change: Callable[[Namespace, int], None], *setup: str
) -> tuple[list[str], list[str]]:
    """interface_addresses in a lab holding STAYS and `setup`, change(ns, n) run once the n-th
    dump's (from 0) first message was read; (what it read, what ip addr lists after)."""
    real = sockdiag._messages
    dumps = []
    with Topology(prefix=f"{prefix}{os.getpid() % 10000}") as topo:
        ns = _lab(topo)
        ns.run(["ip", "-batch", "-"], input="".join(f"addr add {a}/16 dev d0\n" for a in STAYS))
        for cmd in setup:
            ns.run(cmd)

        def changing(*args):
            n = len(dumps)
            dumps.append(n)
            for i, item in enumerate(real(*args)):
                yield item
                if i == 0:
                    change(ns, n)

        monkeypatch.setattr(sockdiag, "_messages", changing)
        got = sockdiag.run_in_netns(ns.path, sockdiag.interface_addresses)
        return got, _listed(ns)


def test_a_dump_interrupted_by_a_change_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # An address removed while the first part is read shifts the kernel's place in the list,
    # so the later parts skip one that stays (and the removed one was listed already). The
    # kernel marks those parts NLM_F_DUMP_INTR.
    changed = []

    def remove_once(ns: Namespace, n: int) -> None:
        if n == 0:
            changed.append(ns.run("ip addr del 10.88.0.1/24 dev d0"))

    # 10.88.0.1 a primary: near the head of d0's list.
    got, listed = _read_while_changing("r1intr", monkeypatch, remove_once, "ip addr add 10.88.0.1/24 dev d0")
    assert changed
    assert "10.88.0.1" not in got
    assert not set(STAYS) - set(got)
    assert sorted(got) == sorted(listed)


def test_a_dump_interrupted_every_time_is_used_after_the_last_attempt(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An address that comes and goes during every read: after its attempts the reader keeps
    # the last listing (most of the host's addresses) with a warning rather than failing.
    dumps = []

    def add_or_remove(ns: Namespace, n: int) -> None:
        dumps.append(ns.run(f"ip addr {'del' if n % 2 else 'add'} 10.88.0.1/24 dev d0"))

    with caplog.at_level("WARNING", logger=sockdiag.__name__):
        got, _listed_after = _read_while_changing("r1intr5", monkeypatch, add_or_remove)
    assert len(dumps) == sockdiag._DUMP_ATTEMPTS
    assert len(set(STAYS) - set(got)) <= 1
    assert f"event=ifaddr_dump_interrupted attempts={sockdiag._DUMP_ATTEMPTS}" in caplog.text
