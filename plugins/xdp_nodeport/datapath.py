"""The XDP build of the NodePort programs: plugins/xdp_nodeport/bpf/xdp_nodeport.c over
core/bpf/lib/nodeport.h (everything else: kpr.nodeport.datapath)."""

from __future__ import annotations

from pathlib import Path

from kpr.nodeport.datapath import CALLS as _BASE_CALLS
from kpr.nodeport.datapath import Datapath as _Base

SOURCE = Path(__file__).resolve().parent / "bpf" / "xdp_nodeport.c"

# The program attached to each device (kpr_* marks kpr's programs; at most 15 characters,
# the kernel's program name length).
INGRESS = "kpr_xnp_ingress"
# Built and verified, not attached (XDP has no egress hook; a devmap egress program could use it).
EGRESS = "kpr_xnp_egress"
# Stages this build leaves out (DSR needs skb operations XDP lacks: bpf/xdp_nodeport.c
# defines them only under KPR_NP_DSR, which ctx/xdp.h refuses).
TC_ONLY = ("dsr", "dsr_recv")
# Stages in KPR_NP_CALL_* slot order (the tc build's CALLS, from lib/nodeport.h through
# kpr.bpf.abi): kpr_xnp_<call>, "" for a slot this build leaves empty.
CALLS = tuple("" if (n := c.removeprefix("kpr_np_")) in TC_ONLY else f"kpr_xnp_{n}" for c in _BASE_CALLS)
CALLS_MAP = "kpr_np_xcalls"
# This build's counters (lib/nodeport.h KPR_NP_PIN_STATS, KPR_NP_PIN_FWD in an XDP build).
STATS_MAP, FWD_MAP = "kpr_np_xstats", "kpr_np_xfwd"


class Datapath(_Base):
    """The XDP programs: the ingress entry and its stages (no DSR, no redirect_peer)."""

    SOURCE = SOURCE
    ENTRIES = (INGRESS,)
    CALLS = CALLS
    PROG_TYPE = "XDP"
    CALLS_MAP = CALLS_MAP
    STATS_MAP, FWD_MAP = STATS_MAP, FWD_MAP
    LINK_HOOKS = ("xdp",)

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        kw["redirect_peer"] = False  # XDP cannot deliver into a pod's namespace
        super().__init__(*args, **kw)

    @property
    def reads_csum_state(self) -> None:
        return None  # XDP has no skb: its builds ignore the kernctx flags
