"""KPR_HR_CT_GATE after an upgrade: a kpr without the gate made per-packet service flows in the
pinned kpr_ct; the first programs with the gate make a new kpr_hr_flows (0: "no flow ever made",
replies skip conntrack). Their replies must still be reversed: the load opens the gate when the
adopted kpr_ct holds a per-packet flow, and leaves it closed beside NodePort flows only.

Programs compiled and loaded into a scratch pin dir (never attached); the flag read back.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.nodeport.datapath import CT_F_NODE_PORT
from kpr.plugins.host_routing import datapath as D
from kpr.testing.bpffs import pin_map

pytestmark = pytest.mark.kernel


def _flag(pin) -> int:
    with M.BpfMap.open_pinned(pin / D.FLOWS_MAP) as m:
        raw = m.lookup(M.U32.pack(0))
    assert raw is not None
    return M.U32.unpack(raw)[0]


@pytest.mark.parametrize("flags, opened", [(0, 1), (CT_F_NODE_PORT, 0), (None, 0)],
                         ids=["per-packet-flow", "nodeport-only", "no-conntrack"])
def test_the_gate_opens_for_the_flows_of_an_adopted_kpr_ct(kernel_headers: Path, pin_dir: Path,
                                                            flags: int | None, opened: int) -> None:
    if flags is not None:
        # an older agent's kpr_ct with one entry (a per-packet flow's, or a NodePort one's)
        ct = M.SPECS["kpr_ct"]
        pin_map(pin_dir, "kpr_ct", ct, {bytes(ct.key_size): struct.pack("=QIIH", 1, 1, 1, flags).ljust(ct.value_size, b"\0")})
    dp = D.Datapath(pin_dir, D.Helpers(peer=True, neigh=True)).load()
    try:
        assert _flag(pin_dir) == opened
    finally:
        dp.close()
