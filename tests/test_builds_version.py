"""kpr.bpf.builds.digest reads bcc's version without importing bcc (a restart that adopts its
links loads no libbcc), and gets the version bcc itself reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from kpr.bpf import builds
before = builds.digest("text", ["-DX=1"])
assert "bcc" not in sys.modules, "digest imported bcc"
import bcc
assert builds.bcc_version() == bcc.__version__ != "", (builds.bcc_version(), bcc.__version__)
assert builds.digest("text", ["-DX=1"]) == before
print("ok")
"""


def test_digest_reads_the_version_bcc_reports_without_importing_it() -> None:
    pytest.importorskip("bcc")
    # a fresh interpreter: this one may have imported bcc already
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
