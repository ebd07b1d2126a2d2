"""The next hops the NodePort programs cache per backend (kpr_np_nh, lib/nodeport.h) are
invalidated by the shared watcher, kpr.nexthops (route changes, neighbour address changes and
failures, a refresh every few seconds); its names stay importable from here."""

from __future__ import annotations

from kpr.nexthops import (
    NUD_FAILED,
    NUD_INCOMPLETE,
    REFRESH_SECONDS,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    STOP_SECONDS,
    NeighbourBook,
    NextHopWatcher,
)

__all__ = ["NUD_FAILED", "NUD_INCOMPLETE", "REFRESH_SECONDS", "RTM_DELNEIGH", "RTM_DELROUTE", "RTM_NEWLINK",
           "RTM_NEWNEIGH", "RTM_NEWROUTE", "STOP_SECONDS", "NeighbourBook", "NextHopWatcher"]
