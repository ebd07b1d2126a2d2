"""`kpr cleanup` and the pin path's lock (kpr.bpf.pinlock): run while another process (a live
agent) holds the pin path, it refuses (exit 2, the path and the holder's pid, how to go on) and
leaves every pin; with --force it cleans up anyway, with a warning naming the holder; with no
holder it cleans up. Its own hold goes when it is done, also when the cleanup failed. Before,
it removed a live agent's pins, programs and attachments from under it, silently. Each on a
pin path in a private bpffs the test mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kpr import cli
from kpr.bpf import maps as M
from kpr.bpf import pinlock
from kpr.bpf.cleanup import attachments, record_attachment
from kpr.testing.agent import kpr_cleanup, pin_holder
from kpr.testing.bpffs import pin_map

pytestmark = pytest.mark.kernel

SPEC = M.MapSpec("kpr_t", M.BPF_MAP_TYPE_HASH, 4, 4, 8)
PINS = ["kpr_a", "kpr_b"]


def _pins(bpffs: Path) -> Path:
    """A pin directory in the private bpffs holding two maps, as an agent leaves it."""
    pin = bpffs / "kpr"
    for name in PINS:
        pin_map(pin, name, SPEC, {b"\1\0\0\0": b"\2\0\0\0"})
    return pin


def _end(p) -> None:
    p.kill()
    p.wait()


def test_cleanup_refuses_a_pin_path_a_live_agent_holds_and_force_cleans_it(bpffs, tmp_path):
    pin = _pins(bpffs)
    agent = pin_holder(pin)  # the running agent's hold
    try:
        res = kpr_cleanup(pin, tmp_path)
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stderr == (
            f"kpr cleanup: bpf.pinPath {pin} is in use (pid {agent.pid} holds it: a running kpr agent, or another "
            "kpr cleanup); cleaning up would remove a live agent's programs, maps and attachments from under it: "
            "stop the agent first (e.g. systemctl stop kpr), or run kpr cleanup --force\n"
        ), res.stderr
        assert res.stdout == ""
        assert sorted(os.listdir(pin)) == PINS, "the live agent's pins left"

        forced = kpr_cleanup(pin, tmp_path, "--force")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert f"WARNING kpr.cli event=cleanup_forced path={pin} holder_pid={agent.pid}\n" in forced.stderr, forced.stderr
        assert "Traceback" not in forced.stderr
        for name in PINS:
            assert f"removed pin {pin / name}" in forced.stdout, forced.stdout
        assert not pin.exists()
    finally:
        _end(agent)


def test_cleanup_with_no_holder_removes_the_pins_and_lets_the_lock_go(bpffs, tmp_path, capsys):
    """In this process (`kpr cleanup`'s main), so its hold is seen after it returns: the lock on
    the removed directory's inode gone from /proc/locks, and the pin path held by the next
    agent."""
    pin = _pins(bpffs)
    st = os.stat(pin)
    cfg = tmp_path / "kpr.yaml"
    cfg.write_text(f'{{"bpf": {{"pinPath": "{pin}"}}}}')
    assert cli.main(["cleanup", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"removed pin {pin / 'kpr_a'}" in out and f"removed directory {pin}" in out, out
    assert not pin.exists()
    assert pinlock.holder_pids(st) == [], "cleanup's hold let go"
    pin.mkdir()
    _end(pin_holder(pin))  # an agent starts there
    assert kpr_cleanup(pin, tmp_path).returncode == 0 and not pin.exists()


def test_a_cleanup_that_fails_lets_the_lock_go(bpffs, tmp_path, capsys):
    """A hook cleanup cannot reach (a recorded netns path that is no netns: nsenter fails)
    ends it with an error, the registry and pins kept for a second run; its hold goes too
    (the directory is still there: held() and another process's hold look at it)."""
    pin = _pins(bpffs)
    not_a_netns = tmp_path / "netns"
    not_a_netns.write_text("")
    record_attachment(pin, "tc", {"ifname": "kprcl0", "direction": "ingress", "netns": str(not_a_netns)}, "kpr_t")
    cfg = tmp_path / "kpr.yaml"
    cfg.write_text(f'{{"bpf": {{"pinPath": "{pin}"}}}}')
    assert cli.main(["cleanup", "--config", str(cfg)]) == 1
    assert "cleanup incomplete" in capsys.readouterr().err
    assert len(attachments(pin)) == 1 and set(PINS) <= set(os.listdir(pin)), "kept for a second run"
    assert not pinlock.held(pin), "cleanup's hold let go"
    assert pinlock.holder_pids(os.stat(pin)) == []
    _end(pin_holder(pin))  # an agent starts there
    not_a_netns.unlink()  # (the record's netns gone: the next cleanup skips it)
    res = kpr_cleanup(pin, tmp_path)
    assert res.returncode == 0 and not pin.exists(), res.stdout + res.stderr
