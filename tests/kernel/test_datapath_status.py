"""Through a running agent: `kpr service list --datapath` decodes the pinned maps in the shape
of `kpr service list --json`, and `kpr status` says whether the maps match the desired state
(`maps: in sync`, or the differences: one made by hand with bpftool is reported)."""

from __future__ import annotations

import json
import subprocess

import pytest

from kpr import api, cli
from kpr.bpf import maps as M
from kpr.testing.agent import AgentConfig, NeedsMaps, start_agent
from kpr.testing.manifests import endpoint_slice, service, yaml_docs

pytestmark = pytest.mark.kernel


def test_datapath_list_and_maps_in_sync(tmp_path, pin_dir, capsys, monkeypatch) -> None:
    pin, agent_cfg = pin_dir, AgentConfig(tmp_path, pin_dir)
    agent_cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    cfg = agent_cfg.path
    agent = start_agent(agent_cfg, internal_plugins={"needs": NeedsMaps()})
    try:
        assert cli.main(["service", "list", "--json", "--config", str(cfg)]) == 0
        desired = json.loads(capsys.readouterr().out)
        assert cli.main(["service", "list", "--datapath", "--json", "--config", str(cfg)]) == 0
        held = json.loads(capsys.readouterr().out)
        assert len(held) == len(desired) == 1
        same = ("service", "type", "address", "port", "protocol", "state", "backends")
        assert {k: held[0][k] for k in same} == {k: desired[0][k] for k in same}
        assert held[0]["scopes"]["external"]["algorithm"] == "random"
        assert held[0]["scopes"]["external"]["backends"][0]["address"] == "10.244.1.5"

        assert cli.main(["service", "list", "--datapath", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "default/web" in out and "10.96.0.10:80/TCP" in out and "10.244.1.5:8080" in out

        cli.main(["status", "--config", str(cfg)])
        assert "maps:     in sync" in capsys.readouterr().out

        # A backend slot changed by hand (kpr_slots, at the service entry's slot_base): status names it.
        with M.BpfMap.open_pinned(pin / "kpr_svc") as m:
            head = m.lookup(M.SVC_KEY.pack(M.addr_to_bytes("10.96.0.10"), M.htons(80), 6, 0, 0, 0))
        base = M.SVC_VAL.unpack(head)[0]
        key, val = M.U32.pack(base), M.SLOT.pack(4242, M.BACKEND_ACTIVE)
        done = subprocess.run(["bpftool", "map", "update", "pinned", str(pin / "kpr_slots"), "key", "hex",
                               *key.hex(" ").split(), "value", "hex", *val.hex(" ").split()], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        # Within MAPS_SYNC_MAX_AGE the last comparison is shown, with its age.
        cli.main(["status", "--json", "--config", str(cfg)])
        cached = json.loads(capsys.readouterr().out)["maps"]
        assert cached["count"] == 0 and cached["ageSeconds"] >= 0
        monkeypatch.setattr(api, "MAPS_SYNC_MAX_AGE", 0.0)
        cli.main(["status", "--config", str(cfg)])
        out = capsys.readouterr().out
        assert "maps:     1 difference from the desired state (kpr_slots 1)" in out, out
        assert f"kpr_slots index {base}: kernel value (backend 4242, state active), desired (backend " in out
        cli.main(["status", "--json", "--config", str(cfg)])
        assert json.loads(capsys.readouterr().out)["maps"]["count"] == 1
    finally:
        assert agent.shutdown() == 0
