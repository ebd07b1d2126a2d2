"""New SNAT flows to a service of many backends all find a reply slot (README issue 14, eighteenth
round): with the old slot hash, the reply keys of the LoadBalancer's 100 backends fell on a few
thousand slots of kpr_snat_slots, and of 4000 new flows about 390 found all four ports they tried
held (snat_slot_full) and went on into kpr_snat. Both slot tables on (KPR_NP_CT_SLOTS,
KPR_NP_SNAT_SLOTS), XDP and tc, the flows made by the benchmarks' wrapper (a new client per run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.testing.netns import in_netns
from kpr.testing.nodeport_bench import VIP, ProgLab

pytestmark = pytest.mark.kernel

HOOKS = ("xdp", "tc")
BOTH = ("-DKPR_NP_CT_SLOTS=1", "-DKPR_NP_SNAT_SLOTS=1")
FLOWS = 4000  # 1.5% of either table: a random spread leaves a flow's four tries held about never


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(2) as pl:
        for hook in HOOKS:
            pl.load(hook, hook, BOTH)
        yield pl


@pytest.mark.parametrize("hook", HOOKS)
def test_thousands_of_new_snat_flows_to_a_hundred_backends_all_claim_a_reply_slot(lab: ProgLab, hook: str) -> None:
    dp = lab.builds[hook]
    with in_netns(lab.lb_path):
        lab.flush_flows()
        lab.run_wrapped(hook, lab.entry(hook, hook), lab.packet(VIP, 80, flags="S"), 1000, vary=True)  # next hops cached
        lab.flush_flows()
        before = dp.stats()
        lab.run_wrapped(hook, lab.entry(hook, hook), lab.packet(VIP, 80, flags="S"), FLOWS, vary=True)
        after = dp.stats()
    got = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert got.get("new_snat") == FLOWS, got
    assert got.get("snat_slot_full", 0) == 0, f"new flows whose reply slots were all held: {got}"
    assert got.get("ct_slot_full", 0) < FLOWS // 100, got
