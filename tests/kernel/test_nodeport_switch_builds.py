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


# one test per build: all of a hook's builds in one test outgrew the suite's 300 s timeout on a
# loaded machine (about 10 s a build)
# (a switch labelled for the other hook, "XDP: ..." or "tc: ...", builds this hook's default)
@pytest.mark.parametrize("hook,label", [pytest.param(h, s, id=f"{h}-{s}") for h, other in (("tc", "XDP:"), ("xdp", "tc:"))
                                        for s in sorted(SWITCHES) if not s.startswith(other)])
def test_every_switch_build_loads(lab: ProgLab, hook: str, label: str) -> None:
    name = f"{hook}: {label}"
    try:
        lab.load(hook, name, SWITCHES[label])
    except Exception as e:  # the loader's error carries the verifier's complaint
        pytest.fail(f"{hook} build refused, {label}: {str(e).splitlines()[-1][:200] if str(e) else type(e).__name__}")
    finally:
        dp = lab.builds.pop(name, None)
        if dp is not None:
            dp.close()  # one build held at a time
