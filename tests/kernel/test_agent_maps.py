"""The agent feeds the shared service maps through the bus when a plugin asks for them,
adopts them across a restart, and `kpr cleanup` removes them."""

import contextlib

import pytest

from kpr import hookimpl
from kpr.bpf.cleanup import scratch_pin_dir
from kpr.config import parse_config
from kpr.daemon import Agent
from kpr.servicemaps import ServiceMapWriter
from kpr.testing import agent as kit
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel

WEB = yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"]))


class NeedsMaps:
    """A plugin that only asks for the shared maps, as the datapath plugins do."""

    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]


def config_text(tmp_path, pin):
    """An agent config (kpr.testing.agent) with the manifests in tmp_path/m."""
    return kit.AgentConfig(tmp_path, pin, source={"path": str(tmp_path / "m")}).text()


def start_agent(cfg):
    """The agent with NeedsMaps beside the installed plugins, synced."""
    return kit.start_agent(cfg, internal_plugins={"needs": NeedsMaps()})


@contextlib.contextmanager
def web_config(tmp_path, prefix="kpr-agentmaps"):
    """WEB in tmp_path/m, a scratch pin directory, and the agent config on both written to
    tmp_path/kpr.yaml: (pin, config text, config file); the pins removed afterwards."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "web.yaml").write_text(WEB)
    with scratch_pin_dir(prefix) as pin:
        text = config_text(tmp_path, pin)
        cfg_file = tmp_path / "kpr.yaml"
        cfg_file.write_text(text)
        yield pin, text, cfg_file


def test_agent_writes_adopts_and_cleanup_removes_the_maps(require_kernel, tmp_path):
    with web_config(tmp_path) as (pin, text, cfg_file):
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
            wait_for(lambda: writer.read_back()["frontends"].get("10.96.0.10:80/TCP external", {}).get("backends") == ["10.244.1.6:8080"],
                     15, "the changed backend in the maps")
        finally:
            agent.shutdown()

        out = kit.kpr_cli("cleanup", "--config", str(cfg_file))
        assert out.returncode == 0, out.stderr
        assert "kpr_svc" in out.stdout
        assert not pin.exists(), "cleanup removes every pin and the directory"
        again = kit.kpr_cli("cleanup", "--config", str(cfg_file))
        assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_writer_opened_on_a_fresh_pin_path_is_empty(require_kernel):
    with scratch_pin_dir("kpr-agentmaps") as pin:
        w = ServiceMapWriter(pin)
        w.open()
        try:
            assert w.read_back()["frontends"] == {}
        finally:
            w.close()


MAGLEV_WEB = yaml_docs(service("web", cluster_ip="10.96.0.10", annotations={"service.kpr.io/lb-algorithm": "maglev"}),
                       endpoint_slice("web", ["10.244.1.5"]))


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

            def tick_until(cond, what, timeout=15.0):
                def step():
                    agent._tick()
                    return cond()
                return wait_for(step, timeout, what, lambda: agent.status()["plugins"]["servicemaps"]["message"])

            tick_until(lambda: writer._sync_attempts >= 2, "the initial sync retried")
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
            tick_until(lambda: agent.status()["ready"], "ready")
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
