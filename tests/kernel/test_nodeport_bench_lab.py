"""The benchmark lab's own set-up (kpr.testing.nodeport_bench.ProgLab): what it claims about the
state a measurement starts from."""

from __future__ import annotations

import pytest

from kpr.testing.nodeport_bench import CLIENT_BASE, FILLER_BASE, ProgLab, ip4, load_default
from kpr.testing.netns import in_netns
from kpr.testing.prog_run import test_run

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_warming_caches_every_filler_backends_next_hop(require_kernel: None, hook: str) -> None:
    # the scale rows compare new flows over many frontends with new flows over a few, whose
    # backends' next hops are cached after the first round: warm_next_hops gives the many the same
    with ProgLab(40) as lab:
        load_default(lab, hook, 1)
        lab.warm_next_hops(hook)
        dp, fd = lab.builds["default"], lab.entry(hook, "default")
        before = dp.stats()
        with in_netns(lab.lb_path):
            for i in range(lab.fillers):  # other clients than the warming flows': new flows
                test_run(fd, lab.packet(ip4(FILLER_BASE + i), 80, src=ip4(CLIENT_BASE + 5000 + i), flags="S"),
                         ctx=lab.ctx(hook))
        after = dp.stats()
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("new_snat", "fwd_nh_cached")}
        assert grew == {"new_snat": lab.fillers, "fwd_nh_cached": lab.fillers}, grew


def test_a_term_during_a_builds_close_still_removes_the_lab(require_kernel: None) -> None:
    # a second TERM while the first unwinds (exit_on_sigterm raises SystemExit) can land in a
    # build's close: the lab's namespaces and pins must go all the same
    lab = ProgLab(4)
    with pytest.raises(SystemExit):
        with lab:
            load_default(lab, "tc", 2)
            first = lab.builds["default"]
            close = first.close

            def term_during_close() -> None:
                first.close = close
                raise SystemExit(143)

            first.close = term_during_close
            paths = [ns.path for ns in lab.topo.namespaces.values()]
            pin = lab.pin
    try:
        assert not [p for p in paths if p.exists()], "the lab's namespaces are removed"
        assert not pin.exists(), "the lab's pins are removed"
    finally:
        close()
