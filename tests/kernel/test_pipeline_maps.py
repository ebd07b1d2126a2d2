"""The writer stage with the real service map writer, through the agent: when a plugin's
service hook runs, the kernel maps already hold that state, with the generation `kpr status`
reports for the writer."""

import time

import pytest

from kpr import hookimpl
from kpr.bpf.cleanup import scratch_pin_dir
from kpr.config import parse_config
from kpr.daemon import Agent

pytestmark = pytest.mark.kernel

WEB = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.5]
    nodeName: node1
"""
FRONTEND = "10.96.0.10:80/TCP external"


class ReadsMaps:
    """A plugin that needs the shared maps and, in each service hook, reads what the kernel
    maps hold for web (through the writer's read-back, which dumps the kernel maps)."""

    def __init__(self):
        self.writer = None
        self.seen: list[tuple[str, object, int]] = []  # (hook, web's backends in the maps, generation)

    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]

    def _web(self):
        entry = self.writer.read_back()["frontends"].get(FRONTEND)
        return entry["backends"] if entry else None

    @hookimpl
    def kpr_service_upsert(self, service, generation):
        self.seen.append(("upsert", self._web(), generation))

    @hookimpl
    def kpr_service_delete(self, key, generation):
        self.seen.append(("delete", self._web(), generation))

    @hookimpl
    def kpr_sync_complete(self, generation):
        self.seen.append(("sync", self._web(), generation))


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_plugins_see_each_change_already_in_the_kernel_maps(require_kernel, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "web.yaml").write_text(WEB)
    with scratch_pin_dir("kpr-h1-pipeline") as pin:
        cfg = parse_config(f"""
node: {{name: node1, addresses: [192.168.50.10], devices: [lo]}}
source: {{kind: files, path: {tmp_path}/m, statePath: {tmp_path}/alloc.json, pollInterval: 0.05, emptyGracePeriod: 0}}
bpf: {{pinPath: {pin}}}
api: {{socket: {tmp_path}/kpr.sock}}
metrics: {{address: ""}}
agent: {{stateDir: {tmp_path}/state, shutdownTimeout: 5}}
""")
        plugin = ReadsMaps()
        agent = Agent(cfg, internal_plugins={"reads": plugin})
        agent.setup()
        try:
            assert "servicemaps" not in agent.bus.workers, "the writer is the bus's stage, not a plugin worker"
            plugin.writer = agent.kpm.facility("servicemaps").plugin
            assert wait_for(agent.bus.synced)
            assert plugin.seen[:2] == [("upsert", ["10.244.1.5:8080"], 1), ("sync", ["10.244.1.5:8080"], 1)], \
                "the initial state is in the maps before any plugin hears of it"

            (tmp_path / "m" / "web.yaml").write_text(WEB.replace("10.244.1.5", "10.244.1.6"))
            assert wait_for(lambda: any(s[0] == "upsert" and s[1] == ["10.244.1.6:8080"] for s in plugin.seen))
            (tmp_path / "m" / "web.yaml").unlink()
            assert wait_for(lambda: plugin.seen[-1][0] == "delete")
            assert plugin.seen[-1][1] is None, "a deleted service is gone from the maps when the hook runs"
            upserts = [s for s in plugin.seen if s[0] == "upsert"]
            assert all(s[1] is not None for s in upserts), plugin.seen
            gens = [s[2] for s in plugin.seen]
            assert gens == sorted(gens) and gens[-1] > 1

            st = agent.status()["plugins"]["servicemaps"]
            assert st["details"]["synced"] and st["bus"]["generation"] == gens[-1]
            assert st["bus"]["synced"] and st["bus"]["failing"] == {}
        finally:
            assert agent.shutdown() == 0
