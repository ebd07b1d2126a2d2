"""Drop and refusal reasons: one vocabulary for `kpr explain`, the labelled Prometheus
counter kpr_drops_total{hook,reason} and `kpr status`.

The reasons are the programs' own counter names without their "drop_" prefix: tc_nodeport's
and xdp_nodeport's kpr_np_stats drop_* slots (kpr.nodeport.datapath.STATS) and kpr_np_fwd
fwd_drop_* slots, and the socket hooks' refusals (kpr.plugins.socklb STATS), all named from
their #defines in lib/*.h by kpr.bpf.abi. A new drop counter in a program's header shows up
here with its name, with nothing to add. The few drop counters
named otherwise keep their names (status and tests read them) and are mapped in RENAMED.
"""

from __future__ import annotations

from collections.abc import Mapping

# Plugin -> the hook label its programs run at.
HOOKS = {"tc_nodeport": "tc", "xdp_nodeport": "xdp", "socklb": "socket", "host_routing": "tc-host-routing"}
# Socket-hook counters that are refusals (the call fails), by reason.
SOCKET_REFUSALS = ("no_backend", "bind_refused")
# Drop counters of the tc/XDP programs whose reason is not their name minus a prefix: the
# reason is the `kpr monitor` reason (lib/monitor.h KPR_MON_R_*) of the same drop.
RENAMED = {"fwd_drop_short": "short_frame", "tail_call_missing": "tail_call_missing"}

# The reasons explain names (the per-packet path: tc and XDP; the socket hooks: refusals).
NO_BACKEND = "no_backend"
NO_LOCAL_BACKEND = "no_local_backend"
SOURCE_RANGE = "source_range"
VIP_UNSERVED = "vip_unserved"


def reason_of(plugin: str, counter: str) -> str | None:
    """The drop reason a plugin status counter counts, or None when it counts no drop."""
    if counter in RENAMED and HOOKS.get(plugin) in ("tc", "xdp"):
        return RENAMED[counter]
    if counter.startswith("drop_"):
        return counter[len("drop_"):]
    if counter.startswith("fwd_drop_"):
        return counter[len("fwd_drop_"):]
    if HOOKS.get(plugin) == "socket" and counter in SOCKET_REFUSALS:
        return counter
    return None


def drops(plugin: str, counters: Mapping[str, float]) -> dict[str, int]:
    """reason -> count from one plugin's status counters."""
    out: dict[str, int] = {}
    for name, value in counters.items():
        reason = reason_of(plugin, name)
        if reason is not None:
            try:
                out[reason] = out.get(reason, 0) + int(value)
            except (TypeError, ValueError):
                continue
    return out


def hook_of(plugin: str) -> str:
    return HOOKS.get(plugin, plugin)
