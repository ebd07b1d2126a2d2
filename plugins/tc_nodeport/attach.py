"""kpr's tc programs on the node's external devices: tcx links where the kernel has them,
clsact filters through pyroute2 otherwise.

tcx (kernel 6.6+): `place()` puts each program at its hook through a BPF link pinned at
<bpf.pinPath>/links/tc_nodeport/<device>/<ingress|egress> (kpr.bpf.links). The link outlives
the agent; the next agent adopts it and switches it to its newly loaded program with
BPF_LINK_UPDATE, so there is never a moment without a program nor a second copy. tcx programs
run before every clsact filter, and ours after other owners' tcx programs attached earlier;
a packet kpr leaves alone gets TC_ACT_UNSPEC (TCX_NEXT), so later tcx programs and clsact
filters still see it.

clsact (the fallback: no tcx, KPR_BPF_LINKS=off or =tcx, or another owner's clsact filter
already at the hook, which kpr will not jump ahead of): kpr's filters are recognised by name
(kpr_*, the BPF function name given to tc); every other filter on the device is someone
else's and is never changed or removed. Attaching is idempotent: a kpr filter already at the
hook is replaced in place (same priority and handle, so there is no moment without a
program), a missing one is added at the configured priority, or the next free one when
another owner holds it. Filters stay when the process ends.

Moving between the two (an upgrade from filters to tcx, links turned off) attaches the new
way first and then removes the old copy. Every call acts in the calling thread's network
namespace: the plugin runs them in the agent's (see kpr.nodeport.agent._AgentNetns).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.bpf import links

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


# ---------------------------------------------------------------------- tcx links


@dataclass(frozen=True)
class Placement:
    """Where `place()` put a program: through a tcx link (pref 0) or as a clsact filter."""

    ifname: str
    ifindex: int
    direction: str
    how: str  # "tcx" | "clsact"
    pref: int
    action: str  # created | adopted | updated (tcx); added | replaced (clsact)
    link_pin: Path | None = None
    link_fd: int = -1
    fallback: str = ""  # why not tcx


def tcx_programs(ifindex: int, direction: str) -> list[tuple[int, str]]:
    """(prog id, name) of the tcx programs at a hook, in the order they run ([] without tcx)."""
    at = links.ATTACH_TCX_INGRESS if direction == "ingress" else links.ATTACH_TCX_EGRESS
    try:
        ids = links.query(ifindex, at)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return []
        raise
    return [(pid, links.prog_name(pid) or "") for pid in ids]


def _drop_tcx_copies(ifindex: int, direction: str, name: str, keep_id: int) -> int:
    """Detach other tcx copies of program `name` at the hook (an earlier run's links)."""
    n = 0
    held = None
    for pid, pname in tcx_programs(ifindex, direction):
        if pid == keep_id or pname != name[:15]:
            continue
        held = links.links_of_progs() if held is None else held
        for li in held.get(pid, []):
            if li.kind == "tcx" and links.detach_link_id(li.id):
                n += 1
    return n


def place(ipr: Any, link_dir: Path, ifname: str, direction: str, fd: int, name: str, prio: int) -> Placement:
    """Put program `fd` (named `name`, kpr_*) at one hook of a device: adopt or create the tcx
    link pinned under link_dir/<ifname>/<direction>, or attach a clsact filter where tcx is not
    to be used; remove kpr's copy attached the other way."""
    if not name.startswith(KPR_PREFIX):
        raise ValueError(f"kpr filter names start with {KPR_PREFIX!r}, got {name!r}")
    idx = _ifindex(ipr, ifname)
    pin = link_dir / links.device_pin_name(ifname) / direction
    foreign = sorted({f.name or f.kind for f in filters(ipr, ifname, direction) if not f.ours})
    fallback = ""
    if pin.exists() or (links.enabled("tcx") and not foreign):
        try:
            lfd, action, li = links.ensure(pin, fd, links.Hook.tcx(idx, direction))
        except links.LinkUnsupported as exc:
            fallback = str(exc)
        except OSError as exc:
            raise AttachError(exc.errno or errno.EIO, f"attaching {name} to {ifname} {direction} (tcx): {exc}") from None
        else:
            try:
                old = detach(ipr, ifname, direction, (name,)) + _drop_tcx_copies(idx, direction, name, li.prog_id)
            except OSError:
                os.close(lfd)
                raise
            log.info("event=tcx_attached dev=%s direction=%s prog=%s action=%s link_id=%d old_copies_removed=%d",
                     ifname, direction, name, action, li.id, old)
            return Placement(ifname, idx, direction, "tcx", 0, action, pin, lfd)
    elif foreign:
        fallback = f"another owner's clsact filter at the hook ({', '.join(foreign)}): kpr stays behind it"
    else:
        fallback = f"tcx links turned off ({links.ENV})"
    before = {f.name for f in filters(ipr, ifname, direction) if f.ours}
    f = attach(ipr, ifname, direction, fd, name, prio)
    _drop_tcx_copies(idx, direction, name, -1)
    return Placement(ifname, idx, direction, "clsact", f.pref, "replaced" if name in before else "added",
                     fallback=fallback)


def remove(ipr: Any, link_dir: Path, ifname: str, direction: str, name: str) -> int:
    """Take kpr's program `name` off one hook however it is attached; returns how many went."""
    n = 0
    pin = link_dir / links.device_pin_name(ifname) / direction
    if links.release(pin):
        n += 1
    n += detach(ipr, ifname, direction, (name,))
    try:
        idx = _ifindex(ipr, ifname)
    except AttachError:
        return n  # the device is gone, and its programs with it
    return n + _drop_tcx_copies(idx, direction, name, -1)


def tcx_ahead(ipr: Any, ifname: str, direction: str) -> list[str]:
    """Names of other owners' tcx programs that run before kpr's at the hook."""
    out = []
    for _pid, name in tcx_programs(_ifindex(ipr, ifname), direction):
        if name.startswith(KPR_PREFIX):
            break
        out.append(name or "?")
    return out
