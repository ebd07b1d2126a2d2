"""Every build switch the NodePort benchmarks measure (kpr.testing.nodeport_bench.SWITCHES)
compiles and passes the verifier, for tc and XDP: a switch whose build the verifier refuses
crashed the benchmark's switch table (KPR_NP_CARRY=0 did, unnoticed, until it was removed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kpr.testing.nodeport_bench import SWITCHES, ProgLab

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(10) as pl:
        yield pl


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_every_switch_build_loads(lab: ProgLab, hook: str) -> None:
    refused = {}
    for label, flags in SWITCHES.items():
        try:
            lab.load(hook, f"{hook}: {label}", flags)
        except Exception as e:  # the loader's error carries the verifier's complaint
            refused[label] = str(e).splitlines()[-1][:200] if str(e) else type(e).__name__
    assert not refused, refused
