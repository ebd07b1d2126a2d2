"""Helper probes without a compile (kpr.bpf.probes._raw_probe) answer as the compiled ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from kpr.bpf import probes


@pytest.mark.kernel
def test_raw_probe_answers_as_the_compiled_probe(kernel_headers: Path) -> None:
    # Every helper with a known id, for every program type kpr probes: absent ones included
    # (redirect_peer and set_retval are not XDP helpers), so a probe that always said
    # "present" (or "absent") fails.
    answers = []
    try:
        for ptype in probes.PROG_TYPES:
            probes.clear_cache()
            probes._compile_probe(ptype, list(probes.HELPER_IDS))
            compiled = {h: probes._helper_cache[(h, ptype)] for h in probes.HELPER_IDS}
            raw = {h: probes._raw_probe(h, ptype) for h in probes.HELPER_IDS}
            assert raw == compiled, ptype
            answers += compiled.values()
    finally:
        probes.clear_cache()
    assert True in answers and False in answers


@pytest.mark.kernel
def test_have_helper_takes_the_raw_probe_and_compiles_for_unknown_ids(kernel_headers: Path, monkeypatch) -> None:
    compiled: list[list[str]] = []
    real = probes._compile_probe

    def counting(ptype: str, helpers: list[str]) -> None:
        compiled.append(list(helpers))
        real(ptype, helpers)

    monkeypatch.setattr(probes, "_compile_probe", counting)
    probes.clear_cache()
    try:
        assert probes.have_helper("set_retval", "CGROUP_SOCK_ADDR")
        assert not probes.have_helper("set_retval", "XDP")
        assert compiled == []
        # Not in HELPER_IDS: the compile decides.
        assert probes.have_helper("ktime_get_ns", "SCHED_CLS")
        assert compiled == [["ktime_get_ns"]]
    finally:
        probes.clear_cache()
