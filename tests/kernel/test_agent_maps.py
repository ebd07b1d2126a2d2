"""The agent feeds the shared service maps through the bus when a plugin asks for them,
adopts them across a restart, and `kpr cleanup` removes them."""

import pytest

from kpr.daemon import Agent
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.agent import AgentConfig, NeedsMaps, kpr_cli, start_agent
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel

WEB = yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"]))


def test_agent_writes_adopts_and_cleanup_removes_the_maps(tmp_path, pin_dir):
    pin, cfg = pin_dir, AgentConfig(tmp_path, pin_dir)
    web = cfg.manifest("web", WEB)
    agent = start_agent(cfg, internal_plugins={"needs": NeedsMaps()})
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
    agent = start_agent(cfg, internal_plugins={"needs": NeedsMaps()})
    try:
        writer = agent.kpm.handle("servicemaps").plugin
        assert writer.ids() == ids
        assert writer.backend_ids() == backend_ids
        # A live change reaches the maps through the bus.
        web.write_text(WEB.replace("10.244.1.5", "10.244.1.6"))
        wait_for(lambda: writer.read_back()["frontends"].get("10.96.0.10:80/TCP external", {}).get("backends") == ["10.244.1.6:8080"],
                 15, "the changed backend in the maps")
    finally:
        agent.shutdown()

    out = kpr_cli("cleanup", "--config", str(cfg.path))
    assert out.returncode == 0, out.stderr
    assert "kpr_svc" in out.stdout
    assert not pin.exists(), "cleanup removes every pin and the directory"
    again = kpr_cli("cleanup", "--config", str(cfg.path))
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_writer_opened_on_a_fresh_pin_path_is_empty(pin_dir):
    with ServiceMapWriter(pin_dir).open() as w:
        assert w.read_back()["frontends"] == {}


MAGLEV_WEB = yaml_docs(service("web", cluster_ip="10.96.0.10", annotations={"service.kpr.io/lb-algorithm": "maglev"}),
                       endpoint_slice("web", ["10.244.1.5"]))


@pytest.mark.parametrize("source_first", [True, False], ids=["first pass during the start", "after it"])
def test_agent_is_not_ready_until_its_initial_state_is_in_the_maps(tmp_path, pin_dir, monkeypatch, caplog, source_first):
    """The initial sync cannot be written (a pinned kpr_maglev whose inner-map template has
    another size refuses every Maglev table): no READY, status says what is missing, the maps
    keep nothing of the failed batch; once the state can be written the retry makes it ready.
    Both start orders (kpr.daemon: the source's first pass while the plugins start, taken only
    on an idle node, and after them), not whichever the machine's load picks."""
    import socket

    from kpr.bpf import maps as M

    pin, cfg = pin_dir, AgentConfig(tmp_path, pin_dir)
    web = cfg.manifest("web", MAGLEV_WEB)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    t, k, v, _ = M.SPECS["kpr_maglev"].inner
    with M.BpfMap.create(M.MapSpec("kpr_maglev_in", t, k, v, 251)) as small:
        with M.BpfMap.create(M.SPECS["kpr_maglev"], inner_fd=small.fd) as outer:
            pin.mkdir(parents=True, exist_ok=True)
            outer.pin(pin / "kpr_maglev")
    agent = Agent(cfg.parse(), internal_plugins={"needs": NeedsMaps()}, source_first=source_first)
    with caplog.at_level("INFO", logger="kpr.daemon"):
        agent.setup()
    try:
        early = f"source.first_pass_early on={'yes' if source_first else 'no'}"
        assert any(r.getMessage().startswith(early) for r in caplog.records), "the start order asked for"
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
        web.write_text(WEB)
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
