"""The systemd unit: readiness, restart policy, and the capabilities a BPF agent needs."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "packaging" / "systemd" / "kpr.service"


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNIT)
    return cp


def test_unit_is_notify_with_restart_and_bpf_capabilities():
    svc = unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert "kpr run --config /etc/kpr/kpr.yaml" in svc["ExecStart"]
    caps = set(svc["CapabilityBoundingSet"].split())
    assert {"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_NET_RAW"} <= caps
    assert set(svc["AmbientCapabilities"].split()) == caps
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    # ProtectSystem=strict makes everything read-only: what the agent writes must be listed.
    writable = set(svc["ReadWritePaths"].split())
    assert {"/sys/fs/bpf", "/run/kpr", "/var/lib/kpr"} <= writable


def test_systemd_accepts_the_unit(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # The unit names /usr/local/bin/kpr; verify a copy pointing at a stand-in executable.
    exe = tmp_path / "kpr"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    copy = tmp_path / "kpr.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/kpr", str(exe)))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    problems = [l for l in (out.stdout + out.stderr).splitlines() if "kpr.service" in l]
    assert not problems, problems
