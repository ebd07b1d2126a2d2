"""benchmarks/profile_nodeport.py against a real build: perf's samples of the new SNAT flow's
test runs name the build's entry program, its hottest offset in the JIT image, and the counters
that prove the path ran (linux-perf comes with scripts/install-deps.sh)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_nodeport.py"


def test_the_profile_of_a_new_snat_flow_names_the_entry_program_and_its_hottest_offset(require_kernel: None) -> None:
    out = subprocess.run([sys.executable, str(TOOL), "--seconds", "3", "--runs", "1000", "--offsets", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert re.search(r"counters: \{[^}]*'new_snat': [1-9]", text), text
    under = re.search(r"(\d+) of (\d+) samples under BPF_PROG_TEST_RUN", text)
    assert under and int(under.group(1)) > 0, text
    assert re.search(r"^\s+[\d.]+%\s+bpf_prog_[0-9a-f]{16}_kpr_xnp_ingress$", text, re.M), text
    assert re.search(r"kpr_xnp_ingress \([\d.]+% of the samples\): hottest offsets\n\s+\+0x[0-9a-f]+\s", text), text


def test_a_case_the_benchmark_lacks_is_refused_by_name(require_kernel: None) -> None:
    out = subprocess.run([sys.executable, str(TOOL), "--case", "no such case", "--seconds", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "--case 'no such case' names 0 cases" in out.stderr, out.stderr[-2000:]


def test_the_spread_case_is_profiled_in_a_lab_of_the_services_asked_for(require_kernel: None) -> None:
    """--services and --stride make the many-frontend lab of bench_nodeport_scale.py: the spread
    case names that lab's filler frontends (two of the services are the lab's own) and ran."""
    out = subprocess.run([sys.executable, str(TOOL), "--services", "50", "--stride", "7", "--case", "new flows over",
                          "--seconds", "2", "--runs", "500", "--offsets", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== xdp new flows over 48 frontends (SNAT)" in out.stdout, out.stdout[:2000]
    assert re.search(r"counters: \{[^}]*'new_snat': [1-9]", out.stdout), out.stdout
