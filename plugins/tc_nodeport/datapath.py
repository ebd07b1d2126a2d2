"""The tc build of the NodePort programs: plugins/tc_nodeport/bpf/tc_nodeport.c over
core/bpf/lib/nodeport.h. Everything not tc-specific (struct packers, counters, the plugin-owned
maps) is kpr.nodeport.datapath's, re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from kpr.nodeport.datapath import *  # noqa: F403 (this module is the tc build's view of it)
from kpr.nodeport.datapath import CALLS, TC_EGRESS, TC_INGRESS
from kpr.nodeport.datapath import Datapath as _Base

SOURCE = Path(__file__).resolve().parent / "bpf" / "tc_nodeport.c"

# Entry programs and the names tc shows for them (kpr_* marks kpr's filters).
INGRESS, EGRESS = TC_INGRESS, TC_EGRESS
CALLS_MAP = "kpr_np_calls"


class Datapath(_Base):
    """The tc programs: clsact ingress and egress, and every stage."""

    SOURCE = SOURCE
    ENTRIES = (INGRESS, EGRESS)
    CALLS = CALLS
    PROG_TYPE = "SCHED_CLS"
    CALLS_MAP = CALLS_MAP
