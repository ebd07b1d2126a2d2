"""One agent per pin path, with two agents: a second `kpr run` on the pin path a running agent
holds ends at once, naming the path and the running agent's pid, and leaves its maps as they
were; once the first has stopped, the second starts there. An agent whose pin directory does
not exist yet holds it once its first plugin made it."""

from __future__ import annotations

import os

from kpr.bpf import maps as M
from kpr.bpf import pinlock
from kpr.testing.agent import AgentConfig, NeedsMaps, kpr_cli, running_agent


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


def test_an_agent_holds_a_pin_directory_its_plugins_made(tmp_path, pin_dir):
    pins = pin_dir / "fresh"  # (inside the scratch directory: removed with it)
    cfg = AgentConfig(tmp_path, pins)
    with running_agent(cfg, internal_plugins={"needs": NeedsMaps()}):
        assert pins.is_dir() and pinlock.held(pins)
        res = kpr_cli("run", "--config", str(AgentConfig(tmp_path / "b", pins).write()), timeout=60)
        assert res.returncode == 1 and f"bpf.pinPath {pins} is in use" in res.stderr, res.stderr[-3000:]
