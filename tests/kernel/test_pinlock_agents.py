"""One agent per pin path, with two agents: a second `kpr run` on the pin path a running agent
holds ends at once, naming the path and the running agent's pid, and leaves its maps as they
were; once the first has stopped, the second starts there. An agent whose pin directory does
not exist yet makes it and holds it before its plugins start; one whose pin path is a plain
directory with no bpffs holds the directory in the bpffs it mounted, where the pins go."""

from __future__ import annotations

import os
import subprocess
import sys

from kpr.bpf import maps as M
from kpr.bpf import pinlock
from kpr.testing.agent import AgentConfig, NeedsMaps, kpr_cli, running_agent

# Another process taking the hold (as a second agent's setup does first): exits 1, refused.
HOLD = "import sys; from kpr.bpf import pinlock; pinlock.hold(sys.argv[1])"


def _map_ids(pin):
    out = {}
    for name in sorted(os.listdir(pin)):
        try:
            with M.BpfMap.open_pinned(pin / name) as m:
                out[name] = m.id
        except OSError:  # a directory (links) or a pin of another kind
            continue
    return out


def test_a_second_agent_on_the_same_pin_path_is_refused(tmp_path, pin_dir):
    first = AgentConfig(tmp_path / "first", pin_dir)
    second = AgentConfig(tmp_path / "second", pin_dir)
    path = second.write()
    with running_agent(first, internal_plugins={"needs": NeedsMaps()}):
        assert pinlock.held(pin_dir)
        before = _map_ids(pin_dir)
        assert before, "the first agent's writer pinned its maps"
        res = kpr_cli("run", "--config", str(path), timeout=60)
        assert res.returncode == 1, res.stderr[-3000:]
        assert f"kpr: bpf.pinPath {pin_dir} is in use by another kpr agent (pid {os.getpid()})" in res.stderr, res.stderr[-3000:]
        assert _map_ids(pin_dir) == before, "the first agent's maps untouched"
    assert not pinlock.held(pin_dir), "released at the first agent's stop"
    with running_agent(second, internal_plugins={"needs": NeedsMaps()}):
        assert pinlock.held(pin_dir)
        assert _map_ids(pin_dir) == before, "the second adopted the same maps"


def test_an_agent_holds_a_pin_directory_before_its_plugins_start(tmp_path, pin_dir, monkeypatch):
    """A pin directory that does not exist yet is made and held before the first plugin (the
    service map writer) starts: of two agents starting at once, the second is refused before
    its plugins start (before, the directory was held once the writer had made it and
    pinned its maps there, so both agents' writers ran on it)."""
    from kpr.pluginmanager import PluginHandle

    pins = pin_dir / "fresh"  # (inside the scratch directory: removed with it)
    at_start: list[tuple[str, bool]] = []
    call = PluginHandle.call

    def recording(self, hook, **kw):
        if hook == "kpr_start":
            at_start.append((self.name, pins.is_dir() and pinlock.held(pins)))
        return call(self, hook, **kw)

    monkeypatch.setattr(PluginHandle, "call", recording)
    cfg = AgentConfig(tmp_path, pins)
    with running_agent(cfg, internal_plugins={"needs": NeedsMaps()}):
        assert at_start and all(held for _name, held in at_start), at_start
        assert pinlock.held(pins)
        res = kpr_cli("run", "--config", str(AgentConfig(tmp_path / "b", pins).write()), timeout=60)
        assert res.returncode == 1 and f"bpf.pinPath {pins} is in use" in res.stderr, res.stderr[-3000:]


def test_a_plain_pin_directory_with_no_bpffs_is_held_where_the_pins_go(tmp_path):
    """bpf.pinPath a plain directory with no bpffs: the agent mounts one by the writer's rule
    (on the pin path's parent) before any plugin starts, makes the pin directory in it and
    holds that one. Before, the plain directory was held, the writer's mount hid it and the
    maps went to a new directory nobody held: a second agent was let in there."""
    import ctypes

    from kpr.bpf import fs

    shadow = tmp_path / "shadow"
    pins = shadow / "pins"
    pins.mkdir(parents=True)
    assert not fs.on_bpffs(pins)
    try:
        with running_agent(AgentConfig(tmp_path / "work", pins), internal_plugins={"needs": NeedsMaps()}):
            assert shadow in fs.find_mounts("bpf") and fs.on_bpffs(pins), "a bpffs mounted on the parent"
            assert "kpr_svc" in os.listdir(pins), "the maps pinned in the directory there now"
            assert pinlock.held(pins), "the directory the pins went to is held"
            res = subprocess.run([sys.executable, "-c", HOLD, str(pins)], capture_output=True, text=True, timeout=60)
            assert res.returncode != 0 and f"in use by another kpr agent (pid {os.getpid()})" in res.stderr, res.stderr
    finally:
        if shadow in fs.find_mounts("bpf"):  # (the agent's mount: the test's to undo)
            assert ctypes.CDLL(None, use_errno=True).umount2(str(shadow).encode(), 2) == 0, ctypes.get_errno()
