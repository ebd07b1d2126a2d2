"""clsact filters on the node's external devices, through pyroute2.

kpr's filters are recognised by name (kpr_*, the BPF function name given to tc); every other
filter on the device is someone else's and is never changed or removed. Attaching is
idempotent: a kpr filter already at the hook is replaced in place (same priority and handle,
so there is no moment without a program), a missing one is added at the configured priority,
or the next free one when another owner holds it.

Every call acts in the calling thread's network namespace: the plugin runs them in the
agent's (see plugin._in_agent_netns).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# clsact parents, as tc(8) names them.
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
DIRECTIONS = ("ingress", "egress")
KPR_PREFIX = "kpr_"  # filters with a BPF name starting with this are kpr's


class AttachError(OSError):
    """A device could not be given kpr's filters; the message names it."""


@dataclass(frozen=True)
class Filter:
    ifname: str
    ifindex: int
    direction: str
    pref: int
    handle: int
    # The BPF program's name as tc shows it ("" for non-BPF filters).
    name: str
    kind: str

    @property
    def ours(self) -> bool:
        return self.kind == "bpf" and self.name.startswith(KPR_PREFIX)


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise AttachError(errno.ENODEV, f"no device {ifname!r} in this network namespace")
    return int(found[0])


def filters(ipr: Any, ifname: str, direction: str) -> list[Filter]:
    """Every filter at one clsact hook of a device (empty without clsact)."""
    idx = _ifindex(ipr, ifname)
    out = []
    try:
        msgs = ipr.get_filters(index=idx, parent=PARENTS[direction])
    except Exception as exc:  # pyroute2 raises NetlinkError(EINVAL) when there is no clsact qdisc
        if getattr(exc, "code", None) in (errno.EINVAL, errno.ENOENT):
            return []
        raise
    for msg in msgs:
        opts = msg.get_attr("TCA_OPTIONS")
        if not opts:
            continue  # the per-priority header message; the filter itself follows
        name = ""
        for key, value in opts.get("attrs", []):
            if key == "TCA_BPF_NAME":
                name = value
        out.append(
            Filter(ifname, idx, direction, int(msg.get("info")) >> 16, int(msg.get("handle")), name,
                   str(msg.get_attr("TCA_KIND") or ""))
        )
    return out


def ensure_clsact(ipr: Any, ifname: str) -> None:
    idx = _ifindex(ipr, ifname)
    try:
        ipr.tc("add", "clsact", idx)
    except Exception as exc:
        if getattr(exc, "code", None) != errno.EEXIST:
            raise AttachError(getattr(exc, "code", errno.EIO), f"adding clsact to {ifname}: {exc}") from None


def attach(ipr: Any, ifname: str, direction: str, fd: int, name: str, prio: int) -> Filter:
    """Put program `fd` at the hook under `name` (must start with kpr_), replacing kpr's own."""
    if not name.startswith(KPR_PREFIX):
        raise ValueError(f"kpr filter names start with {KPR_PREFIX!r}, got {name!r}")
    ensure_clsact(ipr, ifname)
    idx = _ifindex(ipr, ifname)
    parent = PARENTS[direction]
    present = filters(ipr, ifname, direction)
    mine = [f for f in present if f.kind == "bpf" and f.name == name]
    try:
        if mine:
            keep = mine[0]
            ipr.tc("replace-filter", "bpf", idx, keep.handle, fd=fd, name=name, parent=parent, classid=1,
                   direct_action=True, prio=keep.pref)
            for extra in mine[1:]:  # a crashed attach could have left a second copy
                _delete(ipr, extra)
            action = "replaced"
        else:
            taken = {f.pref for f in present}
            pref = prio
            while pref in taken:
                pref += 1
            ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name=name, parent=parent, classid=1,
                   direct_action=True, prio=pref)
            action = "added"
    except AttachError:
        raise
    except Exception as exc:
        raise AttachError(getattr(exc, "code", errno.EIO), f"attaching {name} to {ifname} {direction}: {exc}") from None
    now = [f for f in filters(ipr, ifname, direction) if f.kind == "bpf" and f.name == name]
    if not now:
        raise AttachError(errno.EIO, f"{name} is not at {ifname} {direction} after attaching it")
    got = now[0]
    ahead = sorted({f.name or f.kind for f in filters(ipr, ifname, direction) if not f.ours and f.pref < got.pref})
    log.info(
        "event=tc_attached dev=%s direction=%s prog=%s pref=%d action=%s foreign_before=%s",
        ifname, direction, name, got.pref, action, ",".join(ahead) or "-",
    )
    return got


def _delete(ipr: Any, f: Filter) -> None:
    ipr.tc("del-filter", "bpf", f.ifindex, f.handle, parent=PARENTS[f.direction], prio=f.pref)


def detach(ipr: Any, ifname: str, direction: str, names: tuple[str, ...] | None = None) -> int:
    """Remove kpr's filters (those named in `names`, or every kpr_* one) from the hook; returns how many."""
    try:
        present = filters(ipr, ifname, direction)
    except AttachError:
        return 0  # the device is gone, and its filters with it
    n = 0
    for f in present:
        if f.ours and (names is None or f.name in names):
            try:
                _delete(ipr, f)
                n += 1
            except Exception as exc:
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL):
                    raise AttachError(getattr(exc, "code", errno.EIO), f"detaching {f.name} from {ifname}: {exc}") from None
    if n:
        log.info("event=tc_detached dev=%s direction=%s count=%d", ifname, direction, n)
    return n


def foreign_ahead(ipr: Any, ifname: str, direction: str) -> list[str]:
    """Names of other owners' filters that run before kpr's at the hook (they may keep packets from it)."""
    present = filters(ipr, ifname, direction)
    ours = [f.pref for f in present if f.ours]
    if not ours:
        return []
    return sorted({f.name or f.kind for f in present if not f.ours and f.pref < min(ours)})
