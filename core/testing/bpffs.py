"""Scratch bpffs for tests: a private mount, or a unique pin directory, gone afterwards.

- `private_bpffs(prefix)`: a bpffs mounted on a fresh temporary directory, for agents that
  run in other namespaces (`ip netns exec` hides /sys/fs/bpf) or tests that must not share
  the system's bpffs; unmounted (lazily, so nothing stays mounted) and removed on exit.
- `scratch_pin_dir(prefix)`: a unique pin directory (kpr.bpf.cleanup's), whatever kpr pinned
  under it detached and removed on exit.
- `pin_map(pin, name, spec, entries)`: a map as an older kpr (or another writer) left it
  pinned, for tests of what kpr adopts, carries over or refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kpr.bpf.cleanup import scratch_bpffs, scratch_pin_dir

__all__ = ["pin_map", "private_bpffs", "scratch_pin_dir"]


# A bpffs mounted on a fresh temporary directory, unmounted (lazily: nothing stays mounted,
# whatever still holds it) and removed afterwards: kpr.bpf.cleanup's, one for the pin dirs too.
private_bpffs = scratch_bpffs


def pin_map(pin: Path, name: str, spec: Any, entries: Mapping[bytes, bytes] | None = None) -> int:
    """A map of `spec` (a kpr.bpf.maps.MapSpec) holding `entries`, pinned as `pin`/`name`
    (the directory made if missing) and closed: only the pin keeps it. Returns its id."""
    from kpr.bpf import maps as M

    pin.mkdir(parents=True, exist_ok=True)
    with M.BpfMap.create(spec) as m:
        if entries:
            m.update_many(list(entries), list(entries.values()))
        m.pin(pin / name)
        return int(m.id)
