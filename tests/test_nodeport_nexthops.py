"""Which netlink events invalidate the NodePort programs' cached next hops (kpr.nexthops)."""

from __future__ import annotations

from typing import Any

from kpr.nexthops import (
    NUD_FAILED,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    NeighbourBook,
)

NUD_REACHABLE, NUD_STALE = 0x02, 0x04


class Msg(dict):
    """What pyroute2's marshal hands over: fields by key, attributes by get_attr."""

    def __init__(self, kind: int, ifindex: int = 2, state: int = NUD_REACHABLE, **attrs: Any) -> None:
        super().__init__(header={"type": kind}, ifindex=ifindex, state=state)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def neigh(mac: str | None, *, kind: int = RTM_NEWNEIGH, state: int = NUD_REACHABLE, dst: str = "10.0.0.3") -> Msg:
    return Msg(kind, state=state, NDA_DST=dst, NDA_LLADDR=mac)


def test_routes_always_invalidate_links_never() -> None:
    b = NeighbourBook()
    assert b.changes(Msg(RTM_NEWROUTE)) and b.changes(Msg(RTM_DELROUTE))
    assert not b.changes(Msg(RTM_NEWLINK))


def test_a_neighbour_invalidates_when_its_address_changes_or_it_fails_or_goes() -> None:
    b = NeighbourBook()
    assert not b.changes(neigh("02:00:00:00:00:03")), "first seen: cached entries were invalidated at start"
    assert not b.changes(neigh("02:00:00:00:00:03", state=NUD_STALE)), "a state change, same address"
    assert b.changes(neigh("02:00:00:00:00:99")), "a new address"
    assert not b.changes(neigh("02:00:00:00:00:03", dst="10.0.0.4")), "another neighbour, first seen"
    assert b.changes(neigh(None, state=NUD_FAILED))
    assert not b.changes(neigh(None, state=NUD_FAILED)), "already gone"
    b.changes(neigh("02:00:00:00:00:05"))
    assert b.changes(neigh("02:00:00:00:00:05", kind=RTM_DELNEIGH))
