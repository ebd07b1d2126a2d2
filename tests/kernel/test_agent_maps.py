"""The agent feeds the shared service maps through the bus when a plugin asks for them,
adopts them across a restart, and `kpr cleanup` removes them."""

import subprocess
import sys
import time

import pytest

from kpr import hookimpl
from kpr.bpf.cleanup import scratch_pin_dir
from kpr.config import parse_config
from kpr.daemon import Agent
from kpr.servicemaps import ServiceMapWriter

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


class NeedsMaps:
    """A plugin that only asks for the shared maps, as the datapath plugins do."""

    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]


def config_text(tmp_path, pin):
    return f"""
node: {{name: node1, addresses: [192.168.50.10], devices: [lo]}}
source: {{kind: files, path: {tmp_path}/m, statePath: {tmp_path}/alloc.json, pollInterval: 0.05}}
bpf: {{pinPath: {pin}}}
api: {{socket: {tmp_path}/kpr.sock}}
metrics: {{address: ""}}
agent: {{stateDir: {tmp_path}/state, shutdownTimeout: 5}}
"""


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def start_agent(cfg):
    agent = Agent(cfg, internal_plugins={"needs": NeedsMaps()})
    agent.setup()
    assert wait_for(lambda: agent.bus.synced()), "the agent did not sync"
    return agent


def test_agent_writes_adopts_and_cleanup_removes_the_maps(require_kernel, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "web.yaml").write_text(WEB)
    with scratch_pin_dir("kpr-agentmaps") as pin:
        text = config_text(tmp_path, pin)
        cfg_file = tmp_path / "kpr.yaml"
        cfg_file.write_text(text)

        agent = start_agent(parse_config(text))
        try:
            assert [h.name for h in agent.handles] == ["servicemaps", "needs"], "the writer starts first"
            writer = agent.kpm.handle("servicemaps").plugin
            front = writer.read_back()["frontends"]
            assert front["10.96.0.10:80/TCP external"]["backends"] == ["10.244.1.5:8080"]
            ids, backend_ids = writer.ids(), writer.backend_ids()
            status = agent.status()["plugins"]["servicemaps"]
            assert status["healthy"] and status["counters"]["services"] == 1
        finally:
            assert agent.shutdown() == 0
        assert (pin / "kpr_svc").exists(), "pins outlive the agent so established flows keep working"

        # A restarted agent adopts the pinned maps: same kernel maps, same backend ids.
        agent = start_agent(parse_config(text))
        try:
            writer = agent.kpm.handle("servicemaps").plugin
            assert writer.ids() == ids
            assert writer.backend_ids() == backend_ids
            # A live change reaches the maps through the bus.
            (tmp_path / "m" / "web.yaml").write_text(WEB.replace("10.244.1.5", "10.244.1.6"))
            assert wait_for(lambda: writer.read_back()["frontends"].get("10.96.0.10:80/TCP external", {}).get("backends") == ["10.244.1.6:8080"])
        finally:
            agent.shutdown()

        out = subprocess.run([sys.executable, "-m", "kpr.cli", "cleanup", "--config", str(cfg_file)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "kpr_svc" in out.stdout
        assert not pin.exists(), "cleanup removes every pin and the directory"
        again = subprocess.run([sys.executable, "-m", "kpr.cli", "cleanup", "--config", str(cfg_file)], capture_output=True, text=True)
        assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_writer_opened_on_a_fresh_pin_path_is_empty(require_kernel):
    with scratch_pin_dir("kpr-agentmaps") as pin:
        w = ServiceMapWriter(pin)
        w.open()
        try:
            assert w.read_back()["frontends"] == {}
        finally:
            w.close()


MAGLEV_WEB = WEB.replace(
    "metadata: {name: web, namespace: default}\n",
    "metadata: {name: web, namespace: default, annotations: {service.kpr.io/lb-algorithm: maglev}}\n",
    1,
)


def test_agent_is_not_ready_until_its_initial_state_is_in_the_maps(require_kernel, tmp_path):
    """The initial sync cannot be written (a pinned kpr_maglev whose inner-map template has
    another size refuses every Maglev table): no READY, status says what is missing, the maps
    keep nothing of the failed batch; once the state can be written the retry makes it ready."""
    import os
    import socket

    from kpr.bpf import maps as M

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "web.yaml").write_text(MAGLEV_WEB)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    old_env = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(notify)
    with scratch_pin_dir("kpr-agentmaps") as pin:
        t, k, v, _ = M.SPECS["kpr_maglev"].inner
        with M.BpfMap.create(M.MapSpec("kpr_maglev_in", t, k, v, 251)) as small:
            with M.BpfMap.create(M.SPECS["kpr_maglev"], inner_fd=small.fd) as outer:
                pin.mkdir(parents=True, exist_ok=True)
                outer.pin(pin / "kpr_maglev")
        agent = Agent(parse_config(config_text(tmp_path, pin)), internal_plugins={"needs": NeedsMaps()})
        agent.setup()
        try:
            writer = agent.kpm.handle("servicemaps").plugin

            def tick_until(cond, timeout=15.0):
                def step():
                    agent._tick()
                    return cond()
                return wait_for(step, timeout)

            assert tick_until(lambda: writer._sync_attempts >= 2), "the initial sync is retried"
            st = agent.status()
            # Plugins hear of the initial state only once it is in the maps (kpr.pipeline).
            assert st["ready"] is False and not agent.bus.synced()
            ws = st["plugins"]["servicemaps"]
            assert ws["healthy"] is False and ws["details"]["synced"] is False
            assert ws["details"]["missing"] == ["default/web"]
            assert "Invalid argument" in ws["details"]["syncError"]
            assert "initial state not in the maps" in ws["message"]
            assert writer.read_back()["frontends"] == {}, "the failed batch was rolled back"
            assert ws["counters"]["map_entries"] == 0
            with pytest.raises(BlockingIOError):
                sock.recv(4096)  # no READY=1

            # The state changes to one that can be written: retried soon, then ready.
            (tmp_path / "m" / "web.yaml").write_text(WEB)
            assert tick_until(lambda: agent.status()["ready"]), agent.status()["plugins"]["servicemaps"]["message"]
            assert writer.read_back()["frontends"]["10.96.0.10:80/TCP external"]["backends"] == ["10.244.1.5:8080"]
            sock.setblocking(True)
            sock.settimeout(5)
            assert sock.recv(4096).decode().startswith("READY=1")
            ws = agent.status()["plugins"]["servicemaps"]
            assert ws["healthy"] and ws["details"]["synced"] and "missing" not in ws["details"]
        finally:
            agent.shutdown()
            sock.close()
            if old_env is None:
                os.environ.pop("NOTIFY_SOCKET", None)
            else:
                os.environ["NOTIFY_SOCKET"] = old_env
