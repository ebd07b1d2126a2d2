"""xdp_nodeport's stage list (CALLS) against its C entry file and lib/nodeport.h, without root:
each slot holds the XDP program that runs that KPR_NP_CALL_* stage, and the slots the XDP
build leaves empty are exactly the stages its entry file defines only under KPR_NP_DSR."""

from __future__ import annotations

import re

from kpr.bpf import abi
from kpr.plugins.xdp_nodeport import datapath as X

_STAGE = re.compile(r"^int (kpr_xnp_\w+)\(struct xdp_md \*ctx\) \{ return kpr_np_stage_(\w+)\(ctx\); \}$")


def _stages() -> dict[str, tuple[str, bool]]:
    """Stage name (the KPR_NP_CALL_* suffix) -> (the XDP program running it, defined only under #if)."""
    out: dict[str, tuple[str, bool]] = {}
    depth = 0
    for line in X.SOURCE.read_text().splitlines():
        if line.startswith("#if"):
            depth += 1
        elif line.startswith("#endif"):
            depth -= 1
        elif m := _STAGE.match(line):
            out[m.group(2).upper()] = (m.group(1), depth > 0)
    return out


def test_calls_follow_the_c_slots() -> None:
    slots = abi.group("KPR_NP_CALL_", exclude=("MAX",))
    stages = _stages()
    assert set(stages) == set(slots), "xdp_nodeport.c defines a program for every KPR_NP_CALL_* stage"
    assert len(X.CALLS) == abi.value("KPR_NP_CALL_MAX")
    for name, slot in slots.items():
        prog, conditional = stages[name]
        expected = "" if conditional else prog
        assert X.CALLS[slot] == expected, f"slot {slot} (KPR_NP_CALL_{name}): {X.CALLS[slot]!r}, C has {prog!r}"
    assert {n.upper() for n in X.TC_ONLY} == {n for n, (_p, cond) in stages.items() if cond}
