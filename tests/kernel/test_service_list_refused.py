"""`kpr service list` tells a service the writer refused (it would not fit the maps) from one it
serves: state and reason, in the table and in --json."""

import json

import pytest

from kpr import api as kapi
from kpr.testing.agent import AgentConfig, NeedsMaps, kpr_cli, start_agent
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel

# 1,100 externalIPs: 1,101 frontends of 2 kpr_svc entries each, in a kpr_svc of 1,024.
WEB = yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"]))
HUGE = yaml_docs(
    service("huge", cluster_ip="10.96.0.20", external_ips=[f"203.0.{i // 250}.{i % 250 + 1}" for i in range(1100)]),
    endpoint_slice("huge", ["10.244.1.9"], node=None),
)


def test_a_refused_service_shows_as_refused_in_service_list(tmp_path, pin_dir):
    cfg = AgentConfig(tmp_path, pin_dir, extra={"bpf": {"mapSizes": {"kprSvc": 1024}}})
    cfg.manifest("web", WEB)
    cfg.manifest("huge", HUGE)
    cfg_file = cfg.path
    agent = start_agent(cfg, internal_plugins={"needs": NeedsMaps()}, timeout=30)
    try:
        writer = agent.kpm.handle("servicemaps").plugin
        wait_for(lambda: writer._initial is None, timeout=30, what="initial sync")
        assert [str(k) for k in writer.refused] == ["default/huge"]
        assert "10.96.0.20:80/TCP external" not in writer.read_back()["frontends"]

        rows = kapi.get(tmp_path / "kpr.sock", "/v1/services")
        by_service: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            by_service.setdefault(r["service"], set()).add((r["state"], r["reason"]))
        assert by_service["default/web"] == {("served", "")}
        [(state, reason)] = by_service["default/huge"]
        assert state == "refused"
        assert "kpr_svc full" in reason and "bpf.mapSizes.kprSvc" in reason

        listed = kpr_cli("service", "list", "--json", "--config", str(cfg_file), check=True)
        assert {(r["service"], r["state"]) for r in json.loads(listed.stdout)} == {("default/web", "served"), ("default/huge", "refused")}
        table = kpr_cli("service", "list", "--config", str(cfg_file), check=True).stdout
        lines = table.splitlines()
        assert lines[0].split()[:5] == ["SERVICE", "TYPE", "FRONTEND", "STATE", "BACKENDS"]
        web = [line for line in lines if line.startswith("default/web ")]
        assert web and all(line.split()[3] == "served" for line in web)
        huge = [line for line in lines if line.startswith("default/huge ")]
        assert len(huge) == 1101 and all(line.split()[3] == "refused" for line in huge)
        notes = [line for line in lines if line.startswith("  default/huge refused: kpr_svc full")]
        assert len(notes) == 1, "the reason once per service"
        assert lines.index(notes[0]) == lines.index(huge[-1]) + 1, "under the service's last frontend"
    finally:
        agent.shutdown()
        kpr_cli("cleanup", "--config", str(cfg_file))
