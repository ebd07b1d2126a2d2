"""What a restart that adopts its pinned links needs of bcc, without importing it (that import
maps libbcc): kpr.bpf.builds.digest reads bcc's version as bcc reports it, and the cgroup
hooks' attach types are the kernel's numbers, as bcc has them."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from kpr.bpf import builds
before = builds.digest("text", ["-DX=1"])
assert "bcc" not in sys.modules, "digest imported bcc"
from kpr.bpf.links import CGROUP_ATTACH_TYPES
from kpr.bpf.loader import attach_type_value
named = {n: attach_type_value(n) for n in CGROUP_ATTACH_TYPES}
assert "bcc" not in sys.modules, "attach_type_value imported bcc"
import bcc
assert builds.bcc_version() == bcc.__version__ != "", (builds.bcc_version(), bcc.__version__)
assert builds.digest("text", ["-DX=1"]) == before
assert named == {n: getattr(bcc.BPFAttachType, n) for n in CGROUP_ATTACH_TYPES}
print("ok")
"""


def test_digest_and_cgroup_attach_types_without_importing_bcc() -> None:
    pytest.importorskip("bcc")
    # a fresh interpreter: this one may have imported bcc already
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
