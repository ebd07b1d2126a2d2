"""benchmarks/bench_nodeport_scale.py end to end on small labs: a twin build's table and its
paired line, and the counters proving every full build's run was a new SNAT flow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_nodeport_scale.py"


def test_a_twin_build_is_reported_round_by_round_beside_its_build(require_kernel: None) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--services", "4,6", "--rounds", "3", "--runs", "200",
                          "--stops", "0", "--cflags=-DKPR_NP_CT_TOUCH=0"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "with -DKPR_NP_CT_TOUCH=0:" in text, text
    assert re.search(r"full program \(next-hop cache, redirect\)\s+4: [+-]\d+ ns \([+-]\d+ / [+-]\d+\), "
                     r"faster in \d of 3; 6: [+-]\d+ ns \([+-]\d+ / [+-]\d+\), faster in \d of 3", text), text
    for name in ("default", "cflags"):
        assert re.search(rf"^  {name} \([^;]*; 4: new_snat\+600, 6: new_snat\+600 of 600 runs each\)$", text, re.M), text
